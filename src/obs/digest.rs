//! Query digests: for every normalized statement, where it ran (cluster, node, its role)
//! and why it went there (`Route`), how often, how long, how many rows, how many errors.
//! What ProxySQL's `stats_mysql_query_digest` answers, for both engines.
//!
//! Sessions record into the table of their worker thread (`Digests::lock` with the
//! worker's index), so a statement's cost is one uncontended lock and one hash lookup,
//! and no cache line another worker writes. Readers (`/queries`, `SHOW QUERIES`) merge
//! the tables. Each table holds at most `max_digests` entries: when a new one does not
//! fit, the least-called tenth is evicted (counted), so memory stays bounded whatever
//! the workload sends.
//!
//! The engines normalize: they give each statement shape a `Digest` (an id from the
//! parser's fingerprint, in which literals, comments and spacing do not count, and a
//! text to show), computed once per shape and shared with their classification cache.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// The longest digest text kept (a statement with a huge `VALUES` list or `IN` list
/// is cut here: the id, not the text, tells shapes apart).
pub const MAX_TEXT: usize = 2048;

/// A statement shape: what the engine's parser calls the same statement.
#[derive(Debug, PartialEq, Eq)]
pub struct Digest {
    /// The parser's fingerprint (PostgreSQL: libpg_query's).
    pub id: u64,
    /// The statement with literals replaced, comments removed and spacing collapsed.
    pub text: Box<str>,
}

impl Digest {
    /// `normalized`: the engine's normalized text; spacing is collapsed here and the
    /// text cut at `MAX_TEXT`.
    pub fn new(id: u64, normalized: &str) -> Digest {
        let mut text = String::with_capacity(normalized.len().min(MAX_TEXT + 4));
        for word in normalized.split_whitespace() {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(word);
            if text.len() > MAX_TEXT {
                let mut cut = MAX_TEXT;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
                break;
            }
        }
        Digest {
            id,
            text: text.into_boxed_str(),
        }
    }
}

/// Why a statement ran where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Sent to the primary: a write, or anything not proven a read on the rw endpoint.
    Primary,
    /// A proven read sent to a standby by `read_write_split`.
    Split,
    /// Through the ro endpoint, on a standby.
    Replica,
    /// A read that could have gone to a standby, on the primary because none could
    /// take it (down, lagging, none configured).
    Fallback,
    /// A read on the primary because no standby had the client's writes (read-your-
    /// writes, causal token).
    Fresh,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Primary => "primary",
            Route::Split => "split",
            Route::Replica => "replica",
            Route::Fallback => "fallback",
            Route::Fresh => "fresh",
        }
    }
}

/// One finished statement.
pub struct Sample<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    /// The node was the primary when the connection was taken.
    pub on_primary: bool,
    pub route: Route,
    pub digest: &'a Arc<Digest>,
    pub micros: u64,
    pub rows: u64,
    pub failed: bool,
}

/// A statement an engine saw answered (or fail with its connection), to record.
#[derive(Debug)]
pub struct Finished {
    pub digest: Arc<Digest>,
    /// When it was written to the server (None: never stamped; not recorded).
    pub sent: Option<std::time::Instant>,
    pub rows: u64,
    pub failed: bool,
    /// The application's trace context from the statement's comment (traces only).
    pub trace: Option<crate::obs::trace::TraceParent>,
}

/// Where a batch of statements ran.
pub struct Place<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    /// The node's address (a span's `server.address`).
    pub addr: &'a str,
    pub on_primary: bool,
    pub route: Route,
    /// The client's database (a span's `db.namespace`).
    pub database: &'a str,
    /// `postgresql` or `mysql` (a span's `db.system.name`).
    pub system: &'static str,
}

