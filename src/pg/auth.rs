//! Client authentication to the proxy: SCRAM-SHA-256 and, on TLS connections,
//! SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding (server side), md5,
//! trust. A user's secret is a password, or a SCRAM verifier as `pg_authid` stores it
//! (then the ClientKey a client's SCRAM login reveals is kept to log in to servers:
//! `backend::scram`).
//!
//! `postgres-protocol` implements only the client side of SCRAM (used for logging in to
//! servers); no maintained crate implements PostgreSQL's server side (empty SCRAM
//! username, its gs2 header rules), so the few steps of RFC 5802/7677 the proxy needs are
//! written here, checked by a test against the crate's client.

use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngExt;
use sha2::{Digest, Sha256};

use crate::config::{AuthMethod, UserConfig};
use crate::pg::credential::{Credential, PasswordCred, ScramKeys};
use crate::scram::{hmac, ScramSecret};

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

/// What the proxy keeps to check a user: derived once at startup, since `Hi()` costs
/// thousands of HMACs and must not run per login.
#[derive(Clone)]
pub struct Verifier {
    pub method: AuthMethod,
    pub user: String,
    password: Option<Arc<PasswordCred>>,
    secret: ScramSecret,
    /// For a user configured with a verifier: the keys learned from the last client
    /// that logged in (shared by clones, carried over reloads that keep the verifier).
    learned: Option<Arc<Mutex<Option<Arc<ScramKeys>>>>>,
}

impl Verifier {
    pub fn new(user: &UserConfig) -> Verifier {
        if let Some(secret) = user.password.as_deref().and_then(ScramSecret::parse) {
            return Verifier {
                method: user.auth,
                user: user.name.clone(),
                password: None,
                secret,
                learned: Some(Arc::default()),
            };
        }
        let salt: [u8; 16] = rand::rng().random();
        let secret = match (&user.password, user.method_needs_scram()) {
            (Some(pw), true) => ScramSecret::from_password(pw, &salt, SCRAM_ITERATIONS),
            _ => ScramSecret {
                iterations: SCRAM_ITERATIONS,
                salt: salt.to_vec(),
                stored_key: [0; 32],
                server_key: [0; 32],
            },
        };
        Verifier {
            method: user.auth,
            user: user.name.clone(),
            password: user.password.clone().map(PasswordCred::new),
            secret,
            learned: None,
        }
    }

    /// For a user nobody knows: every proof fails, like a wrong password. The salt is
    /// the same for every attempt with this name (derived from a secret of this
    /// process), as a real user's is, so asking twice tells nothing (PostgreSQL's mock
    /// authentication does the same).
    pub fn unknown(user: &str) -> Verifier {
        static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let secret = SECRET.get_or_init(|| rand::rng().random());
        let mut rng = rand::rng();
        Verifier {
            method: AuthMethod::ScramSha256,
            user: user.to_string(),
            password: None,
            secret: ScramSecret {
                iterations: SCRAM_ITERATIONS,
                salt: hmac(secret, user.as_bytes())[..16].to_vec(),
                stored_key: rng.random(),
                server_key: rng.random(),
            },
            learned: None,
        }
    }

    /// The SCRAM secret clients are checked against.
    pub fn secret(&self) -> &ScramSecret {
        &self.secret
    }

    /// After a reload: keep what `old` learned if the verifier did not change.
    pub fn carry_over(&mut self, old: &Verifier) {
        if self.learned.is_some() && old.learned.is_some() && self.secret == old.secret {
            self.learned = old.learned.clone();
        }
    }

    /// Remember the ClientKey of a client that just proved it (verifier users only).
    pub fn learn(&self, client_key: [u8; 32]) {
        if let Some(learned) = &self.learned {
            *learned.lock().unwrap() = Some(Arc::new(ScramKeys {
                salt: self.secret.salt.clone(),
                iterations: self.secret.iterations,
                client_key,
                server_key: self.secret.server_key,
            }));
        }
    }

    /// What to log in to servers with as this user.
    pub fn server_credential(&self) -> Credential {
        match (&self.password, &self.learned) {
            (Some(pw), _) => Credential::Password(pw.clone()),
            (None, Some(learned)) => match &*learned.lock().unwrap() {
                Some(keys) => Credential::Scram(keys.clone()),
                None => Credential::Unlearned,
            },
            (None, None) => Credential::None,
        }
    }

