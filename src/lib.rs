//! Switchyard: a high-availability proxy for replicated PostgreSQL and MySQL/MariaDB.
//!
//! Layers, each using only those before it (ARCHITECTURE.md lists them, and
//! `tests/layout.rs` checks the code against that list):
//! - [`error`], [`scram`], [`tx`], [`local_watch`], [`traceparent`]: the one error type,
//!   SCRAM's math, a session's transaction status, per-thread repeaters of watch
//!   channels, a statement's W3C trace context. No I/O.
//! - [`config`]: the TOML contract.
//! - [`tls`]: TLS toward servers, the same for both engines.
//! - [`cluster`]: the engine-neutral core: node state, the health monitor loop, the
//!   routing policy (pure), fresh-read rules, `ClusterCtx`.
//! - [`obs`]: metrics, the client list, query digests and traces.
//! - [`proxy`]: what sessions of every engine share: `Shared`, client streams, the
//!   cancel/KILL registry, the connector, pool rules, limits and timeouts.
//! - [`pg`], [`mysql`]: one folder per engine, with the same file names for the same
//!   jobs.
//! - [`ha`]: switchover, automatic failover, coordination through etcd.
//! - [`admin`]: the operators' console and HTTP endpoints.
//! - [`app`]: wiring of listeners, monitors, reload, shutdown, and what the service
//!   manager is told.
//! - [`demo`]: throwaway local clusters for `switchyard demo` and the tests.
//! - [`import`]: other poolers' configs as Switchyard's (`switchyard import`).

pub mod admin;
pub mod app;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
pub mod ha;
pub mod import;
pub mod local_watch;
pub mod mysql;
pub mod obs;
pub mod pg;
pub mod proxy;
pub mod scram;
pub mod tls;
pub mod traceparent;
pub mod tx;
pub mod upgrade;
