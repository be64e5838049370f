//! The coordination's loop: every `POLL`, one round against etcd (renew the lease,
//! register, try to become leader, read every key, write this instance's seen epochs,
//! down-lists and hold acknowledgements; the leader's duties: publish, withdraw); and
//! the lease watchdog, which stops this instance's writes two polls before its lease
//! could have lapsed in etcd, however long etcd calls take.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::cluster::routing;
use crate::cluster::topology::Health;
use crate::ha::etcd::{Compare, EtcdError, Op};
use crate::proxy::shared::Shared;

use super::*;

/// Independent of how long an etcd call takes (a black-holed member costs a whole
/// timeout per endpoint): writes stop two polls before the lease could lapse in etcd.
pub(super) async fn watchdog(shared: Arc<Shared>, coord: Arc<Coordinator>, lease_ttl: Duration) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL / 2) => {}
            _ = shutdown.changed() => return,
        }
        let lapsing = coord.lapsing(lease_ttl);
        let view = {
            let mut v = coord.view.lock().unwrap();
            if !lapsing || v.cut_off.is_some() {
                continue;
            }
            let why = format!(
                "out of touch with etcd: its lease ({} s) was not renewed, or etcd not read, in time",
                lease_ttl.as_secs()
            );
            warn!(instance = %coord.me(), "{why}; writes stop through this instance, reads go on");
            v.cut_off = Some(why);
            v.clone()
        };
        for ctx in shared.clusters().values() {
            apply(ctx, &view, false);
        }
    }
}

/// What this instance wrote last (rewritten after a new lease).
#[derive(Default)]
struct Written {
    down: BTreeMap<String, String>,
    held: BTreeMap<String, u64>,
    seen: BTreeMap<String, u64>,
    /// Per cluster: the withdrawal epoch the leader waits on, and since when.
    withdrawn: BTreeMap<String, (u64, Instant)>,
    /// Waits already logged (cluster, epoch).
    told_waiting: std::collections::BTreeSet<(String, u64)>,
    /// Clusters this instance paused for another instance's switchover.
    holding: BTreeMap<String, u64>,
}

pub(super) async fn run(shared: Arc<Shared>, coord: Arc<Coordinator>, lease_ttl: Duration) {
    let mut shutdown = shared.shutdown.clone();
    let mut last_ok: Option<Instant> = None;
    let mut written = Written::default();
    let mut last_error = String::new();
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => {
                let lease = *coord.lease.lock().unwrap();
                if lease != 0 {
                    // Leave at once rather than after the lease: another instance takes
                    // over the leadership without waiting.
                    let _ = coord.etcd.revoke(lease).await;
                }
                return;
            }
        }
        let reading = Instant::now();
        match round(&shared, &coord, lease_ttl, &mut written).await {
            Ok(view) => {
                *coord.read.lock().unwrap() = Some(reading);
                if last_ok.is_none() || coord.view().cut_off.is_some() {
                    info!(instance = %coord.me(), leader = ?view.leader, instances = ?view.instances.keys().collect::<Vec<_>>(), "in touch with etcd");
                }
                last_ok = Some(Instant::now());
                last_error.clear();
                *coord.view.lock().unwrap() = view;
            }
            Err(e) => {
                let e = e.to_string();
                let since = last_ok.unwrap_or(started);
                // Stop before the lease can have lapsed in etcd (another instance may
                // then lead and move the primary), with a margin of two polls.
                if coord.lapsing(lease_ttl) {
                    let why = format!(
                        "out of touch with etcd for {:.1} s, as long as its lease ({} s): {e}",
                        since.elapsed().as_secs_f64(),
                        lease_ttl.as_secs()
                    );
                    let mut v = coord.view.lock().unwrap();
                    if v.cut_off.is_none() || last_ok.is_none() && last_error.is_empty() {
                        warn!(instance = %coord.me(), "{why}; writes stop through this instance, reads go on");
                    }
                    v.cut_off = Some(why);
                } else if last_error.is_empty() {
                    warn!(instance = %coord.me(), reason = %e, "etcd did not answer; retrying");
                }
                last_error = e;
            }
        }
        let view = coord.view();
        for ctx in shared.clusters().values() {
            apply(ctx, &view, false);
        }
        if view.cut_off.is_some() {
            continue;
        }
        if let Err(e) = duties(&shared, &coord, &view, &mut written).await {
            warn!(instance = %coord.me(), reason = %e, "coordination step failed; retrying");
        }
    }
}

