//! Transaction pooling and read/write splitting against real clusters and real clients.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const TXN: &str = "pool_mode = \"transaction\"\npool_size = 10\ncheckout_timeout_ms = 20000";
const SPLIT: &str = "pool_mode = \"transaction\"\npool_size = 10\ncheckout_timeout_ms = 20000\nread_write_split = true";

fn pgbench(port: u16, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP_USER])
        .args(args)
        .arg(APP_DB)
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

/// Server connections of `app` on a node, as the node itself counts them.
fn app_backends(cluster: &LocalCluster, node: usize) -> i64 {
    cluster
        .sql(node, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND application_name <> 'switchyard-health'")
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn pgbench_200_clients_over_10_server_connections_in_every_protocol_mode() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", TXN, "");
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    // Sample the primary's connection count while the load runs.
    let sampler_cluster_dir = cluster.socket_dir.clone();
    let port = cluster.nodes[0].port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let bin = cluster.bin.clone();
    let sampler = std::thread::spawn(move || {
        let mut max = 0i64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let out = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("psql"))
                .args(["-X", "-At", "-h", sampler_cluster_dir.to_str().unwrap(), "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                .args(["-c", "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND application_name <> 'switchyard-health'"])
                .output()
                .unwrap();
            if let Ok(n) = String::from_utf8_lossy(&out.stdout).trim().parse::<i64>() {
                max = max.max(n);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        max
    });
    for (mode, select_only) in [
        ("simple", false),
        ("extended", false),
        ("prepared", false),
        ("prepared", true),
    ] {
        let mut args = vec!["-c", "200", "-j", "4", "-t", "20", "-M", mode];
        if select_only {
            args.push("-S");
        }
        let out = pgbench(proxy.rw, &args);
        assert!(
            out.contains("number of transactions actually processed: 4000/4000"),
            "{mode}: {out}"
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max = sampler.join().unwrap();
    report(&format!(
        "max server connections of app on the primary under 200 clients: {max}"
    ));
    assert!(
        max <= 10,
        "the primary had {max} connections of app, over pool_size = 10"
    );
    assert!(app_backends(&cluster, 0) <= 10);
}
