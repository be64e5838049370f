//! A throwaway etcd cluster on loopback (Debian's `etcd-server`), and a TCP forwarder
//! that a test can cut to take one Switchyard instance away from etcd.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wait_for;

pub struct Member {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// `n` members, each on its own client and peer port. A member can fail to start
    /// when another process takes one of its ports between our choosing and etcd's
    /// binding it (or two ports come out the same); that is the harness's race, not
    /// etcd's, so a failed start is retried on fresh ports, its logs shown.
    pub fn start(n: usize) -> EtcdCluster {
        for attempt in 1..=3 {
            let mut cluster = Self::spawn(n);
            match cluster.wait_healthy(Duration::from_secs(30)) {
                Ok(()) => return cluster,
                Err(why) => {
                    eprintln!("etcd start, attempt {attempt}: {why}");
                    for i in 0..n {
                        eprintln!("---- etcd {} log ----\n{}", cluster.members[i].name, cluster.log(i));
                    }
                }
            }
        }
        panic!("etcd did not start in 3 attempts (logs above)");
    }

    fn spawn(n: usize) -> EtcdCluster {
        let dir = tempfile::Builder::new().prefix("switchyard-etcd-").tempdir().unwrap();
        // Hold every chosen port until all are chosen, so no two are the same.
        let held: Vec<std::net::TcpListener> = (0..2 * n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            let data: PathBuf = dir.path().join(&m.name);
            let log = std::fs::File::create(dir.path().join(format!("{}.log", m.name))).unwrap();
            let child = Command::new("etcd")
                .args(["--name", &m.name])
                .args(["--data-dir", data.to_str().unwrap()])
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", m.client)])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", m.client)])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                // Quicker elections than the defaults (100 ms / 1 s) on a busy test machine.
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd (Debian: apt-get install etcd-server)");
            m.child = Some(child);
        }
        EtcdCluster { members, dir }
    }

    /// Every member answers healthy, or why not: one exited, or `within` passed.
    fn wait_healthy(&mut self, within: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + within;
        let mut healthy = vec![false; self.members.len()];
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    return Err(format!("member {} exited ({status})", m.name));
                }
                if !healthy[i] {
                    let url = format!("http://127.0.0.1:{}/health", m.client);
                    healthy[i] = ureq::get(&url)
                        .call()
                        .ok()
                        .and_then(|r| r.into_body().read_to_string().ok())
                        .is_some_and(|body| body.contains("\"true\""));
                }
            }
            if healthy.iter().all(|h| *h) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let sick: Vec<&str> = self
                    .members
                    .iter()
                    .zip(&healthy)
                    .filter(|(_, h)| !**h)
                    .map(|(m, _)| m.name.as_str())
                    .collect();
                return Err(format!("not healthy after {within:?}: {}", sick.join(", ")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The member that is the raft leader now.
    pub fn leader(&self) -> usize {
        wait_for("an etcd leader", Duration::from_secs(10), || {
            self.members.iter().position(|m| {
                let url = format!("http://127.0.0.1:{}/v3/maintenance/status", m.client);
                let Ok(mut r) = ureq::post(&url).header("content-type", "application/json").send("{}") else {
                    return false;
                };
                let v: serde_json::Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default()).unwrap_or_default();
                v["leader"].is_string() && v["leader"] == v["header"]["member_id"]
            })
        })
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.members[i].name))).unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Forwards a loopback port to `target` until cut (new connections refused, open ones
/// reset) or frozen (nothing passes any more and nothing is closed: a black hole, where
/// every request waits for its whole timeout).
pub struct Forwarder {
    pub port: u16,
    cut: Arc<Mutex<bool>>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Forwarder {
    pub fn start(target: u16) -> Forwarder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(Mutex::new(false));
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (c2, k2, f2) = (cut.clone(), conns.clone(), frozen.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if *c2.lock().unwrap() {
                    drop(client);
                    continue;
                }
                if f2.load(std::sync::atomic::Ordering::Relaxed) {
                    held.push(client); // accepted, never answered
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                k2.lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let frozen = f2.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Frozen: swallow, so the peer waits for an answer forever.
                            if !frozen.load(std::sync::atomic::Ordering::Relaxed) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Forwarder {
            port,
            cut,
            frozen,
            conns,
        }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn cut(&self) {
        *self.cut.lock().unwrap() = true;
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}
