//! Operating Switchyard: HTTP endpoints, metrics, the status page in a real browser, the
//! admin console, PAUSE/RESUME, DRAIN, hot reload, graceful shutdown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Admin HTTP on a free port, an admin user, and the monitor logging in as `app`.
fn ops_config(http: u16) -> String {
    format!(
        "[health]\ninterval_ms = 500\ntimeout_ms = 1000\nrise = 2\nfall = 2\nuser = \"app\"\n\n\
         [admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n\
         [[users]]\nname = \"ops\"\npassword = \"ops\"\nadmin = true\n"
    )
}

fn switchyard(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "switchyard {args:?}: {text}");
    text
}

fn page_check(http: u16, expect: &[&str]) -> String {
    page_check_queries(http, expect, &[])
}

fn page_check_queries(http: u16, expect: &[&str], queries: &[&str]) -> String {
    let mut args = vec![
        "--url".to_string(),
        format!("http://127.0.0.1:{http}/"),
        "--timeout".into(),
        "20".into(),
    ];
    for e in expect {
        args.push("--expect".into());
        args.push(e.to_string());
    }
    for q in queries {
        args.push("--expect-query".into());
        args.push(q.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    python("../browser/page_check.py", &args, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_console_page_and_metrics_follow_a_node_going_down() {
    let cluster = LocalCluster::start(2).unwrap();
    let http = free_port();
    let proxy = Proxy::start(&cluster, "proxy", "", &ops_config(http));
    psql(proxy.rw, "SELECT 1").unwrap();

    let (code, body) = http_get(http, "/health");
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = http_get(http, "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let main = &status["clusters"][0];
    assert_eq!(main["primary"], "default");
    assert_eq!(main["nodes"].as_array().unwrap().len(), 3);
    assert!(main["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["new"] == "up/primary"));
    // Patroni-style role checks for external load balancers.
    let (code, body) = http_get(http, "/clusters/main/primary");
    assert!(code == 200 && body.contains("\"default\""), "{code} {body}");
    let (code, body) = http_get(http, "/clusters/main/replica");
    assert!(code == 200 && body.contains("\"failover1\""), "{code} {body}");
    let (code, body) = http_get(http, "/clusters/main/read-only");
    assert!(code == 200 && body.contains("\"failover1\""), "{code} {body}");
    assert_eq!(http_get(http, "/clusters/nope/primary").0, 404);

    // The admin console, and who may use it.
    let nodes = psql_db(proxy.rw, "ops", "ops", "switchyard", "SHOW NODES").unwrap();
    assert!(
        nodes.contains("main|default|127.0.0.1:") && nodes.contains("|up|primary|"),
        "{nodes}"
    );
    let err = psql_db(proxy.rw, APP_USER, APP_PASSWORD, "switchyard", "SHOW NODES").unwrap_err();
    assert!(err.contains("may not use the admin console"), "{err}");
    for cmd in [
        "SHOW CLUSTERS",
        "SHOW POOLS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW STATS",
        "SHOW EVENTS",
    ] {
        psql_db(proxy.ro, "ops", "ops", "switchyard", cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }
    let held = connect(proxy.ro).await.unwrap();
    let clients = psql_db(proxy.rw, "ops", "ops", "switchyard", "SHOW CLIENTS").unwrap();
    assert!(
        clients.contains("|main|ro|app|app|") && clients.contains("|failover1|idle|"),
        "{clients}"
    );
    drop(held);

    // DRAIN moves new sessions away; UNDRAIN brings them back.
    psql_db(proxy.rw, "ops", "ops", "switchyard", "DRAIN failover1").unwrap();
    for _ in 0..3 {
        assert_eq!(lands_on(&cluster, proxy.ro), Ok(2));
    }
    psql_db(proxy.rw, "ops", "ops", "switchyard", "UNDRAIN main.failover1").unwrap();
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(1));

    // The page, in headless Chromium, shows the node going down.
    // The page's top statements: the proxy's own readiness checks ran through it.
    page_check_queries(
        http,
        &["default=up", "failover1=up", "failover2=up"],
        &["SELECT pg_is_in_recovery()"],
    );
    cluster.kill9(2).unwrap();
    let out = page_check(http, &["default=up", "failover2=down"]);
    assert!(out.contains("ok: page shows"), "{out}");
    let (_, body) = http_get(http, "/status");
    assert!(
        body.contains("\"name\":\"failover2\"") && body.contains("\"health\":\"down\""),
        "{body}"
    );
    let nodes = psql_db(proxy.rw, "ops", "ops", "switchyard", "SHOW NODES").unwrap();
    assert!(
        nodes.lines().any(|l| l.contains("|failover2|") && l.contains("|down|")),
        "{nodes}"
    );
    let (_, metrics) = http_get(http, "/metrics");
    for needle in [
        "switchyard_node_up{cluster=\"main\",node=\"failover2\"} 0",
        "switchyard_node_up{cluster=\"main\",node=\"default\"} 1",
        "switchyard_node_primary{cluster=\"main\",node=\"default\"} 1",
        "switchyard_queries_routed_total{cluster=\"main\",node=\"default\",role=\"primary\"}",
        "switchyard_health_check_duration_seconds_bucket",
        "switchyard_pool_wait_seconds_count{cluster=\"main\"}",
        "switchyard_role_changes_total{cluster=\"main\",node=\"failover2\"}",
        "switchyard_errors_total{class=\"42\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
    let table = switchyard(&["status", "--url", &format!("http://127.0.0.1:{http}")]);
    assert!(
        table.lines().any(|l| l.contains("failover2") && l.contains("down")),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_and_resume_releases_them() {
    let cluster = LocalCluster::start(0).unwrap();
    let http = free_port();
    let proxy = Proxy::start(&cluster, "proxy", "", &ops_config(http));
    let held = connect(proxy.rw).await.unwrap();
    held.batch_execute("CREATE TABLE p (v int); BEGIN; INSERT INTO p VALUES (1)")
        .await
        .unwrap();

    psql_db(proxy.rw, "ops", "ops", "switchyard", "PAUSE main").unwrap();
    // The transaction in flight finishes.
    tokio::time::timeout(
        Duration::from_secs(3),
        held.batch_execute("INSERT INTO p VALUES (2); COMMIT"),
    )
    .await
    .expect("in-flight transaction must finish")
    .unwrap();
    // A new transaction waits; so does a new session.
    let held = std::sync::Arc::new(held);
    let client = held.clone();
    let waiting = tokio::spawn(async move {
        client
            .query_one("SELECT count(*) FROM p", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    let port = proxy.rw;
    let newcomer = std::thread::spawn(move || psql(port, "SELECT 42"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished() && !newcomer.is_finished(),
        "paused work went through"
    );
    let pools = psql_db(proxy.rw, "ops", "ops", "switchyard", "SHOW CLUSTERS").unwrap();
    assert!(pools.contains("|true|"), "{pools}");

    psql_db(proxy.rw, "ops", "ops", "switchyard", "RESUME").unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        2
    );
    assert_eq!(newcomer.join().unwrap().unwrap(), "42");
}

#[test]
fn reload_adds_a_standby_and_an_invalid_config_keeps_the_old_one() {
    let cluster = LocalCluster::start(2).unwrap();
    let (rw, ro, http) = (free_port(), free_port(), free_port());
    let full = format!(
        "{}{}",
        ops_config(http),
        cluster
            .config_toml(rw, ro, "")
            .split_once("[[users]]")
            .map(|(_, rest)| format!("[[users]]{rest}"))
            .unwrap()
    );
    // Start without failover2.
    let without = remove_node(&full, "failover2");
    let proxy = Proxy::launch(&cluster, "proxy", &without, rw, ro);
    let _ = ro;
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(1));

    // Add failover2 first in priority order, and reload with SIGHUP.
    let reordered = put_first_standby(&full, "failover2");
    std::fs::write(&proxy.config, &reordered).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_for("reads on the added standby", Duration::from_secs(10), || {
        (lands_on(&cluster, proxy.ro) == Ok(2)).then_some(())
    });
    assert!(proxy.log_text().contains("config reloaded"));

    // An invalid file is rejected with its reason; the old config keeps running.
    std::fs::write(&proxy.config, reordered.replace("interval_ms = 500", "interval_ms = 0")).unwrap();
    let err = psql_db(proxy.rw, "ops", "ops", "switchyard", "RELOAD").unwrap_err();
    assert!(
        err.contains("reload rejected") && err.contains("health.interval_ms"),
        "{err}"
    );
    proxy.signal(libc::SIGHUP);
    wait_for("rejection logged", Duration::from_secs(5), || {
        proxy.log_text().matches("reload rejected").nth(1).map(|_| ())
    });
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(2));
    assert_eq!(lands_on(&cluster, proxy.rw), Ok(0));

    // Removing a node ends its sessions and routes around it.
    std::fs::write(&proxy.config, remove_node(&reordered, "failover2")).unwrap();
    assert_eq!(psql_db(proxy.rw, "ops", "ops", "switchyard", "RELOAD").unwrap(), "");
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_transactions_finish_then_says_goodbye() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "[proxy]\nshutdown_timeout_ms = 5000\n");
    let busy = connect(proxy.rw).await.unwrap();
    busy.batch_execute("CREATE TABLE s (v int); BEGIN; INSERT INTO s VALUES (1)")
        .await
        .unwrap();
    let idle = connect(proxy.rw).await.unwrap();

    let asked = Instant::now();
    proxy.signal(libc::SIGTERM);
    // The idle session is told at once.
    let err = idle.wait_for_error(Duration::from_secs(3)).await;
    assert!(err.contains("57P01") && err.contains("shutting down"), "{err}");
    // New sessions are not accepted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(psql(proxy.rw, "SELECT 1").is_err());
    // The open transaction may still commit, then the session is ended.
    busy.batch_execute("INSERT INTO s VALUES (2); COMMIT").await.unwrap();
    let err = busy.wait_for_error(Duration::from_secs(3)).await;
    assert!(err.contains("57P01"), "{err}");
    assert_eq!(cluster.sql_db(0, APP_DB, "SELECT count(*) FROM s").unwrap(), "2");
    assert!(asked.elapsed() < Duration::from_secs(5));
}

/// systemd's side of `Type=notify`: READY=1 once the listeners are bound and every node
/// has had its first health check; RELOADING=1 (with MONOTONIC_USEC, which systemd 253+
/// requires) and READY=1 again with the outcome around a SIGHUP; STOPPING=1 on SIGTERM.
/// And `--version` names the commit.
#[test]
fn the_service_manager_is_told_ready_reloading_and_stopping() {
    let version = switchyard(&["--version"]);
    assert!(
        version.starts_with(&format!("switchyard {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let cluster = LocalCluster::start(1).unwrap();
    let path = cluster.dir().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let (rw, ro) = (free_port(), free_port());
    let text = cluster.config_toml(rw, ro, "");
    let proxy = Proxy::spawn_env(
        cluster.dir(),
        "notify",
        &text,
        rw,
        ro,
        &[("NOTIFY_SOCKET", path.as_os_str())],
    );
    let ready = recv();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // Not before every node had its first check (logged before READY=1 is sent).
    let checked = proxy.log_text().matches("reason=first check").count();
    assert_eq!(checked, 2, "nodes checked when ready:\n{}", proxy.log_text());
    // Ready means serving: a write gets through at once.
    assert_eq!(
        psql(rw, "/* switchyard:primary */ SELECT pg_is_in_recovery()").unwrap(),
        "f"
    );
    proxy.signal(libc::SIGHUP);
    let reloading = recv();
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let again = recv();
    assert!(
        again.lines().any(|l| l == "READY=1") && again.contains("STATUS=config reloaded"),
        "{again}"
    );
    proxy.signal(libc::SIGTERM);
    let stopping = recv();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}

/// `switchyard import pgbouncer` round trip: a PgBouncer setup for a primary and its
/// standby (a host list), converted, passes `check` and serves the same database in
/// transaction pooling, writes on the primary.
#[test]
fn an_imported_pgbouncer_config_serves_the_same_database() {
    let cluster = LocalCluster::start(1).unwrap();
    let (p0, p1) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let rw = free_port();
    let ini = cluster.dir().join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]
{APP_DB} = host=127.0.0.1,127.0.0.1 port={p0},{p1}

             [pgbouncer]
listen_addr = 127.0.0.1
listen_port = {rw}
auth_type = scram-sha-256
             auth_file = userlist.txt
pool_mode = transaction
default_pool_size = 4
             server_reset_query = DISCARD ALL
"
        ),
    )
    .unwrap();
    let userlist = cluster.dir().join("userlist.txt");
    std::fs::write(&userlist, format!("\"{APP_USER}\" \"{APP_PASSWORD}\"\n")).unwrap();
    let text = switchyard(&[
        "import",
        "pgbouncer",
        "--ini",
        ini.to_str().unwrap(),
        "--userlist",
        userlist.to_str().unwrap(),
    ]);
    assert!(text.contains("server_reset_query = DISCARD ALL: not needed"), "{text}");
    let config = cluster.dir().join("imported.toml");
    std::fs::write(&config, &text).unwrap();
    let checked = switchyard(&["check", "--config", config.to_str().unwrap()]);
    assert!(checked.contains("1 cluster(s), 2 node(s), 1 user(s)"), "{checked}");
    let proxy = Proxy::spawn(&cluster, "imported", &text, rw, free_port());
    let primary = wait_for("the imported config serves", Duration::from_secs(20), || {
        psql(proxy.rw, "SELECT pg_is_in_recovery()").ok()
    });
    assert_eq!(primary, "f", "writes go to the primary of the host list");
    assert!(proxy.log_text().contains("session started (transaction pooling)"));
}

/// `switchyard import haproxy` round trip: an HAProxy + Patroni config naming the
/// cluster's nodes (Patroni's REST API is not there: Switchyard does not ask it),
/// converted, passes `check` with the superuser's password in the environment, and
/// serves writes on the primary and reads on the standby, users looked up on the servers.
#[test]
fn an_imported_haproxy_config_serves_both_roles() {
    let cluster = LocalCluster::start(1).unwrap();
    let (p0, p1) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let (rw, ro) = (free_port(), free_port());
    let mut cfg = String::from(
        "global\n    maxconn 100\n\ndefaults\n    mode tcp\n    retries 2\n    timeout connect 4s\n    \
         timeout client 30m\n    timeout server 30m\n    timeout check 5s\n",
    );
    for (name, port, check) in [("primary", rw, "/primary"), ("replicas", ro, "/replica")] {
        cfg += &format!(
            "\nlisten {name}\n    bind 127.0.0.1:{port}\n    option httpchk OPTIONS {check}\n    \
             http-check expect status 200\n    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions\n    \
             server pg0 127.0.0.1:{p0} maxconn 100 check port 8008\n    server pg1 127.0.0.1:{p1} maxconn 100 check port 8009\n"
        );
    }
    let file = cluster.dir().join("haproxy.cfg");
    std::fs::write(&file, cfg).unwrap();
    let text = switchyard(&["import", "haproxy", "--cfg", file.to_str().unwrap()]);
    assert!(text.contains("listen_ro = "), "{text}");
    let config = cluster.dir().join("imported-haproxy.toml");
    std::fs::write(&config, &text).unwrap();
    let env = switchyard::import::haproxy::PASSWORD_ENV;
    let checked = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", config.to_str().unwrap()])
        .env(env, SUPERUSER_PASSWORD)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(out.contains("1 cluster(s), 2 node(s), 0 user(s)"), "{out}{checked:?}");
    let password = std::ffi::OsStr::new(SUPERUSER_PASSWORD);
    let proxy = Proxy::spawn_env(cluster.dir(), "imported-haproxy", &text, rw, ro, &[(env, password)]);
    let roles = wait_for("the imported config serves", Duration::from_secs(20), || {
        Some((
            psql(proxy.rw, "SELECT pg_is_in_recovery()").ok()?,
            psql(proxy.ro, "SELECT pg_is_in_recovery()").ok()?,
        ))
    });
    assert_eq!(
        roles,
        ("f".into(), "t".into()),
        "writes on the primary, reads on the standby"
    );
}

/// The config text without the `[[clusters.main.nodes]]` entry named `name`.
fn remove_node(text: &str, name: &str) -> String {
    let marker = "\n[[clusters.main.nodes]]\n";
    let mut parts = text.split(marker);
    let mut out = parts.next().unwrap().to_string();
    for p in parts {
        if !p.starts_with(&format!("name = \"{name}\"")) {
            out += marker;
            out += p;
        }
    }
    out
}

/// The config text with node `name` moved right after the first node.
fn put_first_standby(text: &str, name: &str) -> String {
    let marker = "\n[[clusters.main.nodes]]\n";
    let mut parts: Vec<&str> = text.split(marker).collect();
    let at = parts
        .iter()
        .position(|p| p.starts_with(&format!("name = \"{name}\"")))
        .unwrap();
    let node = parts.remove(at);
    parts.insert(2, node);
    parts.join(marker)
}

/// `[clusters.NAME]` for `cluster`'s nodes, listening on `rw` (and `ro` if given).
fn cluster_section(cluster: &LocalCluster, name: &str, rw: u16, ro: Option<u16>, extra: &str) -> String {
    let text = cluster.config_toml(rw, ro.unwrap_or(0), extra);
    let (_, section) = text.split_once("[clusters.main]").unwrap();
    let section = format!(
        "[clusters.{name}]{}",
        section.replace("[[clusters.main.nodes]]", &format!("[[clusters.{name}.nodes]]"))
    );
    match ro {
        Some(_) => section,
        None => section.replace(&"listen_ro = \"127.0.0.1:0\"\n".to_string(), ""),
    }
}

/// Live reload of clusters and listen addresses: a cluster added (SIGHUP) and removed
/// (RELOAD) while pgbench runs through another cluster, whose clients see nothing; the
/// removed cluster's idle client is told why at once, its client inside a transaction
/// commits first; a moved listener serves at its new address before the old one closes;
/// an address that cannot be bound rejects the reload and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_a_cluster_and_moves_a_listener_under_load() {
    let cluster = LocalCluster::start(1).unwrap();
    let (rw, ro, http) = (free_port(), free_port(), free_port());
    let users = cluster
        .config_toml(rw, ro, "")
        .split_once("[[users]]")
        .map(|(_, r)| r.to_string())
        .unwrap();
    let users = format!("[[users]]{}", users.split_once("[clusters.main]").unwrap().0);
    let main = cluster_section(
        &cluster,
        "main",
        rw,
        Some(ro),
        "pool_mode = \"transaction\"\npool_size = 6",
    );
    let config = |clusters: &[&str]| format!("{}{users}{}", ops_config(http), clusters.join("\n"));
    let proxy = Proxy::launch(&cluster, "proxy", &config(&[&main]), rw, ro);
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    // A session of main held across every reload: it keeps working.
    let held = connect(proxy.ro).await.unwrap();
    let held_port = server_port(&held).await.unwrap();

    let load = std::thread::spawn(move || {
        let out = pgbench_command(rw, &["-c", "4", "-j", "2", "-T", "12", "-M", "extended"])
            .output()
            .expect("run pgbench");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Added by SIGHUP: serves at once, in session mode.
    let extra_rw = free_port();
    let extra = cluster_section(&cluster, "extra", extra_rw, None, "");
    std::fs::write(&proxy.config, config(&[&main, &extra])).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_for("the added cluster serving", Duration::from_secs(10), || {
        psql(extra_rw, "SELECT 1").ok().filter(|v| v == "1")
    });
    assert!(proxy.log_text().contains("cluster extra added"), "{}", proxy.log_text());
    let (code, body) = http_get(http, "/status");
    assert_eq!(code, 200);
    assert!(body.contains("\"extra\""), "{body}");

    // Two clients of extra: one idle, one inside a transaction.
    let idle = connect(extra_rw).await.unwrap();
    let busy = connect(extra_rw).await.unwrap();
    busy.batch_execute("CREATE TABLE IF NOT EXISTS reloaded (v int); BEGIN; INSERT INTO reloaded VALUES (1)")
        .await
        .unwrap();

    // Removed by RELOAD, and main's ro listener moved, in one reload.
    let moved_ro = free_port();
    let main_moved = main.replace(&format!("127.0.0.1:{ro}"), &format!("127.0.0.1:{moved_ro}"));
    std::fs::write(&proxy.config, config(&[&main_moved])).unwrap();
    let outcome = psql_db(rw, "ops", "ops", "switchyard", "RELOAD");
    assert_eq!(outcome, Ok(String::new()), "{}", proxy.log_text());
    let said = idle.wait_for_error(Duration::from_secs(5)).await;
    assert!(
        said.contains("57P01") && said.contains("cluster \"extra\" was removed"),
        "{said}"
    );
    // The transaction in flight may still commit; then the session is ended.
    busy.batch_execute("INSERT INTO reloaded VALUES (2); COMMIT")
        .await
        .unwrap();
    let said = busy.wait_for_error(Duration::from_secs(5)).await;
    assert!(said.contains("57P01"), "{said}");
    assert_eq!(cluster.sql_db(0, APP_DB, "SELECT count(*) FROM reloaded").unwrap(), "2");
    assert!(
        psql(extra_rw, "SELECT 1").is_err(),
        "the removed cluster's listener is closed"
    );
    assert_eq!(lands_on(&cluster, moved_ro), Ok(1));
    assert!(psql(ro, "SELECT 1").is_err(), "the old ro address is closed");

    // An address that cannot be bound: rejected, the running config stays.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let blocked = main_moved.replace(&format!("127.0.0.1:{moved_ro}"), &format!("127.0.0.1:{taken_port}"));
    std::fs::write(&proxy.config, config(&[&blocked, &extra])).unwrap();
    let err = psql_db(rw, "ops", "ops", "switchyard", "RELOAD").unwrap_err();
    assert!(
        err.contains("reload rejected") && err.contains(&format!("cannot listen on 127.0.0.1:{taken_port}")),
        "{err}"
    );
    assert!(psql(extra_rw, "SELECT 1").is_err(), "a rejected reload adds nothing");
    assert_eq!(lands_on(&cluster, moved_ro), Ok(1));

    // main's clients noticed nothing.
    let (ok, out) = load.join().unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert_eq!(server_port(&held).await.unwrap(), held_port);
    for line in proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("config reloaded") || l.contains("reload rejected"))
    {
        report(line);
    }
}
