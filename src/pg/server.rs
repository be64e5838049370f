//! Opening a session on a server: TCP connect, StartupMessage, whatever login the server
//! asks for (SCRAM-SHA-256, md5, cleartext, trust), and — for writes — proof on this very
//! connection that the server is the primary.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::error::Error;
use crate::pg::credential::{Credential, KeyedScram};
use crate::pg::protocol::tags::BackendTag;
use crate::tls::{write_flush, ServerStream, ServerTls};

/// Messages during login are small; anything bigger is a broken or hostile server.
const MAX_STARTUP_MESSAGE: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// Waited its whole bound for room under `max_server_connections` (the cap).
    #[error("this node already has {0} server connections from Switchyard (max_server_connections), all in use; retry, or raise max_server_connections")]
    Budget(u32),
    /// Waited its whole bound for a place among the node's logins in flight.
    #[error("{0} server logins to this node were already in flight until the wait's bound (max_server_logins); retry, or raise max_server_logins")]
    Queued(u32),
    /// The server answered the login with an ErrorResponse.
    #[error("{message} (SQLSTATE {code})")]
    Refused { code: String, message: String, raw: Bytes },
    #[error("server is in recovery (standby), not primary")]
    NotPrimary,
    #[error("server asked for {0}")]
    Auth(String),
    #[error("protocol error from server: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ServerError {
    /// As the error a client gets, for a login to `node` of `cluster`. Whether the next
    /// candidate node may be tried is decided here for failures of this node (it could not
    /// serve anyone), and by `Error::server_refused` for the server's own refusals.
    pub fn into_error(self, cluster: &str, node: &str) -> Error {
        match self {
            ServerError::Refused { code, message, raw } => Error::server_refused(code.as_bytes(), message, raw),
            e @ ServerError::Budget(_) => {
                Error::pool_exhausted(format!("node \"{node}\" of cluster \"{cluster}\": {e}"))
            }
            ServerError::Connect(e) => Error::server_connect(format!("cannot connect to node \"{node}\""), &e),
            e @ (ServerError::Timeout(_)
            | ServerError::Queued(_)
            | ServerError::NotPrimary
            | ServerError::Io(_)
            | ServerError::Protocol(_)) => Error::connect_failed(e.to_string()),
            // An authentication method the proxy cannot answer: every node would ask it.
            e @ ServerError::Auth(_) => Error::login_failed(format!(
                "cannot log in to node \"{node}\" of cluster \"{cluster}\": {e}"
            )),
        }
    }
}

pub struct ServerConn {
    pub stream: ServerStream,
    /// ParameterStatus and NoticeResponse messages from login, raw, to pass on.
    pub startup_messages: BytesMut,
    pub pid: i32,
    pub key: i32,
}

pub struct Login<'a> {
    pub user: &'a str,
    pub credential: &'a Credential,
    pub database: &'a str,
    /// Other startup parameters from the client (application_name, options, ...).
    pub params: &'a [(String, String)],
    pub require_primary: bool,
    /// The cluster's `server_tls`.
    pub tls: &'a ServerTls,
}

/// Log in at `addr`, bounded by `timeout`, after waiting (until `until`) for a place
/// among the node's logins in flight (`ClusterCtx::login_gates`, `max`: its size). The
/// wait is bounded by the caller's own bound (the connect phase, a pool's checkout),
/// not by `timeout`, which is for a server that does not answer.
pub async fn connect_gated(
    addr: &str,
    login: &Login<'_>,
    timeout: Duration,
    gate: (&tokio::sync::Semaphore, u32),
    until: tokio::time::Instant,
) -> Result<ServerConn, ServerError> {
    let _place = crate::proxy::budget::login_place(gate.0, gate.1, until)
        .await
        .map_err(|q| ServerError::Queued(q.0))?;
    connect(addr, login, timeout).await
}

pub async fn connect(addr: &str, login: &Login<'_>, timeout: Duration) -> Result<ServerConn, ServerError> {
    match tokio::time::timeout(timeout, connect_inner(addr, login)).await {
        Ok(r) => r,
        Err(_) => Err(ServerError::Timeout(timeout.as_millis() as u64)),
    }
}

