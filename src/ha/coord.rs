//! Several Switchyard instances, one truth (`[coordination]`): agreement through etcd,
//! never through a consensus of our own.
//!
//! Keys, under `prefix`:
//! - `instances/<name>`: each live instance, on its lease (the set of live instances);
//! - `leader`: the instance that decides switchovers, failovers and publications,
//!   elected by a create-if-absent transaction on its lease (it lapses with the lease);
//! - `clusters/<c>/primary`: `{"node": …, "epoch": n}`, written by the leader only, with
//!   compare-and-swap on the key's revision; every instance sends writes only to this
//!   node, and only while that node also reports primary on its own connection
//!   (`routing::write_primary`);
//! - `clusters/<c>/seen/<name>`: the last epoch each instance applied (an automatic
//!   failover, or the leader replacing a primary it no longer sees, first withdraws
//!   the old primary by publishing no node, and promotes or publishes only once every
//!   live instance has seen that; a switchover publishes directly, behind its hold);
//! - `clusters/<c>/down/<name>`: the nodes each instance's health rules call down (the
//!   leader fails over only when a majority of live instances agree);
//! - `clusters/<c>/hold` and `clusters/<c>/held/<name>`: a switchover's hold, requested by
//!   the leader and acknowledged by every instance once its transactions on the old
//!   primary are over.
//!
//! An instance out of touch with etcd for longer than its lease stops routing writes
//! (reads go on): by then another instance may be leader and may have moved the primary.
//! A single instance with no `[coordination]` runs none of this.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::cluster::routing;
use crate::cluster::topology::{ClusterSnapshot, Coordination, Health, Role};
use crate::cluster::ClusterCtx;
use crate::config::CoordinationConfig;
use crate::ha::etcd::{Compare, Etcd, EtcdError, Op};
use crate::proxy::shared::Shared;

/// How often each instance reads the shared state (and renews its keys).
const POLL: Duration = Duration::from_millis(100);

/// What this instance last read from etcd.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub leader: Option<String>,
    /// Live instances (name → admin HTTP address, possibly empty).
    pub instances: BTreeMap<String, String>,
    /// Why this instance must not route writes (out of touch with etcd), if so.
    pub cut_off: Option<String>,
    pub clusters: BTreeMap<String, ClusterView>,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub published: Option<String>,
    pub epoch: u64,
    /// Revision of the primary key (0: absent), for compare-and-swap.
    pub revision: i64,
    /// Instance → the nodes its health rules call down.
    pub down: BTreeMap<String, Vec<String>>,
    /// A switchover's hold: (epoch it was asked at, by whom).
    pub hold: Option<(u64, String)>,
    /// Instance → the hold epoch it acknowledged.
    pub held: BTreeMap<String, u64>,
    /// Instance → the last epoch it applied.
    pub seen: BTreeMap<String, u64>,
}

pub struct Coordinator {
    pub cfg: CoordinationConfig,
    etcd: Etcd,
    view: Mutex<View>,
    /// The current lease (0: none).
    lease: Mutex<i64>,
    /// When the lease was last granted or renewed (the request's start, on our clock:
    /// etcd counts from no earlier). The watchdog stops writes before it can lapse.
    renewed: Mutex<Option<Instant>>,
    /// When the last successful read of the shared state started: the view is at least
    /// that fresh. The watchdog also stops writes when it is a lease old (an instance
    /// that renews its lease but cannot read would otherwise route by a stale view,
    /// and an automatic failover counts on every instance having stopped by then).
    read: Mutex<Option<Instant>>,
}

/// The proxy's coordinator, when `[coordination]` is configured (set once at start;
/// changing `[coordination]` needs a restart).
pub fn get(shared: &Shared) -> Option<Arc<Coordinator>> {
    shared.coordinator.get().cloned().and_then(|c| c.downcast().ok())
}

/// Does the failover of `old` have the agreement it needs? Pure: `me`, the view.
pub fn failover_gate(view: &View, me: &str, cluster: &str, old: &str) -> Result<(), String> {
    if view.cut_off.is_some() || view.leader.as_deref() != Some(me) {
        return Err(format!(
            "primary {old} is down; the leader ({}) decides the failover",
            view.leader.as_deref().unwrap_or("none elected")
        ));
    }
    let live = view.instances.len().max(1);
    let need = live / 2 + 1;
    let c = view.clusters.get(cluster);
    let agree = view
        .instances
        .keys()
        .filter(|i| {
            c.and_then(|c| c.down.get(*i))
                .is_some_and(|d| d.iter().any(|n| n == old))
        })
        .count();
    if agree < need {
        return Err(format!(
            "primary {old} is down for {agree} of {live} live Switchyard instance(s); a failover needs {need}"
        ));
    }
    Ok(())
}

