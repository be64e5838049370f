//! One cluster: what the proxy believes about its nodes (`topology`), how that belief is
//! kept current (`health`), and where a request may go (`routing`, a pure function of a
//! topology snapshot). `ClusterCtx` is a cluster as sessions and operators see it.

pub mod control;
pub mod freshness;
pub mod health;
pub mod routing;
pub mod topology;

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::{ClusterConfig, Engine};
use crate::tls::ServerTls;
use topology::ClusterState;

/// One cluster as sessions and operators see it.
pub struct ClusterCtx {
    /// Shared: a transaction-pooling session's machine, every cancel target and
    /// client-list entry keep it (one allocation for the cluster, not one per client).
    pub name: Arc<str>,
    pub state: Arc<ClusterState>,
    /// This cluster's part of the running config (replaced on reload; kept after a
    /// reload removed the cluster, for the sessions that still run).
    settings: RwLock<Arc<ClusterConfig>>,
    /// Set when a reload removed the cluster: its listeners are closed, and its sessions
    /// end at their next transaction boundary (`retire`).
    retiring: watch::Sender<bool>,
    /// Clients waiting with no node yet: paused, or for the topology to offer one.
    pub waiting: AtomicU32,
    /// `PAUSE`: checked with one atomic load on the relay path; the watch is for waiting.
    paused: AtomicBool,
    pause_tx: watch::Sender<bool>,
    /// Write floors shared per (user, database) for `read_your_writes = "user"`.
    floors: Mutex<HashMap<(String, String), Arc<freshness::WriteFloor>>>,
    /// The health monitor task of each node (restarted on reload).
    pub(crate) monitors: Mutex<HashMap<String, JoinHandle<()>>>,
    /// The control plane's state: switchover and failover.
    pub ha: HaState,
    /// TLS toward the nodes (`server_tls`), replaced on reload.
    server_tls: RwLock<Arc<ServerTls>>,
    /// What the nodes speak (fixed for the life of the process).
    pub engine: Engine,
    /// What the cluster's engine keeps for itself (`pg::PgCluster`: the classifier and
    /// the fresh-read oracle; `mysql::ClusterInfo`: the servers' greeting). Typed as
    /// `Any` so that this engine-neutral module names no engine; each engine reads its
    /// own (`PgCluster::of`, `ClusterInfo::of`).
    pub engine_state: Box<dyn Any + Send + Sync>,
    /// Server logins in flight per node (`max_server_logins`).
    pub login_gates: Gates,
    /// Server connections per node, and per node and user (`max_server_connections`),
    /// keyed `node` and `node\0user`.
    pub server_budget: Gates,
}

/// Semaphores by key, each sized by the config (a reload's new size applies from then
/// on). `login_gates`: at most `max_server_logins` server logins in flight per node, the
/// rest waiting in arrival order, so that when every client reconnects at once (after a
/// failover, a restart) the new primary gets a steady stream of logins rather than
/// thousands at once. `server_budget`: `max_server_connections`.
#[derive(Default)]
pub struct Gates {
    map: Mutex<HashMap<String, (u32, Arc<tokio::sync::Semaphore>)>>,
}

impl Gates {
    /// The semaphore of `key`, sized `size`.
    pub fn of(&self, key: &str, size: u32) -> Arc<tokio::sync::Semaphore> {
        let mut map = self.map.lock().unwrap();
        let (old, gate) = map
            .entry(key.to_string())
            .or_insert_with(|| (size, Arc::new(tokio::sync::Semaphore::new(size as usize))));
        if *old < size {
            gate.add_permits((size - *old) as usize);
        } else if *old > size {
            gate.forget_permits((*old - size) as usize);
        }
        *old = size;
        gate.clone()
    }
}

/// What the control plane is doing to a cluster, and did last.
#[derive(Default)]
pub struct HaState {
    /// Held while a switchover or an automatic failover runs: never both at once.
    pub lock: tokio::sync::Mutex<()>,
    /// What the automatic failover waits for, or why it refused to act (for `/status`).
    note: Mutex<Option<String>>,
    /// The last promotion Switchyard made: when (for the cooldown), and what.
    last: Mutex<Option<(std::time::Instant, SystemTime, String)>>,
    /// Per node, what the control plane last did to it or found (an old primary
    /// fenced, rejoined, or diverged with the transactions it has), for `/status`.
    remarks: Mutex<std::collections::BTreeMap<String, String>>,
}

impl HaState {
    pub fn note(&self) -> Option<String> {
        self.note.lock().unwrap().clone()
    }

