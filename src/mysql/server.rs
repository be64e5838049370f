//! Logging in to a MySQL / MariaDB server as a client: its greeting, our handshake
//! response with the client's user, database, character set and capabilities, then
//! whatever authentication the server asks for (`mysql_native_password`,
//! `caching_sha2_password` fast and full path, an auth switch), then the primary check.

use std::time::Duration;

use mysql_common::constants::CapabilityFlags;
use mysql_common::io::ParseBuf;
use mysql_common::packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse};
use mysql_common::proto::MyDeserialize;
use mysql_common::scramble::{scramble_native, scramble_sha256};
use tokio::net::TcpStream;

use super::protocol::{self, read_packet, write_packet};
use crate::config::ServerTlsMode;
use crate::error::Error;
use crate::tls::{ServerStream, ServerTls};

/// What a server said in its greeting, for the proxy's own greeting to clients.
#[derive(Debug, Clone)]
pub struct Greeting {
    pub version: String,
    pub capabilities: CapabilityFlags,
    pub collation: u8,
}

/// The login of one client, as the server will see it.
pub struct LoginRequest<'a> {
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: Option<&'a [u8]>,
    /// What the client and the proxy agreed on (the server must offer all of it).
    pub capabilities: CapabilityFlags,
    pub collation: u8,
    pub attributes: Option<std::collections::HashMap<String, String>>,
}

pub struct ServerConn {
    pub stream: ServerStream,
    /// The server's connection (thread) id: what `KILL QUERY` needs.
    pub thread_id: u32,
    pub greeting: Greeting,
    /// The OK packet that ended the login (status flags, session state).
    pub login_ok: Vec<u8>,
    /// The server reports each commit's GTID in its OKs (the proxy asked, rw only).
    pub tracking: bool,
    /// The server's challenge in its greeting, and the plugin we answered with
    /// (`COM_CHANGE_USER` answers the same challenge).
    nonce: Vec<u8>,
    plugin: AuthPlugin<'static>,
    /// Its place under `max_server_connections`, for as long as it is open (pooled or
    /// not); set by the dialer that opened it.
    pub budget: crate::proxy::budget::Budget,
}

fn lost(what: &str, e: std::io::Error) -> Error {
    Error::connect_failed(format!("MySQL server connection failed during {what}: {e}"))
}

/// Connect and read the server's greeting only.
pub async fn greet(addr: &str, timeout: Duration) -> Result<Hello, Error> {
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::connect_failed(format!("no connection to {addr} within {} ms", timeout.as_millis())))?
        .map_err(|e| Error::server_connect(format!("cannot connect to {addr}"), &e))?;
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    tokio::time::timeout(timeout, read_packet(&mut stream, &mut buf, 1 << 16))
        .await
        .map_err(|_| Error::connect_failed(format!("{addr} sent no greeting within {} ms", timeout.as_millis())))?
        .map_err(|e| lost("the greeting", e))?;
    if buf.first() == Some(&0xff) {
        // "Host is blocked", "Too many connections" before the handshake.
        return Err(protocol::parse_err(&buf, CapabilityFlags::empty()));
    }
    let hs = HandshakePacket::deserialize((), &mut ParseBuf(&buf))
        .map_err(|e| Error::server_protocol(format!("{addr} sent a greeting that is not MySQL's: {e}")))?;
    let mut nonce = hs.scramble_1_ref().to_vec();
    if let Some(s2) = hs.scramble_2_ref() {
        nonce.extend_from_slice(s2.strip_suffix(&[0]).unwrap_or(s2));
    }
    let greeting = Greeting {
        version: String::from_utf8_lossy(hs.server_version_ref()).into_owned(),
        capabilities: hs.capabilities(),
        collation: hs.default_collation(),
    };
    // Answer with the plugin the greeting names when we can; otherwise with
    // mysql_native_password, and the server switches us to the user's plugin.
    let plugin = match hs.auth_plugin() {
        Some(AuthPlugin::CachingSha2Password) => AuthPlugin::CachingSha2Password,
        _ => AuthPlugin::MysqlNativePassword,
    };
    Ok(Hello {
        stream,
        greeting,
        thread_id: hs.connection_id(),
        nonce,
        plugin,
    })
}