/// Should the leader publish `observed` (the primary its own checks pick) in place of
/// what is published? Only when what is published is no longer a current primary there.
pub fn should_publish(snap: &ClusterSnapshot, published: Option<&str>, observed: &str) -> bool {
    match published {
        None => true,
        Some(p) if p == observed => false,
        Some(p) => !snap.index(p).is_some_and(|i| {
            let n = &snap.nodes[i];
            n.health == Health::Up
                && n.role == Role::Primary
                && !n.fenced
                && n.timeline.is_none_or(|t| t >= snap.newest_timeline)
        }),
    }
}

/// The leader's next step toward publishing `observed` (the primary its own checks
/// pick), given what it read from etcd.
#[derive(Debug, PartialEq, Eq)]
pub enum Publication {
    /// Another node is published and no longer a current primary: publish no node first.
    Withdraw,
    /// Publish `observed`: nothing was published, or the withdrawal was applied by every
    /// live instance.
    Publish,
    Wait,
}

/// Replacing one published primary by another goes through "no primary": the new one
/// is published only once every live instance (this one included) has applied the
/// withdrawal, so none still writes to the old one when the new one takes writes (an
/// instance reads etcd every `POLL`; the leader acts on its own publication at once).
pub fn next_publication(snap: &ClusterSnapshot, view: &View, cluster: &str, observed: &str) -> Option<Publication> {
    let cv = view.clusters.get(cluster).cloned().unwrap_or_default();
    if !should_publish(snap, cv.published.as_deref(), observed) {
        return None;
    }
    Some(match cv.published {
        Some(_) => Publication::Withdraw,
        None if cv.epoch == 0 => Publication::Publish,
        None if view
            .instances
            .keys()
            .all(|i| cv.seen.get(i).is_some_and(|&e| e >= cv.epoch)) =>
        {
            Publication::Publish
        }
        None => Publication::Wait,
    })
}

