//! The top: builds the clusters and the shared state, starts health monitors,
//! listeners and the admin HTTP endpoint; reload and graceful shutdown. Nothing depends
//! on it.

mod reload;
mod serving;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::cluster::health;
use crate::cluster::routing;
use crate::cluster::topology::{ClusterSnapshot, ClusterState, NodeState, Policy};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, Config, Engine};
use crate::pg::PgCluster;
use crate::proxy::shared::Shared;
use crate::tls::ServerTls;
use serving::{Serving, Workers};

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
    for (name, ctx) in shared.clusters().iter() {
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

/// A running proxy: its shared state and where clients come in.
pub struct Proxy {
    pub shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    serving: Arc<Serving>,
    /// Operators' upgrade requests (`Shared::upgrades`), taken by `wait_for_signal`.
    upgrade_requests:
        std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<crate::proxy::shared::UpgradeReply>>>,
}

/// A listener from a predecessor (`upgrade::Inherited`) if it listens where `addr`
/// says, else a new one bound there.
fn listener(
    inherited: &mut HashMap<String, (SocketAddr, std::net::TcpListener)>,
    name: &str,
    addr: &str,
) -> std::io::Result<std::net::TcpListener> {
    if let Some((at, l)) = inherited.remove(name) {
        use std::net::ToSocketAddrs;
        if addr.to_socket_addrs()?.any(|a| a == at) {
            return Ok(l);
        }
        info!(listener = name, was = %at, now = addr, "the old process listened elsewhere: binding the configured address");
    }
    std::net::TcpListener::bind(addr)
}

/// The config key a listener comes from, for errors.
fn listen_key(name: &str) -> String {
    match name.split_once('/') {
        Some(("admin", _)) | None => "admin.http_listen".to_string(),
        Some((cluster, endpoint)) => format!("clusters.{cluster}.listen_{endpoint}"),
    }
}

/// A cluster's context, as the config describes it (at start, or added by a reload).
fn build_cluster(name: &str, c: &ClusterConfig, config: &Config) -> Result<Arc<ClusterCtx>, String> {
    let nodes = c.nodes.iter().map(|n| NodeState::new(&n.name, &n.addr())).collect();
    let mut snap = ClusterSnapshot::new(name, nodes, policy(c), c.connect_timeout());
    snap.server_login_timeout = c.server_login_timeout();
    snap.failover_hold = c.failover_hold();
    let state = ClusterState::new(snap, |s| routing::primary(s).ok());
    let tls = ServerTls::new(c.server_tls, c.server_ca_file.as_deref()).map_err(|e| format!("clusters.{name}: {e}"))?;
    let engine_state: Box<dyn std::any::Any + Send + Sync> = match c.engine {
        Engine::Postgresql => Box::new(PgCluster::new(state.clone(), &c.read_only_functions)),
        Engine::Mysql => Box::new(Arc::new(crate::mysql::ClusterInfo::new(
            &c.read_only_functions,
            config.proxy.worker_threads(),
        ))),
    };
    Ok(Arc::new(ClusterCtx::new(
        name,
        state,
        c.clone(),
        tls,
        c.engine,
        engine_state,
    )))
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
        for (name, c) in &config.clusters {
            clusters.insert(
                name.clone(),
                build_cluster(name, c, &config).map_err(|e| anyhow::anyhow!(e))?,
            );
        }
        // Bound before anything starts: a taken address stops the start here.
        let mut listeners = Vec::new();
        for (name, addr, serves) in serving::wanted(&config, &clusters) {
            let l = listener(&mut inherited, &name, &addr)
                .with_context(|| format!("cannot listen on {addr} ({})", listen_key(&name)))?;
            listeners.push((name, addr, l, serves));
        }
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
        for ctx in shared.clusters().values() {
            crate::ha::failover::spawn(shared.clone(), ctx.clone());
        }
        for (index, worker) in workers.handles.iter().enumerate() {
            worker.spawn(prune_pools(shared.clone(), index));
        }
        let serving = Arc::new(Serving {
            listeners: std::sync::Mutex::new(Vec::new()),
            workers: Arc::new(workers),
            control: tokio::runtime::Handle::current(),
            leaving_tx,
            reloading: std::sync::Mutex::new(()),
        });
        for (name, addr, l, serves) in listeners {
            serving.open(&shared, (name, addr), l, serves)?;
        }
        // Inherited listeners no cluster wants any more close here.
        for (name, (addr, _)) in inherited {
            info!(listener = %name, addr = %addr, "not in this config: the old process's listener is closed");
        }
        // The reloader lives in `shared`: it holds it weakly.
        let (weak, on) = (Arc::downgrade(&shared), serving.clone());
        shared.set_reloader(Box::new(move |_| match weak.upgrade() {
            Some(shared) => reload::reload(&shared, &on),
            None => Err("this process is stopping".into()),
        }));
        let (requests_tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let _ = shared.upgrades.set(requests_tx);
        Ok(Proxy {
            shared,
            shutdown_tx,
            serving,
            upgrade_requests: std::sync::Mutex::new(Some(requests)),
        })
    }

    /// Where the proxy listens now: (listener name, e.g. `main/rw` or `admin/http`,
    /// local address).
    pub fn listening(&self) -> Vec<(String, SocketAddr)> {
        let listeners = self.serving.listeners.lock().unwrap();
        listeners.iter().map(|l| (l.name.clone(), l.local)).collect()
    }

    /// Binary upgrade: start the binary now at this executable's path as the successor,
    /// pass it the listeners, and once it is ready stop accepting and hand the clients
    /// over (`upgrade`). Ok(the successor's pid); Err(why) leaves this process serving.
    pub async fn upgrade(&self, exe: &std::path::Path) -> Result<u32, String> {
        if self.shared.successor.get().is_some() || *self.shared.shutdown.borrow() {
            return Err("this process is already handing over to a successor or shutting down".into());
        }
        let listeners = self
            .serving
            .handoff()
            .map_err(|e| format!("cannot copy the listening sockets: {e}"))?;
        let (pid, channel) = crate::upgrade::start_successor(&exe.to_path_buf(), &listeners).await?;
        // This process's last copies: a listener the new config moved closes with them.
        drop(listeners);
        self.serving.forget();
        let _ = self
            .shared
            .successor
            .set(Arc::new(crate::proxy::handover::Successor::new(channel, pid)));
        // After `successor`: sessions woken by this look at it.
        let _ = self.serving.leaving_tx.send(true);
        // Under coordination the successor takes this instance's name and leadership.
        if let Some(coord) = crate::ha::coord::get(&self.shared) {
            coord.step_aside().await;
        }
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
            workers: self.serving.workers.clone(),
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
        let _ = self.serving.leaving_tx.send(true);
        // The last copies of the listening sockets (kept for a successor): closed, so a
        // client trying to connect is refused rather than left in the backlog.
        self.serving.forget();
        let deadline = Instant::now() + grace + Duration::from_millis(500);
        while !self.shared.clients.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give the last sessions a moment to write their goodbye.
        tokio::time::sleep(Duration::from_millis(100)).await;
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
            let Some(ctx) = shared.cluster(&p.key.cluster) else {
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
                    cluster: &ctx,
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
        for ctx in shared.clusters().values().filter(|c| c.engine == Engine::Mysql) {
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
            .clusters()
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
                    let (Some(fd), Some(ctx)) = (fds.pop(), shared.cluster(&cluster)) else {
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
