//! PostgreSQL: everything that speaks its wire protocol or queries its servers.
//!
//! - `protocol/`: codecs and views of the messages the proxy writes or looks inside.
//! - `classify/`: PostgreSQL's own parser (pg_query) deciding what a statement does.
//! - `tls`: the SSLRequest dance on both sides.
//! - `login`, `auth`, `auth_query`: a client's startup and authentication.
//! - `server`, `credential`: logging in to a server as the client.
//! - `greetings`: transaction-mode greetings remembered per login, to greet without a
//!   server connection.
//! - `pool`: pooled server connections and what sessions left on them.
//! - `health`: the node probe (role, WAL positions, timeline) for the shared monitor loop.
//! - `manager`: the control plane's statements (`cluster::control::Control`): fence,
//!   promote, repoint.
//! - `freshness`: the WAL-position oracle and standby replay probes behind fresh reads.
//! - `fresh`: one client's read-your-writes floor and causal tokens.
//! - `cancel`: forwarding a CancelRequest to the server connection behind a key.
//! - `digests`: recording finished statements into the query digests, and following
//!   them through a session-mode relay.
//! - `session`: a client from startup to goodbye; session mode's relay.
//! - `txn/`: transaction pooling (an I/O-free machine and its driver).

pub mod auth;
pub mod auth_query;
pub mod cancel;
pub mod classify;
pub mod credential;
pub mod digests;
pub mod fresh;
pub mod freshness;
/// Fuzz targets: compiled for the unit tests and with `--features fuzzing` (`make fuzz`),
/// not into the shipped binary.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod greetings;
pub mod handover;
pub mod health;
mod login;
pub mod manager;
pub mod notify;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod session;
pub mod tls;
pub mod txn;

/// For the admin console, which reads its client as a login does.
pub(crate) use login::{message_length, Inbox};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::cluster::topology::ClusterState;
use crate::cluster::ClusterCtx;
use crate::config::Config;
use crate::proxy::shared::{EngineState, Shared};
use auth::Verifier;

/// What PostgreSQL keeps for the whole process (in `Shared`, `PgShared::of`).
pub struct PgShared {
    verifiers: RwLock<Arc<HashMap<String, Verifier>>>,
    /// Users looked up on the servers (`[auth_query]`), cached.
    pub auth_query: auth_query::AuthQuery,
    /// Server connections, per worker thread (`pool::worker`).
    pub pools: pool::Pools,
    /// The connections that LISTEN for clients in transaction pooling.
    pub listeners: notify::Hub,
}

impl PgShared {
    /// `workers`: worker threads of the data path, among which pool sizes are shared.
    pub fn new(config: &Config, workers: usize) -> PgShared {
        PgShared {
            verifiers: RwLock::new(Arc::new(verifiers(config, None))),
            auth_query: auth_query::AuthQuery::default(),
            pools: pool::Pools::new(workers),
            listeners: notify::Hub::default(),
        }
    }

    pub fn of(shared: &Shared) -> &PgShared {
        shared.engine()
    }

    pub fn verifiers(&self) -> Arc<HashMap<String, Verifier>> {
        self.verifiers.read().unwrap().clone()
    }
}

impl EngineState for PgShared {
    /// Users' verifiers derived once per config; auth_query's cache dropped.
    fn config_changed(&self, config: &Config) {
        let mut current = self.verifiers.write().unwrap();
        *current = Arc::new(verifiers(config, Some(&current)));
        self.auth_query.clear();
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Each user's verifier; `old`: the running ones, whose learned SCRAM keys are kept
/// where the user's verifier did not change.
fn verifiers(config: &Config, old: Option<&HashMap<String, Verifier>>) -> HashMap<String, Verifier> {
    config
        .users
        .iter()
        .map(|u| {
            let mut v = Verifier::new(u);
            if let Some(o) = old.and_then(|m| m.get(&u.name)) {
                v.carry_over(o);
            }
            (u.name.clone(), v)
        })
        .collect()
}

/// What a PostgreSQL cluster keeps beside the engine-neutral `ClusterCtx` (its
/// `engine_state`).
pub struct PgCluster {
    /// Statement classification for transaction pooling and read/write splitting.
    pub classifier: classify::Classifier,
    /// Fresh reads: the primary's WAL position after a write, standbys' replay positions.
    pub freshness: freshness::Freshness,
    /// Transaction-mode greetings remembered, to greet a client without a server connection.
    pub greetings: greetings::Greetings,
    /// Transaction-mode node pools with their metric handles, found by each new client.
    pub node_pools: txn::node_pools::NodePools,
}

impl PgCluster {
    /// Must be called on the runtime where background work (fresh-read probes) runs.
    pub fn new(state: Arc<ClusterState>, read_only_functions: &[String]) -> PgCluster {
        PgCluster {
            classifier: classify::Classifier::new(read_only_functions),
            freshness: freshness::Freshness::new(state, tokio::runtime::Handle::current()),
            greetings: greetings::Greetings::default(),
            node_pools: txn::node_pools::NodePools::default(),
        }
    }

    /// The state of a cluster known to be PostgreSQL (its sessions run only there).
    pub fn of(ctx: &ClusterCtx) -> &PgCluster {
        Self::try_of(ctx).expect("a PostgreSQL cluster has a PgCluster")
    }

    pub fn try_of(ctx: &ClusterCtx) -> Option<&PgCluster> {
        ctx.engine_state.downcast_ref()
    }
}
