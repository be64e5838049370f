//! Switchyard: a high-availability proxy for replicated PostgreSQL.
//!
//! Layout (see ARCHITECTURE.md for the invariants):
//! - [`config`]: the TOML contract and its validation.
//! - [`protocol`]: wire-protocol pieces written by hand (startup packets, backend
//!   messages the proxy sends itself, the streaming relay framer).
//! - [`auth`]: client authentication to the proxy (SCRAM-SHA-256, md5, trust).
//! - [`health`]: one background checker per node, over the real protocol.
//! - [`topology`]: what the proxy believes about each node; rise/fall rules.
//! - [`routing`]: the routing policy, a pure function of a topology snapshot.
//! - [`server`]: logging in to a server, with the primary check for writes.
//! - [`session`]: one client session, startup to relay to goodbye.
//! - [`cancel`]: CancelRequest routing.
//! - [`proxy`]: wiring of listeners, monitors, reload and shutdown.
//! - [`admin`]: operators' view: admin console, HTTP endpoints, metrics, client list.
//! - [`localcluster`]: a throwaway primary + standbys from the machine's PostgreSQL
//!   binaries, for `switchyard demo` and the integration tests.

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod classify;
pub mod config;
pub mod connector;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod localcluster;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod session;
pub mod topology;
pub mod txn;
