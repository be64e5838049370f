//! Observability that sessions feed and operators read: Prometheus metrics and the list
//! of connected clients.

pub mod clients;
pub mod metrics;
