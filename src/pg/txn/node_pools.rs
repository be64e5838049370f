//! The node pools transaction-pooling sessions draw from, each with the metric handles
//! its transactions count into, kept per cluster (`PgCluster::node_pools`).
//!
//! Why kept: building one takes a pool key and three sets of metric labels (about 16
//! allocations and 7,700 instructions under `bench/instructions --connect`), and every
//! new client did it on its first transaction. Applications that connect per request
//! (Django with `CONN_MAX_AGE = 0`) have a new client per request; here they find the
//! node pool with one hash and one lock.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::cluster::routing::Endpoint;
use crate::cluster::topology::{NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::obs::metrics::{RoutedLabels, TransactionLabels};
use crate::pg::pool::{Pool, PoolKey};
use crate::proxy::shared::Shared;

/// A node's pool for one user and database on one worker, the routed-queries counter and
/// transaction histogram of its clients, and the node's name. A session keeps the ones
/// it used; its held connection shares one through an `Arc`: a checkout and check-in
/// touch one reference count, not one per field.
pub(super) struct NodePool {
    pub pool: Arc<Pool>,
    pub queries: Counter,
    /// The client's transactions on this node (`switchyard_transaction_duration_seconds`).
    pub transactions: Histogram,
    pub node: Arc<str>,
    /// The node's role when this was made: the label its routed queries are counted
    /// under (after a failover, sessions find the one of the new role).
    role: Role,
    /// The listener the clients came in on (a label of the transactions).
    listener: Endpoint,
}

/// Who asks for a node pool: the client's user and database, its listener.
pub(super) struct Asker<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub listener: Endpoint,
}

impl NodePool {
    fn build(cluster: &ClusterCtx, shared: &Shared, node: &NodeState, who: &Asker<'_>, worker: usize) -> NodePool {
        let key = PoolKey {
            cluster: cluster.name.to_string(),
            node: node.name.clone(),
            addr: node.addr.clone(),
            database: who.database.to_string(),
            user: who.user.to_string(),
            worker,
        };
        let settings = shared
            .config()
            .pool_settings_of(&cluster.settings(), who.user, who.database);
        let labels = RoutedLabels {
            cluster: cluster.name.to_string(),
            node: node.name.clone(),
            role: node.role.to_string(),
        };
        let transactions = TransactionLabels {
            cluster: cluster.name.to_string(),
            endpoint: who.listener.to_string(),
            node: node.name.clone(),
        };
        NodePool {
            pool: crate::pg::PgShared::of(shared).pools.get(key, settings),
            queries: shared.metrics.queries_routed.get_or_create(&labels).clone(),
            transactions: shared.metrics.transaction_seconds.get_or_create(&transactions).clone(),
            node: node.name.as_str().into(),
            role: node.role,
            listener: who.listener,
        }
    }

    fn is_for(&self, node: &NodeState, who: &Asker<'_>, worker: usize) -> bool {
        let k = &self.pool.key;
        k.node == node.name
            && k.addr == node.addr
            && k.user == who.user
            && k.database == who.database
            && k.worker == worker
            && self.role == node.role
            && self.listener == who.listener
    }
}

/// A cluster's node pools, by a hash of what tells them apart. They live as long as the
/// cluster's context: a reload that removes the cluster drops them with it, and its pools
/// (`Pools::forget_cluster`); one that changes pool settings changes the `Pool`s these
/// share.
pub struct NodePools {
    hasher: foldhash::fast::RandomState,
    by_hash: Mutex<HashMap<u64, Vec<Arc<NodePool>>>>,
}

impl Default for NodePools {
    fn default() -> Self {
        NodePools {
            hasher: foldhash::fast::RandomState::default(),
            by_hash: Mutex::new(HashMap::new()),
        }
    }
}

impl NodePools {
    /// The node pool of `who` on `node`, for this worker thread: found, or made once.
    pub(super) fn get(
        &self,
        cluster: &ClusterCtx,
        shared: &Shared,
        node: &NodeState,
        who: &Asker<'_>,
    ) -> Arc<NodePool> {
        let worker = crate::pg::pool::worker();
        // Role and listener are compared, not hashed: they rarely differ between entries.
        let hash = self
            .hasher
            .hash_one((&node.name, &node.addr, who.user, who.database, worker));
        if let Some(found) = self
            .by_hash
            .lock()
            .unwrap()
            .get(&hash)
            .and_then(|v| v.iter().find(|p| p.is_for(node, who, worker)))
        {
            return found.clone();
        }
        // Made outside the lock (it takes the pools' and the metrics' locks); two
        // sessions that race make the same thing twice, and the first one kept wins.
        let made = Arc::new(NodePool::build(cluster, shared, node, who, worker));
        let mut by_hash = self.by_hash.lock().unwrap();
        let entries = by_hash.entry(hash).or_default();
        if let Some(found) = entries.iter().find(|p| p.is_for(node, who, worker)) {
            return found.clone();
        }
        entries.push(made.clone());
        made
    }
}
