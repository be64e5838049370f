//! MySQL sessions when the process stops serving their cluster, against a real MariaDB
//! server: a reload (SIGHUP) that removes MySQL clusters, in session and in transaction
//! pooling (their listeners close at once, their idle clients are told why with 1053,
//! a transaction in flight may still commit, the cluster kept serves on, the same
//! session), and a binary upgrade (SIGUSR2), which MySQL sessions do not follow: they
//! stay on the old process, working, until `proxy.shutdown_timeout_ms` ends them with
//! 1053, while new clients reach the new process; then the old process exits.

mod common;

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::mysql::*;
use common::*;
use mysql_async::prelude::Queryable;

/// Longest any one client call may take before the test calls it hung.
const CALL: Duration = Duration::from_secs(10);

/// A mysql_async session through the proxy at `port` (session tracking not asked for:
/// in transaction pooling it keeps its server connection).
async fn my_connect(port: u16) -> mysql_async::Conn {
    tokio::time::timeout(CALL, mysql_async::Conn::new(my_opts(port)))
        .await
        .unwrap_or_else(|_| panic!("connecting to {port} hung"))
        .unwrap_or_else(|e| panic!("connecting to {port}: {e}"))
}

/// `sql`'s first column of its first row (text protocol), or the error's text.
async fn my_first(conn: &mut mysql_async::Conn, sql: &str) -> Result<Option<String>, String> {
    tokio::time::timeout(CALL, conn.query_first::<String, _>(sql))
        .await
        .unwrap_or_else(|_| panic!("{sql:?} hung"))
        .map_err(|e| e.to_string())
}

async fn my_exec(conn: &mut mysql_async::Conn, sql: &str) -> Result<(), String> {
    tokio::time::timeout(CALL, conn.query_drop(sql))
        .await
        .unwrap_or_else(|_| panic!("{sql:?} hung"))
        .map_err(|e| e.to_string())
}

/// The `mariadb` CLI held open on one session, fed statements on its stdin (batch
/// mode: it stops at the first error, which it prints on stderr). It asks for session
/// tracking (libmariadb), so in transaction pooling it gives its server connection
/// back between transactions.
struct Cli {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    n: u32,
}

