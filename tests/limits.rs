//! Limits and timeouts that answer: a client over `max_clients` (proxy, user) gets 53300
//! at once, an idle transaction is ended with 25P03 and rolled back while the pool
//! serves others, a runaway query is cancelled with 57014, an idle client is closed
//! with 57P01, and a proxy out of file descriptors still answers with 53300. All
//! against real PostgreSQL servers, with tokio-postgres and psql as clients.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A second user whose own limits the tests set.
const CAPPED: &str = "[[users]]\nname = \"capped\"\npassword = \"capped\"\nauth = \"scram-sha-256\"\nmax_clients = 2\n";

fn cluster() -> LocalCluster {
    let cluster = LocalCluster::start(0).unwrap();
    cluster
        .sql(
            0,
            "CREATE ROLE capped LOGIN PASSWORD 'capped'; GRANT ALL ON SCHEMA public TO capped",
        )
        .unwrap();
    cluster
        .sql_db(
            0,
            APP_DB,
            "CREATE TABLE limits_t (id int); GRANT ALL ON limits_t TO PUBLIC",
        )
        .unwrap();
    cluster
}

async fn connect_as(port: u16, user: &str, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(APP_DB)
        .connect_timeout(Duration::from_secs(10));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The server backend's pid (through the proxy).
async fn server_pid(c: &tokio_postgres::Client) -> String {
    let rows = c.simple_query("SELECT pg_backend_pid()").await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .unwrap()
}

/// Connect, expecting a refusal: its text, and how long it took.
async fn refused(port: u16, user: &str, password: &str) -> (String, Duration) {
    let t = Instant::now();
    match connect_as(port, user, password).await {
        Ok(_) => panic!("{user} was let in over its limit"),
        Err(e) => (db_text(&e), t.elapsed()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_a_limit_are_refused_at_once_with_53300_and_nobody_else_notices() {
    let cluster = cluster();
    let http = free_port();
    let top =
        format!("{CAPPED}admin = true\n\n[proxy]\nmax_clients = 4\n\n[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n");
    let proxy = Proxy::start(&cluster, "limits", "", &top);

    // The user's limit: two of `capped`, the third refused.
    let c1 = connect_as(proxy.rw, "capped", "capped").await.unwrap();
    let c2 = connect_as(proxy.rw, "capped", "capped").await.unwrap();
    let (text, took) = refused(proxy.rw, "capped", "capped").await;
    assert!(text.starts_with("53300"), "{text}");
    assert!(
        text.contains("user \"capped\"") && text.contains("max_clients"),
        "{text}"
    );
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");

    // The proxy's limit: two more clients of another user fill it.
    let a1 = connect_as(proxy.rw, APP_USER, APP_PASSWORD).await.unwrap();
    let a2 = connect_as(proxy.ro, APP_USER, APP_PASSWORD).await.unwrap();
    let (text, took) = refused(proxy.rw, APP_USER, APP_PASSWORD).await;
    assert!(
        text.starts_with("53300") && text.contains("proxy.max_clients"),
        "{text}"
    );
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");
    // What psql shows a person.
    let out = psql(proxy.rw, "SELECT 1").unwrap_err();
    assert!(
        out.contains("too many clients") && out.contains("proxy.max_clients"),
        "{out}"
    );

    // The admin console is not counted: an operator can look in when the proxy is
    // full, and sees the limits and the refusals.
    let limits = psql_db(proxy.rw, "capped", "capped", "switchyard", "SHOW LIMITS").unwrap();
    assert!(
        limits.contains("main|4|") && limits.contains("proxy_max_clients=2") && limits.contains("user_max_clients=1"),
        "{limits}"
    );
    let (code, body) = http_get(http, "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let l = &status["clusters"][0]["limits"];
    assert_eq!(
        (l["clients"].as_u64(), l["proxy_max_clients"].as_u64()),
        (Some(4), Some(4)),
        "{l}"
    );
    assert_eq!(l["counts"]["user_max_clients"].as_u64(), Some(1), "{l}");

    // Everyone admitted goes on as before.
    for c in [&c1, &c2, &a1, &a2] {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // A place freed is a place taken.
    drop(c1);
    wait_for("a freed place", Duration::from_secs(10), || {
        psql(proxy.rw, "SELECT 1").ok()
    });
    drop((c2, a1, a2));

    // Refusals are logged once per interval with a count, not once each.
    let log = proxy.log_text();
    let lines = log.matches("clients refused by a limit").count();
    assert!((1..=2).contains(&lines), "{lines} refusal lines:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_transaction_is_ended_rolled_back_and_its_connection_serves_others() {
    let cluster = cluster();
    for (mode, extra) in [
        ("session", "idle_transaction_timeout_ms = 700\n"),
        (
            "transaction",
            "pool_mode = \"transaction\"\npool_size = 1\nidle_transaction_timeout_ms = 700\n",
        ),
    ] {
        // One worker thread: one pool of one connection.
        let proxy = Proxy::start(&cluster, &format!("idle-tx-{mode}"), extra, "[proxy]\nthreads = 1\n");
        let stuck = connect(proxy.rw).await.unwrap();
        stuck
            .batch_execute("BEGIN; LOCK TABLE limits_t IN ACCESS EXCLUSIVE MODE; INSERT INTO limits_t VALUES (1)")
            .await
            .unwrap();
        let stuck_pid = server_pid(&stuck).await;
        let began = Instant::now();
        // Another client's read waits for the lock (and, transaction pooling with a pool
        // of one, for the connection) until the idle transaction is rolled back.
        let other = connect(proxy.rw).await.unwrap();
        let rows = other.simple_query("SELECT count(*) FROM limits_t").await.unwrap();
        let waited = began.elapsed();
        assert!(
            waited < Duration::from_secs(4),
            "{mode}: the other client waited {waited:?}"
        );
        assert!(waited >= Duration::from_millis(600), "{mode}: served after {waited:?}");
        let count = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                _ => None,
            })
            .unwrap();
        assert_eq!(count, "0", "{mode}: the idle transaction's insert was rolled back");
        if mode == "transaction" {
            // Rolled back and returned to the pool, not closed: the same server backend.
            assert_eq!(server_pid(&other).await, stuck_pid, "the pool's connection was reused");
        }
        let text = stuck.wait_for_error(Duration::from_secs(5)).await;
        assert!(
            text.contains("25P03") && text.contains("idle_transaction_timeout_ms"),
            "{mode}: {text}"
        );
        // A transaction that keeps working is not idle: statements 300 ms apart for
        // longer than the timeout.
        let busy = connect(proxy.rw).await.unwrap();
        busy.batch_execute("BEGIN").await.unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            busy.batch_execute("INSERT INTO limits_t VALUES (2)").await.unwrap();
        }
        busy.batch_execute("ROLLBACK").await.unwrap();
        assert!(proxy.log_text().contains("timeout=\"idle_transaction\" fired=1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_query_is_cancelled_with_57014_and_the_session_goes_on() {
    let cluster = cluster();
    // Session mode through the cluster's key; transaction mode through the user's own.
    let user =
        "[[users]]\nname = \"capped\"\npassword = \"capped\"\nauth = \"scram-sha-256\"\nquery_timeout_ms = 500\n"
            .to_string();
    for (mode, extra, top, who) in [
        (
            "session",
            "query_timeout_ms = 500\n",
            String::new(),
            (APP_USER, APP_PASSWORD),
        ),
        (
            "transaction",
            "pool_mode = \"transaction\"\n",
            user.clone(),
            ("capped", "capped"),
        ),
    ] {
        let proxy = Proxy::start(&cluster, &format!("query-{mode}"), extra, &top);
        let c = connect_as(proxy.rw, who.0, who.1).await.unwrap();
        let t = Instant::now();
        let e = c.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
        let took = t.elapsed();
        assert!(db_text(&e).starts_with("57014"), "{mode}: {}", db_text(&e));
        assert!(took < Duration::from_secs(5), "{mode}: cancelled after {took:?}");
        // The session is fine afterwards, and quick queries are never touched.
        for _ in 0..20 {
            c.simple_query("SELECT pg_sleep(0.01)").await.unwrap();
        }
        assert!(proxy
            .log_text()
            .contains("timeout=\"query\" fired=1 action=\"cancel sent to the server\""));
    }
    // psql, the same.
    let proxy = Proxy::start(&cluster, "query-psql", "query_timeout_ms = 500\n", "");
    let out = psql(proxy.rw, "SELECT pg_sleep(30)").unwrap_err();
    assert!(out.contains("canceling statement"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_is_closed_with_57p01_and_a_sentence() {
    let cluster = cluster();
    for (mode, extra) in [
        ("session", "client_idle_timeout_ms = 600\n"),
        (
            "transaction",
            "pool_mode = \"transaction\"\nclient_idle_timeout_ms = 600\n",
        ),
    ] {
        let proxy = Proxy::start(&cluster, &format!("idle-{mode}"), extra, "");
        let c = connect(proxy.rw).await.unwrap();
        // Busy clients are not idle.
        for _ in 0..6 {
            c.simple_query("SELECT 1").await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let text = c.wait_for_error(Duration::from_secs(1)).await;
        assert!(
            text.contains("57P01") && text.contains("client_idle_timeout_ms"),
            "{mode}: {text}"
        );
    }
}

/// Out of file descriptors: clients past the limit are told so (53300) rather than
/// left in the kernel's backlog, and the log does not get a line per failed accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_clients_get_53300_not_a_hang() {
    use std::os::unix::process::CommandExt;
    let cluster = cluster();
    let (rw, ro) = (free_port(), free_port());
    let text = cluster.config_toml(rw, ro, "");
    let config = cluster.dir().join("fds.toml");
    std::fs::write(&config, &text).unwrap();
    let log = cluster.dir().join("fds.log");
    let limit = |cmd: &mut std::process::Command| {
        // SAFETY: setrlimit in the child between fork and exec, nothing else.
        unsafe {
            cmd.pre_exec(|| {
                let r = libc::rlimit {
                    rlim_cur: 160,
                    rlim_max: 160,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
                Ok(())
            });
        }
    };
    // `switchyard check` says the limit cannot hold max_clients.
    let mut check = std::process::Command::new(switchyard_bin());
    check.args(["--config", config.to_str().unwrap(), "check"]);
    limit(&mut check);
    let out = check.output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("file descriptors") && said.contains("proxy.max_clients"),
        "{said}"
    );

    let mut cmd = std::process::Command::new(switchyard_bin());
    cmd.args(["--config", config.to_str().unwrap()])
        .env("SWITCHYARD_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap());
    limit(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    wait_for("proxy ready", Duration::from_secs(20), || psql(rw, "SELECT 1").ok());

    // Session mode: a client and its server connection each take a descriptor.
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    let t = Instant::now();
    while refusals.len() < 3 && t.elapsed() < Duration::from_secs(60) {
        match tokio::time::timeout(Duration::from_secs(15), connect(rw)).await {
            Ok(Ok(c)) => held.push(c),
            Ok(Err(e)) => refusals.push(db_text(&e)),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "a connection hung past 15 s with {} clients held; log:\n{}",
                    held.len(),
                    std::fs::read_to_string(&log).unwrap()
                )
            }
        }
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(held.len() >= 20, "only {} clients before the limit", held.len());
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    for r in &refusals {
        // Out of descriptors at accept (the reserve answered), or for the server
        // connection (the login to the server failed): either way, an answer.
        assert!(
            r.starts_with("53300") && r.contains("file descriptors") || r.starts_with("08"),
            "{r}"
        );
    }
    assert!(refusals.iter().any(|r| r.contains("file descriptors")), "{refusals:?}");
    assert!(log_text.contains("file-descriptor limit is below"), "{log_text}");
    let accept_lines = log_text.matches("accept failed").count();
    assert!(accept_lines <= 10, "{accept_lines} accept-failed lines:\n{log_text}");
}

/// A user's own pool size, and the reserve: a transaction that waited
/// `reserve_pool_timeout_ms` gets a connection past the pool's size; one more waits out
/// `checkout_timeout_ms` and gets 53300 naming the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_own_pool_size_and_the_reserve_pool_after_its_timeout() {
    let cluster = cluster();
    let extra = "pool_mode = \"transaction\"\npool_size = 5\nreserve_pool_size = 1\nreserve_pool_timeout_ms = 400\ncheckout_timeout_ms = 1500\n";
    // One worker thread: the sizes are not divided among workers.
    let top = "[proxy]\nthreads = 1\n\n[[users]]\nname = \"capped\"\npassword = \"capped\"\nauth = \"scram-sha-256\"\npool_size = 1\nadmin = true\n";
    let proxy = Proxy::start(&cluster, "reserve", extra, top);
    let first = connect_as(proxy.rw, "capped", "capped").await.unwrap();
    first.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // SHOW POOLS: the user's pool, one in use of a size of one.
    let pools = psql_db(proxy.rw, "capped", "capped", "switchyard", "SHOW POOLS").unwrap();
    assert!(pools.contains("|app|capped|1|0|0|1"), "{pools}");
    // The pool of one is taken: the next transaction gets the reserve's connection
    // after 400 ms, not at once and not after the checkout timeout.
    let second = connect_as(proxy.rw, "capped", "capped").await.unwrap();
    let t = Instant::now();
    second.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_millis(1400),
        "the reserve served after {waited:?}"
    );
    // Pool and reserve both taken: the next client logs in (greeted with the greeting
    // remembered from the first), and its transaction gets 53300 after
    // checkout_timeout_ms; its session stays.
    let third = connect_as(proxy.rw, "capped", "capped").await.unwrap();
    let t = Instant::now();
    let e = third.simple_query("SELECT 1").await.unwrap_err();
    let text = db_text(&e);
    assert!(
        text.starts_with("53300") && text.contains("reserve_pool_size"),
        "{text}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "refused after {:?}",
        t.elapsed()
    );
    // Two server connections for the user, not five: its own pool_size held.
    let n = cluster
        .sql_db(
            0,
            APP_DB,
            // (The health checks log in as the first user listed, here `capped` too.)
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'capped' AND query NOT LIKE '%pg_is_in_recovery%'",
        )
        .unwrap();
    assert_eq!(n.trim(), "2");
    first.batch_execute("COMMIT").await.unwrap();
    second.batch_execute("COMMIT").await.unwrap();
    third.simple_query("SELECT 1").await.unwrap();
}

/// A connection storm: every client at once. All are served, and the logins to the
/// server go through the node's gate (`max_server_logins`): with a gate of one and a
/// short connect phase, the clients that waited past it are told so, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_storm_is_served_and_server_logins_wait_their_turn() {
    let cluster = cluster();
    let storm = |port: u16, n: usize| async move {
        let started = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    let c = connect(port).await.map_err(|e| db_text(&e))?;
                    c.simple_query("SELECT 1").await.map_err(|e| db_text(&e))?;
                    Ok::<_, String>((c, started.elapsed()))
                })
            })
            .collect();
        let mut served = Vec::new();
        let mut refused = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(ok) => served.push(ok),
                Err(e) => refused.push(e),
            }
        }
        (served, refused)
    };
    let proxy = Proxy::start(&cluster, "storm", "", "");
    let (served, refused) = storm(proxy.rw, 60).await;
    assert!(refused.is_empty(), "{refused:?}");
    let last = served.iter().map(|(_, t)| *t).max().unwrap();
    report(&format!(
        "storm: 60 session-mode clients at once, all served, the last first result after {last:?}"
    ));
    drop(served);

    let gated = Proxy::start(
        &cluster,
        "storm-gated",
        "max_server_logins = 1\nconnect_timeout_ms = 30\n",
        "",
    );
    let (served, refused) = storm(gated.rw, 60).await;
    assert!(!served.is_empty(), "{refused:?}");
    assert!(
        refused.iter().any(|e| e.contains("max_server_logins")),
        "no client waited past the connect phase behind a gate of one: {} served, {refused:?}",
        served.len()
    );
}

/// `max_server_connections`: never more server connections per node than the cap, all
/// users together. An idle pooled connection of another user is closed to make room; when
/// every connection is in use, the next transaction gets 53300 naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_server_connections_caps_the_node_and_makes_room_from_idle_pools() {
    let cluster = cluster();
    let extra = "pool_mode = \"transaction\"\npool_size = 5\nmax_server_connections = 2\ncheckout_timeout_ms = 1000\n";
    let top = format!("[proxy]\nthreads = 1\n\n{CAPPED}");
    let proxy = Proxy::start(&cluster, "budget", extra, &top);
    let backends = || {
        cluster
            .sql_db(
                0,
                APP_DB,
                "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('app', 'capped') AND query NOT LIKE '%pg_is_in_recovery%' AND backend_type = 'client backend'",
            )
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    // One idle pooled connection for each user: the cap is reached.
    let app1 = connect(proxy.rw).await.unwrap();
    let capped = connect_as(proxy.rw, "capped", "capped").await.unwrap();
    capped.simple_query("SELECT 1").await.unwrap();
    assert!(backends() <= 2);
    // Two transactions of `app` at once: the second needs a connection, and `capped`'s
    // idle one is closed to make room.
    let app2 = connect(proxy.rw).await.unwrap();
    app1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    app2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    assert_eq!(backends(), 2, "never more than max_server_connections");
    // Both in use: `capped` waits out its checkout timeout and is told why.
    let t = Instant::now();
    let e = capped.simple_query("SELECT 1").await.unwrap_err();
    let text = db_text(&e);
    assert!(
        text.starts_with("53300") && text.contains("max_server_connections"),
        "{text}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "refused after {:?}",
        t.elapsed()
    );
    // A transaction ends: its connection is idle, and closed to let `capped` in.
    app1.batch_execute("COMMIT").await.unwrap();
    capped.simple_query("SELECT 1").await.unwrap();
    assert_eq!(backends(), 2);
    app2.batch_execute("COMMIT").await.unwrap();
    drop((app1, app2, capped, proxy));

    // Session mode: a session holds its server connection; the one past the cap waits
    // out the connect phase and is told why.
    let proxy = Proxy::start(
        &cluster,
        "budget-session",
        "max_server_connections = 1\nconnect_timeout_ms = 500\n",
        "",
    );
    let first = connect(proxy.rw).await.unwrap();
    let e = connect(proxy.rw).await.err().expect("a second session past the cap");
    let text = db_text(&e);
    assert!(
        text.starts_with("53300") && text.contains("max_server_connections"),
        "{text}"
    );
    first.simple_query("SELECT 1").await.unwrap();
    drop(first);
    wait_for("the place freed", Duration::from_secs(5), || {
        psql(proxy.rw, "SELECT 1").ok()
    });
}

/// A client that sends a query with a large answer and never reads it: with
/// `query_timeout_ms`, the session ends at the deadline and the pool's connection serves
/// the next client (a cancel cannot stop a server waiting for the client to read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gives_its_pooled_connection_back_at_the_query_timeout() {
    use std::io::{Read, Write};
    let cluster = cluster();
    cluster.sql(0, "CREATE ROLE raw LOGIN PASSWORD 'raw'").unwrap();
    let extra = "pool_mode = \"transaction\"\npool_size = 1\nquery_timeout_ms = 800\n";
    let top = "[proxy]\nthreads = 1\n\n[[users]]\nname = \"raw\"\npassword = \"raw\"\nauth = \"trust\"\n";
    let proxy = Proxy::start(&cluster, "stuck-reader", extra, top);
    // A hand-made client (trust at the proxy): startup, then a query whose answer it
    // never reads.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.rw)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", "raw"), ("database", APP_DB)] {
        body.extend(k.as_bytes());
        body.push(0);
        body.extend(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend(body);
    s.write_all(&startup).unwrap();
    let mut seen: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w: &[u8]| w == b"Z\0\0\0\x05I") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed during login");
        seen.extend(&buf[..n]);
    }
    let sql = b"SELECT repeat('x', 1000000) FROM generate_series(1, 500)\0";
    let mut q = vec![b'Q'];
    q.extend(((sql.len() + 4) as i32).to_be_bytes());
    q.extend(sql);
    s.write_all(&q).unwrap();
    // The `raw` pool is taken by the unread answer; the next `raw` client waits for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let next = connect_as(proxy.rw, "raw", "raw").await.unwrap();
    next.simple_query("SELECT 1").await.unwrap();
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(4), "the next client waited {waited:?}");
    assert!(
        proxy.log_text().contains("the client does not read its answer"),
        "{}",
        proxy.log_text()
    );
    drop(s);
}

