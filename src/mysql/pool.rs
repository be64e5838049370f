//! Server connections of MySQL clusters in transaction pooling
//! (`pool_mode = "transaction"`): per worker thread and per (node, user, client
//! capabilities, collation), at most `pool_size` in all (each worker has its share, as
//! for PostgreSQL), idle ones handed out newest first (`proxy::pool::IdleList`).
//!
//! The capabilities are part of the key because they change what the server sends
//! (`CLIENT_DEPRECATE_EOF`, `CLIENT_SESSION_TRACK`, `CLIENT_FOUND_ROWS`...): a
//! connection is only ever handed to a client that logged in with the same ones, so its
//! answers reach that client unchanged.
//!
//! Each connection carries the session state it has (`ConnState`: the variables set
//! on it, its database), so that a client that gets it is brought in line with one
//! statement, or none when they already match (`multiplex.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::server::ServerConn;
use crate::config::PoolSettings;
use crate::proxy::pool::{IdleList, Limits, Pooled};

/// The session state a server connection has, as the proxy followed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnState {
    /// Session variables set since login (or the last reset), by name: new value.
    pub vars: BTreeMap<String, String>,
    /// The current database (None: the one it logged in with, or not known).
    pub db: Option<String>,
}

/// What a connection's login fixed that its answers depend on: the capabilities the
/// client logged in with (`CLIENT_DEPRECATE_EOF`, `CLIENT_SESSION_TRACK`,
/// `CLIENT_FOUND_ROWS`...) and the collation; and whether it has a current database
/// (MySQL has no way back to none). A connection is only handed to a client of the
/// same class, so its answers reach that client unchanged.
pub type Class = (u32, u8, bool);

pub struct PooledConn {
    pub conn: ServerConn,
    pub state: ConnState,
    pub meta: ConnMeta,
}

/// What stays with a connection from its login to its close, also while a session
/// holds it outside the pool.
pub struct ConnMeta {
    class: Class,
    created: Instant,
    /// Its place among the pool's `pool_size` (idle or in use, every open connection
    /// holds one; dropping the connection frees it).
    _permit: OwnedSemaphorePermit,
}

impl Pooled for PooledConn {
    fn created(&self) -> Instant {
        self.meta.created
    }

    fn alive(&self) -> bool {
        self.conn.stream.idle_and_open()
    }
}

/// Per worker, node and user: the server connections of every client class.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub worker: usize,
    pub node: String,
    pub user: String,
    /// rw and ro connections never mix: a ro connection is `READ ONLY`, and a rw one
    /// must not serve the ro endpoint.
    pub endpoint: crate::cluster::routing::Endpoint,
}

pub struct Pool {
    pub key: PoolKey,
    slots: Arc<Semaphore>,
    /// `reserve_pool_size`: slots past `size` for a checkout that has waited
    /// `reserve_timeout`.
    reserve: Arc<Semaphore>,
    reserve_size: u32,
    reserve_timeout: Duration,
    idle: Mutex<HashMap<Class, IdleList<PooledConn>>>,
    /// Woken when a connection is given back.
    returned: tokio::sync::Notify,
    limits: Limits,
    pub size: u32,
    pub checkout_timeout: Duration,
}

/// A checkout: an idle connection of the client's class, or a slot to open one with.
#[allow(clippy::large_enum_variant)] // short-lived, moved once
pub enum Checkout {
    Idle(PooledConn),
    Slot(OwnedSemaphorePermit),
}

impl Pool {
    fn new(key: PoolKey, settings: PoolSettings) -> Pool {
        Pool {
            key,
            slots: Arc::new(Semaphore::new(settings.size as usize)),
            reserve: Arc::new(Semaphore::new(settings.reserve_size as usize)),
            reserve_size: settings.reserve_size,
            reserve_timeout: settings.reserve_timeout,
            idle: Mutex::new(HashMap::new()),
            returned: tokio::sync::Notify::new(),
            limits: Limits {
                idle_timeout: settings.idle_timeout,
                lifetime: settings.lifetime,
                min_size: settings.min_size as usize,
            },
            size: settings.size,
            checkout_timeout: settings.checkout_timeout,
        }
    }

