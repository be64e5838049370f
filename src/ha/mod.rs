//! The control plane: changing which node is the primary. A planned `switchover`
//! (operator's request) and an automatic `failover` (primary lost), both through the
//! `manager` login and the engine's `cluster::control::Control`; the two never run at
//! once on a cluster (`ClusterCtx::ha`). With `[coordination]`, several instances agree
//! through etcd (`coord`, over `etcd`): one leader decides, and writes go only to the
//! primary it published.

pub mod coord;
pub mod etcd;
pub mod failover;
pub mod switchover;

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::cluster::control::Control;
use crate::cluster::topology::{ClusterSnapshot, Health, NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, Engine};
use crate::mysql::manager::MyControl;
use crate::pg::manager::{Manager, PgControl};

/// A cluster's `Control`, by engine (the failover and switchover are generic over it).
pub enum AnyControl {
    Pg(Arc<PgControl>),
    My(Arc<MyControl>),
}

/// The control of cluster `cc` through its manager login; None without one.
pub fn control_of(cc: &ClusterConfig, ctx: &ClusterCtx) -> Option<AnyControl> {
    let login = cc.manager.clone()?;
    Some(match cc.engine {
        Engine::Postgresql => AnyControl::Pg(Arc::new(PgControl(Manager {
            login,
            tls: ctx.server_tls(),
        }))),
        Engine::Mysql => AnyControl::My(Arc::new(MyControl::new(
            login,
            cc,
            crate::mysql::ClusterInfo::of(ctx).clone(),
        ))),
    })
}

/// Point every up standby of `snap` except those in `skip` at `primary`, all at once,
/// each bounded by `timeout` as a whole (login and statements): one that stalls must
/// not hold up the promotion. Best effort: a standby that cannot be repointed is logged
/// (it is then detached in routing: no reads) and the operator repoints it.
pub async fn repoint_standbys<C: Control>(
    cluster: &str,
    control: &C,
    snap: &ClusterSnapshot,
    skip: &[usize],
    primary: &NodeState,
    timeout: Duration,
) {
    let each = snap
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| !skip.contains(i) && n.health == Health::Up && n.role == Role::Standby)
        .map(|(_, n)| async move {
            let work = async {
                let mut c = control.connect(n, timeout).await?;
                control.repoint(&mut c, primary).await
            };
            let result = match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            };
            match result {
                Ok(()) => info!(cluster = %cluster, node = %n.name, primary = %primary.name, "standby repointed"),
                Err(e) => {
                    warn!(cluster = %cluster, node = %n.name, reason = %e, "could not repoint a standby at the new primary; repoint it by hand")
                }
            }
        });
    futures_util::future::join_all(each).await;
}

/// Run the operator's `demote_command` for the old primary, in the background, bounded
/// by ten minutes; its outcome is logged.
pub fn demote(command: Option<String>, cluster: &str, old: &NodeState, new: &NodeState) {
    let (old, new) = (
        (old.name.as_str(), old.addr.as_str()),
        (new.name.as_str(), new.addr.as_str()),
    );
    let Some(command) = command else {
        return;
    };
    let split = |addr: &str| {
        let (h, p) = addr.rsplit_once(':').unwrap_or((addr, "5432"));
        (h.to_string(), p.to_string())
    };
    let ((old_host, old_port), (new_host, new_port)) = (split(old.1), split(new.1));
    let env = [
        ("SWITCHYARD_CLUSTER", cluster.to_string()),
        ("SWITCHYARD_OLD_PRIMARY", old.0.to_string()),
        ("SWITCHYARD_OLD_HOST", old_host),
        ("SWITCHYARD_OLD_PORT", old_port),
        ("SWITCHYARD_NEW_PRIMARY", new.0.to_string()),
        ("SWITCHYARD_NEW_HOST", new_host),
        ("SWITCHYARD_NEW_PORT", new_port),
    ];
    let (cluster, node) = (cluster.to_string(), old.0.to_string());
    tokio::spawn(async move {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(&command).envs(env).kill_on_drop(true);
        info!(cluster = %cluster, node = %node, "running demote_command for the old primary");
        match tokio::time::timeout(Duration::from_secs(600), cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => {
                info!(cluster = %cluster, node = %node, "demote_command succeeded")
            }
            Ok(Ok(out)) => warn!(cluster = %cluster, node = %node, status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(), "demote_command failed"),
            Ok(Err(e)) => warn!(cluster = %cluster, node = %node, reason = %e, "demote_command could not be run"),
            Err(_) => {
                warn!(cluster = %cluster, node = %node, "demote_command did not finish within 10 minutes; killed")
            }
        }
    });
}
