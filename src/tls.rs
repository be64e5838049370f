//! TLS toward servers (`server_tls`, `server_ca_file`), and what both sides share: a
//! socket that is plain or TLS, delegating reads and writes to whichever it is. The
//! client side (acceptor, channel binding) is `proxy/stream.rs`; PostgreSQL's SSLRequest
//! on both sides is `pg/tls.rs`.
//!
//! One `ServerTls` per cluster serves every connection Switchyard makes to its nodes:
//! session-mode logins, pooled connections, health checks, the freshness oracle, the
//! manager and cancel requests, so that a node whose certificate fails verification is
//! refused by all of them alike (and is Down, with the reason, in `/status`).
//!
//! Modes follow libpq's `sslmode`: `prefer` and `require` encrypt without verifying
//! the certificate (`require` with `server_ca_file` checks the chain, as libpq does
//! with a root certificate); `verify-ca` checks the chain against `server_ca_file`;
//! `verify-full` also checks that the certificate names the node's host. `prefer`
//! falls back to plaintext when the server has no TLS or the handshake fails.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::ServerTlsMode;

/// How Switchyard speaks TLS to the nodes of one cluster.
pub struct ServerTls {
    mode: ServerTlsMode,
    config: Arc<ClientConfig>,
}

impl ServerTls {
    /// Build from the cluster's settings; the error names the file at fault. A CA file
    /// is required for the verify modes; with `require` it makes the chain checked too
    /// (as libpq does when a root certificate is present).
    pub fn new(mode: ServerTlsMode, ca_file: Option<&Path>) -> Result<ServerTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = ca_file.map(load_roots).transpose()?.map(Arc::new);
        let check = match (mode, roots) {
            (ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull, None) => {
                return Err(format!(
                    "server_tls = \"{mode}\" needs server_ca_file (the CA that signed the servers' certificates)"
                ))
            }
            (ServerTlsMode::VerifyFull, Some(roots)) => Check::ChainAndName(roots),
            (ServerTlsMode::VerifyCa | ServerTlsMode::Require, Some(roots)) => Check::Chain(roots),
            _ => Check::Nothing,
        };
        let verifier = Arc::new(Verifier {
            provider: provider.clone(),
            check,
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(ServerTls {
            mode,
            config: Arc::new(config),
        })
    }

    /// No TLS at all (tests, and callers with no cluster at hand).
    pub fn disabled() -> ServerTls {
        ServerTls::new(ServerTlsMode::Disable, None).expect("a config without files cannot fail")
    }

    pub fn mode(&self) -> ServerTlsMode {
        self.mode
    }

    /// The TLS handshake on a connection whose protocol has just asked for it (after
    /// PostgreSQL's `S`, or MySQL's SSL request), the certificate checked as the mode
    /// says for the host of `addr`.
    pub async fn handshake(&self, tcp: TcpStream, addr: &str) -> io::Result<ServerStream> {
        let name = server_name(addr)?;
        let tls = TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("TLS with the server failed: {e}")))?;
        Ok(ServerStream::Tls(Box::new(tls)))
    }

    /// The rustls configuration connections to this cluster's nodes use.
    pub(crate) fn rustls(&self) -> &Arc<ClientConfig> {
        &self.config
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let at = |e: &dyn std::fmt::Display| format!("server_ca_file {}: {e}", path.display());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(path).map_err(|e| at(&e))? {
        roots.add(c.map_err(|e| at(&e))?).map_err(|e| at(&e))?;
    }
    if roots.is_empty() {
        return Err(at(&"no certificate in it"));
    }
    Ok(roots)
}

/// The name the certificate must carry: the host part of `host:port` (a DNS name or
/// an IP address, `[v6]` brackets removed).
fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("host {host}: {e}")))
}

/// What is checked of a server's certificate.
#[derive(Debug)]
enum Check {
    /// `prefer` / `require` without a CA file: encryption only.
    Nothing,
    /// `verify-ca` (and `require` with a CA file): the chain up to `server_ca_file`.
    Chain(Arc<RootCertStore>),
    /// `verify-full`: the chain and the node's host name.
    ChainAndName(Arc<RootCertStore>),
}

