//! Who is connected: one entry per client session in the relay phase, for
//! `SHOW CLIENTS` / `SHOW SERVERS` / pools, graceful shutdown and PAUSE.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::cluster::routing::Endpoint;
use crate::tx::TxStatus;

pub struct ClientInfo {
    pub id: u64,
    /// The cluster's own name, shared (`ClusterCtx::name`).
    pub cluster: std::sync::Arc<str>,
    pub endpoint: Endpoint,
    pub peer: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub connected_at: SystemTime,
    /// Its server node, or what it is served by ("(transaction pool)"): no
    /// allocation per client for the fixed ones.
    pub node: std::borrow::Cow<'static, str>,
    pub server_addr: String,
    pub server_pid: i32,
    /// Transaction status of the last ReadyForQuery (`TxStatus::byte`).
    status: AtomicU8,
    /// Requests (Query, Sync, FunctionCall) sent and not yet answered by ReadyForQuery.
    pending: AtomicI32,
    /// ReadyForQuery messages seen: progress, for the client timeouts.
    answered: AtomicU64,
}

impl ClientInfo {
    /// Between transactions with nothing in flight: the moment a session can be paused
    /// or closed without losing work.
    pub fn idle(&self) -> bool {
        self.pending.load(Ordering::Acquire) <= 0 && TxStatus::of(self.status.load(Ordering::Acquire)) == TxStatus::Idle
    }

    pub fn state(&self) -> &'static str {
        if self.pending.load(Ordering::Relaxed) > 0 {
            return "active";
        }
        match TxStatus::of(self.status.load(Ordering::Relaxed)) {
            TxStatus::InTransaction => "idle in transaction",
            TxStatus::Failed => "idle in failed transaction",
            TxStatus::Idle => "idle",
        }
    }

    pub fn sent_requests(&self, n: i32) {
        if n > 0 {
            self.pending.fetch_add(n, Ordering::AcqRel);
        }
    }

    pub fn ready_for_query(&self, status: TxStatus) {
        self.status.store(status.byte(), Ordering::Release);
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// (requests in flight, inside a transaction, answers so far): what the client
    /// timeouts look at.
    pub fn activity(&self) -> (bool, bool, u64) {
        (
            self.pending.load(Ordering::Acquire) > 0,
            TxStatus::of(self.status.load(Ordering::Acquire)) != TxStatus::Idle,
            self.answered.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<ClientInfo>>>,
}

/// Removes the entry when the session ends, however it ends.
pub struct ClientGuard {
    clients: Arc<Clients>,
    pub info: Arc<ClientInfo>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.clients.map.lock().unwrap().remove(&self.info.id);
    }
}

pub struct NewClient {
    pub cluster: std::sync::Arc<str>,
    pub endpoint: Endpoint,
    pub peer: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
    /// Its server node, or what it is served by ("(transaction pool)"): no
    /// allocation per client for the fixed ones.
    pub node: std::borrow::Cow<'static, str>,
    pub server_addr: String,
    pub server_pid: i32,
}

impl Clients {
    pub fn add(self: &Arc<Self>, c: NewClient) -> ClientGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            cluster: c.cluster,
            endpoint: c.endpoint,
            peer: c.peer,
            user: c.user,
            database: c.database,
            application_name: c.application_name,
            connected_at: SystemTime::now(),
            node: c.node,
            server_addr: c.server_addr,
            server_pid: c.server_pid,
            status: AtomicU8::new(TxStatus::Idle.byte()),
            pending: AtomicI32::new(0),
            answered: AtomicU64::new(0),
        });
        self.map.lock().unwrap().insert(id, info.clone());
        ClientGuard {
            clients: self.clone(),
            info,
        }
    }

    /// Every client, oldest first.
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.map.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One pool as operators see it (SHOW POOLS, /status, /metrics).
pub struct PoolRow {
    pub cluster: String,
    pub node: String,
    pub database: String,
    pub user: String,
    pub in_use: u32,
    pub idle: u32,
    pub waiting: u32,
    /// The pool's size, all worker threads' shares together (0: session mode, no pool).
    pub size: u32,
}