    /// Check an md5 PasswordMessage (`md5` + hex) against the salt sent.
    pub fn check_md5(&self, response: &[u8], salt: [u8; 4]) -> Result<(), AuthError> {
        let pw = self.password.as_ref().map_or("", |p| p.password.as_str());
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
            client_key: None,
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
    client_key: Option<[u8; 32]>,
}

impl ScramExchange<'_> {
    /// After a successful `client_final`: the ClientKey the client proved it holds.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        self.client_key
    }

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
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.secret.salt),
            self.verifier.secret.iterations
        );
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
        let client_signature = hmac(&self.verifier.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(client_signature.iter())) {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.secret.stored_key) {
            return Err(AuthError::Failed(self.verifier.user.clone()));
        }
        self.client_key = Some(client_key);
        let server_signature = hmac(&self.verifier.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn user(pw: &str) -> UserConfig {
        UserConfig::with_password("app", pw, AuthMethod::ScramSha256)
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

    /// Log a client in with `pw` through `v`'s server side.
    fn client_login(v: &Verifier, pw: &str) -> Result<Option<[u8; 32]>, AuthError> {
        let mut server = v.scram(None, false);
        let mut client = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
        let first = server.client_first(client.message())?;
        client.update(first.as_bytes()).unwrap();
        let fin = server.client_final(client.message())?;
        client.finish(fin.as_bytes()).unwrap();
        Ok(server.client_key())
    }

    /// The keyed client (`backend::scram`) against a server holding `verifier`.
    fn keyed_login(keys: Arc<ScramKeys>, verifier: &str) -> Result<(), String> {
        let server_v = Verifier::new(&user(verifier));
        let mut server = server_v.scram(None, false);
        let (mut client, first) = crate::pg::credential::KeyedScram::start(keys);
        let server_first = server.client_first(first.as_bytes()).map_err(|e| e.to_string())?;
        let fin = client.server_first(server_first.as_bytes())?;
        let server_final = server.client_final(fin.as_bytes()).map_err(|e| e.to_string())?;
        client.server_final(server_final.as_bytes())
    }

    #[test]
    fn a_verifier_user_logs_in_to_servers_with_the_key_a_client_revealed() {
        let text = ScramSecret::from_password("pw", b"0123456789abcdef", 4096).to_text();
        let v = Verifier::new(&user(&text));
        assert!(matches!(v.server_credential(), Credential::Unlearned));
        assert_eq!(client_login(&v, "guess"), Err(AuthError::Failed("app".into())));
        assert!(matches!(v.server_credential(), Credential::Unlearned));
        v.learn(client_login(&v, "pw").unwrap().unwrap());
        let Credential::Scram(keys) = v.server_credential() else {
            panic!("no keys learned")
        };
        keyed_login(keys.clone(), &text).unwrap();
        // A server with another verifier of the same password (another salt).
        let other = ScramSecret::from_password("pw", b"fedcba9876543210", 4096).to_text();
        let e = keyed_login(keys, &other).unwrap_err();
        assert!(e.contains("another SCRAM verifier"), "{e}");
        // A reload that keeps the verifier keeps the key; a new verifier forgets it.
        let mut same = Verifier::new(&user(&text));
        same.carry_over(&v);
        assert!(matches!(same.server_credential(), Credential::Scram(_)));
        let mut changed = Verifier::new(&user(&other));
        changed.carry_over(&v);
        assert!(matches!(changed.server_credential(), Credential::Unlearned));
        // A password user logs in to servers with the password.
        assert!(
            matches!(Verifier::new(&user("pw")).server_credential(), Credential::Password(p) if p.password == "pw")
        );
    }

    #[test]
    fn md5_check() {
        let v = Verifier::new(&UserConfig::with_password("app", "pw", AuthMethod::Md5));
        let salt = [1, 2, 3, 4];
        let good = postgres_protocol::authentication::md5_hash(b"app", b"pw", salt);
        assert!(v.check_md5(good.as_bytes(), salt).is_ok());
        assert!(v.check_md5(b"md5000", salt).is_err());
    }
}
