//! MySQL/MariaDB high availability with real servers (MariaDB 10.11, a primary and two
//! GTID replicas): automatic failover when the primary is killed or frozen under an
//! insert workload through rw, the old primary fenced and rejoined as a replica (or
//! kept out and named when it has transactions the new primary lacks), and a planned
//! switchover. Every insert carries a unique id and is recorded as acknowledged, failed
//! or unknown; with semi-synchronous replication (`AFTER_SYNC`) no acknowledged one may
//! be lost.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mysql::*;
use common::*;
use mysql_async::prelude::Queryable;

const INTERVAL_MS: u64 = 500;
const FALL: u64 = 2;

/// The `[clusters.main]` keys for automatic failover, and the admin endpoint.
fn automatic(admin: u16) -> (String, String) {
    (
        format!(
            "failover = \"automatic\"\nfailover_hold_ms = 6000\nfailover_max_lag_bytes = 1000\n\n\
             [clusters.main.manager]\nuser = \"{MY_MANAGER_USER}\"\npassword = \"{MY_MANAGER_PASSWORD}\"\n\
             replication_user = \"{REPL_USER}\"\nreplication_password = \"{REPL_PASSWORD}\"\n"
        ),
        format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\"\n"),
    )
}

/// A cluster with semi-synchronous replication, `AFTER_SYNC`: a commit is acknowledged
/// only once a replica has it.
fn semi_sync_cluster() -> MariaCluster {
    let mut c = MariaCluster::start(2).unwrap();
    c.enable_semi_sync().unwrap();
    c.sql(0, "CREATE TABLE app.ids (id INT PRIMARY KEY)").unwrap();
    c.wait_replicated(0, Duration::from_secs(20)).unwrap();
    c
}

fn start_proxy(cluster: &MariaCluster, admin: u16) -> Proxy {
    let (extra, top) = automatic(admin);
    let (rw, ro) = (free_port(), free_port());
    let text = format!(
        "{top}\n{}",
        my_config(cluster, rw, ro, &extra).replace("interval_ms = 500", &format!("interval_ms = {INTERVAL_MS}"))
    );
    let proxy = my_spawn(cluster, "proxy", &text, rw, ro);
    wait_for("MySQL proxy ready", Duration::from_secs(30), || {
        (mariadb(proxy.rw, "SELECT @@read_only").ok()? == "0").then_some(())
    });
    proxy
}

/// Run the `switchyard` binary with `args`: whether it succeeded, and all it printed.
fn switchyard_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `switchyard switchover` of cluster main to `to` through the admin endpoint.
fn switchover_to(admin: u16, to: &str) -> (bool, String) {
    switchyard_cli(&[
        "switchover",
        "--url",
        &format!("http://127.0.0.1:{admin}"),
        "--cluster",
        "main",
        "--to",
        to,
    ])
}

#[derive(Default)]
struct Record {
    acked: Vec<(i32, Instant)>,
    /// id → server error number.
    failed: BTreeMap<i32, u16>,
    unknown: Vec<i32>,
}

/// Errors after which an insert may or may not have committed: the connection broke
/// (client side), or the proxy says the server connection was lost (1158, 08S01) or the
/// server was shut down or killed the session (1053, 1927).
fn unknown_outcome(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Server(s) => matches!(s.code, 1053 | 1158 | 1927) || s.state.starts_with("08"),
        _ => true,
    }
}

async fn connect(port: u16) -> Result<mysql_async::Conn, mysql_async::Error> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(MY_APP_USER))
        .pass(Some(MY_APP_PASSWORD))
        .db_name(Some(MY_APP_DB))
        .prefer_socket(false);
    tokio::time::timeout(Duration::from_secs(10), mysql_async::Conn::new(opts))
        .await
        .unwrap_or_else(|_| Err(mysql_async::Error::Other("connect timed out".into())))
}