/// Add `finished` (emptied, its allocation kept) to worker `worker`'s table, as run at
/// `place` and answered by `now`. With traces on, each is a span: a child of `unit`'s
/// span when they belong to a transaction that has one, else of the application's.
pub fn record(
    digests: &Digests,
    worker: usize,
    finished: &mut Vec<Finished>,
    place: &Place<'_>,
    now: std::time::Instant,
    mut unit: Option<&mut crate::obs::trace::UnitTrace>,
) {
    if finished.is_empty() {
        return;
    }
    if let Some(tracer) = digests.tracer.get() {
        let wall = std::time::SystemTime::now();
        for f in finished.iter() {
            let Some(sent) = f.sent else { continue };
            let parent = match unit.as_deref_mut() {
                Some(u) => match u.statement_parent(tracer, f.trace.as_ref()) {
                    Some(p) => Some(p),
                    None => continue,
                },
                None if tracer.sampled(f.trace.as_ref()) => f.trace,
                None => continue,
            };
            tracer.submit(&crate::obs::trace::StatementSpan {
                parent,
                start: wall - now.saturating_duration_since(sent),
                end: wall,
                system: place.system,
                namespace: place.database,
                query: &f.digest.text,
                node: place.addr,
                route: place.route.as_str(),
                cluster: place.cluster,
                rows: f.rows,
                failed: f.failed,
            });
        }
    }
    if !digests.enabled() {
        finished.clear();
        return;
    }
    let mut table = digests.lock(worker);
    let pk = place.key();
    for f in finished.drain(..) {
        let Some(sent) = f.sent else { continue };
        table.record(
            pk,
            Sample {
                cluster: place.cluster,
                node: place.node,
                on_primary: place.on_primary,
                route: place.route,
                digest: &f.digest,
                micros: now.saturating_duration_since(sent).as_micros() as u64,
                rows: f.rows,
                failed: f.failed,
            },
        );
    }
}

/// Latency buckets: two per power of two of microseconds (bounds 1, 2, 3, 4, 6, 8, 12,
/// 16, … µs), so a quantile read from them is within ~25 % (what `p50`/`p99` show); the
/// last holds everything from about 2 minutes on.
const BUCKETS: usize = 56;

fn bucket(micros: u64) -> usize {
    if micros < 2 {
        return micros as usize;
    }
    let e = 63 - micros.leading_zeros() as usize;
    (2 * e + ((micros >> (e - 1)) & 1) as usize).min(BUCKETS - 1)
}

/// The lower bound of bucket `i`, in microseconds.
fn bucket_floor(i: usize) -> u64 {
    if i < 2 {
        return i as u64;
    }
    let e = i / 2;
    (1u64 << e) + if i % 2 == 1 { 1u64 << (e - 1) } else { 0 }
}

#[derive(Debug, Clone)]
struct Stats {
    calls: u64,
    errors: u64,
    rows: u64,
    total_us: u64,
    min_us: u64,
    max_us: u64,
    hist: [u32; BUCKETS],
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            calls: 0,
            errors: 0,
            rows: 0,
            total_us: 0,
            min_us: u64::MAX,
            max_us: 0,
            hist: [0; BUCKETS],
        }
    }
}

impl Stats {
    fn add(&mut self, micros: u64, rows: u64, failed: bool) {
        self.calls += 1;
        self.errors += failed as u64;
        self.rows += rows;
        self.total_us += micros;
        self.min_us = self.min_us.min(micros);
        self.max_us = self.max_us.max(micros);
        let b = &mut self.hist[bucket(micros)];
        *b = b.saturating_add(1);
    }

    fn merge(&mut self, o: &Stats) {
        self.calls += o.calls;
        self.errors += o.errors;
        self.rows += o.rows;
        self.total_us += o.total_us;
        self.min_us = self.min_us.min(o.min_us);
        self.max_us = self.max_us.max(o.max_us);
        for (a, b) in self.hist.iter_mut().zip(o.hist.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The `q` quantile in microseconds: interpolated inside its bucket, and never
    /// outside the observed min..max.
    fn quantile(&self, q: f64) -> f64 {
        let total: u64 = self.hist.iter().map(|&c| c as u64).sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).max(1.0);
        let mut seen = 0.0;
        for (i, &c) in self.hist.iter().enumerate() {
            let c = c as f64;
            if c > 0.0 && seen + c >= rank {
                let lo = bucket_floor(i) as f64;
                let hi = if i + 1 < BUCKETS {
                    bucket_floor(i + 1) as f64
                } else {
                    self.max_us as f64
                };
                let v = lo + (hi - lo) * ((rank - seen) / c);
                return v.clamp(self.min_us as f64, self.max_us as f64);
            }
            seen += c;
        }
        self.max_us as f64
    }
}

struct Entry {
    cluster: Arc<str>,
    node: Arc<str>,
    on_primary: bool,
    route: Route,
    digest: Arc<Digest>,
    stats: Stats,
}

impl Entry {
    fn of(s: &Sample<'_>, stats: Stats) -> Entry {
        Entry {
            cluster: s.cluster.into(),
            node: s.node.into(),
            on_primary: s.on_primary,
            route: s.route,
            digest: s.digest.clone(),
            stats,
        }
    }

