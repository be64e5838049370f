//! Integration-test harness: a real PostgreSQL cluster (`LocalCluster`), the real
//! `switchyard` binary in front of it, and real clients (psql, tokio-postgres, pgbench,
//! Python scripts) talking to the proxy.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use switchyard::demo::postgres::{free_port, LocalCluster, APP_DB, APP_PASSWORD, APP_USER, SUPERUSER_PASSWORD};
use tokio_postgres::{Client, NoTls};

/// The binary under test: this build's, or another one named by `SWITCHYARD_BIN` (to
/// run the tests against a release build, or an older build to see a test fail).
pub fn switchyard_bin() -> String {
    std::env::var("SWITCHYARD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_switchyard").to_string())
}

pub struct Proxy {
    pub child: Child,
    pub rw: u16,
    pub ro: u16,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Proxy {
    /// Start `switchyard --config` for `cluster` with extra `[clusters.main]` lines and
    /// extra top-level TOML (more users, other health settings...).
    pub fn start(cluster: &LocalCluster, name: &str, extra_cluster: &str, extra_top: &str) -> Proxy {
        let (text, rw, ro) = Proxy::config_text(cluster, extra_cluster, extra_top);
        Proxy::launch(cluster, name, &text, rw, ro)
    }

    /// As `start`, without waiting until writes and reads get through (for tests where
    /// nodes are meant to be down).
    pub fn start_unchecked(cluster: &LocalCluster, name: &str, extra_cluster: &str, extra_top: &str) -> Proxy {
        let (text, rw, ro) = Proxy::config_text(cluster, extra_cluster, extra_top);
        Proxy::spawn(cluster, name, &text, rw, ro)
    }

    fn config_text(cluster: &LocalCluster, extra_cluster: &str, extra_top: &str) -> (String, u16, u16) {
        let (rw, ro) = (free_port(), free_port());
        let mut text = cluster.config_toml(rw, ro, extra_cluster);
        if !extra_top.is_empty() {
            // Later [health] keys would be duplicates; tests that change health replace the table.
            if extra_top.contains("[health]") {
                let end = text.find("[[users]]").unwrap();
                text.replace_range(..end, "");
            }
            text = format!("{extra_top}\n{text}");
        }
        (text, rw, ro)
    }

    /// Start the proxy on a config text of the caller's, listening on `rw` / `ro`.
    pub fn launch(cluster: &LocalCluster, name: &str, text: &str, rw: u16, ro: u16) -> Proxy {
        let proxy = Proxy::spawn(cluster, name, text, rw, ro);
        // Ready when writes reach the primary and reads reach a standby (or the only node).
        let want_standby = text.contains("failover");
        wait_for("proxy ready", Duration::from_secs(20), || {
            let w = psql(proxy.rw, "/* switchyard:primary */ SELECT pg_is_in_recovery()").ok()? == "f";
            let r = psql(proxy.ro, "SELECT pg_is_in_recovery()").ok()? == if want_standby { "t" } else { "f" };
            (w && r).then_some(())
        });
        proxy
    }

    /// Start the proxy on a config text without waiting for it to serve.
    pub fn spawn(cluster: &LocalCluster, name: &str, text: &str, rw: u16, ro: u16) -> Proxy {
        Proxy::spawn_in(cluster.dir(), name, text, rw, ro)
    }

    /// The same, with its config and log in `dir`.
    pub fn spawn_in(dir: &std::path::Path, name: &str, text: &str, rw: u16, ro: u16) -> Proxy {
        Proxy::spawn_env(dir, name, text, rw, ro, &[])
    }

    /// The same, with more environment variables for the process.
    pub fn spawn_env(
        dir: &std::path::Path,
        name: &str,
        text: &str,
        rw: u16,
        ro: u16,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Proxy {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(switchyard_bin())
            .args(["--config", config.to_str().unwrap()])
            .envs(env.iter().copied())
            .env(
                "SWITCHYARD_LOG",
                std::env::var("SWITCHYARD_TEST_LOG").unwrap_or_else(|_| "info,switchyard=debug".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start switchyard");
        Proxy {
            child,
            rw,
            ro,
            log,
            config,
        }
    }

    /// Send a signal to the proxy process (SIGHUP: reload, SIGTERM: graceful stop).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- switchyard log (last lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Poll `f` every 50 ms until it returns Some, or panic after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run one statement with `psql` through the proxy. Ok(stdout) or Err(stderr).
pub fn psql(port: u16, sql: &str) -> Result<String, String> {
    psql_as(port, APP_USER, APP_PASSWORD, sql)
}

pub fn psql_as(port: u16, user: &str, password: &str, sql: &str) -> Result<String, String> {
    psql_db(port, user, password, APP_DB, sql)
}

/// psql through the proxy as `user` on database `db` (`switchyard`: the admin console).
pub fn psql_db(port: u16, user: &str, password: &str, db: &str, sql: &str) -> Result<String, String> {
    psql_run(port, user, password, db, &[sql])
}

/// Several statements in one psql session, each its own Query; one output line each.
pub fn psql_statements(port: u16, statements: &[&str]) -> Vec<String> {
    let out = psql_run(port, APP_USER, APP_PASSWORD, APP_DB, statements).unwrap_or_else(|e| panic!("{e}"));
    out.lines().map(str::to_string).collect()
}

fn psql_run(port: u16, user: &str, password: &str, db: &str, statements: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    for sql in statements {
        cmd.args(["-c", sql]);
    }
    cmd.args([
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        user,
        "-d",
        db,
    ])
    .env("PGPASSWORD", password);
    run_psql(&mut cmd)
}

/// psql with a libpq connection string (TLS options and the like), as the app user.
pub fn psql_conninfo(conninfo: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, conninfo])
        .env("PGPASSWORD", APP_PASSWORD);
    run_psql(&mut cmd)
}

/// Ok(stdout) or Err(stderr), trimmed; a connection attempt bounded to 10 s.
fn run_psql(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.env("PGCONNECT_TIMEOUT", "10").output().expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Which node (by index) a port belongs to.
pub fn node_of(cluster: &LocalCluster, port: &str) -> usize {
    let port: u16 = port.parse().unwrap_or_else(|_| panic!("not a port: {port:?}"));
    cluster
        .nodes
        .iter()
        .position(|n| n.port == port)
        .expect("port of a cluster node")
}

/// Which node a fresh psql session on `port` lands on.
pub fn lands_on(cluster: &LocalCluster, port: u16) -> Result<usize, String> {
    psql(port, "SELECT inet_server_port()").map(|p| node_of(cluster, &p))
}

/// A tokio-postgres session through the proxy, kept open by the caller.
pub struct Held {
    pub client: Client,
    /// The connection task: an error the server (or proxy) sends while the session is
    /// idle, such as a FATAL before closing, ends up here rather than in a query result.
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl std::ops::Deref for Held {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Held {
    /// Wait until the session's next statement fails; the error text, including any
    /// FATAL message received while idle.
    pub async fn wait_for_error(self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let query_err = loop {
            match self.client.simple_query("SELECT 1").await {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(_) => panic!("session still works {within:?} later"),
            }
        };
        let idle_err = match tokio::time::timeout(Duration::from_secs(2), self.conn).await {
            Ok(Ok(Err(e))) => db_text(&e),
            _ => String::new(),
        };
        format!("{} {idle_err}", db_text(&query_err))
    }
}

pub fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

pub async fn connect(port: u16) -> Result<Held, tokio_postgres::Error> {
    connect_options(port, "").await
}

/// Connect with libpq-style `options` (e.g. `-c name=value`).
pub async fn connect_options(port: u16, options: &str) -> Result<Held, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_DB)
        .connect_timeout(Duration::from_secs(10));
    if !options.is_empty() {
        cfg.options(options);
    }
    let (client, conn) = cfg.connect(NoTls).await?;
    Ok(Held {
        client,
        conn: tokio::spawn(conn),
    })
}

pub async fn server_port(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT inet_server_port()", &[]).await?.get(0))
}

/// Run a Python script from tests/python with the given args/env; panics with its
/// output on failure.
pub fn python(script: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let mut cmd = Command::new("python3");
    cmd.arg(&path).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} {args:?} failed:\n{text}");
    text
}

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut resp = agent.get(&url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

/// Append a line to the test's stdout log (shown with --nocapture), for measured figures.
pub fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "measured: {line}");
}

/// pgbench through `port` as the app user on the app database, with `args`.
pub fn pgbench_command<S: AsRef<std::ffi::OsStr>>(port: u16, args: &[S]) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP_USER])
        .args(args)
        .arg(APP_DB)
        .env("PGPASSWORD", APP_PASSWORD);
    cmd
}

/// Run pgbench through `port` as the app user; panics with its output on failure.
pub fn pgbench(port: u16, args: &[&str]) -> String {
    let out = pgbench_command(port, args).output().expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

/// When writes came back after an outage that began at `fault`: the first time in
/// `acks` (sorted or not) after the longest gap that starts after `fault` (acks still
/// in flight when the fault hit may land just after it).
pub fn resumed_after(acks: &[Instant], fault: Instant) -> Option<Duration> {
    let mut t: Vec<Instant> = acks.to_vec();
    t.sort();
    let start = t.iter().rposition(|x| *x <= fault).map_or(0, |i| i);
    let (mut best, mut at) = (Duration::ZERO, None);
    for w in t[start..].windows(2) {
        let gap = w[1] - w[0];
        if gap > best {
            best = gap;
            at = Some(w[1]);
        }
    }
    at.map(|a| a.saturating_duration_since(fault))
}

pub mod certs;
pub mod etcd;
pub mod mysql;
