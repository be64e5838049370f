//! MySQL and MariaDB clusters (`engine = "mysql"`): the same topology, routing and
//! connector as PostgreSQL clusters, with the MySQL protocol on both sides.
//!
//! The same file names as `pg/` for the same jobs:
//! - `protocol`: framing, the packets the proxy writes, a relay `Scanner`.
//! - `health`: the node probe (`mysql_async`): writable? replicating from whom? lag.
//! - `manager`: the control plane's statements (`cluster::control::Control`): fence,
//!   promote after the relay log is applied, repoint and rejoin by GTID.
//! - `server`: logging in to a server as the client.
//! - `auth`: checking a client's password.
//! - `session`: a client from greeting to goodbye (session pooling), `relay`: its bytes
//!   both ways, `commands`: what the relay answers itself (KILL, COM_CHANGE_USER),
//!   `digests`: naming the commands it passes on for the query digests.

mod answers;
mod auth;
pub mod classify;
mod commands;
mod digests;
mod fresh;
pub mod gtid;
pub mod health;
pub mod manager;
mod moving;
mod multiplex;
pub mod pool;
pub mod protocol;
mod relay;
pub mod server;
pub mod session;
mod split;
mod timeouts;
mod tracked;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use server::Greeting;

/// What the proxy learned about a MySQL cluster's servers that its own greeting to
/// clients must match: the version string clients read features from, and the
/// capabilities the servers offer (the proxy never offers more).
#[derive(Default)]
pub struct ClusterInfo {
    greeting: RwLock<Option<Greeting>>,
    /// Per replica, when its replication connection last received something (an event
    /// or a heartbeat), as its health checks saw it: a frozen primary keeps its
    /// replicas' connections open, so only this tells it from a live one.
    heard: Mutex<HashMap<String, Heard>>,
    /// Per node, its replication as its last health check saw it (for `/status`).
    replication: Mutex<HashMap<String, Replication>>,
    /// rw sessions not at rest: in a transaction, or with an answer owed. A switchover
    /// holds new commands and waits for this to reach 0 before it fences the primary.
    pub unsettled: Arc<std::sync::atomic::AtomicU32>,
    /// Per node, a position it is known to have applied: from its health checks, and
    /// from fresh reads' waits that saw it get there (`fresh.rs`).
    applied: Mutex<HashMap<String, gtid::Position>>,
    /// Per user, the writes every session of that user shares
    /// (`read_your_writes = "user"`).
    writes: Mutex<HashMap<String, Arc<fresh::Writes>>>,
    /// Which statements a replica may answer (`read_write_split`).
    pub classifier: classify::Classifier,
    /// Server connections in transaction pooling.
    pub pools: pool::Pools,
    /// The primary's GTID position as its last health check read it, and when that
    /// check's query was sent.
    primary_position: Mutex<Option<(gtid::Position, tokio::time::Instant)>>,
}

/// A MySQL node's replication as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Replication {
    /// `@@gtid_current_pos` (MariaDB) or `@@gtid_executed` (MySQL).
    pub gtid: Option<String>,
    /// `host:port` it replicates from, if any.
    pub source: Option<String>,
    /// IO and SQL thread states (`Yes`, `No`, `Connecting`).
    pub io_thread: Option<String>,
    pub sql_thread: Option<String>,
    /// MariaDB: the last GTID its IO thread received (`Gtid_IO_Pos`).
    pub received: Option<String>,
    /// Semi-synchronous replication on this node's side: `on`, `off`, or None when
    /// the server does not have it.
    pub semi_sync: Option<String>,
    /// The replication threads' last error, if any.
    pub last_error: Option<String>,
}

/// What a replica's replication connection received, as of its last health check.
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    /// Heartbeats received + transactions received; changes while its source lives.
    marker: u64,
    /// When `marker` last changed (or was first seen).
    pub changed_at: Instant,
    /// The channel's heartbeat period: how long a live, idle source may stay silent.
    pub period: Option<Duration>,
}

