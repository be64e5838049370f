//! Binary upgrade: what one Switchyard process passes to the next over a Unix socket
//! pair. The listening sockets first (so there is never a moment without a listener),
//! then each transaction-pooling client that is between transactions: its socket and
//! its session's state, so the client keeps its connection and never sees an error.
//!
//! The socket is `SOCK_SEQPACKET`: one message per item, never merged or split, each a
//! JSON header with the item's descriptor attached (`SCM_RIGHTS`). Neither std nor
//! tokio passes descriptors, hence nix's `sendmsg`/`recvmsg`. The calls block; the
//! successor reads all the time, and a send that still waits longer than `SEND_WITHIN`
//! fails, so a stuck successor costs a worker that long once, and the client stays.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use crate::cluster::routing::Endpoint;

/// The environment variable that tells a new process it is a successor, and which of
/// its descriptors is the socket to its predecessor.
pub const ENV: &str = "SWITCHYARD_UPGRADE_FD";

/// Bound on one blocking send.
const SEND_WITHIN: Duration = Duration::from_secs(2);

/// Bound on one message (a session's state with its prepared statements); larger ones
/// are not handed over (the client stays on the old process until it leaves).
pub const MAX_MESSAGE: usize = 4 << 20;

/// One item, as its header says.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Predecessor → successor, first: the listening sockets, one descriptor each, in
    /// this order.
    Listeners { listeners: Vec<Listening> },
    /// Successor → predecessor: its listeners are set up and every node had its first
    /// health check; the predecessor stops accepting and hands its clients over.
    Ready { pid: u32 },
    /// Predecessor → successor: a client connection (its descriptor attached) and what
    /// its engine needs to go on serving it (`state`, the engine's own format).
    Session {
        engine: String,
        cluster: String,
        endpoint: Side,
        peer: SocketAddr,
        state: serde_json::Value,
    },
}

/// A listening socket: whose it is and where it listens.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// `cluster/rw`, `cluster/ro`, or `admin/http`.
    pub name: String,
    pub addr: SocketAddr,
}

/// A listener's endpoint, as the header carries it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Rw,
    Ro,
}

impl From<Endpoint> for Side {
    fn from(e: Endpoint) -> Side {
        match e {
            Endpoint::ReadWrite => Side::Rw,
            Endpoint::ReadOnly => Side::Ro,
        }
    }
}

impl From<Side> for Endpoint {
    fn from(s: Side) -> Endpoint {
        match s {
            Side::Rw => Endpoint::ReadWrite,
            Side::Ro => Endpoint::ReadOnly,
        }
    }
}

/// One end of the socket pair.
pub struct Channel {
    fd: OwnedFd,
    /// Where messages are received (grown to `MAX_MESSAGE` once, then reused: a
    /// successor receives one message per client).
    inbox: std::cell::RefCell<Vec<u8>>,
}

impl Channel {
    /// A connected pair, both ends close-on-exec (the successor's end is made
    /// inheritable just for its spawn).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        for fd in [&a, &b] {
            setsockopt(fd, sockopt::SndBuf, &MAX_MESSAGE)?;
            setsockopt(
                fd,
                sockopt::SendTimeout,
                &nix::sys::time::TimeVal::new(SEND_WITHIN.as_secs() as i64, 0),
            )?;
        }
        Ok((Channel::of(a), Channel::of(b)))
    }

    /// The end a predecessor left to this process (`ENV`).
    ///
    /// # Safety
    /// `fd` must be an open descriptor this process owns and nothing else uses.
    pub unsafe fn from_raw(fd: RawFd) -> Channel {
        // SAFETY: the caller's promise.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Children of this process (its own successor, later) must not inherit it.
        let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        Channel::of(fd)
    }

    fn of(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            inbox: Default::default(),
        }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Send `message` with `fds` attached (their copies; the caller keeps its own).
    pub fn send(&self, message: &Message, fds: &[RawFd]) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!(
                "{} bytes of state, more than the {MAX_MESSAGE} a hand-over carries",
                bytes.len()
            )));
        }
        let iov = [io::IoSlice::new(&bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
        Ok(())
    }

    /// The next message and its descriptors; None when the other end closed.
    pub fn recv(&self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut buf = self.inbox.borrow_mut();
        buf.resize(MAX_MESSAGE, 0);
        // The kernel passes at most 253 descriptors (SCM_MAX_FD) in one message.
        let mut space = nix::cmsg_space!([RawFd; 253]);
        let (len, fds) = {
            let mut iov = [io::IoSliceMut::new(&mut buf[..])];
            let msg = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(received) = c {
                    // SAFETY: descriptors the kernel just installed in this process.
                    fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            (msg.bytes, fds)
        };
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        let message = serde_json::from_slice(&buf[..len]).map_err(io::Error::other)?;
        Ok(Some((message, fds)))
    }
}

/// Where this process hands its clients to, once its successor is ready (`Shared::successor`).
pub struct Successor {
    channel: Mutex<Channel>,
    pub pid: u32,
}

impl Successor {
    pub fn new(channel: Channel, pid: u32) -> Successor {
        Successor {
            channel: Mutex::new(channel),
            pid,
        }
    }

    /// Hand one client over: its socket and its state. On an error the client stays
    /// here (nothing was sent: a seqpacket message goes whole or not at all).
    pub fn hand_over(&self, message: &Message, socket: RawFd) -> io::Result<()> {
        self.channel.lock().unwrap().send(message, &[socket])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_message_and_its_descriptor_arrive_whole_and_the_end_is_seen() {
        let (a, b) = Channel::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed along").unwrap();
        let message = Message::Listeners {
            listeners: vec![Listening {
                name: "main/rw".into(),
                addr: "127.0.0.1:6432".parse().unwrap(),
            }],
        };
        a.send(&message, &[file.as_raw_fd()]).unwrap();
        a.send(&Message::Ready { pid: 42 }, &[]).unwrap();
        let (got, fds) = b.recv().unwrap().unwrap();
        let Message::Listeners { listeners } = got else {
            panic!("{got:?}")
        };
        assert_eq!(listeners[0].name, "main/rw");
        assert_eq!(fds.len(), 1);
        // The same open file: what one side wrote, the other reads.
        let mut theirs = std::fs::File::from(fds.into_iter().next().unwrap());
        theirs.rewind().unwrap();
        let mut text = String::new();
        theirs.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed along");
        let (next, fds) = b.recv().unwrap().unwrap();
        assert!(matches!(next, Message::Ready { pid: 42 }) && fds.is_empty());
        drop(a);
        assert!(b.recv().unwrap().is_none(), "the other end closed");
    }
}
