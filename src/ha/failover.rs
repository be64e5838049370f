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
//! `trigger` says so, does the work through the manager login:
//! 1. **confirm** (while 2 runs): the old primary is really gone for everyone: if the manager can still
//!    log in to it and it says it is primary, the health checks fail for another reason
//!    (too many connections, a revoked health user) and nothing is done.
//! 2. **survey**: every up standby is asked what WAL it received and replayed, on which
//!    timeline, and whether its WAL receiver heard from the primary within the fall
//!    window (then the primary is alive, only cut off from Switchyard: no failover).
//! 3. **fence**: the old primary is `fenced` in routing (never chosen as primary again
//!    until it reports being a standby; a newer timeline also rules it out).
//! 4. **repoint** the other standbys at the chosen one (they cascade from it and follow
//!    its timeline switch), 5. **promote** it (`pg_promote`), 6. look at the new
//!    primary at once so routing picks it without waiting for the next check.
//! 7. In the background, the old primary is watched for ten minutes: if it comes back
//!    as a primary it is made read-only and its sessions are ended; `demote_command`, if
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

use crate::cluster::routing;
use crate::cluster::topology::{ClusterSnapshot, Health, Role};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, FailoverMode};
use crate::ha::manager::{self, Manager};
use crate::pg::health::{self, parse_lsn};
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

/// What a standby said when asked just before a failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Index in the snapshot (lower = higher priority).
    pub index: usize,
    pub name: String,
    pub timeline: Option<u32>,
    /// `pg_last_wal_receive_lsn()`: flushed by its WAL receiver (what it will replay).
    pub received: Option<u64>,
    pub replayed: Option<u64>,
    /// Its WAL receiver streams and heard from the primary within the fall window.
    pub hears_primary: bool,
}

impl Candidate {
    fn position(&self) -> u64 {
        self.received.max(self.replayed).unwrap_or(0)
    }
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
        let mut shutdown = shared.shutdown.clone();
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
            let Some(cc) = config.clusters.get(&ctx.name) else {
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
                                crate::ha::coord::failover_gate(&c.view(), c.me(), &ctx.name, &snap.nodes[old].name)
                            }
                            None => Ok(()),
                        };
                        match gate {
                            Ok(()) => failover(&shared, &ctx, cc, &snap, old)
                                .await
                                .map(|new| last_primary = Some(new)),
                            Err(why) => Err(why),
                        }
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
                _ = shutdown.changed() => return,
            }
        }
    })
}

const SURVEY_SQL: &str = "SELECT pg_is_in_recovery(),
  pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
  (SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1),
  COALESCE((SELECT status = 'streaming' AND last_msg_receipt_time > now() - make_interval(secs => $1)
            FROM pg_stat_wal_receiver LIMIT 1), false)";