/// A connected server before login.
pub struct Hello {
    pub stream: TcpStream,
    pub greeting: Greeting,
    pub thread_id: u32,
    nonce: Vec<u8>,
    plugin: AuthPlugin<'static>,
}

/// The answer to an authentication challenge from `plugin` with `nonce`.
fn answer(plugin: &AuthPlugin<'_>, password: Option<&str>, nonce: &[u8]) -> Result<Vec<u8>, Error> {
    let pw = password.unwrap_or("");
    if pw.is_empty() {
        return Ok(Vec::new());
    }
    match plugin {
        AuthPlugin::MysqlNativePassword => Ok(scramble_native(nonce, pw.as_bytes()).map(|s| s.to_vec()).unwrap_or_default()),
        AuthPlugin::CachingSha2Password => Ok(scramble_sha256(nonce, pw.as_bytes()).map(|s| s.to_vec()).unwrap_or_default()),
        other => Err(Error::login_failed(format!(
            "the MySQL server asks for authentication plugin \"{}\", which Switchyard cannot answer (use mysql_native_password or caching_sha2_password for this user)",
            String::from_utf8_lossy(other.as_bytes())
        ))),
    }
}

/// Log in on `addr` as `req` describes, with TLS as the cluster's `server_tls` says;
/// bounded by `timeout` as a whole. `prefer` falls back to plaintext when the server
/// offers no TLS or the handshake fails (on a new connection).
pub async fn login(
    addr: &str,
    req: &LoginRequest<'_>,
    tls: &ServerTls,
    timeout: Duration,
) -> Result<ServerConn, Error> {
    tokio::time::timeout(timeout, async {
        match login_inner(addr, req, tls, tls.mode(), timeout).await {
            Err(Tried::Tls(e)) if tls.mode() == ServerTlsMode::Prefer => {
                tracing::debug!(addr, reason = %e, "TLS with the MySQL server failed; server_tls = \"prefer\": plaintext");
                login_inner(addr, req, tls, ServerTlsMode::Disable, timeout)
                    .await
                    .map_err(Tried::into_error)
            }
            other => other.map_err(Tried::into_error),
        }
    })
    .await
    .map_err(|_| Error::connect_failed(format!("no login on {addr} within {} ms", timeout.as_millis())))?
}

/// A login failure, and whether TLS was what failed (`prefer` then tries plaintext).
enum Tried {
    Tls(Error),
    Other(Error),
}

impl Tried {
    fn into_error(self) -> Error {
        match self {
            Tried::Tls(e) | Tried::Other(e) => e,
        }
    }
}

impl From<Error> for Tried {
    fn from(e: Error) -> Tried {
        Tried::Other(e)
    }
}