impl Coordinator {
    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.cfg.prefix.trim_end_matches('/'))
    }

    pub fn me(&self) -> &str {
        &self.cfg.instance
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap().clone()
    }

    /// Must writes stop (two polls before the lease could lapse in etcd, or before the
    /// view is a lease old)?
    fn lapsing(&self, lease_ttl: Duration) -> bool {
        let stale = |t: Option<Instant>| t.is_none_or(|t| t.elapsed() + 2 * POLL >= lease_ttl);
        stale(*self.renewed.lock().unwrap()) || stale(*self.read.lock().unwrap())
    }

    pub fn is_leader(&self) -> bool {
        let v = self.view.lock().unwrap();
        v.cut_off.is_none() && v.leader.as_deref() == Some(self.me())
    }

    /// Publish `node` as the primary of `cluster` (compare-and-swap on what this instance
    /// last read); the new epoch.
    pub async fn publish(&self, ctx: &ClusterCtx, node: &str) -> Result<u64, String> {
        self.put_primary(ctx, Some(node)).await
    }

    /// Publish that `cluster` has no primary (a new epoch with no node): every instance
    /// stops routing writes when it reads it. An automatic failover does this before
    /// it promotes, and waits for `wait_seen`.
    pub async fn withdraw(&self, ctx: &ClusterCtx) -> Result<u64, String> {
        self.put_primary(ctx, None).await
    }

    async fn put_primary(&self, ctx: &ClusterCtx, node: Option<&str>) -> Result<u64, String> {
        let cv = self.view().clusters.get(&ctx.name).cloned().unwrap_or_default();
        if node.is_some() && cv.published.as_deref() == node {
            return Ok(cv.epoch);
        }
        let key = self.key(&format!("clusters/{}/primary", ctx.name));
        let epoch = cv.epoch + 1;
        let value = json!({"node": node, "epoch": epoch}).to_string();
        let cmp = if cv.revision == 0 {
            Compare::Absent(&key)
        } else {
            Compare::ModRevision(&key, cv.revision)
        };
        let done = self
            .etcd
            .txn(
                &[cmp, Compare::ValueIs(&self.key("leader"), self.me())],
                &[Op::Put {
                    key: &key,
                    value: &value,
                    lease: 0,
                }],
            )
            .await
            .map_err(|e| e.to_string())?;
        if !done {
            return Err("the published primary changed meanwhile, or this instance is no longer the leader".into());
        }
        {
            let mut v = self.view.lock().unwrap();
            let c = v.clusters.entry(ctx.name.clone()).or_default();
            c.published = node.map(str::to_string);
            c.epoch = epoch;
        }
        apply(ctx, &self.view(), true);
        match node {
            Some(node) => info!(cluster = %ctx.name, node = %node, epoch, "published the primary"),
            None => info!(cluster = %ctx.name, epoch, "published: no primary (writes stop on every instance)"),
        }
        Ok(epoch)
    }

    /// Wait up to `within` until every other live instance has applied `epoch`, and
    /// this instance has read it back (so that the next compare-and-swap sees its
    /// revision). An instance that has not confirmed after a whole lease has not read
    /// etcd for that long (or could read but not write), and has stopped routing writes
    /// on its own (`lapsing`).
    pub async fn wait_seen(&self, cluster: &str, epoch: u64, within: Duration) -> Seen {
        let deadline = Instant::now() + within;
        loop {
            let v = self.view();
            let cv = v.clusters.get(cluster).cloned().unwrap_or_default();
            let seen = Seen {
                late: v
                    .instances
                    .keys()
                    .filter(|i| *i != self.me() && cv.seen.get(*i).is_none_or(|&e| e < epoch))
                    .cloned()
                    .collect(),
                read_back: cv.seen.get(self.me()).is_some_and(|&e| e >= epoch),
            };
            if (seen.late.is_empty() && seen.read_back) || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(POLL / 2).await;
        }
    }

    /// Ask every instance to hold new transactions on `cluster` (a switchover); the
    /// returned guard withdraws the request when dropped.
    pub async fn request_hold(self: &Arc<Self>, cluster: &str) -> Result<HoldRequest, String> {
        let lease = *self.lease.lock().unwrap();
        let epoch = self.view().clusters.get(cluster).map_or(0, |c| c.epoch);
        let key = self.key(&format!("clusters/{cluster}/hold"));
        self.etcd
            .put(&key, &json!({"epoch": epoch, "by": self.me()}).to_string(), lease)
            .await
            .map_err(|e| e.to_string())?;
        Ok(HoldRequest {
            coord: self.clone(),
            key,
            epoch,
        })
    }

    /// The live instances (other than this one) that have not acknowledged hold `epoch`.
    pub fn not_held(&self, cluster: &str, epoch: u64) -> Vec<String> {
        let v = self.view();
        let held = v.clusters.get(cluster).map(|c| c.held.clone()).unwrap_or_default();
        v.instances
            .keys()
            .filter(|i| *i != self.me() && held.get(*i) != Some(&epoch))
            .cloned()
            .collect()
    }
}

/// What `wait_seen` found.
#[derive(Debug)]
pub struct Seen {
    /// Live instances that did not confirm the epoch.
    pub late: Vec<String>,
    /// This instance read the epoch back from etcd.
    pub read_back: bool,
}

/// A switchover's hold request, withdrawn when dropped.
pub struct HoldRequest {
    coord: Arc<Coordinator>,
    key: String,
    pub epoch: u64,
}

impl Drop for HoldRequest {
    fn drop(&mut self) {
        let (etcd, key) = (self.coord.etcd.clone(), self.key.clone());
        tokio::spawn(async move {
            let _ = etcd.txn(&[], &[Op::Delete(&key)]).await;
        });
    }
}

/// Put the agreed state into the cluster's snapshot (routing reads it from there).
fn apply(ctx: &ClusterCtx, view: &View, notify_always: bool) {
    let c = view.clusters.get(&ctx.name);
    let agreed = Coordination {
        published: c.and_then(|c| c.published.clone()),
        epoch: c.map_or(0, |c| c.epoch),
        cut_off: view.cut_off.clone(),
    };
    ctx.state.update(|snap| {
        if snap.coordination.as_ref() == Some(&agreed) {
            return notify_always;
        }
        snap.coordination = Some(agreed);
        true
    });
}