/// Renew or take a lease, stand for leader, read everything.
async fn round(shared: &Shared, coord: &Coordinator, ttl: Duration, written: &mut Written) -> Result<View, EtcdError> {
    let mut lease = *coord.lease.lock().unwrap();
    let renewed = *coord.renewed.lock().unwrap();
    if lease != 0 && renewed.is_none_or(|r| r.elapsed() >= ttl / 3) {
        // etcd counts the lease from when it handled the renewal: at the latest when
        // the request started, on our clock.
        let asked = Instant::now();
        if coord.etcd.keep_alive(lease).await? {
            *coord.renewed.lock().unwrap() = Some(asked);
        } else {
            warn!(instance = %coord.me(), "lease expired; registering again");
            lease = 0;
        }
    }
    if lease == 0 {
        let asked = Instant::now();
        lease = coord.etcd.grant(ttl).await?;
        *coord.renewed.lock().unwrap() = Some(asked);
        *written = Written {
            holding: std::mem::take(&mut written.holding),
            ..Written::default()
        };
        let admin = shared.config().admin.http_listen.clone().unwrap_or_default();
        coord
            .etcd
            .put(&coord.key(&format!("instances/{}", coord.me())), &admin, lease)
            .await?;
        *coord.lease.lock().unwrap() = lease;
    }
    let leader_key = coord.key("leader");
    coord
        .etcd
        .txn(
            &[Compare::Absent(&leader_key)],
            &[Op::Put {
                key: &leader_key,
                value: &coord.me(),
                lease,
            }],
        )
        .await?;
    let prefix = coord.key("");
    let (kvs, _) = coord.etcd.range(&prefix).await?;
    let mut view = View::default();
    for kv in kvs {
        let rest = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["leader"] => view.leader = Some(kv.value.clone()),
            ["instances", name] => {
                view.instances.insert(name.to_string(), kv.value.clone());
            }
            ["clusters", c, "primary"] => {
                let v: serde_json::Value = serde_json::from_str(&kv.value).unwrap_or_default();
                let cv = view.clusters.entry(c.to_string()).or_default();
                cv.published = v["node"].as_str().map(str::to_string);
                cv.epoch = v["epoch"].as_u64().unwrap_or(0);
                cv.revision = kv.mod_revision;
            }
            ["clusters", c, "down", name] => {
                let nodes = kv
                    .value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                view.clusters
                    .entry(c.to_string())
                    .or_default()
                    .down
                    .insert(name.to_string(), nodes);
            }
            ["clusters", c, "hold"] => {
                let v: serde_json::Value = serde_json::from_str(&kv.value).unwrap_or_default();
                view.clusters.entry(c.to_string()).or_default().hold = Some((
                    v["epoch"].as_u64().unwrap_or(0),
                    v["by"].as_str().unwrap_or("").to_string(),
                ));
            }
            ["clusters", c, "seen", name] => {
                view.clusters
                    .entry(c.to_string())
                    .or_default()
                    .seen
                    .insert(name.to_string(), kv.value.parse().unwrap_or(0));
            }
            ["clusters", c, "held", name] => {
                view.clusters
                    .entry(c.to_string())
                    .or_default()
                    .held
                    .insert(name.to_string(), kv.value.parse().unwrap_or(0));
            }
            _ => {}
        }
    }
    Ok(view)
}

