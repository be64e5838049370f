//! Server connection pools for transaction pooling: one per (node, database, user).
//! A semaphore caps connections at `pool_size`; idle connections are kept LIFO (the
//! warmest first), checked for liveness before reuse, and retired after
//! `server_idle_timeout_ms` idle or `server_lifetime_ms` of age (the rules: the
//! engine-neutral `proxy::pool::IdleList`, tested with time as an argument).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

pub use crate::config::PoolSettings;
use crate::pg::credential::Credential;
use crate::pg::protocol::tags::BackendTag;
use crate::pg::protocol::views;
use crate::pg::server::{self, ServerConn, ServerError};
use crate::proxy::pool::{Dropped, IdleList, Limits, Pooled};
use crate::tls::ServerTls;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub cluster: String,
    pub node: String,
    pub addr: String,
    pub database: String,
    pub user: String,
    /// The worker thread whose sessions use the pool (see `worker`).
    pub worker: usize,
}

pub use crate::proxy::pool::{set_worker, worker};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection for user \"{user}\" to database \"{database}\" on node \"{node}\" became free within {waited_ms} ms (pool_size = {size}, all in use, and the reserve too if any); retry, or raise pool_size / reserve_pool_size / checkout_timeout_ms")]
    Exhausted {
        user: String,
        database: String,
        node: String,
        waited_ms: u64,
        size: u32,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
}

pub struct Pool {
    pub key: PoolKey,
    permits: Arc<Semaphore>,
    /// `reserve_pool_size`: taken only by a checkout that waited `reserve_timeout`.
    reserve: Arc<Semaphore>,
    /// One lock for what a checkout and a check-in read and change together: one
    /// lock and unlock each way rather than three (`bench/instructions`).
    inner: Mutex<Inner>,
    pub waiting: AtomicU32,
    pub open: AtomicU32,
    warming: std::sync::atomic::AtomicBool,
}

struct Inner {
    settings: PoolSettings,
    idle: IdleList<PooledConn>,
    /// What the pool's user logs in with, learned at the first checkout, so
    /// `min_pool_size` connections can be opened ahead of demand.
    credential: Option<Credential>,
}

impl Inner {
    /// Keep the latest client's credential (a password or verifier changed by a reload)
    /// for the connections opened ahead of demand; compared first so that the hot path
    /// copies nothing.
    fn remember(&mut self, credential: &Credential) {
        if self.credential.as_ref() != Some(credential) {
            self.credential = Some(credential.clone());
        }
    }
}

pub use crate::pg::txn::conn::ConnState;

pub use crate::proxy::budget::{Budget, BudgetAsk};

/// A server connection lent to one client for a transaction, boxed: it moves at every
/// checkout and check-in (the idle list, the checkout's result, the session's hold, back),
/// and the box moves as a pointer where the connection itself (its stream, buffers and
/// settings maps) was copied with `memcpy` at each step, about 1,000 instructions per
/// transaction under `bench/instructions`. It is allocated once per server login.
pub type PooledConn = Box<PooledServer>;

/// What `PooledConn` points to.
pub struct PooledServer {
    pub conn: ServerConn,
    pub state: ConnState,
    created: Instant,
    pool: Arc<Pool>,
    _permit: Option<OwnedSemaphorePermit>,
    _budget: Budget,
    /// Set when the connection must not be reused (protocol state unknown).
    pub broken: bool,
}

impl PooledServer {
    fn new(conn: ServerConn, pool: Arc<Pool>, permit: Option<OwnedSemaphorePermit>, budget: Budget) -> PooledConn {
        let mut state = ConnState {
            pid: conn.pid,
            ..ConnState::default()
        };
        let mut rest = &conn.startup_messages[..];
        while let Some((tag, len)) = views::header(rest) {
            let Some(msg) = rest.get(..len as usize + 1) else { break };
            if BackendTag::of(tag) == BackendTag::ParameterStatus {
                if let Ok(s) = views::ParameterStatus::decode(&msg[5..]) {
                    state.report(s);
                }
            }
            rest = &rest[msg.len()..];
        }
        pool.open.fetch_add(1, Ordering::Relaxed);
        Box::new(PooledServer {
            conn,
            state,
            created: Instant::now(),
            pool,
            _permit: permit,
            _budget: budget,
            broken: false,
        })
    }
}

