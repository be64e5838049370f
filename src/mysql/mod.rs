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
//!   both ways, `commands`: what the relay answers itself (KILL, COM_CHANGE_USER).

mod auth;
mod commands;
pub mod health;
pub mod manager;
pub mod protocol;
mod relay;
pub mod server;
pub mod session;

use std::sync::{Arc, RwLock};

pub use server::Greeting;

/// What the proxy learned about a MySQL cluster's servers that its own greeting to
/// clients must match: the version string clients read features from, and the
/// capabilities the servers offer (the proxy never offers more).
#[derive(Default)]
pub struct ClusterInfo {
    greeting: RwLock<Option<Greeting>>,
}

impl ClusterInfo {
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
}
