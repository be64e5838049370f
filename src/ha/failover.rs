//! Automatic failover (`failover = "automatic"`): when the primary is down by the
//! health rules, promote the most caught-up standby, repoint the others, and keep the
//! old primary from taking writes if it comes back.
//!
//! The decision is split into two pure functions, tested without I/O:
//! - [`trigger`]: does this snapshot call for a failover? (a primary was seen, its node
//!   is now down, no other node is primary, no PAUSE, no cooldown);
//! - [`choose`]: which standby? (newest timeline, then most WAL received, then
//!   priority; none that lags the old primary's last known position by more than
//!   `failover_max_lag_bytes`; none at all if a standby still hears from the primary).
//!
//! Around them, [`spawn`] runs one task per cluster that watches the topology and, when
//! `trigger` says so, does the work through the manager login, with the engine's
//! `cluster::control::Control` (`pg::manager`, `mysql::manager`):
//! 1. **confirm** (while 2 runs): the old primary is really gone for everyone: if the manager can still
//!    log in to it and it says it is primary, the health checks fail for another reason
//!    (too many connections, a revoked health user) and nothing is done.
//! 2. **survey**: every up standby is asked what it received and applied (WAL, or
//!    GTIDs), on which timeline, and whether it still hears from the primary
//!    (PostgreSQL: its WAL receiver within the fall window; MySQL: its IO thread is
//!    connected); then the primary is alive, only cut off from Switchyard: no failover.
//! 3. **fence**: the old primary is `fenced` in routing (never chosen as primary again
//!    until it reports being a standby; a newer timeline also rules it out); under
//!    coordination, withdrawn in etcd and seen withdrawn by every instance.
//! 4. **repoint** the other standbys at the chosen one and 5. **promote** it
//!    (PostgreSQL: repoint first, so they cascade and follow its timeline switch;
//!    MySQL: promote first, after it applied its relay log, then repoint by GTID).
//! 6. look at the new primary at once so routing picks it without waiting for the
//!    next check; publish it (coordination).
//! 7. In the background, the old primary is watched for ten minutes: when it answers
//!    again it is made read-only and its sessions ended if it came back writable, and
//!    (MySQL) rejoined as a replica if its GTID history is a prefix of the new
//!    primary's, else kept out and its extra transactions named; `demote_command`, if
//!    configured, is run.
//!
//! What this does not protect against (no agent runs on the database hosts): clients
//! that write to the old primary directly, not through Switchyard, while it is cut off
//! from Switchyard but alive; with asynchronous replication, commits acknowledged within
//! the replication lag before a crash (bounded by `failover_max_lag_bytes` as far as
//! Switchyard saw the primary's position).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::cluster::control::{Candidate, Control, Reclaim};
use crate::cluster::routing;
use crate::cluster::topology::{ClusterSnapshot, Health, NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, Engine, FailoverMode};
use crate::ha::{control_of, demote, repoint_standbys, AnyControl};
use crate::proxy::shared::Shared;

/// What a snapshot calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Nothing to do: a primary is up, or there never was one to replace.
    Nothing,
    /// A failover is due but must wait (the reason is shown in `/status`).
    Wait(String),
    /// Fail over from node `old`.
    Go { old: usize },
}

/// Does `snap` call for a failover? `last_primary`: the node last seen as the primary.
/// `cooldown_left`: time until another automatic failover is allowed.
pub fn trigger(
    snap: &ClusterSnapshot,
    last_primary: Option<&str>,
    paused: bool,
    cooldown_left: Option<Duration>,
) -> Trigger {
    // A node up and reporting primary means there is no vacancy to fill, even one the
    // split-brain rule refuses (two primaries are not fixed by a third). Not a fenced
    // one, nor one on a timeline older than the newest: an old primary that came back.
    if snap.nodes.iter().any(|n| {
        n.health == Health::Up
            && n.role == Role::Primary
            && !n.fenced
            && n.timeline.is_none_or(|t| t >= snap.newest_timeline)
    }) {
        return Trigger::Nothing;
    }
    let Some(old) = last_primary.and_then(|name| snap.index(name)) else {
        return Trigger::Nothing;
    };
    if snap.nodes[old].health != Health::Down {
        // Up as a standby (someone demoted it) or not checked yet: not ours to decide.
        return Trigger::Nothing;
    }
    if paused {
        return Trigger::Wait(format!(
            "primary {} is down; automatic failover waits: the cluster is paused",
            snap.nodes[old].name
        ));
    }
    if let Some(left) = cooldown_left {
        return Trigger::Wait(format!(
            "primary {} is down; automatic failover refused: another happened less than failover_cooldown_s ago ({} s left)",
            snap.nodes[old].name,
            left.as_secs() + 1
        ));
    }
    Trigger::Go { old }
}

