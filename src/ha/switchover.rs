//! Planned switchover: move the primary role to a chosen standby with no client errors
//! in transaction mode. New transactions are held at their boundaries while it runs;
//! the ones in flight finish on the old primary first.
//!
//! Steps, each bounded by what is left of `switchover_timeout_ms`, each named in the
//! error if it fails (when one up to "catch up" fails, the hold is released and the old
//! primary made writable again; the repointed standbys stay cascading from the target,
//! which still streams from the old primary):
//! 1. **check**: the target is an up standby that follows the primary.
//! 2. **hold**: PAUSE the cluster; wait until no pooled connection to the old primary is
//!    in use (transactions in flight have ended).
//! 3. **fence**: on the old primary, `default_transaction_read_only = on` and every
//!    other client backend terminated, so nothing writes there any more; note its WAL
//!    position (flushed, after a commit of our own). Routing stops taking it as the
//!    primary (`fenced`), whatever the split-brain rule.
//! 4. **catch up**: wait until the target has replayed that position.
//! 5. **repoint**: every other standby gets the target in its `primary_conninfo`, while
//!    the target is still a standby: they cascade from it and follow its timeline
//!    switch at promotion. Repointed after the promotion instead, a standby still
//!    streaming from the old primary could receive WAL the target never had (the
//!    old primary's shutdown checkpoint when `demote_command` stops it, a
//!    running-transactions record) and be left unable to follow the new timeline.
//! 6. **promote**: `pg_promote()` on the target.
//! 7. **route**: wait until the health monitor sees the target as the primary.
//! 8. **release**: RESUME; held transactions run on the new primary.
//!
//! The old primary stays up, read-only, on the old timeline: routing never gives it
//! writes again (a newer timeline exists) and reads only once it is a standby of the new
//! primary, which is the operator's job (pg_rewind, standby.signal, primary_conninfo).
//!
//! The manager login (`[clusters.NAME.manager]`) must be a superuser.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use crate::cluster::control::{Control, Reclaim};
use crate::cluster::routing;
use crate::cluster::topology::{Health, Role};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, Engine};
use crate::ha::{control_of, demote, repoint_standbys, AnyControl};
use crate::proxy::shared::Shared;

/// How a switchover ended badly: the step, and why.
#[derive(Debug, Clone)]
pub struct SwitchoverError {
    pub step: &'static str,
    pub reason: String,
}

impl fmt::Display for SwitchoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "switchover failed at step \"{}\": {}", self.step, self.reason)
    }
}

/// What a switchover did, step by step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwitchoverReport {
    pub cluster: String,
    pub from: String,
    pub to: String,
    /// How long new transactions were held.
    pub hold_ms: u64,
    pub steps: Vec<(String, u64)>,
}

fn fail(step: &'static str, reason: impl fmt::Display) -> SwitchoverError {
    SwitchoverError {
        step,
        reason: reason.to_string(),
    }
}

/// Releases the hold however the switchover ends.
struct Hold<'a>(&'a ClusterCtx);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.set_paused(false);
    }
}

pub async fn switchover(shared: &Shared, cluster: &str, to: &str) -> Result<SwitchoverReport, SwitchoverError> {
    let config = shared.config();
    let ctx = shared
        .cluster(cluster)
        .ok_or_else(|| fail("check", format!("no cluster named \"{cluster}\"")))?;
    let cc = config
        .clusters
        .get(cluster)
        .ok_or_else(|| fail("check", format!("no cluster named \"{cluster}\" in the running config")))?;
    let control = control_of(cc, &ctx).ok_or_else(|| {
        fail(
            "check",
            format!("clusters.{cluster}.manager is not configured (a login for promotion and repointing)"),
        )
    })?;
    match control {
        AnyControl::Pg(c) => run(shared, &ctx, cc, &*c, to).await,
        AnyControl::My(c) => run(shared, &ctx, cc, &*c, to).await,
    }
}