    fn is(&self, s: &Sample<'_>) -> bool {
        self.digest.id == s.digest.id
            && self.route == s.route
            && self.on_primary == s.on_primary
            && *self.node == *s.node
            && *self.cluster == *s.cluster
    }
}

/// One worker's digests.
#[derive(Default)]
pub struct Table {
    entries: HashMap<u64, Entry, Prehashed>,
    evicted: u64,
    /// The same samples per place (cluster, node, role, route) only, never evicted or
    /// reset: the Prometheus query metrics (`place_rows`), whose counters must only
    /// grow. Bounded by the configured nodes × routes.
    places: HashMap<u64, Entry, Prehashed>,
}

/// The tables' keys are hashes already (`Place::key`, mixed with the digest's id):
/// used as they are, not hashed again.
type Prehashed = std::hash::BuildHasherDefault<Passthrough>;

#[derive(Default)]
struct Passthrough(u64);

impl std::hash::Hasher for Passthrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl Place<'_> {
    /// A hash of where (cluster, node, route, role): computed once per batch of
    /// samples, so a statement costs no hashing of strings. foldhash with a fixed seed,
    /// not SipHash: the names come from the configuration, not from clients, and SipHash
    /// was 300 instructions of each transaction (`bench/instructions`).
    pub fn key(&self) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x5357_4954_4348).hash_one((
            self.cluster,
            self.node,
            self.route,
            self.on_primary,
        ))
    }
}

/// A statement's key at a place: the place's hash mixed with the digest's id (a
/// 64-bit finalizer, so both halves spread over every bit).
fn mix(place: u64, digest: u64) -> u64 {
    let mut x = place ^ digest.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A worker's table, locked for a batch of samples.
pub struct Recorder<'a> {
    table: MutexGuard<'a, Table>,
    limit: usize,
}

impl Recorder<'_> {
    /// Add a sample taken at the place whose `Place::key` is `pk`.
    pub fn record(&mut self, pk: u64, s: Sample<'_>) {
        match self.table.places.get_mut(&pk) {
            Some(e) => e.stats.add(s.micros, s.rows, s.failed),
            None => {
                let mut stats = Stats::default();
                stats.add(s.micros, s.rows, s.failed);
                self.table.places.insert(pk, Entry::of(&s, stats));
            }
        }
        let k = mix(pk, s.digest.id);
        if let Some(e) = self.table.entries.get_mut(&k) {
            // Two keys with one 64-bit hash: the sample is dropped rather than counted
            // under another statement (about one chance in 10^12 at the default size).
            if e.is(&s) {
                e.stats.add(s.micros, s.rows, s.failed);
            }
            return;
        }
        if self.limit == 0 {
            return;
        }
        if self.table.entries.len() >= self.limit {
            self.evict();
        }
        let mut stats = Stats::default();
        stats.add(s.micros, s.rows, s.failed);
        self.table.entries.insert(k, Entry::of(&s, stats));
    }

    /// Make room: the least-called tenth goes (one sort per tenth of the table, so a
    /// flood of one-off statements costs little per statement).
    fn evict(&mut self) {
        let t = &mut *self.table;
        let n = (t.entries.len() / 10).max(1).min(t.entries.len());
        let mut calls: Vec<(u64, u64)> = t.entries.iter().map(|(k, e)| (e.stats.calls, *k)).collect();
        calls.select_nth_unstable(n - 1);
        for (_, k) in &calls[..n] {
            t.entries.remove(k);
        }
        t.evicted += n as u64;
    }
}

/// How `/queries` groups its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One row per statement, node and route.
    Node,
    /// One row per statement (nodes and routes summed).
    Query,
}