/// Transaction pooling greets a client with what a server reported to the last client of
/// the same login (user, database, endpoint, startup settings), so logging in needs no
/// pooled connection: a client gets in while the pool's only connection is held, and its
/// first transaction waits for it. A client whose startup settings differ is greeted by a
/// server, so it waits for the connection to log in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_logs_in_while_every_pooled_connection_is_busy() {
    let cluster = cluster();
    let proxy = Proxy::start(
        &cluster,
        "greetings",
        "pool_mode = \"transaction\"\npool_size = 1\ncheckout_timeout_ms = 600\n",
        "[proxy]\nthreads = 1\n",
    );
    let first = connect(proxy.rw).await.unwrap();
    let pid = server_pid(&first).await;
    first.batch_execute("BEGIN").await.unwrap();

    // The same login: in at once, though the pool's one connection is in a transaction.
    let t = Instant::now();
    let second = connect(proxy.rw).await.unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(500), "logging in took {took:?}");
    // Its first transaction waits for the connection, and gets it when it is free.
    let query = tokio::spawn(async move {
        let pid = server_pid(&second).await;
        (second, pid)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!query.is_finished(), "ran beside an open transaction on a pool of one");
    first.batch_execute("COMMIT").await.unwrap();
    let (second, second_pid) = query.await.unwrap();
    assert_eq!(second_pid, pid, "the pool's one connection");
    // The startup settings reach that connection before the first statement, as when a
    // server greets.
    let other = connect_options(proxy.rw, "-c application_name=greeted").await.unwrap();
    let name = other.simple_query("SHOW application_name").await.unwrap();
    assert!(
        name.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("greeted"))),
        "the replayed startup setting"
    );
    let again = connect_options(proxy.rw, "-c application_name=greeted").await.unwrap();
    let name = again.simple_query("SHOW application_name").await.unwrap();
    assert!(name
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("greeted"))));

    // Other startup settings: a server greets, and none is free until the checkout
    // timeout.
    second.batch_execute("BEGIN").await.unwrap();
    let refused = connect_options(proxy.rw, "-c application_name=new")
        .await
        .err()
        .map(|e| db_text(&e));
    assert!(
        refused.as_deref().is_some_and(|t| t.starts_with("53300")),
        "{refused:?}"
    );
    // The same login as before is still let in.
    let third = connect(proxy.rw).await.unwrap();
    second.batch_execute("COMMIT").await.unwrap();
    assert_eq!(server_pid(&third).await, pid);
}
