//! A throwaway replicated MariaDB cluster on loopback, the MySQL-protocol twin of
//! [`crate::demo::postgres`]: `mariadb-install-db` every node, a `mariadbd` child process
//! per node, GTID replication (`MASTER_USE_GTID = slave_pos`) from the primary to the
//! replicas. Start, stop, kill, freeze, promote and repoint nodes as an operator would.
//! Used by the integration tests of the MySQL engine. When run as root, `mariadbd` gets
//! `--user=root` (it refuses to run as root otherwise).
//!
//! Nodes start from the same options every time, as with a fixed `my.cnf`: replicas
//! with `--read-only=1`, the first node without; a promotion (`SET GLOBAL read_only = 0`)
//! does not survive a restart, a replica's replication settings do.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::demo::postgres::free_port;

/// The application login: all privileges on [`MY_APP_DB`], from any host.
pub const MY_APP_USER: &str = "app";
pub const MY_APP_PASSWORD: &str = "app";
pub const MY_APP_DB: &str = "app";

/// The health monitor's login: `REPLICATION CLIENT, SLAVE MONITOR, PROCESS` on `*.*`
/// (enough for `SHOW SLAVE STATUS`, `@@gtid_*` and `@@read_only`).
pub const MY_MONITOR_USER: &str = "monitor";
pub const MY_MONITOR_PASSWORD: &str = "monitor";

/// The replication login replicas use toward their primary (and Switchyard's manager
/// gives an old primary it rejoins: `manager.replication_user`).
pub const REPL_USER: &str = "repl";
pub const REPL_PASSWORD: &str = "repl";

/// The control plane's login (`[clusters.NAME.manager]`): the privileges failover,
/// switchover and rejoin need on MariaDB 10.11, and no more.
pub const MY_MANAGER_USER: &str = "manager";
pub const MY_MANAGER_PASSWORD: &str = "manager";
pub const MY_MANAGER_GRANTS: &str =
    "READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, CONNECTION ADMIN, RELOAD, PROCESS, SLAVE MONITOR, REPLICATION CLIENT";

/// How long a node may take to accept connections, or to stop.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

const MARIADBD: &str = "/usr/sbin/mariadbd";

pub struct MyNode {
    pub name: String,
    pub port: u16,
    /// The data directory (its `error.log` is the node's server log).
    pub data: PathBuf,
    /// The Unix socket root logs in through.
    pub socket: PathBuf,
}

pub struct MariaCluster {
    dir: tempfile::TempDir,
    pub nodes: Vec<MyNode>,
    /// The running `mariadbd` of each node; None once stopped or killed.
    children: Vec<Option<Child>>,
    as_root: bool,
    /// More `mariadbd` options for every node started from now on (TLS in the tests).
    pub extra_args: Vec<String>,
}

/// `mariadbd`: on the PATH, else where Debian puts it.
fn mariadbd() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("mariadbd"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from(MARIADBD))
}

