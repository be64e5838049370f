//! OpenTelemetry traces against a real cluster and real clients: a statement sent with a
//! sqlcommenter `traceparent` becomes a span of the application's trace at a real
//! OTLP/HTTP receiver (a small one here, decoding the OpenTelemetry protobuf); the
//! comment changes no digest; with the receiver down, statements are served and the
//! spans are counted as dropped.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// Spans a receiver got, each with its resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on a free port: every span it was sent, with the request's
/// resource `service.name`.
fn receiver() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let seen = spans.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    // One request: its header lines, then Content-Length bytes.
                    let mut len = 0usize;
                    let mut path = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if path.is_empty() {
                            path = line.to_string();
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    assert!(path.starts_with("POST /v1/traces "), "{path}");
                    let req = ExportTraceServiceRequest::decode(&body[..]).unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|a| a.key == "service.name")
                            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                                Value::StringValue(s) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                seen.lock().unwrap().push((service.clone(), s));
                            }
                        }
                    }
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (port, spans)
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some(v.clone()),
            Value::IntValue(v) => Some(v.to_string()),
            Value::DoubleValue(v) => Some(v.to_string()),
            _ => None,
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_statement_with_a_traceparent_becomes_a_span_of_the_applications_trace() {
    let cluster = LocalCluster::start(0).unwrap();
    let (otlp, spans) = receiver();
    let http = free_port();
    // Ratio 0: only statements whose parent is sampled are traced.
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"",
        &format!(
            "[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp}\"\nservice_name = \"sy-test\"\nsample_ratio = 0.0\n"
        ),
    );
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let (psql_parent, psycopg_parent, txn_parent) = ("b7ad6b7169203331", "00f067aa0ba902b7", "53995c3f42cd8ad8");
    // Simple protocol (psql), a sampled parent.
    psql(
        proxy.rw,
        &format!("SELECT 41 AS traced /*traceparent='00-{trace}-{psql_parent}-01'*/"),
    )
    .unwrap();
    // Not sampled by the application, and no comment: no span at ratio 0.
    psql(
        proxy.rw,
        &format!("SELECT 42 AS traced /*traceparent='00-{trace}-{psql_parent}-00'*/"),
    )
    .unwrap();
    psql(proxy.rw, "SELECT 43 AS traced").unwrap();
    // Extended protocol (psycopg 3's unnamed statement), a sampled parent.
    python(
        "traced_query.py",
        &[
            "--port",
            &proxy.rw.to_string(),
            "--traceparent",
            &format!("00-{trace}-{psycopg_parent}-01"),
        ],
        &[],
    );
    // A transaction: psycopg's BEGIN (no comment), two statements with the comment, its
    // COMMIT.
    python(
        "traced_query.py",
        &[
            "--port",
            &proxy.rw.to_string(),
            "--traceparent",
            &format!("00-{trace}-{txn_parent}-01"),
            "--transaction",
        ],
        &[],
    );
    let ours = |spans: &[(String, Span)]| -> Vec<(String, Span)> {
        spans
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .cloned()
            .collect()
    };
    // Each statement ran as a transaction of its own: a transaction span under the
    // application's, and the statement's under it.
    let got = wait_for(
        "both statements' spans at the receiver",
        Duration::from_secs(15),
        || {
            let s = ours(&spans.lock().unwrap());
            (s.len() >= 8).then_some(s)
        },
    );
    // The transaction: one span for its four statements, the application's child; the
    // statements after the first comment are its children (BEGIN came before it).
    let (_, txn) = got
        .iter()
        .find(|(_, s)| hex(&s.parent_span_id) == txn_parent)
        .expect("the transaction's span");
    assert_eq!(attr(txn, "switchyard.statements").as_deref(), Some("4"));
    let mut children: Vec<String> = got
        .iter()
        .filter(|(_, s)| s.parent_span_id == txn.span_id)
        .map(|(_, s)| attr(s, "db.query.text").unwrap())
        .collect();
    children.sort();
    assert_eq!(
        children,
        ["COMMIT", "SELECT $1::int AS traced", "SELECT $1::int AS traced"]
    );
    let of = |parent: &str| {
        assert_ne!(parent, txn_parent);
        let (_, txn) = got
            .iter()
            .find(|(_, s)| hex(&s.parent_span_id) == parent)
            .unwrap_or_else(|| panic!("no span under {parent}"));
        assert_eq!(txn.name, "transaction app");
        assert_eq!(attr(txn, "switchyard.statements").as_deref(), Some("1"));
        assert_eq!(attr(txn, "switchyard.retries").as_deref(), Some("0"));
        assert_eq!(attr(txn, "switchyard.route").as_deref(), Some("primary"));
        let wait: f64 = attr(txn, "switchyard.pool_wait_seconds").unwrap().parse().unwrap();
        assert!((0.0..5.0).contains(&wait), "{wait}");
        got.iter()
            .find(|(_, s)| s.parent_span_id == txn.span_id)
            .unwrap_or_else(|| panic!("no statement under the transaction under {parent}"))
    };
    let (_, extended) = of(psycopg_parent);
    assert_eq!(
        attr(extended, "db.query.text").as_deref(),
        Some("SELECT $1::int AS traced")
    );
    let (service, span) = of(psql_parent);
    assert_eq!(service, "sy-test");
    assert_eq!(span.name, "SELECT app");
    assert_eq!(attr(span, "db.query.text").as_deref(), Some("SELECT $1 AS traced"));
    assert_eq!(attr(span, "db.system.name").as_deref(), Some("postgresql"));
    assert_eq!(attr(span, "db.namespace").as_deref(), Some("app"));
    assert_eq!(attr(span, "switchyard.route").as_deref(), Some("primary"));
    assert_eq!(attr(span, "db.response.returned_rows").as_deref(), Some("1"));
    assert_eq!(
        attr(span, "server.address").as_deref(),
        Some(format!("127.0.0.1:{}", cluster.nodes[0].port).as_str())
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0);
    // The unsampled and the plain statement gave none (the exporter sends every second).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ours(&spans.lock().unwrap()).len(), 8);
    // The comments split no digest: the six statements (the same shape, sent inline
    // or as a parameter) are one.
    let (_, body) = http_get(http, "/queries?cluster=main&by=query");
    let digests: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let traced: Vec<_> = digests
        .iter()
        .filter(|d| d["query"].as_str().unwrap().contains("traced"))
        .collect();
    assert_eq!(traced.len(), 1, "{digests:?}");
    assert_eq!(traced[0]["calls"], 6);
    assert!(digests
        .iter()
        .all(|d| !d["query"].as_str().unwrap().contains("traceparent")));
    let (_, metrics) = http_get(http, "/metrics");
    assert!(metrics.contains("switchyard_trace_spans_exported_total 8"), "{metrics}");
}

