//! Planned switchover under load: pgbench TPC-B through rw in transaction mode while
//! the primary role moves to a standby; no transaction may fail.

mod common;

use std::time::Duration;

use common::*;

fn post(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut resp = agent
        .post(&url)
        .send_empty()
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

#[test]
fn a_planned_switchover_under_pgbench_fails_no_transaction() {
    let cluster = LocalCluster::start(2).unwrap();
    // split_brain = "refuse": the old primary, still up and still reporting primary,
    // must not block writes to the new one (it is fenced).
    let admin = free_port();
    // The operator's demote_command: make the old primary a fresh standby of the new one.
    let script = cluster.dir().join("demote.sh");
    std::fs::write(
        &script,
        format!(
            "set -e\nR=\"\"; [ \"$(id -u)\" = 0 ] && R=\"runuser -u postgres --\"\n\
             $R {bin}/pg_ctl -D {data} -m fast -w stop || true\n\
             rm -rf {data}\n\
             $R env PGPASSWORD={SUPERUSER_PASSWORD} {bin}/pg_basebackup -h \"$SWITCHYARD_NEW_HOST\" -p \"$SWITCHYARD_NEW_PORT\" -U postgres -D {data} -R -X stream -c fast --no-sync\n\
             $R {bin}/pg_ctl -D {data} -l {data}.demoted.log -o \"-p $SWITCHYARD_OLD_PORT\" -w start\n\
             echo \"$SWITCHYARD_CLUSTER $SWITCHYARD_OLD_PRIMARY -> $SWITCHYARD_NEW_PRIMARY\" > {data}.demoted\n",
            bin = cluster.bin.display(),
            data = cluster.nodes[0].data.display(),
        ),
    )
    .unwrap();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &format!(
            "pool_mode = \"transaction\"\npool_size = 20\nsplit_brain = \"refuse\"\ndemote_command = \"sh {}\"\n\n[clusters.main.manager]\nuser = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\n",
            script.display()
        ),
        &format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\""),
    );
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);

    // Refused cleanly: a node that is not a standby.
    let (code, body) = post(admin, "/clusters/main/switchover?to=default");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("\"step\":\"check\""), "{body}");

    let rw = proxy.rw;
    let load = std::thread::spawn(move || pgbench(rw, &["-c", "16", "-j", "2", "-T", "8", "-M", "prepared"]));
    std::thread::sleep(Duration::from_secs(3));
    let (code, body) = post(admin, "/clusters/main/switchover?to=failover1");
    assert_eq!(code, 200, "{body}");
    let out = load.join().unwrap();
    report(&format!("switchover under pgbench -c 16: {body}"));
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert!(!out.contains("aborted"), "{out}");

    // Writes now go to failover1.
    assert_eq!(lands_on(&cluster, proxy.rw), Ok(1));
    // failover2 follows the new primary: a table made there shows up on it.
    psql(proxy.rw, "CREATE TABLE after_switchover (v int)").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while has_table(&cluster, 2).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "failover2 did not replay from failover1 within 20 s; its log:\n{}",
            cluster.log_tail(2, 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // demote_command made the old primary a standby of failover1: no longer fenced,
    // it streams the new timeline and the table made there shows up on it.
    wait_for(
        "the old primary demoted to a standby of failover1",
        Duration::from_secs(60),
        || has_table(&cluster, 0),
    );
    let marker = std::fs::read_to_string(cluster.nodes[0].data.with_extension("demoted")).unwrap();
    assert_eq!(marker.trim(), "main default -> failover1");
    wait_for("default up as a standby, not fenced", Duration::from_secs(20), || {
        let (_, status) = http_get(admin, "/status");
        let doc: serde_json::Value = serde_json::from_str(&status).ok()?;
        let n = &doc["clusters"][0]["nodes"][0];
        (n["role"] == "standby" && n["fenced"] == false).then_some(())
    });
}

/// Node `i` has the table made on the new primary after the switchover (it replays it).
fn has_table(cluster: &LocalCluster, i: usize) -> Option<()> {
    cluster
        .sql_db(
            i,
            APP_DB,
            "SELECT count(*) FROM pg_class WHERE relname = 'after_switchover'",
        )
        .ok()
        .filter(|n| n == "1")
        .map(|_| ())
}
