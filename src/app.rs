//! The top: builds the clusters and the shared state, starts health monitors,
//! listeners and the admin HTTP endpoint; reload and graceful shutdown. Nothing depends
//! on it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::cluster::health;
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{ClusterSnapshot, ClusterState, NodeState, Policy};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, Config, Engine};
use crate::pg::session;
use crate::pg::PgCluster;
use crate::proxy::handover::Listening;
use crate::proxy::shared::Shared;
use crate::tls::ServerTls;

fn policy(c: &ClusterConfig) -> Policy {
    Policy {
        max_replica_lag_ms: c.max_replica_lag_ms,
        read_balance: c.read_balance,
        split_brain: c.split_brain,
    }
}

/// (Re)start the health monitors of every cluster from the current config. Node
/// state lives in the snapshot, not the task, so a restart loses no rise/fall count.
fn start_monitors(shared: &Shared) {
    let config = shared.config();
    let (user, password) = config.health_login();
    let login = Arc::new(health::Login {
        user,
        password,
        database: config.health.database.clone(),
    });
    let metrics = shared.metrics.clone();
    let observer: health::Observer =
        Arc::new(move |cluster, node, took, t| metrics.observe_check(cluster, node, took, t));
    for (name, ctx) in &shared.clusters {
        if let Some(pg) = crate::pg::PgCluster::try_of(ctx) {
            pg.freshness.set_login(login.clone(), ctx.server_tls());
        }
        let mut monitors = ctx.monitors.lock().unwrap();
        for (_, task) in monitors.drain() {
            task.abort();
        }
        let Some(c) = config.clusters.get(name) else {
            continue;
        };
        // The running engine: a reload that changes it needs a restart (logged there).
        if ctx.engine == Engine::Mysql {
            let peers: Vec<(String, u16)> = c.nodes.iter().map(|n| (n.host.clone(), n.port)).collect();
            for n in &c.nodes {
                let target = crate::mysql::health::Target {
                    cluster: ctx.state.clone(),
                    node: n.name.clone(),
                    host: n.host.clone(),
                    port: n.port,
                    peers: peers.clone(),
                    info: crate::mysql::ClusterInfo::of(ctx).clone(),
                    tls: c.server_tls,
                    ca_file: c.server_ca_file.clone(),
                };
                let task = crate::mysql::health::spawn(
                    target,
                    config.health.clone(),
                    login.clone(),
                    observer.clone(),
                    shared.shutdown.clone(),
                );
                monitors.insert(n.name.clone(), task);
            }
            continue;
        }
        for n in &c.nodes {
            let target = crate::pg::health::Target {
                cluster: ctx.state.clone(),
                node: n.name.clone(),
                host: n.host.clone(),
                port: n.port,
                tls: ctx.server_tls(),
            };
            let task = crate::pg::health::spawn(
                target,
                config.health.clone(),
                login.clone(),
                observer.clone(),
                shared.shutdown.clone(),
            );
            monitors.insert(n.name.clone(), task);
        }
    }
}