/// Start coordinating: until etcd has been read once, no writes are routed.
pub fn spawn(shared: Arc<Shared>, cfg: CoordinationConfig) -> JoinHandle<()> {
    let lease_ttl = Duration::from_secs(cfg.lease_s);
    let coord = Arc::new(Coordinator {
        etcd: Etcd::new(&cfg.etcd, (lease_ttl / 3).min(Duration::from_secs(1))),
        cfg,
        view: Mutex::new(View {
            cut_off: Some("not yet in touch with etcd".into()),
            ..View::default()
        }),
        lease: Mutex::new(0),
        renewed: Mutex::new(None),
        read: Mutex::new(None),
    });
    let _ = shared.coordinator.set(coord.clone());
    for ctx in shared.clusters.values() {
        apply(ctx, &coord.view(), true);
    }
    tokio::spawn(watchdog(shared.clone(), coord.clone(), lease_ttl));
    tokio::spawn(run(shared, coord, lease_ttl))
}

/// Independent of how long an etcd call takes (a black-holed member costs a whole
/// timeout per endpoint): writes stop two polls before the lease could lapse in etcd.
async fn watchdog(shared: Arc<Shared>, coord: Arc<Coordinator>, lease_ttl: Duration) {
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
        for ctx in shared.clusters.values() {
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

async fn run(shared: Arc<Shared>, coord: Arc<Coordinator>, lease_ttl: Duration) {
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
        for ctx in shared.clusters.values() {
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
                value: coord.me(),
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
    let leader = view.leader.as_deref() == Some(coord.me());
    for ctx in shared.clusters.values() {
        let snap = ctx.state.snapshot();
        let cv = view.clusters.get(&ctx.name).cloned().unwrap_or_default();

        let down: Vec<&str> = snap
            .nodes
            .iter()
            .filter(|n| n.health == Health::Down)
            .map(|n| n.name.as_str())
            .collect();
        let down = down.join(",");
        // The view was applied before these duties: this instance routes by `epoch` now
        // (confirmed first: nothing else here may keep a withdrawal waiting).
        if written.seen.get(&ctx.name) != Some(&cv.epoch) {
            let key = coord.key(&format!("clusters/{}/seen/{}", ctx.name, coord.me()));
            coord.etcd.put(&key, &cv.epoch.to_string(), lease).await?;
            written.seen.insert(ctx.name.clone(), cv.epoch);
        }
        if written.down.get(&ctx.name) != Some(&down) {
            let key = coord.key(&format!("clusters/{}/down/{}", ctx.name, coord.me()));
            coord.etcd.put(&key, &down, lease).await?;
            written.down.insert(ctx.name.clone(), down);
        }

        match &cv.hold {
            Some((epoch, by)) if by != coord.me() => {
                if written.holding.get(&ctx.name) != Some(epoch) {
                    info!(cluster = %ctx.name, leader = %by, "holding new transactions for the leader's switchover");
                    ctx.set_paused(true);
                    written.holding.insert(ctx.name.clone(), *epoch);
                }
                // Acknowledge once no transaction is open on the published primary.
                let busy: u32 = crate::pg::PgShared::of(shared)
                    .pools
                    .all()
                    .iter()
                    .filter(|p| p.key.cluster == ctx.name && Some(&p.key.node) == cv.published.as_ref())
                    .map(|p| p.in_use())
                    .sum();
                if busy == 0 && written.held.get(&ctx.name) != Some(epoch) {
                    let key = coord.key(&format!("clusters/{}/held/{}", ctx.name, coord.me()));
                    coord.etcd.put(&key, &epoch.to_string(), lease).await?;
                    written.held.insert(ctx.name.clone(), *epoch);
                }
            }
            _ => {
                if written.holding.remove(&ctx.name).is_some() {
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
                        .entry(ctx.name.clone())
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
                    } else if written.told_waiting.insert((ctx.name.clone(), cv.epoch)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::topology::{NodeState, Observation, Policy};

    #[test]
    fn the_leader_publishes_only_when_the_published_primary_is_no_longer_one() {
        let mut nodes = vec![NodeState::new("default", "h:1"), NodeState::new("failover1", "h:2")];
        let seen = |role, tli| Observation {
            role,
            lag_ms: 0,
            lsn: None,
            timeline: Some(tli),
            streaming: None,
            system_id: None,
        };
        let t = std::time::SystemTime::now();
        nodes[0].apply(Ok(seen(Role::Primary, 1)), 1, 1, t);
        nodes[1].apply(Ok(seen(Role::Standby, 1)), 1, 1, t);
        let policy = Policy {
            max_replica_lag_ms: 1000,
            read_balance: crate::config::ReadBalance::Priority,
            split_brain: crate::config::SplitBrainRule::NewestTimeline,
        };
        let mut snap = ClusterSnapshot::new("main", nodes, policy, Duration::from_secs(1));
        snap.newest_timeline = 1;
        assert!(should_publish(&snap, None, "default"));
        assert!(!should_publish(&snap, Some("default"), "default"));
        // failover1 promoted (timeline 2) while default still runs on timeline 1.
        snap.nodes[1].apply(Ok(seen(Role::Primary, 2)), 1, 1, t);
        snap.newest_timeline = 2;
        assert!(should_publish(&snap, Some("default"), "failover1"));
        // default down: likewise.
        snap.newest_timeline = 1;
        snap.nodes[0].apply(Err("refused".into()), 1, 1, t);
        assert!(should_publish(&snap, Some("default"), "failover1"));

        // Through "no primary", once every live instance applied it.
        let mut view = view("sy1", &["sy1", "sy2"], &[]);
        assert_eq!(
            next_publication(&snap, &view, "main", "failover1"),
            Some(Publication::Publish),
            "first publication"
        );
        let cv = view.clusters.entry("main".into()).or_default();
        cv.published = Some("default".into());
        cv.epoch = 1;
        assert_eq!(
            next_publication(&snap, &view, "main", "failover1"),
            Some(Publication::Withdraw)
        );
        let cv = view.clusters.get_mut("main").unwrap();
        cv.published = None;
        cv.epoch = 2;
        cv.seen = [("sy1".to_string(), 2), ("sy2".to_string(), 1)].into();
        assert_eq!(
            next_publication(&snap, &view, "main", "failover1"),
            Some(Publication::Wait),
            "sy2 may still write to default"
        );
        view.clusters.get_mut("main").unwrap().seen.insert("sy2".into(), 2);
        assert_eq!(
            next_publication(&snap, &view, "main", "failover1"),
            Some(Publication::Publish)
        );
        // sy2 gone (its lease lapsed): it no longer counts.
        view.clusters.get_mut("main").unwrap().seen.insert("sy2".into(), 1);
        view.instances.remove("sy2");
        assert_eq!(
            next_publication(&snap, &view, "main", "failover1"),
            Some(Publication::Publish)
        );
    }

    fn view(leader: &str, instances: &[&str], down: &[(&str, &str)]) -> View {
        let mut v = View {
            leader: Some(leader.into()),
            instances: instances.iter().map(|i| (i.to_string(), String::new())).collect(),
            ..View::default()
        };
        let c = v.clusters.entry("main".into()).or_default();
        for (i, nodes) in down {
            c.down
                .insert(i.to_string(), nodes.split(',').map(str::to_string).collect());
        }
        v
    }

    #[test]
    fn only_the_leader_fails_over_and_only_with_a_majority() {
        let v = view("sy1", &["sy1", "sy2"], &[("sy1", "default")]);
        let err = failover_gate(&v, "sy1", "main", "default").unwrap_err();
        assert!(err.contains("1 of 2") && err.contains("needs 2"), "{err}");
        let v = view(
            "sy1",
            &["sy1", "sy2"],
            &[("sy1", "default"), ("sy2", "default,failover2")],
        );
        assert_eq!(failover_gate(&v, "sy1", "main", "default"), Ok(()));
        let err = failover_gate(&v, "sy2", "main", "default").unwrap_err();
        assert!(err.contains("the leader (sy1) decides"), "{err}");
        // The other instance's lease lapsed: alone, it is its own majority.
        let v = view("sy1", &["sy1"], &[("sy1", "default")]);
        assert_eq!(failover_gate(&v, "sy1", "main", "default"), Ok(()));
        // Three instances: two suffice.
        let v = view("sy1", &["sy1", "sy2", "sy3"], &[("sy1", "default"), ("sy3", "default")]);
        assert_eq!(failover_gate(&v, "sy1", "main", "default"), Ok(()));
        // A leader cut off from etcd decides nothing.
        let mut v = view("sy1", &["sy1"], &[("sy1", "default")]);
        v.cut_off = Some("out of touch".into());
        assert!(failover_gate(&v, "sy1", "main", "default").is_err());
    }
}