/// What `/queries` and `SHOW QUERIES` sort by (descending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    TotalTime,
    Calls,
    Errors,
    Rows,
    MeanTime,
    MaxTime,
    P99,
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Order, String> {
        Ok(match s {
            "total_time" => Order::TotalTime,
            "calls" => Order::Calls,
            "errors" => Order::Errors,
            "rows" => Order::Rows,
            "mean_time" => Order::MeanTime,
            "max_time" => Order::MaxTime,
            "p99" => Order::P99,
            _ => {
                return Err(format!(
                    "unknown order {s:?}: use total_time, calls, errors, rows, mean_time, max_time or p99"
                ))
            }
        })
    }
}

/// The statements of one place (cluster, node, role, route) since start, for the
/// Prometheus query metrics.
#[derive(Debug, Clone)]
pub struct PlaceRow {
    pub cluster: String,
    pub node: String,
    pub role: &'static str,
    pub route: Route,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_seconds: f64,
    /// Statements per bucket, by upper bound in seconds (powers of two of microseconds
    /// from 64 µs to about 8 s, then `f64::MAX` for the rest): what prometheus-client's
    /// histogram encoder takes (it sums them into `le` buckets).
    pub buckets: Vec<(f64, u64)>,
}

/// The `le` bounds of `PlaceRow::buckets`, in microseconds: bounds of our own buckets,
/// so the cumulative counts are exact.
const LE_MICROS: [u64; 18] = [
    64,
    128,
    256,
    512,
    1 << 10,
    1 << 11,
    1 << 12,
    1 << 13,
    1 << 14,
    1 << 15,
    1 << 16,
    1 << 17,
    1 << 18,
    1 << 19,
    1 << 20,
    1 << 21,
    1 << 22,
    1 << 23,
];

/// One row of `/queries`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The fingerprint, 16 hex digits.
    pub digest: String,
    pub query: String,
    pub cluster: String,
    /// None when grouped by query.
    pub node: Option<String>,
    /// primary / standby: the node's role when the connection was taken.
    pub role: Option<&'static str>,
    pub route: Option<Route>,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_time_ms: f64,
    pub mean_time_ms: f64,
    pub min_time_ms: f64,
    pub max_time_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub struct Digests {
    enabled: AtomicBool,
    limit: AtomicUsize,
    tables: Box<[Mutex<Table>]>,
    /// Traces of the same statements (`[telemetry] otlp_endpoint`), set once at start.
    pub tracer: std::sync::OnceLock<crate::obs::trace::Tracer>,
}

impl Digests {
    /// `tables`: one per thread that records (the data path's workers, and one for
    /// everything else).
    pub fn new(tables: usize, enabled: bool, limit: usize) -> Digests {
        Digests {
            enabled: AtomicBool::new(enabled),
            limit: AtomicUsize::new(limit),
            tables: (0..tables.max(1)).map(|_| Mutex::default()).collect(),
            tracer: std::sync::OnceLock::new(),
        }
    }

    /// Sessions follow their statements: for the digests, or for traces.
    pub fn tracking(&self) -> bool {
        self.enabled() || self.tracer.get().is_some()
    }

    /// Traces are on: sessions look for a `traceparent` in their statements.
    pub fn tracing(&self) -> bool {
        self.tracer.get().is_some()
    }

    /// A new config (`[telemetry] query_digests`, `max_digests`): sessions that start
    /// from now on follow it; tables over the new size shrink at their next new entry.
    pub fn configure(&self, enabled: bool, limit: usize) {
        self.enabled.store(enabled, Ordering::Relaxed);
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The table of worker `worker`, locked for a batch of samples.
    pub fn lock(&self, worker: usize) -> Recorder<'_> {
        Recorder {
            table: self.tables[worker % self.tables.len()].lock().unwrap(),
            limit: self.limit.load(Ordering::Relaxed),
        }
    }

    /// Forget every digest (console `RESET QUERIES`).
    pub fn reset(&self) {
        for t in self.tables.iter() {
            let mut t = t.lock().unwrap();
            t.entries.clear();
        }
    }