/// Re-read the config file and apply what can change while running: nodes (added,
/// removed, moved), health settings, users, per-cluster routing settings. Listener
/// addresses and the set of clusters need a restart; that is logged. An invalid file
/// changes nothing. Returns a one-line summary.
fn reload(shared: &Shared) -> Result<String, String> {
    let path = shared
        .config_path
        .as_ref()
        .ok_or("no config file to reload (started without --config)")?;
    let new = Config::load(path).map_err(|e| {
        error!(path = %path.display(), reason = %e, "reload rejected; the running config stays");
        format!("reload rejected, the running config stays: {e}")
    })?;
    let mut server_tls = Vec::new();
    for (name, c) in &new.clusters {
        let tls = ServerTls::new(c.server_tls, c.server_ca_file.as_deref()).map_err(|e| {
            error!(path = %path.display(), cluster = %name, reason = %e, "reload rejected; the running config stays");
            format!("reload rejected, the running config stays: clusters.{name}: {e}")
        })?;
        server_tls.push((name.clone(), tls));
    }
    shared.reload_tls(&new).map_err(|e| {
        error!(path = %path.display(), reason = %e, "reload rejected; the running config stays");
        format!("reload rejected, the running config stays: {e}")
    })?;
    let old = shared.config();
    for (name, tls) in server_tls {
        if let Some(ctx) = shared.clusters.get(&name) {
            ctx.set_server_tls(tls);
            // Idle pooled connections were made under the old rules (plaintext, or not
            // verified): new ones are made under the new.
            let before = old
                .clusters
                .get(&name)
                .map(|o| (o.server_tls, o.server_ca_file.clone()));
            let after = new
                .clusters
                .get(&name)
                .map(|c| (c.server_tls, c.server_ca_file.clone()));
            if before != after {
                let closed: usize = crate::pg::PgShared::of(shared)
                    .pools
                    .all()
                    .iter()
                    .filter(|p| p.key.cluster == name)
                    .map(|p| p.clear_idle())
                    .sum();
                info!(cluster = %name, closed, "server_tls changed: idle server connections closed");
            }
        }
    }
    let mut notes = Vec::new();
    for (name, c) in &new.clusters {
        let Some(ctx) = shared.clusters.get(name) else {
            warn!(cluster = %name, "new cluster in config: needs a restart");
            notes.push(format!("cluster {name} added: restart or upgrade (SIGUSR2) needed"));
            continue;
        };
        if ctx.engine != c.engine {
            warn!(cluster = %name, running = %ctx.engine, configured = %c.engine, "engine changed: needs a restart to take effect");
            notes.push(format!(
                "cluster {name} engine changed: restart or upgrade (SIGUSR2) needed"
            ));
        }
        if old.clusters.get(name).map(|o| (&o.listen_rw, &o.listen_ro)) != Some((&c.listen_rw, &c.listen_ro)) {
            warn!(cluster = %name, "listen address changed: needs a restart to take effect");
            notes.push(format!(
                "cluster {name} listeners changed: restart or upgrade (SIGUSR2) needed"
            ));
        }
        let mut added = Vec::new();
        let mut removed = Vec::new();
        ctx.state.update(|snap| {
            let mut nodes = Vec::new();
            for n in &c.nodes {
                match snap.nodes.iter().find(|o| o.name == n.name && o.addr == n.addr()) {
                    Some(existing) => nodes.push(existing.clone()),
                    None => {
                        added.push(n.name.clone());
                        nodes.push(NodeState::new(&n.name, &n.addr()));
                    }
                }
            }
            removed = snap
                .nodes
                .iter()
                .filter(|o| !nodes.iter().any(|n| n.name == o.name && n.addr == o.addr))
                .map(|o| o.name.clone())
                .collect();
            snap.nodes = nodes;
            snap.policy = policy(c);
            snap.connect_timeout = c.connect_timeout();
            snap.server_login_timeout = c.server_login_timeout();
            snap.failover_hold = c.failover_hold();
            true
        });
        crate::pg::PgShared::of(shared)
            .pools
            .apply(name, |user, database| new.pool_settings(name, user, database));
        for n in &added {
            ctx.state
                .push_event(n, String::new(), "added".into(), "configuration reload".into());
        }
        for n in &removed {
            ctx.state
                .push_event(n, String::new(), "removed".into(), "configuration reload".into());
        }
        if !added.is_empty() || !removed.is_empty() {
            notes.push(format!("cluster {name}: nodes added {added:?}, removed {removed:?}"));
        }
    }
    for name in shared.clusters.keys() {
        if !new.clusters.contains_key(name) {
            warn!(cluster = %name, "cluster removed from config: needs a restart");
            notes.push(format!("cluster {name} removed: restart or upgrade (SIGUSR2) needed"));
        }
    }
    // The clients the descriptor limit leaves room for depend on the pools' sizes and
    // the pool modes (only when a cap is in force: `run` sets it at start).
    if shared.admissions.descriptor_cap() != u32::MAX {
        let fds = crate::proxy::limits::fd_limit();
        let cap = crate::proxy::limits::descriptor_budget(&new, fds);
        let old_cap = shared.admissions.descriptor_cap();
        if cap < old_cap {
            warn!(fd_limit = fds, clients = cap, was = old_cap, "with the new pools the file-descriptor limit leaves room for fewer clients: the ones past `clients` are refused with 53300 (raise LimitNOFILE / ulimit -n, or lower the pool sizes)");
            notes.push(format!(
                "room for {cap} clients under the file-descriptor limit (was {old_cap})"
            ));
        } else if cap > old_cap {
            info!(
                fd_limit = fds,
                clients = cap,
                was = old_cap,
                "clients the file-descriptor limit leaves room for, with the new pools"
            );
        }
        shared.admissions.set_descriptor_cap(cap);
    }
    shared.set_config(new);
    start_monitors(shared);
    let summary = if notes.is_empty() {
        "config reloaded".to_string()
    } else {
        format!("config reloaded: {}", notes.join("; "))
    };
    info!(path = %path.display(), "{summary}");
    Ok(summary)
}