/// Which candidate to promote (an index into `cands`), or why none. `old_lsn`: the old
/// primary's WAL position when it was last seen.
pub fn choose(cands: &[Candidate], old: &str, old_lsn: Option<u64>, max_lag: u64) -> Result<usize, String> {
    if let Some(c) = cands.iter().find(|c| c.hears_primary) {
        return Err(format!(
            "standby {} still receives WAL from {old}: the primary is alive and only cut off from Switchyard; not failing over",
            c.name
        ));
    }
    let best = cands
        .iter()
        .enumerate()
        .max_by(|(_, a), (_, b)| {
            (a.timeline, a.position())
                .cmp(&(b.timeline, b.position()))
                // Equal: the higher priority (lower index) wins.
                .then(b.index.cmp(&a.index))
        })
        .map(|(i, _)| i)
        .ok_or_else(|| format!("no standby of {old} can be promoted (none is up and reachable)"))?;
    let c = &cands[best];
    if let Some(old_lsn) = old_lsn {
        let lag = old_lsn.saturating_sub(c.position());
        if lag > max_lag {
            return Err(format!(
                "the most caught-up standby, {}, lacks {lag} bytes of WAL that {old} had written, more than failover_max_lag_bytes ({max_lag}); not promoting it (promote by hand to accept the loss)",
                c.name
            ));
        }
    }
    Ok(best)
}

/// Watch cluster `ctx` and fail over when `trigger` says so (only while its config says
/// `failover = "automatic"`; a reload switches it on or off).
pub fn spawn(shared: Arc<Shared>, ctx: Arc<ClusterCtx>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut rx = ctx.state.subscribe();
        // Ends at shutdown, and when a successor process took over (binary upgrade):
        // one process decides failovers, not the old one draining beside the new.
        let mut leaving = shared.leaving.clone();
        let mut last_primary: Option<String> = None;
        let coord = crate::ha::coord::get(&shared);
        loop {
            let snap = rx.borrow_and_update().clone();
            if let Ok(p) = routing::write_primary(&snap) {
                last_primary = Some(snap.nodes[p].name.clone());
                ctx.ha.set_note(None);
            }
            // Under coordination the published primary is the one to replace.
            if let Some(published) = snap.coordination.as_ref().and_then(|c| c.published.clone()) {
                last_primary = Some(published);
            }
            let config = shared.config();
            let Some(cc) = config.clusters.get(&*ctx.name).filter(|_| !ctx.retiring()) else {
                return;
            };
            if cc.failover == FailoverMode::Automatic {
                let cooldown_left = ctx
                    .ha
                    .last()
                    .and_then(|(at, ..)| Duration::from_secs(cc.failover_cooldown_s).checked_sub(at.elapsed()));
                let outcome = match trigger(&snap, last_primary.as_deref(), ctx.is_paused(), cooldown_left) {
                    Trigger::Nothing => Ok(()),
                    Trigger::Wait(why) => Err(why),
                    Trigger::Go { old } => {
                        // Under coordination: only the leader, with a majority's agreement.
                        let gate = match &coord {
                            Some(c) => {
                                crate::ha::coord::failover_gate(&c.view(), &c.me(), &ctx.name, &snap.nodes[old].name)
                            }
                            None => Ok(()),
                        };
                        let outcome = match (gate, control_of(cc, &ctx)) {
                            (Err(why), _) => Err(why),
                            (Ok(()), None) => Err("no [clusters.NAME.manager] login".into()),
                            (Ok(()), Some(AnyControl::Pg(c))) => failover(&shared, &ctx, &c, cc, &snap, old).await,
                            (Ok(()), Some(AnyControl::My(c))) => failover(&shared, &ctx, &c, cc, &snap, old).await,
                        };
                        outcome.map(|new| last_primary = Some(new))
                    }
                };
                if let Err(why) = outcome {
                    if ctx.ha.set_note(Some(why.clone())) {
                        warn!(cluster = %ctx.name, "{why}");
                    }
                }
            }
            // Look again on every change, and every interval (a cooldown ends, a refused
            // failover may be possible now).
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(config.health.interval()) => {}
                _ = leaving.wait_for(|l| *l) => return,
                // A reload removed the cluster.
                _ = ctx.retirement() => return,
            }
        }
    })
}

