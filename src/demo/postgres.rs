//! A throwaway replicated PostgreSQL cluster on loopback: `initdb` a primary,
//! `pg_basebackup -R` streaming standbys, `pg_ctl` to start, stop, kill and promote.
//! Used by `switchyard demo` and by the integration tests, so both exercise real
//! servers the same way. When run as root, server commands run as `postgres` through
//! `runuser`, since PostgreSQL refuses to run as root.

use std::ffi::CString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app";
pub const APP_DB: &str = "app";

/// The `postgres` superuser's password in a LocalCluster (for a `[clusters.NAME.manager]`).
pub const SUPERUSER_PASSWORD: &str = "postgres-local";

pub struct PgNode {
    pub name: String,
    pub port: u16,
    pub data: PathBuf,
}

pub struct LocalCluster {
    dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub nodes: Vec<PgNode>,
    /// Unix socket directory of every node (the harness talks to servers as superuser
    /// through it, never through the proxy).
    pub socket_dir: PathBuf,
    run_as: Option<u32>,
}

/// The newest `/usr/lib/postgresql/<version>/bin`, or `$SWITCHYARD_PG_BIN`.
pub fn find_pg_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SWITCHYARD_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| anyhow!("no /usr/lib/postgresql/<version>/bin/initdb found (apt-get install postgresql)"))
}

