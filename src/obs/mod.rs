//! Observability that sessions feed and operators read: Prometheus metrics and the list
//! of connected clients, and the query digests.

pub mod clients;
pub mod digest;
pub mod metrics;
pub mod trace;