impl Drop for PooledServer {
    fn drop(&mut self) {
        self.pool.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    fn new(key: PoolKey, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            permits: Arc::new(Semaphore::new(settings.size as usize)),
            reserve: Arc::new(Semaphore::new(settings.reserve_size as usize)),
            inner: Mutex::new(Inner {
                settings,
                idle: IdleList::default(),
                credential: None,
            }),
            waiting: AtomicU32::new(0),
            open: AtomicU32::new(0),
            warming: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn size(&self) -> u32 {
        self.inner.lock().unwrap().settings.size
    }

    pub fn idle_count(&self) -> usize {
        self.inner.lock().unwrap().idle.len()
    }

    pub fn in_use(&self) -> u32 {
        self.open
            .load(Ordering::Relaxed)
            .saturating_sub(self.idle_count() as u32)
    }

    /// Resize on reload: the semaphore grows at once, shrinks as connections come back.
    fn apply(&self, new: PoolSettings) {
        let s = &mut self.inner.lock().unwrap().settings;
        for (sem, old, new) in [
            (&self.permits, s.size, new.size),
            (&self.reserve, s.reserve_size, new.reserve_size),
        ] {
            if new > old {
                sem.add_permits((new - old) as usize);
            } else if new < old {
                sem.forget_permits((old - new) as usize);
            }
        }
        *s = new;
    }

    /// Borrow a connection: an idle live one, else a new login. Waits at most
    /// `checkout_timeout` for a free slot.
    pub async fn checkout(
        self: &Arc<Self>,
        credential: &Credential,
        require_primary: bool,
        // Asked only when a new connection is opened (not on the hot path).
        tls: impl FnOnce() -> Arc<ServerTls>,
        login_timeout: Duration,
        // The node's logins in flight (`ClusterCtx::login_gates`) and their limit, for
        // a new login.
        gate: impl FnOnce() -> (Arc<Semaphore>, u32),
        budget: BudgetAsk<'_>,
    ) -> Result<PooledConn, PoolError> {
        let settings = {
            let mut inner = self.inner.lock().unwrap();
            inner.remember(credential);
            inner.settings
        };
        let until = tokio::time::Instant::now() + settings.checkout_timeout;
        // A free slot is taken at once, without a timer: the common case.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let permit = tokio::time::timeout(settings.checkout_timeout, self.wait_for_permit(&settings)).await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                match permit {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(PoolError::Exhausted {
                            user: self.key.user.clone(),
                            database: self.key.database.clone(),
                            node: self.key.node.clone(),
                            waited_ms: started.elapsed().as_millis() as u64,
                            size: settings.size,
                        })
                    }
                }
            }
        };
        let permit = match self.take_idle(permit, &mut self.inner.lock().unwrap(), Instant::now()) {
            Ok(conn) => return Ok(conn),
            Err(permit) => permit,
        };
        let login = server::Login {
            user: &self.key.user,
            credential,
            database: &self.key.database,
            params: &[],
            require_primary,
            tls: &tls(),
        };
        // Boxed: a login's state is large and lives only while it runs, and a future
        // that held it inline would be as large in every idle client's session.
        let budget = Box::pin(budget.take(until))
            .await
            .map_err(|f| ServerError::Budget(f.0))?;
        let (gate, max) = gate();
        let conn = Box::pin(server::connect_gated(
            &self.key.addr,
            &login,
            login_timeout,
            (&gate, max),
            until,
        ))
        .await?;
        Ok(PooledServer::new(conn, self.clone(), Some(permit), budget))
    }

    /// Wait for a slot in arrival order (the semaphore is fair); past
    /// `reserve_timeout`, a slot of the reserve too when there is one.
    async fn wait_for_permit(
        &self,
        settings: &PoolSettings,
    ) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
        let main = self.permits.clone().acquire_owned();
        tokio::pin!(main);
        if settings.reserve_size == 0 {
            return main.await;
        }
        if let Ok(p) = tokio::time::timeout(settings.reserve_timeout, &mut main).await {
            return p;
        }
        let reserve = self.reserve.clone().acquire_owned();
        let p = tokio::select! {
            p = &mut main => p,
            p = reserve => p,
        };
        if p.is_ok() {
            debug!(node = %self.key.node, user = %self.key.user, database = %self.key.database, "a checkout waited reserve_pool_timeout_ms: a connection of the reserve pool");
        }
        p
    }

    /// An idle connection now, if a slot is free and one is idle and sound: the common
    /// case of transaction mode, taken without an await (`checkout` does the rest).
    pub fn checkout_idle(&self, credential: &Credential, now: Instant) -> Option<PooledConn> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let mut inner = self.inner.lock().unwrap();
        inner.remember(credential);
        self.take_idle(permit, &mut inner, now).ok()
    }

    /// The newest sound idle connection (`IdleList::take`), holding `permit`; the
    /// permit back if none.
    fn take_idle(
        &self,
        permit: OwnedSemaphorePermit,
        inner: &mut Inner,
        now: Instant,
    ) -> Result<PooledConn, OwnedSemaphorePermit> {
        let (conn, dropped) = inner.idle.take(now, &limits(&inner.settings));
        log_dropped(&self.key, dropped);
        match conn {
            Some(mut conn) => {
                conn._permit = Some(permit);
                Ok(conn)
            }
            None => Err(permit),
        }
    }

    /// Take a connection back. Broken or expired ones are closed.
    pub fn checkin(&self, mut conn: PooledConn, now: Instant) {
        if conn.broken {
            return;
        }
        // Release the slot before parking the connection, so a waiter can take it.
        conn._permit = None;
        let refused = {
            let inner = &mut *self.inner.lock().unwrap();
            inner.idle.check_in(conn, now, &limits(&inner.settings))
        };
        // One past its lifetime comes back, to be dropped (closed) outside the lock.
        drop(refused);
    }

    /// Close idle connections past their idle timeout or lifetime, or dead (called
    /// periodically).
    pub fn prune(&self) {
        let dropped = {
            let inner = &mut *self.inner.lock().unwrap();
            inner.idle.prune(Instant::now(), &limits(&inner.settings))
        };
        log_dropped(&self.key, dropped);
    }

    /// Open connections up to `min_pool_size` in the background (called periodically
    /// for pools of nodes that are up). One at a time, so a slow server is not flooded.
    /// With `max_server_connections` set (`caps`), only while its budget has room: warm
    /// connections never crowd out ones that serve clients.
    pub fn prewarm(self: &Arc<Self>, tls: Arc<ServerTls>, login_timeout: Duration, budget: Option<Budget>) {
        let (s, credential) = {
            let inner = self.inner.lock().unwrap();
            (inner.settings, inner.credential.clone())
        };
        let Some(credential) = credential else {
            return;
        };
        if self.open.load(Ordering::Relaxed) >= s.min_size || self.warming.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let login = server::Login {
                user: &pool.key.user,
                credential: &credential,
                database: &pool.key.database,
                params: &[],
                require_primary: false,
                tls: &tls,
            };
            if let Ok(conn) = server::connect(&pool.key.addr, &login, login_timeout).await {
                let conn = PooledServer::new(conn, pool.clone(), None, budget.unwrap_or_default());
                let refused = {
                    let inner = &mut *pool.inner.lock().unwrap();
                    inner.idle.check_in(conn, Instant::now(), &limits(&inner.settings))
                };
                drop(refused);
            }
            pool.warming.store(false, Ordering::Release);
        });
    }

    /// Drop every idle connection (the node went down or was removed); how many.
    pub fn clear_idle(&self) -> usize {
        // Closed outside the lock.
        let gone = std::mem::take(&mut self.inner.lock().unwrap().idle);
        gone.len()
    }
}