/// A config file with secrets in it should not be readable by every local user.
fn warn_if_readable_by_others(path: &std::path::Path, config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let inline_secret = config
        .users
        .iter()
        .any(|u| u.password.is_some() && u.password_file.is_none() && u.password_env.is_none())
        || config.clusters.values().any(|c| {
            c.manager.as_ref().is_some_and(|m| {
                m.password.as_deref().is_some_and(|p| !p.is_empty())
                    && m.password_file.is_none()
                    && m.password_env.is_none()
            })
        })
        || (config.admin.token.is_some() && config.admin.token_file.is_none() && config.admin.token_env.is_none())
        || config
            .auth_query
            .as_ref()
            .is_some_and(|q| q.password.is_some() && q.password_file.is_none() && q.password_env.is_none());
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if inline_secret && meta.permissions().mode() & 0o004 != 0 {
        warn!(path = %path.display(), "the config file holds passwords and any local user can read it: chmod o-r it, or move the secrets to password_file / password_env");
    }
}

/// A running proxy: its shared state and the addresses it listens on.
pub struct Proxy {
    pub shared: Arc<Shared>,
    pub listening: Vec<(String, Endpoint, SocketAddr)>,
    shutdown_tx: watch::Sender<bool>,
    leaving_tx: watch::Sender<bool>,
    /// A copy of each listening socket, to pass to a successor (binary upgrade).
    handoff: std::sync::Mutex<Vec<(Listening, OwnedFd)>>,
    workers: Arc<Workers>,
    /// Operators' upgrade requests (`Shared::upgrades`), taken by `wait_for_signal`.
    upgrade_requests:
        std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<crate::proxy::shared::UpgradeReply>>>,
}

/// A listener from a predecessor (`upgrade::Inherited`) if it listens where `addr`
/// says, else a new one bound there.
async fn listener(
    inherited: &mut HashMap<String, (SocketAddr, std::net::TcpListener)>,
    name: &str,
    addr: &str,
) -> std::io::Result<TcpListener> {
    if let Some((at, l)) = inherited.remove(name) {
        let wanted: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
        if wanted.contains(&at) {
            return TcpListener::from_std(l);
        }
        info!(listener = name, was = %at, now = addr, "the old process listened elsewhere: binding the configured address");
    }
    TcpListener::bind(addr).await
}

