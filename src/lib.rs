//! Switchyard: a high-availability proxy for replicated PostgreSQL.
//!
//! Layers, each using only those before it (see ARCHITECTURE.md for the invariants):
//! - [`protocol`], [`config`], [`error`], [`classify`]: wire-protocol codecs and views,
//!   the TOML contract, the one error type, the statement classifier. No I/O.
//! - [`tls`]: TLS toward servers (`server_tls`) and the plain-or-TLS stream both sides
//!   share.
//! - [`cluster`]: node state ([`cluster::topology`]), health checks
//!   ([`cluster::health`]), the routing policy ([`cluster::routing`], pure).
//! - [`backend`]: server login, connection pools, the connector.
//! - [`obs`]: metrics and the client list, fed by sessions.
//! - [`frontend`]: client authentication, cancel routing, what sessions share
//!   ([`frontend::shared`]), sessions (session-mode relay, transaction-pooling machine
//!   and driver).
//! - [`ha`]: the control plane: planned switchover, automatic failover.
//! - [`admin`]: the operators' console and HTTP endpoints.
//! - [`app`]: wiring of listeners, monitors, reload and shutdown.
//! - [`localcluster`]: a throwaway primary + standbys from the machine's PostgreSQL
//!   binaries, for `switchyard demo` and the integration tests.

pub mod admin;
pub mod app;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
pub mod ha;
pub mod local_watch;
pub mod mysql;
pub mod obs;
pub mod pg;
pub mod proxy;
pub mod scram;
pub mod tls;
pub mod tx;