/// Per cluster: report what this instance sees down, follow another instance's hold,
/// and, as the leader, publish the primary.
async fn duties(shared: &Shared, coord: &Coordinator, view: &View, written: &mut Written) -> Result<(), EtcdError> {
    let lease = *coord.lease.lock().unwrap();
    let leader = view.leader.as_deref() == Some(&*coord.me());
    for ctx in shared.clusters().values() {
        let snap = ctx.state.snapshot();
        let cv = view.clusters.get(&*ctx.name).cloned().unwrap_or_default();

        let down: Vec<&str> = snap
            .nodes
            .iter()
            .filter(|n| n.health == Health::Down)
            .map(|n| n.name.as_str())
            .collect();
        let down = down.join(",");
        // The view was applied before these duties: this instance routes by `epoch` now
        // (confirmed first: nothing else here may keep a withdrawal waiting).
        if written.seen.get(&*ctx.name) != Some(&cv.epoch) {
            let key = coord.key(&format!("clusters/{}/seen/{}", ctx.name, coord.me()));
            coord.etcd.put(&key, &cv.epoch.to_string(), lease).await?;
            written.seen.insert(ctx.name.to_string(), cv.epoch);
        }
        if written.down.get(&*ctx.name) != Some(&down) {
            let key = coord.key(&format!("clusters/{}/down/{}", ctx.name, coord.me()));
            coord.etcd.put(&key, &down, lease).await?;
            written.down.insert(ctx.name.to_string(), down);
        }

        match &cv.hold {
            Some((epoch, by)) if **by != *coord.me() => {
                if written.holding.get(&*ctx.name) != Some(epoch) {
                    info!(cluster = %ctx.name, leader = %by, "holding new transactions for the leader's switchover");
                    ctx.set_paused(true);
                    written.holding.insert(ctx.name.to_string(), *epoch);
                }
                // Acknowledge once no transaction is open on the published primary.
                let busy: u32 = match ctx.engine {
                    crate::config::Engine::Postgresql => crate::pg::PgShared::of(shared)
                        .pools
                        .all()
                        .iter()
                        .filter(|p| *p.key.cluster == *ctx.name && Some(&p.key.node) == cv.published.as_ref())
                        .map(|p| p.in_use())
                        .sum(),
                    crate::config::Engine::Mysql => crate::mysql::ClusterInfo::of(ctx)
                        .unsettled
                        .load(std::sync::atomic::Ordering::Relaxed),
                };
                if busy == 0 && written.held.get(&*ctx.name) != Some(epoch) {
                    let key = coord.key(&format!("clusters/{}/held/{}", ctx.name, coord.me()));
                    coord.etcd.put(&key, &epoch.to_string(), lease).await?;
                    written.held.insert(ctx.name.to_string(), *epoch);
                }
            }
            _ => {
                if written.holding.remove(&*ctx.name).is_some() {
                    info!(cluster = %ctx.name, "the leader's hold is over; releasing held transactions");
                    ctx.set_paused(false);
                }
            }
        }

        // A running switchover or failover publishes by itself (it withdraws, waits and
        // publishes in its own order); acting on what it is in the middle of would
        // undo its compare-and-swap.
        let ha_running = ctx.ha.lock.try_lock().is_err();
        if leader && !ha_running {
            if let Ok(p) = routing::primary(&snap) {
                let observed = &snap.nodes[p].name;
                let mut next = next_publication(&snap, view, &ctx.name, observed);
                if next == Some(Publication::Wait) {
                    // Bounded by a lease: an instance that has not confirmed by then has
                    // stopped routing writes by itself (`lapsing`).
                    let since = *written
                        .withdrawn
                        .entry(ctx.name.to_string())
                        .and_modify(|(e, t)| {
                            if *e != cv.epoch {
                                *e = cv.epoch;
                                *t = Instant::now();
                            }
                        })
                        .or_insert((cv.epoch, Instant::now()));
                    let late: Vec<&String> = view
                        .instances
                        .keys()
                        .filter(|i| cv.seen.get(*i).is_none_or(|&e| e < cv.epoch))
                        .collect();
                    if since.1.elapsed() >= Duration::from_secs(coord.cfg.lease_s) {
                        warn!(cluster = %ctx.name, node = %observed, epoch = cv.epoch, late = ?late, "instances did not confirm the withdrawal within a lease (they route no writes); publishing");
                        next = Some(Publication::Publish);
                    } else if written.told_waiting.insert((ctx.name.to_string(), cv.epoch)) {
                        info!(cluster = %ctx.name, node = %observed, epoch = cv.epoch, late = ?late, "waiting for every instance to confirm the withdrawal before publishing");
                    }
                }
                let step = match next {
                    Some(Publication::Withdraw) => coord.withdraw(ctx).await,
                    Some(Publication::Publish) => coord.publish(ctx, observed).await,
                    Some(Publication::Wait) | None => Ok(0),
                };
                if let Err(e) = step {
                    warn!(cluster = %ctx.name, node = %observed, reason = %e, "could not publish the primary");
                }
            }
        }
    }
    Ok(())
}
