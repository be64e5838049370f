//! Prometheus metrics through `prometheus-client`. Counters on the session path are
//! cloned handles (an atomic add, no label lookup per message); node gauges are set from
//! the topology at scrape time, so they can never disagree with `/status`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cluster::routing::Endpoint;
use crate::cluster::topology::{ClusterSnapshot, Health, Role, Transition};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub cluster: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoutedLabels {
    pub cluster: String,
    pub node: String,
    /// Role of the node when the session started: primary / standby.
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub cluster: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub cluster: String,
    pub node: String,
    pub database: String,
    pub user: String,
    /// in_use / idle / waiting (clients waiting for a connection)
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    pub cluster: String,
    /// moved / refused (the session held state a move cannot carry)
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PromotionLabels {
    pub cluster: String,
    /// switchover / failover
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub cluster: String,
    /// Which limit refused a client, or which timeout fired.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransactionLabels {
    pub cluster: String,
    /// The listener the client came in on: rw / ro.
    pub endpoint: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerErrorLabels {
    pub cluster: String,
    /// First two characters of the SQLSTATE.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// First two characters of the SQLSTATE.
    pub class: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    /// Every family registered (full name, type): what `/metrics` may show, listed
    /// even before a family has a series (tests/dashboard.rs checks the dashboard and
    /// the docs against it).
    families: Vec<(String, prometheus_client::metrics::MetricType)>,
    node_up: Family<NodeLabels, Gauge>,
    node_primary: Family<NodeLabels, Gauge>,
    node_lag_seconds: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    node_lag_bytes: Family<NodeLabels, Gauge>,
    server_connections: Family<NodeLabels, Gauge>,
    pool: Family<PoolLabels, Gauge>,
    pub health_check_seconds: Family<NodeLabels, Histogram>,
    pub client_connections: Family<EndpointLabels, Gauge>,
    pub queries_routed: Family<RoutedLabels, Counter>,
    pub sessions_routed: Family<RoutedLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    /// Errors servers answered clients with, by cluster and SQLSTATE class
    /// (transaction pooling).
    server_errors: Family<ServerErrorLabels, Counter>,
    /// Transactions (units of transaction pooling), from the request that began them to
    /// the release of their connection.
    pub transaction_seconds: Family<TransactionLabels, Histogram>,
    /// Bytes read from clients and written to them, by listener.
    pub client_received_bytes: Family<EndpointLabels, Counter>,
    pub client_sent_bytes: Family<EndpointLabels, Counter>,
    pub pool_wait_seconds: Family<ClusterLabels, Histogram>,
    pub failovers: Family<ClusterLabels, Counter>,
    pub role_changes: Family<NodeLabels, Counter>,
    /// Promotions Switchyard made itself (planned switchovers, automatic failovers).
    pub promotions: Family<PromotionLabels, Counter>,
    /// MySQL sessions moved to a new primary after a switchover, or refused a move.
    pub sessions_moved: Family<MoveLabels, Counter>,
    /// 1 while writes can be routed (a primary, agreed under coordination).
    cluster_writable: Family<ClusterLabels, Gauge>,
    /// Coordination: the epoch of the published primary.
    published_epoch: Family<ClusterLabels, Gauge>,
    /// Reads placed on a standby (a split or ro unit in transaction mode, a ro session
    /// in session mode).
    pub reads_to_standby: Family<ClusterLabels, Counter>,
    /// Reads that had to be fresh (read-your-writes, a causal token) and went to the
    /// primary because no standby had replayed far enough within `causal_wait_ms`.
    pub reads_to_primary_for_freshness: Family<ClusterLabels, Counter>,
    /// How long reads waited for a standby to replay far enough (reads that waited).
    pub causal_wait_seconds: Family<ClusterLabels, Histogram>,
    /// Clients refused by a limit (`proxy::limits`), by which.
    clients_refused: Family<ReasonLabels, Counter>,
    /// Client timeouts that fired (client_idle, idle_transaction, query), by which.
    client_timeouts: Family<ReasonLabels, Counter>,
    /// Query digests held, and evicted since start (set at scrape time).
    query_digests: Gauge,
    query_digests_evicted: Counter,
    /// Statements per place since start (`Digests::place_rows`, set at scrape time).
    query_places: std::sync::Arc<QueryPlaces>,
    /// Trace spans sent, dropped (queue full, receiver refused or unreachable), and
    /// failed export requests (set at scrape time from `obs::trace::TraceCounts`).
    trace_spans_exported: Counter,
    trace_spans_dropped: Counter,
    trace_export_failures: Counter,
    /// Per cluster, the series every new client counts in (`ClientHandles`).
    client_handles: Mutex<HashMap<String, Arc<ClientHandles>, foldhash::fast::RandomState>>,
}

/// A cluster's series that every new client counts in, looked up once per cluster
/// rather than once per client: a family's `get_or_create` takes labels allocated for
/// the lookup, hashes them and takes a lock, about 4,000 instructions per client for
/// these under `bench/instructions --connect` (applications that connect per request
/// have a new client per request). Indexed by listener (`Endpoint as usize`). The
/// families here are never cleared, so a handle kept stays the series `/metrics` shows.
pub struct ClientHandles {
    connected: [Gauge; 2],
    received: [Counter; 2],
    sent: [Counter; 2],
    pub pool_wait: Histogram,
    /// `pg::fresh::FreshMetrics`: reads to a standby, to the primary for freshness, waits.
    pub reads_to_standby: Counter,
    pub reads_to_primary_for_freshness: Counter,
    pub causal_wait: Histogram,
}

/// The query metrics: a histogram of statement durations and counters of errors and
/// rows per (cluster, node, role, route), from the digests' per-place statistics,
/// which already hold the buckets (a `Histogram` of prometheus-client would take a
/// labelled lookup per statement on the data path).
#[derive(Debug, Default)]
struct QueryPlaces(Mutex<Vec<crate::obs::digest::PlaceRow>>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaceLabels {
    cluster: String,
    node: String,
    role: String,
    route: String,
}

impl prometheus_client::collector::Collector for QueryPlaces {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        let rows = self.0.lock().unwrap();
        let labels = |r: &crate::obs::digest::PlaceRow| PlaceLabels {
            cluster: r.cluster.clone(),
            node: r.node.clone(),
            role: r.role.into(),
            route: r.route.as_str().into(),
        };
        let mut e = encoder.encode_descriptor(
            "query_duration_seconds",
            "Statements from their write to the server to their answer, by cluster, node, the node's role and route (primary, split, replica, fallback, fresh)",
            None,
            MetricType::Histogram,
        )?;
        for r in rows.iter() {
            let l = labels(r);
            e.encode_family(&l)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    r.total_seconds,
                    r.calls,
                    &r.buckets,
                    None,
                )?;
        }
        for (name, help, pick) in [
            (
                "query_errors",
                "Statements answered with an error (or whose connection was lost), by cluster, node, role and route",
                (|r: &crate::obs::digest::PlaceRow| r.errors) as fn(&crate::obs::digest::PlaceRow) -> u64,
            ),
            (
                "query_rows",
                "Rows statements returned or changed, by cluster, node, role and route",
                |r| r.rows,
            ),
        ] {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for r in rows.iter() {
                let l = labels(r);
                let c: Counter = Counter::default();
                c.inc_by(pick(r));
                c.encode(e.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter family
/// is named with its `_total` suffix in `# HELP` and `# TYPE`, as its samples are, and
/// there is no `# UNIT` or `# EOF` line. (prometheus-client writes OpenMetrics only.)
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}").trim_end().to_string())
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Register `metric` as `switchyard_<name>` and list it in `families`.
fn register<M: prometheus_client::registry::Metric + prometheus_client::metrics::TypedMetric + Clone>(
    r: &mut Registry,
    families: &mut Vec<(String, prometheus_client::metrics::MetricType)>,
    name: &str,
    help: &str,
    metric: M,
) {
    families.push((format!("switchyard_{name}"), M::TYPE));
    r.register(name, help, metric);
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("switchyard");
        let mut families = Vec::new();
        let mut m = Metrics {
            families: Vec::new(),
            registry: Mutex::new(Registry::default()),
            node_up: Family::default(),
            node_primary: Family::default(),
            node_lag_seconds: Family::default(),
            node_lag_bytes: Family::default(),
            server_connections: Family::default(),
            pool: Family::default(),
            health_check_seconds: Family::new_with_constructor(latency_histogram),
            client_connections: Family::default(),
            queries_routed: Family::default(),
            sessions_routed: Family::default(),
            errors: Family::default(),
            server_errors: Family::default(),
            transaction_seconds: Family::new_with_constructor(|| {
                // 64 µs .. ~8 s, as the query histogram
                Histogram::new(exponential_buckets(0.000064, 2.0, 18))
            }),
            client_received_bytes: Family::default(),
            client_sent_bytes: Family::default(),
            pool_wait_seconds: Family::new_with_constructor(latency_histogram),
            failovers: Family::default(),
            role_changes: Family::default(),
            promotions: Family::default(),
            sessions_moved: Family::default(),
            cluster_writable: Family::default(),
            published_epoch: Family::default(),
            reads_to_standby: Family::default(),
            reads_to_primary_for_freshness: Family::default(),
            clients_refused: Family::default(),
            client_timeouts: Family::default(),
            query_digests: Gauge::default(),
            query_digests_evicted: Counter::default(),
            query_places: Default::default(),
            trace_spans_exported: Counter::default(),
            trace_spans_dropped: Counter::default(),
            trace_export_failures: Counter::default(),
            causal_wait_seconds: Family::new_with_constructor(|| {
                // 0.25 ms .. ~8 s
                Histogram::new(exponential_buckets(0.00025, 2.0, 16))
            }),
            client_handles: Default::default(),
        };
        register(
            &mut r,
            &mut families,
            "reads_to_standby",
            "Reads placed on a standby (units in transaction mode, sessions in session mode)",
            m.reads_to_standby.clone(),
        );
        register(
            &mut r,
            &mut families,
            "reads_to_primary_for_freshness",
            "Reads sent to the primary because no standby had replayed the client's writes or causal token within causal_wait_ms",
            m.reads_to_primary_for_freshness.clone(),
        );
        register(
            &mut r,
            &mut families,
            "causal_wait_seconds",
            "Time reads waited for a standby to replay the client's writes or causal token",
            m.causal_wait_seconds.clone(),
        );
        register(
            &mut r,
            &mut families,
            "node_up",
            "1 if the node passes health checks",
            m.node_up.clone(),
        );
        register(
            &mut r,
            &mut families,
            "node_primary",
            "1 if the node is up and reports itself primary",
            m.node_primary.clone(),
        );
        register(
            &mut r,
            &mut families,
            "node_lag_seconds",
            "Replay lag of a standby",
            m.node_lag_seconds.clone(),
        );
        register(
            &mut r,
            &mut families,
            "node_lag_bytes",
            "WAL bytes a standby is behind the primary",
            m.node_lag_bytes.clone(),
        );
        register(
            &mut r,
            &mut families,
            "server_connections",
            "Server connections open to the node for client sessions",
            m.server_connections.clone(),
        );
        register(
            &mut r,
            &mut families,
            "pool_connections",
            "Pooled server connections in use and idle, and clients waiting for one",
            m.pool.clone(),
        );
        register(
            &mut r,
            &mut families,
            "health_check_duration_seconds",
            "Duration of health checks",
            m.health_check_seconds.clone(),
        );
        register(
            &mut r,
            &mut families,
            "client_connections",
            "Client sessions connected",
            m.client_connections.clone(),
        );
        register(
            &mut r,
            &mut families,
            "queries_routed",
            "Queries (simple Query and extended Execute) relayed to a node",
            m.queries_routed.clone(),
        );
        register(
            &mut r,
            &mut families,
            "sessions_routed",
            "Client sessions routed to a node",
            m.sessions_routed.clone(),
        );
        register(
            &mut r,
            &mut families,
            "errors",
            "ErrorResponses the proxy itself sent, by SQLSTATE class",
            m.errors.clone(),
        );
        register(
            &mut r,
            &mut families,
            "server_errors",
            "Errors servers answered statements with, by SQLSTATE class (transaction pooling)",
            m.server_errors.clone(),
        );
        register(
            &mut r,
            &mut families,
            "transaction_duration_seconds",
            "Transactions in transaction pooling, from the request that began one to the release of its server connection (pool and replay waits included), by listener and the node that ran it",
            m.transaction_seconds.clone(),
        );
        register(
            &mut r,
            &mut families,
            "client_received_bytes",
            "Bytes read from clients, by listener",
            m.client_received_bytes.clone(),
        );
        register(
            &mut r,
            &mut families,
            "client_sent_bytes",
            "Bytes written to clients, by listener",
            m.client_sent_bytes.clone(),
        );
        register(
            &mut r,
            &mut families,
            "pool_wait_seconds",
            "Time from a client's login to its server connection being ready",
            m.pool_wait_seconds.clone(),
        );
        register(
            &mut r,
            &mut families,
            "failovers",
            "Times the primary of a cluster moved to another node",
            m.failovers.clone(),
        );
        register(
            &mut r,
            &mut families,
            "promotions",
            "Standbys Switchyard promoted itself, by kind (switchover, failover)",
            m.promotions.clone(),
        );
        register(
            &mut r,
            &mut families,
            "sessions_moved",
            "MySQL sessions moved to the new primary after a switchover (moved), or ended because they held state a move cannot carry (refused)",
            m.sessions_moved.clone(),
        );
        register(
            &mut r,
            &mut families,
            "cluster_writable",
            "1 while writes can be routed: a primary is up (and, under coordination, published and this instance in touch with etcd)",
            m.cluster_writable.clone(),
        );
        register(
            &mut r,
            &mut families,
            "published_epoch",
            "Coordination: the epoch of the primary published in etcd",
            m.published_epoch.clone(),
        );
        register(
            &mut r,
            &mut families,
            "clients_refused",
            "Clients refused by a limit: proxy_max_clients, cluster_max_clients, user_max_clients, file_descriptors",
            m.clients_refused.clone(),
        );
        register(
            &mut r,
            &mut families,
            "query_digests",
            "Query digests held (statement, node and route), over all worker threads",
            m.query_digests.clone(),
        );
        register(
            &mut r,
            &mut families,
            "query_digests_evicted",
            "Query digests evicted to stay within telemetry.max_digests",
            m.query_digests_evicted.clone(),
        );
        register(
            &mut r,
            &mut families,
            "client_timeouts",
            "Client timeouts that fired: client_idle (client ended), idle_transaction (client ended, transaction rolled back), query (cancel sent to the server)",
            m.client_timeouts.clone(),
        );
        register(
            &mut r,
            &mut families,
            "role_changes",
            "Role or health changes of a node",
            m.role_changes.clone(),
        );
        register(
            &mut r,
            &mut families,
            "trace_spans_exported",
            "Trace spans sent to the OTLP receiver",
            m.trace_spans_exported.clone(),
        );
        register(
            &mut r,
            &mut families,
            "trace_spans_dropped",
            "Trace spans dropped: the export queue was full, or the receiver refused or could not be reached",
            m.trace_spans_dropped.clone(),
        );
        register(
            &mut r,
            &mut families,
            "trace_export_failures",
            "Export requests to the OTLP receiver that failed",
            m.trace_export_failures.clone(),
        );
        r.register_collector(Box::new(m.query_places.clone()));
        {
            use prometheus_client::metrics::MetricType;
            for (name, kind) in [
                ("query_duration_seconds", MetricType::Histogram),
                ("query_errors", MetricType::Counter),
                ("query_rows", MetricType::Counter),
            ] {
                families.push((format!("switchyard_{name}"), kind));
            }
        }
        m.families = families;
        *m.registry.lock().unwrap() = r;
        m
    }
}

impl Metrics {
    /// Count a promotion Switchyard made (`kind`: switchover / failover).
    pub fn session_moved(&self, cluster: &str, outcome: &str) {
        self.sessions_moved
            .get_or_create(&MoveLabels {
                cluster: cluster.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Count a client refused by a limit (`reason`: `limits::Refusal::reason`).
    pub fn client_refused(&self, cluster: &str, reason: &str) {
        self.clients_refused
            .get_or_create(&ReasonLabels {
                cluster: cluster.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Count a client timeout that fired (`kind`: client_idle, idle_transaction, query).
    pub fn client_timeout(&self, cluster: &str, kind: &str) {
        self.client_timeouts
            .get_or_create(&ReasonLabels {
                cluster: cluster.into(),
                reason: kind.into(),
            })
            .inc();
    }

    pub fn promoted(&self, cluster: &str, kind: &str) {
        self.promotions
            .get_or_create(&PromotionLabels {
                cluster: cluster.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Count a connected client in `client_connections` until the guard is dropped.
    pub fn client_connected(&self, cluster: &str, endpoint: Endpoint) -> ClientGauge {
        let g = self.client_handles(cluster).connected[endpoint as usize].clone();
        g.inc();
        ClientGauge(g)
    }

    /// `cluster`'s `ClientHandles`, made on first use.
    pub fn client_handles(&self, cluster: &str) -> Arc<ClientHandles> {
        if let Some(h) = self.client_handles.lock().unwrap().get(cluster) {
            return h.clone();
        }
        let endpoints = [Endpoint::ReadWrite, Endpoint::ReadOnly];
        let by_endpoint = |e: Endpoint| EndpointLabels {
            cluster: cluster.to_string(),
            endpoint: e.to_string(),
        };
        let labels = ClusterLabels {
            cluster: cluster.to_string(),
        };
        let made = Arc::new(ClientHandles {
            connected: endpoints.map(|e| self.client_connections.get_or_create(&by_endpoint(e)).clone()),
            received: endpoints.map(|e| self.client_received_bytes.get_or_create(&by_endpoint(e)).clone()),
            sent: endpoints.map(|e| self.client_sent_bytes.get_or_create(&by_endpoint(e)).clone()),
            pool_wait: self.pool_wait_seconds.get_or_create(&labels).clone(),
            reads_to_standby: self.reads_to_standby.get_or_create(&labels).clone(),
            reads_to_primary_for_freshness: self.reads_to_primary_for_freshness.get_or_create(&labels).clone(),
            causal_wait: self.causal_wait_seconds.get_or_create(&labels).clone(),
        });
        self.client_handles
            .lock()
            .unwrap()
            .entry(cluster.to_string())
            .or_insert(made)
            .clone()
    }

    /// Count an error a server answered with (`class`: the SQLSTATE's first two bytes).
    pub fn server_error(&self, cluster: &str, class: [u8; 2]) {
        self.server_errors
            .get_or_create(&ServerErrorLabels {
                cluster: cluster.into(),
                class: String::from_utf8_lossy(&class).into_owned(),
            })
            .inc();
    }

    /// The byte counters (received, sent) of a listener, to keep for a session.
    pub fn client_bytes(&self, cluster: &str, endpoint: Endpoint) -> (Counter, Counter) {
        let h = self.client_handles(cluster);
        (h.received[endpoint as usize].clone(), h.sent[endpoint as usize].clone())
    }

    pub fn error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("??").to_string();
        self.errors.get_or_create(&ErrorLabels { class }).inc();
    }

    pub fn observe_check(&self, cluster: &str, node: &str, took: Duration, transition: Option<&Transition>) {
        let labels = NodeLabels {
            cluster: cluster.into(),
            node: node.into(),
        };
        self.health_check_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(t) = transition {
            self.role_changes.get_or_create(&labels).inc();
            if t.new_role == Role::Primary && t.old_role != Role::Primary {
                self.failovers
                    .get_or_create(&ClusterLabels {
                        cluster: cluster.into(),
                    })
                    .inc();
            }
        }
    }

    /// Text exposition, node gauges refreshed from the given snapshots first.
    /// Every family `/metrics` may show: its full name and type (`counter`,
    /// `histogram`, `gauge`...), as the exposition writes them.
    pub fn families(&self) -> Vec<(String, String)> {
        use prometheus_client::metrics::MetricType;
        self.families
            .iter()
            .map(|(n, t)| {
                let t = match t {
                    MetricType::Counter => "counter",
                    MetricType::Gauge => "gauge",
                    MetricType::Histogram => "histogram",
                    MetricType::Info => "info",
                    _ => "unknown",
                };
                (n.clone(), t.to_string())
            })
            .collect()
    }

    /// The statements per place (`obs::digest::Digests::place_rows`), before a render.
    pub fn set_query_places(&self, rows: Vec<crate::obs::digest::PlaceRow>) {
        *self.query_places.0.lock().unwrap() = rows;
    }

    /// The trace exporter's counts, before a render.
    pub fn set_traces(&self, counts: &crate::obs::trace::TraceCounts) {
        use std::sync::atomic::Ordering::Relaxed;
        for (c, v) in [
            (&self.trace_spans_exported, counts.exported.load(Relaxed)),
            (&self.trace_spans_dropped, counts.dropped.load(Relaxed)),
            (&self.trace_export_failures, counts.export_failures.load(Relaxed)),
        ] {
            c.inc_by(v.saturating_sub(c.get()));
        }
    }

    /// The digest tables' size (`obs::digest::Digests::counts`), before a render.
    pub fn set_digests(&self, (held, evicted): (u64, u64)) {
        self.query_digests.set(held as i64);
        let seen = self.query_digests_evicted.get();
        self.query_digests_evicted.inc_by(evicted.saturating_sub(seen));
    }

    pub fn render(
        &self,
        snapshots: &[std::sync::Arc<ClusterSnapshot>],
        pools: &[crate::obs::clients::PoolRow],
    ) -> String {
        self.pool.clear();
        for p in pools {
            for (state, v) in [("in_use", p.in_use), ("idle", p.idle), ("waiting", p.waiting)] {
                let l = PoolLabels {
                    cluster: p.cluster.clone(),
                    node: p.node.clone(),
                    database: p.database.clone(),
                    user: p.user.clone(),
                    state: state.into(),
                };
                self.pool.get_or_create(&l).set(v as i64);
            }
        }
        for f in [
            &self.node_up,
            &self.node_primary,
            &self.node_lag_bytes,
            &self.server_connections,
        ] {
            f.clear();
        }
        self.node_lag_seconds.clear();
        for snap in snapshots {
            let l = ClusterLabels {
                cluster: snap.name.clone(),
            };
            self.cluster_writable
                .get_or_create(&l)
                .set(crate::cluster::routing::write_primary(snap).is_ok() as i64);
            if let Some(c) = &snap.coordination {
                self.published_epoch.get_or_create(&l).set(c.epoch as i64);
            }
            for n in &snap.nodes {
                let l = NodeLabels {
                    cluster: snap.name.clone(),
                    node: n.name.clone(),
                };
                let up = n.health == Health::Up;
                self.node_up.get_or_create(&l).set(up as i64);
                self.node_primary
                    .get_or_create(&l)
                    .set((up && n.role == Role::Primary) as i64);
                self.server_connections
                    .get_or_create(&l)
                    .set(n.active.load(Ordering::Relaxed) as i64);
                if let Some(lag) = n.lag_ms {
                    self.node_lag_seconds.get_or_create(&l).set(lag as f64 / 1000.0);
                }
                if let Some(b) = n.lag_bytes {
                    self.node_lag_bytes.get_or_create(&l).set(b as i64);
                }
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().unwrap()).expect("writing to a String cannot fail");
        out
    }
}

/// One connected client in `client_connections` (`Metrics::client_connected`).
pub struct ClientGauge(Gauge);

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_format_names_counters_with_their_suffix() {
        let om = "# HELP x_failovers The primary moved.\n# TYPE x_failovers counter\nx_failovers_total{cluster=\"a\"} 1\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP x_failovers_total The primary moved.\n# TYPE x_failovers_total counter\nx_failovers_total{cluster=\"a\"} 1\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
