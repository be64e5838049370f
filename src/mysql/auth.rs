//! A MySQL client's login: our greeting, the TLS upgrade on an SSL request, and the
//! check of its password: our challenge, the answers of
//! `mysql_native_password` and `caching_sha2_password` (fast path), when to ask again
//! with an auth switch. The proxy knows each user's password, so the fast path always
//! succeeds and it never asks for caching_sha2's full (RSA) exchange.

use std::collections::HashMap;

use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse};
use mysql_common::proto::MyDeserialize;
use mysql_common::scramble::{scramble_native, scramble_sha256};
use tracing::debug;

use super::protocol::{self, read_packet, write_packet};
use crate::config::{AuthMethod, UserConfig};
use crate::error::Error;
use crate::proxy::limits::{self, Admission, Refusal};
use crate::proxy::shared::Shared;
use crate::proxy::stream::ClientStream;

/// Largest login packet taken from a client.
const LOGIN_MAX: usize = 64 * 1024;

/// 20 printable bytes, as MySQL servers make them (some clients treat the nonce as a
/// C string).
pub(super) fn new_nonce() -> [u8; 20] {
    let mut n: [u8; 20] = rand::random();
    for b in &mut n {
        *b = 0x21 + (*b % 94);
    }
    n
}

/// The password a MySQL login is checked with: the plaintext one of `[[users]]`.
pub(super) fn login_password(user: &UserConfig) -> Result<&str, Error> {
    user.password.as_deref().filter(|_| !user.has_scram_verifier()).ok_or_else(|| {
        Error::not_authorized(format!(
            "Access denied for user '{}': MySQL logins need the user's password in [[users]] (a SCRAM verifier works for PostgreSQL only)",
            user.name
        ))
    })
}

/// The plugin to switch a client to, if its first answer cannot be checked as is:
/// a plugin we do not verify (→ `mysql_native_password`), or an answer of the wrong
/// length for its own plugin (→ the same plugin, with our challenge).
pub(super) fn switch_to(plugin: &AuthPlugin<'_>, answer: &[u8], password: &str) -> Option<AuthPlugin<'static>> {
    match plugin {
        AuthPlugin::MysqlNativePassword if !password.is_empty() && answer.len() != 20 => {
            Some(AuthPlugin::MysqlNativePassword)
        }
        AuthPlugin::CachingSha2Password if !password.is_empty() && answer.len() != 32 => {
            Some(AuthPlugin::CachingSha2Password)
        }
        AuthPlugin::MysqlNativePassword | AuthPlugin::CachingSha2Password => None,
        _ => Some(AuthPlugin::MysqlNativePassword),
    }
}

pub(super) fn denied(name: &str, with_password: bool) -> Error {
    Error::auth_failed(format!(
        "Access denied for user '{name}' (using password: {})",
        if with_password { "YES" } else { "NO" }
    ))
}

/// Does `answer` prove `password` for our challenge `nonce` under `plugin`?
pub(super) fn check_answer(
    name: &str,
    password: &str,
    nonce: &[u8; 20],
    plugin: &AuthPlugin<'_>,
    answer: &[u8],
) -> Result<(), Error> {
    let expected = match plugin {
        AuthPlugin::CachingSha2Password => scramble_sha256(nonce, password.as_bytes()).map(|s| s.to_vec()),
        _ => scramble_native(nonce, password.as_bytes()).map(|s| s.to_vec()),
    }
    .unwrap_or_default();
    if subtle_eq(&expected, answer) {
        Ok(())
    } else {
        Err(denied(name, !answer.is_empty()))
    }
}

/// Compare without stopping at the first difference.
pub(super) fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client as authenticated.
pub(super) struct Client {
    pub(super) user: UserConfig,
    /// The challenge of our greeting (`COM_CHANGE_USER` answers it too).
    pub(super) nonce: [u8; 20],
    pub(super) database: Option<Vec<u8>>,
    pub(super) capabilities: CapabilityFlags,
    pub(super) collation: u8,
    pub(super) attributes: Option<HashMap<String, String>>,
    /// Sequence id of the client's last login packet.
    pub(super) seq: u8,
    /// This client's place under `max_clients`, held until the session ends (moved to
    /// another user by `COM_CHANGE_USER`).
    pub(super) admission: std::sync::Mutex<Admission>,
}

/// What our greeting says, and whether TLS is offered or required.
pub(super) struct Hello<'a> {
    pub(super) id: u32,
    pub(super) nonce: &'a [u8; 20],
    pub(super) offered: CapabilityFlags,
    pub(super) version: &'a str,
    pub(super) collation: u8,
    pub(super) tls: Option<&'a tokio_rustls::TlsAcceptor>,
    pub(super) require_tls: bool,
    pub(super) cluster: &'a str,
    /// Refused already (out of file descriptors): told so once its user is known.
    pub(super) forced: Option<Refusal>,
}

