//! The MySQL side of the harness: a MariaDB primary + replicas (`MariaCluster`), the
//! switchyard binary in front with `engine = "mysql"`, and the `mariadb` CLI as client.

use std::process::Command;
use std::time::Duration;

#[allow(unused_imports)]
pub use switchyard::demo::mariadb::{
    MariaCluster, MY_APP_DB, MY_APP_PASSWORD, MY_APP_USER, MY_MANAGER_PASSWORD, MY_MANAGER_USER, MY_MONITOR_PASSWORD,
    MY_MONITOR_USER, REPL_PASSWORD, REPL_USER,
};

use super::{free_port, wait_for, Proxy};

/// The whole config for `cluster` (health every 500 ms, rise/fall 2, the app user).
pub fn my_config(cluster: &MariaCluster, rw: u16, ro: u16, extra_cluster: &str) -> String {
    format!(
        "[health]\ninterval_ms = 500\ntimeout_ms = 500\nrise = 2\nfall = 2\nuser = \"{MY_MONITOR_USER}\"\npassword = \"{MY_MONITOR_PASSWORD}\"\n\n\
         [[users]]\nname = \"{MY_APP_USER}\"\npassword = \"{MY_APP_PASSWORD}\"\n\n{}",
        cluster.config_toml("main", rw, ro, extra_cluster)
    )
}

/// Start switchyard in front of `cluster`; ready when rw reaches a writable node and ro
/// a read-only one.
pub fn my_proxy(cluster: &MariaCluster, extra_cluster: &str) -> Proxy {
    let (rw, ro) = (free_port(), free_port());
    let text = my_config(cluster, rw, ro, extra_cluster);
    let proxy = my_spawn(cluster, "proxy", &text, rw, ro);
    wait_for("MySQL proxy ready", Duration::from_secs(30), || {
        let w = mariadb(proxy.rw, "SELECT @@read_only").ok()? == "0";
        let r = mariadb(proxy.ro, "SELECT @@read_only").ok()? == "1";
        (w && r).then_some(())
    });
    proxy
}

pub fn my_spawn(cluster: &MariaCluster, name: &str, text: &str, rw: u16, ro: u16) -> Proxy {
    Proxy::spawn_in(cluster.dir(), name, text, rw, ro)
}

/// Run `sql` through the proxy as the app user with the `mariadb` CLI (batch mode, no
/// column names); stdout trimmed, or stderr.
pub fn mariadb(port: u16, sql: &str) -> Result<String, String> {
    mariadb_as(port, MY_APP_USER, MY_APP_PASSWORD, Some(MY_APP_DB), sql)
}

pub fn mariadb_as(port: u16, user: &str, password: &str, db: Option<&str>, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("mariadb");
    cmd.args(["--no-defaults", "-h", "127.0.0.1", "-P", &port.to_string(), "-u", user])
        .arg(format!("-p{password}"))
        .args(["-N", "-B", "--connect-timeout=10", "--skip-ssl", "-e", sql]);
    if let Some(db) = db {
        cmd.arg(db);
    }
    let out = cmd.output().map_err(|e| format!("cannot run mariadb: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Which node (index) a new session on `port` lands on, by the server's port.
pub fn my_lands_on(cluster: &MariaCluster, port: u16) -> Result<usize, String> {
    let p: u16 = mariadb(port, "SELECT @@port")?.parse().map_err(|e| format!("{e}"))?;
    cluster
        .nodes
        .iter()
        .position(|n| n.port == p)
        .ok_or_else(|| format!("port {p} is no node"))
}

/// The numbers of a sysbench run's `SQL statistics`, or a panic with its output.
pub struct Sysbench {
    pub transactions: u64,
    pub queries: u64,
    pub ignored_errors: u64,
    pub reconnects: u64,
}

/// `sysbench TEST COMMAND` through `port` as the app user (2 tables of 1000 rows, 4
/// threads, 5 s, InnoDB deadlocks retried); `extra` options override those.
pub fn sysbench(port: u16, test: &str, command: &str, extra: &[&str]) -> (String, Sysbench) {
    let out = Command::new("sysbench")
        .args([
            test,
            "--db-driver=mysql",
            "--mysql-host=127.0.0.1",
            &format!("--mysql-port={port}"),
            &format!("--mysql-user={MY_APP_USER}"),
            &format!("--mysql-password={MY_APP_PASSWORD}"),
            &format!("--mysql-db={MY_APP_DB}"),
            "--mysql-ssl=off",
            "--tables=2",
            "--table-size=1000",
            "--threads=4",
            "--time=5",
            "--mysql-ignore-errors=1213",
        ])
        .args(extra)
        .arg(command)
        .output()
        .expect("run sysbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("FATAL"),
        "sysbench {test} {command} on port {port} failed:\n{text}"
    );
    let number = |label: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let stats = Sysbench {
        transactions: number("transactions:"),
        queries: number("queries:"),
        ignored_errors: number("ignored errors:"),
        reconnects: number("reconnects:"),
    };
    (text, stats)
}

/// A server status counter of node `i`.
pub fn global_status(cluster: &MariaCluster, i: usize, name: &str) -> u64 {
    cluster
        .sql(i, &format!("SHOW GLOBAL STATUS LIKE '{name}'"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no status {name}"))
}

/// The environment `tests/python/django_mysql_check.py` reads: the proxy's ports and the
/// app login, with the seed article's settings (`sytest.settings_mysql`).
pub fn django_env(proxy: &Proxy) -> Vec<(&'static str, String)> {
    vec![
        ("DJANGO_SETTINGS_MODULE", "sytest.settings_mysql".to_string()),
        ("SY_HOST", "127.0.0.1".to_string()),
        ("SY_RW_PORT", proxy.rw.to_string()),
        ("SY_RO_PORT", proxy.ro.to_string()),
        ("SY_USER", MY_APP_USER.to_string()),
        ("SY_PASSWORD", MY_APP_PASSWORD.to_string()),
        ("SY_DB", MY_APP_DB.to_string()),
    ]
}

/// mysql_async options for the app user through the proxy at `port`.
pub fn my_opts(port: u16) -> mysql_async::Opts {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(MY_APP_USER))
        .pass(Some(MY_APP_PASSWORD))
        .db_name(Some(MY_APP_DB))
        // Else mysql_async asks the server for its Unix socket and uses that instead
        // of the proxy.
        .prefer_socket(false)
        .into()
}
