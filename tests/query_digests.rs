//! Query digests against a real cluster and real clients: after a known workload,
//! `/queries`, `SHOW QUERIES` and `switchyard top` show exactly its statement shapes,
//! with their call counts, rows and errors, on the nodes routing sent them to, in
//! transaction and session mode.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn ops_config(http: u16) -> String {
    format!(
        "[health]\ninterval_ms = 500\ntimeout_ms = 1000\nrise = 2\nfall = 2\nuser = \"app\"\n\n\
         [admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n\
         [[users]]\nname = \"ops\"\npassword = \"ops\"\nadmin = true\n"
    )
}

/// The digests of `/queries` (by=node|query) whose text names `digest_t`.
fn ours(http: u16, by: &str) -> Vec<Value> {
    let (code, body) = http_get(http, &format!("/queries?cluster=main&by={by}&limit=1000"));
    assert_eq!(code, 200, "{body}");
    let all: Vec<Value> = serde_json::from_str(&body).unwrap();
    all.into_iter()
        .filter(|d| d["query"].as_str().unwrap().contains("digest_t"))
        .collect()
}

fn find<'a>(digests: &'a [Value], starts: &str) -> Vec<&'a Value> {
    digests
        .iter()
        .filter(|d| d["query"].as_str().unwrap().starts_with(starts))
        .collect()
}

fn total(rows: &[&Value], field: &str) -> u64 {
    rows.iter().map(|d| d[field].as_u64().unwrap()).sum()
}

