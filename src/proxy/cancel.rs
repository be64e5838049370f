//! One registry of running sessions for both engines: what a client was shown to name
//! its session in a cancel (PostgreSQL's BackendKeyData: a pid and a secret key;
//! MySQL's connection id, for `KILL`) → the server connection behind it now. How a
//! cancel reaches the server is the engine's (`pg::cancel`, MySQL's `KILL` on a
//! connection of its own); which server connection it stops is decided here.
//!
//! PostgreSQL: each client session gets a BackendKeyData whose secret key is minted by
//! the proxy (the client never sees a server's key). The pid a client sees: in session
//! mode, the real pid of its one server backend, so that `pg_backend_pid()`, the pid in
//! its own NOTIFY messages and `pg_terminate_backend(conn.info.backend_pid)` all agree,
//! as on a direct connection. In transaction mode the client has no single backend: the
//! pid is minted too. Since pids of different servers (and minted ones) may coincide,
//! entries are keyed by (pid, key), and keys are unique per pid.
//!
//! MySQL: connection ids are minted far above the thread ids servers hand out, so that
//! `KILL <id>` tells ours (translated here) from a server's own (passed on).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use rand::RngExt;

/// What names a session in a cancel.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Key {
    Pg { pid: i32, key: i32 },
    Mysql(u32),
}

/// The server connection a session's cancel goes to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The cluster, whose `server_tls` the cancel uses (its shared name:
    /// `ClusterCtx::name`).
    pub cluster: Arc<str>,
    pub addr: String,
    /// The server's id of the connection: a PostgreSQL backend pid, a MySQL thread id
    /// (a u32, stored bit for bit: read it back `as u32`).
    pub server_id: i32,
    /// PostgreSQL's secret key of that backend (0 for MySQL).
    pub server_key: i32,
    /// Who the session is logged in as (MySQL's KILL runs as the killer; logged).
    pub user: String,
    /// Whether the session holds the server connection above now.
    pub active: bool,
}

/// Each session's target sits in a slot of its own: in transaction mode it changes twice
/// per transaction (`retarget`), and a slot only that session writes keeps the registry's
/// lock, shared by every worker thread, off that path.
type Slot = Arc<Mutex<Target>>;

/// MySQL connection ids start far above the thread ids servers hand out (they count
/// from 1).
const MYSQL_ID_BASE: u32 = 0x4000_0000;

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<Key, Slot>>,
    next_mysql_id: AtomicU32,
}

/// Removes the session's entry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    slot: Slot,
    key: Key,
    /// PostgreSQL: the BackendKeyData the client is shown (0 for MySQL).
    pub pid: i32,
    pub key_secret: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.map.lock().unwrap().remove(&self.key);
    }
}

impl CancelRegistry {
    /// A PostgreSQL session-mode client on one server connection: it is shown the
    /// server's pid.
    pub fn register_session(
        self: &Arc<Self>,
        cluster: &Arc<str>,
        addr: &str,
        server_pid: i32,
        server_key: i32,
    ) -> Registration {
        self.insert_pg(
            Some((server_pid, 0)),
            Target {
                cluster: cluster.clone(),
                addr: addr.to_string(),
                server_id: server_pid,
                server_key,
                user: String::new(),
                active: true,
            },
        )
    }

    /// A PostgreSQL transaction-mode client: a minted pid, pointed at a server
    /// connection only while it holds one (`retarget`).
    pub fn register_pooled(self: &Arc<Self>, cluster: &Arc<str>) -> Registration {
        self.register_pooled_as(cluster, None)
    }

    /// The same, for a client carried from a predecessor process (binary upgrade): it
    /// keeps the pid and key it was shown (`keep`) unless they are taken here.
    pub fn register_pooled_as(self: &Arc<Self>, cluster: &Arc<str>, keep: Option<(i32, i32)>) -> Registration {
        self.insert_pg(
            keep,
            Target {
                cluster: cluster.clone(),
                addr: String::new(),
                server_id: 0,
                server_key: 0,
                user: String::new(),
                active: false,
            },
        )
    }

    /// `fixed`: the pid to show (a server's), and with a key other than 0 the key too (a
    /// carried client's), if free; else minted.
    fn insert_pg(self: &Arc<Self>, fixed: Option<(i32, i32)>, target: Target) -> Registration {
        let mut rng = rand::rng();
        let mut map = self.map.lock().unwrap();
        let (pid, key) = match fixed {
            Some((pid, key)) if key != 0 && !map.contains_key(&Key::Pg { pid, key }) => (pid, key),
            _ => loop {
                let pid = fixed.map_or_else(|| rng.random_range(1..i32::MAX), |(pid, _)| pid);
                let key: i32 = rng.random();
                if !map.contains_key(&Key::Pg { pid, key }) {
                    break (pid, key);
                }
            },
        };
        let slot = Arc::new(Mutex::new(target));
        map.insert(Key::Pg { pid, key }, slot.clone());
        Registration {
            registry: self.clone(),
            slot,
            key: Key::Pg { pid, key },
            pid,
            key_secret: key,
        }
    }