async fn connect_inner(addr: &str, login: &Login<'_>) -> Result<ServerConn, ServerError> {
    let stream = login.tls.connect(addr).await.map_err(ServerError::Connect)?;
    let mut conn = Wire {
        stream,
        buf: BytesMut::with_capacity(4096),
    };

    let mut params: Vec<(&str, &str)> = vec![("user", login.user), ("database", login.database)];
    params.extend(login.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut out = BytesMut::new();
    frontend::startup_message(params.iter().copied(), &mut out)?;
    write_flush(&mut conn.stream, &out).await?;

    authenticate(&mut conn, login).await?;

    let mut startup_messages = BytesMut::new();
    let mut backend_key = (0, 0);
    let mut hot_standby = None;
    loop {
        let (tag, body) = conn.read_message().await?;
        match BackendTag::of(tag) {
            BackendTag::ParameterStatus => {
                let mut fields = body.split(|&b| b == 0);
                if fields.next() == Some(b"in_hot_standby") {
                    hot_standby = fields.next().map(|v| v == b"on");
                }
                put_message(&mut startup_messages, tag, &body);
            }
            BackendTag::NoticeResponse => put_message(&mut startup_messages, tag, &body),
            BackendTag::BackendKeyData if body.len() >= 8 => {
                backend_key = ((&body[0..4]).get_i32(), (&body[4..8]).get_i32())
            }
            BackendTag::ErrorResponse => return Err(refused(&body)),
            BackendTag::ReadyForQuery => break,
            // We sent only 3.0 with no _pq_ options; ignore.
            BackendTag::NegotiateProtocolVersion => {}
            other => {
                return Err(ServerError::Protocol(format!(
                    "unexpected message '{}' after login",
                    other.byte() as char
                )))
            }
        }
    }

    if login.require_primary {
        // PostgreSQL 14+ reports in_hot_standby at startup; older servers must be asked.
        let standby = match hot_standby {
            Some(s) => s,
            None => conn.ask_in_recovery().await?,
        };
        if standby {
            return Err(ServerError::NotPrimary);
        }
    }
    Ok(ServerConn {
        stream: conn.stream,
        startup_messages,
        pid: backend_key.0,
        key: backend_key.1,
    })
}

async fn authenticate(conn: &mut Wire, login: &Login<'_>) -> Result<(), ServerError> {
    let need_password = |what: &str| -> Result<&[u8], ServerError> {
        match login.credential {
            Credential::Password(pw) => Ok(pw.password.as_bytes()),
            Credential::Scram(_) | Credential::Unlearned => Err(ServerError::Auth(format!(
                "{what} but user \"{}\" is configured with a SCRAM verifier, not a password (make the server use scram-sha-256)",
                login.user
            ))),
            Credential::None => Err(ServerError::Auth(format!(
                "{what} but user \"{}\" has no password in the config",
                login.user
            ))),
        }
    };
    let mut scram: Option<KeyedScram> = None;
    let mut out = BytesMut::new();
    loop {
        let (tag, body) = conn.read_message().await?;
        match BackendTag::of(tag) {
            BackendTag::ErrorResponse => return Err(refused(&body)),
            BackendTag::Authentication if body.len() >= 4 => {}
            other => {
                return Err(ServerError::Protocol(format!(
                    "expected authentication, got '{}'",
                    other.byte() as char
                )))
            }
        }
        let code = (&body[0..4]).get_i32();
        out.clear();
        match code {
            0 => return Ok(()),
            3 => frontend::password_message(need_password("a cleartext password")?, &mut out)?,
            5 if body.len() >= 8 => {
                let salt: [u8; 4] = body[4..8].try_into().unwrap();
                let hash = postgres_protocol::authentication::md5_hash(
                    login.user.as_bytes(),
                    need_password("an md5 password")?,
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let mechanisms: Vec<&[u8]> = body[4..].split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                if !mechanisms.contains(&&b"SCRAM-SHA-256"[..]) {
                    return Err(ServerError::Auth(format!(
                        "SASL mechanisms {:?}, none of which Switchyard supports",
                        mechanisms
                            .iter()
                            .map(|m| String::from_utf8_lossy(m))
                            .collect::<Vec<_>>()
                    )));
                }
                let first = match login.credential {
                    Credential::Scram(keys) => {
                        let (s, first) = KeyedScram::start(keys.clone());
                        scram = Some(s);
                        first.into_bytes()
                    }
                    Credential::Unlearned => {
                        return Err(ServerError::Auth(format!(
                            "SCRAM-SHA-256 for user \"{}\", configured with a verifier, before any client logged in as it (the key a client's login reveals is what Switchyard answers with)",
                            login.user
                        )))
                    }
                    Credential::Password(pw) => {
                        let (s, first) = KeyedScram::start_password(pw.clone());
                        scram = Some(s);
                        first.into_bytes()
                    }
                    Credential::None => {
                        return Err(ServerError::Auth(format!(
                            "SCRAM-SHA-256 for user \"{}\", who has no password in Switchyard's config",
                            login.user
                        )))
                    }
                };
                frontend::sasl_initial_response("SCRAM-SHA-256", &first, &mut out)?;
            }
            11 => {
                let failed = |e: String| ServerError::Auth(format!("a SCRAM exchange that failed: {e}"));
                match scram.as_mut() {
                    Some(s) => {
                        let fin = s.server_first(&body[4..]).map_err(failed)?;
                        frontend::sasl_response(fin.as_bytes(), &mut out)?;
                    }
                    None => return Err(ServerError::Protocol("SASL continue before start".into())),
                }
            }
            12 => {
                let wrong = |e: String| ServerError::Auth(format!("a SCRAM exchange whose server proof is wrong: {e}"));
                match scram.take() {
                    Some(s) => s.server_final(&body[4..]).map_err(wrong)?,
                    None => return Err(ServerError::Protocol("SASL final before start".into())),
                }
                continue;
            }
            other => {
                return Err(ServerError::Auth(format!(
                    "authentication method {other}, which Switchyard does not support"
                )))
            }
        }
        write_flush(&mut conn.stream, &out).await?;
    }
}

fn put_message(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_i32(body.len() as i32 + 4);
    buf.put_slice(body);
}

/// SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
            Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

fn refused(body: &[u8]) -> ServerError {
    let (code, message) = error_fields(body);
    let mut raw = BytesMut::new();
    put_message(&mut raw, b'E', body);
    ServerError::Refused {
        code,
        message,
        raw: raw.freeze(),
    }
}

/// A server connection during login: whole messages, read one at a time.
struct Wire {
    stream: ServerStream,
    buf: BytesMut,
}

impl Wire {
    async fn read_message(&mut self) -> Result<(u8, Bytes), ServerError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap());
                if !(4..=MAX_STARTUP_MESSAGE).contains(&len) {
                    return Err(ServerError::Protocol(format!("message length {len}")));
                }
                if self.buf.len() > len as usize {
                    let mut msg = self.buf.split_to(len as usize + 1);
                    let tag = msg[0];
                    msg.advance(5);
                    return Ok((tag, msg.freeze()));
                }
            }
            if self.stream.read_some(&mut self.buf).await? == 0 {
                return Err(ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn ask_in_recovery(&mut self) -> Result<bool, ServerError> {
        let mut out = BytesMut::new();
        frontend::query("SELECT pg_is_in_recovery()", &mut out)?;
        write_flush(&mut self.stream, &out).await?;
        let mut answer = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match BackendTag::of(tag) {
                // int16 column count, int32 length, value text ('t' / 'f').
                BackendTag::DataRow if body.len() >= 7 => answer = Some(body[6] == b't'),
                BackendTag::ErrorResponse => return Err(refused(&body)),
                BackendTag::ReadyForQuery => break,
                _ => {}
            }
        }
        answer.ok_or_else(|| ServerError::Protocol("no answer to pg_is_in_recovery()".into()))
    }
}
