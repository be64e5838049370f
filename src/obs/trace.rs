//! OpenTelemetry traces: a span per statement (and, in transaction pooling, per
//! transaction, its statements' parent), sent over OTLP/HTTP (protobuf) to
//! `[telemetry] otlp_endpoint`. A statement that carries a W3C `traceparent` in a
//! sqlcommenter comment (`/*traceparent='00-…-…-01'*/`, what Django's OpenTelemetry
//! instrumentation adds) becomes a child of the application's span, sampled as its
//! parent says; others are sampled at `sample_ratio`.
//!
//! Spans are built after the fact from what the data path already measures (when a
//! statement was sent, when its answer came: `obs::digest::Finished`), and handed to an
//! exporter thread through a bounded queue: `submit` never blocks, and a full queue
//! (a receiver down or slow) drops the span and counts it. The OTLP data model and its
//! encoding are the OpenTelemetry project's own (`opentelemetry-proto`); the SDK's
//! tracer is not used because its batch processor does not report what it drops and
//! the spans here are not timed by it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

/// Spans waiting for the exporter at most; past it they are dropped (counted).
const QUEUE: usize = 4096;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How long the exporter gathers a batch before sending what it has.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// One export request's bound (a slow receiver fills the queue, never the data path).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the exporter takes what the queue holds (`Exporter::run`): at 4,096 spans
/// a queue, up to about 80,000 spans a second.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// After a failed export, what comes is dropped without a try for this long, doubled
/// at each failure up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub use crate::traceparent::{traceparent, TraceParent};

/// What `[telemetry]` (or the standard `OTEL_*` variables) says about traces.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// Where spans go: the full URL of the OTLP/HTTP traces endpoint.
    pub url: String,
    pub service_name: String,
    pub sample_ratio: f64,
}

impl TraceSettings {
    /// From the config's keys, else the environment (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// as is, `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`, `OTEL_SERVICE_NAME`); None
    /// when no endpoint is set anywhere (no tracing).
    pub fn resolve(
        endpoint: Option<&str>,
        service_name: Option<&str>,
        sample_ratio: f64,
        env: impl Fn(&str) -> Option<String>,
    ) -> Option<TraceSettings> {
        let url = match endpoint {
            Some(base) => traces_url(base),
            None => env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| traces_url(&b)))?,
        };
        let service_name = service_name
            .map(str::to_string)
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "switchyard".into());
        Some(TraceSettings {
            url,
            service_name,
            sample_ratio: sample_ratio.clamp(0.0, 1.0),
        })
    }
}

/// An OTLP base URL (`http://host:4318`) with the traces path, unless it has one.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// A statement's span, before encoding.
pub struct StatementSpan<'a> {
    pub parent: Option<TraceParent>,
    pub start: SystemTime,
    pub end: SystemTime,
    /// `db.system.name`: postgresql / mysql.
    pub system: &'static str,
    pub namespace: &'a str,
    pub query: &'a str,
    pub node: &'a str,
    pub route: &'static str,
    pub cluster: &'a str,
    pub rows: u64,
    pub failed: bool,
}

/// A transaction's span, before encoding (transaction pooling: from the request that
/// started it to the connection's release).
pub struct TransactionSpan<'a> {
    pub start: SystemTime,
    pub end: SystemTime,
    pub system: &'static str,
    pub namespace: &'a str,
    /// The node that ran it (the last one, after retries).
    pub node: &'a str,
    pub route: &'static str,
    pub cluster: &'a str,
    pub statements: u32,
    /// Waiting for a server connection, and for a standby to replay the client's writes.
    pub pool_wait: Duration,
    pub causal_wait: Duration,
    /// Runs of a read moved to another node after its first failed there.
    pub retries: u32,
    pub failed: bool,
}

