//! Clients nobody here wrote, through both endpoints: psql, psycopg 2 and 3, pgbench,
//! and a Django project with a read-replica router.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn psycopg2_and_psycopg3_work_through_both_endpoints() {
    let cluster = LocalCluster::start(1).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    let out = python(
        "psycopg_check.py",
        &["--rw-port", &proxy.rw.to_string(), "--ro-port", &proxy.ro.to_string()],
        &[],
    );
    assert!(out.contains("ok: all psycopg checks passed"), "{out}");
    // The cancel checks went through the proxy's CancelRequest routing.
    assert!(proxy.log_text().contains("cancel request forwarded"));
}

#[test]
fn psql_parameters_and_server_errors_pass_through() {
    let cluster = LocalCluster::start(1).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    // Startup parameters reach the server; ParameterStatus reaches the client.
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.rw.to_string(),
            "-U",
            APP_USER,
            "-d",
            APP_DB,
        ])
        .args([
            "-c",
            "SELECT current_setting('application_name'), current_setting('TimeZone')",
            "-c",
            "SHOW server_version",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGAPPNAME", "shop-frontend")
        .env("PGTZ", "Asia/Tokyo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shop-frontend|Asia/Tokyo"), "{text}");
    // An unknown database is the server's error, passed on unchanged.
    let out = Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.rw.to_string(),
            "-U",
            APP_USER,
            "-d",
            "nosuchdb",
            "-c",
            "SELECT 1",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database \"nosuchdb\" does not exist"), "{err}");
}

#[test]
fn pgbench_runs_through_rw_in_every_protocol_mode_and_select_only_through_ro() {
    let cluster = LocalCluster::start(1).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(proxy.rw, &["-c", "8", "-j", "2", "-t", "200", "-M", mode]);
        assert!(
            out.contains("number of transactions actually processed: 1600/1600"),
            "{out}"
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    // Wait for the standby to have the tables, then a select-only run on ro.
    wait_for("pgbench tables on the standby", Duration::from_secs(10), || {
        psql(proxy.ro, "SELECT count(*) FROM pgbench_accounts")
            .ok()
            .filter(|n| n == "100000")
    });
    let out = pgbench(proxy.ro, &["-S", "-c", "8", "-j", "2", "-t", "200", "-M", "prepared"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert_eq!(cluster.sql(1, "SELECT pg_is_in_recovery()").unwrap(), "t");
}

#[test]
fn django_migrates_writes_and_reads_and_keeps_reading_when_standbys_die() {
    let cluster = LocalCluster::start(2).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    let env = [
        ("SY_HOST", "127.0.0.1".to_string()),
        ("SY_RW_PORT", proxy.rw.to_string()),
        ("SY_RO_PORT", proxy.ro.to_string()),
        ("SY_USER", APP_USER.to_string()),
        ("SY_PASSWORD", APP_PASSWORD.to_string()),
        ("SY_DB", APP_DB.to_string()),
    ];
    for phase in ["migrate", "write", "read"] {
        let out = python("django_check.py", &[phase], &env);
        assert!(out.contains(&format!("ok: {phase}")), "{out}");
    }
    // The migration ran on the primary only, and reached the standbys by replication.
    assert_eq!(
        cluster.sql_db(1, APP_DB, "SELECT count(*) FROM shop_customer").unwrap(),
        "2"
    );

    cluster.kill9(1).unwrap();
    let out = python("django_check.py", &["read"], &env);
    assert!(out.contains("ok: read"), "{out}");
    cluster.kill9(2).unwrap();
    let out = python("django_check.py", &["read"], &env);
    assert!(out.contains("ok: read"), "{out}");
    // With both standbys gone the reads were served by the primary.
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(0));
}
