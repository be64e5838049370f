//! Binary upgrade without a client noticing (SIGUSR2, `POST /upgrade`, `switchyard
//! upgrade`): the running process starts the binary now at its executable's path as its
//! successor and passes it the listening sockets (`proxy::handover`). Both accept on
//! them until the successor is ready (listeners set up, first health round done); then
//! the old process stops accepting and hands each transaction-pooling client over at
//! its next transaction boundary. Session-mode, TLS and pinned clients stay until they
//! leave or the drain (`proxy.shutdown_timeout_ms`) ends them with 57P01; the old
//! process exits when empty. If the successor fails to start, the old one serves on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use tracing::info;

use crate::proxy::handover::{Channel, Listening, Message, ENV};

/// How long a successor may take to be ready (its config, listeners, first health
/// round) before the upgrade is called off.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What a successor got from its predecessor: the listening sockets by name
/// (`cluster/rw`, `cluster/ro`, `admin/http`), and the channel to say it is ready on and
/// receive clients from.
pub struct Inherited {
    pub listeners: HashMap<String, (SocketAddr, std::net::TcpListener)>,
    pub channel: Channel,
}

/// This process was started as a successor: take what the predecessor passes.
/// None when it was not (`SWITCHYARD_UPGRADE_FD` unset).
pub fn inherit() -> anyhow::Result<Option<Inherited>> {
    let Ok(fd) = std::env::var(ENV) else {
        return Ok(None);
    };
    // Not passed on to a successor of this process.
    // (Called from `run` before any runtime or thread of ours starts.)
    std::env::remove_var(ENV);
    let fd: RawFd = fd
        .parse()
        .map_err(|_| anyhow::anyhow!("{ENV} is not a descriptor number"))?;
    // SAFETY: the predecessor left exactly this descriptor open for this process.
    let channel = unsafe { Channel::from_raw(fd) };
    let (message, fds) = channel
        .recv()?
        .ok_or_else(|| anyhow::anyhow!("the old process closed the upgrade socket before passing its listeners"))?;
    let Message::Listeners { listeners } = message else {
        anyhow::bail!("the old process sent {message:?} where its listeners were expected");
    };
    if listeners.len() != fds.len() {
        anyhow::bail!(
            "{} listeners named but {} descriptors passed",
            listeners.len(),
            fds.len()
        );
    }
    let mut out = HashMap::new();
    for (l, fd) in listeners.into_iter().zip(fds) {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        out.insert(l.name, (l.addr, listener));
    }
    info!(
        listeners = out.len(),
        "started as the successor of the running process: took its listeners"
    );
    Ok(Some(Inherited {
        listeners: out,
        channel,
    }))
}

/// Start the successor and pass it `listeners` (name, address, socket); returns its
/// pid and the channel once it said it is ready. On any failure the successor is
/// stopped and the reason returned; nothing of this process changed.
pub async fn start_successor(exe: &PathBuf, listeners: &[(Listening, OwnedFd)]) -> Result<(u32, Channel), String> {
    let (ours, theirs) = Channel::pair().map_err(|e| format!("cannot create the upgrade socket: {e}"))?;
    let inherit = theirs.raw();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1)).env(ENV, inherit.to_string());
    // SAFETY: between fork and exec only an async-signal-safe fcntl runs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(inherit, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    drop(theirs); // its end lives in the child now: EOF here when it exits
    let pid = child.id();
    info!(pid, exe = %exe.display(), "upgrade: started the new process");
    let names: Vec<Listening> = listeners.iter().map(|(l, _)| l.clone()).collect();
    let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| fd.as_fd().as_raw_fd()).collect();
    let fail = |child: &mut std::process::Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        why
    };
    if let Err(e) = ours.send(&Message::Listeners { listeners: names }, &fds) {
        // Most likely it is gone already (its end of the socket closed with it).
        for _ in 0..20 {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(exited_early(status));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return Err(fail(
            &mut child,
            format!("cannot pass the listeners to the new process: {e}"),
        ));
    }
    let waited = tokio::time::timeout(
        READY_WITHIN,
        tokio::task::spawn_blocking(move || {
            let r = ours.recv();
            (r, ours)
        }),
    )
    .await;
    match waited {
        Ok(Ok((Ok(Some((Message::Ready { pid: ready }, _))), ours))) if ready == pid => {
            // Reaped by whoever outlives it; this process exits first.
            std::mem::forget(child);
            Ok((pid, ours))
        }
        Ok(Ok((Ok(None), _))) => Err(match child.wait() {
            Ok(status) => exited_early(status),
            Err(e) => format!("the new process closed the upgrade socket before it was ready ({e})"),
        }),
        Ok(Ok((Ok(Some((other, _))), _))) => Err(fail(
            &mut child,
            format!("the new process said {other:?} instead of ready"),
        )),
        // A reset rather than an end: it exited with the listeners' message unread.
        Ok(Ok((Err(e), _))) => match child.try_wait() {
            Ok(Some(status)) => Err(exited_early(status)),
            _ if e.raw_os_error() == Some(libc::ECONNRESET) => Err(match child.wait() {
                Ok(status) => exited_early(status),
                Err(_) => format!("reading from the new process: {e}"),
            }),
            _ => Err(fail(&mut child, format!("reading from the new process: {e}"))),
        },
        Ok(Err(e)) => Err(fail(&mut child, format!("waiting for the new process: {e}"))),
        Err(_) => Err(fail(
            &mut child,
            format!(
                "the new process was not ready within {} s; stopped it",
                READY_WITHIN.as_secs()
            ),
        )),
    }
}

fn exited_early(status: std::process::ExitStatus) -> String {
    format!("the new process exited ({status}) before it was ready (its log says why)")
}

/// The successor is ready: tell the predecessor (which then stops accepting and hands
/// its clients over).
pub fn say_ready(channel: &Channel) -> std::io::Result<()> {
    channel.send(
        &Message::Ready {
            pid: std::process::id(),
        },
        &[],
    )
}

/// The executable this process runs, as a path to start again: a replaced file still
/// has its path (Linux shows the running one as "(deleted)", which is not what to run).
pub fn executable() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}