/// `promtool check metrics` (Prometheus's own linter, from Debian's `prometheus`
/// package: scripts/install-deps.sh) accepts the exposition.
fn promtool_accepts(metrics: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus, or scripts/install-deps.sh)");
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn digests_show_each_statement_shape_with_its_calls_rows_errors_and_nodes() {
    let cluster = LocalCluster::start(1).unwrap();
    let http = free_port();
    // Routing alone decides where reads go (read-your-writes would send some of the
    // selects after the inserts to the primary: tests/fresh_reads.rs covers that).
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"\npool_size = 4\nread_write_split = true\nread_your_writes = \"off\"",
        &ops_config(http),
    );
    cluster
        .sql_db(0, APP_DB, "CREATE TABLE digest_t (id int PRIMARY KEY, name text); INSERT INTO digest_t SELECT g, 'n' || g FROM generate_series(0, 99) g; ALTER TABLE digest_t OWNER TO app")
        .unwrap();
    cluster.wait_replayed(Duration::from_secs(20)).unwrap();

    // Extended protocol (psycopg 3): 25 inserts, 10 selects of one shape, half of them
    // with a sqlcommenter traceparent comment.
    python(
        "digest_workload.py",
        &["--port", &proxy.rw.to_string(), "--inserts", "25", "--selects", "10"],
        &[],
    );
    // Simple protocol (psql): 6 counts with other literals and comments, one error.
    for i in 0..6 {
        let comment = if i % 2 == 0 {
            format!("/* request {i} */ ")
        } else {
            String::new()
        };
        let n = psql(
            proxy.rw,
            &format!("{comment}SELECT count(*) FROM digest_t WHERE id < {}", 10 + i),
        )
        .unwrap();
        assert_eq!(n, (10 + i).to_string());
    }
    let err = psql(proxy.rw, "SELECT no_such_column FROM digest_t").unwrap_err();
    assert!(err.contains("no_such_column"), "{err}");

    // Samples are recorded as each statement finishes: all 42 are in by now.
    let by_query = ours(http, "query");
    let shapes: Vec<&str> = by_query.iter().map(|d| d["query"].as_str().unwrap()).collect();
    assert_eq!(
        by_query.len(),
        4,
        "one digest per shape, comments and literals aside: {shapes:#?}"
    );
    assert!(
        shapes
            .iter()
            .all(|s| !s.contains("traceparent") && !s.contains("request")),
        "{shapes:#?}"
    );
    let inserts = find(&by_query, "INSERT INTO digest_t");
    assert_eq!(inserts.len(), 1, "{shapes:#?}");
    assert_eq!(inserts[0]["query"], "INSERT INTO digest_t (id, name) VALUES ($1, $2)");
    assert_eq!(
        (
            total(&inserts, "calls"),
            total(&inserts, "rows"),
            total(&inserts, "errors")
        ),
        (25, 25, 0)
    );
    let selects = find(&by_query, "SELECT name FROM digest_t WHERE id = $1");
    assert_eq!((total(&selects, "calls"), total(&selects, "rows")), (10, 10));
    let counts = find(&by_query, "SELECT count(*) FROM digest_t WHERE id < $1");
    assert_eq!((total(&counts, "calls"), total(&counts, "rows")), (6, 6));
    let failed = find(&by_query, "SELECT no_such_column");
    assert_eq!((total(&failed, "calls"), total(&failed, "errors")), (1, 1));
    for d in &by_query {
        let (mean, max, min) = (
            d["mean_time_ms"].as_f64().unwrap(),
            d["max_time_ms"].as_f64().unwrap(),
            d["min_time_ms"].as_f64().unwrap(),
        );
        assert!(min <= mean && mean <= max && max > 0.0, "{d}");
    }

    // Where each ran: writes on the primary, proven reads split to the standby.
    let by_node = ours(http, "node");
    for d in &by_node {
        let q = d["query"].as_str().unwrap();
        let want = if q.starts_with("INSERT") {
            ("default", "primary", "primary")
        } else {
            ("failover1", "standby", "split")
        };
        assert_eq!(
            (
                d["node"].as_str().unwrap(),
                d["role"].as_str().unwrap(),
                d["route"].as_str().unwrap()
            ),
            want,
            "{d}"
        );
    }
    let (code, body) = http_get(http, "/queries?order=fastest");
    assert!(code == 400 && body.contains("total_time"), "{code} {body}");
    assert_eq!(http_get(http, "/queries?cluster=nope").0, 400);
    let (_, body) = http_get(http, "/queries?cluster=main&order=calls&limit=1");
    let top: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(top.len(), 1);
    assert!(top[0]["calls"].as_u64().unwrap() >= 25, "{top:?}");

    // The console and `switchyard top` show the same.
    let shown = psql_db(proxy.rw, "ops", "ops", "switchyard", "SHOW QUERIES main").unwrap();
    let line = shown
        .lines()
        .find(|l| l.contains("INSERT INTO digest_t"))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(line.contains("|default|primary|primary|25|0|25|"), "{line}");
    let out = Command::new(switchyard_bin())
        .args([
            "top",
            "--url",
            &format!("http://127.0.0.1:{http}"),
            "--once",
            "--order",
            "calls",
        ])
        .env("COLUMNS", "200")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let row = text
        .lines()
        .find(|l| l.contains("INSERT INTO digest_t"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains(" 25 ") && row.contains("main.default"), "{row}");

    // Metrics count the digests; RESET QUERIES forgets them.
    let (_, metrics) = http_get(http, "/metrics");
    let held: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_query_digests "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(held >= 4.0, "{held}");
    // The per-place query metrics: a histogram and counters, from the same samples.
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    let primary = "{cluster=\"main\",node=\"default\",role=\"primary\",route=\"primary\"}";
    let standby = "{cluster=\"main\",node=\"failover1\",role=\"standby\",route=\"split\"}";
    assert!(value(&format!("switchyard_query_duration_seconds_count{primary}")) >= 25.0);
    assert!(value(&format!("switchyard_query_rows_total{primary}")) >= 25.0);
    assert!(value(&format!("switchyard_query_errors_total{standby}")) >= 1.0);
    assert!(value(&format!("switchyard_query_duration_seconds_count{standby}")) >= 17.0);
    // Each autocommit statement is a transaction of its own, on the node that ran it;
    // the one error, by its SQLSTATE class (42703: undefined column); bytes both ways.
    let txns = |node: &str| {
        value(&format!(
            "switchyard_transaction_duration_seconds_count{{cluster=\"main\",endpoint=\"rw\",node=\"{node}\"}}"
        ))
    };
    assert!(txns("default") >= 25.0 && txns("failover1") >= 17.0);
    assert_eq!(
        value("switchyard_server_errors_total{cluster=\"main\",class=\"42\"}"),
        1.0
    );
    let received = value("switchyard_client_received_bytes_total{cluster=\"main\",endpoint=\"rw\"}");
    let sent = value("switchyard_client_sent_bytes_total{cluster=\"main\",endpoint=\"rw\"}");
    assert!(received > 2000.0 && sent > 2000.0, "{received} {sent}");
    promtool_accepts(&metrics);
    psql_db(proxy.rw, "ops", "ops", "switchyard", "RESET QUERIES").unwrap();
    assert!(ours(http, "node").is_empty());

    // Session mode, where the relay passes bytes through: the same shapes, all on the
    // primary through rw, on the standby through ro.
    drop(proxy);
    let http = free_port();
    let proxy = Proxy::start(&cluster, "session", "", &ops_config(http));
    python(
        "digest_workload.py",
        &[
            "--port",
            &proxy.rw.to_string(),
            "--inserts",
            "12",
            "--selects",
            "8",
            "--first-id",
            "2000",
        ],
        &[],
    );
    for i in 0..3 {
        psql(proxy.ro, &format!("SELECT count(*) FROM digest_t WHERE id < {i}")).unwrap();
    }
    let by_node = ours(http, "node");
    let summary: Vec<(String, String, String, u64, u64)> = by_node
        .iter()
        .map(|d| {
            (
                d["query"].as_str().unwrap().to_string(),
                d["node"].as_str().unwrap().to_string(),
                d["route"].as_str().unwrap().to_string(),
                d["calls"].as_u64().unwrap(),
                d["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = |q: &str, node: &str, route: &str, calls: u64, rows: u64| {
        assert!(
            summary.contains(&(q.to_string(), node.to_string(), route.to_string(), calls, rows)),
            "{q} on {node} ({route}) x{calls}: {summary:#?}"
        )
    };
    want(
        "INSERT INTO digest_t (id, name) VALUES ($1, $2)",
        "default",
        "primary",
        12,
        12,
    );
    want("SELECT name FROM digest_t WHERE id = $1", "default", "primary", 8, 8);
    want(
        "SELECT count(*) FROM digest_t WHERE id < $1",
        "failover1",
        "replica",
        3,
        3,
    );
    assert_eq!(summary.len(), 3, "{summary:#?}");
}

#[test]
fn digests_can_be_switched_off() {
    let cluster = LocalCluster::start(0).unwrap();
    let http = free_port();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"",
        &format!("{}\n[telemetry]\nquery_digests = false\n", ops_config(http)),
    );
    psql(proxy.rw, "SELECT 1 AS digest_t").unwrap();
    let (code, body) = http_get(http, "/queries");
    assert_eq!((code, body.as_str()), (200, "[]"));
}

/// MySQL/MariaDB: the text protocol (the `mariadb` CLI) and the binary protocol's
/// prepared statements (mysql_async) share digests; reads split to the replica, through
/// ro, and writes on the primary are told apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_digests_show_each_statement_shape_on_its_node() {
    use common::mysql::*;
    use mysql_async::prelude::Queryable;

    let cluster = MariaCluster::start(1).unwrap();
    let http = free_port();
    let (rw, ro) = (free_port(), free_port());
    let text = format!(
        "[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n{}",
        my_config(&cluster, rw, ro, "read_write_split = true\nread_your_writes = \"off\"")
    );
    let proxy = my_spawn(&cluster, "proxy", &text, rw, ro);
    wait_for("MySQL proxy ready", Duration::from_secs(30), || {
        let w = mariadb(proxy.rw, "SELECT @@read_only").ok()? == "0";
        let r = mariadb(proxy.ro, "SELECT @@read_only").ok()? == "1";
        (w && r).then_some(())
    });
    cluster
        .sql(0, &format!("CREATE TABLE {MY_APP_DB}.digest_t (id INT PRIMARY KEY, name TEXT); INSERT INTO {MY_APP_DB}.digest_t VALUES (1, 'a'), (2, 'b'), (3, 'c')"))
        .unwrap();
    cluster.wait_replicated(0, Duration::from_secs(30)).unwrap();

    // Text protocol: 5 inserts (other literals, some with a comment), 3 counts through
    // rw (split to the replica), 2 through ro, one error.
    for i in 0..5 {
        let comment = if i % 2 == 0 {
            format!("/* request {i} */ ")
        } else {
            String::new()
        };
        mariadb(
            proxy.rw,
            &format!("{comment}INSERT INTO digest_t (id, name) VALUES ({}, 'n{i}')", 100 + i),
        )
        .unwrap();
    }
    for (port, n) in [(proxy.rw, 3), (proxy.ro, 2)] {
        for i in 0..n {
            mariadb(port, &format!("SELECT count(*) FROM digest_t WHERE id < {}", 2 + i)).unwrap();
        }
    }
    let err = mariadb(proxy.rw, "SELECT no_such_column FROM digest_t").unwrap_err();
    assert!(err.contains("no_such_column"), "{err}");
    // Binary protocol: 3 prepared inserts, 4 prepared selects.
    let pool = mysql_async::Pool::new(my_opts(proxy.rw));
    let mut conn = pool.get_conn().await.unwrap();
    for i in 0..3 {
        conn.exec_drop(
            "INSERT INTO digest_t (id, name) VALUES (?, ?)",
            (200 + i, format!("p{i}")),
        )
        .await
        .unwrap();
    }
    for i in 1..=4 {
        let _: Vec<String> = conn
            .exec("SELECT name FROM digest_t WHERE id = ?", (i % 3 + 1,))
            .await
            .unwrap();
    }
    drop(conn);
    pool.disconnect().await.unwrap();

    let by_node = ours(http, "node");
    let summary: Vec<(String, String, String, u64, u64, u64)> = by_node
        .iter()
        .map(|d| {
            (
                d["query"].as_str().unwrap().to_string(),
                d["role"].as_str().unwrap().to_string(),
                d["route"].as_str().unwrap().to_string(),
                d["calls"].as_u64().unwrap(),
                d["rows"].as_u64().unwrap(),
                d["errors"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = |q: &str, role: &str, route: &str, calls: u64, rows: u64, errors: u64| {
        let row = (q.to_string(), role.to_string(), route.to_string(), calls, rows, errors);
        assert!(summary.contains(&row), "{row:?} in {summary:#?}");
    };
    // The text inserts and the prepared ones are one shape.
    want(
        "INSERT INTO digest_t (id, name) VALUES (?, ?)",
        "primary",
        "primary",
        8,
        8,
        0,
    );
    want(
        "SELECT count(*) FROM digest_t WHERE id < ?",
        "standby",
        "split",
        3,
        3,
        0,
    );
    want(
        "SELECT count(*) FROM digest_t WHERE id < ?",
        "standby",
        "replica",
        2,
        2,
        0,
    );
    want("SELECT no_such_column FROM digest_t", "standby", "split", 1, 0, 1);
    want("SELECT name FROM digest_t WHERE id = ?", "primary", "primary", 4, 4, 0);
    assert_eq!(summary.len(), 5, "{summary:#?}");
    // The error by its SQLSTATE class (42S22: unknown column); bytes both ways.
    let (_, metrics) = http_get(http, "/metrics");
    assert!(
        metrics.contains("switchyard_server_errors_total{cluster=\"main\",class=\"42\"} 1\n"),
        "{metrics}"
    );
    for dir in ["received", "sent"] {
        let line = format!("switchyard_client_{dir}_bytes_total{{cluster=\"main\",endpoint=\"rw\"}} ");
        let n: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {line} in {metrics}"))
            .parse()
            .unwrap();
        assert!(n > 500, "{line}{n}");
    }
}
