//! Caps on server connections and logins, for both engines: `max_server_connections`
//! (per node, all pools and sessions together, and per node and user) and
//! `max_server_logins` (logins in flight per node). The semaphores live in
//! `ClusterCtx::server_budget` and `ClusterCtx::login_gates`; what an engine adds is a
//! way to close one of its idle pooled connections to make room (`IdleConns`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::cluster::ClusterCtx;

/// An engine's pools, asked to close one idle connection to `node` (of `user` when
/// given) so that another can be opened under `max_server_connections`.
pub trait IdleConns: Sync {
    /// True when one was closed.
    fn close_one_idle(&self, cluster: &str, node: &str, user: Option<&str>) -> bool;
}

/// The cap that was full until the wait's bound.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this node already has {0} server connections from Switchyard (max_server_connections), all in use; retry, or raise max_server_connections")]
pub struct Full(pub u32);

/// The login gate stayed full until the wait's bound.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{0} server logins to this node were already in flight until the wait's bound (max_server_logins); retry, or raise max_server_logins")]
pub struct Queued(pub u32);

/// A server connection's place under `max_server_connections` (the cluster's and the
/// user's, per node), held for the connection's whole life, idle or not.
#[derive(Default)]
pub struct Budget {
    _node: Option<OwnedSemaphorePermit>,
    _user: Option<OwnedSemaphorePermit>,
}

/// What taking a `Budget` needs: where, the caps, and the pools whose idle connections
/// may be closed to make room.
pub struct BudgetAsk<'a> {
    pub cluster: &'a ClusterCtx,
    pub idle: &'a (dyn IdleConns + Sync),
    pub node: &'a str,
    pub user: &'a str,
    /// (cluster's, user's) `max_server_connections`.
    pub caps: (Option<u32>, Option<u32>),
}

impl BudgetAsk<'_> {
    fn user_key(&self) -> String {
        format!("{}\0{}", self.node, self.user)
    }

    /// A place now if there is room, closing nothing (to open a connection ahead of
    /// demand).
    pub fn try_take(&self) -> Option<Budget> {
        let gates = &self.cluster.server_budget;
        let take = |key: &str, cap: Option<u32>| match cap {
            None => Some(None),
            Some(n) => gates.of(key, n).try_acquire_owned().ok().map(Some),
        };
        Some(Budget {
            _node: take(self.node, self.caps.0)?,
            _user: take(&self.user_key(), self.caps.1)?,
        })
    }

    /// A place for one more server connection. When the budget is full, idle pooled
    /// connections of the node (of the user, when the user's budget is the full one)
    /// are closed, oldest first, to make room; else it waits for a connection to close
    /// (looking every 50 ms), until `until`.
    pub async fn take(&self, until: tokio::time::Instant) -> Result<Budget, Full> {
        if self.caps == (None, None) {
            return Ok(Budget::default());
        }
        let gates = &self.cluster.server_budget;
        let node = self.caps.0.map(|n| (gates.of(self.node, n), n));
        let user = self.caps.1.map(|n| (gates.of(&self.user_key(), n), n));
        loop {
            let take = |g: &Option<(Arc<Semaphore>, u32)>| match g {
                None => Ok(None),
                Some((s, n)) => s.clone().try_acquire_owned().map(Some).map_err(|_| *n),
            };
            let full = match (take(&node), take(&user)) {
                (Ok(a), Ok(b)) => return Ok(Budget { _node: a, _user: b }),
                (Err(n), _) => (n, None),
                (_, Err(n)) => (n, Some(self.user)),
            };
            if self.idle.close_one_idle(&self.cluster.name, self.node, full.1) {
                continue;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return Err(Full(full.0));
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
        }
    }
}

impl BudgetAsk<'_> {
    /// The connection `budget` belongs to now serves `self.user` (MySQL's
    /// `COM_CHANGE_USER`): its place under the user's cap moves to that user, waiting for
    /// room as `take` does; its place under the node's cap stays.
    pub async fn move_user(&self, budget: &mut Budget, until: tokio::time::Instant) -> Result<(), Full> {
        let Some(cap) = self.caps.1 else {
            budget._user = None;
            return Ok(());
        };
        let gate = self.cluster.server_budget.of(&self.user_key(), cap);
        loop {
            if let Ok(p) = gate.clone().try_acquire_owned() {
                budget._user = Some(p);
                return Ok(());
            }
            if self.idle.close_one_idle(&self.cluster.name, self.node, Some(self.user)) {
                continue;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return Err(Full(cap));
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
        }
    }
}

/// A place among `gate`'s logins in flight (`max`: its size), waiting in arrival order
/// until `until`.
pub async fn login_place(
    gate: &Semaphore,
    max: u32,
    until: tokio::time::Instant,
) -> Result<SemaphorePermit<'_>, Queued> {
    match gate.try_acquire() {
        Ok(p) => Ok(p),
        Err(_) => match tokio::time::timeout_at(until, gate.acquire()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Queued(max)),
        },
    }
}
