//! Failover scenarios against a real primary + two streaming standbys.
//! Health settings from the harness: interval 500 ms, timeout 500 ms, rise 2, fall 2.

mod common;

use std::time::{Duration, Instant};

use common::*;

const INTERVAL_MS: u64 = 500;
const FALL: u64 = 2;

#[test]
fn writes_go_to_the_primary_and_reads_to_the_first_standby() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    for _ in 0..5 {
        assert_eq!(lands_on(&cluster, proxy.rw), Ok(0));
        // read_balance = "priority": the first standby listed.
        assert_eq!(lands_on(&cluster, proxy.ro), Ok(1));
    }
    assert_eq!(psql(proxy.rw, "SELECT pg_is_in_recovery()").unwrap(), "f");
    // A write through rw is replicated and readable through ro.
    psql(proxy.rw, "CREATE TABLE t (v int); INSERT INTO t VALUES (42)").unwrap();
    let v = wait_for("replicated row", Duration::from_secs(5), || {
        psql(proxy.ro, "SELECT v FROM t").ok().filter(|v| v == "42")
    });
    assert_eq!(v, "42");
    // A write through ro lands on a standby and is refused by PostgreSQL itself.
    let err = psql(proxy.ro, "INSERT INTO t VALUES (1)").unwrap_err();
    assert!(err.contains("read-only transaction"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_standby_moves_reads_to_the_other_standby_then_to_the_primary() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    let held = connect(proxy.ro).await.unwrap();
    assert_eq!(server_port(&held).await.unwrap(), cluster.nodes[1].port as i32);

    let killed = Instant::now();
    cluster.kill9(1).unwrap();
    // The held session is ended by the proxy with a FATAL saying why (or, if the relay
    // saw the server vanish first, with "server connection ... was lost").
    let err = held.wait_for_error(Duration::from_secs(10)).await;
    assert_session_lost(&err, "failover1");
    // New reads go to failover2 as soon as failover1 is marked down; until then a connect
    // failure makes the session try the next candidate, so no read fails at all.
    wait_for("reads on failover2", Duration::from_secs(10), || {
        (lands_on(&cluster, proxy.ro) == Ok(2)).then_some(())
    });
    report(&format!(
        "standby kill -9 -> first read on the other standby: {:?}",
        killed.elapsed()
    ));
    for _ in 0..5 {
        assert_eq!(lands_on(&cluster, proxy.ro), Ok(2));
    }

    cluster.kill9(2).unwrap();
    let killed = Instant::now();
    wait_for("reads on the primary", Duration::from_secs(10), || {
        (lands_on(&cluster, proxy.ro) == Ok(0)).then_some(())
    });
    report(&format!(
        "second standby kill -9 -> first read on the primary: {:?}",
        killed.elapsed()
    ));
    assert!(proxy.log_text().contains("node state changed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_fail_while_a_standby_dies() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    cluster.kill9(1).unwrap();
    // Immediately after the kill the proxy still believes failover1 is up: new sessions
    // try it, get "connection refused", and move on to failover2 within the same connect.
    let started = Instant::now();
    let mut errors = Vec::new();
    while started.elapsed() < Duration::from_millis(INTERVAL_MS * (FALL + 2)) {
        match lands_on(&cluster, proxy.ro) {
            Ok(n) => assert_ne!(n, 1),
            Err(e) => errors.push(e),
        }
    }
    assert!(errors.is_empty(), "reads failed: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_and_standby_promoted_moves_writes_within_interval_times_fall() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "connect_timeout_ms = 1000", "");
    let held = connect(proxy.rw).await.unwrap();
    held.batch_execute("CREATE TABLE orders (id int)").await.unwrap();

    cluster.kill9(0).unwrap();
    let err = held.wait_for_error(Duration::from_secs(10)).await;
    assert_session_lost(&err, "default");

    // With no primary, a writer gets a clear error naming every node, within the
    // connect timeout, never a hang.
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * (FALL + 1)));
    let asked = Instant::now();
    let err = psql(proxy.rw, "SELECT 1").unwrap_err();
    assert!(asked.elapsed() < Duration::from_secs(5), "took {:?}", asked.elapsed());
    assert!(err.contains("no primary available for cluster \"main\""), "{err}");
    assert!(
        err.contains("default down") && err.contains("failover1 standby") && err.contains("failover2 standby"),
        "{err}"
    );

    cluster.promote(1).unwrap();
    let promoted = Instant::now();
    wait_for("writes on failover1", Duration::from_secs(10), || {
        psql(proxy.rw, "INSERT INTO orders VALUES (1) RETURNING inet_server_port()")
            .ok()
            .filter(|p| node_of(&cluster, p) == 1)
    });
    let took = promoted.elapsed();
    report(&format!("promote -> first write through rw: {took:?}"));
    // interval × fall + 1 s, as the product promises (a role change needs one check only).
    assert!(
        took <= Duration::from_millis(INTERVAL_MS * FALL + 1000),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_primary_restarted_is_split_brain_and_never_gets_a_write() {
    let cluster = LocalCluster::start(2).unwrap();
    // Two proxies on the same cluster: the default rule and the strict one.
    let newest = Proxy::start(&cluster, "newest", "", "");
    let refuse = Proxy::start(
        &cluster,
        "refuse",
        "split_brain = \"refuse\"\nconnect_timeout_ms = 500",
        "",
    );
    psql(newest.rw, "CREATE TABLE marks (who text)").unwrap();
    cluster.wait_replayed(Duration::from_secs(10)).unwrap();

    cluster.kill9(0).unwrap();
    cluster.promote(1).unwrap();
    wait_for("failover1 primary", Duration::from_secs(10), || {
        (lands_on(&cluster, newest.rw) == Ok(1)).then_some(())
    });
    // The old primary comes back as a primary on its old timeline.
    cluster.start_node(0).unwrap();
    wait_for("split brain seen", Duration::from_secs(10), || {
        psql(refuse.rw, "SELECT 1").err().filter(|e| e.contains("split brain"))
    });

    // The default-rule proxy has seen the old primary come back too.
    wait_for("newest proxy sees default again", Duration::from_secs(10), || {
        newest
            .log_text()
            .contains("node=default old=down/unknown new=up/primary")
            .then_some(())
    });

    // Strict rule: every write is refused, with both nodes named.
    let err = psql(refuse.rw, "SELECT 1").unwrap_err();
    assert!(
        err.contains("default and failover1") && err.contains("all report primary"),
        "{err}"
    );

    // Default rule: the newest timeline (the promoted failover1) keeps taking writes.
    for i in 0..20 {
        let port = psql(
            newest.rw,
            &format!("INSERT INTO marks VALUES ('w{i}'); SELECT inet_server_port()"),
        )
        .unwrap();
        assert_eq!(node_of(&cluster, &port), 1);
    }
    // Reads never fall back to the stale primary either.
    for _ in 0..5 {
        let node = lands_on(&cluster, newest.ro).unwrap();
        assert_ne!(node, 0);
    }
    // No write reached the old primary: it has none of the rows.
    assert_eq!(cluster.sql_db(0, APP_DB, "SELECT count(*) FROM marks").unwrap(), "0");
    assert_eq!(cluster.sql_db(1, APP_DB, "SELECT count(*) FROM marks").unwrap(), "20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_standby_is_marked_down_by_timeout_and_clients_are_not_stalled() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "connect_timeout_ms = 1000", "");
    let held = connect(proxy.ro).await.unwrap();
    assert_eq!(server_port(&held).await.unwrap(), cluster.nodes[1].port as i32);

    cluster.signal(1, libc::SIGSTOP).unwrap();
    let frozen = Instant::now();
    // The held session is ended by the proxy once health checks time out `fall` times.
    let err = held.wait_for_error(Duration::from_secs(10)).await;
    assert!(
        err.contains("08006") && err.contains("failover1") && err.contains("down"),
        "{err}"
    );
    report(&format!("SIGSTOP -> held session ended after {:?}", frozen.elapsed()));

    // Every new read completes, each within one connect timeout plus slack.
    for _ in 0..10 {
        let asked = Instant::now();
        let node = lands_on(&cluster, proxy.ro).unwrap();
        assert_ne!(node, 1);
        assert!(
            asked.elapsed() < Duration::from_millis(1000 + 1500),
            "read took {:?}",
            asked.elapsed()
        );
    }
    assert!(
        proxy.log_text().contains("no answer within 1000 ms"),
        "health checks should time out"
    );
    cluster.signal(1, libc::SIGCONT).unwrap();
    // Thawed and healthy again after `rise` good checks: reads return to it.
    wait_for("failover1 back", Duration::from_secs(10), || {
        (lands_on(&cluster, proxy.ro) == Ok(1)).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_refuses_a_server_that_reports_standby_at_login_even_if_the_monitor_lags() {
    let cluster = LocalCluster::start(0).unwrap();
    // A monitor that checks once a minute: its view of `default` goes stale on purpose.
    let health = "[health]\ninterval_ms = 60000\ntimeout_ms = 1000\nrise = 1\nfall = 1\n";
    let proxy = Proxy::start(&cluster, "proxy", "connect_timeout_ms = 1000", health);
    // Turn the primary into a standby behind the monitor's back.
    cluster.stop_node(0, "fast").unwrap();
    std::fs::write(cluster.nodes[0].data.join("standby.signal"), "").unwrap();
    std::process::Command::new("chown")
        .args([
            "postgres:postgres",
            cluster.nodes[0].data.join("standby.signal").to_str().unwrap(),
        ])
        .status()
        .unwrap();
    cluster.start_node(0).unwrap();
    assert_eq!(cluster.sql(0, "SELECT pg_is_in_recovery()").unwrap(), "t");

    let err = psql(proxy.rw, "SELECT 1").unwrap_err();
    assert!(err.contains("could not connect to any primary server"), "{err}");
    assert!(err.contains("not primary"), "{err}");
    assert!(proxy
        .log_text()
        .contains("server is in recovery (standby), not primary"));
    // Reads are still fine.
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(0));
}

#[test]
fn a_standby_lagging_beyond_max_replica_lag_gets_no_new_reads_until_it_catches_up() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "max_replica_lag_ms = 1000", "");
    cluster.sql(0, "CREATE TABLE ticks (at timestamptz)").unwrap();
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(1));
    // failover1 keeps receiving WAL but stops replaying it: it reports no lag of its own
    // that Switchyard trusts; the primary's moving WAL position shows it falling behind.
    cluster.sql(1, "SELECT pg_wal_replay_pause()").unwrap();
    let paused = Instant::now();
    wait_for("reads moved off the lagging standby", Duration::from_secs(10), || {
        cluster.sql(0, "INSERT INTO ticks VALUES (now())").unwrap();
        (lands_on(&cluster, proxy.ro) == Ok(2)).then_some(())
    });
    report(&format!(
        "replay paused -> reads moved to failover2 after {:?}",
        paused.elapsed()
    ));
    cluster.sql(1, "SELECT pg_wal_replay_resume()").unwrap();
    wait_for("reads back on failover1", Duration::from_secs(10), || {
        (lands_on(&cluster, proxy.ro) == Ok(1)).then_some(())
    });
}

/// A held session on a killed node ends with a message: the proxy's own (08006 naming the
/// node), or, when a backend outlived its postmaster for a moment, the server's own FATAL.
fn assert_session_lost(err: &str, node: &str) {
    let proxy_said = err.contains("08006") && err.contains(node);
    let server_said = err.contains("57P01") && err.contains("unexpected postmaster exit");
    assert!(proxy_said || server_said, "{err}");
}