/// `clients` writers inserting unique ids through `port` until `stop`; a writer whose
/// session ends reconnects.
fn writers(port: u16, clients: i32, stop: Arc<AtomicBool>) -> (Arc<Mutex<Record>>, Vec<tokio::task::JoinHandle<()>>) {
    let rec = Arc::new(Mutex::new(Record::default()));
    let tasks = (0..clients)
        .map(|w| {
            let (rec, stop) = (rec.clone(), stop.clone());
            tokio::spawn(async move {
                let mut next = w * 1_000_000;
                let mut held: Option<mysql_async::Conn> = None;
                while !stop.load(Ordering::Relaxed) {
                    let Some(c) = held.as_mut() else {
                        match connect(port).await {
                            Ok(c) => held = Some(c),
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                        continue;
                    };
                    next += 1;
                    let id = next;
                    let insert = c.query_drop(format!("INSERT INTO ids VALUES ({id})"));
                    let result = tokio::time::timeout(Duration::from_secs(15), insert)
                        .await
                        .unwrap_or_else(|_| Err(mysql_async::Error::Other("insert timed out".into())));
                    match result {
                        Ok(()) => rec.lock().unwrap().acked.push((id, Instant::now())),
                        Err(e) => {
                            let mut r = rec.lock().unwrap();
                            if unknown_outcome(&e) {
                                r.unknown.push(id);
                                held = None;
                            } else if let mysql_async::Error::Server(s) = &e {
                                r.failed.insert(id, s.code);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    (rec, tasks)
}

fn ids_on(cluster: &MariaCluster, node: usize) -> Vec<i32> {
    let text = cluster.sql(node, "SELECT id FROM app.ids ORDER BY id").unwrap();
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn writable(cluster: &MariaCluster, node: usize) -> bool {
    cluster.sql(node, "SELECT @@read_only").ok().as_deref() == Some("0")
}

/// Which node `node` replicates from (by port), if any.
fn source_of(cluster: &MariaCluster, node: usize) -> Option<usize> {
    let port = cluster.master_port(node).ok()??;
    cluster.nodes.iter().position(|n| n.port == port)
}

/// Run the insert workload, apply `fault` to the primary after 2 s; the node promoted
/// and how long after the fault the first insert was acknowledged by it.
async fn fail_over_under_inserts(
    cluster: &mut MariaCluster,
    proxy: &Proxy,
    fault: impl FnOnce(&mut MariaCluster),
) -> (usize, Duration, Arc<Mutex<Record>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (rec, tasks) = writers(proxy.rw, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rec.lock().unwrap().acked.len();
    assert!(before > 20, "the workload runs before the fault ({before} inserts)");
    fault(cluster);
    // From when the fault is complete (the process reaped, or stopped).
    let fault_at = Instant::now();
    let cluster = &*cluster;
    let new = wait_for("a replica promoted", Duration::from_secs(40), || {
        (1..3).find(|&i| writable(cluster, i))
    });
    // Writes through the proxy again, then a little more workload.
    wait_for("inserts acknowledged after the fault", Duration::from_secs(30), || {
        let r = rec.lock().unwrap();
        r.acked.iter().any(|(_, at)| *at > fault_at).then_some(())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Writes resumed: the first acknowledgement after the outage, i.e. after the first
    // gap of over 200 ms in the acknowledgements since the fault (replies already on
    // their way when the fault hit may still arrive just after it).
    let first = {
        let r = rec.lock().unwrap();
        resumed_after(r.acked.iter().map(|(_, at)| *at), fault_at)
            .expect("an outage after the fault, then acknowledgements")
    };
    (new, first, rec)
}

/// When writes resumed after `fault_at`: the first acknowledgement after the outage,
/// i.e. after the first gap of over 200 ms in the acknowledgements since the fault
/// (replies already on their way when the fault hit may arrive just after it).
fn resumed_after(acks: impl Iterator<Item = Instant>, fault_at: Instant) -> Option<Duration> {
    let mut at: Vec<Instant> = acks.filter(|at| *at > fault_at).collect();
    at.sort();
    let mut prev = fault_at;
    for t in at {
        if t - prev > Duration::from_millis(200) {
            return Some(t - fault_at);
        }
        prev = t;
    }
    None
}

/// Every acknowledged insert is on `node`; (acknowledged, failed, unknown).
fn check_no_acked_loss(cluster: &MariaCluster, node: usize, rec: &Record) -> (usize, usize, usize) {
    let have: std::collections::HashSet<i32> = ids_on(cluster, node).into_iter().collect();
    let lost: Vec<i32> = rec
        .acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !have.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged inserts missing on the new primary: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    (rec.acked.len(), rec.failed.len(), rec.unknown.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_mariadb_primary_is_replaced_without_losing_acknowledged_writes_and_rejoins() {
    let mut cluster = semi_sync_cluster();
    let admin = free_port();
    let proxy = start_proxy(&cluster, admin);
    let (new, first, rec) = fail_over_under_inserts(&mut cluster, &proxy, |c| c.kill9(0).unwrap()).await;
    let (acked, failed, unknown) = check_no_acked_loss(&cluster, new, &rec.lock().unwrap());
    report(&format!(
        "MariaDB kill -9 of the primary, semi-sync AFTER_SYNC, 4 writers: {acked} acknowledged, 0 lost, {failed} failed, {unknown} unknown; writes on the new primary {first:?} after the kill (interval x fall = {} ms)",
        INTERVAL_MS * FALL
    ));
    assert!(
        first < Duration::from_millis(INTERVAL_MS * FALL + 2000),
        "writes resumed {first:?} after the kill"
    );
    let other = if new == 1 { 2 } else { 1 };
    wait_for("the other replica repointed", Duration::from_secs(20), || {
        (source_of(&cluster, other) == Some(new)).then_some(())
    });
    let log = proxy.log_text();
    assert_eq!(
        log.matches("automatic failover done").count(),
        1,
        "exactly one promotion:\n{log}"
    );

    // The old primary comes back writable (its my.cnf says so): Switchyard makes it
    // read-only and, its history being a prefix of the new primary's, a replica. It is
    // restarted as an operator restarts a crashed primary that is to rejoin:
    // `init_rpl_role = SLAVE`, so that crash recovery cuts from its binary log what no
    // replica acknowledged (prepared in InnoDB, never committed, never acknowledged to a
    // client); otherwise those transactions stay and it is kept out as diverged (the
    // next test).
    cluster.extra_args.push("--init-rpl-role=SLAVE".into());
    cluster.start_node(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while source_of(&cluster, 0) != Some(new) || writable(&cluster, 0) {
        assert!(
            Instant::now() < deadline,
            "the old primary was not rejoined in 30 s:\n{}\n{}",
            proxy.log_text(),
            cluster.log_tail(0, 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovery = cluster.log_tail(0, 400);
    report(&format!(
        "the restarted old primary rejoined; its crash recovery {}",
        match recovery.lines().find(|l| l.contains("Successfully truncated binlog")) {
            Some(l) => format!("cut its binary log: {}", l.split("] ").last().unwrap_or(l).trim()),
            None => "had nothing unacknowledged to cut".to_string(),
        }
    ));
    wait_for("it has the new primary's writes", Duration::from_secs(30), || {
        (ids_on(&cluster, 0).len() == ids_on(&cluster, new).len()).then_some(())
    });
    let (_, status) = http_get(admin, "/status");
    assert!(status.contains("rejoined as a replica"), "{status}");
    // /status shows each node's replication: the rejoined old primary replicates from
    // the new one, both threads running, semi-sync on both sides.
    let new_addr = format!("127.0.0.1:{}", cluster.nodes[new].port);
    wait_for(
        "/status showing the rejoined node's replication",
        Duration::from_secs(10),
        || {
            let s: serde_json::Value = serde_json::from_str(&http_get(admin, "/status").1).ok()?;
            let nodes = s["clusters"][0]["nodes"].as_array()?.clone();
            let node = |name: &str| nodes.iter().find(|n| n["name"] == name).cloned();
            let old = node("default")?;
            let r = &old["replication"];
            let ok = r["source"] == new_addr.as_str()
                && r["io_thread"] == "Yes"
                && r["sql_thread"] == "Yes"
                && r["semi_sync"] == "on"
                && node(&cluster.nodes[new].name)?["replication"]["semi_sync"] == "on"
                && r["gtid"].as_str().is_some_and(|g| g.starts_with("0-"));
            ok.then_some(())
        },
    );
    // And it serves reads again through ro (a standby following the primary).
    assert!(proxy.log_text().contains("rejoined it as a replica of the new primary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_old_primary_is_kept_out_and_its_extra_transactions_named() {
    let mut cluster = MariaCluster::start(2).unwrap();
    cluster.sql(0, "CREATE TABLE app.ids (id INT PRIMARY KEY)").unwrap();
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();
    let admin = free_port();
    let proxy = start_proxy(&cluster, admin);
    mariadb(proxy.rw, "INSERT INTO ids VALUES (1)").unwrap();
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();
    // The replicas stop receiving; a row is written on the primary that none of them
    // gets (asynchronous replication's loss window), then the primary dies.
    for i in 1..3 {
        cluster.sql(i, "STOP SLAVE IO_THREAD").unwrap();
    }
    cluster.sql(0, "INSERT INTO app.ids VALUES (2)").unwrap();
    let lost_gtid = cluster.sql(0, "SELECT @@gtid_binlog_pos").unwrap();
    cluster.kill9(0).unwrap();
    let new = wait_for("a replica promoted", Duration::from_secs(40), || {
        (1..3).find(|&i| writable(&cluster, i))
    });
    mariadb(proxy.rw, "INSERT INTO ids VALUES (3)").unwrap();
    cluster.start_node(0).unwrap();
    let (_, status) = wait_for("the old primary named as diverged", Duration::from_secs(30), || {
        let (code, body) = http_get(admin, "/status");
        body.contains("diverged").then_some((code, body))
    });
    assert!(
        status.contains(&lost_gtid),
        "the extra GTID {lost_gtid} is named: {status}"
    );
    assert!(!writable(&cluster, 0), "made read-only");
    assert_eq!(source_of(&cluster, 0), None, "not rejoined");
    // No write reaches it: rw still lands on the new primary.
    assert_eq!(my_lands_on(&cluster, proxy.rw).unwrap(), new);
    assert!(proxy.log_text().contains("transactions the new primary lacks"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_switchover_moves_the_primary_and_rejoins_the_old_one() {
    let cluster = MariaCluster::start(2).unwrap();
    cluster.sql(0, "CREATE TABLE app.ids (id INT PRIMARY KEY)").unwrap();
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();
    let admin = free_port();
    let proxy = start_proxy(&cluster, admin);
    mariadb(proxy.rw, "INSERT INTO ids VALUES (1)").unwrap();
    let (ok, text) = switchover_to(admin, "failover2");
    assert!(ok, "{text}\n{}", proxy.log_text());
    report(&format!("MariaDB switchover: {}", text.trim()));
    assert!(writable(&cluster, 2) && !writable(&cluster, 0));
    wait_for("rw on the new primary", Duration::from_secs(10), || {
        (my_lands_on(&cluster, proxy.rw).ok()? == 2).then_some(())
    });
    mariadb(proxy.rw, "INSERT INTO ids VALUES (2)").unwrap();
    wait_for(
        "the old primary and the other replica follow the new one",
        Duration::from_secs(20),
        || (source_of(&cluster, 0) == Some(2) && source_of(&cluster, 1) == Some(2)).then_some(()),
    );
    cluster.wait_replicated(2, Duration::from_secs(20)).unwrap();
    assert_eq!(ids_on(&cluster, 0), vec![1, 2]);
    assert_eq!(ids_on(&cluster, 1), vec![1, 2]);
    // `switchyard check` logs in to each node as the manager and names what it lacks.
    let check = |config: &std::path::Path| switchyard_cli(&["--config", config.to_str().unwrap(), "check"]);
    let good = cluster.dir().join("proxy.toml");
    let (ok, text) = check(&good);
    assert!(
        ok && text.matches("the manager has the privileges it needs").count() == 3,
        "{text}"
    );
    let weak = cluster.dir().join("weak.toml");
    std::fs::write(
        &weak,
        std::fs::read_to_string(&good).unwrap().replace(
            &format!("user = \"{MY_MANAGER_USER}\"\npassword = \"{MY_MANAGER_PASSWORD}\""),
            &format!("user = \"{MY_MONITOR_USER}\"\npassword = \"{MY_MONITOR_PASSWORD}\""),
        ),
    )
    .unwrap();
    let (ok, text) = check(&weak);
    assert!(
        !ok && text.contains("lacks READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, CONNECTION ADMIN, RELOAD"),
        "{text}"
    );

    // The status page renders MySQL nodes (replication rows, the remark) in a browser.
    let url = format!("http://127.0.0.1:{admin}/");
    let out = python(
        "../browser/page_check.py",
        &[
            "--url",
            &url,
            "--timeout",
            "20",
            "--expect",
            "default=up",
            "--expect",
            "failover1=up",
            "--expect",
            "failover2=up",
        ],
        &[],
    );
    assert!(out.contains("ok: page shows"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_mariadb_primary_is_replaced_and_gets_no_write_after_it_thaws() {
    let mut cluster = semi_sync_cluster();
    let admin = free_port();
    let proxy = start_proxy(&cluster, admin);
    let (new, first, rec) =
        fail_over_under_inserts(&mut cluster, &proxy, |c| c.signal(0, libc::SIGSTOP).unwrap()).await;
    let rec = rec.lock().unwrap();
    let (acked, failed, unknown) = check_no_acked_loss(&cluster, new, &rec);
    report(&format!(
        "MariaDB SIGSTOP of the primary, semi-sync AFTER_SYNC, 4 writers: {acked} acknowledged, 0 lost, {failed} failed, {unknown} unknown; writes on the new primary {first:?} after the freeze (interval x fall = {} ms; heartbeat period 0.5 s)",
        INTERVAL_MS * FALL
    ));
    let on_new: std::collections::HashSet<i32> = ids_on(&cluster, new).into_iter().collect();

    // Thawed, it finishes what it had in flight, but nothing new reaches it through the
    // proxy: it is made read-only at once, then rejoined, or kept out if the commits it
    // finished never reached the new primary.
    cluster.signal(0, libc::SIGCONT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, body) = http_get(admin, "/status");
        if body.contains("rejoined as a replica") || body.contains("diverged") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the old primary was not dealt with in 30 s:\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!writable(&cluster, 0), "made read-only");
    // What only the old primary has are inserts whose outcome the client never learned.
    let unknown: std::collections::HashSet<i32> = rec.unknown.iter().copied().collect();
    let only_old: Vec<i32> = ids_on(&cluster, 0)
        .into_iter()
        .filter(|id| !on_new.contains(id))
        .collect();
    assert!(
        only_old.iter().all(|id| unknown.contains(id)),
        "the old primary has rows no client was left unsure about: {only_old:?}\n{status}"
    );
    report(&format!(
        "after SIGCONT the old primary was {} ({} insert(s) only it has, all of unknown outcome)",
        if status.contains("diverged") {
            "kept out as diverged"
        } else {
            "rejoined"
        },
        only_old.len()
    ));
    assert_eq!(my_lands_on(&cluster, proxy.rw).unwrap(), new);
    assert_eq!(proxy.log_text().matches("automatic failover done").count(), 1);
}

/// Two instances over 3 etcd members in front of a semi-synchronous MariaDB cluster,
/// inserts through both; the primary is killed: exactly one promotion (withdrawn, then
/// published), both instances write to the new primary, no acknowledged insert lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_through_etcd_fail_over_a_mariadb_primary_once() {
    let etcd = common::etcd::EtcdCluster::start(3);
    let mut cluster = semi_sync_cluster();
    let urls = etcd
        .urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let instances: Vec<(Proxy, u16)> = ["sy1", "sy2"]
        .into_iter()
        .map(|name| {
            let admin = free_port();
            let (extra, top) = automatic(admin);
            let (rw, ro) = (free_port(), free_port());
            let text = format!(
                "{top}\n[coordination]\netcd = [{urls}]\ninstance = \"{name}\"\nlease_s = 2\n\n{}",
                my_config(&cluster, rw, ro, &extra)
            );
            let proxy = my_spawn(&cluster, name, &text, rw, ro);
            (proxy, admin)
        })
        .collect();
    let published = |admin: u16| -> Option<(String, String)> {
        std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
        let s: serde_json::Value = serde_json::from_str(&http_get(admin, "/status").1).ok()?;
        let p = s["clusters"][0]["published"].as_str()?.to_string();
        Some((s["coordination"]["leader"].as_str()?.to_string(), p))
    };
    wait_for("both instances agreeing on default", Duration::from_secs(30), || {
        let (a, b) = (published(instances[0].1)?, published(instances[1].1)?);
        (a == b && a.1 == "default").then_some(())
    });
    for (p, _) in &instances {
        wait_for("rw ready", Duration::from_secs(20), || mariadb(p.rw, "SELECT 1").ok());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (rec_a, mut tasks) = writers(instances[0].0.rw, 2, stop.clone());
    let (rec_b, tasks_b) = writers(instances[1].0.rw, 2, stop.clone());
    tasks.extend(tasks_b);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill9(0).unwrap();
    let killed = Instant::now();
    let new = wait_for("a replica promoted", Duration::from_secs(40), || {
        (1..3).find(|&i| writable(&cluster, i))
    });
    wait_for("both instances writing again", Duration::from_secs(30), || {
        let after = |r: &Arc<Mutex<Record>>| r.lock().unwrap().acked.iter().any(|(_, t)| *t > killed);
        (after(&rec_a) && after(&rec_b)).then_some(())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!((1..3).filter(|&i| writable(&cluster, i)).count(), 1, "one promotion");
    let logs: String = instances.iter().map(|(p, _)| p.log_text()).collect();
    assert_eq!(logs.matches("automatic failover done").count(), 1, "{logs}");
    assert!(
        logs.contains("every instance stopped writing to the old primary"),
        "{logs}"
    );
    let name = cluster.nodes[new].name.clone();
    wait_for(
        "both instances publishing the new primary",
        Duration::from_secs(20),
        || {
            let (a, b) = (published(instances[0].1)?, published(instances[1].1)?);
            (a.1 == name && b.1 == name).then_some(())
        },
    );
    for (p, _) in &instances {
        assert_eq!(my_lands_on(&cluster, p.rw).unwrap(), new);
    }
    let (mut acked, mut unknown) = (0, 0);
    for rec in [&rec_a, &rec_b] {
        let r = rec.lock().unwrap();
        let (a, _, u) = check_no_acked_loss(&cluster, new, &r);
        acked += a;
        unknown += u;
    }
    let resumed = [&rec_a, &rec_b]
        .iter()
        .filter_map(|r| resumed_after(r.lock().unwrap().acked.iter().map(|(_, t)| *t), killed))
        .max();
    report(&format!(
        "MariaDB, 2 instances through etcd, kill -9 of the primary: {acked} acknowledged, 0 lost, {unknown} unknown; one promotion; writes through both instances on the new primary {:?} after the kill",
        resumed.unwrap_or_default()
    ));
}

/// A switchover under persistent sessions that run transactions in a loop: none of them
/// sees an error; each moves to the new primary between transactions with what it set
/// (sql_mode, time zone, isolation level, database). A session holding a temporary table
/// gets a clear error instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_switchover_under_transactions_fails_none_and_moves_sessions_with_their_settings() {
    let cluster = MariaCluster::start(2).unwrap();
    cluster
        .sql(0, "CREATE TABLE app.ids (id INT PRIMARY KEY, port INT)")
        .unwrap();
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();
    let admin = free_port();
    let proxy = start_proxy(&cluster, admin);
    let port = proxy.rw;

    // A session with a temporary table: it cannot move.
    let mut temp = connect(port).await.unwrap();
    temp.query_drop("CREATE TEMPORARY TABLE scratch (v INT)").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let done: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8i32 {
        let (stop, errors, done) = (stop.clone(), errors.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(port).await.unwrap();
            c.query_drop("SET SESSION sql_mode = 'ANSI_QUOTES', time_zone = '+03:00'")
                .await
                .unwrap();
            c.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .await
                .unwrap();
            let mut id = w * 1_000_000;
            let mut settings_after = None;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let txn = async {
                    c.query_drop("BEGIN").await?;
                    c.query_drop(format!("INSERT INTO ids VALUES ({id}, @@port)")).await?;
                    let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM ids").await?;
                    c.query_drop("COMMIT").await?;
                    Ok::<_, mysql_async::Error>(n)
                };
                match txn.await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(format!("writer {w}: {e}"));
                        return None;
                    }
                }
                settings_after = Some(());
            }
            let _ = settings_after;
            let s: Option<(String, String, String, String, i64)> = c
                .query_first(
                    "SELECT @@session.sql_mode, @@session.time_zone, @@session.tx_isolation, DATABASE(), @@port",
                )
                .await
                .ok()
                .flatten();
            s
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = done.load(Ordering::Relaxed);
    let (ok, text) = switchover_to(admin, "failover1");
    assert!(ok, "{text}\n{}", proxy.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut finals = Vec::new();
    for t in tasks {
        finals.push(t.await.unwrap());
    }
    let errors = errors.lock().unwrap().clone();
    let total = done.load(Ordering::Relaxed);
    report(&format!(
        "MariaDB switchover under 8 sessions in transactions: {total} transactions, {} failed; {}",
        errors.len(),
        text.lines().last().unwrap_or("")
    ));
    assert!(errors.is_empty(), "{errors:?}\n{}", proxy.log_text());
    assert!(total > before, "transactions ran after the switchover");
    let new_port = cluster.nodes[1].port as i64;
    for f in finals {
        let (mode, tz, iso, db, port) = f.expect("the session still answers");
        assert_eq!(
            (mode.as_str(), tz.as_str(), iso.as_str(), db.as_str(), port),
            ("ANSI_QUOTES", "+03:00", "READ-COMMITTED", "app", new_port),
            "settings kept, on the new primary"
        );
    }
    let moved = proxy.log_text().matches("session moved to the new primary").count();
    assert!(moved >= 8, "{moved} sessions moved");
    // The session with a temporary table gets an error that says why.
    let e = temp.query_drop("SELECT 1").await.unwrap_err().to_string();
    assert!(e.contains("temporary table") && e.contains("reconnect"), "{e}");
    let metrics = http_get(admin, "/metrics").1;
    assert!(
        metrics.contains("switchyard_sessions_moved_total{cluster=\"main\",outcome=\"refused\"} 1"),
        "{metrics}"
    );
}

/// `sysbench oltp_read_write`, 16 threads, through rw while the primary is switched
/// over: no error but InnoDB's deadlocks (which sysbench retries, and which happen
/// without Switchyard too), no reconnect. Text protocol (`--db-ps-mode=disable`):
/// sessions with protocol-level prepared statements are not moved yet.
#[test]
fn sysbench_through_a_mariadb_switchover_fails_no_transaction() {
    let cluster = MariaCluster::start(2).unwrap();
    let admin = free_port();
    let proxy = start_proxy(&cluster, admin);
    sysbench(proxy.rw, "oltp_read_write", "prepare", &[]);
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();
    let deadlocks =
        |c: &MariaCluster| global_status(c, 0, "Innodb_deadlocks") + global_status(c, 1, "Innodb_deadlocks");
    let before = deadlocks(&cluster);
    let switch = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        switchover_to(admin, "failover1")
    });
    let (text, s) = sysbench(
        proxy.rw,
        "oltp_read_write",
        "run",
        &["--threads=16", "--time=8", "--db-ps-mode=disable"],
    );
    let (ok, switched) = switch.join().unwrap();
    assert!(ok, "{switched}\n{}", proxy.log_text());
    let deadlocks = deadlocks(&cluster) - before;
    report(&format!(
        "sysbench oltp_read_write, 16 threads, through a MariaDB switchover: {} transactions, {} ignored errors ({} InnoDB deadlocks), {} reconnects; {}",
        s.transactions,
        s.ignored_errors,
        deadlocks,
        s.reconnects,
        switched.lines().last().unwrap_or("")
    ));
    assert!(s.transactions > 0, "{text}");
    assert_eq!(
        (s.ignored_errors, s.reconnects),
        (deadlocks, 0),
        "{text}\n{}",
        proxy.log_text()
    );
    assert_eq!(my_lands_on(&cluster, proxy.rw).unwrap(), 1);
    assert!(proxy.log_text().matches("session moved to the new primary").count() >= 16);
}

/// Django's ORM (mysqlclient) running transactions in a loop on one persistent
/// connection while the primary is switched over: none fails, and the connection ends
/// up on the new primary without Django noticing.
#[test]
fn django_transactions_through_a_mariadb_switchover_all_succeed() {
    let cluster = MariaCluster::start(2).unwrap();
    let admin = free_port();
    let proxy = start_proxy(&cluster, admin);
    let env = django_env(&proxy);
    for phase in ["migrate", "write"] {
        let out = python("django_mysql_check.py", &[phase], &env);
        assert!(out.contains(&format!("ok: {phase}")), "{out}");
    }
    let switch = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        switchover_to(admin, "failover2")
    });
    let out = python("django_mysql_check.py", &["writes", "8"], &env);
    let (ok, switched) = switch.join().unwrap();
    assert!(ok, "{switched}");
    let summary = out
        .lines()
        .find(|l| l.starts_with("ok: writes"))
        .unwrap_or_default()
        .to_string();
    report(&format!(
        "Django ORM transactions through a MariaDB switchover: {summary}"
    ));
    let (old, new) = (cluster.nodes[0].port, cluster.nodes[2].port);
    assert!(
        summary.contains(" 0 failed") && summary.contains(&format!("[{old}, {new}]")),
        "{out}"
    );
}
