//! Several Switchyard instances agreeing through etcd: 3 etcd members, a primary and 2
//! standbys, 2 Switchyard instances with `failover = "automatic"`, all real processes on
//! loopback. One promotion per failure, both instances writing to the same primary, an
//! instance cut off from etcd refusing writes while the other goes on, a switchover
//! through both instances with no failed transaction.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::{EtcdCluster, Forwarder};
use common::*;

struct Instance {
    proxy: Proxy,
    admin: u16,
}

/// Start instance `name` over `etcd_urls`, with `lease_s` and the cluster settings.
fn instance(cluster: &LocalCluster, name: &str, etcd_urls: &[String], lease_s: u64) -> Instance {
    let (rw, ro, admin) = (free_port(), free_port(), free_port());
    let urls = etcd_urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "[admin]\nhttp_listen = \"127.0.0.1:{admin}\"\n\n\
         [coordination]\netcd = [{urls}]\ninstance = \"{name}\"\nlease_s = {lease_s}\n\n{}",
        cluster.config_toml(
            rw,
            ro,
            &format!(
                "pool_mode = \"transaction\"\nfailover = \"automatic\"\nfailover_hold_ms = 8000\n\n\
                 [clusters.main.manager]\nuser = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\n"
            )
        )
    );
    Instance {
        proxy: Proxy::launch(cluster, name, &text, rw, ro),
        admin,
    }
}

fn status(i: &Instance) -> serde_json::Value {
    serde_json::from_str(&http_get(i.admin, "/status").1).unwrap()
}

fn is_primary(cluster: &LocalCluster, node: usize) -> bool {
    cluster.sql(node, "SELECT pg_is_in_recovery()").ok().as_deref() == Some("f")
}

/// Both instances agree on the leader and the published primary.
fn agreed(a: &Instance, b: &Instance) -> (String, String, u64) {
    wait_for("both instances agreeing", Duration::from_secs(20), || {
        let (sa, sb) = (status(a), status(b));
        let pick = |s: &serde_json::Value| {
            (
                s["coordination"]["leader"].as_str().unwrap_or("").to_string(),
                s["clusters"][0]["published"].as_str().unwrap_or("").to_string(),
                s["clusters"][0]["epoch"].as_u64().unwrap_or(0),
            )
        };
        let (x, y) = (pick(&sa), pick(&sb));
        (x == y && !x.0.is_empty() && !x.1.is_empty()).then_some(x)
    })
}

