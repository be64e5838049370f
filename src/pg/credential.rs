//! Logging in to a server with SCRAM-SHA-256 without knowing the password, for users
//! configured with a SCRAM verifier (`SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey`,
//! as `pg_authid` stores it).
//!
//! A client that logs in to the proxy with SCRAM proves it knows `ClientKey` by sending
//! `ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)`; the proxy, holding
//! `StoredKey`, recovers `ClientKey` from it and checks `H(ClientKey) = StoredKey`. With
//! `ClientKey` (and `ServerKey`, from the verifier) the proxy can then answer any server
//! that holds the same verifier, as PgBouncer does. postgres-protocol's client needs the
//! password itself, so the few client steps for this are written here (RFC 5802 §3),
//! and tested against the proxy's own server side and against real servers.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngExt;
use sha2::{Digest, Sha256};

use crate::scram::hmac;

/// What the proxy knows of a user's SCRAM secret once a client has logged in: enough
/// to log in to a server holding the same verifier. As sensitive as a password for
/// those servers: kept in memory only, never printed (no Debug).
pub struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

/// What Switchyard logs in to a server with, for one user.
#[derive(Clone, Default)]
pub enum Credential {
    /// Nothing (the server trusts the user).
    #[default]
    None,
    Password(String),
    Scram(Arc<ScramKeys>),
    /// A user configured with a SCRAM verifier that no client has logged in as yet.
    Unlearned,
}

impl PartialEq for Credential {
    fn eq(&self, other: &Credential) -> bool {
        match (self, other) {
            (Credential::None, Credential::None) | (Credential::Unlearned, Credential::Unlearned) => true,
            (Credential::Password(a), Credential::Password(b)) => a == b,
            (Credential::Scram(a), Credential::Scram(b)) => {
                Arc::ptr_eq(a, b) || (a.client_key == b.client_key && a.salt == b.salt && a.iterations == b.iterations)
            }
            _ => false,
        }
    }
}

/// One client-side exchange with `ScramKeys`.
pub struct KeyedScram {
    keys: Arc<ScramKeys>,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl KeyedScram {
    /// Start: the exchange and the client-first-message (no channel binding).
    pub fn start(keys: Arc<ScramKeys>) -> (KeyedScram, String) {
        let raw: [u8; 18] = rand::rng().random();
        let nonce = B64.encode(raw);
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            KeyedScram {
                keys,
                client_first_bare,
                nonce,
                auth_message: None,
            },
            first,
        )
    }

    /// Take the server-first-message; return the client-final-message.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<String, String> {
        let msg = std::str::from_utf8(msg).map_err(|_| "server-first-message is not UTF-8".to_string())?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in msg.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = B64.decode(v).ok();
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = v.parse::<u32>().ok();
            }
        }
        let nonce = nonce
            .filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len())
            .ok_or("the server's SCRAM nonce does not extend ours")?;
        if salt.as_deref() != Some(&self.keys.salt[..]) || iterations != Some(self.keys.iterations) {
            return Err(
                "the server holds another SCRAM verifier for this user than the one in Switchyard's config \
                        (salt or iteration count differ): copy rolpassword from pg_authid into the config"
                    .into(),
            );
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self
            .keys
            .client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Check the server-final-message: the server proves it holds the verifier too.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), String> {
        let auth_message = self.auth_message.as_ref().ok_or("SCRAM final message out of order")?;
        let msg = std::str::from_utf8(msg).map_err(|_| "server-final-message is not UTF-8".to_string())?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(format!("the server refused the SCRAM proof: {e}"));
        }
        let got = msg
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or("malformed server-final-message")?;
        let want = hmac(&self.keys.server_key, auth_message.as_bytes());
        if got.len() == 32 && got.iter().zip(want.iter()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0 {
            Ok(())
        } else {
            Err("the server's SCRAM signature is wrong (it does not hold this user's verifier)".into())
        }
    }
}
