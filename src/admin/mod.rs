//! What operators see and do: the admin console (`psql -d switchyard`), the HTTP
//! endpoints (`/health`, `/status`, `/metrics`, the status page), the metrics registry
//! and the list of connected clients.

pub mod clients;
pub mod console;
pub mod http;
pub mod metrics;
pub mod status;
