//! The fault suite's short fixed-seed run (`chaos/run --seed 1 --duration 90s`): a
//! primary and two standbys (each in its own network namespace when run as root),
//! Switchyard in front, recorded writes and read-after-write checks plus pgbench load,
//! and the faults seed 1 draws (kills, freezes, partitions, failover, split brain,
//! reload...). Fails when the checker finds a violation: an acknowledged write lost
//! on the surviving history, a phantom, a write to a node not primary, a dual-primary
//! window, a stale read, a Switchyard crash or panic, file descriptor growth. The
//! whole report is printed either way. About three minutes; the long runs are
//! `chaos/run --duration 30m --seed N` (chaos/README.md).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn switchyard_bin() -> String {
    std::env::var("SWITCHYARD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_switchyard").to_string())
}

#[test]
fn short_seeded_fault_run_finds_no_violation() {
    run_chaos("short", &["--seed", "1", "--duration", "90s"]);
}

/// The same run with `failover = "automatic"`: Switchyard itself promotes when the
/// primary is killed, frozen or partitioned away, fences the old one, and the checker
/// holds it to the same rules (no write to a node not primary, no dual-primary window
/// through the proxy, no stale read). Seed 2 with these faults draws a kill, a freeze,
/// a partition, a split brain and a Switchyard restart (about 100 s).
#[test]
fn automatic_failover_fault_run_finds_no_violation() {
    run_chaos(
        "auto",
        &[
            "--seed",
            "2",
            "--duration",
            "80s",
            "--failover",
            "automatic",
            "--faults",
            "kill_primary_failover,freeze_primary,kill_primary_restart,partition_proxy_primary,split_brain,kill_proxy",
        ],
    );
}

/// Runs `chaos/run` with `args`, prints its whole report, fails on a violation.
fn run_chaos(name: &str, args: &[&str]) {
    let repo = env!("CARGO_MANIFEST_DIR");
    let workdir = std::env::temp_dir().join(format!("chaos-{name}-{}", std::process::id()));
    let json = workdir.join("report.json");
    let mut child = Command::new("python3")
        .arg(format!("{repo}/chaos/run"))
        .args(args)
        .args(["--binary", &switchyard_bin()])
        .arg("--workdir")
        .arg(&workdir)
        .current_dir(repo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chaos/run");

    // chaos/run bounds itself; this is the backstop if the harness itself hangs.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chaos/run") {
            break Some(status);
        }
        if Instant::now() > deadline {
            // SIGTERM first: chaos/run then tears down its servers and namespaces.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let grace = Instant::now() + Duration::from_secs(60);
            while Instant::now() < grace && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(500));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let text = format!("{}{}", out_reader.join().unwrap(), err_reader.join().unwrap());
    println!("{text}");
    match status {
        None => panic!("chaos/run did not finish within 600 s:\n{text}"),
        Some(s) if s.code() == Some(2) => panic!("chaos/run could not run (harness error):\n{text}"),
        Some(s) => assert!(
            s.success(),
            "chaos/run found violations (exit {s}); logs and {} kept:\n{text}",
            json.display()
        ),
    }
    // Passed: the logs (tens of MB of recorded operations) are not needed.
    let _ = std::fs::remove_dir_all(&workdir);
}

/// The checker's own unit tests (no processes): lost, phantom, stale, dual-primary.
#[test]
fn the_fault_checker_passes_its_unit_tests() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{repo}/chaos/test_checker.py"))
        .current_dir(repo)
        .output()
        .expect("run chaos/test_checker.py");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