#[test]
fn with_the_receiver_down_statements_are_served_and_spans_counted_as_dropped() {
    let cluster = LocalCluster::start(0).unwrap();
    let http = free_port();
    // Nothing listens there.
    let closed = free_port();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"",
        &format!(
            "[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{closed}\"\nsample_ratio = 1.0\n"
        ),
    );
    let statements: Vec<String> = (0..200).map(|i| format!("SELECT {i} AS n")).collect();
    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    let answers = psql_statements(proxy.rw, &refs);
    assert_eq!(answers.len(), 200);
    assert_eq!(answers[199], "199");
    let dropped = wait_for("dropped spans counted", Duration::from_secs(15), || {
        let (_, metrics) = http_get(http, "/metrics");
        let v: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("switchyard_trace_spans_dropped_total "))?
            .parse()
            .ok()?;
        (v >= 200.0).then_some(v)
    });
    report(&format!(
        "receiver down: {dropped} spans dropped, every statement answered"
    ));
}

/// A Django view instrumented with OpenTelemetry and its sqlcommenter option, through
/// Switchyard: the application's request span and Switchyard's statement span arrive at
/// one receiver as one trace, the statement a child of the request.
#[test]
fn a_django_request_and_its_statement_through_switchyard_make_one_trace() {
    let cluster = LocalCluster::start(0).unwrap();
    let (otlp, spans) = receiver();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"",
        &format!("[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp}\"\nsample_ratio = 0.0\n"),
    );
    let out = python(
        "django_otel_check.py",
        &[
            "--port",
            &proxy.rw.to_string(),
            "--otlp",
            &format!("http://127.0.0.1:{otlp}"),
        ],
        &[],
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("trace="))
        .unwrap_or_else(|| panic!("{out}"));
    let (trace, span) = line
        .strip_prefix("trace=")
        .and_then(|l| l.split_once(" span="))
        .unwrap();
    let (app, txn, ours) = wait_for(
        "the application's span and Switchyard's",
        Duration::from_secs(15),
        || {
            let all = spans.lock().unwrap();
            let in_trace: Vec<&(String, Span)> = all.iter().filter(|(_, s)| hex(&s.trace_id) == trace).collect();
            let app = in_trace
                .iter()
                .find(|(svc, s)| svc == "django-app" && hex(&s.span_id) == span)?;
            let ours = in_trace.iter().find(|(svc, s)| {
                svc == "switchyard"
                    && attr(s, "db.query.text").as_deref() == Some("SELECT count(*) FROM pg_class WHERE relname = $1")
            })?;
            let txn = in_trace
                .iter()
                .find(|(svc, s)| svc == "switchyard" && s.span_id == ours.1.parent_span_id)?;
            Some((app.1.clone(), txn.1.clone(), ours.1.clone()))
        },
    );
    assert_eq!(
        hex(&txn.parent_span_id),
        hex(&app.span_id),
        "Switchyard's transaction span is the request's child"
    );
    assert_eq!(
        attr(&ours, "db.query.text").as_deref(),
        Some("SELECT count(*) FROM pg_class WHERE relname = $1")
    );
    assert!(txn.start_time_unix_nano >= app.start_time_unix_nano && txn.end_time_unix_nano <= app.end_time_unix_nano);
    assert!(ours.start_time_unix_nano >= txn.start_time_unix_nano && ours.end_time_unix_nano <= txn.end_time_unix_nano);
}