async fn run<C: Control>(
    shared: &Shared,
    ctx: &ClusterCtx,
    cc: &ClusterConfig,
    control: &C,
    to: &str,
) -> Result<SwitchoverReport, SwitchoverError> {
    let cluster = &*ctx.name;
    let config = shared.config();
    let _running = ctx.ha.lock.try_lock().map_err(|_| {
        fail(
            "check",
            format!("a switchover or failover of cluster \"{cluster}\" is already running"),
        )
    })?;
    let deadline = Instant::now() + Duration::from_millis(cc.switchover_timeout_ms);
    let left = |step: &'static str| {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(fail(
                step,
                format!("switchover_timeout_ms ({} ms) ran out", cc.switchover_timeout_ms),
            ))
        } else {
            Ok(d)
        }
    };
    let mut steps: Vec<(String, u64)> = Vec::new();
    let mut t = Instant::now();
    let mut mark = |name: &str, steps: &mut Vec<(String, u64)>| {
        steps.push((name.to_string(), t.elapsed().as_millis() as u64));
        t = Instant::now();
    };

    // 1. check
    let snap = ctx.state.snapshot();
    let p = routing::primary(&snap).map_err(|e| fail("check", e))?;
    let target = snap
        .index(to)
        .ok_or_else(|| fail("check", format!("cluster \"{cluster}\" has no node \"{to}\"")))?;
    let (old, new) = (snap.nodes[p].clone(), snap.nodes[target].clone());
    if target == p {
        return Err(fail("check", format!("\"{to}\" is already the primary")));
    }
    if new.health != Health::Up || new.role != Role::Standby {
        return Err(fail(
            "check",
            format!(
                "\"{to}\" is not an up standby: {}",
                new.describe(std::time::SystemTime::now())
            ),
        ));
    }
    if let Some(d) = snap.detached(target, Some(p)) {
        return Err(fail("check", format!("\"{to}\" does not follow the primary: {d}")));
    }
    // Under coordination only the leader moves the primary, and every instance holds.
    let coord = crate::ha::coord::get(shared);
    if let Some(c) = &coord {
        if !c.is_leader() {
            let v = c.view();
            let leader = v.leader.clone().unwrap_or_else(|| "none elected".into());
            let addr = v.instances.get(&leader).filter(|a| !a.is_empty()).cloned();
            return Err(fail(
                "check",
                format!(
                    "this instance ({}) is not the coordination leader; run the switchover on the leader, {leader}{}",
                    c.me(),
                    addr.map(|a| format!(" (admin HTTP {a})")).unwrap_or_default()
                ),
            ));
        }
    }
    let login_timeout = Duration::from_secs(5);
    let mut old_conn = control
        .connect(&old, login_timeout)
        .await
        .map_err(|e| fail("check", e))?;
    let mut new_conn = control
        .connect(&new, login_timeout)
        .await
        .map_err(|e| fail("check", e))?;
    mark("check", &mut steps);
    info!(cluster = %cluster, from = %old.name, to = %new.name, "switchover started");

    // 2. hold
    let held_at = Instant::now();
    ctx.set_paused(true);
    let hold = Hold(ctx);
    let remote = match &coord {
        Some(c) => Some(c.request_hold(cluster).await.map_err(|e| fail("hold", e))?),
        None => None,
    };
    loop {
        // PostgreSQL: transaction-mode pools only (a session-mode client holds its
        // server for good and is moved by eviction once the primary changes).
        let busy: u32 = match ctx.engine {
            Engine::Postgresql => crate::pg::PgShared::of(shared)
                .pools
                .all()
                .iter()
                .filter(|p| p.key.cluster == cluster && p.key.node == old.name)
                .map(|p| p.in_use())
                .sum(),
            // Session pooling: rw sessions in a transaction or with an answer owed
            // (the others are held at their next command).
            Engine::Mysql => crate::mysql::ClusterInfo::of(ctx)
                .unsettled
                .load(std::sync::atomic::Ordering::Relaxed),
        };
        let waiting_for = match (&coord, &remote) {
            (Some(c), Some(r)) => c.not_held(cluster, r.epoch),
            _ => Vec::new(),
        };
        if busy == 0 && waiting_for.is_empty() {
            break;
        }
        if busy == 0 && left("hold").is_err() {
            return Err(fail(
                "hold",
                format!(
                    "Switchyard instance(s) {} did not confirm the hold in time",
                    waiting_for.join(", ")
                ),
            ));
        }
        if left("hold").is_err() {
            return Err(fail(
                "hold",
                format!("{busy} transaction(s) on \"{}\" still open when switchover_timeout_ms ran out (a client pinned to its connection holds one for good)", old.name),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mark("hold", &mut steps);

    // 3. fence
    let fenced_at = match tokio::time::timeout(left("fence")?, control.fence(&mut old_conn)).await {
        Ok(Ok(mark)) => mark,
        Ok(Err(e)) => {
            unfence(ctx, control, &old.name, &mut old_conn).await;
            return Err(fail("fence", e));
        }
        Err(_) => {
            unfence(ctx, control, &old.name, &mut old_conn).await;
            return Err(fail("fence", "the old primary did not answer"));
        }
    };
    // Routing no longer takes it as the primary, whatever the split-brain rule.
    ctx.set_fenced(&old.name, true);
    mark("fence", &mut steps);

    // 4. catch up
    let d = left("catch up")?;
    let caught_up = tokio::time::timeout(d, control.wait_applied(&mut new_conn, &fenced_at, d)).await;
    if !matches!(caught_up, Ok(Ok(true))) {
        unfence(ctx, control, &old.name, &mut old_conn).await;
        let why = match caught_up {
            Ok(Err(e)) => format!(": {e}"),
            _ => String::new(),
        };
        return Err(fail(
            "catch up",
            format!(
                "\"{}\" did not apply the old primary's last position ({}) in time{why}",
                new.name, fenced_at.0
            ),
        ));
    }
    mark("catch up", &mut steps);

    // 5. repoint the other standbys at the target (best effort: a failure is reported,
    // not fatal). PostgreSQL: before it is promoted, so they cascade from it and follow
    // its timeline switch; not undone if the promotion fails (they then cascade from
    // the target, which still streams from the old primary). MySQL: after, as in a
    // failover (a replica starts only from GTIDs its source's binary log holds).
    let before = ctx.engine == Engine::Postgresql;
    let bound = login_timeout.min(left("repoint")?);
    if before {
        repoint_standbys(cluster, control, &snap, &[p, target], &new, bound).await;
    }
    mark("repoint", &mut steps);

    // 6. promote: from here on there is no going back.
    control
        .promote(&mut new_conn, &new.name, left("promote")?)
        .await
        .map_err(|e| fail("promote", e))?;
    mark("promote", &mut steps);
    if !before {
        let bound = login_timeout.min(left("promote")?);
        repoint_standbys(cluster, control, &snap, &[p, target], &new, bound).await;
    }

    // 7. route: publish it (coordination), check the new primary now (as the monitor would at its next tick), then
    // wait until routing picks it.
    if let Some(c) = &coord {
        c.publish(ctx, &new.name).await.map_err(|e| fail("route", e))?;
    }
    let asked = std::time::Instant::now();
    if let Ok(Ok(obs)) = tokio::time::timeout(left("route")?, control.observe(&mut new_conn)).await {
        ctx.state
            .record_from(&new.name, Ok(obs), asked, config.health.rise, config.health.fall);
    }
    let mut rx = ctx.state.subscribe();
    loop {
        let snap = rx.borrow_and_update().clone();
        if routing::write_primary(&snap).ok() == snap.index(&new.name) {
            break;
        }
        let d = left("route")?;
        if tokio::time::timeout(d, rx.changed()).await.is_err() {
            return Err(fail(
                "route",
                format!("the health monitor did not see \"{}\" as primary in time", new.name),
            ));
        }
    }
    mark("route", &mut steps);

    // 8. release (everywhere: the other instances resume once the hold key is gone)
    drop(remote);
    drop(hold);
    let hold_ms = held_at.elapsed().as_millis() as u64;
    mark("release", &mut steps);
    ctx.state.push_event(
        &new.name,
        format!("standby (primary was {})", old.name),
        "primary".into(),
        "switchover".into(),
    );
    ctx.ha.promoted(&format!("switchover {} -> {}", old.name, new.name));
    shared.metrics.promoted(cluster, "switchover");
    // The old primary, read-only now: MySQL rejoins it as a replica of the new one
    // (its history ends where the target caught up); PostgreSQL needs pg_rewind or a
    // restart as a standby on its host (`demote_command`).
    let reclaimed = async {
        if before {
            return Ok(Ok(Reclaim::Fenced));
        }
        tokio::time::timeout(
            login_timeout,
            control.reclaim(&mut old_conn, &new, login_timeout, false),
        )
        .await
    };
    let rejoined = match reclaimed.await {
        Ok(Ok(Reclaim::Rejoined | Reclaim::Standby)) => {
            ctx.ha.remark(
                &old.name,
                Some(format!("rejoined as a replica of {} (switchover)", new.name)),
            );
            true
        }
        Ok(Ok(Reclaim::Diverged(extra))) => {
            ctx.ha.remark(
                &old.name,
                Some(format!("diverged: has transactions {} lacks ({extra})", new.name)),
            );
            false
        }
        Ok(Ok(Reclaim::NotRejoined(why))) => {
            ctx.ha.remark(&old.name, Some(format!("fenced, not rejoined: {why}")));
            false
        }
        Ok(Ok(Reclaim::Fenced)) => false,
        Ok(Err(e)) => {
            ctx.ha.remark(&old.name, Some(format!("fenced, not rejoined: {e}")));
            false
        }
        Err(_) => false,
    };
    if rejoined {
        info!(cluster = %cluster, from = %old.name, to = %new.name, hold_ms, "switchover done; the old primary replicates from the new one");
    } else {
        info!(cluster = %cluster, from = %old.name, to = %new.name, hold_ms, "switchover done; the old primary is read-only until it is made a standby of the new one");
    }
    demote(cc.demote_command.clone(), cluster, &old, &new);
    Ok(SwitchoverReport {
        cluster: cluster.to_string(),
        from: old.name,
        to: new.name,
        hold_ms,
        steps,
    })
}

/// Undo the fence when the switchover gives up before promoting.
async fn unfence<C: Control>(ctx: &ClusterCtx, control: &C, node: &str, c: &mut C::Conn) {
    ctx.set_fenced(node, false);
    let _ = control.unfence(c).await;
}