/// A transaction's trace while it runs, so that its statements' spans are children of
/// its span, and its span a child of the application's. Whether it is traced is decided
/// by the first statement that carries a `traceparent` (a transaction's BEGIN, sent by
/// the driver, has none; the statements after it do), else once at the sample ratio.
#[derive(Debug, Default)]
pub struct UnitTrace {
    /// Decided: traced (with its ids) or not.
    decided: Option<Option<UnitIds>>,
    /// The ratio said no; a statement with a sampled `traceparent` may still say yes.
    declined: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct UnitIds {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The application's span, if a statement carried one.
    parent: Option<TraceParent>,
}

impl UnitTrace {
    /// The parent of a statement of this transaction whose comment carries `app`: the
    /// transaction's span; None when the transaction is not traced (or not yet).
    pub fn statement_parent(&mut self, tracer: &Tracer, app: Option<&TraceParent>) -> Option<TraceParent> {
        if self.decided.is_none() {
            let traced = match app {
                Some(p) => Some(p.sampled),
                None if self.declined => None,
                None => Some(tracer.sampled(None)),
            };
            match traced {
                Some(true) => {
                    self.decided = Some(Some(UnitIds {
                        trace_id: app.map_or_else(rand::random, |p| p.trace_id),
                        span_id: rand::random(),
                        parent: app.copied(),
                    }))
                }
                Some(false) if app.is_some() => self.decided = Some(None),
                _ => self.declined = true,
            }
        }
        self.decided.flatten().map(|i| TraceParent {
            trace_id: i.trace_id,
            span_id: i.span_id,
            sampled: true,
        })
    }

    /// The transaction ended: its ids if it is traced; ready for the next one.
    pub fn take(&mut self) -> Option<UnitIds> {
        self.declined = false;
        self.decided.take().flatten()
    }
}

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub struct TraceCounts {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub export_failures: AtomicU64,
}

pub struct Tracer {
    pub settings: TraceSettings,
    tx: SyncSender<Span>,
    pub counts: Arc<TraceCounts>,
}

impl Tracer {
    /// Start the exporter thread.
    pub fn start(settings: TraceSettings) -> std::io::Result<Tracer> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let counts = Arc::new(TraceCounts::default());
        let exporter = Exporter {
            url: settings.url.clone(),
            resource: Resource {
                attributes: vec![kv("service.name", settings.service_name.clone())],
                ..Default::default()
            },
            counts: counts.clone(),
        };
        std::thread::Builder::new()
            .name("switchyard-otlp".into())
            .spawn(move || exporter.run(rx))?;
        Ok(Tracer { settings, tx, counts })
    }

    /// Whether a statement with this parent (or none) is traced: as its parent says,
    /// else at the sample ratio.
    pub fn sampled(&self, parent: Option<&TraceParent>) -> bool {
        match parent {
            Some(p) => p.sampled,
            None => self.settings.sample_ratio > 0.0 && rand::random::<f64>() < self.settings.sample_ratio,
        }
    }

    /// Queue a statement's span (already sampled); dropped and counted if the queue is
    /// full.
    pub fn submit(&self, s: &StatementSpan<'_>) {
        let (trace_id, parent_span_id) = match s.parent {
            Some(p) => (p.trace_id.to_vec(), p.span_id.to_vec()),
            None => (rand::random::<[u8; 16]>().to_vec(), Vec::new()),
        };
        // OpenTelemetry's database conventions: the span is named by the operation and
        // carries the normalized text.
        let operation = s
            .query
            .split_whitespace()
            .next()
            .unwrap_or("statement")
            .to_ascii_uppercase();
        let span = Span {
            trace_id,
            span_id: rand::random::<[u8; 8]>().to_vec(),
            parent_span_id,
            flags: 1,
            name: format!("{operation} {}", s.namespace),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            attributes: vec![
                kv("db.system.name", s.system.to_string()),
                kv("db.namespace", s.namespace.to_string()),
                kv("db.query.text", s.query.to_string()),
                kv("db.operation.name", operation),
                kv("server.address", s.node.to_string()),
                kv("db.response.returned_rows", s.rows as i64),
                kv("switchyard.cluster", s.cluster.to_string()),
                kv("switchyard.route", s.route.to_string()),
            ],
            status: failed(s.failed),
            ..Default::default()
        };
        self.send(span);
    }

