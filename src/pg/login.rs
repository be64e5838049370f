//! Before a session can start: the startup packet(s) and the client's authentication
//! (SCRAM-SHA-256 and -PLUS, md5, trust), and how a refusal is told.

use bytes::{Buf, BytesMut};
use rand::RngExt;
use tokio::io::AsyncWriteExt;
use tracing::warn;

use std::sync::Arc;

use crate::cluster::ClusterCtx;
use crate::config::{AuthMethod, PoolMode, ADMIN_DATABASE};
use crate::error::Error;
use crate::pg::auth::{AuthError, Verifier};
use crate::pg::classify::CAUSAL_TOKEN;
use crate::pg::credential::Credential;
use crate::pg::protocol::messages;
use crate::pg::protocol::startup::{parse_startup, StartupError, StartupPacket, MAX_STARTUP_LEN};
use crate::proxy::limits::{self, Admission, Refusal};
use crate::proxy::shared::Shared;
use crate::proxy::stream::ClientStream;

/// Auth messages are tiny; PostgreSQL caps them similarly.
const MAX_AUTH_MESSAGE: usize = 10000;

/// Why a session ends before the relay: what the client is told.
#[derive(Debug)]
pub(super) enum Reject {
    /// Send this error (ours, or the server's own ErrorResponse) as FATAL.
    Error(Error),
    /// Over a client limit: send this error as FATAL; logged by `limits::admit`, once
    /// per interval rather than once per client.
    Refused(Error),
    /// The client went away; nothing to say.
    Gone,
}

impl From<Error> for Reject {
    fn from(e: Error) -> Self {
        Reject::Error(e)
    }
}

impl From<std::io::Error> for Reject {
    fn from(_: std::io::Error) -> Self {
        Reject::Gone
    }
}

#[derive(Clone)]
pub(super) struct Client {
    pub user: String,
    pub database: String,
    /// Startup parameters passed on to the server (application_name, options, ...).
    pub params: Vec<(String, String)>,
    /// The startup option `switchyard.causal_token`, not checked yet.
    pub causal_token: Option<String>,
    /// What this user logs in to servers with, taken right after this client's own
    /// authentication (for a verifier user: the key its SCRAM proof revealed).
    pub credential: Credential,
    /// This client's place under `max_clients` (None for the admin console), held
    /// until the session ends.
    pub _admission: Option<Arc<Admission>>,
    /// What the client sent after its last login message, before it was answered (no
    /// client we know of does; PostgreSQL would run it): its session reads it first.
    pub unread: BytesMut,
    /// The end of the login (SASLFinal and AuthenticationOk), not written yet: in
    /// transaction pooling it goes out with the greeting, in one write (`Driver::
    /// login_reply`). Empty where login wrote it (session mode, the admin console).
    pub unsent: BytesMut,
}

