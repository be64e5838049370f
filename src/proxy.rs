//! Wiring: cluster state, health monitors, listeners, and the shutdown signal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info};

use crate::auth::Verifier;
use crate::cancel::CancelRegistry;
use crate::config::{Config, NodeConfig};
use crate::health;
use crate::routing::{Endpoint, Policy};
use crate::session;
use crate::topology::ClusterState;

/// What every session of every cluster shares.
pub struct Shared {
    pub config: Config,
    pub verifiers: HashMap<String, Verifier>,
    pub cancels: Arc<CancelRegistry>,
    pub shutdown: watch::Receiver<bool>,
}

/// One cluster as sessions see it.
pub struct ClusterCtx {
    pub name: String,
    pub state: Arc<ClusterState>,
    pub nodes: Vec<NodeConfig>,
    pub policy: Policy,
    pub connect_timeout: Duration,
    /// Rotates `round_robin` read balancing.
    pub turn: AtomicUsize,
}

/// A running proxy: its clusters and the addresses it listens on.
pub struct Proxy {
    pub clusters: Vec<Arc<ClusterCtx>>,
    pub listening: Vec<(String, Endpoint, SocketAddr)>,
    shutdown_tx: watch::Sender<bool>,
}

impl Proxy {
    /// Bind every listener, start the health monitors and accept loops.
    pub async fn start(config: Config) -> anyhow::Result<Proxy> {
        let (shutdown_tx, shutdown) = watch::channel(false);
        let verifiers = config
            .users
            .iter()
            .map(|u| (u.name.clone(), Verifier::new(u)))
            .collect();
        let (user, password) = config.health_login();
        let health_login = Arc::new(health::Login {
            user,
            password,
            database: config.health.database.clone(),
        });
        let mut clusters = Vec::new();
        let mut listeners = Vec::new();
        for (name, c) in &config.clusters {
            let nodes: Vec<(String, String)> =
                c.nodes.iter().map(|n| (n.name.clone(), n.addr())).collect();
            let state = ClusterState::new(name, &nodes);
            for (i, n) in c.nodes.iter().enumerate() {
                let target = health::Target {
                    cluster: state.clone(),
                    node: i,
                    host: n.host.clone(),
                    port: n.port,
                };
                health::spawn(
                    target,
                    config.health.clone(),
                    health_login.clone(),
                    shutdown.clone(),
                );
            }
            let ctx = Arc::new(ClusterCtx {
                name: name.clone(),
                state,
                nodes: c.nodes.clone(),
                policy: Policy {
                    max_replica_lag_ms: c.max_replica_lag_ms,
                    read_balance: c.read_balance,
                    split_brain: c.split_brain,
                },
                connect_timeout: c.connect_timeout(),
                turn: AtomicUsize::new(0),
            });
            for (addr, endpoint) in [
                (&c.listen_rw, Endpoint::ReadWrite),
                (&c.listen_ro, Endpoint::ReadOnly),
            ] {
                if let Some(addr) = addr {
                    let l = TcpListener::bind(addr).await.with_context(|| {
                        format!("cannot listen on {addr} (clusters.{name}.listen_{endpoint})")
                    })?;
                    listeners.push((ctx.clone(), endpoint, l));
                }
            }
            clusters.push(ctx);
        }
        let shared = Arc::new(Shared {
            config,
            verifiers,
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: shutdown.clone(),
        });
        let mut listening = Vec::new();
        for (ctx, endpoint, l) in listeners {
            let local = l.local_addr()?;
            info!(cluster = %ctx.name, endpoint = %endpoint, addr = %local, "listening");
            listening.push((ctx.name.clone(), endpoint, local));
            tokio::spawn(accept_loop(
                l,
                ctx,
                endpoint,
                shared.clone(),
                shutdown.clone(),
            ));
        }
        Ok(Proxy {
            clusters,
            listening,
            shutdown_tx,
        })
    }

    /// Stop accepting, end every session with a FATAL message, stop the monitors.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        // Give sessions a moment to write their goodbye.
        tokio::time::sleep(Duration::from_millis(200)).await;
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
                tokio::spawn(session::serve(
                    stream,
                    peer,
                    ctx.clone(),
                    endpoint,
                    shared.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                error!(cluster = %ctx.name, endpoint = %endpoint, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