impl MariaCluster {
    /// Start a primary `default` and `replicas` GTID replicas `failover1`,
    /// `failover2`, ... replicating from it, read-only; the replication, application
    /// and monitor users and the application database are created on the primary and
    /// reach the replicas through replication.
    pub fn start(replicas: usize) -> Result<MariaCluster> {
        if !mariadbd().is_file() {
            bail!("mariadbd not found on the PATH nor at {MARIADBD} (apt-get install mariadb-server mariadb-client)");
        }
        let mut dir = tempfile::Builder::new()
            .prefix("switchyard-maria-")
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        // Unix socket paths must fit in sun_path (108 bytes): fall back to /tmp when
        // $TMPDIR is deep.
        if dir.path().as_os_str().len() > 60 {
            dir = tempfile::Builder::new()
                .prefix("switchyard-maria-")
                .tempdir_in("/tmp")
                .context("creating the cluster's temporary directory in /tmp")?;
        }
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let mut cluster = MariaCluster {
            dir,
            nodes: Vec::new(),
            children: Vec::new(),
            as_root,
            extra_args: Vec::new(),
        };
        for i in 0..=replicas {
            let name = if i == 0 {
                "default".to_string()
            } else {
                format!("failover{i}")
            };
            let node = MyNode {
                port: free_port(),
                data: cluster.dir.path().join(&name),
                socket: cluster.dir.path().join(format!("{name}.sock")),
                name,
            };
            if node.socket.as_os_str().len() >= 100 {
                bail!("socket path {} is too long", node.socket.display());
            }
            cluster.nodes.push(node);
            cluster.children.push(None);
        }
        // install-db the nodes while nothing else runs, then start them all before
        // waiting on any: the servers initialize concurrently.
        for i in 0..cluster.nodes.len() {
            cluster.install(i)?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_accepting(i, START_TIMEOUT)?;
        }

        // Fresh installs write no binlog (install-db bootstraps without one), so the
        // primary's binlog starts empty and replicas replicate these from the start.
        cluster
            .sql(
                0,
                &format!(
                    "CREATE USER '{REPL_USER}'@'%' IDENTIFIED BY '{REPL_PASSWORD}';\
                 GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'%';\
                 CREATE DATABASE `{MY_APP_DB}`;\
                 CREATE USER '{MY_APP_USER}'@'%' IDENTIFIED BY '{MY_APP_PASSWORD}';\
                 GRANT ALL PRIVILEGES ON `{MY_APP_DB}`.* TO '{MY_APP_USER}'@'%';\
                 CREATE USER '{MY_MONITOR_USER}'@'%' IDENTIFIED BY '{MY_MONITOR_PASSWORD}';\
                 GRANT REPLICATION CLIENT, SLAVE MONITOR, PROCESS ON *.* TO '{MY_MONITOR_USER}'@'%';\
                 CREATE USER '{MY_MANAGER_USER}'@'%' IDENTIFIED BY '{MY_MANAGER_PASSWORD}';\
                 GRANT {MY_MANAGER_GRANTS} ON *.* TO '{MY_MANAGER_USER}'@'%'"
                ),
            )
            .context("creating users on the primary")?;
        for i in 1..cluster.nodes.len() {
            cluster.follow(i, 0)?;
        }
        cluster.wait_replicated(0, Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Semi-synchronous replication (`AFTER_SYNC`) on every node, now and on restarts
    /// (as each node's `my.cnf` would have it): a commit is acknowledged only once a
    /// replica has it. With the replica side on at startup, a crashed primary drops
    /// from its binary log the transactions no replica acknowledged (MariaDB 10.6+), so
    /// it can rejoin. `kill_conn_timeout` 1 s: a semi-sync replica's STOP SLAVE waits
    /// that long for a frozen primary.
    pub fn enable_semi_sync(&mut self) -> Result<()> {
        self.extra_args.extend(
            [
                "--rpl-semi-sync-master-enabled=1",
                "--rpl-semi-sync-slave-enabled=1",
                "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
                "--rpl-semi-sync-master-timeout=10000",
                "--rpl-semi-sync-slave-kill-conn-timeout=1",
            ]
            .map(String::from),
        );
        for i in 0..self.nodes.len() {
            self.sql(
                i,
                "SET GLOBAL rpl_semi_sync_master_enabled = 1; SET GLOBAL rpl_semi_sync_slave_enabled = 1; \
                 SET GLOBAL rpl_semi_sync_master_wait_point = AFTER_SYNC; SET GLOBAL rpl_semi_sync_master_timeout = 10000; \
                 SET GLOBAL rpl_semi_sync_slave_kill_conn_timeout = 1",
            )?;
        }
        // The replicas' IO threads must reconnect to announce themselves as semi-sync.
        for i in 1..self.nodes.len() {
            self.sql(i, "STOP SLAVE IO_THREAD; START SLAVE IO_THREAD")?;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = self.sql(0, "SHOW STATUS LIKE 'Rpl_semi_sync_master_clients'")?;
            if n.split_whitespace().last().is_some_and(|c| c != "0") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no replica connected as semi-synchronous within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn install(&self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let mut cmd = Command::new("mariadb-install-db");
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", path(&n.data)))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                // Passed through to the bootstrap server: a small redo log from the
                // start (the default is 96 MiB, written out in full).
                "--innodb-log-file-size=16M",
                "--innodb-buffer-pool-size=32M",
            ]);
        if self.as_root {
            cmd.arg("--user=root");
        }
        let out = cmd.output().context("running mariadb-install-db")?;
        if !out.status.success() {
            bail!(
                "mariadb-install-db for {} failed: {}{}",
                n.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn error_log(&self, i: usize) -> PathBuf {
        self.nodes[i].data.join("error.log")
    }

    /// Where the child's stdout and stderr go (empty unless it fails very early).
    fn output_log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.out", self.nodes[i].name))
    }

    /// The last `lines` lines of node `i`'s error log (for test failure messages).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let mut text = std::fs::read_to_string(self.output_log(i)).unwrap_or_default();
        text += &std::fs::read_to_string(self.error_log(i)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let mut cmd = Command::new(mariadbd());
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", path(&n.data)))
            .arg(format!("--port={}", n.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", path(&n.socket)))
            .arg(format!("--pid-file={}", path(&n.data.join("mariadbd.pid"))))
            .arg(format!("--log-error={}", path(&self.error_log(i))))
            .arg(format!("--server-id={}", i + 1))
            .args([
                "--log-bin=mysql-bin",
                "--log-slave-updates",
                "--binlog-format=ROW",
                "--gtid-strict-mode=1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                // A killed process loses nothing written to the OS; no fsync per commit.
                "--innodb-flush-log-at-trx-commit=2",
                "--sync-binlog=0",
                "--performance-schema=0",
                "--max-connections=300",
                // A replica notices a silent (frozen) primary within seconds.
                "--slave-net-timeout=4",
            ]);
        if i > 0 {
            cmd.arg("--read-only=1");
        }
        cmd.args(&self.extra_args);
        if self.as_root {
            cmd.arg("--user=root");
        }
        let out = File::create(self.output_log(i)).context("creating the node's output log")?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting mariadbd for {}", n.name))?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Whether node `i`'s process is running (reaps it if it exited).
    fn running(&mut self, i: usize) -> bool {
        match self.children[i].as_mut() {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                _ => {
                    self.children[i] = None;
                    false
                }
            },
        }
    }

    fn wait_accepting(&mut self, i: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if !self.running(i) {
                bail!(
                    "mariadbd for {} exited while starting:\n{}",
                    self.nodes[i].name,
                    self.log_tail(i, 30)
                );
            }
            let last = match self.sql(i, "SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept connections within {within:?}: {last:#}\n{}",
                    self.nodes[i].name,
                    self.log_tail(i, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start (or restart) a stopped or killed node `i` with the options it first
    /// started with, and wait until it accepts connections.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        if self.running(i) {
            bail!("{} is already running", self.nodes[i].name);
        }
        self.spawn(i)?;
        self.wait_accepting(i, START_TIMEOUT)
    }

    /// Clean shutdown of node `i` (SIGTERM, as `mariadb-admin shutdown` does it), and
    /// wait for the process to exit; SIGKILL if it has not after 30 s.
    pub fn stop_node(&mut self, i: usize) -> Result<()> {
        if !self.running(i) {
            bail!("{} is not running", self.nodes[i].name);
        }
        // A frozen node cannot shut down.
        self.signal(i, libc::SIGCONT)?;
        self.signal(i, libc::SIGTERM)?;
        if self.wait_exit(i, STOP_TIMEOUT)? {
            return Ok(());
        }
        self.kill9(i)?;
        bail!(
            "{} did not shut down within {STOP_TIMEOUT:?}; killed it",
            self.nodes[i].name
        )
    }

    /// Crash node `i`: SIGKILL, and wait for the process to exit.
    pub fn kill9(&mut self, i: usize) -> Result<()> {
        let name = self.nodes[i].name.clone();
        let mut child = self.children[i]
            .take()
            .ok_or_else(|| anyhow!("{name} is not running"))?;
        child.kill().with_context(|| format!("killing {name}"))?;
        child.wait().with_context(|| format!("waiting for {name} to exit"))?;
        Ok(())
    }

    /// Wait up to `within` for node `i`'s process to exit; whether it did.
    fn wait_exit(&mut self, i: usize, within: Duration) -> Result<bool> {
        let deadline = Instant::now() + within;
        loop {
            if !self.running(i) {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of node `i`'s `mariadbd`.
    pub fn pid(&self, i: usize) -> Result<i32> {
        self.children[i]
            .as_ref()
            .map(|c| c.id() as i32)
            .ok_or_else(|| anyhow!("{} is not running", self.nodes[i].name))
    }

    /// Send `sig` to node `i`'s `mariadbd` (one process: threads, no children).
    pub fn signal(&self, i: usize, sig: i32) -> Result<()> {
        let pid = self.pid(i)?;
        // SAFETY: kill(2) on our own child, not yet reaped (so the pid is still ours).
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {sig} to {}", self.nodes[i].name));
        }
        Ok(())
    }

    /// Run SQL as root on node `i` over its Unix socket with the `mariadb` client
    /// (`-N -B`: no column names, tab-separated); returns its trimmed output. Several
    /// statements may be separated by `;`.
    pub fn sql(&self, i: usize, sql: &str) -> Result<String> {
        self.client(i, sql, &["-N", "-B"])
    }

    fn client(&self, i: usize, sql: &str, format: &[&str]) -> Result<String> {
        let n = &self.nodes[i];
        let out: Output = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", path(&n.socket)))
            .args(["-uroot", "--connect-timeout=5"])
            .args(format)
            .args(["-e", sql])
            .stdin(Stdio::null())
            .output()
            .context("running mariadb")?;
        if !out.status.success() {
            bail!(
                "mariadb on {} failed for `{sql}`: {}{}",
                n.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `SHOW SLAVE STATUS` of node `i`, one `Name: value` per line (empty when it
    /// replicates from nobody).
    fn slave_status(&self, i: usize) -> Result<String> {
        self.client(i, "SHOW SLAVE STATUS", &["-E"])
    }

    /// Operator failover: make replica `i` a writable primary.
    pub fn promote(&self, i: usize) -> Result<()> {
        self.sql(i, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0")
            .with_context(|| format!("promoting {}", self.nodes[i].name))?;
        Ok(())
    }

    /// Make node `i` a read-only replica of node `primary`, from its own GTID position
    /// (`MASTER_USE_GTID = slave_pos`), as an operator repoints replicas after a
    /// failover. A heartbeat every 0.5 s while the primary is idle: what lets
    /// Switchyard tell a frozen primary from a live one quickly (the failover docs).
    pub fn follow(&self, i: usize, primary: usize) -> Result<()> {
        let port = self.nodes[primary].port;
        self.sql(
            i,
            &format!(
                "SET GLOBAL read_only = 1; STOP SLAVE; \
                 CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {port}, \
                 MASTER_USER = '{REPL_USER}', MASTER_PASSWORD = '{REPL_PASSWORD}', \
                 MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1, \
                 MASTER_HEARTBEAT_PERIOD = 0.5; \
                 START SLAVE"
            ),
        )
        .with_context(|| format!("making {} follow {}", self.nodes[i].name, self.nodes[primary].name))?;
        Ok(())
    }

    /// The port node `i` is configured to replicate from (`SHOW SLAVE STATUS`), if any.
    pub fn master_port(&self, i: usize) -> Result<Option<u16>> {
        let status = self.slave_status(i)?;
        Ok(status
            .lines()
            .find_map(|l| l.trim().strip_prefix("Master_Port:"))
            .and_then(|p| p.trim().parse().ok()))
    }

    /// Wait until every running replica of node `primary` (a node whose replication
    /// points at its port) has `@@gtid_slave_pos` equal to the primary's
    /// `@@gtid_binlog_pos` as it is when called.
    pub fn wait_replicated(&self, primary: usize, within: Duration) -> Result<()> {
        let target = self.sql(primary, "SELECT @@gtid_binlog_pos")?;
        let deadline = Instant::now() + within;
        for i in 0..self.nodes.len() {
            if i == primary || self.children[i].is_none() || self.master_port(i)? != Some(self.nodes[primary].port) {
                continue;
            }
            loop {
                let pos = self.sql(i, "SELECT @@gtid_slave_pos")?;
                if pos == target {
                    break;
                }
                if Instant::now() > deadline {
                    let status = self.slave_status(i).unwrap_or_default();
                    bail!(
                        "{} is at GTID '{pos}', not at {}'s '{target}' after {within:?}:\n{status}",
                        self.nodes[i].name,
                        self.nodes[primary].name
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// A `[clusters.NAME]` section of a Switchyard config for this cluster
    /// (`engine = "mysql"`), nodes in the order listed; `[health]` and `[[users]]` are
    /// the caller's (see [`MY_APP_USER`], [`MY_MONITOR_USER`]).
    pub fn config_toml(&self, name: &str, rw_port: u16, ro_port: u16, extra_cluster: &str) -> String {
        let mut s = format!(
            "[clusters.{name}]\nengine = \"mysql\"\nlisten_rw = \"127.0.0.1:{rw_port}\"\nlisten_ro = \"127.0.0.1:{ro_port}\"\n{extra_cluster}\n"
        );
        for n in &self.nodes {
            s += &format!(
                "\n[[clusters.{name}.nodes]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\n",
                n.name, n.port
            );
        }
        s
    }
}

impl Drop for MariaCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            // SIGKILL works on a stopped (SIGSTOP) process too.
            let _ = child.kill();
            let _ = child.wait();
        }
        // The TempDir field removes the directory.
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}