    /// Set the note; true when it changed (log only then).
    pub fn set_note(&self, note: Option<String>) -> bool {
        let mut n = self.note.lock().unwrap();
        let changed = *n != note;
        *n = note;
        changed
    }

    /// Set or clear the remark on `node`.
    pub fn remark(&self, node: &str, remark: Option<String>) {
        let mut r = self.remarks.lock().unwrap();
        match remark {
            Some(text) => r.insert(node.to_string(), text),
            None => r.remove(node),
        };
    }

    pub fn remarks(&self) -> std::collections::BTreeMap<String, String> {
        self.remarks.lock().unwrap().clone()
    }

    /// A promotion was made (`what`: "failover default -> failover1").
    pub fn promoted(&self, what: &str) {
        *self.last.lock().unwrap() = Some((std::time::Instant::now(), SystemTime::now(), what.to_string()));
    }

    /// The last promotion: when it happened, how long ago, and what it was.
    pub fn last(&self) -> Option<(std::time::Instant, SystemTime, String)> {
        self.last.lock().unwrap().clone()
    }
}

impl ClusterCtx {
    pub fn new(
        name: &str,
        state: Arc<ClusterState>,
        settings: ClusterConfig,
        server_tls: ServerTls,
        engine: Engine,
        engine_state: Box<dyn Any + Send + Sync>,
    ) -> ClusterCtx {
        ClusterCtx {
            name: Arc::from(name),
            floors: Mutex::default(),
            state,
            settings: RwLock::new(Arc::new(settings)),
            retiring: watch::channel(false).0,
            waiting: AtomicU32::new(0),
            paused: AtomicBool::new(false),
            pause_tx: watch::channel(false).0,
            monitors: Mutex::new(HashMap::new()),
            ha: HaState::default(),
            server_tls: RwLock::new(Arc::new(server_tls)),
            engine,
            engine_state,
            login_gates: Gates::default(),
            server_budget: Gates::default(),
        }
    }

    /// This cluster's settings in the running config (or the last it had, once a reload
    /// removed it).
    pub fn settings(&self) -> Arc<ClusterConfig> {
        self.settings.read().unwrap().clone()
    }

    pub fn set_settings(&self, settings: ClusterConfig) {
        *self.settings.write().unwrap() = Arc::new(settings);
    }

    /// A reload removed this cluster: its sessions end at their next transaction
    /// boundary (those waiting on `retirement` are told now).
    pub fn retire(&self) {
        self.retiring.send_replace(true);
        info!(cluster = %self.name, "cluster removed from the config: its clients are ended at their next transaction boundary");
    }

    pub fn retiring(&self) -> bool {
        *self.retiring.borrow()
    }

    /// Resolves once a reload removed this cluster (`retire`).
    pub async fn retirement(&self) {
        let mut rx = self.retiring.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// How to speak TLS to this cluster's nodes now.
    pub fn server_tls(&self) -> Arc<ServerTls> {
        self.server_tls.read().unwrap().clone()
    }

    pub fn set_server_tls(&self, tls: ServerTls) {
        *self.server_tls.write().unwrap() = Arc::new(tls);
    }

    /// The write floor every connection of `user` to `database` shares.
    pub fn shared_floor(&self, user: &str, database: &str) -> Arc<freshness::WriteFloor> {
        self.floors
            .lock()
            .unwrap()
            .entry((user.to_string(), database.to_string()))
            .or_default()
            .clone()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
        self.pause_tx.send_replace(paused);
        let what = if paused { "paused" } else { "resumed" };
        self.state
            .push_event("-", String::new(), what.into(), "operator command".into());
        info!(cluster = %self.name, "cluster {what}");
    }

    /// Wait until the cluster is not paused.
    pub async fn wait_unpaused(&self) {
        let mut rx = self.pause_tx.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
    }

    /// Set or clear `fenced` on a node (a switchover made it read-only).
    pub fn set_fenced(&self, node: &str, fenced: bool) {
        self.state.update(|snap| {
            if let Some(i) = snap.index(node) {
                snap.nodes[i].fenced = fenced;
            }
            true
        });
    }

    /// Set or clear `drained` on a node; false if there is no such node.
    pub fn set_drained(&self, node: &str, drained: bool) -> bool {
        let mut found = false;
        self.state.update(|snap| {
            if let Some(i) = snap.index(node) {
                found = true;
                snap.nodes[i].drained = drained;
            }
            false
        });
        if found {
            let what = if drained { "drained" } else { "undrained" };
            self.state
                .push_event(node, String::new(), what.into(), "operator command".into());
            info!(cluster = %self.name, node = %node, "node {what}");
        }
        found
    }
}