impl Cli {
    fn start(port: u16) -> Cli {
        let mut child = Command::new("mariadb")
            .args([
                "--no-defaults",
                "-h",
                "127.0.0.1",
                "-P",
                &port.to_string(),
                "-u",
                MY_APP_USER,
            ])
            .arg(format!("-p{MY_APP_PASSWORD}"))
            .args([
                "-N",
                "-B",
                "--unbuffered",
                "--skip-reconnect",
                "--skip-ssl",
                "--connect-timeout=10",
            ])
            .arg(MY_APP_DB)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mariadb");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let mut cli = Cli {
            child,
            stdin,
            lines,
            stderr: Some(stderr),
            n: 0,
        };
        assert_eq!(cli.run("SELECT 'connected'"), Ok("connected".into()));
        cli
    }

    /// Run `sql` (one or more statements) on the held session: its output lines, or
    /// what the CLI said on stderr once it stopped.
    fn run(&mut self, sql: &str) -> Result<String, String> {
        self.n += 1;
        let marker = format!("done-{}", self.n);
        // A CLI that already stopped: the pipe is closed, the output tells.
        let _ = writeln!(self.stdin, "{sql};\nSELECT '{marker}';").and_then(|()| self.stdin.flush());
        let deadline = Instant::now() + CALL;
        let mut out = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line == marker => return Ok(out.join("\n")),
                Ok(line) => out.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("{sql:?} on the mariadb CLI hung; said so far {out:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let stopped = wait_for("the mariadb CLI to exit", CALL, || self.child.try_wait().ok()?);
                    let said = self.stderr.take().map(|h| h.join().unwrap()).unwrap_or_default();
                    return Err(format!("{} (exit {stopped}; stdout {out:?})", said.trim()));
                }
            }
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/status` of the process serving the admin HTTP port now.
fn status(http: u16) -> serde_json::Value {
    let (code, body) = http_get(http, "/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn cluster_names(status: &serde_json::Value) -> Vec<String> {
    status["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn clients_of(status: &serde_json::Value, cluster: &str) -> u64 {
    status["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .and_then(|c| c["limits"]["clients"].as_u64())
        .unwrap_or_else(|| panic!("no cluster {cluster} in {status}"))
}

/// Is anything accepting TCP connections on `port`?
fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_ok()
}

/// A proxy with three MySQL clusters over one MariaDB server: `main` (session
/// pooling), which a reload keeps, and `extra` (session pooling) and `pooled`
/// (transaction pooling), which `remove` takes out of the config (SIGHUP).
struct Removal {
    cluster: MariaCluster,
    proxy: Proxy,
    /// The config with `main` alone.
    base: String,
    http: u16,
    extra: (u16, u16),
    pooled: (u16, u16),
}

impl Removal {
    fn start() -> Removal {
        let cluster = MariaCluster::start(0).unwrap();
        cluster.sql(0, "CREATE TABLE app.reloaded (v INT PRIMARY KEY)").unwrap();
        let (rw, ro, http) = (free_port(), free_port(), free_port());
        let (extra, pooled) = ((free_port(), free_port()), (free_port(), free_port()));
        let base = format!(
            "{}\n[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n[proxy]\nshutdown_timeout_ms = 2000\n",
            my_config(&cluster, rw, ro, "")
        );
        let text = format!(
            "{base}\n{}\n{}",
            cluster.config_toml("extra", extra.0, extra.1, ""),
            cluster.config_toml(
                "pooled",
                pooled.0,
                pooled.1,
                "pool_mode = \"transaction\"\npool_size = 2"
            )
        );
        let proxy = my_spawn(&cluster, "proxy", &text, rw, ro);
        wait_for("the three clusters serving", Duration::from_secs(30), || {
            for port in [rw, extra.0, pooled.0] {
                (mariadb(port, "SELECT 1").ok()? == "1").then_some(())?;
            }
            Some(())
        });
        Removal {
            cluster,
            proxy,
            base,
            http,
            extra,
            pooled,
        }
    }

    /// Rewrite the config without `extra` and `pooled` and send SIGHUP; the reload's
    /// log line, once the sessions have had a moment to be told.
    fn remove(&self) -> String {
        std::fs::write(&self.proxy.config, &self.base).unwrap();
        self.proxy.signal(libc::SIGHUP);
        let reloaded = wait_for("the reload in the log", Duration::from_secs(10), || {
            self.proxy
                .log_text()
                .lines()
                .find(|l| l.contains("config reloaded") || l.contains("reload rejected"))
                .map(str::to_string)
        });
        std::thread::sleep(Duration::from_millis(300));
        reloaded
    }

    fn rows(&self) -> String {
        self.cluster
            .sql(0, "SELECT IFNULL(GROUP_CONCAT(v ORDER BY v), '') FROM app.reloaded")
            .unwrap()
    }
}

/// A reload (SIGHUP) removes two MySQL clusters served from the same MariaDB server as
/// the one it keeps: `extra` in session pooling (an idle mysql_async client) and
/// `pooled` in transaction pooling (an idle `mariadb` CLI client, which holds no server
/// connection between transactions). Their listeners refuse connections at once; each
/// idle client's next command fails with 1053 naming its removed cluster; main's client
/// goes on on the same server session; `/status` lists main alone; the log says what
/// was removed, and after `proxy.shutdown_timeout_ms` that the removed pools are closed.
#[test]
fn reload_removes_mysql_clusters_and_their_idle_clients_are_told_why() {
    let began = Instant::now();
    let r = Removal::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // main's session, held across the reload.
        let mut main = my_connect(r.proxy.rw).await;
        let main_session = my_first(&mut main, "SELECT CONNECTION_ID()").await.unwrap();
        assert!(main_session.is_some());
        my_exec(&mut main, "INSERT INTO reloaded VALUES (1)").await.unwrap();
        let mut idle = my_connect(r.extra.0).await;
        assert_eq!(my_first(&mut idle, "SELECT 1").await, Ok(Some("1".into())));
        let mut pooled_idle = Cli::start(r.pooled.0);
        assert_eq!(pooled_idle.run("INSERT INTO reloaded VALUES (10)"), Ok(String::new()));

        let before = status(r.http);
        assert_eq!(cluster_names(&before), ["extra", "main", "pooled"], "{before}");
        // (The readiness checks' CLI sessions may take a moment to be gone.)
        wait_for("one client each on extra and pooled", Duration::from_secs(5), || {
            let s = status(r.http);
            (clients_of(&s, "extra") == 1 && clients_of(&s, "pooled") == 1).then_some(())
        });

        let reloaded = r.remove();
        // (How many clients it counts is not checked: sessions woken by the removal
        // may be gone before they are counted.)
        assert!(
            reloaded.contains("cluster extra removed (") && reloaded.contains("cluster pooled removed ("),
            "{reloaded}"
        );
        for port in [r.extra.0, r.extra.1, r.pooled.0, r.pooled.1] {
            assert!(!accepts(port), "port {port} of a removed cluster still accepts");
        }
        let said = my_first(&mut idle, "SELECT 1").await.unwrap_err();
        assert!(
            said.contains("1053") && said.contains("cluster \"extra\" was removed"),
            "{said}"
        );
        let said = pooled_idle.run("SELECT 1").unwrap_err();
        assert!(
            said.contains("1053") && said.contains("cluster \"pooled\" was removed"),
            "{said}"
        );

        // main noticed nothing: the same server session, and new clients served.
        assert_eq!(my_first(&mut main, "SELECT CONNECTION_ID()").await, Ok(main_session));
        my_exec(&mut main, "INSERT INTO reloaded VALUES (2)").await.unwrap();
        assert_eq!(r.rows(), "1,2,10");
        let after = status(r.http);
        assert_eq!(cluster_names(&after), ["main"], "{after}");
        assert_eq!(clients_of(&after, "main"), 1, "{after}");
        assert_eq!(mariadb(r.proxy.rw, "SELECT COUNT(*) FROM reloaded"), Ok("3".into()));
        main.disconnect().await.unwrap();
    });
    // After shutdown_timeout_ms the removed clusters' pools are closed.
    wait_for("the removed clusters' pools closed", Duration::from_secs(10), || {
        let log = r.proxy.log_text();
        let closed = |name: &str| {
            log.lines().any(|l| {
                l.contains("removed cluster: its last sessions are ended and its pools closed")
                    && l.contains(&format!("cluster={name}"))
            })
        };
        (closed("extra") && closed("pooled")).then_some(())
    });
    report(&format!(
        "MySQL reload removing two clusters (idle clients): test took {:?}",
        began.elapsed()
    ));
}

/// The same reload with a client of each removed cluster inside a transaction
/// (`BEGIN; INSERT`): as documented (docs/src/operations/reload-shutdown.md), the
/// transaction in flight may still commit (its rows on the server), and the session's
/// next command fails with 1053 naming the cluster.
#[test]
fn a_mysql_transaction_in_flight_commits_before_its_removed_cluster_ends_the_session() {
    let began = Instant::now();
    let r = Removal::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // extra (session pooling): mysql_async; pooled (transaction pooling): the CLI.
        let mut busy = my_connect(r.extra.0).await;
        my_exec(&mut busy, "BEGIN").await.unwrap();
        my_exec(&mut busy, "INSERT INTO reloaded VALUES (1)").await.unwrap();
        let mut pooled_busy = Cli::start(r.pooled.0);
        assert_eq!(
            pooled_busy.run("BEGIN; INSERT INTO reloaded VALUES (10)"),
            Ok(String::new())
        );

        let reloaded = r.remove();
        assert!(reloaded.contains("cluster extra removed ("), "{reloaded}");

        // Both outcomes first, then the verdict (so that a failure shows both).
        let extra_commit = async {
            my_exec(&mut busy, "INSERT INTO reloaded VALUES (2)").await?;
            my_exec(&mut busy, "COMMIT").await
        }
        .await;
        // The CLI's own marker query after the COMMIT is the session's next command
        // after its transaction ended: refused, told why (the CLI stops there).
        let pooled_commit = pooled_busy.run("INSERT INTO reloaded VALUES (11); COMMIT");
        let rows = r.rows();
        assert!(
            extra_commit.is_ok() && rows == "1,2,10,11",
            "the transactions in flight could not finish: session pooling {extra_commit:?}, transaction pooling {pooled_commit:?}; rows on the server: {rows:?}"
        );
        let said = pooled_commit.unwrap_err();
        assert!(
            said.contains("SELECT 'done-") && said.contains("1053") && said.contains("cluster \"pooled\" was removed"),
            "{said}"
        );
        // Then the sessions end, told why.
        let said = my_first(&mut busy, "SELECT 1").await.unwrap_err();
        assert!(
            said.contains("1053") && said.contains("cluster \"extra\" was removed"),
            "{said}"
        );
    });
    report(&format!(
        "MySQL reload removing two clusters (transactions in flight): test took {:?}",
        began.elapsed()
    ));
}

/// The proxy started from a copy of the binary in the cluster's directory (so that an
/// upgrade starts the copy), in front of a MariaDB cluster.
struct Upgradable {
    child: Child,
    rw: u16,
    http: u16,
    log: PathBuf,
}

impl Upgradable {
    fn start(cluster: &MariaCluster, drain_ms: u64) -> Upgradable {
        let dir = cluster.dir();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("switchyard");
        std::fs::copy(switchyard_bin(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (rw, ro, http) = (free_port(), free_port(), free_port());
        let text = format!(
            "{}\n[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n\n[proxy]\nshutdown_timeout_ms = {drain_ms}\n",
            my_config(cluster, rw, ro, "")
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
        let proxy = Upgradable { child, rw, http, log };
        wait_for("proxy ready", Duration::from_secs(30), || {
            (mariadb(rw, "SELECT 1").ok()? == "1").then_some(())
        });
        proxy
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn try_pid(http: u16) -> Option<u64> {
    let mut resp = ureq::get(&format!("http://127.0.0.1:{http}/status")).call().ok()?;
    let v: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()?;
    v["pid"].as_u64()
}

impl Drop for Upgradable {
    fn drop(&mut self) {
        // A successor is nobody's child here: stopped by its pid.
        if let Some(pid) = try_pid(self.http) {
            if pid != self.child.id() as u64 {
                // SAFETY: kill(2) on the successor's pid.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- switchyard log (both processes; last lines) ----");
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A binary upgrade (SIGUSR2, to a copy of the same binary) with a MySQL client
/// connected: MySQL sessions are not handed over, so it stays on the old process and
/// its server session, working; new clients reach the new process (its `/status` counts
/// them); once `proxy.shutdown_timeout_ms` (3 s) has passed, the held client's next
/// command gets 1053 saying the process was replaced, and the old process exits 0.
#[test]
fn a_mysql_session_stays_on_the_old_process_through_an_upgrade_until_the_drain_ends_it() {
    let began = Instant::now();
    let cluster = MariaCluster::start(0).unwrap();
    let mut proxy = Upgradable::start(&cluster, 3000);
    let old_pid = try_pid(proxy.http).expect("/status answers");
    assert_eq!(old_pid, proxy.child.id() as u64);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut held = my_connect(proxy.rw).await;
        let session = my_first(&mut held, "SELECT CONNECTION_ID()").await.unwrap();
        assert!(session.is_some());

        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(proxy.child.id() as i32, libc::SIGUSR2) };
        let new_pid = wait_for("the new process serving /status", Duration::from_secs(30), || {
            try_pid(proxy.http).filter(|pid| *pid != old_pid)
        });
        // The old process has stopped accepting once it says the new one takes over.
        wait_for("the old process to hand over", Duration::from_secs(10), || {
            proxy
                .log_text()
                .contains("upgrade: the new process is ready and takes new clients")
                .then_some(())
        });
        let upgraded = Instant::now();

        // The held session: still served by the old process, on its server session.
        assert_eq!(
            my_first(&mut held, "SELECT CONNECTION_ID()").await,
            Ok(session.clone()),
            "the held session after the upgrade"
        );
        assert!(
            proxy.child.try_wait().unwrap().is_none(),
            "the old process waits for its client"
        );
        // A new client reaches the new process: it counts it (and not the held one).
        let mut fresh = my_connect(proxy.rw).await;
        assert_eq!(my_first(&mut fresh, "SELECT 1").await, Ok(Some("1".into())));
        let now = status(proxy.http);
        assert_eq!(now["pid"].as_u64(), Some(new_pid), "{now}");
        assert_eq!(clients_of(&now, "main"), 1, "{now}");
        fresh.disconnect().await.unwrap();

        // The held session works until the drain bound, then is told why it ends.
        let (said, after) = loop {
            match my_first(&mut held, "SELECT CONNECTION_ID()").await {
                Ok(id) => {
                    assert_eq!(id, session, "the held session moved");
                    assert!(
                        upgraded.elapsed() < Duration::from_secs(15),
                        "the held session still works {:?} after the upgrade",
                        upgraded.elapsed()
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => break (e, upgraded.elapsed()),
            }
        };
        assert!(
            said.contains("1053")
                && said.contains("Switchyard is shutting down")
                && said.contains("a new binary replaced it"),
            "{said}"
        );
        assert!(
            after >= Duration::from_millis(2500) && after < Duration::from_secs(8),
            "the held session was ended {after:?} after the upgrade (shutdown_timeout_ms = 3000)"
        );
        report(&format!(
            "MySQL session on the old process through an upgrade: ended {after:?} after it"
        ));
        drop(held);

        let exited = wait_for("the old process to exit", Duration::from_secs(15), || {
            proxy.child.try_wait().ok()?
        });
        assert!(exited.success(), "the old process exited with {exited}");
        assert_eq!(
            mariadb(proxy.rw, "SELECT 2"),
            Ok("2".into()),
            "the new process serves on"
        );
        assert_eq!(try_pid(proxy.http), Some(new_pid));
        // SAFETY: kill(2) on the successor's pid.
        unsafe { libc::kill(new_pid as i32, libc::SIGTERM) };
        wait_for("the new process to stop", Duration::from_secs(20), || {
            // SAFETY: signal 0 only checks that the pid exists.
            (unsafe { libc::kill(new_pid as i32, 0) } != 0).then_some(())
        });
    });
    report(&format!("MySQL upgrade drain: test took {:?}", began.elapsed()));
}
