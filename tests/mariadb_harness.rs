//! The MariaDB test harness itself (src/localmaria.rs), no proxy involved: replication
//! reaches the replicas, read-only roles, a crash of the primary, an operator failover
//! and the repointing of the other replica, a restart of the old primary.

use std::process::Command;
use std::time::{Duration, Instant};

use switchyard::demo::mariadb::{
    MariaCluster, MY_APP_DB, MY_APP_PASSWORD, MY_APP_USER, MY_MONITOR_PASSWORD, MY_MONITOR_USER,
};

/// SQL as the application user over TCP, as a client of the node would.
fn app_sql(c: &MariaCluster, i: usize, sql: &str) -> String {
    let out = Command::new("mariadb")
        .arg("--no-defaults")
        .args(["-h127.0.0.1", &format!("-P{}", c.nodes[i].port)])
        .arg(format!("-u{MY_APP_USER}"))
        .arg(format!("-p{MY_APP_PASSWORD}"))
        .args(["-N", "-B", MY_APP_DB, "-e", sql])
        .output()
        .expect("run mariadb");
    assert!(
        out.status.success(),
        "`{sql}` on {} failed: {}\n{}",
        c.nodes[i].name,
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(i, 20)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn replicated_mariadb_cluster_fails_over() {
    let t0 = Instant::now();
    let mut c = MariaCluster::start(2).expect("start the cluster");
    eprintln!("cluster up in {:?}", t0.elapsed());

    // The users came to the replicas through replication.
    for i in 1..3 {
        assert_eq!(
            c.sql(
                i,
                &format!("SELECT COUNT(*) FROM mysql.user WHERE user = '{MY_APP_USER}'")
            )
            .unwrap(),
            "1"
        );
    }
    assert_eq!(c.sql(0, "SELECT @@read_only").unwrap(), "0");
    assert_eq!(c.sql(1, "SELECT @@read_only").unwrap(), "1");
    assert_eq!(c.sql(2, "SELECT @@read_only").unwrap(), "1");

    app_sql(
        &c,
        0,
        "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20)); INSERT INTO t VALUES (1, 'one')",
    );
    c.wait_replicated(0, Duration::from_secs(10)).unwrap();
    for i in 1..3 {
        assert_eq!(app_sql(&c, i, "SELECT v FROM t WHERE id = 1"), "one");
        assert_eq!(app_sql(&c, i, "SELECT @@read_only"), "1");
    }
    assert_eq!(app_sql(&c, 0, "SELECT @@read_only"), "0");
    // The app user may not write on a read-only replica.
    let refused = Command::new("mariadb")
        .args([
            "--no-defaults",
            "-h127.0.0.1",
            &format!("-P{}", c.nodes[1].port),
            "-uapp",
            "-papp",
            "app",
        ])
        .args(["-e", "INSERT INTO t VALUES (99, 'no')"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("read-only"));

    // The monitor login sees replication state over TCP.
    let monitor = Command::new("mariadb")
        .args(["--no-defaults", "-h127.0.0.1", &format!("-P{}", c.nodes[1].port)])
        .arg(format!("-u{MY_MONITOR_USER}"))
        .arg(format!("-p{MY_MONITOR_PASSWORD}"))
        .args(["-E", "-e", "SHOW SLAVE STATUS; SELECT @@gtid_slave_pos, @@read_only"])
        .output()
        .unwrap();
    assert!(monitor.status.success(), "{}", String::from_utf8_lossy(&monitor.stderr));
    assert!(String::from_utf8_lossy(&monitor.stdout).contains("Slave_SQL_Running: Yes"));

    // Crash the primary; the operator promotes failover1 and repoints failover2.
    c.kill9(0).unwrap();
    assert!(c.pid(0).is_err());
    c.promote(1).unwrap();
    c.follow(2, 1).unwrap();
    assert_eq!(c.sql(1, "SELECT @@read_only").unwrap(), "0");
    app_sql(&c, 1, "INSERT INTO t VALUES (2, 'two')");
    c.wait_replicated(1, Duration::from_secs(10)).unwrap();
    assert_eq!(app_sql(&c, 2, "SELECT v FROM t ORDER BY id"), "one\ntwo");
    assert_eq!(app_sql(&c, 2, "SELECT @@read_only"), "1");

    // The old primary comes back (writable, on its own: nobody repointed it).
    c.start_node(0).unwrap();
    assert_eq!(app_sql(&c, 0, "SELECT v FROM t ORDER BY id"), "one");
    assert_eq!(c.sql(0, "SELECT @@read_only").unwrap(), "0");

    // Freeze and thaw, clean stop and start of a replica, which resumes replicating.
    c.signal(2, libc::SIGSTOP).unwrap();
    c.signal(2, libc::SIGCONT).unwrap();
    c.stop_node(2).unwrap();
    app_sql(&c, 1, "INSERT INTO t VALUES (3, 'three')");
    c.start_node(2).unwrap();
    c.wait_replicated(1, Duration::from_secs(10)).unwrap();
    assert_eq!(app_sql(&c, 2, "SELECT COUNT(*) FROM t"), "3");
    assert_eq!(app_sql(&c, 2, "SELECT @@read_only"), "1");

    let toml = c.config_toml("maria", 7000, 7001, "");
    assert!(toml.contains("[clusters.maria]\nengine = \"mysql\""));
    assert!(toml.contains(&format!("port = {}", c.nodes[2].port)));
    assert!(!c.log_tail(1, 5).is_empty());
    let dir = c.dir().to_path_buf();
    drop(c);
    assert!(!dir.exists());
    eprintln!("whole test {:?}", t0.elapsed());
}
