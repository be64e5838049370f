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
        Upgradable::start_with(cluster, extra_cluster, 5000, &[])
    }

    /// With the drain bound (`proxy.shutdown_timeout_ms`) and more environment.
    fn start_with(
        cluster: &LocalCluster,
        extra_cluster: &str,
        drain_ms: u64,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Upgradable {
        let dir = cluster.dir();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("switchyard");
        std::fs::copy(switchyard_bin(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (rw, ro, http) = (free_port(), free_port(), free_port());
        let text = format!(
            "[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n[proxy]\nshutdown_timeout_ms = {drain_ms}\n\n{}",
            cluster.config_toml(rw, ro, extra_cluster)
        );
        let config = dir.join("upgrade.toml");
        std::fs::write(&config, text).unwrap();
        let log = dir.join("upgrade.log");
        let child = Command::new(&exe)
            .args(["--config", config.to_str().unwrap()])
            .env("SWITCHYARD_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
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
        let out = pgbench_command(port, &args).output().expect("run pgbench");
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

/// Session mode: a client's server session cannot move, so it stays on the old process
/// (same server backend after the upgrade) while new clients go to the new one; when
/// the drain bound passes it is ended with 57P01 and a sentence, and the old process
/// exits. systemd (played here on NOTIFY_SOCKET) is told the new main pid.
#[test]
fn a_session_mode_client_stays_on_the_old_process_until_the_drain_ends_and_systemd_follows_the_new_one() {
    let cluster = LocalCluster::start(0).unwrap();
    let path = cluster.dir().join("upgrade-notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut proxy = Upgradable::start_with(&cluster, "", 4000, &[("NOTIFY_SOCKET", path.as_os_str())]);
    assert!(recv().lines().any(|l| l == "READY=1"));
    let (old_pid, _) = proxy.status();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let held = rt.block_on(connect(proxy.rw)).unwrap();
    let backend = |held: &Held| -> Result<i32, String> {
        rt.block_on(held.query_one("SELECT pg_backend_pid()", &[]))
            .map(|r| r.get(0))
            .map_err(|e| db_text(&e))
    };
    let before = backend(&held).unwrap();

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGUSR2) };
    let told = recv();
    let new_pid: u64 = told
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID= in {told:?}"));
    assert!(told.lines().any(|l| l == "READY=1"), "{told}");
    assert_ne!(new_pid, old_pid);
    wait_for("the new process serving /status", Duration::from_secs(10), || {
        (try_status(proxy.http)?.0 == new_pid).then_some(())
    });
    // New clients reach the new process; the session-mode client is where it was.
    assert_eq!(psql(proxy.rw, "SELECT 1").unwrap(), "1");
    assert_eq!(
        backend(&held).unwrap(),
        before,
        "the session stays on its server session"
    );
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the old process waits for its client"
    );

    // The drain bound passes: the client is told, the old process exits.
    let ended = rt.block_on(held.wait_for_error(Duration::from_secs(15)));
    assert!(ended.contains("57P01") && ended.contains("reconnect"), "{ended}");
    let exited = wait_for("the old process to exit", Duration::from_secs(15), || {
        proxy.child.try_wait().ok()?
    });
    assert!(exited.success(), "{exited}");
    assert_eq!(psql(proxy.rw, "SELECT 2").unwrap(), "2", "the new process serves on");
}

/// A Django ORM loop (writes in atomic blocks, reads back) over one connection through
/// transaction pooling: an upgrade in the middle costs it no error and no reconnect.
#[test]
fn a_django_orm_loop_sees_no_error_through_an_upgrade() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Upgradable::start(&cluster, "pool_mode = \"transaction\"\n");
    let env = vec![
        ("SY_HOST", "127.0.0.1".to_string()),
        ("SY_RW_PORT", proxy.rw.to_string()),
        ("SY_RO_PORT", proxy.rw.to_string()),
        ("SY_SINGLE", "1".to_string()),
        ("SY_USER", APP_USER.to_string()),
        ("SY_PASSWORD", APP_PASSWORD.to_string()),
        ("SY_DB", APP_DB.to_string()),
        ("SY_LOOP_SECONDS", "8".to_string()),
    ];
    python("django_check.py", &["migrate"], &env);
    let (old_pid, _) = proxy.status();
    let looping = std::thread::spawn({
        let env = env.clone();
        move || {
            let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
            python("django_check.py", &["loop"], &env)
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGUSR2) };
    wait_for("the new process serving /status", Duration::from_secs(30), || {
        (try_status(proxy.http)?.0 != old_pid).then_some(())
    });
    let out = looping.join().unwrap();
    assert!(out.contains("ok: loop") && out.contains("0 errors"), "{out}");
    report(&format!("django ORM loop through an upgrade: {}", out.trim()));
}

/// A listener moved in the config, applied by an upgrade to the same binary: the new
/// process listens on the new address and the old address is closed.
#[test]
fn an_upgrade_applies_a_moved_listener_from_the_config() {
    let cluster = LocalCluster::start(0).unwrap();
    let mut proxy = Upgradable::start(&cluster, "pool_mode = \"transaction\"\n");
    let config = cluster.dir().join("upgrade.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let moved = free_port();
    let old_rw = format!("127.0.0.1:{}", proxy.rw);
    assert!(text.contains(&old_rw));
    std::fs::write(&config, text.replace(&old_rw, &format!("127.0.0.1:{moved}"))).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGUSR2) };
    let exited = wait_for("the old process to exit", Duration::from_secs(20), || {
        proxy.child.try_wait().ok()?
    });
    assert!(exited.success(), "{exited}");
    assert_eq!(psql(moved, "SELECT 1").unwrap(), "1", "served on the moved address");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", proxy.rw)).is_err(),
        "the old address is closed"
    );
    proxy.rw = moved;
}
