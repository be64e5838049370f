//! What operators see and do: the admin console (`psql -d switchyard`) and the HTTP
//! endpoints (`/health`, `/status`, `/metrics`, the status page). Reads `Shared`; the
//! registries it shows live in `obs`.

pub mod console;
pub mod http;
pub mod status;

use std::sync::atomic::Ordering;

use crate::obs::clients::PoolRow;
use crate::proxy::shared::Shared;

/// Every pool: transaction-mode pools as they are, and for session-mode clusters the
/// server connections grouped by (cluster, node, database, user), where each client
/// holds exactly one (so "in use" is the number of clients and nothing idles).
pub fn pool_rows(shared: &Shared) -> Vec<PoolRow> {
    // One row per (cluster, node, database, user): the workers' pools summed.
    let mut rows: Vec<PoolRow> = Vec::new();
    for p in crate::pg::PgShared::of(shared).pools.all() {
        let k = &p.key;
        let (in_use, idle, waiting, size) = (
            p.in_use(),
            p.idle_count() as u32,
            p.waiting.load(Ordering::Relaxed),
            p.size(),
        );
        match rows
            .iter_mut()
            .find(|r| r.cluster == k.cluster && r.node == k.node && r.database == k.database && r.user == k.user)
        {
            Some(r) => {
                r.in_use += in_use;
                r.idle += idle;
                r.waiting += waiting;
                r.size += size;
            }
            None => rows.push(PoolRow {
                cluster: k.cluster.clone(),
                node: k.node.clone(),
                database: k.database.clone(),
                user: k.user.clone(),
                in_use,
                idle,
                waiting,
                size,
            }),
        }
    }
    for c in shared.clients.list() {
        if c.server_pid == 0 {
            continue; // a transaction-mode client: counted by its pools
        }
        match rows
            .iter_mut()
            .find(|r| r.cluster == c.cluster && r.node == c.node && r.database == c.database && r.user == c.user)
        {
            Some(r) => r.in_use += 1,
            None => rows.push(PoolRow {
                cluster: c.cluster.clone(),
                node: c.node.clone(),
                database: c.database.clone(),
                user: c.user.clone(),
                in_use: 1,
                idle: 0,
                waiting: 0,
                size: 0,
            }),
        }
    }
    rows
}