/// Two instances over 3 etcd members, a synchronous standby, inserts through both;
/// `fault` strikes the primary. Checks exactly one promotion (withdrawn, then published),
/// both instances writing to the new primary, and no acknowledged insert lost. Returns
/// the instances and the new primary's index.
async fn fail_over_through_two_instances(
    etcd: &EtcdCluster,
    cluster: &LocalCluster,
    fault_name: &str,
    fault: impl FnOnce(),
) -> (Instance, Instance, usize) {
    cluster
        .sql(0, "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'")
        .unwrap();
    cluster.sql(0, "SELECT pg_reload_conf()").unwrap();
    let a = instance(cluster, "sy1", &etcd.urls(), 2);
    let b = instance(cluster, "sy2", &etcd.urls(), 2);
    let (leader, published, epoch) = agreed(&a, &b);
    assert_eq!(published, "default");
    assert!(leader == "sy1" || leader == "sy2", "{leader}");
    psql(a.proxy.rw, "CREATE TABLE ids (id int PRIMARY KEY)").unwrap();

    // Writers through both instances, each insert with its own id.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(i32, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for (w, port) in [a.proxy.rw, a.proxy.rw, a.proxy.rw, b.proxy.rw, b.proxy.rw, b.proxy.rw]
        .into_iter()
        .enumerate()
    {
        let (stop, acked) = (stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = w as i32 * 1_000_000;
            let mut held: Option<Held> = None;
            while !stop.load(Ordering::Relaxed) {
                let Some(c) = held.as_ref() else {
                    held = connect(port).await.ok();
                    if held.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                };
                id += 1;
                match c.execute("INSERT INTO ids VALUES ($1)", &[&id]).await {
                    Ok(_) => acked.lock().unwrap().push((id, Instant::now())),
                    Err(_) if c.is_closed() => held = None,
                    Err(_) => {}
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    fault();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = acked.lock().unwrap().iter().filter(|(_, t)| *t > killed).count();
        if after > 300 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }

    // Exactly one promotion, decided by the leader alone, published with a new epoch
    // after a withdrawal (epoch + 1: no primary) that both instances applied before the
    // promotion.
    let promoted: Vec<usize> = (1..3).filter(|&i| is_primary(cluster, i)).collect();
    assert_eq!(promoted.len(), 1, "{promoted:?}");
    let new = promoted[0];
    let (_, published_now, epoch_now) = agreed(&a, &b);
    assert_eq!(published_now, cluster.nodes[new].name);
    assert_eq!(epoch_now, epoch + 2);
    let logs = a.proxy.log_text() + &b.proxy.log_text();
    assert!(
        logs.contains("every instance stopped writing to the old primary"),
        "{logs}"
    );
    let dones = a.proxy.log_text().matches("automatic failover done").count()
        + b.proxy.log_text().matches("automatic failover done").count();
    assert_eq!(dones, 1);
    // Both instances write to it.
    assert_eq!(lands_on(cluster, a.proxy.rw), Ok(new));
    assert_eq!(lands_on(cluster, b.proxy.rw), Ok(new));
    // Nothing acknowledged is missing.
    let text = cluster.sql_db(new, APP_DB, "SELECT id FROM ids").unwrap();
    let present: HashSet<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let acked = acked.lock().unwrap();
    let lost: Vec<i32> = acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    let times: Vec<Instant> = acked.iter().map(|(_, t)| *t).collect();
    let resumed = resumed_after(&times, killed).unwrap();
    report(&format!(
        "2 instances, {fault_name} of the primary: {} inserts acknowledged, {} lost, writes on the new primary {:?} after the {fault_name}",
        acked.len(),
        lost.len(),
        resumed
    ));
    assert!(lost.is_empty(), "{lost:?}");
    (a, b, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_fail_over_once_and_write_to_the_same_new_primary() {
    let etcd = EtcdCluster::start(3);
    let cluster = LocalCluster::start(2).unwrap();
    fail_over_through_two_instances(&etcd, &cluster, "kill -9", || cluster.kill9(0).unwrap()).await;
}

/// A hung primary (SIGSTOP): replaced once as above; thawed, it is made read-only and
/// neither instance writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_replaced_once_and_neither_instance_writes_to_it_after_it_thaws() {
    let etcd = EtcdCluster::start(3);
    let cluster = LocalCluster::start(2).unwrap();
    let (a, b, new) =
        fail_over_through_two_instances(&etcd, &cluster, "SIGSTOP", || cluster.signal(0, libc::SIGSTOP).unwrap()).await;
    cluster.signal(0, libc::SIGCONT).unwrap();
    wait_for("the old primary fenced read-only", Duration::from_secs(20), || {
        cluster
            .sql(0, "SHOW default_transaction_read_only")
            .ok()
            .filter(|v| v == "on")
    });
    let count = || cluster.sql_db(0, APP_DB, "SELECT count(*) FROM ids").unwrap();
    let before = count();
    for (k, port) in [a.proxy.rw, b.proxy.rw].into_iter().enumerate() {
        for i in 0..20 {
            psql(
                port,
                &format!("INSERT INTO ids VALUES ({})", 900_000_000 + k as i32 * 100 + i),
            )
            .unwrap();
        }
        assert_eq!(lands_on(&cluster, port), Ok(new));
    }
    assert_eq!(count(), before, "the thawed old primary took writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_etcd_stops_writes_and_the_other_goes_on() {
    let mut etcd = EtcdCluster::start(3);
    let cluster = LocalCluster::start(1).unwrap();
    let a = instance(&cluster, "sy1", &etcd.urls(), 2);
    // sy2 reaches etcd only through forwarders the test can cut.
    let forwarders: Vec<Forwarder> = etcd.members.iter().map(|m| Forwarder::start(m.client)).collect();
    let b_urls: Vec<String> = forwarders
        .iter()
        .map(|f| format!("http://127.0.0.1:{}", f.port))
        .collect();
    let b = instance(&cluster, "sy2", &b_urls, 2);
    let (_, _, epoch) = agreed(&a, &b);
    psql(a.proxy.rw, "CREATE TABLE t (v int)").unwrap();

    // The etcd leader dies: a new one is elected; no failover, writes go on.
    let leader = etcd.leader();
    etcd.kill(leader);
    for i in 0..30 {
        psql(a.proxy.rw, &format!("INSERT INTO t VALUES ({i})")).unwrap();
        psql(b.proxy.rw, &format!("INSERT INTO t VALUES ({i})")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!is_primary(&cluster, 1));
    assert_eq!(agreed(&a, &b).2, epoch, "the epoch moved without a failover");

    // sy2 loses etcd into a black hole (every call waits its whole timeout): within
    // its lease it stops routing writes (reads go on); sy1 goes on.
    let cut = Instant::now();
    for f in &forwarders {
        f.freeze();
    }
    wait_for("sy2 cut off", Duration::from_secs(10), || {
        status(&b)["coordination"]["cut_off"].as_str().map(|_| ())
    });
    report(&format!(
        "instance cut off from etcd (lease 2 s): stops routing writes after {:?}",
        cut.elapsed()
    ));
    // A new write waits failover_hold_ms for the instance to be back in touch, then is
    // refused with the reason.
    let refused = psql(b.proxy.rw, "INSERT INTO t VALUES (-1)").unwrap_err();
    assert!(refused.contains("out of touch with etcd"), "{refused}");
    assert_eq!(psql(b.proxy.ro, "SELECT count(*) > 0 FROM t").unwrap(), "t");
    for i in 0..10 {
        psql(a.proxy.rw, &format!("INSERT INTO t VALUES ({i})")).unwrap();
    }
    let s = status(&b);
    assert!(
        s["coordination"]["cut_off"]
            .as_str()
            .unwrap_or("")
            .contains("out of touch"),
        "{s}"
    );
    // sy1 alone is the leader now (sy2's lease lapsed).
    wait_for("sy1 the only live instance", Duration::from_secs(10), || {
        let s = status(&a);
        (s["coordination"]["leader"] == "sy1" && s["coordination"]["instances"].as_array()?.len() == 1).then_some(())
    });

    // A reload gives sy2 other etcd members (the members themselves, not the frozen
    // forwarders): back in touch and writing again, with no restart.
    let quoted = |urls: &[String]| urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    let text = std::fs::read_to_string(&b.proxy.config).unwrap();
    let (frozen, live) = (quoted(&b_urls), quoted(&etcd.urls()));
    assert!(text.contains(&frozen));
    std::fs::write(&b.proxy.config, text.replace(&frozen, &live)).unwrap();
    let reloaded = Instant::now();
    b.proxy.signal(libc::SIGHUP);
    wait_for("sy2 back in touch with etcd", Duration::from_secs(20), || {
        let s = status(&b);
        (s["coordination"]["cut_off"].is_null() && s["coordination"]["instances"].as_array()?.len() == 2).then_some(())
    });
    report(&format!(
        "etcd members changed by a reload: back in touch after {:?}",
        reloaded.elapsed()
    ));
    assert!(
        b.proxy.log_text().contains("coordination.etcd now"),
        "{}",
        b.proxy.log_text()
    );
    wait_for("sy2 writing again", Duration::from_secs(20), || {
        psql(b.proxy.rw, "INSERT INTO t VALUES (-2)").ok()
    });
}

#[test]
fn a_switchover_through_both_instances_fails_no_transaction() {
    let etcd = EtcdCluster::start(3);
    let cluster = LocalCluster::start(2).unwrap();
    let a = instance(&cluster, "sy1", &etcd.urls(), 2);
    let b = instance(&cluster, "sy2", &etcd.urls(), 2);
    let (leader, _, epoch) = agreed(&a, &b);
    let (on_leader, other) = if leader == "sy1" { (&a, &b) } else { (&b, &a) };
    pgbench(a.proxy.rw, &["-i", "-s", "1", "-q"]);

    // Refused on the follower, naming the leader.
    let url = format!("http://127.0.0.1:{}/clusters/main/switchover?to=failover1", other.admin);
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let body = agent
        .post(&url)
        .send_empty()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        body.contains("not the coordination leader") && body.contains(&leader),
        "{body}"
    );

    let (ra, rb) = (a.proxy.rw, b.proxy.rw);
    let load_a = std::thread::spawn(move || pgbench(ra, &["-c", "8", "-j", "2", "-T", "8", "-M", "prepared"]));
    let load_b = std::thread::spawn(move || pgbench(rb, &["-c", "8", "-j", "2", "-T", "8", "-M", "prepared"]));
    std::thread::sleep(Duration::from_secs(3));
    let url = format!(
        "http://127.0.0.1:{}/clusters/main/switchover?to=failover1",
        on_leader.admin
    );
    let mut resp = agent.post(&url).send_empty().unwrap();
    let code = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap();
    assert_eq!(code, 200, "{body}");
    let (out_a, out_b) = (load_a.join().unwrap(), load_b.join().unwrap());
    report(&format!(
        "switchover through 2 instances under pgbench -c 8 each: {body}"
    ));
    for out in [&out_a, &out_b] {
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        assert!(!out.contains("aborted"), "{out}");
    }
    let (_, published, epoch_now) = agreed(&a, &b);
    assert_eq!((published.as_str(), epoch_now), ("failover1", epoch + 1));
    assert_eq!(lands_on(&cluster, a.proxy.rw), Ok(1));
    assert_eq!(lands_on(&cluster, b.proxy.rw), Ok(1));
    // Every transaction pgbench committed is on the new primary: its history counts.
    let history: u64 = cluster
        .sql_db(1, APP_DB, "SELECT count(*) FROM pgbench_history")
        .unwrap()
        .parse()
        .unwrap();
    let committed = |out: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next()?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(history, committed(&out_a) + committed(&out_b));
}

/// A binary upgrade (SIGUSR2) of one instance of two: the new process takes the
/// instance's name (and the leadership, if it led) while the old one, draining, goes on
/// as `sy1.upgraded-PID` and then leaves; writes through the upgraded instance never
/// fail, nothing fails over, and both instances agree again on the same primary.
#[test]
fn an_upgraded_instance_hands_its_name_and_leadership_to_the_new_process() {
    let etcd = EtcdCluster::start(3);
    let cluster = LocalCluster::start(1).unwrap();
    let mut a = instance(&cluster, "sy1", &etcd.urls(), 2);
    let b = instance(&cluster, "sy2", &etcd.urls(), 2);
    let (_, published, epoch) = agreed(&a, &b);
    psql(a.proxy.rw, "CREATE TABLE up (v int)").unwrap();
    let old_pid = status(&a)["pid"].as_u64().unwrap();

    // Writes through sy1 all along, one connection (carried to the new process).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, port) = (stop.clone(), a.proxy.rw);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let c = connect(port).await.unwrap();
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match c.simple_query("INSERT INTO up VALUES (1)").await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(db_text(&e)),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, failed)
            })
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    a.proxy.signal(libc::SIGUSR2);
    let new_pid = wait_for(
        "the new process serving sy1's admin port",
        Duration::from_secs(30),
        || {
            let pid =
                serde_json::from_str::<serde_json::Value>(&http_get(a.admin, "/status").1).ok()?["pid"].as_u64()?;
            (pid != old_pid).then_some(pid)
        },
    );
    // The old process left (nothing kept it), its stand-in instance with it.
    let exited = wait_for("the old process gone", Duration::from_secs(20), || {
        a.proxy.child.try_wait().ok()?
    });
    assert!(exited.success(), "{exited}");
    wait_for("two instances again: sy1 and sy2", Duration::from_secs(20), || {
        let mut names: Vec<String> = status(&b)["coordination"]["instances"]
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        names.sort();
        (names == ["sy1", "sy2"]).then_some(())
    });
    let (leader, published_after, epoch_after) = agreed(&a, &b);
    assert!(leader == "sy1" || leader == "sy2", "{leader}");
    assert_eq!(
        (published_after, epoch_after),
        (published, epoch),
        "nothing failed over"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = writer.join().unwrap();
    report(&format!(
        "upgrade of one of two coordinated instances: {ok} writes through it, {} failed",
        failed.len()
    ));
    assert!(failed.is_empty(), "writes failed through the upgrade: {failed:?}");
    assert!(ok > 50, "{ok}");
    assert!(
        a.proxy.log_text().contains(&format!("sy1.upgraded-{old_pid}")),
        "{}",
        a.proxy.log_text()
    );
    psql(a.proxy.rw, "INSERT INTO up VALUES (2)").unwrap();
    psql(b.proxy.rw, "INSERT INTO up VALUES (3)").unwrap();
    // The successor is nobody's child here: stopped by its pid.
    // SAFETY: kill(2) on the successor's pid.
    unsafe { libc::kill(new_pid as i32, libc::SIGKILL) };
}
