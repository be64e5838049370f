//! The health monitor loop, the same for every engine: one task per node, each with
//! its own connection over the engine's protocol (an engine's `Probe`: `pg::health`,
//! `mysql::health`), asking the server what it is. Every check is bounded by
//! `timeout_ms`, so a black-holed or frozen server counts as a failed check, never a
//! stall. Results go into `ClusterState`; nothing on a client's path waits for a check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::cluster::topology::{ClusterState, Health, Observation, Transition};
use crate::config::HealthConfig;

/// Who the monitor (and the fresh-read probes) log in as.
pub struct Login {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

/// Called with each check's duration and any state change, for metrics.
pub type Observer = Arc<dyn Fn(&str, &str, Duration, Option<&Transition>) + Send + Sync>;

/// How one engine checks one node. `check` asks the server (the monitor bounds it by
/// `timeout_ms`); `reset` drops the connection after a failed or timed-out check, so
/// the next check logs in afresh.
pub trait Probe: Send + 'static {
    fn check(&mut self) -> impl std::future::Future<Output = Result<Observation, String>> + Send;
    fn reset(&mut self);
    /// A successful check's observation, for warnings about what the check cannot see.
    fn inspect(&mut self, _obs: &Observation) {}
}

/// The monitor loop of one node, whatever the engine: every `interval_ms` one check,
/// bounded by `timeout_ms`, folded into the cluster's state; changes logged and counted.
pub fn run<P: Probe>(
    cluster: Arc<ClusterState>,
    node: String,
    mut probe: P,
    cfg: HealthConfig,
    observer: Observer,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(cfg.interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            let started = Instant::now();
            let result = match tokio::time::timeout(cfg.timeout(), probe.check()).await {
                Ok(Ok(obs)) => {
                    probe.inspect(&obs);
                    Ok(obs)
                }
                Ok(Err(e)) => {
                    probe.reset();
                    Err(e)
                }
                Err(_) => {
                    probe.reset();
                    Err(format!("no answer within {} ms", cfg.timeout_ms))
                }
            };
            let took = started.elapsed();
            let transition = cluster.record_from(&node, result, started, cfg.rise, cfg.fall);
            observer(&cluster.name, &node, took, transition.as_ref());
            if let Some(t) = transition {
                let (old, new) = (
                    format!("{}/{}", t.old_health, t.old_role),
                    format!("{}/{}", t.new_health, t.new_role),
                );
                if t.new_health == Health::Up {
                    info!(cluster = %cluster.name, node = %node, old = %old, new = %new, reason = %t.reason, check_ms = took.as_millis() as u64, "node state changed");
                } else {
                    warn!(cluster = %cluster.name, node = %node, old = %old, new = %new, reason = %t.reason, check_ms = took.as_millis() as u64, "node state changed");
                }
            }
        }
    })
}
