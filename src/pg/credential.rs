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

use std::sync::{Arc, Mutex};

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

/// A user's configured password, with the SCRAM keys derived from it for the salt and
/// iteration count a server holds. `Hi()` (PBKDF2, 4096 rounds by default) is most of
/// what a SCRAM login costs the client side, and a server keeps one salt per user, so it
/// runs once per user rather than at every server login (session mode opens one per
/// client). Shared by every credential of the user (`pg::auth::Verifier`).
pub struct PasswordCred {
    pub password: String,
    derived: Mutex<Option<Arc<ScramKeys>>>,
}

impl PasswordCred {
    pub fn new(password: String) -> Arc<PasswordCred> {
        Arc::new(PasswordCred {
            password,
            derived: Mutex::new(None),
        })
    }

    /// The keys for this salt and iteration count: the last ones if they match, else
    /// derived (and kept for the next login).
    pub fn keys(&self, salt: &[u8], iterations: u32) -> Arc<ScramKeys> {
        let mut derived = self.derived.lock().unwrap();
        if let Some(k) = derived
            .as_ref()
            .filter(|k| k.salt == salt && k.iterations == iterations)
        {
            return k.clone();
        }
        let salted = crate::scram::hi(self.password.as_bytes(), salt, iterations);
        let keys = Arc::new(ScramKeys {
            salt: salt.to_vec(),
            iterations,
            client_key: hmac(&salted, b"Client Key"),
            server_key: hmac(&salted, b"Server Key"),
        });
        *derived = Some(keys.clone());
        keys
    }
}

/// What Switchyard logs in to a server with, for one user.
#[derive(Clone, Default)]
pub enum Credential {
    /// Nothing (the server trusts the user).
    #[default]
    None,
    Password(Arc<PasswordCred>),
    Scram(Arc<ScramKeys>),
    /// A user configured with a SCRAM verifier that no client has logged in as yet.
    Unlearned,
}

impl PartialEq for Credential {
    fn eq(&self, other: &Credential) -> bool {
        match (self, other) {
            (Credential::None, Credential::None) | (Credential::Unlearned, Credential::Unlearned) => true,
            (Credential::Password(a), Credential::Password(b)) => Arc::ptr_eq(a, b) || a.password == b.password,
            (Credential::Scram(a), Credential::Scram(b)) => {
                Arc::ptr_eq(a, b) || (a.client_key == b.client_key && a.salt == b.salt && a.iterations == b.iterations)
            }
            _ => false,
        }
    }
}

/// One client-side exchange with `ScramKeys`.
pub struct KeyedScram {
    /// The keys: known from the start (learned from a client), or derived from the
    /// password once the server said its salt (`password`).
    keys: Option<Arc<ScramKeys>>,
    password: Option<Arc<PasswordCred>>,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl KeyedScram {
    /// Start: the exchange and the client-first-message (no channel binding).
    pub fn start(keys: Arc<ScramKeys>) -> (KeyedScram, String) {
        KeyedScram::begin(Some(keys), None)
    }

    /// The same with a password: the keys for the server's salt come from `password`'s
    /// cache (`PasswordCred::keys`).
    pub fn start_password(password: Arc<PasswordCred>) -> (KeyedScram, String) {
        KeyedScram::begin(None, Some(password))
    }

    fn begin(keys: Option<Arc<ScramKeys>>, password: Option<Arc<PasswordCred>>) -> (KeyedScram, String) {
        let raw: [u8; 18] = rand::rng().random();
        let nonce = B64.encode(raw);
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            KeyedScram {
                keys,
                password,
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
        let keys = match (&self.password, &self.keys) {
            (Some(password), _) => match (salt, iterations) {
                (Some(salt), Some(iterations)) if !salt.is_empty() && iterations > 0 => {
                    password.keys(&salt, iterations)
                }
                _ => return Err("server-first-message without a salt or an iteration count".into()),
            },
            (None, Some(keys)) => {
                if salt.as_deref() != Some(&keys.salt[..]) || iterations != Some(keys.iterations) {
                    return Err(
                        "the server holds another SCRAM verifier for this user than the one in Switchyard's config \
                        (salt or iteration count differ): copy rolpassword from pg_authid into the config"
                            .into(),
                    );
                }
                keys.clone()
            }
            (None, None) => return Err("no SCRAM keys".into()),
        };
        self.keys = Some(keys.clone());
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(keys.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = keys
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
        let keys = self.keys.as_ref().ok_or("SCRAM final message out of order")?;
        let want = hmac(&keys.server_key, auth_message.as_bytes());
        if got.len() == 32 && got.iter().zip(want.iter()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0 {
            Ok(())
        } else {
            Err("the server's SCRAM signature is wrong (it does not hold this user's verifier)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scram::ScramSecret;

    #[test]
    fn a_password_derives_its_keys_once_per_salt() {
        let cred = PasswordCred::new("pw".into());
        let a = cred.keys(b"0123456789abcdef", 4096);
        // What PostgreSQL stores for that password, salt and count.
        let secret = ScramSecret::from_password("pw", b"0123456789abcdef", 4096);
        let stored: [u8; 32] = Sha256::digest(a.client_key).into();
        assert_eq!((stored, a.server_key), (secret.stored_key, secret.server_key));
        assert!(
            Arc::ptr_eq(&a, &cred.keys(b"0123456789abcdef", 4096)),
            "kept, not derived again"
        );
        let b = cred.keys(b"fedcba9876543210", 4096);
        assert!(!Arc::ptr_eq(&a, &b), "another server's salt: derived");
        assert_eq!(b.salt, b"fedcba9876543210");
    }
}