/// The handshake's signatures are always checked (the session is with the holder of
/// the certificate's key); the certificate itself as `check` says, each step called
/// explicitly rather than relying on the order of a combined verifier.
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    check: Check,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match &self.check {
            Check::Nothing => return Ok(ServerCertVerified::assertion()),
            Check::Chain(roots) | Check::ChainAndName(roots) => roots,
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if let Check::ChainAndName(_) = self.check {
            verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection to a server, plain or TLS. Writers flush after each batch (a TLS
/// stream may keep its last records buffered; a no-op on a plain socket).
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ServerStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            ServerStream::Plain(s) => s,
            ServerStream::Tls(s) => s.get_ref().0,
        }
    }

    /// For an idle pooled connection: true when nothing waits to be read. A server
    /// that went away leaves EOF (or, over TLS, an alert) behind. Peeks at the socket
    /// without consuming, so a TLS session is left intact; a readiness event not yet
    /// seen by the runtime reads as alive, as any non-blocking probe would.
    ///
    /// Only a socket the runtime has seen readable is peeked at (`try_io`): the common
    /// case, a connection whose last read emptied it, costs no system call and registers
    /// nothing (`poll_peek` with a no-op waker took the readiness lock and swapped wakers
    /// at every checkout).
    pub fn idle_and_open(&self) -> bool {
        let tcp = self.tcp();
        let peeked = tcp.try_io(tokio::io::Interest::READABLE, || {
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            socket2::SockRef::from(tcp).peek(&mut probe)
        });
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// The two directions, usable at once (the session-mode relay).
    pub fn split(&mut self) -> (ServerRead<'_>, ServerWrite<'_>) {
        match self {
            ServerStream::Plain(s) => {
                let (r, w) = s.split();
                (ServerRead::Plain(r), ServerWrite::Plain(w))
            }
            ServerStream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ServerRead::Tls(r), ServerWrite::Tls(w))
            }
        }
    }
}

pub enum ServerRead<'a> {
    Plain(tokio::net::tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

pub enum ServerWrite<'a> {
    Plain(tokio::net::tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

/// Delegate AsyncRead / AsyncWrite to whichever variant is inside (used for the
/// client-side stream enums too).
macro_rules! delegate_read {
    ($ty:ty, $($v:ident),+) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => std::pin::Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}
macro_rules! delegate_write {
    ($ty:ty, $($v:ident),+) => {
        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$v(s) => std::pin::Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => std::pin::Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => std::pin::Pin::new(s).poll_shutdown(cx),)+
                }
            }
            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$v(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $(Self::$v(s) => s.is_write_vectored(),)+
                }
            }
        }
    };
}
/// `read_some` for a plain-or-TLS stream (or read half): `read_plain` on the plain
/// socket (`$s => $tcp` names it), `read_buf` through rustls.
macro_rules! read_some {
    ($ty:ty, $s:ident => $tcp:expr) => {
        impl $ty {
            /// One read into `buf` (`tls::read_plain` on a plain socket).
            pub async fn read_some(&mut self, buf: &mut bytes::BytesMut) -> std::io::Result<usize> {
                match self {
                    Self::Plain($s) => $crate::tls::read_plain($tcp, buf).await,
                    Self::Tls(t) => tokio::io::AsyncReadExt::read_buf(t, buf).await,
                }
            }
        }
    };
}
/// `send` for a plain-or-TLS stream: `write_plain` on the plain socket, write and flush
/// through rustls.
macro_rules! send {
    ($ty:ty) => {
        impl $ty {
            /// Write and flush `bytes` (`tls::write_plain` on a plain socket).
            pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
                match self {
                    Self::Plain(tcp) => $crate::tls::write_plain(tcp, bytes).await,
                    Self::Tls(t) => $crate::tls::write_flush(t, bytes).await,
                }
            }
        }
    };
}
pub(crate) use {delegate_read, delegate_write, read_some, send};