/// Fail over from node `old` of `snap` with the engine's `control`; the new primary's
/// name, or why not.
async fn failover<C: Control>(
    shared: &Arc<Shared>,
    ctx: &Arc<ClusterCtx>,
    control: &Arc<C>,
    cc: &ClusterConfig,
    snap: &ClusterSnapshot,
    old: usize,
) -> Result<String, String> {
    let Ok(_running) = ctx.ha.lock.try_lock() else {
        return Err("primary is down; automatic failover waits for a running switchover".into());
    };
    let config = shared.config();
    let h = &config.health;
    let timeout = h.timeout().min(Duration::from_secs(2));
    let started = Instant::now();
    let old_node = snap.nodes[old].clone();

    // 2. survey (`detach`: first stop each standby receiving from the old primary)
    let window = h.interval() * h.fall;
    let standbys: Vec<usize> = (0..snap.nodes.len())
        .filter(|&i| {
            let n = &snap.nodes[i];
            i != old && n.health == Health::Up && n.role == Role::Standby && !n.drained
        })
        .collect();
    let survey_all = |detach: bool| {
        futures_util::future::join_all(standbys.iter().map(move |&i| async move {
            let n = &snap.nodes[i];
            let work = async {
                let mut c = control.connect(n, timeout).await?;
                if detach {
                    control.stop_receiving(&mut c).await?;
                }
                control.survey(&mut c, i, n, window).await
            };
            let answer = tokio::time::timeout(timeout * if detach { 4 } else { 1 }, work)
                .await
                .unwrap_or_else(|_| Err("no answer".to_string()));
            (i, answer)
        }))
    };
    let asks = survey_all(false);
    // 1. confirm, at the same time: the old primary had its health checks' chance; a
    // shorter bound here keeps a frozen one from delaying the failover much.
    let confirm = async {
        let t = timeout / 2;
        tokio::time::timeout(t, async {
            let mut c = control.connect(&old_node, t).await.ok()?;
            control.is_primary(&mut c).await.ok()
        })
        .await
        .ok()
        .flatten()
    };
    let (alive, mut answers) = tokio::join!(confirm, asks);
    if alive == Some(true) {
        return Err(format!(
            "primary {} fails its health checks ({}) but answers the manager login as a primary: not failing over",
            old_node.name,
            old_node.last_error.as_deref().unwrap_or("no answer")
        ));
    }
    // MySQL: the old primary may be only frozen. Before one replica is chosen, every
    // replica stops receiving from it and is asked again what it received: otherwise
    // one still connected could acknowledge (semi-sync) commits of a thawing old
    // primary that the chosen one never gets, and then not follow the new primary.
    let hears = answers.iter().any(|(_, a)| matches!(a, Ok(Some(c)) if c.hears_primary));
    let detached = ctx.engine == Engine::Mysql && alive != Some(true) && !hears;
    if detached {
        answers = survey_all(true).await;
    }
    let mut cands = Vec::new();
    for (i, answer) in answers {
        match answer {
            Ok(Some(c)) => cands.push(c),
            Ok(None) => {}
            Err(e) => {
                warn!(cluster = %ctx.name, node = %snap.nodes[i].name, reason = %e, "failover: standby not surveyed")
            }
        }
    }
    let pick = choose(&cands, &old_node.name, old_node.lsn, cc.failover_max_lag_bytes).map_err(|why| {
        if detached {
            format!(
                "{why} (the replicas stopped receiving from {}: START SLAVE IO_THREAD on each to resume)",
                old_node.name
            )
        } else {
            why
        }
    })?;
    let target = cands[pick].clone();
    let new_node = snap.nodes[target.index].clone();
    info!(cluster = %ctx.name, old = %old_node.name, new = %new_node.name,
          received = ?target.received, old_position = ?old_node.lsn, "automatic failover: promoting the most caught-up standby");

    // 3. fence (in routing)
    ctx.set_fenced(&old_node.name, true);
    if let Some(c) = crate::ha::coord::get(shared) {
        // The other instances must stop writing to the old primary before any other
        // node can take writes: it may be only frozen or cut off from us, and come
        // back while they still route to it (two primaries taking writes through the
        // proxy). Withdraw it in etcd first and wait until every live instance has
        // applied that, or a lease has passed (one out of touch for that long has
        // stopped routing writes by itself).
        let epoch = match c.withdraw(ctx).await {
            Ok(e) => e,
            Err(e) => {
                ctx.set_fenced(&old_node.name, false);
                return Err(format!(
                    "automatic failover: could not withdraw {} as the primary in etcd: {e}",
                    old_node.name
                ));
            }
        };
        let waited = Instant::now();
        let seen = c.wait_seen(&ctx.name, epoch, Duration::from_secs(c.cfg.lease_s)).await;
        // This instance must still lead, and have read its own withdrawal back: a leader
        // cut off meanwhile may have been replaced by one that published again.
        if !seen.read_back || !c.is_leader() {
            ctx.set_fenced(&old_node.name, false);
            return Err(format!(
                "automatic failover: withdrew {} (epoch {epoch}) but then lost touch with etcd or the leadership; not promoting",
                old_node.name
            ));
        }
        if seen.late.is_empty() {
            info!(cluster = %ctx.name, epoch, waited_ms = waited.elapsed().as_millis() as u64, "automatic failover: every instance stopped writing to the old primary");
        } else {
            warn!(cluster = %ctx.name, epoch, late = ?seen.late, "automatic failover: instances did not confirm the withdrawal within a lease; they have not read etcd for that long and route no writes");
        }
    }
    // 4. repoint, 5. promote. PostgreSQL: the other standbys are repointed at the
    // target while it is still a standby (they cascade from it and follow its timeline
    // switch; see switchover.rs for why not after). MySQL: after, since a replica can
    // only start from GTIDs its new source's binary log already holds, and the target
    // writes there what it received only as it applies it, before its promotion.
    let skip = [old, target.index];
    let before = ctx.engine == Engine::Postgresql;
    if before {
        repoint_standbys(&ctx.name, &**control, snap, &skip, &new_node, timeout).await;
    }
    let promoted = async {
        let mut c = control.connect(&new_node, timeout).await?;
        control.promote(&mut c, &new_node.name, Duration::from_secs(30)).await?;
        Ok::<_, String>(c)
    }
    .await;
    let mut new_conn = match promoted {
        Ok(c) => c,
        Err(e) => {
            ctx.set_fenced(&old_node.name, false);
            return Err(format!("automatic failover: promoting {} failed: {e}", new_node.name));
        }
    };
    ctx.ha
        .promoted(&format!("failover {} -> {}", old_node.name, new_node.name));
    shared.metrics.promoted(&ctx.name, "failover");

    // 6. route
    let asked = std::time::Instant::now();
    if let Ok(Ok(obs)) = tokio::time::timeout(timeout, control.observe(&mut new_conn)).await {
        ctx.state.record_from(&new_node.name, Ok(obs), asked, h.rise, h.fall);
    }
    if let Some(c) = crate::ha::coord::get(shared) {
        if let Err(e) = c.publish(ctx, &new_node.name).await {
            warn!(cluster = %ctx.name, node = %new_node.name, reason = %e, "could not publish the new primary; the leader retries");
        }
    }
    ctx.state.push_event(
        &new_node.name,
        format!("standby (primary {} down)", old_node.name),
        "primary".into(),
        "automatic failover".into(),
    );
    info!(cluster = %ctx.name, old = %old_node.name, new = %new_node.name,
          took_ms = started.elapsed().as_millis() as u64, "automatic failover done");
    if !before {
        // MySQL: the other replicas follow once writes go to the new primary; stopping
        // a replica's IO thread can take a while when its old source is frozen.
        let (name, control, snap, new_node) = (ctx.name.clone(), control.clone(), snap.clone(), new_node.clone());
        tokio::spawn(async move {
            repoint_standbys(&name, &*control, &snap, &skip, &new_node, Duration::from_secs(10)).await;
        });
    }

    // 7. the old primary, in the background
    tokio::spawn(watch_old_primary(
        ctx.clone(),
        control.clone(),
        old_node.clone(),
        new_node.clone(),
        h.interval(),
        timeout,
    ));
    demote(cc.demote_command.clone(), &ctx.name, &old_node, &new_node);
    Ok(new_node.name)
}

