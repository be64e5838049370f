//! Transaction pooling of a MariaDB cluster (`pool_mode = "transaction"`): many clients
//! share a few server connections, each client's session settings follow it from
//! connection to connection, and a session with state a connection cannot be brought
//! in line with (a user variable, a temporary table) keeps its own.

mod common;

use std::time::Duration;

use common::mysql::*;
use common::*;

fn cluster() -> MariaCluster {
    let c = MariaCluster::start(1).unwrap();
    c.sql(0, "CREATE TABLE app.fresh (id BIGINT PRIMARY KEY)").unwrap();
    c.wait_replicated(0, Duration::from_secs(20)).unwrap();
    c
}

fn run(proxy: &Proxy, cluster: &MariaCluster, args: &[&str]) -> serde_json::Value {
    let mut env = django_env(proxy);
    env.push(("SY_PRIMARY_PORT", cluster.nodes[0].port.to_string()));
    let out = python("mysql_multiplex_check.py", args, &env);
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// 200 mysqlclient connections, all open at once, through `pool_size = 10`: every
/// query answered, each client's own time zone seen by each of its queries, and at most
/// 10 server connections on the primary while all 200 are connected.
#[test]
fn two_hundred_clients_share_ten_server_connections() {
    let cluster = cluster();
    let proxy = my_proxy(&cluster, "pool_mode = \"transaction\"\npool_size = 10");
    let out = run(&proxy, &cluster, &["many", "200", "5"]);
    assert_eq!(out["errors"], serde_json::json!([]), "{out}");
    assert_eq!(out["ok"], 1000, "{out}");
    assert_eq!(out["wrong_state"], 0, "{out}");
    let held = out["server_connections"].as_u64().unwrap();
    assert!((1..=10).contains(&held), "{out}");
}

/// A user variable and a temporary table pin the session to its connection: both are
/// still there after other clients used the pool, and no other client sees them.
#[test]
fn session_state_pins_a_client_to_its_connection() {
    let cluster = cluster();
    let proxy = my_proxy(&cluster, "pool_mode = \"transaction\"\npool_size = 4");
    let out = run(&proxy, &cluster, &["pin"]);
    assert_eq!(out["kept"], "5", "{out}");
    assert_eq!(out["scratch"], 3, "{out}");
    assert_eq!(out["other_sees_kept"], serde_json::Value::Null, "{out}");
}

/// sysbench through transaction pooling: 16 threads on `pool_size = 4`, text queries
/// (multiplexed: the connections go back to the pool between transactions) and
/// server-side prepared statements (each session pinned to its connection while its
/// statements live; 4 threads so that each gets one). No errors but InnoDB's deadlocks.
#[test]
fn sysbench_runs_through_transaction_pooling() {
    let cluster = MariaCluster::start(1).unwrap();
    let proxy = my_proxy(&cluster, "pool_mode = \"transaction\"\npool_size = 4");
    let (text, _) = sysbench(proxy.rw, "oltp_read_write", "prepare", &[]);
    assert!(text.contains("Creating table 'sbtest2'"), "{text}");
    for extra in [&["--db-ps-mode=disable", "--threads=16"][..], &["--threads=4"][..]] {
        let deadlocks = global_status(&cluster, 0, "Innodb_deadlocks");
        let (text, s) = sysbench(proxy.rw, "oltp_read_write", "run", extra);
        let deadlocks = global_status(&cluster, 0, "Innodb_deadlocks") - deadlocks;
        assert!(s.transactions > 0, "{extra:?}: no transactions:\n{text}");
        assert_eq!((s.ignored_errors, s.reconnects), (deadlocks, 0), "{extra:?}:\n{text}");
        report(&format!(
            "sysbench oltp_read_write {extra:?} through transaction pooling: {} transactions, {} queries",
            s.transactions, s.queries
        ));
    }
    let app = cluster
        .sql(
            0,
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app'",
        )
        .unwrap();
    assert!(app.parse::<u32>().unwrap() <= 4, "{app} app connections on the primary");
}

/// Django (mysqlclient, the seed article's two aliases) through transaction pooling on
/// both endpoints: migrate, write, read, atomic blocks.
#[test]
fn django_runs_through_transaction_pooling() {
    let cluster = cluster();
    let proxy = my_proxy(&cluster, "pool_mode = \"transaction\"\npool_size = 4");
    let env = django_env(&proxy);
    for phase in ["migrate", "write", "read", "atomic", "read"] {
        let out = python("django_mysql_check.py", &[phase], &env);
        assert!(out.contains(&format!("ok: {phase}")), "{out}");
        if phase == "migrate" {
            cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();
        }
    }
}

/// The server-side limits, as on PostgreSQL: `max_server_connections` caps a node's
/// connections (the client over it gets 1040 naming the key, the others go on), and in
/// transaction pooling `reserve_pool_size` serves a transaction that waited
/// `reserve_pool_timeout_ms` once the pool is full; past both, 1040 naming the keys.
#[test]
fn server_connection_caps_and_the_reserve_pool() {
    let cluster = MariaCluster::start(1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opts = my_opts;
    let capped = my_proxy(&cluster, "max_server_connections = 2\nserver_login_timeout_ms = 1000");
    // One worker thread: the pool's size is not shared among workers.
    let (rw, ro) = (free_port(), free_port());
    let text = format!(
        "{}\n[proxy]\nthreads = 1\n",
        my_config(
            &cluster,
            rw,
            ro,
            "pool_mode = \"transaction\"\npool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout_ms = 300\ncheckout_timeout_ms = 1500",
        )
    );
    let pooled = my_spawn(&cluster, "reserve", &text, rw, ro);
    wait_for("pooled proxy ready", Duration::from_secs(30), || {
        mariadb(pooled.rw, "SELECT 1").ok()
    });
    rt.block_on(async {
        use mysql_async::prelude::Queryable;
        let a = mysql_async::Conn::new(opts(capped.rw)).await.unwrap();
        let mut b = mysql_async::Conn::new(opts(capped.rw)).await.unwrap();
        let t = std::time::Instant::now();
        let err = mysql_async::Conn::new(opts(capped.rw)).await.unwrap_err().to_string();
        assert!(err.contains("1040") && err.contains("max_server_connections"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5), "refused after {:?}", t.elapsed());
        let one: Option<i64> = b.query_first("SELECT 1").await.unwrap();
        assert_eq!(one, Some(1), "the others go on");
        a.disconnect().await.unwrap();
        let mut c = mysql_async::Conn::new(opts(capped.rw)).await.unwrap();
        c.query_drop("SELECT 1").await.unwrap();

        // Transaction pooling: the pool's one connection held by a session (mysql_async
        // asks for no session tracking, so its sessions keep their connections; the
        // transactions make the point for clients that do).
        let mut holder = mysql_async::Conn::new(opts(pooled.rw)).await.unwrap();
        holder.query_drop("BEGIN").await.unwrap();
        let t = std::time::Instant::now();
        let mut second = mysql_async::Conn::new(opts(pooled.rw)).await.unwrap();
        second.query_drop("BEGIN").await.unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_millis(1400),
            "the reserve served after {waited:?}"
        );
        let third = async {
            let mut c = mysql_async::Conn::new(opts(pooled.rw)).await?;
            c.query_drop("SELECT 1").await
        };
        let err = third.await.unwrap_err().to_string();
        assert!(err.contains("1040") && err.contains("reserve_pool_size"), "{err}");
        holder.query_drop("COMMIT").await.unwrap();
        second.query_drop("COMMIT").await.unwrap();
        // Their sessions end: the reserve's connection is kept no longer than the
        // pool's idle rules allow, and the next client is served.
        holder.disconnect().await.unwrap();
        second.disconnect().await.unwrap();
        let mut fourth = mysql_async::Conn::new(opts(pooled.rw)).await.unwrap();
        fourth.query_drop("SELECT 1").await.unwrap();
    });
}