/// Fail over from node `old` of `snap`; the new primary's name, or why not.
async fn failover(
    shared: &Shared,
    ctx: &ClusterCtx,
    cc: &ClusterConfig,
    snap: &ClusterSnapshot,
    old: usize,
) -> Result<String, String> {
    let Ok(_running) = ctx.ha.lock.try_lock() else {
        return Err("primary is down; automatic failover waits for a running switchover".into());
    };
    let manager = manager::Manager {
        login: cc.manager.clone().ok_or("no [clusters.NAME.manager] login")?,
        tls: ctx.server_tls(),
    };
    let config = shared.config();
    let h = &config.health;
    let timeout = h.timeout().min(Duration::from_secs(2));
    let started = Instant::now();
    let old_node = snap.nodes[old].clone();

    // 2. survey
    let window = (h.interval() * h.fall).as_secs_f64();
    let asks = snap
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| *i != old && n.health == Health::Up && n.role == Role::Standby && !n.drained)
        .map(|(i, n)| {
            let manager = &manager;
            async move { (i, survey(manager, i, n, timeout, window).await) }
        });
    // 1. confirm, at the same time: the old primary had its health checks' chance; a
    // shorter bound here keeps a frozen one from delaying the failover much.
    let confirm = async {
        let t = timeout / 2;
        let c = manager::connect(&manager, &old_node.addr, &old_node.name, t)
            .await
            .ok()?;
        let row = tokio::time::timeout(t, c.query_one("SELECT pg_is_in_recovery()", &[]))
            .await
            .ok()?
            .ok()?;
        Some(!row.get::<_, bool>(0))
    };
    let (alive, answers) = tokio::join!(confirm, futures_util::future::join_all(asks));
    if alive == Some(true) {
        return Err(format!(
            "primary {} fails its health checks ({}) but answers the manager login as a primary: not failing over",
            old_node.name,
            old_node.last_error.as_deref().unwrap_or("no answer")
        ));
    }
    let mut cands = Vec::new();
    for (i, answer) in answers {
        match answer {
            Ok(Some(mut c)) => {
                c.timeline = c.timeline.or(snap.nodes[i].timeline);
                cands.push(c);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(cluster = %ctx.name, node = %snap.nodes[i].name, reason = %e, "failover: standby not surveyed")
            }
        }
    }
    let pick = choose(&cands, &old_node.name, old_node.lsn, cc.failover_max_lag_bytes)?;
    let target = cands[pick].clone();
    let new_node = snap.nodes[target.index].clone();
    info!(cluster = %ctx.name, old = %old_node.name, new = %new_node.name,
          received = ?target.received, old_lsn = ?old_node.lsn, "automatic failover: promoting the most caught-up standby");

    // 3. fence (in routing), 4. repoint the other standbys at the target while it is
    // still a standby (they cascade from it and follow its timeline switch; see
    // switchover.rs for why not after), 5. promote
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
    manager::repoint_standbys(&ctx.name, &manager, snap, &[old, target.index], &new_node.addr, timeout).await;
    let promoted = async {
        let c = manager::connect(&manager, &new_node.addr, &new_node.name, timeout).await?;
        manager::promote(&c, &new_node.name, Duration::from_secs(30)).await?;
        Ok::<_, String>(c)
    }
    .await;
    let new_conn = match promoted {
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
    if let Ok(Ok(obs)) = tokio::time::timeout(timeout, health::check_now(&new_conn)).await {
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

    // 7. the old primary, in the background
    tokio::spawn(watch_old_primary(
        ctx.name.clone(),
        manager.clone(),
        old_node.name.clone(),
        old_node.addr.clone(),
        h.interval(),
        timeout,
    ));
    manager::spawn_demote(
        cc.demote_command.clone(),
        &ctx.name,
        (&old_node.name, &old_node.addr),
        (&new_node.name, &new_node.addr),
    );
    Ok(new_node.name)
}

/// Ask one standby where it is. Ok(None): it is not in recovery (any more).
async fn survey(
    manager: &Manager,
    index: usize,
    n: &crate::cluster::topology::NodeState,
    timeout: Duration,
    window_s: f64,
) -> Result<Option<Candidate>, String> {
    let c = manager::connect(manager, &n.addr, &n.name, timeout).await?;
    let row = tokio::time::timeout(timeout, c.query_one(SURVEY_SQL, &[&window_s]))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| manager::describe(&e))?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let lsn = |i: usize| row.get::<_, Option<String>>(i).as_deref().and_then(parse_lsn);
    Ok(Some(Candidate {
        index,
        name: n.name.clone(),
        timeline: row.get::<_, Option<i32>>(3).map(|t| t as u32),
        received: lsn(1),
        replayed: lsn(2),
        hears_primary: row.get(4),
    }))
}

/// After a failover: if the old primary comes back as a primary within ten minutes,
/// make it read-only and end its sessions (routing already ignores it).
async fn watch_old_primary(
    cluster: String,
    manager: Manager,
    node: String,
    addr: String,
    interval: Duration,
    timeout: Duration,
) {
    let until = Instant::now() + Duration::from_secs(600);
    while Instant::now() < until {
        tokio::time::sleep(interval).await;
        let Ok(c) = manager::connect(&manager, &addr, &node, timeout).await else {
            continue;
        };
        match c.query_one("SELECT pg_is_in_recovery()", &[]).await {
            Ok(row) if row.get::<_, bool>(0) => return, // a standby now: nothing to fence
            Ok(_) => match manager::fence(&c).await {
                Ok(()) => {
                    warn!(cluster = %cluster, node = %node, "the old primary came back after a failover: made it read-only and ended its sessions; make it a standby of the new primary");
                    return;
                }
                Err(e) => {
                    warn!(cluster = %cluster, node = %node, reason = %manager::describe(&e), "could not fence the old primary")
                }
            },
            Err(_) => {}
        }
    }
}

#[cfg(test)]
#[path = "failover_tests.rs"]
mod tests;
