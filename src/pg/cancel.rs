//! Forwarding a client's CancelRequest (a fresh connection carrying a pid and a key) to
//! the server connection its session holds now, found in the shared registry
//! (`proxy::cancel`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use crate::pg::protocol::messages::cancel_request;
use crate::proxy::cancel::CancelRegistry;
use crate::tls::{write_flush, ServerTls};

/// Forward a client's CancelRequest to the server its session is on. Unknown keys
/// are dropped silently, as PostgreSQL does (no answer is ever sent to a cancel).
/// It goes over TLS as the cluster's `server_tls` says (`tls`: the cluster's, by
/// name): a cancel key sent in the clear could be replayed by anyone who saw it.
pub async fn forward(registry: &CancelRegistry, pid: i32, key: i32, tls: impl Fn(&str) -> Option<Arc<ServerTls>>) {
    let Some(t) = registry.pg_target(pid, key) else {
        debug!(pid, "cancel request for an unknown session ignored");
        return;
    };
    let tls = tls(&t.cluster).unwrap_or_else(|| Arc::new(ServerTls::disabled()));
    let send = async {
        let mut s = tls.connect(&t.addr).await?;
        write_flush(&mut s, &cancel_request(t.server_id, t.server_key)).await?;
        s.shutdown().await
    };
    match tokio::time::timeout(Duration::from_secs(5), send).await {
        Ok(Ok(())) => {
            info!(server = %t.addr, server_pid = t.server_id, "cancel request forwarded")
        }
        Ok(Err(e)) => info!(server = %t.addr, error = %e, "could not forward cancel request"),
        Err(_) => info!(server = %t.addr, "cancel request timed out"),
    }
}
