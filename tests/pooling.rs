//! Transaction pooling and read/write splitting against real clusters and real clients.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const TXN: &str = "pool_mode = \"transaction\"\npool_size = 10\ncheckout_timeout_ms = 20000";
const SPLIT: &str = "pool_mode = \"transaction\"\npool_size = 10\ncheckout_timeout_ms = 20000\nread_write_split = true";

/// Server connections of `app` on a node, as the node itself counts them.
fn app_backends(cluster: &LocalCluster, node: usize) -> i64 {
    cluster
        .sql(node, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND application_name <> 'switchyard-health'")
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn pgbench_200_clients_over_10_server_connections_in_every_protocol_mode() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", TXN, "");
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    // Sample the primary's connection count while the load runs.
    let sampler_cluster_dir = cluster.socket_dir.clone();
    let port = cluster.nodes[0].port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let bin = cluster.bin.clone();
    let sampler = std::thread::spawn(move || {
        let mut max = 0i64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let out = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("psql"))
                .args(["-X", "-At", "-h", sampler_cluster_dir.to_str().unwrap(), "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                .args(["-c", "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND application_name <> 'switchyard-health'"])
                .output()
                .unwrap();
            if let Ok(n) = String::from_utf8_lossy(&out.stdout).trim().parse::<i64>() {
                max = max.max(n);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        max
    });
    for (mode, select_only) in [
        ("simple", false),
        ("extended", false),
        ("prepared", false),
        ("prepared", true),
    ] {
        let mut args = vec!["-c", "200", "-j", "4", "-t", "20", "-M", mode];
        if select_only {
            args.push("-S");
        }
        let out = pgbench(proxy.rw, &args);
        assert!(
            out.contains("number of transactions actually processed: 4000/4000"),
            "{mode}: {out}"
        );
        assert!(out.contains("number of failed transactions: 0"), "{mode}: {out}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max = sampler.join().unwrap();
    report(&format!(
        "max server connections of app on the primary under 200 clients: {max}"
    ));
    assert!(
        max <= 10,
        "the primary had {max} connections of app, over pool_size = 10"
    );
    assert!(app_backends(&cluster, 0) <= 10);
}

fn xact_commits(cluster: &LocalCluster, node: usize) -> i64 {
    cluster
        .sql(node, "SELECT xact_commit FROM pg_stat_database WHERE datname = 'app'")
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn read_write_split_sends_reads_to_standbys_and_everything_else_to_the_primary() {
    let cluster = LocalCluster::start(2).unwrap();
    // Routing rules only: with read-your-writes on, the reads after the transaction and
    // FOR UPDATE below would go to the primary until the standbys replayed them
    // (tests/fresh_reads.rs covers that).
    let proxy = Proxy::start(&cluster, "proxy", &format!("{SPLIT}\nread_your_writes = \"off\""), "");
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    // A sequence: nextval() writes, so it must run on the primary (a standby would refuse).
    psql(proxy.rw, "CREATE SEQUENCE pgbench_history_seq_dummy").unwrap();
    cluster.wait_replayed(Duration::from_secs(20)).unwrap();

    // One session, several units of work, each routed on its own merits.
    let answers = psql_statements(
        proxy.rw,
        &[
            "SELECT pg_is_in_recovery()",
            "BEGIN; SELECT pg_is_in_recovery(); COMMIT",
            "/* switchyard:primary */ SELECT pg_is_in_recovery()",
            "SELECT pg_is_in_recovery() FROM pgbench_branches FOR UPDATE",
            "SET switchyard.route = 'primary'",
            "SELECT pg_is_in_recovery()",
            "RESET switchyard.route",
            "SELECT pg_is_in_recovery()",
            "BEGIN READ ONLY; SELECT pg_is_in_recovery(); COMMIT",
            "SELECT nextval('pgbench_history_seq_dummy') > 0",
        ],
    );
    assert_eq!(
        answers,
        ["t", "f", "f", "f", "f", "t", "t", "t"],
        "standby, txn, hint, FOR UPDATE, forced, back to standby, read-only txn, nextval on the primary"
    );

    let before: Vec<i64> = (0..3).map(|i| xact_commits(&cluster, i)).collect();
    let out = pgbench(proxy.rw, &["-S", "-c", "20", "-j", "2", "-t", "100", "-M", "prepared"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    // Backends flush their statistics when idle, at most every few seconds: poll.
    let delta: Vec<i64> = wait_for("standby statistics", Duration::from_secs(30), || {
        let after: Vec<i64> = (0..3).map(|i| xact_commits(&cluster, i)).collect();
        let delta: Vec<i64> = before.iter().zip(&after).map(|(b, a)| a - b).collect();
        (delta[1] + delta[2] >= 2000).then_some(delta)
    });
    report(&format!("select-only through rw with read_write_split: transactions per node (primary, failover1, failover2): {delta:?}"));
    assert!(delta[1] + delta[2] >= 2000, "standbys served {delta:?}");
    assert!(delta[0] < 200, "the primary served {delta:?}");

    // Writes all land on the primary: a write sent to a standby would fail.
    let out = pgbench(proxy.rw, &["-c", "20", "-j", "2", "-t", "50", "-M", "extended"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert_eq!(
        cluster
            .sql_db(0, APP_DB, "SELECT count(*) FROM pgbench_history")
            .unwrap(),
        "1000"
    );
}

#[test]
fn a_standby_killed_under_read_load_causes_no_client_error() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", SPLIT, "");
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    cluster.wait_replayed(Duration::from_secs(20)).unwrap();
    // Through rw with splitting, and through the ro endpoint, at once.
    let loads: Vec<_> = [proxy.rw, proxy.ro]
        .into_iter()
        .map(|port| {
            std::thread::spawn(move || pgbench(port, &["-n", "-S", "-c", "8", "-j", "2", "-T", "6", "-M", "prepared"]))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill9(1).unwrap();
    for (load, endpoint) in loads.into_iter().zip(["rw", "ro"]) {
        let out = load.join().unwrap();
        assert!(out.contains("number of failed transactions: 0"), "{endpoint}: {out}");
        assert!(!out.contains("error"), "{endpoint}: {out}");
    }
    let log = proxy.log_text();
    report(&format!(
        "reads retried on another node after the kill: {}",
        log.matches("retrying it on another node").count()
    ));
}

#[test]
fn a_lone_standby_stopped_immediately_under_read_load_fails_no_transaction_in_any_protocol() {
    // One standby: the reads it held move to the primary. `-m immediate` makes the
    // standby's backends vanish mid-answer (reset, EOF or FATAL, whichever comes first).
    for mode in ["simple", "extended", "prepared"] {
        let cluster = LocalCluster::start(1).unwrap();
        let proxy = Proxy::start(&cluster, "proxy", SPLIT, "");
        pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
        cluster.wait_replayed(Duration::from_secs(20)).unwrap();
        let port = proxy.rw;
        let load = std::thread::spawn(move || pgbench(port, &["-S", "-c", "20", "-j", "2", "-T", "5", "-M", mode]));
        std::thread::sleep(Duration::from_millis(1500));
        cluster.stop_node(1, "immediate").unwrap();
        let out = load.join().unwrap();
        assert!(
            out.contains("number of failed transactions: 0"),
            "-M {mode}: {out}\n{}",
            proxy.log_text()
        );
        assert!(!out.contains("error"), "-M {mode}: {out}");
        report(&format!(
            "-M {mode}: reads retried after the standby stopped: {}",
            proxy.log_text().matches("retrying it on another node").count()
        ));
    }
}

/// The `django-suite: ran=... failures=...` line of tests/python/django_suite.py, minus timing.
/// Django's own suite against `port`, its test databases named after `prefix`.
fn django_suite(port: u16, prefix: &str) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/django_suite.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--port",
            &port.to_string(),
            "--db-prefix",
            prefix,
            "--labels",
            "basic",
            "queries",
            "transactions",
            "backends",
        ])
        .output()
        .expect("run django_suite.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text
        .lines()
        .find(|l| l.starts_with("django-suite:"))
        .unwrap_or_else(|| panic!("no summary line:\n{text}"))
        .to_string();
    report(&summary);
    assert!(!summary.contains("ran=0 "), "the suite did not run:\n{text}");
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("FAIL:") || l.starts_with("ERROR:"))
        .collect();
    // Keep counts, drop the timing.
    format!("{} {:?}", summary.split(" seconds=").next().unwrap(), failures)
}

#[test]
fn djangos_own_test_suite_gives_the_same_results_through_the_proxy() {
    let cluster = LocalCluster::start(1).unwrap();
    // Plain asynchronous replication, with the standby applying WAL 2 s late: the
    // suite's reads right after its writes see them only through read-your-writes.
    cluster.apply_late(Duration::from_secs(2)).unwrap();
    // The suite writes on one connection and reads on the next (a test closes its
    // connection and opens another; a thread gets its own): the floor is shared by the
    // user's connections.
    let proxy = Proxy::start(&cluster, "proxy", &format!("{SPLIT}\nread_your_writes = \"user\""), "");
    // Its own database names: the direct run's test databases, dropped on the primary,
    // may still be on the late standby, and a new connection that has written nothing
    // yet would read them (read-your-writes is per connection; see README).
    let direct = django_suite(cluster.nodes[0].port, "django_suite");
    let through = django_suite(proxy.rw, "django_suite_proxy");
    assert_eq!(direct, through);
    assert!(
        proxy.log_text().contains("client pinned"),
        "iterator()-style WITH HOLD cursors should pin"
    );
}

#[test]
fn psycopg_2_and_3_work_in_transaction_mode_with_read_write_split() {
    let cluster = LocalCluster::start(1).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", SPLIT, "");
    let out = python(
        "psycopg_check.py",
        &[
            "--rw-port",
            &proxy.rw.to_string(),
            "--ro-port",
            &proxy.ro.to_string(),
            "--transaction-mode",
        ],
        &[],
    );
    assert!(out.contains("ok: all psycopg checks passed"), "{out}");
    let pins = proxy.log_text().matches("client pinned").count();
    report(&format!(
        "psycopg transaction-mode checks: {} ok lines, {pins} pinned clients",
        out.matches("ok: ").count()
    ));
}

/// A session advisory lock, a WITH HOLD cursor or a temporary table pins a client only
/// while its session holds one: with one server connection, another client waits while
/// they are held and is served on that same connection once they are released.
#[test]
fn advisory_locks_hold_cursors_and_temporary_tables_pin_only_while_held() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"\npool_size = 1\ncheckout_timeout_ms = 10000",
        // One worker thread: one server connection in all (pools are shared among them).
        "[proxy]\nthreads = 1\n",
    );
    let out = python("advisory_pin_check.py", &["--port", &proxy.rw.to_string()], &[]);
    assert!(out.contains("ok: all advisory lock checks passed"), "{out}");
    let log = proxy.log_text();
    assert!(log.contains("while its session holds it"), "{log}");
    assert!(log.contains("client no longer pinned"), "{log}");
    report(out.lines().find(|l| l.contains("went back")).unwrap_or(""));
}

/// LISTEN / NOTIFY in transaction mode without pinning: 100 subscribers on 10 channels
/// over pool_size = 5, one shared listening connection; a subscriber that stops reading
/// is ended alone.
#[test]
fn listen_notify_works_over_a_small_pool_without_pinning() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"\npool_size = 5\ncheckout_timeout_ms = 30000",
        "[proxy]\nthreads = 1\n",
    );
    let out = python(
        "listen_check.py",
        &[
            "--port",
            &proxy.rw.to_string(),
            "--direct-port",
            &cluster.nodes[0].port.to_string(),
        ],
        &[],
    );
    assert!(out.contains("ok: all LISTEN checks passed"), "{out}");
    let most: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("most=")?.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(most <= 6, "{most} server connections: {out}");
    let log = proxy.log_text();
    assert!(!log.contains("client pinned"), "a LISTEN pinned a client");
    assert!(log.contains("fell too far behind their notifications"), "{log}");
    assert!(
        !log.contains("without a goodbye"),
        "the slow subscriber was not told why"
    );
    report(out.lines().find(|l| l.contains("subscribers got")).unwrap_or(""));
}

/// After a failover the shared listening connection listens again on the new primary:
/// a subscriber gets the warning, then a notification sent after the promotion.
#[test]
fn listen_follows_the_primary_through_a_failover() {
    use std::io::{BufRead, BufReader, Write};
    let cluster = LocalCluster::start(1).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "pool_mode = \"transaction\"", "");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/listen_failover_check.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .args(["--port", &proxy.rw.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    cluster.kill9(0).unwrap();
    cluster.promote(1).unwrap();
    // Notifications sent before it listens again are lost (as for a direct connection
    // that reconnects): send once it does.
    wait_for(
        "the listening connection on the new primary",
        Duration::from_secs(30),
        || (proxy.log_text().matches("listening connection opened").count() >= 2).then_some(()),
    );
    psql(proxy.rw, "SELECT pg_notify('moved', 'after the failover')").unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success() && rest.contains("ok:"), "{rest}");
}

/// SQL PREPARE / EXECUTE / DEALLOCATE in transaction mode without pinning: 50 clients,
/// each with its own statement under one name, over 5 server connections.
#[test]
fn sql_prepared_statements_work_over_a_small_pool_without_pinning() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        "pool_mode = \"transaction\"\npool_size = 5\ncheckout_timeout_ms = 30000",
        "[proxy]\nthreads = 1\n",
    );
    let out = python("sql_prepare_check.py", &["--port", &proxy.rw.to_string()], &[]);
    assert!(out.contains("ok: all SQL PREPARE checks passed"), "{out}");
    let backends: usize = out
        .lines()
        .find_map(|l| l.split(" over ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(backends <= 5, "{out}");
    assert!(
        !proxy.log_text().contains("client pinned"),
        "SQL PREPARE pinned a client"
    );
    report(out.lines().find(|l| l.contains("EXECUTEs")).unwrap_or(""));
}

#[test]
fn django_with_one_alias_in_transaction_mode_survives_a_standby_failure() {
    let cluster = LocalCluster::start(2).unwrap();
    // The checks read right after they write, over plain asynchronous replication:
    // read-your-writes keeps those reads fresh.
    let proxy = Proxy::start(&cluster, "proxy", SPLIT, "");
    let env = [
        ("SY_SINGLE", "1".to_string()),
        ("SY_HOST", "127.0.0.1".to_string()),
        ("SY_RW_PORT", proxy.rw.to_string()),
        ("SY_USER", APP_USER.to_string()),
        ("SY_PASSWORD", APP_PASSWORD.to_string()),
        ("SY_DB", APP_DB.to_string()),
    ];
    for phase in ["migrate", "write", "read", "atomic", "iterator"] {
        let out = python("django_check.py", &[phase], &env);
        assert!(out.contains(&format!("ok: {phase}")), "{out}");
    }
    // The reads were spread to a standby...
    let standby_reads: i64 = cluster
        .sql(1, "SELECT xact_commit FROM pg_stat_database WHERE datname = 'app'")
        .unwrap()
        .parse()
        .unwrap();
    assert!(standby_reads > 0);
    // ...and keep working when it dies.
    cluster.kill9(1).unwrap();
    let out = python("django_check.py", &["read"], &env);
    assert!(out.contains("ok: read"), "{out}");
}

#[test]
fn pooled_connections_to_a_restarted_server_are_discarded_not_handed_out() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", &format!("{TXN}\nmin_pool_size = 3"), "");
    // Fill the pool with idle connections.
    let port = proxy.rw;
    let clients: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || psql(port, "SELECT pg_sleep(0.2)")))
        .collect();
    for c in clients {
        c.join().unwrap().unwrap();
    }
    cluster.stop_node(0, "fast").unwrap();
    cluster.start_node(0).unwrap();
    // min_pool_size: the pool opens connections again by itself, before any client asks.
    wait_for("pool refilled to min_pool_size", Duration::from_secs(15), || {
        (app_backends(&cluster, 0) >= 3).then_some(())
    });
    wait_for("primary back", Duration::from_secs(10), || {
        psql(proxy.rw, "SELECT 1").ok()
    });
    // Every pooled connection died with the restart; none of them reaches a client.
    for _ in 0..20 {
        assert_eq!(psql(proxy.rw, "SELECT 1").unwrap(), "1");
    }
}