impl Proxy {
    /// Bind every listener, start the health monitors and accept loops.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Proxy> {
        Proxy::start_inheriting(config, config_path, HashMap::new()).await
    }

    /// The same, taking the listening sockets a predecessor passed (binary upgrade;
    /// `upgrade::Inherited`) where they listen on the configured addresses.
    pub async fn start_inheriting(
        config: Config,
        config_path: Option<PathBuf>,
        mut inherited: HashMap<String, (SocketAddr, std::net::TcpListener)>,
    ) -> anyhow::Result<Proxy> {
        if let Some(p) = &config_path {
            warn_if_readable_by_others(p, &config);
        }
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (leaving_tx, leaving) = watch::channel(false);
        let mut clusters = BTreeMap::new();
        let mut listeners = Vec::new();
        for (name, c) in &config.clusters {
            let nodes = c.nodes.iter().map(|n| NodeState::new(&n.name, &n.addr())).collect();
            let mut snap = ClusterSnapshot::new(name, nodes, policy(c), c.connect_timeout());
            snap.server_login_timeout = c.server_login_timeout();
            snap.failover_hold = c.failover_hold();
            let state = ClusterState::new(snap, |s| routing::primary(s).ok());
            let ctx = Arc::new(ClusterCtx::new(
                name,
                state.clone(),
                c.listen_rw.clone(),
                c.listen_ro.clone(),
                ServerTls::new(c.server_tls, c.server_ca_file.as_deref())
                    .map_err(|e| anyhow::anyhow!("clusters.{name}: {e}"))?,
                c.engine,
                match c.engine {
                    Engine::Postgresql => Box::new(PgCluster::new(state, &c.read_only_functions)),
                    Engine::Mysql => Box::new(Arc::new(crate::mysql::ClusterInfo::new(
                        &c.read_only_functions,
                        config.proxy.worker_threads(),
                    ))),
                },
            ));
            for (addr, endpoint) in [(&c.listen_rw, Endpoint::ReadWrite), (&c.listen_ro, Endpoint::ReadOnly)] {
                if let Some(addr) = addr {
                    let l = listener(&mut inherited, &format!("{name}/{endpoint}"), addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} (clusters.{name}.listen_{endpoint})"))?;
                    listeners.push((ctx.clone(), endpoint, l));
                }
            }
            clusters.insert(name.clone(), ctx);
        }
        let http_listen = config.admin.http_listen.clone();
        let workers = Workers::spawn(config.proxy.worker_threads())?;
        let pg_shared = crate::pg::PgShared::new(&config, workers.len());
        let shared = Arc::new(
            Shared::new(
                config,
                config_path,
                clusters,
                (shutdown.clone(), leaving.clone()),
                vec![Box::new(pg_shared)],
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        shared.set_reloader(Box::new(reload));
        start_monitors(&shared);
        // What the log throttles held back, said once a flood is over.
        tokio::spawn({
            let shared = shared.clone();
            let mut shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => crate::proxy::limits::flush_logs(&shared),
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            }
        });
        // The control plane watches every cluster; it acts only where the config says
        // `failover = "automatic"` (a reload may switch that on or off).
        if let Some(c) = shared.config().coordination.clone() {
            crate::ha::coord::spawn(shared.clone(), c);
        }
        for ctx in shared.clusters.values() {
            crate::ha::failover::spawn(shared.clone(), ctx.clone());
        }
        for (index, worker) in workers.handles.iter().enumerate() {
            worker.spawn(prune_pools(shared.clone(), index));
        }
        let workers = Arc::new(workers);
        let mut listening = Vec::new();
        let mut handoff = Vec::new();
        for (ctx, endpoint, l) in listeners {
            let local = l.local_addr()?;
            info!(cluster = %ctx.name, endpoint = %endpoint, addr = %local, "listening");
            listening.push((ctx.name.clone(), endpoint, local));
            handoff.push((
                Listening {
                    name: format!("{}/{endpoint}", ctx.name),
                    addr: local,
                },
                l.as_fd().try_clone_to_owned()?,
            ));
            tokio::spawn(accept_loop(
                l,
                ctx,
                endpoint,
                shared.clone(),
                workers.clone(),
                leaving.clone(),
            ));
        }
        if let Some(addr) = http_listen {
            let l = listener(&mut inherited, "admin/http", &addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin.http_listen)"))?;
            info!(addr = %l.local_addr()?, "admin HTTP listening");
            handoff.push((
                Listening {
                    name: "admin/http".into(),
                    addr: l.local_addr()?,
                },
                l.as_fd().try_clone_to_owned()?,
            ));
            tokio::spawn(crate::admin::http::serve(l, shared.clone()));
        }
        // Inherited listeners no cluster wants any more close here.
        for (name, (addr, _)) in inherited {
            info!(listener = %name, addr = %addr, "not in this config: the old process's listener is closed");
        }
        let (requests_tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let _ = shared.upgrades.set(requests_tx);
        Ok(Proxy {
            shared,
            listening,
            shutdown_tx,
            leaving_tx,
            handoff: std::sync::Mutex::new(handoff),
            workers,
            upgrade_requests: std::sync::Mutex::new(Some(requests)),
        })
    }

    /// Binary upgrade: start the binary now at this executable's path as the successor,
    /// pass it the listeners, and once it is ready stop accepting and hand the clients
    /// over (`upgrade`). Ok(the successor's pid); Err(why) leaves this process serving.
    pub async fn upgrade(&self, exe: &std::path::Path) -> Result<u32, String> {
        if self.shared.successor.get().is_some() || *self.shared.shutdown.borrow() {
            return Err("this process is already handing over to a successor or shutting down".into());
        }
        let listeners: Vec<(Listening, OwnedFd)> = self
            .handoff
            .lock()
            .unwrap()
            .iter()
            .map(|(l, fd)| Ok((l.clone(), fd.try_clone()?)))
            .collect::<std::io::Result<_>>()
            .map_err(|e| format!("cannot copy the listening sockets: {e}"))?;
        let (pid, channel) = crate::upgrade::start_successor(&exe.to_path_buf(), &listeners).await?;
        // This process's last copies: a listener the new config moved closes with them.
        drop(listeners);
        self.handoff.lock().unwrap().clear();
        let _ = self
            .shared
            .successor
            .set(Arc::new(crate::proxy::handover::Successor::new(channel, pid)));
        // After `successor`: sessions woken by this look at it.
        let _ = self.leaving_tx.send(true);
        // systemd follows the new process (Type=notify: it is the service now).
        notify(&[
            sd_notify::NotifyState::MainPid(pid),
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("upgraded: the new process serves"),
        ]);
        info!(successor = pid, "upgrade: the new process is ready and takes new clients; handing over the pooled clients at their next transaction boundary");
        Ok(pid)
    }

    /// What takes the clients a predecessor hands over (`Adopter::adopt`).
    pub fn adopter(&self) -> Adopter {
        Adopter {
            shared: self.shared.clone(),
            workers: self.workers.clone(),
        }
    }

    /// After an upgrade: wait for the clients that stayed (session mode, TLS, pinned) to
    /// leave, at most `proxy.shutdown_timeout_ms`, then end the rest as a shutdown does.
    pub async fn drain(&self) {
        let grace = Duration::from_millis(self.shared.config().proxy.shutdown_timeout_ms);
        let deadline = Instant::now() + grace;
        while !self.shared.clients.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.shutdown().await;
    }

    /// Graceful shutdown: stop accepting; sessions close as soon as they are between
    /// transactions, and at the latest after `proxy.shutdown_timeout_ms`, each with a
    /// FATAL message; then stop the monitors.
    pub async fn shutdown(&self) {
        let grace = Duration::from_millis(self.shared.config().proxy.shutdown_timeout_ms);
        let _ = self.shutdown_tx.send(true);
        // After `shutdown`: sessions woken by this look at it.
        let _ = self.leaving_tx.send(true);
        // The last copies of the listening sockets (kept for a successor): closed, so a
        // client trying to connect is refused rather than left in the backlog.
        self.handoff.lock().unwrap().clear();
        let deadline = Instant::now() + grace + Duration::from_millis(500);
        while !self.shared.clients.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give the last sessions a moment to write their goodbye.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The data path's threads: one single-threaded runtime each. A client's session,
/// and every server connection it uses, live on one worker for good: each socket is
/// registered with that worker's event loop, so serving a request wakes no other thread
/// (the cost that dominated the profile with one shared work-stealing runtime).
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// Sessions running on each worker: a new client goes to the least busy one.
    sessions: Vec<Arc<AtomicUsize>>,
}

impl Workers {
    fn spawn(n: usize) -> anyhow::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        for index in 0..n {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("switchyard-worker-{index}"))
                .spawn(move || {
                    crate::pg::pool::set_worker(index);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a worker runtime");
                    let _ = tx.send(rt.handle().clone());
                    // Runs until the process exits (after `Proxy::shutdown`).
                    rt.block_on(std::future::pending::<()>());
                })
                .context("cannot start a worker thread")?;
            handles.push(rx.recv().context("a worker thread died at start")?);
        }
        info!(workers = n, "worker threads started");
        Ok(Workers {
            sessions: (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect(),
            handles,
        })
    }

    fn len(&self) -> usize {
        self.handles.len()
    }

    /// Client connections open now (every worker's sessions, refused ones too).
    fn open(&self) -> usize {
        self.sessions.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The least busy worker, and a guard that counts the session there.
    fn pick(&self) -> (&tokio::runtime::Handle, SessionCount) {
        let (index, count) = self
            .sessions
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.load(Ordering::Relaxed))
            .expect("at least one worker");
        count.fetch_add(1, Ordering::Relaxed);
        (&self.handles[index], SessionCount(count.clone()))
    }
}

struct SessionCount(Arc<AtomicUsize>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Retire idle server connections of one worker's pools past their idle timeout or
/// lifetime, drop those of nodes that are down, open `min_pool_size` ones ahead of
/// demand (on this worker: a connection serves only the worker that opened it).
async fn prune_pools(shared: Arc<Shared>, worker: usize) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if *shared.shutdown.borrow() {
            return;
        }
        for p in crate::pg::PgShared::of(&shared)
            .pools
            .all()
            .into_iter()
            .filter(|p| p.key.worker == worker)
        {
            p.prune();
            let Some(ctx) = shared.clusters.get(&p.key.cluster) else {
                continue;
            };
            let snap = ctx.state.snapshot();
            let up = snap
                .nodes
                .iter()
                .any(|n| n.name == p.key.node && n.addr == p.key.addr && n.is_usable());
            if up {
                let pools = &crate::pg::PgShared::of(&shared).pools;
                let ask = crate::pg::pool::BudgetAsk {
                    cluster: ctx,
                    idle: pools,
                    node: &p.key.node,
                    user: &p.key.user,
                    caps: shared.config().server_connection_caps(&p.key.cluster, &p.key.user),
                };
                if let Some(budget) = ask.try_take() {
                    p.prewarm(ctx.server_tls(), snap.server_login_timeout, Some(budget));
                }
            } else {
                p.clear_idle();
            }
        }
        // MySQL clusters' pools (transaction pooling): the same rules, no prewarming.
        for ctx in shared.clusters.values().filter(|c| c.engine == Engine::Mysql) {
            let snap = ctx.state.snapshot();
            for p in crate::mysql::ClusterInfo::of(ctx)
                .pools
                .all()
                .into_iter()
                .filter(|p| p.key.worker == worker)
            {
                p.prune();
                if !snap.nodes.iter().any(|n| n.name == p.key.node && n.is_usable()) {
                    p.clear_idle();
                }
            }
        }
    }
}