    /// A new MySQL connection id (shown in the greeting, before the session registers).
    pub fn mint_mysql_id(&self) -> u32 {
        MYSQL_ID_BASE | (self.next_mysql_id.fetch_add(1, Ordering::Relaxed) & (MYSQL_ID_BASE - 1))
    }

    /// A MySQL session under connection id `id` (from `mint_mysql_id`), on `target`.
    pub fn register_mysql(self: &Arc<Self>, id: u32, target: Target) -> Registration {
        let slot = Arc::new(Mutex::new(target));
        self.map.lock().unwrap().insert(Key::Mysql(id), slot.clone());
        Registration {
            registry: self.clone(),
            slot,
            key: Key::Mysql(id),
            pid: 0,
            key_secret: 0,
        }
    }

    /// Point a session's entry at the server connection it holds now (transaction
    /// pooling); `None` when it holds none, and a cancel has nothing to stop.
    pub fn retarget(&self, reg: &Registration, target: Option<(&str, i32, i32)>) {
        let mut t = reg.slot.lock().unwrap();
        match target {
            Some((addr, server_id, server_key)) => {
                if t.addr != addr {
                    t.addr = addr.to_string(); // only when the node changes
                }
                t.server_id = server_id;
                t.server_key = server_key;
                t.active = true;
            }
            None => t.active = false,
        }
    }

    /// The session logged in as someone else (MySQL's `COM_CHANGE_USER`).
    pub fn set_user(&self, reg: &Registration, user: &str) {
        reg.slot.lock().unwrap().user = user.to_string();
    }

    /// The server connection a PostgreSQL CancelRequest with (`pid`, `key`) stops, if
    /// that session holds one now.
    pub fn pg_target(&self, pid: i32, key: i32) -> Option<Target> {
        self.active(Key::Pg { pid, key })
    }

    /// The server connection behind MySQL connection id `id`, if it is one of ours.
    pub fn mysql_target(&self, id: u32) -> Option<Target> {
        self.active(Key::Mysql(id))
    }

    fn active(&self, key: Key) -> Option<Target> {
        let slot = self.map.lock().unwrap().get(&key).cloned();
        slot.and_then(|s| Some(s.lock().unwrap().clone()).filter(|t| t.active))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_mode_shows_the_server_pid_and_pooled_mode_a_minted_one() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register_session(&"main".into(), "127.0.0.1:5432", 4242, 7);
        // Another node's backend with the same pid: a separate entry, another key.
        let b = registry.register_session(&"main".into(), "127.0.0.1:5433", 4242, 9);
        assert_eq!((a.pid, b.pid), (4242, 4242));
        assert_ne!(a.key_secret, 7, "the server's key is never shown");
        assert_ne!(a.key_secret, b.key_secret);
        let pooled = registry.register_pooled(&"main".into());
        assert_eq!(registry.map.lock().unwrap().len(), 3);
        let target = |pid, key| {
            let slot = registry.map.lock().unwrap().get(&Key::Pg { pid, key }).cloned();
            slot.map(|s| s.lock().unwrap().clone())
        };
        assert_eq!(target(b.pid, b.key_secret).unwrap().addr, "127.0.0.1:5433");
        assert!(!target(pooled.pid, pooled.key_secret).unwrap().active);
        registry.retarget(&pooled, Some(("127.0.0.1:5432", 11, 12)));
        assert_eq!(target(pooled.pid, pooled.key_secret).unwrap().server_id, 11);
        drop(a);
        assert!(target(4242, b.key_secret).is_some());
        assert_eq!(registry.map.lock().unwrap().len(), 2);
    }

    #[test]
    fn mysql_ids_are_ours_and_name_one_session_of_either_engine() {
        let registry = Arc::new(CancelRegistry::default());
        let (a, b) = (registry.mint_mysql_id(), registry.mint_mysql_id());
        assert!(a >= MYSQL_ID_BASE && b >= MYSQL_ID_BASE && a != b);
        let target = |user: &str| Target {
            cluster: "m".into(),
            addr: "127.0.0.1:3306".into(),
            server_id: 17,
            server_key: 0,
            user: user.into(),
            active: true,
        };
        let reg = registry.register_mysql(a, target("app"));
        let pg = registry.register_pooled(&"main".into());
        assert_eq!(registry.mysql_target(a).unwrap().server_id, 17);
        assert!(registry.mysql_target(b).is_none(), "minted but not registered");
        assert!(
            registry.pg_target(pg.pid, pg.key_secret).is_none(),
            "holds no connection"
        );
        registry.set_user(&reg, "other");
        assert_eq!(registry.mysql_target(a).unwrap().user, "other");
        drop(reg);
        assert!(registry.mysql_target(a).is_none());
    }
}
