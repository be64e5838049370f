//! The `/status` document: every cluster, node, pool and recent event. The same types
//! are read back by `switchyard status` to print a table.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::admin::pool_rows;
use crate::cluster::routing;
use crate::cluster::topology::{ClusterSnapshot, Event};
use crate::proxy::shared::Shared;

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The git commit it was built from ("unknown" outside a git checkout).
    #[serde(default)]
    pub commit: String,
    /// This process.
    #[serde(default)]
    pub pid: u32,
    pub uptime_s: u64,
    /// With `[coordination]`: this instance, the leader, the live instances.
    #[serde(default)]
    pub coordination: Option<CoordinationStatus>,
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LimitsStatus {
    pub clients: u32,
    pub max_clients: Option<u32>,
    pub proxy_clients: u32,
    pub proxy_max_clients: u32,
    /// Refusals (`proxy_max_clients`, `cluster_max_clients`, `user_max_clients`,
    /// `file_descriptors`) and timeouts (`client_idle`, `idle_transaction`, `query`).
    pub counts: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CoordinationStatus {
    pub instance: String,
    pub leader: Option<String>,
    pub is_leader: bool,
    pub instances: Vec<String>,
    /// Why this instance routes no writes (out of touch with etcd), if so.
    pub cut_off: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    /// `postgresql` or `mysql`. For MySQL clusters a node's `lag_bytes` counts
    /// transactions (GTID positions), not bytes.
    #[serde(default)]
    pub engine: String,
    pub listen_rw: Option<String>,
    pub listen_ro: Option<String>,
    pub paused: bool,
    /// Clients counted against `max_clients` now, the limits, and the refusals and
    /// client timeouts since start.
    #[serde(default)]
    pub limits: LimitsStatus,
    pub primary: Option<String>,
    /// Why writes cannot be routed now (no primary, split brain), if they cannot.
    pub route_error: Option<String>,
    /// `follow` or `automatic`.
    #[serde(default)]
    pub failover: String,
    /// What the automatic failover waits for, or why it refused to act.
    #[serde(default)]
    pub failover_note: Option<String>,
    /// The last promotion Switchyard made ("failover default -> failover1") and when.
    #[serde(default)]
    pub last_promotion: Option<String>,
    #[serde(default)]
    pub last_promotion_unix_ms: Option<u64>,
    /// Coordination: the primary the leader published, and its epoch.
    #[serde(default)]
    pub published: Option<String>,
    #[serde(default)]
    pub epoch: Option<u64>,
    pub nodes: Vec<NodeStatus>,
    pub pools: Vec<PoolStatus>,
    pub events: Vec<EventStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub addr: String,
    pub health: String,
    pub role: String,
    pub drained: bool,
    /// Made read-only by a switchover; no writes until it is a standby of the new primary.
    #[serde(default)]
    pub fenced: bool,
    pub lag_ms: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub timeline: Option<u32>,
    /// Why an up standby gets no reads: it does not follow the primary (an orphan after a
    /// failover, or its WAL receiver is not streaming).
    pub detached: Option<String>,
    pub sessions: u32,
    pub last_check_ms_ago: Option<u64>,
    pub last_error: Option<String>,
    pub state_since_s: u64,
    /// What the control plane last did to or found about this node (an old primary
    /// fenced, rejoined as a replica, or diverged: with the transactions it has that
    /// the primary lacks).
    #[serde(default)]
    pub remark: Option<String>,
    /// MySQL: the node's replication (GTIDs, source, threads, semi-sync), as its last
    /// health check saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::mysql::Replication>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PoolStatus {
    pub node: String,
    pub database: String,
    pub user: String,
    pub in_use: u32,
    pub idle: u32,
    pub waiting: u32,
    /// The pool's size (`pool_size`, or the user's own; 0 in session mode).
    #[serde(default)]
    pub size: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EventStatus {
    pub at_unix_ms: u64,
    pub node: String,
    pub old: String,
    pub new: String,
    pub reason: String,
}

const EVENTS_SHOWN: usize = 50;

fn since(t: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or(Duration::ZERO)
}

pub fn node_status(snap: &ClusterSnapshot, i: usize, now: SystemTime) -> NodeStatus {
    let n = &snap.nodes[i];
    NodeStatus {
        detached: snap.detached(i, routing::primary(snap).ok()).map(|d| d.to_string()),
        name: n.name.clone(),
        addr: n.addr.clone(),
        health: n.health.to_string(),
        role: n.role.to_string(),
        drained: n.drained,
        fenced: n.fenced,
        lag_ms: n.lag_ms,
        lag_bytes: n.lag_bytes,
        timeline: n.timeline,
        sessions: n.sessions(),
        last_check_ms_ago: n.last_check.map(|t| since(t, now).as_millis() as u64),
        last_error: n.last_error.clone(),
        state_since_s: since(n.since, now).as_secs(),
        remark: None,
        replication: None,
    }
}

pub fn event_status(e: &Event) -> EventStatus {
    EventStatus {
        at_unix_ms: e
            .at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        node: e.node.clone(),
        old: e.old.clone(),
        new: e.new.clone(),
        reason: e.reason.clone(),
    }
}

pub fn build(shared: &Shared) -> Status {
    let now = SystemTime::now();
    let all_pools = pool_rows(shared);
    let config = shared.config();
    let clusters = shared
        .clusters()
        .values()
        .map(|ctx| {
            let snap = ctx.state.snapshot();
            let (primary, route_error) = match routing::write_primary(&snap) {
                Ok(p) => (Some(snap.nodes[p].name.clone()), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let mut pool_rows: Vec<PoolStatus> = all_pools
                .iter()
                .filter(|p| *p.cluster == *ctx.name)
                .map(|p| PoolStatus {
                    node: p.node.clone(),
                    database: p.database.clone(),
                    user: p.user.clone(),
                    in_use: p.in_use,
                    idle: p.idle,
                    waiting: p.waiting,
                    size: p.size,
                })
                .collect();
            let waiting = ctx.waiting.load(std::sync::atomic::Ordering::Relaxed);
            if waiting > 0 {
                pool_rows.push(PoolStatus {
                    node: "(none yet)".into(),
                    database: "*".into(),
                    user: "*".into(),
                    in_use: 0,
                    idle: 0,
                    waiting,
                    size: 0,
                });
            }
            let events = ctx.state.events();
            let skip = events.len().saturating_sub(EVENTS_SHOWN);
            let last = ctx.ha.last();
            ClusterStatus {
                name: ctx.name.to_string(),
                engine: ctx.engine.to_string(),
                listen_rw: ctx.settings().listen_rw.clone(),
                listen_ro: ctx.settings().listen_ro.clone(),
                paused: ctx.is_paused(),
                limits: {
                    let v = shared.admissions.view(&ctx.name);
                    LimitsStatus {
                        clients: v.clients,
                        max_clients: config.clusters.get(&*ctx.name).and_then(|c| c.max_clients),
                        proxy_clients: v.proxy_clients,
                        proxy_max_clients: config.proxy.max_clients.min(shared.admissions.descriptor_cap()),
                        counts: v.counts.into_iter().map(|(k, n)| (k.to_string(), n)).collect(),
                    }
                },
                primary,
                route_error,
                failover: config
                    .clusters
                    .get(&*ctx.name)
                    .map(|c| format!("{:?}", c.failover).to_lowercase())
                    .unwrap_or_default(),
                failover_note: ctx.ha.note(),
                last_promotion: last.as_ref().map(|(_, _, what)| what.clone()),
                last_promotion_unix_ms: last
                    .as_ref()
                    .map(|(_, at, _)| at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)),
                published: snap.coordination.as_ref().and_then(|c| c.published.clone()),
                epoch: snap.coordination.as_ref().map(|c| c.epoch),
                nodes: {
                    let remarks = ctx.ha.remarks();
                    let mysql =
                        (ctx.engine == crate::config::Engine::Mysql).then(|| crate::mysql::ClusterInfo::of(ctx));
                    (0..snap.nodes.len())
                        .map(|i| NodeStatus {
                            remark: remarks.get(&snap.nodes[i].name).cloned(),
                            replication: mysql.and_then(|m| m.replication(&snap.nodes[i].name)),
                            ..node_status(&snap, i, now)
                        })
                        .collect()
                },
                pools: pool_rows,
                events: events[skip..].iter().map(event_status).collect(),
            }
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commit: env!("SWITCHYARD_COMMIT").to_string(),
        pid: std::process::id(),
        uptime_s: shared.started.elapsed().as_secs(),
        coordination: crate::ha::coord::get(shared).map(|c| {
            let v = c.view();
            CoordinationStatus {
                instance: c.me().to_string(),
                is_leader: c.is_leader(),
                leader: v.leader,
                instances: v.instances.into_keys().collect(),
                cut_off: v.cut_off,
            }
        }),
        clusters,
    }
}

/// A terminal table of a status document, for `switchyard status`.
pub fn render_table(s: &Status) -> String {
    let mut out = format!("switchyard {} — up {} s\n", s.version, s.uptime_s);
    if let Some(c) = &s.coordination {
        out += &format!(
            "instance {} ({}), leader {}, instances {}\n",
            c.instance,
            if c.is_leader { "leader" } else { "follower" },
            c.leader.as_deref().unwrap_or("none"),
            c.instances.join(", ")
        );
        if let Some(why) = &c.cut_off {
            out += &format!("  ! {why}\n");
        }
    }
    for c in &s.clusters {
        out += &format!(
            "\ncluster {}  rw {}  ro {}  primary {}{}\n",
            c.name,
            c.listen_rw.as_deref().unwrap_or("-"),
            c.listen_ro.as_deref().unwrap_or("-"),
            c.primary.as_deref().unwrap_or("NONE"),
            if c.paused { "  [PAUSED]" } else { "" }
        );
        if let Some(e) = &c.route_error {
            out += &format!("  ! {e}\n");
        }
        out += &format!("  failover: {}", c.failover);
        if let Some(e) = c.epoch {
            out += &format!(
                "; published primary {} (epoch {e})",
                c.published.as_deref().unwrap_or("none")
            );
        }
        if let Some(p) = &c.last_promotion {
            out += &format!("; last promotion: {p}");
        }
        out += "\n";
        if let Some(n) = &c.failover_note {
            out += &format!("  ! {n}\n");
        }
        out += &format!(
            "  {:<12} {:<21} {:<7} {:<8} {:>8} {:>10} {:>4} {:>8} {:>9}  {}\n",
            "NODE", "ADDR", "HEALTH", "ROLE", "LAG_MS", "LAG_BYTES", "TLI", "SESSIONS", "CHECKED", "LAST ERROR / NOTE"
        );
        for n in &c.nodes {
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            out += &format!(
                "  {:<12} {:<21} {:<7} {:<8} {:>8} {:>10} {:>4} {:>8} {:>9}  {}\n",
                format!("{}{}", n.name, if n.drained { "*" } else { "" }),
                n.addr,
                n.health,
                n.role,
                opt(n.lag_ms),
                opt(n.lag_bytes),
                n.timeline.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                n.sessions,
                n.last_check_ms_ago
                    .map(|m| format!("{m}ms ago"))
                    .unwrap_or_else(|| "-".into()),
                match (&n.last_error, &n.detached) {
                    _ if n.remark.is_some() => n.remark.clone().unwrap_or_default(),
                    (Some(e), _) => e.clone(),
                    (None, Some(d)) => format!("no reads: {d}"),
                    (None, None) if n.fenced => "fenced by a switchover: make it a standby of the new primary".into(),
                    (None, None) => String::new(),
                }
            );
        }
        if c.nodes.iter().any(|n| n.drained) {
            out += "  (* drained)\n";
        }
        for e in c.events.iter().rev().take(5) {
            out += &format!("  event: {} {} → {} ({})\n", e.node, e.old, e.new, e.reason);
        }
    }
    out
}