async fn login_inner(
    addr: &str,
    req: &LoginRequest<'_>,
    tls: &ServerTls,
    mode: ServerTlsMode,
    timeout: Duration,
) -> Result<ServerConn, Tried> {
    let Hello {
        stream: tcp,
        greeting,
        thread_id,
        nonce,
        plugin: plugin_name,
    } = greet(addr, timeout).await?;
    let missing = req.capabilities - greeting.capabilities - CapabilityFlags::CLIENT_CONNECT_WITH_DB;
    let essential = CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_DEPRECATE_EOF
        | CapabilityFlags::CLIENT_SESSION_TRACK
        | CapabilityFlags::CLIENT_MULTI_RESULTS
        | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA;
    if missing.intersects(essential) {
        return Err(Tried::Other(Error::connect_failed(format!(
            "the MySQL server at {addr} lacks capabilities this session was opened with ({missing:?}); reconnect"
        ))));
    }
    let scramble = answer(&plugin_name, req.password, &nonce)?;
    // TLS and compression toward the server are the proxy's own business, whatever
    // the client negotiated with the proxy.
    let wanted = req.capabilities - CapabilityFlags::CLIENT_SSL - CapabilityFlags::CLIENT_COMPRESS;
    let mut caps = (wanted & greeting.capabilities) | CapabilityFlags::CLIENT_PROTOCOL_41;
    let use_tls = match mode {
        ServerTlsMode::Disable => false,
        _ if greeting.capabilities.contains(CapabilityFlags::CLIENT_SSL) => true,
        ServerTlsMode::Prefer => false,
        _ => {
            return Err(Tried::Other(Error::connect_failed(format!(
                "the MySQL server at {addr} does not offer TLS, and server_tls = \"{mode}\" requires it"
            ))))
        }
    };
    let mut stream = if use_tls {
        // The SSL request: the fixed head of a handshake response with CLIENT_SSL.
        caps |= CapabilityFlags::CLIENT_SSL;
        let mut tcp = tcp;
        let mut request = Vec::with_capacity(32);
        request.extend_from_slice(&caps.bits().to_le_bytes());
        request.extend_from_slice(&(16u32 * 1024 * 1024).to_le_bytes());
        request.push(req.collation);
        request.extend_from_slice(&[0; 23]);
        write_packet(&mut tcp, 1, &request)
            .await
            .map_err(|e| Tried::Tls(lost("the SSL request", e)))?;
        tls.handshake(tcp, addr)
            .await
            .map_err(|e| Tried::Tls(Error::connect_failed(format!("{addr}: {e}"))))?
    } else {
        ServerStream::Plain(tcp)
    };
    let response = HandshakeResponse::new(
        Some(scramble.as_slice()),
        (5, 5, 3),
        Some(req.user.as_bytes()),
        req.database,
        Some(plugin_name.clone()),
        caps,
        req.attributes.clone(),
        16 * 1024 * 1024,
    );
    let mut payload = protocol::to_vec(&response);
    // `HandshakeResponse::new` picks the collation from the server version; the
    // client's own is what the session must use (byte 8: after flags and max size).
    payload[8] = req.collation;
    write_packet(&mut stream, if use_tls { 2 } else { 1 }, &payload)
        .await
        .map_err(|e| lost("login", e))?;
    let login_ok = authenticated(&mut stream, req.password, nonce.clone(), caps, addr).await?;
    Ok(ServerConn {
        login_ok,
        tracking: false,
        stream,
        thread_id,
        greeting,
        nonce,
        plugin: plugin_name,
        budget: Default::default(),
    })
}

