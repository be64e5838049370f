//! The top: builds the clusters and the shared state, starts health monitors,
//! listeners and the admin HTTP endpoint; reload and graceful shutdown. Nothing depends
//! on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::classify::Classifier;
use crate::cluster::health;
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{ClusterSnapshot, ClusterState, NodeState, Policy};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, Config};
use crate::frontend::session;
use crate::frontend::shared::Shared;

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
        let mut monitors = ctx.monitors.lock().unwrap();
        for (_, task) in monitors.drain() {
            task.abort();
        }
        let Some(c) = config.clusters.get(name) else {
            continue;
        };
        for n in &c.nodes {
            let target = health::Target {
                cluster: ctx.state.clone(),
                node: n.name.clone(),
                host: n.host.clone(),
                port: n.port,
            };
            let task = health::spawn(
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
    let old = shared.config();
    let mut notes = Vec::new();
    for (name, c) in &new.clusters {
        let Some(ctx) = shared.clusters.get(name) else {
            warn!(cluster = %name, "new cluster in config: needs a restart");
            notes.push(format!("cluster {name} added: restart needed"));
            continue;
        };
        if old.clusters.get(name).map(|o| (&o.listen_rw, &o.listen_ro)) != Some((&c.listen_rw, &c.listen_ro)) {
            warn!(cluster = %name, "listen address changed: needs a restart to take effect");
            notes.push(format!("cluster {name} listeners changed: restart needed"));
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
            true
        });
        shared.pools.apply(name, c.pool_settings());
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
            notes.push(format!("cluster {name} removed: restart needed"));
        }
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

/// A running proxy: its shared state and the addresses it listens on.
pub struct Proxy {
    pub shared: Arc<Shared>,
    pub listening: Vec<(String, Endpoint, SocketAddr)>,
    shutdown_tx: watch::Sender<bool>,
}

impl Proxy {
    /// Bind every listener, start the health monitors and accept loops.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Proxy> {
        let (shutdown_tx, shutdown) = watch::channel(false);
        let mut clusters = BTreeMap::new();
        let mut listeners = Vec::new();
        for (name, c) in &config.clusters {
            let nodes = c.nodes.iter().map(|n| NodeState::new(&n.name, &n.addr())).collect();
            let mut snap = ClusterSnapshot::new(name, nodes, policy(c), c.connect_timeout());
            snap.server_login_timeout = c.server_login_timeout();
            let state = ClusterState::new(snap, |s| routing::primary(s).ok());
            let ctx = Arc::new(ClusterCtx::new(
                name,
                state,
                Classifier::new(&c.read_only_functions),
                c.listen_rw.clone(),
                c.listen_ro.clone(),
            ));
            for (addr, endpoint) in [(&c.listen_rw, Endpoint::ReadWrite), (&c.listen_ro, Endpoint::ReadOnly)] {
                if let Some(addr) = addr {
                    let l = TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} (clusters.{name}.listen_{endpoint})"))?;
                    listeners.push((ctx.clone(), endpoint, l));
                }
            }
            clusters.insert(name.clone(), ctx);
        }
        let http_listen = config.admin.http_listen.clone();
        let shared = Arc::new(Shared::new(config, config_path, clusters, shutdown.clone()));
        shared.set_reloader(Box::new(reload));
        start_monitors(&shared);
        // Retire idle server connections past their idle timeout or lifetime.
        let pruner = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if *pruner.shutdown.borrow() {
                    return;
                }
                for p in pruner.pools.all() {
                    p.prune();
                    let Some(ctx) = pruner.clusters.get(&p.key.cluster) else {
                        continue;
                    };
                    let snap = ctx.state.snapshot();
                    let up = snap
                        .nodes
                        .iter()
                        .any(|n| n.name == p.key.node && n.addr == p.key.addr && n.is_usable());
                    if up {
                        p.prewarm(snap.server_login_timeout);
                    } else {
                        p.clear_idle();
                    }
                }
            }
        });
        let mut listening = Vec::new();
        for (ctx, endpoint, l) in listeners {
            let local = l.local_addr()?;
            info!(cluster = %ctx.name, endpoint = %endpoint, addr = %local, "listening");
            listening.push((ctx.name.clone(), endpoint, local));
            tokio::spawn(accept_loop(l, ctx, endpoint, shared.clone(), shutdown.clone()));
        }
        if let Some(addr) = http_listen {
            let l = TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin.http_listen)"))?;
            info!(addr = %l.local_addr()?, "admin HTTP listening");
            tokio::spawn(crate::admin::http::serve(l, shared.clone()));
        }
        Ok(Proxy {
            shared,
            listening,
            shutdown_tx,
        })
    }

    /// Graceful shutdown: stop accepting; sessions close as soon as they are between
    /// transactions, and at the latest after `proxy.shutdown_timeout_ms`, each with a
    /// FATAL message; then stop the monitors.
    pub async fn shutdown(&self) {
        let grace = Duration::from_millis(self.shared.config().proxy.shutdown_timeout_ms);
        let _ = self.shutdown_tx.send(true);
        let deadline = Instant::now() + grace + Duration::from_millis(500);
        while !self.shared.clients.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give the last sessions a moment to write their goodbye.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (ctx, shared) = (ctx.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Some(admin) = session::serve(stream, peer, ctx, endpoint, shared.clone()).await {
                        crate::admin::console::run(admin.stream, &admin.user, &shared).await;
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                error!(cluster = %ctx.name, endpoint = %endpoint, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