/// Bound on reclaiming an old primary that answers (fence, compare, rejoin).
const RECLAIM: Duration = Duration::from_secs(10);

/// After a failover, for ten minutes: when the old primary answers again, make it
/// read-only if it came back writable (routing ignores it already), and rejoin it as a
/// standby of the new primary where the engine can (MySQL, when its history allows).
/// What became of it is logged, and kept for `/status` (`HaState::remark`).
async fn watch_old_primary<C: Control>(
    ctx: Arc<ClusterCtx>,
    control: Arc<C>,
    old: NodeState,
    new: NodeState,
    interval: Duration,
    timeout: Duration,
) {
    let until = Instant::now() + Duration::from_secs(600);
    while Instant::now() < until {
        tokio::time::sleep(interval).await;
        let Ok(mut c) = control.connect(&old, timeout).await else {
            continue; // not reachable (yet)
        };
        // Once it answers, the work gets more time than a health check (a server just
        // restarted is slow; the new primary is asked too).
        let outcome = match tokio::time::timeout(RECLAIM, control.reclaim(&mut c, &new, RECLAIM / 2, true)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", RECLAIM.as_secs())),
        };
        let (cluster, node) = (&ctx.name, &old.name);
        let remark = match outcome {
            Err(e) => {
                warn!(cluster = %cluster, node = %node, reason = %e, "could not fence the old primary");
                continue;
            }
            Ok(Reclaim::Standby) => return,
            Ok(Reclaim::Fenced) => {
                warn!(cluster = %cluster, node = %node, "the old primary came back after a failover: made it read-only and ended its sessions; make it a standby of the new primary");
                format!(
                    "fenced: came back as a primary after the failover to {}; read-only until made a standby",
                    new.name
                )
            }
            Ok(Reclaim::Rejoined) => {
                info!(cluster = %cluster, node = %node, primary = %new.name, "the old primary came back after a failover: made it read-only and rejoined it as a replica of the new primary");
                format!("rejoined as a replica of {}", new.name)
            }
            Ok(Reclaim::Diverged(extra)) => {
                warn!(cluster = %cluster, node = %node, extra = %extra, "the old primary came back with transactions the new primary lacks: made it read-only and kept it out; rebuild it from the new primary (see the failover docs)");
                format!(
                    "diverged: has transactions {} lacks ({extra}); read-only, kept out of routing",
                    new.name
                )
            }
            Ok(Reclaim::NotRejoined(why)) => {
                warn!(cluster = %cluster, node = %node, reason = %why, "the old primary came back after a failover: made it read-only, not rejoined");
                format!("fenced, not rejoined: {why}")
            }
        };
        ctx.ha.remark(&old.name, Some(remark));
        return;
    }
}
#[cfg(test)]
#[path = "failover_tests.rs"]
mod tests;
