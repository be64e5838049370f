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
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &format!(
            "pool_mode = \"transaction\"\npool_size = 20\nsplit_brain = \"refuse\"\n\n[clusters.main.manager]\nuser = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\n"
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

    // Writes now go to failover1; the old primary is read-only and gets nothing.
    assert_eq!(lands_on(&cluster, proxy.rw), Ok(1));
    assert_eq!(cluster.sql(0, "SHOW default_transaction_read_only").unwrap(), "on");
    let (_, status) = http_get(admin, "/status");
    assert!(status.contains("\"fenced\":true"), "{status}");
    // failover2 follows the new primary: a table made there shows up on it.
    psql(proxy.rw, "CREATE TABLE after_switchover (v int)").unwrap();
    wait_for("failover2 replaying from failover1", Duration::from_secs(20), || {
        cluster
            .sql_db(
                2,
                APP_DB,
                "SELECT count(*) FROM pg_class WHERE relname = 'after_switchover'",
            )
            .ok()
            .filter(|n| n == "1")
    });
}