impl Pooled for PooledConn {
    fn created(&self) -> Instant {
        self.created
    }

    /// A pooled connection whose server went away has EOF (or an error) waiting; a
    /// healthy idle one has nothing to read.
    fn alive(&self) -> bool {
        self.conn.stream.idle_and_open()
    }
}

fn limits(s: &PoolSettings) -> Limits {
    Limits {
        idle_timeout: s.idle_timeout,
        lifetime: s.lifetime,
        min_size: s.min_size as usize,
    }
}

fn log_dropped(key: &PoolKey, dropped: Dropped) {
    if dropped.expired > 0 {
        debug!(node = %key.node, count = dropped.expired, "retiring old idle server connections");
    }
    if dropped.dead > 0 {
        debug!(node = %key.node, count = dropped.dead, "discarding dead pooled server connections");
    }
}

/// All pools of the proxy.
pub struct Pools {
    /// Worker threads the pool sizes are shared among.
    workers: usize,
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Default for Pools {
    fn default() -> Self {
        Pools::new(1)
    }
}

impl Pools {
    pub fn new(workers: usize) -> Pools {
        Pools {
            workers: workers.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for `key` (its `worker` is the caller's), created with its worker's
    /// share of `settings` if new.
    pub fn get(&self, key: PoolKey, settings: PoolSettings) -> Arc<Pool> {
        let settings = settings.share(key.worker, self.workers);
        let mut map = self.map.lock().unwrap();
        map.entry(key.clone())
            .or_insert_with(|| Pool::new(key, settings))
            .clone()
    }

    /// A reload removed `cluster`: its pools are dropped, their idle connections closed
    /// (those in use close as their sessions end). Returns the idle ones closed.
    pub fn forget_cluster(&self, cluster: &str) -> usize {
        let mut gone = Vec::new();
        self.map.lock().unwrap().retain(|k, p| {
            let keep = k.cluster != cluster;
            if !keep {
                gone.push(p.clone());
            }
            keep
        });
        gone.iter().map(|p| p.clear_idle()).sum()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.map.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Close one idle connection of a pool of `cluster` on `node` (of `user`'s pools if
    /// given), the oldest of the pool that has one: room under
    /// `max_server_connections`. False if none is idle.
    pub fn close_one_idle(&self, cluster: &str, node: &str, user: Option<&str>) -> bool {
        self.map.lock().unwrap().values().any(|p| {
            p.key.cluster == cluster
                && p.key.node == node
                && user.is_none_or(|u| p.key.user == u)
                && p.inner.lock().unwrap().idle.close_oldest()
        })
    }

    /// Close the idle connections of every pool to `database`, before a statement that
    /// needs it free of other sessions (`CREATE DATABASE ... TEMPLATE`, `DROP DATABASE`).
    /// Connections in use stay: if one is still there, the server's error stands.
    pub fn close_idle_to(&self, database: &str) -> usize {
        let mut closed = 0;
        for p in self.map.lock().unwrap().values() {
            if p.key.database == database {
                closed += p.clear_idle();
            }
        }
        closed
    }

    /// Apply new settings to every pool of a cluster (reload): `settings` of each
    /// pool's user and database.
    pub fn apply(&self, cluster: &str, settings: impl Fn(&str, &str) -> PoolSettings) {
        for p in self.map.lock().unwrap().values() {
            if p.key.cluster == cluster {
                p.apply(settings(&p.key.user, &p.key.database).share(p.key.worker, self.workers));
            }
        }
    }
}

impl crate::proxy::budget::IdleConns for Pools {
    fn close_one_idle(&self, cluster: &str, node: &str, user: Option<&str>) -> bool {
        Pools::close_one_idle(self, cluster, node, user)
    }
}