    /// At once, if possible: an idle connection of `class`, else a free slot, else a
    /// slot taken from an idle connection of another class (closed).
    pub fn try_checkout(&self, class: Class) -> Option<Checkout> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        if let Some(conn) = idle.get_mut(&class).and_then(|l| l.take(now, &self.limits).0) {
            return Some(Checkout::Idle(conn));
        }
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(Checkout::Slot(permit));
        }
        // Every slot is taken; an idle connection of another class gives its up.
        for list in idle.values_mut() {
            if let (Some(other), _) = list.take(now, &self.limits) {
                drop(other);
                return self.slots.clone().try_acquire_owned().ok().map(Checkout::Slot);
            }
        }
        None
    }

    /// As `try_checkout`, waiting up to `checkout_timeout` for a connection to come
    /// back or close (None: none did); past `reserve_timeout`, a slot of the reserve
    /// too, when there is one.
    pub async fn checkout(&self, class: Class) -> Option<Checkout> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.checkout_timeout;
        let reserve_from = started + self.reserve_timeout;
        let has_reserve = self.reserve_size > 0 && reserve_from < deadline;
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            // Registered before looking, so a give-back in between is not missed.
            returned.as_mut().enable();
            if let Some(c) = self.try_checkout(class) {
                return Some(c);
            }
            let reserve = async {
                tokio::time::sleep_until(reserve_from).await;
                self.reserve.clone().acquire_owned().await
            };
            tokio::select! {
                _ = returned => {}
                permit = self.slots.clone().acquire_owned() => return permit.ok().map(Checkout::Slot),
                permit = reserve, if has_reserve => {
                    tracing::debug!(node = %self.key.node, user = %self.key.user, "a checkout waited reserve_pool_timeout_ms: a connection of the reserve pool");
                    return permit.ok().map(Checkout::Slot);
                }
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Close the oldest idle connection, of any class (room under
    /// `max_server_connections`); false if none is idle.
    pub fn close_oldest_idle(&self) -> bool {
        self.idle.lock().unwrap().values_mut().any(|l| l.close_oldest())
    }

    /// A connection opened with `permit` for a client of `class`.
    pub fn opened(&self, conn: ServerConn, state: ConnState, class: Class, permit: OwnedSemaphorePermit) -> PooledConn {
        PooledConn {
            conn,
            state,
            meta: ConnMeta {
                class,
                created: Instant::now(),
                _permit: permit,
            },
        }
    }

    /// Give a connection back (closed instead when past its lifetime).
    pub fn checkin(&self, mut conn: PooledConn) {
        conn.meta.class.2 = conn.state.db.is_some();
        let class = conn.meta.class;
        let _ = self
            .idle
            .lock()
            .unwrap()
            .entry(class)
            .or_default()
            .check_in(conn, Instant::now(), &self.limits);
        self.returned.notify_one();
    }

    /// Close idle connections past the idle timeout (but `min_pool_size`) or their
    /// lifetime, or closed by their server; every second, from the worker's pruning.
    pub fn prune(&self) {
        let now = Instant::now();
        for list in self.idle.lock().unwrap().values_mut() {
            list.prune(now, &self.limits);
        }
    }

    /// Close every idle connection (their node went down or was removed).
    pub fn clear_idle(&self) {
        for list in self.idle.lock().unwrap().values_mut() {
            list.clear();
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().values().map(IdleList::len).sum()
    }

    /// Connections open (idle or in use).
    pub fn open(&self) -> u32 {
        self.size.saturating_sub(self.slots.available_permits() as u32)
    }
}

/// A cluster's pools.
pub struct Pools {
    workers: usize,
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    pub fn new(workers: usize) -> Pools {
        Pools {
            workers: workers.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for `key`, created with its worker's share of `settings` if new.
    pub fn get(&self, key: PoolKey, settings: PoolSettings) -> Arc<Pool> {
        let settings = settings.share(key.worker, self.workers);
        self.map
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Pool::new(key, settings)))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.lock().unwrap().values().cloned().collect()
    }
}

impl crate::proxy::budget::IdleConns for Pools {
    /// (One cluster's pools: `cluster` is theirs.)
    fn close_one_idle(&self, _cluster: &str, node: &str, user: Option<&str>) -> bool {
        self.map
            .lock()
            .unwrap()
            .values()
            .any(|p| p.key.node == node && user.is_none_or(|u| p.key.user == u) && p.close_oldest_idle())
    }
}

impl Default for Pools {
    fn default() -> Pools {
        Pools::new(1)
    }
}