/// Accept clients and hand each to a worker.
///
/// Out of file descriptors (EMFILE/ENFILE), `accept` fails and the client would wait
/// in the kernel's backlog until its own timeout, unanswered. A reserve descriptor
/// avoids that: it is closed to accept the client, which is then told why it is
/// refused (53300, MySQL 1040), and taken again as soon as a descriptor is free. (The
/// admission's descriptor cap refuses clients before it comes to that; this is for
/// when the estimate is wrong.) Failures are
/// logged once per interval with a count, not every time.
async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    workers: Arc<Workers>,
    mut leaving: watch::Receiver<bool>,
) {
    let failures = crate::proxy::limits::Throttle::default();
    let mut reserve = std::fs::File::open("/dev/null").ok();
    loop {
        // Spent: taken again as soon as a descriptor is free (tried at every turn: the
        // one the refused client frees may go to something else first).
        if reserve.is_none() {
            reserve = std::fs::File::open("/dev/null").ok();
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Shutting down, or a successor took the listener (it has its own copy).
            _ = leaving.wait_for(|l| *l) => return,
        };
        let (stream, peer, forced) = match accepted {
            // Past the descriptor cap, counting every open client socket (not only the
            // admitted: a burst of new clients would otherwise take the descriptors the
            // pools need before any of them is admitted), a client is refused at once.
            Ok((stream, peer)) if workers.open() >= shared.admissions.descriptor_cap() as usize => {
                (stream, peer, Some(crate::proxy::limits::Refusal::Descriptors))
            }
            Ok((stream, peer)) => (stream, peer, None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) && reserve.is_some() => {
                drop(reserve.take());
                let Ok((stream, peer)) = listener.accept().await else {
                    reserve = std::fs::File::open("/dev/null").ok();
                    continue;
                };
                (stream, peer, Some(crate::proxy::limits::Refusal::Descriptors))
            }
            Err(e) => {
                if let Some(n) = failures.hit(std::time::Instant::now()) {
                    error!(cluster = %ctx.name, endpoint = %endpoint, error = %e, failures = n,
                           "accept failed (failures: how many since the last such line); raise the file-descriptor limit or lower max_clients");
                }
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The count of failures held back, once accepting works again.
        if let Some(n) = failures.due(std::time::Instant::now()) {
            error!(cluster = %ctx.name, endpoint = %endpoint, failures = n,
                   "accept failed (failures: how many since the last such line); raise the file-descriptor limit or lower max_clients");
        }
        // Moved to the worker's event loop: deregistered here, registered there.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(cluster = %ctx.name, endpoint = %endpoint, peer = %peer, error = %e, "could not hand a client to a worker");
                continue;
            }
        };
        let (worker, count) = workers.pick();
        let (ctx, shared) = (ctx.clone(), shared.clone());
        worker.spawn(async move {
            let _count = count;
            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                return;
            };
            // The task holds one of these at a time; the others are boxed, so that
            // a PostgreSQL client's task is not as large as the largest of them.
            if ctx.engine == Engine::Mysql {
                Box::pin(crate::mysql::session::serve(
                    stream, peer, ctx, endpoint, shared, forced,
                ))
                .await;
                return;
            }
            if let Some(admin) = session::serve(stream, peer, ctx, endpoint, shared.clone(), forced).await {
                Box::pin(crate::admin::console::run(admin.stream, &admin.user, &shared)).await;
            }
        });
    }
}