impl ClusterInfo {
    /// A cluster whose config lists `read_only_functions`.
    pub fn new(read_only_functions: &[String], workers: usize) -> ClusterInfo {
        ClusterInfo {
            classifier: classify::Classifier::new(read_only_functions),
            pools: pool::Pools::new(workers),
            ..ClusterInfo::default()
        }
    }

    /// The state of a cluster known to be MySQL (`ClusterCtx::engine_state`).
    pub fn of(ctx: &crate::cluster::ClusterCtx) -> &Arc<ClusterInfo> {
        ctx.engine_state
            .downcast_ref()
            .expect("a MySQL cluster has a ClusterInfo")
    }

    pub fn set_greeting(&self, g: Greeting) {
        *self.greeting.write().unwrap() = Some(g);
    }

    pub fn greeting(&self) -> Option<Greeting> {
        self.greeting.read().unwrap().clone()
    }

    /// Record a replica's received-marker from a health check (None: it has no
    /// replication channel, or the server does not say).
    pub fn note_heard(&self, node: &str, marker: Option<u64>, period: Option<Duration>, now: Instant) {
        let mut heard = self.heard.lock().unwrap();
        let Some(marker) = marker else {
            heard.remove(node);
            return;
        };
        match heard.get_mut(node) {
            Some(h) if h.marker == marker => h.period = period,
            _ => {
                heard.insert(
                    node.to_string(),
                    Heard {
                        marker,
                        changed_at: now,
                        period,
                    },
                );
            }
        }
    }

    pub fn set_replication(&self, node: &str, r: Replication) {
        let maria = self.maria();
        let applied = r.gtid.as_deref().and_then(|g| gtid::Position::parse(maria, g));
        {
            let mut known = self.applied.lock().unwrap();
            match applied {
                // A health check reads the whole position: it replaces what waits added.
                Some(p) => {
                    known.insert(node.to_string(), p);
                }
                None => {
                    known.remove(node);
                }
            }
        }
        self.replication.lock().unwrap().insert(node.to_string(), r);
    }

    pub fn replication(&self, node: &str) -> Option<Replication> {
        self.replication.lock().unwrap().get(node).cloned()
    }

    /// The shortest heartbeat period the replicas' health checks saw.
    pub fn heartbeat_period(&self) -> Option<Duration> {
        self.heard.lock().unwrap().values().filter_map(|h| h.period).min()
    }

    /// Has `node` applied `need`, as far as the proxy knows without asking it?
    pub fn has_applied(&self, node: &str, need: &gtid::Position) -> bool {
        self.applied.lock().unwrap().get(node).is_some_and(|p| p.covers(need))
    }

    /// `node` was seen to apply `position` (a fresh read's wait returned).
    pub fn note_applied(&self, node: &str, position: &gtid::Position) {
        let mut known = self.applied.lock().unwrap();
        let joined = gtid::Position::join(known.remove(node), Some(position));
        if let Some(p) = joined {
            known.insert(node.to_string(), p);
        }
    }

    /// The primary's position, read by a health check sent at `taken`.
    pub fn note_primary_position(&self, position: gtid::Position, taken: tokio::time::Instant) {
        *self.primary_position.lock().unwrap() = Some((position, taken));
    }

    pub fn primary_position(&self) -> Option<(gtid::Position, tokio::time::Instant)> {
        self.primary_position.lock().unwrap().clone()
    }

    /// The writes all sessions of `user` share.
    pub(super) fn user_writes(&self, user: &str) -> Arc<fresh::Writes> {
        self.writes.lock().unwrap().entry(user.to_string()).or_default().clone()
    }

    /// Whether the cluster's servers are MariaDB, as their greeting says (MariaDB when
    /// not known yet: the proxy's own greeting says so too).
    pub fn maria(&self) -> bool {
        self.greeting().is_none_or(|g| g.version.contains("MariaDB"))
    }

    pub fn heard(&self, node: &str) -> Option<Heard> {
        self.heard.lock().unwrap().get(node).copied()
    }
}