    /// Queue a transaction's span (`ids` from its `UnitTrace`).
    pub fn submit_transaction(&self, ids: UnitIds, t: &TransactionSpan<'_>) {
        let span = Span {
            trace_id: ids.trace_id.to_vec(),
            span_id: ids.span_id.to_vec(),
            parent_span_id: ids.parent.map(|p| p.span_id.to_vec()).unwrap_or_default(),
            flags: 1,
            name: format!("transaction {}", t.namespace),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: nanos(t.start),
            end_time_unix_nano: nanos(t.end),
            attributes: vec![
                kv("db.system.name", t.system.to_string()),
                kv("db.namespace", t.namespace.to_string()),
                kv("server.address", t.node.to_string()),
                kv("switchyard.cluster", t.cluster.to_string()),
                kv("switchyard.route", t.route.to_string()),
                kv("switchyard.statements", t.statements as i64),
                kv("switchyard.pool_wait_seconds", t.pool_wait.as_secs_f64()),
                kv("switchyard.causal_wait_seconds", t.causal_wait.as_secs_f64()),
                kv("switchyard.retries", t.retries as i64),
            ],
            status: failed(t.failed),
            ..Default::default()
        };
        self.send(span);
    }

    fn send(&self, span: Span) {
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

fn failed(failed: bool) -> Option<Status> {
    failed.then(|| Status {
        code: status::StatusCode::Error as i32,
        message: "the server answered with an error, or the connection was lost".into(),
    })
}

trait IntoAny {
    fn into_any(self) -> any_value::Value;
}

impl IntoAny for String {
    fn into_any(self) -> any_value::Value {
        any_value::Value::StringValue(self)
    }
}

impl IntoAny for i64 {
    fn into_any(self) -> any_value::Value {
        any_value::Value::IntValue(self)
    }
}

impl IntoAny for f64 {
    fn into_any(self) -> any_value::Value {
        any_value::Value::DoubleValue(self)
    }
}

fn kv(key: &str, v: impl IntoAny) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(v.into_any()),
        }),
        ..Default::default()
    }
}

/// The exporter's connection to the receiver and its backoff after failures.
struct Link {
    agent: ureq::Agent,
    backoff: Duration,
    retry_at: Instant,
}

struct Exporter {
    url: String,
    resource: Resource,
    counts: Arc<TraceCounts>,
}