/// A client's messages during login, read ahead. One read takes a whole message where
/// reading its header and then its body took two or three `recv` calls (and a third
/// that found nothing, when tokio still took the socket for readable), about seven
/// system calls more per connection than PgBouncer for clients that connect per
/// request. What is read past the last login message is kept (`Client::unread`).
pub(crate) struct Inbox(BytesMut);

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox(BytesMut::new())
    }

    /// An inbox that holds `bytes` already (read by a login before).
    pub(crate) fn holding(bytes: BytesMut) -> Inbox {
        Inbox(bytes)
    }

    /// The next message, once `length` (of the bytes so far) says it is all there:
    /// `Ok(Some(n))` a message of `n` bytes, `Ok(None)` not enough bytes to tell yet,
    /// `Err` a message that must not be read (its header is wrong). The end of input
    /// before it is whole is `UnexpectedEof`.
    pub(crate) async fn next<E: From<std::io::Error>>(
        &mut self,
        stream: &mut ClientStream,
        length: impl Fn(&[u8]) -> Result<Option<usize>, E>,
    ) -> Result<BytesMut, E> {
        loop {
            if let Some(n) = length(&self.0)? {
                if self.0.len() >= n {
                    return Ok(self.0.split_to(n));
                }
                self.0.reserve(n - self.0.len());
            } else if self.0.capacity() - self.0.len() < 512 {
                self.0.reserve(512);
            }
            if stream.read_some(&mut self.0).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    /// What was read past the messages taken.
    pub(crate) fn rest(self) -> BytesMut {
        self.0
    }
}

/// The length of the startup packet (or SSLRequest, CancelRequest) at the start of
/// `buf`, once its length word is there.
fn startup_length(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    let Some(word) = buf.get(..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(word.try_into().expect("4 bytes"));
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    Ok(Some(len as usize))
}

/// The length of a tagged message (tag, length word, body) at the start of `buf`, up
/// to `max` bytes, once its header is there.
pub(crate) fn message_length(buf: &[u8], max: usize) -> Result<Option<usize>, i32> {
    let Some(word) = buf.get(1..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(word.try_into().expect("4 bytes"));
    if len < 4 || len as usize > max {
        return Err(len);
    }
    Ok(Some(1 + len as usize))
}

/// Startup packet(s) and authentication. `None` for a CancelRequest. `require_tls`:
/// the cluster's name when it refuses plaintext clients; `channel`: the TLS channel
/// binding data when the connection is TLS (SCRAM-SHA-256-PLUS is then offered).
pub(super) async fn login(
    stream: &mut ClientStream,
    shared: &Shared,
    cluster: &ClusterCtx,
    require_tls: Option<&str>,
    channel: Option<&[u8]>,
    forced: Option<Refusal>,
) -> Result<Option<Client>, Reject> {
    let mut inbox = Inbox::new();
    let (minor, params) = loop {
        let packet = match inbox.next(stream, startup_length).await {
            Ok(p) => parse_startup(&p[4..]),
            Err(StartupError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StartupError::Closed),
            Err(e) => Err(e),
        };
        match packet {
            Ok(StartupPacket::SslRequest) | Ok(StartupPacket::GssEncRequest) => {
                stream.write_all(b"N").await?;
                stream.flush().await?
            }
            Ok(StartupPacket::Cancel { pid, key }) => {
                crate::pg::cancel::forward(&shared.cancels, pid, key, |c| {
                    shared.cluster(c).map(|ctx| ctx.server_tls())
                })
                .await;
                return Ok(None);
            }
            Ok(StartupPacket::Startup { minor, params }) => break (minor, params),
            Err(StartupError::Closed) | Err(StartupError::Io(_)) => return Err(Reject::Gone),
            Err(e @ StartupError::UnsupportedProtocol { .. }) => {
                return Err(Reject::Error(Error::unsupported(e.to_string())))
            }
            Err(e) => return Err(Reject::Error(Error::protocol(e.to_string()))),
        }
    };

    if let (Some(cluster), false) = (require_tls, stream.is_tls()) {
        return Err(Reject::Error(Error::not_authorized(format!(
            "cluster \"{cluster}\" requires TLS (client_tls = \"require\"): connect with sslmode=require or stronger"
        ))));
    }
    let mut user = None;
    let mut database = None;
    let mut passed = Vec::new();
    let mut unrecognized = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            "replication" if !matches!(v.as_str(), "false" | "off" | "no" | "0") => {
                return Err(Reject::Error(Error::unsupported(
                    "replication connections are not supported through Switchyard; connect to the server directly",
                )))
            }
            "replication" => {}
            _ if k.starts_with("_pq_.") => unrecognized.push(k),
            _ => passed.push((k, v)),
        }
    }
    let causal_token = crate::pg::protocol::startup::take_setting(&mut passed, CAUSAL_TOKEN);
    let user = user
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Reject::Error(Error::not_authorized("no user name specified in startup packet")))?;
    let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    // Counted before authentication: a client over a limit costs no password check (nor
    // an auth_query on a server). The admin console is never counted nor refused for
    // want of descriptors (its socket is open already): an operator can look in when
    // the proxy is full.
    let admission = match database == ADMIN_DATABASE {
        true => None,
        false => Some(Arc::new(
            limits::admit(shared, &cluster.name, &user, forced).map_err(Reject::Refused)?,
        )),
    };
    if minor > 0 || !unrecognized.is_empty() {
        let mut b = BytesMut::new();
        messages::negotiate_protocol_version(&mut b, 0, &unrecognized);
        stream.write_all(&b).await?;
        stream.flush().await?;
    }

    let verifiers = super::PgShared::of(shared).verifiers();
    let found;
    let verifier = match verifiers.get(&user) {
        Some(v) => v,
        None => {
            let config = shared.config();
            let Some(query) = &config.auth_query else {
                return Err(Reject::Error(Error::not_authorized(format!(
                    "user \"{user}\" is not allowed to connect: it is not listed in [[users]] of the Switchyard config"
                ))));
            };
            // As PostgreSQL: a user the servers do not know fails like a wrong password,
            // after a whole exchange, so a client cannot probe which users exist.
            found = super::PgShared::of(shared)
                .auth_query
                .verifier(query, cluster, &user)
                .await?
                .unwrap_or_else(|| Verifier::unknown(&user));
            &found
        }
    };
    // In transaction pooling the greeting follows at once (from `Greetings`), or after a
    // pooled connection told it: AuthenticationOk waits for it, one write for both.
    let defer = database != ADMIN_DATABASE && cluster.settings().pool_mode == PoolMode::Transaction;
    let unsent = authenticate(stream, &mut inbox, verifier, channel, defer)
        .await
        .map_err(|e| match e {
            Reject::Error(e) => {
                warn!(user = %user, reason = %e, "client authentication failed");
                Reject::Error(e)
            }
            other => other,
        })?;
    Ok(Some(Client {
        credential: verifier.server_credential(),
        user,
        database,
        params: passed,
        causal_token,
        _admission: admission,
        unread: inbox.rest(),
        unsent,
    }))
}

