//! What operators see and do: the admin console (`psql -d switchyard`) and the HTTP
//! endpoints (`/health`, `/status`, `/metrics`, `/queries`, the status page). Reads
//! `Shared`; the registries it shows live in `obs`.

pub mod console;
pub mod http;
pub mod status;
pub mod top;

use std::sync::atomic::Ordering;

use crate::obs::clients::PoolRow;
use crate::obs::digest::{Grouping, Order, Row};
use crate::proxy::shared::Shared;

/// What `/queries` and `SHOW QUERIES` are asked: every parameter optional.
#[derive(Debug, Default, serde::Deserialize)]
pub struct QueriesAsk {
    pub cluster: Option<String>,
    /// total_time (default), calls, errors, rows, mean_time, max_time, p99.
    pub order: Option<String>,
    /// Rows at most (default 100).
    pub limit: Option<usize>,
    /// node (default: a row per statement, node and route) or query (nodes summed).
    pub by: Option<String>,
}

/// The query digests asked for, or what is wrong with the question.
pub fn query_rows(shared: &Shared, ask: &QueriesAsk) -> Result<Vec<Row>, String> {
    if let Some(c) = &ask.cluster {
        if shared.cluster(c).is_none() {
            return Err(format!("no cluster named \"{c}\""));
        }
    }
    let order: Order = ask.order.as_deref().unwrap_or("total_time").parse()?;
    let by = match ask.by.as_deref().unwrap_or("node") {
        "node" => Grouping::Node,
        "query" => Grouping::Query,
        other => return Err(format!("unknown grouping {other:?}: use by=node or by=query")),
    };
    Ok(shared
        .digests
        .rows(ask.cluster.as_deref(), by, order, ask.limit.unwrap_or(100)))
}

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
            .find(|r| *r.cluster == *c.cluster && r.node == c.node && r.database == c.database && r.user == c.user)
        {
            Some(r) => r.in_use += 1,
            None => rows.push(PoolRow {
                cluster: c.cluster.to_string(),
                node: c.node.to_string(),
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