impl Exporter {
    /// Gather spans into batches and send them until every sender is gone. The queue is
    /// polled (`DRAIN_EVERY`), never waited on: a receiver blocked on it would be woken
    /// (a futex call and a switch of threads) by every span sent, which cost the data
    /// path about 10 µs a transaction at `sample_ratio = 1`.
    fn run(self, rx: Receiver<Span>) {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(EXPORT_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut link = Link {
            agent,
            backoff: Duration::ZERO,
            retry_at: Instant::now(),
        };
        let mut batch = Vec::with_capacity(BATCH);
        let mut oldest = Instant::now();
        loop {
            std::thread::sleep(DRAIN_EVERY);
            let closed = loop {
                match rx.try_recv() {
                    Ok(s) => {
                        if batch.is_empty() {
                            oldest = Instant::now();
                        }
                        batch.push(s);
                        if batch.len() == BATCH {
                            self.export(&mut link, &mut batch);
                        }
                    }
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            if !batch.is_empty() && (closed || oldest.elapsed() >= FLUSH_EVERY) {
                self.export(&mut link, &mut batch);
            }
            if closed {
                return;
            }
        }
    }

    /// Send `batch` (emptied), or drop it while the receiver is backed off from.
    fn export(&self, link: &mut Link, batch: &mut Vec<Span>) {
        let n = batch.len() as u64;
        let now = Instant::now();
        if now < link.retry_at {
            self.counts.dropped.fetch_add(n, Ordering::Relaxed);
            batch.clear();
            return;
        }
        let body = self.request(std::mem::take(batch)).encode_to_vec();
        let failed = match link
            .agent
            .post(&self.url)
            .header("Content-Type", "application/x-protobuf")
            .send(&body[..])
        {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("the receiver answered HTTP {}", r.status().as_u16())),
            Err(e) => Some(e.to_string()),
        };
        match failed {
            None => {
                self.counts.exported.fetch_add(n, Ordering::Relaxed);
                if !link.backoff.is_zero() {
                    tracing::info!(url = %self.url, "OTLP receiver takes spans again");
                }
                link.backoff = Duration::ZERO;
            }
            Some(reason) => {
                self.counts.export_failures.fetch_add(1, Ordering::Relaxed);
                self.counts.dropped.fetch_add(n, Ordering::Relaxed);
                // One try per backoff period, so one warning per period at most.
                link.backoff = (link.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                link.retry_at = Instant::now() + link.backoff;
                tracing::warn!(url = %self.url, error = %reason, spans = n, retry_in_s = link.backoff.as_secs(),
                               "cannot send spans to the OTLP receiver; spans are dropped until the next try");
            }
        }
    }

    fn request(&self, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "switchyard".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_config_else_the_environment() {
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318/".to_string()),
            "OTEL_SERVICE_NAME" => Some("from-env".to_string()),
            _ => None,
        };
        let s = TraceSettings::resolve(None, None, 2.0, env).unwrap();
        assert_eq!(
            (s.url.as_str(), s.service_name.as_str(), s.sample_ratio),
            ("http://collector:4318/v1/traces", "from-env", 1.0)
        );
        let s = TraceSettings::resolve(Some("http://127.0.0.1:4318"), Some("sy"), 0.5, env).unwrap();
        assert_eq!(
            (s.url.as_str(), s.service_name.as_str()),
            ("http://127.0.0.1:4318/v1/traces", "sy")
        );
        assert_eq!(TraceSettings::resolve(None, None, 0.1, |_| None), None);
    }

    #[test]
    fn a_transaction_is_traced_as_its_first_traceparent_says() {
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Tracer::start(TraceSettings {
            url: format!("http://{}/v1/traces", hung.local_addr().unwrap()),
            service_name: "t".into(),
            sample_ratio: 0.0,
        })
        .unwrap();
        let app = TraceParent {
            trace_id: [7; 16],
            span_id: [8; 8],
            sampled: true,
        };
        let mut u = UnitTrace::default();
        // BEGIN (no comment, the ratio says no), then the application's statements.
        assert_eq!(u.statement_parent(&t, None), None);
        let p = u.statement_parent(&t, Some(&app)).expect("traced");
        assert_eq!((p.trace_id, p.sampled), (app.trace_id, true));
        assert_ne!(p.span_id, app.span_id);
        // COMMIT: under the same transaction span.
        assert_eq!(u.statement_parent(&t, None), Some(p));
        let ids = u.take().expect("traced");
        assert_eq!((ids.span_id, ids.parent), (p.span_id, Some(app)));
        // The next transaction starts undecided; an unsampled parent says no for good.
        let no = TraceParent { sampled: false, ..app };
        assert_eq!(u.statement_parent(&t, Some(&no)), None);
        assert_eq!(u.statement_parent(&t, Some(&app)), None);
        assert!(u.take().is_none());
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A receiver that takes the connection and never answers: the exporter waits
        // on its first request, and the queue fills.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Tracer::start(TraceSettings {
            url: format!("http://{}/v1/traces", hung.local_addr().unwrap()),
            service_name: "t".into(),
            sample_ratio: 1.0,
        })
        .unwrap();
        let now = SystemTime::now();
        let span = StatementSpan {
            parent: None,
            start: now,
            end: now,
            system: "postgresql",
            namespace: "app",
            query: "SELECT $1",
            node: "n",
            route: "primary",
            cluster: "main",
            rows: 1,
            failed: false,
        };
        let started = Instant::now();
        for _ in 0..QUEUE * 2 + 10 {
            t.submit(&span);
        }
        assert!(started.elapsed() < Duration::from_secs(2), "submit waited");
        // At most a batch taken by the exporter and a full queue were not dropped.
        let dropped = t.counts.dropped.load(Ordering::Relaxed);
        assert!(dropped >= (QUEUE - BATCH) as u64 + 10, "{dropped} dropped");
    }
}