async fn authenticate(
    stream: &mut ClientStream,
    inbox: &mut Inbox,
    v: &Verifier,
    channel: Option<&[u8]>,
    defer: bool,
) -> Result<BytesMut, Reject> {
    let mut out = BytesMut::new();
    let auth_failed = |e: AuthError| match e {
        AuthError::Failed(_) => Reject::Error(Error::auth_failed(e.to_string())),
        _ => Reject::Error(Error::protocol(e.to_string())),
    };
    match v.method {
        AuthMethod::Trust => {}
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::rng().random();
            messages::auth_md5(&mut out, salt);
            stream.write_all(&out).await?;
            stream.flush().await?;
            out.clear();
            let body = read_password_message(stream, inbox).await?;
            let response = body.strip_suffix(b"\0").unwrap_or(&body);
            v.check_md5(response, salt).map_err(auth_failed)?;
        }
        AuthMethod::ScramSha256 => {
            // On TLS, -PLUS is offered first (clients that can bind prefer it).
            let offered: &[&str] = if channel.is_some() {
                &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
            } else {
                &["SCRAM-SHA-256"]
            };
            messages::auth_sasl(&mut out, offered);
            stream.write_all(&out).await?;
            stream.flush().await?;
            let mut body = read_password_message(stream, inbox).await?;
            // SASLInitialResponse: mechanism name, int32 length, data.
            let nul = body
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| malformed("SASLInitialResponse without mechanism"))?;
            let plus = match &body[..nul] {
                b"SCRAM-SHA-256" => false,
                b"SCRAM-SHA-256-PLUS" if channel.is_some() => true,
                other => {
                    return Err(Reject::Error(Error::protocol(format!(
                        "client selected SASL mechanism {:?}, which was not offered ({})",
                        String::from_utf8_lossy(other),
                        offered.join(", ")
                    ))))
                }
            };
            body.advance(nul + 1);
            if body.len() < 4 {
                return Err(malformed("SASLInitialResponse too short"));
            }
            let len = body.get_i32();
            if len < 0 || len as usize != body.len() {
                return Err(malformed("SASLInitialResponse length mismatch"));
            }
            let mut scram = v.scram(channel, plus);
            let first = scram.client_first(&body).map_err(auth_failed)?;
            out.clear();
            messages::auth_sasl_continue(&mut out, first.as_bytes());
            stream.write_all(&out).await?;
            stream.flush().await?;
            let body = read_password_message(stream, inbox).await?;
            let fin = scram.client_final(&body).map_err(auth_failed)?;
            if let Some(key) = scram.client_key() {
                v.learn(key);
            }
            // Sent with AuthenticationOk below, in one write.
            out.clear();
            messages::auth_sasl_final(&mut out, fin.as_bytes());
        }
    }
    // After what is still unsent (SCRAM's final message).
    messages::auth_ok(&mut out);
    if defer {
        return Ok(out);
    }
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(BytesMut::new())
}

fn malformed(what: &str) -> Reject {
    Reject::Error(Error::protocol(format!("malformed authentication message: {what}")))
}

/// Read one PasswordMessage / SASL response ('p') during authentication.
async fn read_password_message(stream: &mut ClientStream, inbox: &mut Inbox) -> Result<BytesMut, Reject> {
    let mut message = inbox
        .next(stream, |buf| {
            match buf.first() {
                Some(&tag) if tag != b'p' => {
                    return Err(Reject::Error(Error::protocol(format!(
                        "expected a password message, got message type '{}'",
                        tag as char
                    ))))
                }
                _ => {}
            }
            message_length(buf, MAX_AUTH_MESSAGE)
                .map_err(|len| Reject::Error(Error::protocol(format!("invalid password message length {len}"))))
        })
        .await?;
    message.advance(5);
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_known_once_the_header_is_there_and_bad_ones_are_refused() {
        // Startup packets: the length word counts itself.
        assert!(matches!(startup_length(&[0, 0, 0]), Ok(None)));
        assert!(matches!(startup_length(&[0, 0, 0, 8]), Ok(Some(8))));
        assert!(matches!(startup_length(&[0, 0, 0, 7]), Err(StartupError::BadLength(7))));
        let too_long = ((MAX_STARTUP_LEN + 1) as i32).to_be_bytes();
        assert!(matches!(startup_length(&too_long), Err(StartupError::BadLength(_))));
        // Tagged messages: the tag, then a length word that counts itself, not the tag.
        assert_eq!(message_length(b"p\0\0", 100), Ok(None));
        assert_eq!(message_length(b"p\0\0\0\x04", 100), Ok(Some(5)));
        assert_eq!(message_length(b"p\0\0\0\x09abcd", 100), Ok(Some(10)));
        assert_eq!(message_length(b"p\0\0\0\x03", 100), Err(3));
        assert_eq!(message_length(b"p\0\0\0\x65", 100), Err(101));
        assert_eq!(message_length(b"p\xff\xff\xff\xff", 100), Err(-1));
    }
}