/// A port free on 127.0.0.1 at the time of asking, for a server about to listen on it.
///
/// Ports come from below the kernel's ephemeral range when there is room there. A port
/// that `bind(0)` hands out is one the kernel may hand again, in the moment before the
/// server binds it, to an outgoing connection's source port or to another test's
/// `bind(0)`; the server then fails with "Address already in use" (seen in CI). Below
/// that range only listeners take ports, and one counter per process keeps the callers
/// of a process (tests run in parallel threads) on different ports.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(u32::from(u16::MAX));
    if ephemeral_low >= LOWEST + 1_000 {
        let span = ephemeral_low - LOWEST;
        // Processes start at different places, so a demo and a test run side by side
        // rarely probe the same ports.
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (LOWEST + (start + n) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

fn postgres_uid() -> Option<(u32, u32)> {
    let name = CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        None
    } else {
        // SAFETY: non-null result of getpwnam.
        unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
    }
}

impl LocalCluster {
    /// Start a primary and `standbys` streaming standbys, named as in the product notes:
    /// `default`, `failover1`, `failover2`, ...
    pub fn start(standbys: usize) -> Result<LocalCluster> {
        let bin = find_pg_bin()?;
        let dir = tempfile::Builder::new().prefix("switchyard-").tempdir()?;
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            let (uid, gid) = postgres_uid()
                .ok_or_else(|| anyhow!("running as root but there is no `postgres` user to run PostgreSQL as"))?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            Some(uid)
        } else {
            None
        };
        let socket_dir = dir.path().to_path_buf();
        let mut cluster = LocalCluster {
            dir,
            bin,
            nodes: Vec::new(),
            socket_dir,
            run_as,
        };

        let primary = PgNode {
            name: "default".into(),
            port: free_port(),
            data: cluster.dir.path().join("default"),
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                path(&primary.data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        // max_prepared_transactions: client libraries' two-phase commit tests run too.
        let conf = format!(
            "\n# switchyard test cluster\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nfull_page_writes = off\nmax_connections = 300\nshared_buffers = 32MB\nwal_keep_size = 256MB\nmax_wal_senders = 10\nhot_standby_feedback = on\nmax_prepared_transactions = 20\nwal_receiver_status_interval = 1s\nwal_retrieve_retry_interval = 1s\nlog_line_prefix = '%m [%p] %q%u@%d '\n",
            cluster.socket_dir.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(primary.data.join("postgresql.conf"))?
            .write_all_str(&conf)?;
        cluster.nodes.push(primary);
        cluster.start_node(0)?;
        cluster.sql(
            0,
            &format!("CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD '{APP_PASSWORD}'"),
        )?;
        cluster.sql(0, &format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"))?;
        // A password for the superuser: Switchyard's manager login (promotion,
        // switchover) comes over TCP, where the cluster asks for SCRAM.
        cluster.sql(0, &format!("ALTER ROLE postgres PASSWORD '{SUPERUSER_PASSWORD}'"))?;
        // The app user is also the health user of test and demo configs: pg_monitor lets
        // it see whether a standby's WAL receiver streams (orphan detection).
        cluster.sql(0, &format!("GRANT pg_monitor TO {APP_USER}"))?;
        for i in 1..=standbys {
            let node = PgNode {
                name: format!("failover{i}"),
                port: free_port(),
                data: cluster.dir.path().join(format!("failover{i}")),
            };
            let primary_port = cluster.nodes[0].port.to_string();
            cluster.run(
                "pg_basebackup",
                &[
                    "-h",
                    path(&cluster.socket_dir),
                    "-p",
                    &primary_port,
                    "-U",
                    "postgres",
                    "-D",
                    path(&node.data),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ],
            )?;
            cluster.nodes.push(node);
            cluster.start_node(i)?;
        }
        cluster.wait_streaming(0, standbys, Duration::from_secs(30))?;
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if self.run_as.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args).env("PGCONNECT_TIMEOUT", "5");
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(tool, args)
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.nodes[i].name))
    }

    /// The last `lines` lines of node `i`'s server log (for test failure messages).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Start (or restart) node `i` and wait until it accepts connections.
    pub fn start_node(&self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let opts = format!("-p {}", n.port);
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&n.data),
                "-l",
                path(&self.log(i)),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(())
    }

    /// `pg_ctl stop -m <mode>`: "fast" for a clean stop, "immediate" for a crash-like one.
    pub fn stop_node(&self, i: usize, mode: &str) -> Result<()> {
        self.run("pg_ctl", &["-D", path(&self.nodes[i].data), "-m", mode, "-w", "stop"])?;
        Ok(())
    }

    pub fn promote(&self, i: usize) -> Result<()> {
        self.run("pg_ctl", &["-D", path(&self.nodes[i].data), "-w", "promote"])?;
        Ok(())
    }

    /// Make standby `i` stream from node `primary` (as an operator repoints standbys after
    /// a failover): `primary_conninfo` through ALTER SYSTEM and a reload (PostgreSQL 13+);
    /// it moves to the new primary's timeline by itself (`recovery_target_timeline` is
    /// `latest` by default).
    pub fn follow(&self, i: usize, primary: usize) -> Result<()> {
        let conninfo = format!(
            "host={} port={} user=postgres",
            self.socket_dir.display(),
            self.nodes[primary].port
        );
        self.sql(i, &format!("ALTER SYSTEM SET primary_conninfo = '{conninfo}'"))?;
        self.sql(i, "SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn pid(&self, i: usize) -> Result<i32> {
        let text = std::fs::read_to_string(self.nodes[i].data.join("postmaster.pid"))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| anyhow!("bad postmaster.pid"))
    }

    /// Send `sig` to the postmaster and every backend it started.
    pub fn signal(&self, i: usize, sig: i32) -> Result<()> {
        let pid = self.pid(i)?;
        let children = Command::new("pgrep").args(["-P", &pid.to_string()]).output()?;
        // Postmaster first, so it cannot restart children we are about to stop.
        // SAFETY: kill(2) with a pid read from the node's own pid file.
        unsafe { libc::kill(pid, sig) };
        for child in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            if let Ok(c) = child.parse::<i32>() {
                // SAFETY: as above.
                unsafe { libc::kill(c, sig) };
            }
        }
        Ok(())
    }

    /// Crash node `i`: SIGKILL to the postmaster and all its processes.
    pub fn kill9(&self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGKILL)?;
        let pid = self.pid(i)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Run SQL as superuser on node `i` over its Unix socket (not through the proxy);
    /// returns psql's unaligned, tuples-only output.
    pub fn sql(&self, i: usize, sql: &str) -> Result<String> {
        self.sql_db(i, "postgres", sql)
    }

    pub fn sql_db(&self, i: usize, db: &str, sql: &str) -> Result<String> {
        let port = self.nodes[i].port.to_string();
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                path(&self.socket_dir),
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Wait until node `primary` streams to `count` standbys.
    pub fn wait_streaming(&self, primary: usize, count: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let n: usize = self
                .sql(
                    primary,
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )?
                .parse()?;
            if n >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {n} of {count} standbys streaming from {}",
                    self.nodes[primary].name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every running standby has replayed everything node 0 (the primary)
    /// has written so far, so a test can kill the primary without losing its DDL.
    pub fn wait_replayed(&self, within: Duration) -> Result<()> {
        let target = self.sql(0, "SELECT pg_current_wal_lsn()")?;
        let deadline = Instant::now() + within;
        for i in 1..self.nodes.len() {
            loop {
                let done = self.sql(i, &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"))?;
                if done == "t" {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{} did not replay up to {target}", self.nodes[i].name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Make commits wait until every standby has applied them (`remote_apply`), so a
    /// read on a standby right after a commit sees it. (A standby that dies then blocks
    /// commits: for tests that stop writing before they kill one.)
    pub fn synchronous_apply(&self) -> Result<()> {
        let n = self.nodes.len() - 1;
        self.sql(
            0,
            &format!("ALTER SYSTEM SET synchronous_standby_names = 'ANY {n} (*)'"),
        )?;
        self.sql(0, "ALTER SYSTEM SET synchronous_commit = 'remote_apply'")?;
        self.sql(0, "SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// Make every standby apply WAL `delay` late (`recovery_min_apply_delay`): plain
    /// asynchronous replication, slowed so that a read on a standby right after a
    /// commit reliably misses it. For tests of fresh reads.
    pub fn apply_late(&self, delay: Duration) -> Result<()> {
        for i in 1..self.nodes.len() {
            self.sql(
                i,
                &format!("ALTER SYSTEM SET recovery_min_apply_delay = '{}ms'", delay.as_millis()),
            )?;
            self.sql(i, "SELECT pg_reload_conf()")?;
        }
        Ok(())
    }

    /// A Switchyard config for this cluster, nodes in the order listed.
    pub fn config_toml(&self, rw_port: u16, ro_port: u16, extra_cluster: &str) -> String {
        let mut s = format!(
            "[health]\ninterval_ms = 500\ntimeout_ms = 1000\nrise = 2\nfall = 2\n\n\
             [[users]]\nname = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\nauth = \"scram-sha-256\"\n\n\
             [clusters.main]\nlisten_rw = \"127.0.0.1:{rw_port}\"\nlisten_ro = \"127.0.0.1:{ro_port}\"\n{extra_cluster}\n"
        );
        for n in &self.nodes {
            s += &format!(
                "\n[[clusters.main.nodes]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\n",
                n.name, n.port
            );
        }
        s
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // A node may be frozen by a test; thaw it so it can die.
            let _ = self.signal(i, libc::SIGCONT);
            let _ = self
                .command(
                    "pg_ctl",
                    &[
                        "-D",
                        path(&self.nodes[i].data),
                        "-m",
                        "immediate",
                        "-w",
                        "-t",
                        "10",
                        "stop",
                    ],
                )
                .output();
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

trait WriteStr {
    fn write_all_str(self, s: &str) -> std::io::Result<()>;
}

impl WriteStr for std::fs::File {
    fn write_all_str(mut self, s: &str) -> std::io::Result<()> {
        use std::io::Write;
        self.write_all(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768);
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            if low >= 11_000 {
                assert!((10_000..low).contains(&p), "{p} is in the ephemeral range");
            }
            TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
        }
    }
}
