//! PostgreSQL's way into TLS, on both sides: a client's SSLRequest / GSSENCRequest or
//! direct TLS before its startup packet (`negotiate`), and ours to a server before
//! logging in (`ServerTls::connect`, `ServerTls::connect_pg` for tokio-postgres).
//! The certificates and verifiers are the engine-neutral `crate::tls` and
//! `crate::proxy::stream`; MySQL asks for TLS inside its handshake instead.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ServerTlsMode;
use crate::error::Error;
use crate::pg::protocol::startup::{GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};
use crate::proxy::stream::{write_flush, ClientStream, ALPN_POSTGRESQL};
use crate::tls::{ServerStream, ServerTls};

/// Before the startup packet: TLS, if the client asks for it (SSLRequest, after an
/// optional GSSENCRequest declined with `N`) and the cluster offers it, or directly
/// (PostgreSQL 17's `sslnegotiation=direct`: a TLS ClientHello first, ALPN
/// `postgresql` required). Otherwise the connection stays plain; `login` reads what
/// follows (the startup packet, a CancelRequest).
pub async fn negotiate(tcp: TcpStream, acceptor: Option<&tokio_rustls::TlsAcceptor>) -> std::io::Result<ClientStream> {
    let mut tcp = tcp;
    let mut waited = 0;
    loop {
        let mut head = [0u8; 8];
        let n = tcp.peek(&mut head).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // A TLS handshake record where TLS is on: direct TLS. (Where it is off, the
        // bytes go to `login`, which refuses them as a malformed startup packet.)
        if let (0x16, Some(acceptor)) = (head[0], acceptor) {
            let mut tls = ClientStream::Tls(Box::new(acceptor.accept(tcp).await?));
            let alpn_ok = match &tls {
                ClientStream::Tls(t) => t.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL),
                ClientStream::Plain(_) => false,
            };
            if !alpn_ok {
                let e = Error::protocol("direct TLS connections must use ALPN \"postgresql\" (sslnegotiation=direct)");
                let _ = write_flush(&mut tls, &e.to_fatal()).await;
                return Err(std::io::Error::other("direct TLS without ALPN postgresql"));
            }
            return Ok(tls);
        }
        if n < 8 {
            // The 8-byte request arrives in one piece from every client we know of;
            // wait briefly for the rest, then let `login` read whatever this is.
            if waited >= 25 {
                return Ok(ClientStream::Plain(tcp));
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let ssl = len == 8 && code == SSL_REQUEST_CODE;
        let gss = len == 8 && code == GSSENC_REQUEST_CODE;
        if !ssl && !gss {
            return Ok(ClientStream::Plain(tcp));
        }
        tcp.read_exact(&mut head).await?;
        match acceptor {
            Some(acceptor) if ssl => {
                tcp.write_all(b"S").await?;
                return Ok(ClientStream::Tls(Box::new(acceptor.accept(tcp).await?)));
            }
            _ => tcp.write_all(b"N").await?,
        }
        // TLS declined: what follows is the startup packet (libpq asks for GSS
        // encryption before TLS, never after), read by `login`, which also declines any
        // further request. Not looked at here: one `recv` fewer per plaintext client.
        if ssl {
            return Ok(ClientStream::Plain(tcp));
        }
    }
}

// Inherent methods of the engine-neutral `ServerTls`, kept here because they speak
// PostgreSQL: every connection to a PostgreSQL node goes through one of these two.
impl ServerTls {
    /// TCP connect to `addr` (`host:port`), then TLS as the mode says: SSLRequest, and
    /// on `S` the handshake; plaintext on `N` only for `prefer`, which also reconnects
    /// in plaintext when the handshake fails, as libpq does.
    pub async fn connect(&self, addr: &str) -> io::Result<ServerStream> {
        match self.try_connect(addr, self.mode()).await {
            Err(e) if self.mode() == ServerTlsMode::Prefer && e.kind() != io::ErrorKind::ConnectionRefused => {
                tracing::debug!(addr, reason = %e, "TLS with the server failed; server_tls = \"prefer\": plaintext");
                self.try_connect(addr, ServerTlsMode::Disable).await
            }
            other => other,
        }
    }

    async fn try_connect(&self, addr: &str, mode: ServerTlsMode) -> io::Result<ServerStream> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        if mode == ServerTlsMode::Disable {
            return Ok(ServerStream::Plain(tcp));
        }
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&request).await?;
        // Exactly one byte: whatever follows an `S` must be the TLS handshake (bytes a
        // man in the middle slipped in before it then fail the handshake; CVE-2021-23222).
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => self.handshake(tcp, addr).await,
            b'N' if mode == ServerTlsMode::Prefer => Ok(ServerStream::Plain(tcp)),
            b'N' => Err(io::Error::other(format!(
                "the server does not accept TLS (ssl = off), and server_tls = \"{mode}\" requires it"
            ))),
            other => Err(io::Error::other(format!(
                "the server answered the TLS request with {:?} (a server older than PostgreSQL 7.2, or not PostgreSQL)",
                other as char
            ))),
        }
    }

    /// Log in with tokio-postgres (health checks, freshness probes, manager,
    /// auth_query) with the same TLS rules, `prefer` falling back to plaintext when
    /// the handshake fails. The connection runs in a task of its own (returned).
    pub async fn connect_pg(
        &self,
        cfg: &mut tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        use tokio_postgres::config::SslMode;
        let make = || tokio_postgres_rustls::MakeRustlsConnect::new((**self.rustls()).clone());
        cfg.ssl_mode(match self.mode() {
            ServerTlsMode::Disable => SslMode::Disable,
            ServerTlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let (client, conn) = match cfg.connect(make()).await {
            // tokio-postgres does not fall back by itself; its TLS errors say "TLS".
            Err(e) if self.mode() == ServerTlsMode::Prefer && e.to_string().contains("TLS") => {
                cfg.ssl_mode(SslMode::Disable);
                cfg.connect(make()).await?
            }
            other => other?,
        };
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((client, task))
    }
}