    /// Every place's statements since start, the workers' tables merged.
    pub fn place_rows(&self) -> Vec<PlaceRow> {
        let mut merged: HashMap<(Arc<str>, Arc<str>, Route, bool), Stats> = HashMap::new();
        for t in self.tables.iter() {
            let t = t.lock().unwrap();
            for e in t.places.values() {
                merged
                    .entry((e.cluster.clone(), e.node.clone(), e.route, e.on_primary))
                    .or_default()
                    .merge(&e.stats);
            }
        }
        let mut rows: Vec<PlaceRow> = merged
            .into_iter()
            .map(|((cluster, node, route, primary), s)| {
                let mut buckets = Vec::with_capacity(LE_MICROS.len() + 1);
                let mut counted = 0;
                for le in LE_MICROS {
                    let below: u64 = (0..BUCKETS)
                        .take_while(|&i| i + 1 < BUCKETS && bucket_floor(i + 1) <= le)
                        .map(|i| s.hist[i] as u64)
                        .sum();
                    buckets.push((le as f64 / 1e6, below - counted));
                    counted = below;
                }
                buckets.push((f64::MAX, s.calls.saturating_sub(counted)));
                PlaceRow {
                    cluster: cluster.to_string(),
                    node: node.to_string(),
                    role: if primary { "primary" } else { "standby" },
                    route,
                    calls: s.calls,
                    errors: s.errors,
                    rows: s.rows,
                    total_seconds: s.total_us as f64 / 1e6,
                    buckets,
                }
            })
            .collect();
        rows.sort_by(|a, b| (&a.cluster, &a.node, a.route).cmp(&(&b.cluster, &b.node, b.route)));
        rows
    }

    /// Entries held, and entries evicted since start, over all tables.
    pub fn counts(&self) -> (u64, u64) {
        self.tables.iter().fold((0, 0), |(n, ev), t| {
            let t = t.lock().unwrap();
            (n + t.entries.len() as u64, ev + t.evicted)
        })
    }

    /// The merged digests of `cluster` (all clusters: None), sorted by `order`, at most
    /// `limit` rows.
    pub fn rows(&self, cluster: Option<&str>, by: Grouping, order: Order, limit: usize) -> Vec<Row> {
        type GroupKey = (Arc<str>, u64, Option<(Arc<str>, Route, bool)>);
        let mut merged: HashMap<GroupKey, (Arc<Digest>, Stats)> = HashMap::new();
        for t in self.tables.iter() {
            let t = t.lock().unwrap();
            for e in t.entries.values() {
                if cluster.is_some_and(|c| c != &*e.cluster) {
                    continue;
                }
                let place = match by {
                    Grouping::Node => Some((e.node.clone(), e.route, e.on_primary)),
                    Grouping::Query => None,
                };
                merged
                    .entry((e.cluster.clone(), e.digest.id, place))
                    .or_insert_with(|| (e.digest.clone(), Stats::default()))
                    .1
                    .merge(&e.stats);
            }
        }
        let ms = |us: f64| (us / 10.0).round() / 100.0;
        let mut rows: Vec<Row> = merged
            .into_iter()
            .map(|((cluster, id, place), (digest, s))| Row {
                digest: format!("{id:016x}"),
                query: digest.text.to_string(),
                cluster: cluster.to_string(),
                node: place.as_ref().map(|p| p.0.to_string()),
                role: place.as_ref().map(|p| if p.2 { "primary" } else { "standby" }),
                route: place.as_ref().map(|p| p.1),
                calls: s.calls,
                errors: s.errors,
                rows: s.rows,
                total_time_ms: ms(s.total_us as f64),
                mean_time_ms: ms(s.total_us as f64 / s.calls.max(1) as f64),
                min_time_ms: ms(if s.calls == 0 { 0.0 } else { s.min_us as f64 }),
                max_time_ms: ms(s.max_us as f64),
                p50_ms: ms(s.quantile(0.5)),
                p99_ms: ms(s.quantile(0.99)),
            })
            .collect();
        let key = |r: &Row| -> f64 {
            match order {
                Order::TotalTime => r.total_time_ms,
                Order::Calls => r.calls as f64,
                Order::Errors => r.errors as f64,
                Order::Rows => r.rows as f64,
                Order::MeanTime => r.mean_time_ms,
                Order::MaxTime => r.max_time_ms,
                Order::P99 => r.p99_ms,
            }
        };
        // Ties in a fixed order, so the view does not shuffle between refreshes.
        rows.sort_by(|a, b| {
            key(b)
                .total_cmp(&key(a))
                .then_with(|| a.digest.cmp(&b.digest))
                .then_with(|| a.node.cmp(&b.node))
                .then_with(|| a.route.cmp(&b.route))
        });
        rows.truncate(limit);
        rows
    }
}

#[cfg(test)]
#[path = "digest_tests.rs"]
mod tests;