/// The control runtime: accepting clients, health checks, admin HTTP, signals. The
/// data path runs on the proxy's own worker threads (`app::Workers`).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("switchyard-control")
        .enable_all()
        .build()
}

/// Why `wait_for_signal` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: shut down.
    Terminate,
    /// A successor took over (binary upgrade): drain and exit (`Proxy::drain`).
    Upgraded,
}

/// Wait for SIGTERM or SIGINT; reload the config on every SIGHUP meanwhile (told to
/// the service manager: reloading, then ready again with the outcome as status); on
/// SIGUSR2 or an operator's request (`Shared::upgrades`), upgrade to the binary now
/// at this executable's path, returning once the successor serves.
pub async fn wait_for_signal(proxy: &Proxy) -> std::io::Result<Stop> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut requests = proxy.upgrade_requests.lock().unwrap().take();
    loop {
        let request = async {
            match requests.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => return r.map(|()| Stop::Terminate),
            _ = term.recv() => return Ok(Stop::Terminate),
            _ = usr2.recv() => {
                if upgrade(proxy).await.is_ok() {
                    return Ok(Stop::Upgraded);
                }
            }
            Some(reply) = request => {
                let outcome = upgrade(proxy).await;
                let upgraded = outcome.is_ok();
                let _ = reply.send(outcome);
                if upgraded {
                    return Ok(Stop::Upgraded);
                }
            }
            _ = hup.recv() => {
                let mut reloading = vec![sd_notify::NotifyState::Reloading];
                // systemd 253+ wants the time of the reload beside RELOADING=1.
                reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
                notify(&reloading);
                // reload() logs its own outcome, success or rejection.
                let outcome = proxy.shared.reload().unwrap_or_else(|e| e);
                // STATUS= is one line (a TOML error spans several).
                let status = outcome.lines().next().unwrap_or_default();
                notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
            }
        }
    }
}

