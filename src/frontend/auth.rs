//! Client authentication to the proxy: SCRAM-SHA-256 and, on TLS connections,
//! SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding (server side), md5,
//! trust.
//!
//! `postgres-protocol` implements only the client side of SCRAM (used for logging in to
//! servers); no maintained crate implements PostgreSQL's server side (empty SCRAM
//! username, its gs2 header rules), so the few steps of RFC 5802/7677 the proxy needs are
//! written here, checked by a test against the crate's client.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};

use crate::config::{AuthMethod, UserConfig};

pub const SCRAM_ITERATIONS: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SCRAM channel binding type (only tls-server-end-point, on TLS connections)")]
    ChannelBinding,
    #[error("SCRAM channel binding negotiation error: {0}")]
    ChannelNegotiation(&'static str),
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block: SCRAM's `Hi()`.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(u.iter()).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// What the proxy keeps to check a user: derived once at startup, since `Hi()` costs
/// thousands of HMACs and must not run per login.
#[derive(Clone)]
pub struct Verifier {
    pub method: AuthMethod,
    pub user: String,
    password: Option<String>,
    salt: [u8; 16],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Verifier {
    pub fn new(user: &UserConfig) -> Verifier {
        let salt: [u8; 16] = rand::rng().random();
        let (stored_key, server_key) = match (&user.password, user.method_needs_scram()) {
            (Some(pw), true) => {
                let salted = hi(pw.as_bytes(), &salt, SCRAM_ITERATIONS);
                let client_key = hmac(&salted, b"Client Key");
                (Sha256::digest(client_key).into(), hmac(&salted, b"Server Key"))
            }
            _ => ([0; 32], [0; 32]),
        };
        Verifier {
            method: user.auth,
            user: user.name.clone(),
            password: user.password.clone(),
            salt,
            stored_key,
            server_key,
        }
    }

    /// Check an md5 PasswordMessage (`md5` + hex) against the salt sent.
    pub fn check_md5(&self, response: &[u8], salt: [u8; 4]) -> Result<(), AuthError> {
        let pw = self.password.as_deref().unwrap_or("");
        let expected = postgres_protocol::authentication::md5_hash(self.user.as_bytes(), pw.as_bytes(), salt);
        if constant_time_eq(expected.as_bytes(), response) {
            Ok(())
        } else {
            Err(AuthError::Failed(self.user.clone()))
        }
    }

    /// A SCRAM exchange. `channel`: the `tls-server-end-point` data of the TLS
    /// connection, if it is one (then SCRAM-SHA-256-PLUS was offered); `plus`: the
    /// client chose SCRAM-SHA-256-PLUS.
    pub fn scram(&self, channel: Option<&[u8]>, plus: bool) -> ScramExchange<'_> {
        ScramExchange {
            verifier: self,
            channel: channel.map(<[u8]>::to_vec),
            plus,
            state: ScramState::Initial,
        }
    }
}

impl UserConfig {
    fn method_needs_scram(&self) -> bool {
        self.auth == AuthMethod::ScramSha256
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

enum ScramState {
    Initial,
    SentFirst {
        client_first_bare: String,
        server_first: String,
        gs2_header: String,
        nonce: String,
    },
    Done,
}

/// One SCRAM-SHA-256(-PLUS) exchange, advanced a message at a time.
pub struct ScramExchange<'a> {
    verifier: &'a Verifier,
    channel: Option<Vec<u8>>,
    plus: bool,
    state: ScramState,
}

impl ScramExchange<'_> {
    /// Take the client-first-message; return the server-first-message.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<String, AuthError> {
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg.split_once(',').ok_or(AuthError::Malformed("no gs2 header"))?;
        // The rules of RFC 5802 section 6, as PostgreSQL applies them.
        match flag {
            "p=tls-server-end-point" if self.plus && self.channel.is_some() => {}
            f if f.starts_with("p=") && !self.plus => {
                return Err(AuthError::ChannelNegotiation(
                    "channel binding requested without choosing SCRAM-SHA-256-PLUS",
                ))
            }
            f if f.starts_with("p=") => return Err(AuthError::ChannelBinding),
            _ if self.plus => {
                return Err(AuthError::ChannelNegotiation(
                    "SCRAM-SHA-256-PLUS chosen without channel binding",
                ))
            }
            // The client can bind but believes the server cannot, although it was
            // offered the -PLUS mechanism: someone removed it on the way.
            "y" if self.channel.is_some() => {
                return Err(AuthError::ChannelNegotiation(
                    "the client supports channel binding but did not see it offered",
                ))
            }
            "n" | "y" => {}
            _ => return Err(AuthError::Malformed("bad channel binding flag")),
        }
        let (_authzid, bare) = rest.split_once(',').ok_or(AuthError::Malformed("no gs2 header"))?;
        let gs2_header = format!("{flag},{_authzid},");
        // PostgreSQL clients send an empty n= (the user comes from the startup packet).
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::Malformed("no client nonce"))?;
        let server_part: [u8; 18] = rand::rng().random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_part));
        let server_first = format!("r={nonce},s={},i={SCRAM_ITERATIONS}", B64.encode(self.verifier.salt));
        self.state = ScramState::SentFirst {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            gs2_header,
            nonce,
        };
        Ok(server_first)
    }

    /// Take the client-final-message; on a correct proof return the server-final-message.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<String, AuthError> {
        let ScramState::SentFirst {
            client_first_bare,
            server_first,
            gs2_header,
            nonce,
        } = std::mem::replace(&mut self.state, ScramState::Done)
        else {
            return Err(AuthError::Malformed("unexpected message order"));
        };
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(AuthError::Malformed("no proof"))?;
        let mut cbind = None;
        let mut got_nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                cbind = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                got_nonce = Some(v);
            }
        }
        // c= is the gs2 header, followed by the channel's data when bound.
        let mut expected = gs2_header.as_bytes().to_vec();
        if gs2_header.starts_with("p=") {
            expected.extend_from_slice(self.channel.as_deref().unwrap_or_default());
        }
        if cbind != Some(B64.encode(&expected).as_str()) {
            return Err(AuthError::ChannelNegotiation("channel binding data does not match"));
        }
        if got_nonce != Some(nonce.as_str()) {
            return Err(AuthError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| AuthError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(AuthError::Failed(self.verifier.user.clone()));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(client_signature.iter()).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(AuthError::Failed(self.verifier.user.clone()));
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn user(pw: &str) -> UserConfig {
        UserConfig {
            name: "app".into(),
            password: Some(pw.into()),
            password_file: None,
            password_env: None,
            auth: AuthMethod::ScramSha256,
            admin: false,
        }
    }

    /// Drive our server side with the client side of `postgres-protocol` (what
    /// tokio-postgres uses), and check both sides accept each other.
    fn exchange(server_pw: &str, client_pw: &str) -> Result<(), AuthError> {
        run_exchange(server_pw, client_pw, None, ChannelBinding::unsupported())
    }

    /// One whole exchange; `server_cb`: the server's binding data (it offered -PLUS and
    /// the client chose it), `client_cb`: what the client binds to.
    fn run_exchange(
        server_pw: &str,
        client_pw: &str,
        server_cb: Option<&[u8]>,
        client_cb: ChannelBinding,
    ) -> Result<(), AuthError> {
        let v = Verifier::new(&user(server_pw));
        let mut server = v.scram(server_cb, server_cb.is_some());
        let mut client = ScramSha256::new(client_pw.as_bytes(), client_cb);
        let first = server.client_first(client.message())?;
        client.update(first.as_bytes()).unwrap();
        let fin = server.client_final(client.message())?;
        client.finish(fin.as_bytes()).expect("client accepts server signature");
        Ok(())
    }

    #[test]
    fn scram_accepts_the_right_password() {
        exchange("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn scram_rejects_a_wrong_password() {
        assert_eq!(exchange("s3cret", "guess"), Err(AuthError::Failed("app".into())));
    }

    /// SCRAM-SHA-256-PLUS: the client binds to `client_sees`, the server to its own.
    fn exchange_plus(server_cb: &[u8], client_sees: &[u8]) -> Result<(), AuthError> {
        run_exchange(
            "pw",
            "pw",
            Some(server_cb),
            ChannelBinding::tls_server_end_point(client_sees.to_vec()),
        )
    }

    #[test]
    fn scram_plus_binds_to_the_tls_certificate() {
        exchange_plus(b"hash of our certificate", b"hash of our certificate").unwrap();
        // A man in the middle terminating TLS with another certificate.
        assert!(matches!(
            exchange_plus(b"hash of our certificate", b"hash of another"),
            Err(AuthError::ChannelNegotiation(_))
        ));
    }

    #[test]
    fn scram_channel_binding_rules() {
        let v = Verifier::new(&user("x"));
        // Binding without TLS (nothing to bind to) or without choosing -PLUS.
        assert_eq!(
            v.scram(None, false).client_first(b"p=tls-server-end-point,,n=,r=abc"),
            Err(AuthError::ChannelNegotiation(
                "channel binding requested without choosing SCRAM-SHA-256-PLUS"
            ))
        );
        assert_eq!(
            v.scram(Some(b"cb"), true).client_first(b"p=tls-unique,,n=,r=abc"),
            Err(AuthError::ChannelBinding)
        );
        // -PLUS chosen, then not bound; "y" although -PLUS was offered (a downgrade).
        assert!(matches!(
            v.scram(Some(b"cb"), true).client_first(b"n,,n=,r=abc"),
            Err(AuthError::ChannelNegotiation(_))
        ));
        assert!(matches!(
            v.scram(Some(b"cb"), false).client_first(b"y,,n=,r=abc"),
            Err(AuthError::ChannelNegotiation(_))
        ));
        // "y" where -PLUS was not offered (plaintext) is fine.
        assert!(v.scram(None, false).client_first(b"y,,n=,r=abc").is_ok());
        assert!(matches!(
            v.scram(None, false).client_first(b"garbage"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            v.scram(None, false).client_final(b"c=biws,r=x,p=AAAA"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn md5_check() {
        let v = Verifier::new(&UserConfig {
            name: "app".into(),
            password: Some("pw".into()),
            password_file: None,
            password_env: None,
            auth: AuthMethod::Md5,
            admin: false,
        });
        let salt = [1, 2, 3, 4];
        let good = postgres_protocol::authentication::md5_hash(b"app", b"pw", salt);
        assert!(v.check_md5(good.as_bytes(), salt).is_ok());
        assert!(v.check_md5(b"md5000", salt).is_err());
    }
}