pub(super) async fn authenticate(
    stream: &mut Option<ClientStream>,
    shared: &Shared,
    hello: Hello<'_>,
) -> Result<Client, (u8, Error)> {
    let Hello {
        id,
        nonce,
        offered,
        version,
        collation,
        tls,
        require_tls,
        cluster,
        forced,
    } = hello;
    let io = |seq: u8| {
        move |e: std::io::Error| {
            (
                seq,
                Error::protocol(format!("client connection failed during login: {e}")),
            )
        }
    };
    let mut scramble_2 = nonce[8..].to_vec();
    scramble_2.push(0);
    let hello = HandshakePacket::new(
        10,
        version.as_bytes(),
        id,
        nonce[..8].try_into().expect("8 bytes"),
        Some(scramble_2),
        offered,
        collation,
        StatusFlags::SERVER_STATUS_AUTOCOMMIT,
        Some(&b"mysql_native_password"[..]),
    );
    let tcp = stream.as_mut().expect("a stream until the TLS upgrade");
    write_packet(tcp, 0, &protocol::to_vec(&hello)).await.map_err(io(1))?;
    let mut buf = Vec::new();
    let mut seq = read_packet(tcp, &mut buf, LOGIN_MAX).await.map_err(io(2))?;
    let next = |s: u8| s.wrapping_add(1);
    // An SSL request: the first 32 bytes of a handshake response with CLIENT_SSL; the
    // whole response follows inside TLS.
    let ssl_request = buf.len() == 32 && buf[..4] != [0; 4] && {
        let caps = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        caps & CapabilityFlags::CLIENT_SSL.bits() != 0
    };
    if ssl_request {
        let Some(acceptor) = tls else {
            return Err((
                next(seq),
                Error::unsupported("TLS is not offered on this listener (client_tls)"),
            ));
        };
        let Some(ClientStream::Plain(plain)) = stream.take() else {
            return Err((next(seq), Error::protocol("a second SSL request")));
        };
        let upgraded = acceptor
            .accept(plain)
            .await
            .map_err(|e| (0, Error::protocol(format!("TLS handshake failed: {e}"))))?;
        *stream = Some(ClientStream::Tls(Box::new(upgraded)));
        let tcp = stream.as_mut().expect("just upgraded");
        seq = read_packet(tcp, &mut buf, LOGIN_MAX).await.map_err(io(0))?;
    } else if require_tls {
        return Err((
            next(seq),
            Error::not_authorized(
                "this listener requires TLS (client_tls = \"require\"): connect with --ssl / ssl_mode=REQUIRED",
            ),
        ));
    }
    let tcp = stream.as_mut().expect("a stream");
    let response = HandshakeResponse::deserialize((), &mut ParseBuf(&buf))
        .map_err(|e| (next(seq), Error::protocol(format!("malformed handshake response: {e}"))))?;
    if !response.capabilities().contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
        return Err((
            next(seq),
            Error::unsupported("clients older than MySQL 4.1's protocol are not supported"),
        ));
    }
    let name = String::from_utf8_lossy(response.user()).into_owned();
    // Counted before the password check: a client over a limit costs none (MySQL's
    // server, too, answers 1040 before authenticating).
    let admission = limits::admit(shared, cluster, &name, forced).map_err(|e| (next(seq), e))?;
    let config = shared.config();
    let Some(user) = config.user(&name).cloned() else {
        // The same answer as a wrong password: which users exist is not for a client
        // that has not authenticated to learn (the log says which it was).
        debug!(user = %name, "MySQL login for a user not in [[users]]");
        return Err((next(seq), denied(&name, !response.scramble_buf().is_empty())));
    };
    if user.auth != AuthMethod::Trust {
        let password = login_password(&user).map_err(|e| (next(seq), e))?;
        let mut plugin = response
            .auth_plugin()
            .cloned()
            .unwrap_or(AuthPlugin::MysqlNativePassword)
            .into_owned();
        let mut answer = response.scramble_buf().to_vec();
        if let Some(to) = switch_to(&plugin, &answer, password) {
            // Another plugin (ed25519, clear text): ask for mysql_native_password. An
            // answer that is not one for our challenge (MySQL 8's libmysqlclient starts
            // caching_sha2_password with empty data, expecting a switch): ask again.
            let mut data = nonce.to_vec();
            data.push(0);
            let switch = AuthSwitchRequest::new(to.as_bytes(), &data[..]);
            write_packet(tcp, next(seq), &protocol::to_vec(&switch))
                .await
                .map_err(io(0))?;
            let mut reply = Vec::new();
            seq = read_packet(tcp, &mut reply, LOGIN_MAX).await.map_err(io(0))?;
            answer = reply;
            plugin = to;
        }
        check_answer(&name, password, nonce, &plugin, &answer).map_err(|e| (next(seq), e))?;
        if plugin == AuthPlugin::CachingSha2Password {
            // Fast authentication succeeded: the OK follows.
            seq = next(seq);
            write_packet(tcp, seq, &[0x01, 0x03]).await.map_err(io(0))?;
        }
    }
    Ok(Client {
        nonce: *nonce,
        database: response.db_name().map(|d| d.to_vec()),
        capabilities: response.capabilities() & offered,
        collation: response.collation(),
        attributes: response.connect_attributes(),
        user,
        seq,
        admission: std::sync::Mutex::new(admission),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_printable() {
        let n = new_nonce();
        assert!(n.iter().all(|b| (0x21..0x7f).contains(b)));
    }

    #[test]
    fn answers_of_the_wrong_length_get_a_switch() {
        assert_eq!(
            switch_to(&AuthPlugin::CachingSha2Password, b"", "pw"),
            Some(AuthPlugin::CachingSha2Password)
        );
        assert_eq!(switch_to(&AuthPlugin::MysqlNativePassword, &[0; 20], "pw"), None);
        assert_eq!(
            switch_to(&AuthPlugin::MysqlNativePassword, b"", ""),
            None,
            "empty password"
        );
        assert_eq!(
            switch_to(&AuthPlugin::MysqlClearPassword, b"pw", "pw"),
            Some(AuthPlugin::MysqlNativePassword)
        );
    }

    #[test]
    fn a_wrong_answer_is_denied() {
        let nonce = [0x41u8; 20];
        let good = scramble_native(&nonce, b"pw").unwrap();
        assert!(check_answer("u", "pw", &nonce, &AuthPlugin::MysqlNativePassword, &good).is_ok());
        let err = check_answer("u", "other", &nonce, &AuthPlugin::MysqlNativePassword, &good).unwrap_err();
        assert_eq!(err.mysql_code().number, 1045);
    }
}
