//! Automatic failover (`failover = "automatic"`) with real servers: the primary is
//! killed or frozen under an insert workload through rw; Switchyard promotes the most
//! caught-up standby, repoints the other, holds new transactions meanwhile, and keeps the
//! old primary from taking writes when it comes back. Every insert carries a unique id
//! and is recorded as acknowledged, failed or unknown; no acknowledged one may be lost
//! (synchronous replication: `ANY 1` of the standbys).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const INTERVAL_MS: u64 = 500;
const FALL: u64 = 2;

fn automatic(admin: u16, extra: &str) -> (String, String) {
    (
        format!(
            "pool_mode = \"transaction\"\nfailover = \"automatic\"\nfailover_hold_ms = 6000\n{extra}\n\n\
             [clusters.main.manager]\nuser = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\n"
        ),
        format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\""),
    )
}

/// Commits wait for one standby to flush them (`ANY 1 (*)`).
fn synchronous(cluster: &LocalCluster) {
    cluster
        .sql(0, "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'")
        .unwrap();
    cluster.sql(0, "SELECT pg_reload_conf()").unwrap();
}

#[derive(Default)]
struct Record {
    acked: Vec<(i32, Instant)>,
    /// id → SQLSTATE (or "io" for a connection error with no SQLSTATE).
    failed: BTreeMap<i32, String>,
    unknown: Vec<i32>,
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
                let mut held: Option<Held> = None;
                while !stop.load(Ordering::Relaxed) {
                    let Some(c) = held.as_ref() else {
                        match connect(port).await {
                            Ok(c) => held = Some(c),
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                        continue;
                    };
                    next += 1;
                    let id = next;
                    match c.execute("INSERT INTO ids VALUES ($1)", &[&id]).await {
                        Ok(_) => rec.lock().unwrap().acked.push((id, Instant::now())),
                        Err(e) => {
                            let code = e.code().map(|c| c.code().to_string());
                            let mut r = rec.lock().unwrap();
                            match code.as_deref() {
                                // Resolution unknown, or the connection broke with no
                                // answer at all: it may have committed.
                                Some("08007") | None => r.unknown.push(id),
                                Some(code) => {
                                    r.failed.insert(id, code.to_string());
                                }
                            }
                            if c.is_closed() || code.is_none() {
                                held = None;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    (rec, tasks)
}

fn ids_on(cluster: &LocalCluster, node: usize) -> Vec<i32> {
    let text = cluster.sql_db(node, APP_DB, "SELECT id FROM ids ORDER BY id").unwrap();
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn is_primary(cluster: &LocalCluster, node: usize) -> bool {
    cluster.sql(node, "SELECT pg_is_in_recovery()").ok().as_deref() == Some("f")
}

/// Run the insert workload, apply `fault` to the primary after 2 s, and check: one
/// promotion, writes resume on it, nothing acknowledged is lost, the other standby
/// follows. Returns (the proxy, the new primary's index, time from fault to the first
/// acknowledged insert after it).
async fn fail_over_under_inserts(
    cluster: &LocalCluster,
    name: &str,
    sync: bool,
    fault: impl FnOnce(),
) -> (Proxy, u16, usize, Duration) {
    let admin = free_port();
    let (extra, top) = automatic(admin, "");
    let proxy = Proxy::start(cluster, name, &extra, &top);
    if sync {
        synchronous(cluster);
    }
    psql(proxy.rw, "CREATE TABLE ids (id int PRIMARY KEY)").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (rec, tasks) = writers(proxy.rw, 8, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let faulted = Instant::now();
    fault();
    // Until writes have resumed for a while (bounded).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resumed = rec
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|(_, at)| *at > faulted + Duration::from_millis(100))
            .count();
        if resumed > 200 || Instant::now() > deadline {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }

    // Exactly one promotion, and it is the new primary for the proxy too.
    let promoted: Vec<usize> = (1..3).filter(|&i| is_primary(cluster, i)).collect();
    assert_eq!(promoted.len(), 1, "standbys now primary: {promoted:?}");
    let new = promoted[0];
    assert_eq!(lands_on(cluster, proxy.rw), Ok(new));
    let log = proxy.log_text();
    assert_eq!(log.matches("automatic failover done").count(), 1, "{log}");

    let r = rec.lock().unwrap();
    let times: Vec<Instant> = r.acked.iter().map(|(_, at)| *at).collect();
    let took = resumed_after(&times, faulted).expect("writes resumed after the failover");
    // No acknowledged insert lost; nothing there that was never sent.
    let on_new = ids_on(cluster, new);
    let present: std::collections::HashSet<i32> = on_new.iter().copied().collect();
    let lost: Vec<i32> = r
        .acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    let sent: std::collections::HashSet<i32> = r
        .acked
        .iter()
        .map(|(id, _)| *id)
        .chain(r.unknown.iter().copied())
        .chain(r.failed.keys().copied())
        .collect();
    let phantom: Vec<i32> = on_new.iter().copied().filter(|id| !sent.contains(id)).collect();
    let mut by_code: BTreeMap<&str, usize> = BTreeMap::new();
    for code in r.failed.values() {
        *by_code.entry(code).or_default() += 1;
    }
    report(&format!(
        "{name}: acknowledged {}, failed {:?}, unknown {}, lost {}, writes resumed {took:?} after the fault (interval {INTERVAL_MS} ms x fall {FALL})",
        r.acked.len(),
        by_code,
        r.unknown.len(),
        lost.len()
    ));
    if sync {
        assert!(
            lost.is_empty(),
            "acknowledged inserts missing on the new primary: {lost:?}"
        );
    } else {
        // Asynchronous: only what was acknowledged within the replication lag before
        // the crash may be missing (a second is far more than loopback lag).
        let late: Vec<i32> = r
            .acked
            .iter()
            .filter(|(id, at)| lost.contains(id) && *at + Duration::from_secs(1) < faulted)
            .map(|(id, _)| *id)
            .collect();
        assert!(
            late.is_empty(),
            "lost inserts acknowledged more than 1 s before the crash: {late:?}"
        );
    }
    assert!(phantom.is_empty(), "rows never sent: {phantom:?}");
    // Held, not refused: a writer between transactions waits for the new primary; only
    // an insert in flight on the dead primary may fail, so at most one per writer (and
    // one per backend the kill orphaned as it forked, which ends with 57P01).
    assert!(
        r.failed.len() + r.unknown.len() <= 16,
        "{by_code:?}, unknown {:?}",
        r.unknown
    );
    drop(r);

    // The other standby follows the new primary.
    let other = 3 - new;
    psql(proxy.rw, "CREATE TABLE after_failover (v int)").unwrap();
    wait_for(
        "the other standby replaying from the new primary",
        Duration::from_secs(30),
        || {
            cluster
                .sql_db(
                    other,
                    APP_DB,
                    "SELECT count(*) FROM pg_class WHERE relname = 'after_failover'",
                )
                .ok()
                .filter(|n| n == "1")
        },
    );
    let (_, status) = http_get(admin, "/status");
    assert!(
        status.contains("\"failover\":\"automatic\"") && status.contains("\"last_promotion\":\"failover default ->"),
        "{status}"
    );
    (proxy, admin, new, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_replaced_with_no_acknowledged_insert_lost() {
    let cluster = LocalCluster::start(2).unwrap();
    let (proxy, admin, new, _) = fail_over_under_inserts(&cluster, "kill", true, || cluster.kill9(0).unwrap()).await;

    // The old primary restarted as it was (no pg_rewind): it comes back a primary on the
    // old timeline. Switchyard makes it read-only and never routes a write to it.
    cluster.start_node(0).unwrap();
    old_primary_fenced_and_unwritten(&cluster, &proxy, new);

    // Within the cooldown, a second failure of the primary is not failed over: writers
    // are held for failover_hold_ms, then told why.
    cluster.kill9(new).unwrap();
    let asked = Instant::now();
    let err = psql(proxy.rw, "SELECT 1").unwrap_err();
    report(&format!(
        "rw with no primary in cooldown: error after {:?}",
        asked.elapsed()
    ));
    assert!(
        err.contains("no primary available") || err.contains("could not connect"),
        "{err}"
    );
    assert!(err.contains("failover_cooldown_s"), "{err}");
    let (_, status) = http_get(admin, "/status");
    assert!(status.contains("failover_cooldown_s"), "{status}");
    assert_eq!((1..3).filter(|&i| is_primary(&cluster, i)).count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_replaced_and_gets_no_write_after_it_thaws() {
    let cluster = LocalCluster::start(2).unwrap();
    let (proxy, _admin, new, _) =
        fail_over_under_inserts(&cluster, "freeze", true, || cluster.signal(0, libc::SIGSTOP).unwrap()).await;
    cluster.signal(0, libc::SIGCONT).unwrap();
    old_primary_fenced_and_unwritten(&cluster, &proxy, new);
}

/// The old primary, back as a primary on its old timeline, is made read-only by
/// Switchyard and gets none of the writes sent through rw (which land on `new`).
fn old_primary_fenced_and_unwritten(cluster: &LocalCluster, proxy: &Proxy, new: usize) {
    wait_for("the old primary fenced read-only", Duration::from_secs(20), || {
        cluster
            .sql(0, "SHOW default_transaction_read_only")
            .ok()
            .filter(|v| v == "on")
    });
    let before = ids_on(cluster, 0).len();
    for i in 0..20 {
        psql(proxy.rw, &format!("INSERT INTO ids VALUES ({})", 900_000_000 + i)).unwrap();
    }
    assert_eq!(lands_on(cluster, proxy.rw), Ok(new));
    assert_eq!(ids_on(cluster, 0).len(), before, "the old primary took writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_asynchronous_replication_only_the_last_moment_before_a_crash_may_be_lost() {
    let cluster = LocalCluster::start(2).unwrap();
    fail_over_under_inserts(&cluster, "async kill", false, || cluster.kill9(0).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_slow_for_less_than_the_fall_rule_is_not_failed_over() {
    let cluster = LocalCluster::start(1).unwrap();
    let admin = free_port();
    let (extra, top) = automatic(admin, "");
    let proxy = Proxy::start(&cluster, "slow", &extra, &top);
    // Frozen for less than one check timeout, several times.
    for _ in 0..3 {
        cluster.signal(0, libc::SIGSTOP).unwrap();
        std::thread::sleep(Duration::from_millis(INTERVAL_MS * FALL / 3));
        cluster.signal(0, libc::SIGCONT).unwrap();
        std::thread::sleep(Duration::from_millis(INTERVAL_MS * 2));
    }
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * FALL * 2));
    assert!(!is_primary(&cluster, 1), "a standby was promoted");
    assert_eq!(lands_on(&cluster, proxy.rw), Ok(0));
    assert!(!proxy.log_text().contains("automatic failover"), "{}", proxy.log_text());
}
