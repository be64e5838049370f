//! CancelRequest routing. Each client session gets a BackendKeyData whose secret key is
//! minted by the proxy (the client never sees a server's key), mapped here to the server
//! connection it stands for. A cancel can arrive on any listener, on a fresh connection.
//!
//! The pid a client sees: in session mode, the real pid of its one server backend, so
//! that `pg_backend_pid()`, the pid in its own NOTIFY messages and
//! `pg_terminate_backend(conn.info.backend_pid)` all agree, as on a direct connection.
//! In transaction mode the client has no single backend: the pid is minted too. Since
//! pids of different servers (and minted ones) may coincide, entries are keyed by
//! (pid, key), and keys are unique per pid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use crate::protocol::messages::cancel_request;
use crate::tls::{write_flush, ServerTls};

#[derive(Clone)]
struct Target {
    /// The cluster, whose `server_tls` the forwarded request uses.
    cluster: String,
    addr: String,
    server_pid: i32,
    server_key: i32,
    /// Whether the session holds the server connection above now.
    active: bool,
}

/// Each session's target sits in a slot of its own: in transaction mode it changes twice
/// per transaction (`retarget`), and a slot only that session writes keeps the registry's
/// lock, shared by every worker thread, off that path.
type Slot = Arc<Mutex<Target>>;

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<(i32, i32), Slot>>,
}

/// Removes the session's key when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    slot: Slot,
    pub pid: i32,
    pub key: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.map.lock().unwrap().remove(&(self.pid, self.key));
    }
}

impl CancelRegistry {
    /// A session-mode client on one server connection: it is shown the server's pid.
    pub fn register_session(
        self: &Arc<Self>,
        cluster: &str,
        addr: &str,
        server_pid: i32,
        server_key: i32,
    ) -> Registration {
        self.insert(
            Some(server_pid),
            Target {
                cluster: cluster.to_string(),
                addr: addr.to_string(),
                server_pid,
                server_key,
                active: true,
            },
        )
    }

    /// A transaction-mode client: a minted pid, pointed at a server connection only
    /// while it holds one (`retarget`).
    pub fn register_pooled(self: &Arc<Self>, cluster: &str) -> Registration {
        self.insert(
            None,
            Target {
                cluster: cluster.to_string(),
                addr: String::new(),
                server_pid: 0,
                server_key: 0,
                active: false,
            },
        )
    }

    fn insert(self: &Arc<Self>, pid: Option<i32>, target: Target) -> Registration {
        let mut rng = rand::rng();
        let mut map = self.map.lock().unwrap();
        let (pid, key) = loop {
            let pid = pid.unwrap_or_else(|| rng.random_range(1..i32::MAX));
            let key: i32 = rng.random();
            if !map.contains_key(&(pid, key)) {
                break (pid, key);
            }
        };
        let slot = Arc::new(Mutex::new(target));
        map.insert((pid, key), slot.clone());
        Registration {
            registry: self.clone(),
            slot,
            pid,
            key,
        }
    }

    /// Point a session's key at the server connection it holds now (transaction
    /// pooling); `None` when it holds none, and a cancel has nothing to stop.
    pub fn retarget(&self, reg: &Registration, target: Option<(&str, i32, i32)>) {
        let mut t = reg.slot.lock().unwrap();
        match target {
            Some((addr, server_pid, server_key)) => {
                if t.addr != addr {
                    t.addr = addr.to_string(); // only when the node changes
                }
                t.server_pid = server_pid;
                t.server_key = server_key;
                t.active = true;
            }
            None => t.active = false,
        }
    }

    /// Forward a client's CancelRequest to the server its session is on. Unknown keys
    /// are dropped silently, as PostgreSQL does (no answer is ever sent to a cancel).
    /// It goes over TLS as the cluster's `server_tls` says (`tls`: the cluster's, by
    /// name): a cancel key sent in the clear could be replayed by anyone who saw it.
    pub async fn forward(&self, pid: i32, key: i32, tls: impl Fn(&str) -> Option<Arc<ServerTls>>) {
        let slot = self.map.lock().unwrap().get(&(pid, key)).cloned();
        let target = slot.and_then(|s| Some(s.lock().unwrap().clone()).filter(|t| t.active));
        let Some(t) = target else {
            debug!(pid, "cancel request for an unknown session ignored");
            return;
        };
        let tls = tls(&t.cluster).unwrap_or_else(|| Arc::new(ServerTls::disabled()));
        let send = async {
            let mut s = tls.connect(&t.addr).await?;
            write_flush(&mut s, &cancel_request(t.server_pid, t.server_key)).await?;
            s.shutdown().await
        };
        match tokio::time::timeout(Duration::from_secs(5), send).await {
            Ok(Ok(())) => {
                info!(server = %t.addr, server_pid = t.server_pid, "cancel request forwarded")
            }
            Ok(Err(e)) => info!(server = %t.addr, error = %e, "could not forward cancel request"),
            Err(_) => info!(server = %t.addr, "cancel request timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_mode_shows_the_server_pid_and_pooled_mode_a_minted_one() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register_session("main", "127.0.0.1:5432", 4242, 7);
        // Another node's backend with the same pid: a separate entry, another key.
        let b = registry.register_session("main", "127.0.0.1:5433", 4242, 9);
        assert_eq!((a.pid, b.pid), (4242, 4242));
        assert_ne!(a.key, 7, "the server's key is never shown");
        assert_ne!(a.key, b.key);
        let pooled = registry.register_pooled("main");
        assert_eq!(registry.map.lock().unwrap().len(), 3);
        let target = |pid, key| {
            let slot = registry.map.lock().unwrap().get(&(pid, key)).cloned();
            slot.map(|s| s.lock().unwrap().clone())
        };
        assert_eq!(target(b.pid, b.key).unwrap().addr, "127.0.0.1:5433");
        assert!(!target(pooled.pid, pooled.key).unwrap().active);
        registry.retarget(&pooled, Some(("127.0.0.1:5432", 11, 12)));
        assert_eq!(target(pooled.pid, pooled.key).unwrap().server_pid, 11);
        drop(a);
        assert!(target(4242, b.key).is_some());
        assert_eq!(registry.map.lock().unwrap().len(), 2);
    }
}
