//! A transaction-pooling client carried to a successor process (binary upgrade; the
//! socket pair is `proxy::handover`): who the client is, in a form that survives the
//! trip. The session itself goes on in `session::resume`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cluster::freshness::Floor;
use crate::pg::credential::{Credential, PasswordCred, ScramKeys};
use crate::pg::txn::carry::MachineCarry;

/// What the successor needs to serve the client from its next message.
#[derive(Serialize, Deserialize)]
pub struct Carried {
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
    pub credential: CarriedCredential,
    /// The BackendKeyData the client was shown: its cancel requests keep working.
    pub pid: i32,
    pub key: i32,
    /// A causal token the client presented (timeline, WAL position).
    pub causal_token: Option<(u32, u64)>,
    /// Channels it LISTENs on through the shared listener.
    pub listening: Vec<String>,
    /// Bytes it sent that the old process read and had not dispatched (part of a message).
    pub unread: Vec<u8>,
    pub session: MachineCarry,
}

impl Carried {
    pub fn floor(&self) -> Option<Floor> {
        self.causal_token.map(|(timeline, lsn)| Floor { timeline, lsn })
    }
}

/// What the client's user logs in to servers with. A SCRAM key learned from a client's
/// proof exists only in memory: without it the successor could not log in for a
/// verifier-only user until that user's next client logs in. It travels over the
/// socket pair between the two processes of the same user, never elsewhere.
#[derive(Serialize, Deserialize)]
pub enum CarriedCredential {
    None,
    Password(String),
    Scram {
        salt: Vec<u8>,
        iterations: u32,
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
    Unlearned,
}

impl CarriedCredential {
    pub fn of(c: &Credential) -> CarriedCredential {
        match c {
            Credential::None => CarriedCredential::None,
            Credential::Password(p) => CarriedCredential::Password(p.password.clone()),
            Credential::Scram(k) => CarriedCredential::Scram {
                salt: k.salt.clone(),
                iterations: k.iterations,
                client_key: k.client_key,
                server_key: k.server_key,
            },
            Credential::Unlearned => CarriedCredential::Unlearned,
        }
    }

    /// The credential in this process: the user's configured one (a verifier user's
    /// learns the carried key), else the carried one as it is (auth_query users).
    pub fn into_credential(self, verifier: Option<&crate::pg::auth::Verifier>) -> Credential {
        if let Some(v) = verifier {
            if let CarriedCredential::Scram { client_key, .. } = &self {
                v.learn(*client_key);
            }
            return v.server_credential();
        }
        match self {
            CarriedCredential::None => Credential::None,
            CarriedCredential::Password(p) => Credential::Password(PasswordCred::new(p)),
            CarriedCredential::Scram {
                salt,
                iterations,
                client_key,
                server_key,
            } => Credential::Scram(Arc::new(ScramKeys {
                salt,
                iterations,
                client_key,
                server_key,
            })),
            CarriedCredential::Unlearned => Credential::Unlearned,
        }
    }
}