/// Upgrade to the binary at this executable's path (`Proxy::upgrade`), logging the
/// outcome; on failure this process goes on serving.
async fn upgrade(proxy: &Proxy) -> Result<u32, String> {
    let exe = crate::upgrade::executable().map_err(|e| format!("cannot tell this executable's path: {e}"))?;
    info!(exe = %exe.display(), "upgrade requested: starting the new binary");
    let outcome = proxy.upgrade(&exe).await;
    if let Err(e) = &outcome {
        error!(reason = %e, "upgrade failed; this process goes on serving");
    }
    outcome
}

/// Tell the service manager (systemd with `Type=notify`) `states`: a no-op without
/// `NOTIFY_SOCKET`. A failure is logged, never fatal: the proxy serves either way.
pub fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(reason = %e, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Wait until every node has had its first health check, or `bound` passed: then
/// "ready" means clients are routed by what the servers said rather than waiting for a
/// first answer. Returns the nodes still unchecked.
pub async fn first_health_round(shared: &Shared, bound: Duration) -> usize {
    let until = Instant::now() + bound;
    loop {
        let unchecked = shared
            .clusters
            .values()
            .map(|c| {
                c.state
                    .snapshot()
                    .nodes
                    .iter()
                    .filter(|n| n.last_check.is_none())
                    .count()
            })
            .sum();
        if unchecked == 0 || Instant::now() >= until {
            return unchecked;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The successor's side of an upgrade (`Proxy::adopter`).
pub struct Adopter {
    shared: Arc<Shared>,
    workers: Arc<Workers>,
}

impl Adopter {
    /// Serve the clients the predecessor hands over on `channel` until it closes it (it
    /// exits), each on the least busy worker. Runs on a thread of its own (the reads
    /// block).
    pub fn adopt(self, channel: crate::proxy::handover::Channel) {
        let Adopter { shared, workers } = self;
        let spawned = std::thread::Builder::new()
            .name("switchyard-adopt".into())
            .spawn(move || {
                let mut adopted = 0u64;
                loop {
                    let (message, mut fds) = match channel.recv() {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            warn!(reason = %e, "upgrade: reading a handed-over client failed; no more are taken");
                            break;
                        }
                    };
                    let crate::proxy::handover::Message::Session {
                        engine,
                        cluster,
                        endpoint,
                        peer,
                        state,
                    } = message
                    else {
                        continue;
                    };
                    let (Some(fd), Some(ctx)) = (fds.pop(), shared.clusters.get(&cluster).cloned()) else {
                        warn!(cluster = %cluster, peer = %peer, "upgrade: a client of a cluster this config does not have; closed");
                        continue;
                    };
                    if engine != "postgresql" || ctx.engine != Engine::Postgresql {
                        continue;
                    }
                    let stream = std::net::TcpStream::from(fd);
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    adopted += 1;
                    let (worker, count) = workers.pick();
                    let shared = shared.clone();
                    worker.spawn(async move {
                        let _count = count;
                        let Ok(tcp) = tokio::net::TcpStream::from_std(stream) else {
                            return;
                        };
                        crate::pg::session::resume(tcp, peer, ctx, endpoint.into(), shared, state).await;
                    });
                }
                info!(clients = adopted, "upgrade: the old process has handed over all it could");
            });
        if let Err(e) = spawned {
            warn!(reason = %e, "upgrade: cannot start the thread that takes handed-over clients");
        }
    }
}
