//! Binary upgrade without a client noticing: SIGUSR2 starts the binary now at the
//! executable's path, which takes the listeners and every transaction-pooling client
//! at its next transaction boundary; the old process exits when empty. A new binary
//! that fails to start leaves the old one serving.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The proxy started from a copy of the binary in `dir/bin`, which a test replaces.
struct Upgradable {
    child: Child,
    exe: PathBuf,
    rw: u16,
    http: u16,
    log: PathBuf,
}

impl Upgradable {
    fn start(cluster: &LocalCluster, extra_cluster: &str) -> Upgradable {
        let dir = cluster.dir();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("switchyard");
        std::fs::copy(switchyard_bin(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (rw, ro, http) = (free_port(), free_port(), free_port());
        let text = format!(
            "[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n[proxy]\nshutdown_timeout_ms = 5000\n\n{}",
            cluster.config_toml(rw, ro, extra_cluster)
        );
        let config = dir.join("upgrade.toml");
        std::fs::write(&config, text).unwrap();
        let log = dir.join("upgrade.log");
        let child = Command::new(&exe)
            .args(["--config", config.to_str().unwrap()])
            .env("SWITCHYARD_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let proxy = Upgradable {
            child,
            exe,
            rw,
            http,
            log,
        };
        wait_for("proxy ready", Duration::from_secs(20), || {
            (psql(rw, "/* switchyard:primary */ SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
        });
        proxy
    }

    /// (pid, commit) as `/status` says.
    fn status(&self) -> (u64, String) {
        try_status(self.http).expect("/status answers")
    }

    /// Put `bytes` at the executable's path as a package manager does: a new file
    /// renamed over the old (the running process keeps its own).
    fn replace_binary(&self, bytes: &[u8]) {
        let tmp = self.exe.with_extension("new");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &self.exe).unwrap();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Upgradable {
    fn drop(&mut self) {
        // A successor is nobody's child here: stopped by its pid.
        if let Some((pid, _)) = try_status(self.http) {
            if pid != self.child.id() as u64 {
                // SAFETY: kill(2) on the successor's pid.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn try_status(http: u16) -> Option<(u64, String)> {
    let mut resp = ureq::get(&format!("http://127.0.0.1:{http}/status")).call().ok()?;
    let v: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()?;
    Some((v["pid"].as_u64()?, v["commit"].as_str()?.to_string()))
}

/// The binary with every occurrence of `from` replaced by `to` (same length): another
/// build, as far as `/status` can tell.
fn patched(exe: &Path, from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(exe).unwrap();
    let mut found = 0;
    let mut i = 0;
    while let Some(at) = memchr::memmem::find(&bytes[i..], from.as_bytes()) {
        bytes[i + at..i + at + to.len()].copy_from_slice(to.as_bytes());
        i += at + to.len();
        found += 1;
    }
    assert!(found > 0, "the commit {from} is not in the binary");
    bytes
}

/// Run pgbench in a thread: (its output, whether it succeeded).
fn pgbench_thread(port: u16, args: Vec<String>) -> std::thread::JoinHandle<(String, bool)> {
    std::thread::spawn(move || {
        let out = Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP_USER])
            .args(&args)
            .arg(APP_DB)
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .expect("run pgbench");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (text, out.status.success())
    })
}

fn failed_transactions(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.starts_with("number of failed transactions:"))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

#[test]
fn usr2_upgrades_the_binary_under_pgbench_and_no_transaction_fails() {
    let cluster = LocalCluster::start(1).unwrap();
    let mut proxy = Upgradable::start(&cluster, "pool_mode = \"transaction\"\npool_size = 8\n");
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    let (old_pid, old_commit) = proxy.status();
    assert_eq!(old_pid, proxy.child.id() as u64);
    let marker = format!("{:x<1$}", "upgraded", old_commit.len());
    proxy.replace_binary(&patched(&proxy.exe, &old_commit, &marker));

    // TPC-B with named prepared statements and with simple queries, 16 clients each.
    let run = |mode: &str| {
        let args = ["-c", "16", "-j", "2", "-T", "14", "-M", mode, "-P", "1"];
        pgbench_thread(proxy.rw, args.iter().map(|s| s.to_string()).collect())
    };
    let (prepared, simple) = (run("prepared"), run("simple"));
    std::thread::sleep(Duration::from_secs(5));
    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGUSR2) };
    let (new_pid, new_commit) = wait_for("the new process serving /status", Duration::from_secs(30), || {
        let (pid, commit) = try_status(proxy.http)?;
        (pid != old_pid).then_some((pid, commit))
    });
    let took = signalled.elapsed();
    assert_eq!(new_commit, marker, "the new process runs the new binary");
    for (name, handle) in [("prepared", prepared), ("simple", simple)] {
        let (out, ok) = handle.join().unwrap();
        assert!(ok, "pgbench -M {name} failed through the upgrade:\n{out}");
        assert_eq!(failed_transactions(&out), Some(0), "pgbench -M {name}:\n{out}");
        assert!(!out.contains("aborted"), "pgbench -M {name}:\n{out}");
    }
    // The old process handed everyone over and left.
    let exited = wait_for("the old process to exit", Duration::from_secs(20), || {
        proxy.child.try_wait().ok()?
    });
    assert!(exited.success(), "the old process exited with {exited}");
    let log = proxy.log_text();
    let adopted: u64 = log
        .lines()
        .find(|l| l.contains("has handed over all it could"))
        .and_then(|l| l.split("clients=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the new process did not log what it took over:\n{log}"));
    assert!(
        adopted >= 32,
        "only {adopted} of 32 pgbench clients were handed over:\n{log}"
    );
    report(&format!(
        "upgrade under 2 × pgbench -c 16 (prepared, simple): new process serving {took:?} after SIGUSR2, {adopted} clients handed over, 0 failed transactions"
    ));
    // SAFETY: kill(2) on the successor's pid.
    unsafe { libc::kill(new_pid as i32, libc::SIGTERM) };
    wait_for("the new process to stop", Duration::from_secs(20), || {
        // SAFETY: signal 0 only checks that the pid exists.
        (unsafe { libc::kill(new_pid as i32, 0) } != 0).then_some(())
    });
}

#[test]
fn a_new_binary_that_cannot_start_leaves_the_old_process_serving() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Upgradable::start(&cluster, "pool_mode = \"transaction\"\n");
    let (old_pid, _) = proxy.status();
    proxy.replace_binary(b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut resp = agent
        .post(&format!("http://127.0.0.1:{}/upgrade", proxy.http))
        .send_empty()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("exited") && body.contains("before it was ready"),
        "{body}"
    );
    // Still the same process, still serving.
    assert_eq!(proxy.status().0, old_pid);
    assert_eq!(psql(proxy.rw, "SELECT 1").unwrap(), "1");
    let log = proxy.log_text();
    assert!(log.contains("upgrade failed; this process goes on serving"), "{log}");
    assert!(log.contains("broken build"), "{log}");
}