/// Follow the server's answers to an authentication response until OK (or its ERR):
/// auth switches, `caching_sha2_password`'s fast-path OK and full path. `nonce` is the
/// challenge the response answered. Used by logins and `COM_CHANGE_USER`.
pub async fn authenticated(
    stream: &mut ServerStream,
    password: Option<&str>,
    mut nonce: Vec<u8>,
    caps: CapabilityFlags,
    addr: &str,
) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    loop {
        let got = read_packet(stream, &mut buf, 1 << 16)
            .await
            .map_err(|e| lost("login", e))?;
        let seq = got.wrapping_add(1);
        match buf.first() {
            Some(0x00) => return Ok(buf),
            Some(0xff) => return Err(protocol::parse_err(&buf, caps)),
            Some(0xfe) => {
                let switch = AuthSwitchRequest::deserialize((), &mut ParseBuf(&buf))
                    .map_err(|e| Error::server_protocol(format!("bad auth switch request from {addr}: {e}")))?;
                let plugin = switch.auth_plugin().into_owned();
                nonce = switch.plugin_data().to_vec();
                let data = answer(&plugin, password, &nonce)?;
                write_packet(stream, seq, &data).await.map_err(|e| lost("login", e))?;
            }
            Some(0x01) => match buf.get(1) {
                // caching_sha2_password: 3 = the server had the password cached (an OK
                // follows), 4 = it wants the password itself. Without TLS it is sent
                // encrypted with the server's RSA public key, which we ask for (2).
                Some(3) => {}
                Some(4) => {
                    if stream.is_tls() {
                        // Over TLS the password itself is sent.
                        let mut pass = password.unwrap_or("").as_bytes().to_vec();
                        pass.push(0);
                        write_packet(stream, seq, &pass).await.map_err(|e| lost("login", e))?;
                        continue;
                    }
                    write_packet(stream, seq, &[2]).await.map_err(|e| lost("login", e))?;
                    let got = read_packet(stream, &mut buf, 1 << 16)
                        .await
                        .map_err(|e| lost("login", e))?;
                    if buf.first() != Some(&0x01) {
                        return Err(Error::server_protocol(format!(
                            "{addr} sent no public key for caching_sha2_password"
                        )));
                    }
                    let pem = buf[1..].to_vec();
                    let mut pass = password.unwrap_or("").as_bytes().to_vec();
                    pass.push(0);
                    // OAEP with a 2048-bit key holds at most 214 bytes; mysql_common
                    // panics on more, or on a key it cannot parse.
                    if nonce.is_empty() || pass.len() > 200 {
                        return Err(Error::login_failed(format!(
                            "{addr}: caching_sha2_password's full authentication without TLS cannot carry this password; use server_tls"
                        )));
                    }
                    for (i, b) in pass.iter_mut().enumerate() {
                        *b ^= nonce[i % nonce.len()];
                    }
                    let encrypted =
                        std::panic::catch_unwind(|| mysql_common::crypto::encrypt(&pass, &pem)).map_err(|_| {
                            Error::server_protocol(format!("{addr} sent an RSA public key that cannot be used"))
                        })?;
                    write_packet(stream, got.wrapping_add(1), &encrypted)
                        .await
                        .map_err(|e| lost("login", e))?;
                }
                _ => {
                    return Err(Error::server_protocol(format!(
                        "{addr} sent an authentication request Switchyard does not know"
                    )))
                }
            },
            _ => {
                return Err(Error::server_protocol(format!(
                    "{addr} sent an unexpected packet during login"
                )))
            }
        }
    }
}

/// The new user of a `COM_CHANGE_USER`, as the server will see it.
pub struct ChangeUser<'a> {
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: &'a [u8],
    pub charset: Option<u16>,
    /// The raw connection-attributes block of the client's command, passed on.
    pub attributes: Option<&'a [u8]>,
}

/// `COM_CHANGE_USER` on a connection the proxy logged in: answered with the server's
/// own challenge (the client's answer was to the proxy's). Written by hand:
/// `mysql_common`'s `ComChangeUser` always writes connection attributes, whether or not
/// the connection negotiated them.
pub async fn change_user(
    conn: &mut ServerConn,
    c: &ChangeUser<'_>,
    caps: CapabilityFlags,
    addr: &str,
) -> Result<(), Error> {
    let scramble = answer(&conn.plugin, c.password, &conn.nonce)?;
    let mut p = vec![protocol::COM_CHANGE_USER];
    p.extend_from_slice(c.user.as_bytes());
    p.push(0);
    p.push(scramble.len() as u8);
    p.extend_from_slice(&scramble);
    p.extend_from_slice(c.database);
    p.push(0);
    if let Some(cs) = c.charset {
        p.extend_from_slice(&cs.to_le_bytes());
        if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) {
            p.extend_from_slice(conn.plugin.as_bytes());
            p.push(0);
        }
        if caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) {
            match c.attributes {
                Some(a) => p.extend_from_slice(a),
                None => p.push(0),
            }
        }
    }
    write_packet(&mut conn.stream, 0, &p)
        .await
        .map_err(|e| lost("COM_CHANGE_USER", e))?;
    authenticated(&mut conn.stream, c.password, conn.nonce.clone(), caps, addr)
        .await
        .map(|_| ())
}

/// Is the server writable? `@@global.read_only` on the session's own connection: the
/// health monitor's view may be a second old, this one is not.
pub async fn check_writable(conn: &mut ServerConn, caps: CapabilityFlags) -> Result<bool, Error> {
    let v = protocol::first_value(&mut conn.stream, caps, "SELECT @@global.read_only").await?;
    Ok(v.as_deref() == Some("0"))
}