delegate_read!(ServerStream, Plain, Tls);
delegate_write!(ServerStream, Plain, Tls);
delegate_read!(ServerRead<'_>, Plain, Tls);
delegate_write!(ServerWrite<'_>, Plain, Tls);
read_some!(ServerStream, s => s);
read_some!(ServerRead<'_>, s => s.as_ref());
send!(ServerStream);

/// One read from a plain socket into `buf`, as `read_buf` does, except that a short read
/// (less than the room there was) also forgets the socket's readiness.
///
/// Why: tokio keeps a socket "readable" until a read fails with `WouldBlock`, so after
/// each message the next read is a `recv` that finds nothing (pgbench -S through the
/// transaction pool: 3 `recvfrom` per transaction against PgBouncer's 2). A TCP read
/// that returns less than it was given room for emptied the socket's queue; anything
/// that arrives after it raises a new edge-triggered event, which marks the socket ready
/// again. The readiness is cleared inside `try_io`, with the tick it observed before the
/// read, so an event the runtime handled meanwhile (on another thread) is not lost.
pub async fn read_plain(tcp: &TcpStream, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    loop {
        std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
        if let Some(n) = try_read_drained(tcp, buf)? {
            return Ok(n);
        }
    }
}

/// A read that does not wait: `Ok(None)` if nothing was there (the readiness is then
/// cleared, as tokio does). See `read_plain`.
pub fn try_read_drained(tcp: &TcpStream, buf: &mut bytes::BytesMut) -> io::Result<Option<usize>> {
    if buf.capacity() == buf.len() {
        buf.reserve(512);
    }
    let room = buf.capacity() - buf.len();
    let mut got = None;
    let done = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = tcp.try_read_buf(buf)?;
        got = Some(n);
        match n > 0 && n < room {
            true => Err(io::ErrorKind::WouldBlock.into()),
            false => Ok(()),
        }
    });
    match (got, done) {
        (Some(n), _) => Ok(Some(n)),
        (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => unreachable!("the closure ran and read"),
    }
}

/// Write and flush (a TLS stream keeps its last records buffered until flushed).
pub async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Write all of `bytes` on a plain socket: at once if the kernel takes them (the usual
/// case: the data path's writes are small and the socket's buffer has room), else
/// through the runtime. `try_write` looks at the readiness the runtime knows and calls
/// `send`; `write_all` (`poll_write`) also takes from the task's budget and registers
/// its waker first, about 200 instructions more per write under `bench/instructions`,
/// twice per transaction. The budget is still taken by every read.
pub async fn write_plain(tcp: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let rest = match tcp.try_write(bytes) {
        Ok(n) => &bytes[n..],
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => bytes,
        Err(e) => return Err(e),
    };
    if !rest.is_empty() {
        tcp.write_all(rest).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Waker};

    /// A short read forgets the readiness (no `recv` that finds nothing next), and what
    /// arrives after it still wakes the reader: on both kinds of runtime.
    async fn short_reads_forget_readiness_and_lose_no_wakeup() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        let mut buf = bytes::BytesMut::with_capacity(8192);
        for round in 0..200u32 {
            let msg = round.to_be_bytes();
            writer.write_all(&msg).await.unwrap();
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), read_plain(&reader, &mut buf))
                .await
                .expect("the reader is woken by what came after its last short read")
                .unwrap();
            assert_eq!(n, 4);
            assert_eq!(&buf[..], &msg);
            buf.clear();
            // Nothing more was sent: the socket is no longer marked readable.
            let mut cx = Context::from_waker(Waker::noop());
            assert!(reader.poll_read_ready(&mut cx).is_pending(), "round {round}");
        }
        drop(writer);
        assert_eq!(read_plain(&reader, &mut buf).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn short_reads_on_a_current_thread_runtime() {
        short_reads_forget_readiness_and_lose_no_wakeup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_reads_on_a_multi_thread_runtime() {
        short_reads_forget_readiness_and_lose_no_wakeup().await;
    }

    /// `write_plain` writes everything, in order: at once when the socket has room, and
    /// through the runtime (waiting for the peer to read) when it has not; an error when
    /// the peer is gone.
    #[tokio::test(flavor = "current_thread")]
    async fn a_plain_write_sends_everything_whether_or_not_the_socket_has_room() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut reader, _) = listener.accept().await.unwrap();
        let small = b"Q\0\0\0\x0dSELECT 1\0";
        write_plain(&mut writer, small).await.unwrap();
        // Far more than the kernel's buffers hold: the rest waits for the reader.
        let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = [&small[..], &big[..]].concat();
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            got
        });
        write_plain(&mut writer, &big).await.unwrap();
        drop(writer);
        let got = read.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "in order, nothing lost");

        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        drop(listener.accept().await.unwrap());
        let mut failed = false;
        for _ in 0..100 {
            if write_plain(&mut writer, &big[..1 << 20]).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writes to a closed peer fail");
    }

    /// An idle pooled connection reads as open until its server closes it or sends
    /// something, and the probe consumes nothing.
    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_connection_is_open_until_its_peer_closes_or_speaks() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        for speaks in [false, true] {
            let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            let stream = ServerStream::Plain(client);
            assert!(stream.idle_and_open());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(stream.idle_and_open(), "still open after the runtime polled");
            if speaks {
                server.write_all(b"N").await.unwrap();
            } else {
                drop(server);
            }
            // The runtime learns of it at its next turn of the event loop.
            let mut open = true;
            for _ in 0..200 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                open = stream.idle_and_open();
                if !open {
                    break;
                }
            }
            assert!(!open, "speaks: {speaks}");
            if speaks {
                let ServerStream::Plain(tcp) = &stream else {
                    unreachable!()
                };
                let mut b = [0u8; 4];
                assert_eq!(tcp.try_read(&mut b).unwrap(), 1, "the byte is still there");
            }
        }
    }

    #[test]
    fn server_name_is_the_host_part() {
        assert_eq!(
            server_name("db.example.com:5432").unwrap(),
            ServerName::try_from("db.example.com").unwrap()
        );
        assert!(matches!(
            server_name("127.0.0.1:5432").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(server_name("[::1]:5432").unwrap(), ServerName::IpAddress(_)));
    }

    #[test]
    fn verify_modes_need_a_ca_file() {
        let e = ServerTls::new(ServerTlsMode::VerifyFull, None).err().unwrap();
        assert!(e.contains("server_ca_file"), "{e}");
        assert!(ServerTls::new(ServerTlsMode::Require, None).is_ok());
        let e = ServerTls::new(ServerTlsMode::VerifyCa, Some(Path::new("/nonexistent/ca.crt")))
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent/ca.crt"), "{e}");
    }
}
