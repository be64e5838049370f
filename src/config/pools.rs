//! Pool sizes and client timeouts as the running config gives them to one pool or one
//! client: the cluster's values, overridden by `[[clusters.NAME.pools]]` entries and by
//! the user's own keys (`Config::pool_settings`, `Config::client_timeouts`), and the
//! caps on server connections (`Config::server_connection_caps`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ClusterConfig, Config};

/// `[[clusters.NAME.pools]]`: the size of the pools of a user, of a database, or of one
/// user's pools to one database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSizeConfig {
    /// The user it applies to (every user if absent).
    #[serde(default)]
    pub user: Option<String>,
    /// The database it applies to (every database if absent).
    #[serde(default)]
    pub database: Option<String>,
    pub pool_size: u32,
}

impl ClusterConfig {
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            size: self.pool_size,
            min_size: self.min_pool_size,
            idle_timeout: Duration::from_millis(self.server_idle_timeout_ms),
            lifetime: Duration::from_millis(self.server_lifetime_ms),
            checkout_timeout: Duration::from_millis(self.checkout_timeout_ms),
            reserve_size: self.reserve_pool_size,
            reserve_timeout: Duration::from_millis(self.reserve_pool_timeout_ms),
        }
    }
}

impl Config {
    /// The pool settings of `user`'s pools on `cluster`: the cluster's, with the user's
    /// own `pool_size` if it has one.
    pub fn pool_settings(&self, cluster: &str, user: &str, database: &str) -> PoolSettings {
        self.pool_settings_of(&self.clusters[cluster], user, database)
    }

    /// The same for the cluster whose settings are `c` (a session's cluster, which a
    /// reload may have removed from this config).
    pub fn pool_settings_of(&self, c: &ClusterConfig, user: &str, database: &str) -> PoolSettings {
        let mut s = c.pool_settings();
        // The most specific size: user and database, then database, then user (in
        // `[[pools]]`, then `[[users]]`), then the cluster's.
        let entry = |u: bool, d: bool| {
            c.pools
                .iter()
                .find(|p| {
                    p.user.is_some() == u
                        && p.database.is_some() == d
                        && p.user.as_deref().is_none_or(|x| x == user)
                        && p.database.as_deref().is_none_or(|x| x == database)
                })
                .map(|p| p.pool_size)
        };
        let size = entry(true, true)
            .or_else(|| entry(false, true))
            .or_else(|| entry(true, false))
            .or_else(|| self.user(user).and_then(|u| u.pool_size));
        if let Some(size) = size {
            s.size = size;
            s.min_size = s.min_size.min(size);
        }
        s
    }

    /// `max_server_connections` of `cluster` and of `user` (per node; None: no cap).
    pub fn server_connection_caps(&self, cluster: &str, user: &str) -> (Option<u32>, Option<u32>) {
        (
            self.clusters.get(cluster).and_then(|c| c.max_server_connections),
            self.user(user).and_then(|u| u.max_server_connections),
        )
    }

    /// The client timeouts of `user` on `cluster`: the user's own values, else the
    /// cluster's (None: off).
    pub fn client_timeouts(&self, cluster: &str, user: &str) -> ClientTimeouts {
        self.client_timeouts_of(&self.clusters[cluster], user)
    }

    /// The same for the cluster whose settings are `c`.
    pub fn client_timeouts_of(&self, c: &ClusterConfig, user: &str) -> ClientTimeouts {
        let u = self.user(user);
        let pick = |own: Option<u64>, cluster: u64| {
            Some(own.unwrap_or(cluster))
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
        };
        ClientTimeouts {
            client_idle: pick(u.and_then(|u| u.client_idle_timeout_ms), c.client_idle_timeout_ms),
            idle_transaction: pick(
                u.and_then(|u| u.idle_transaction_timeout_ms),
                c.idle_transaction_timeout_ms,
            ),
            query: pick(u.and_then(|u| u.query_timeout_ms), c.query_timeout_ms),
        }
    }
}

/// How long a client may stay idle, idle in a transaction, or wait on one query
/// (`Config::client_timeouts`; None: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientTimeouts {
    pub client_idle: Option<Duration>,
    pub idle_transaction: Option<Duration>,
    pub query: Option<Duration>,
}

impl ClientTimeouts {
    pub fn any(&self) -> bool {
        self.client_idle.is_some() || self.idle_transaction.is_some() || self.query.is_some()
    }
}

/// Sizes and timeouts of a cluster's server connection pools (transaction mode).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub size: u32,
    pub min_size: u32,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    pub checkout_timeout: Duration,
    /// Connections past `size` for a checkout that has waited `reserve_timeout`.
    pub reserve_size: u32,
    pub reserve_timeout: Duration,
}

impl PoolSettings {
    /// Worker `worker`'s part of these sizes among `workers`: `size` and `min_size` split
    /// as evenly as possible, the remainder to the first workers, at least one
    /// connection each (so with fewer connections than workers the total is the number
    /// of workers).
    pub fn share(mut self, worker: usize, workers: usize) -> PoolSettings {
        let workers = workers.max(1) as u32;
        let worker = worker as u32;
        let part = |total: u32| total / workers + u32::from(worker < total % workers);
        self.size = part(self.size).max(1);
        self.min_size = part(self.min_size).min(self.size);
        self.reserve_size = part(self.reserve_size);
        self
    }
}
