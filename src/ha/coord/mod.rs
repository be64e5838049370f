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
//!
//! Here: the `Coordinator` (the view, publication, the switchover hold) and `spawn`;
//! `round.rs`: the lease watchdog and the loop that reads and writes etcd each poll
//! (election, the leader's duties); `gates.rs`: the pure rules that decide (may this
//! instance fail over, what to publish next).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::info;

use crate::cluster::topology::Coordination;
use crate::cluster::ClusterCtx;
use crate::config::CoordinationConfig;
use crate::ha::etcd::{Compare, Etcd, Op};
use crate::proxy::shared::Shared;

mod gates;
mod round;

pub use gates::{failover_gate, next_publication, should_publish, Publication};

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
    /// The etcd members talked to now (`cfg.etcd` at start; a reload may change them).
    members: Mutex<Vec<String>>,
    /// This instance's name (`me`).
    me: Mutex<Arc<str>>,
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

impl Coordinator {
    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.cfg.prefix.trim_end_matches('/'))
    }

    /// This instance's name in etcd (`coordination.instance`; another once it stepped
    /// aside for a successor process).
    pub fn me(&self) -> Arc<str> {
        self.me.lock().unwrap().clone()
    }

    /// A binary upgrade's successor takes this instance's name: this process, which
    /// drains its remaining clients, goes on as another instance (`NAME.upgraded-PID`)
    /// under a new lease, so that it no longer leads nor speaks for the name, yet every
    /// epoch still waits for it while it routes. Its old lease is revoked at once: the
    /// leadership and the keys it held under the name are free for the successor.
    pub async fn step_aside(&self) {
        let lease = std::mem::take(&mut *self.lease.lock().unwrap());
        let name: Arc<str> = format!("{}.upgraded-{}", self.cfg.instance, std::process::id()).into();
        *self.me.lock().unwrap() = name.clone();
        if lease != 0 {
            if let Err(e) = self.etcd.revoke(lease).await {
                tracing::warn!(instance = %name, reason = %e, "could not revoke the lease before stepping aside; its keys lapse with it");
            }
        }
        tracing::info!(instance = %name, successor_takes = %self.cfg.instance, "upgrade: this process goes on as another coordination instance until it exits");
    }

    /// Apply a reloaded `[coordination]`: the etcd members change live; a new
    /// instance name, prefix or lease would make this a different member of the group,
    /// so those need a restart (or an upgrade). Returns what was done, or why not.
    pub fn reconfigure(&self, new: &CoordinationConfig) -> Result<Option<String>, String> {
        let identity = |c: &CoordinationConfig| (c.instance.clone(), c.prefix.clone(), c.lease_s);
        if identity(&self.cfg) != identity(new) {
            return Err("coordination.instance, prefix or lease_s changed: restart or upgrade (SIGUSR2) needed".into());
        }
        let mut current = self.members.lock().unwrap();
        if *current == new.etcd {
            return Ok(None);
        }
        self.etcd.set_endpoints(&new.etcd);
        let note = format!("coordination.etcd now {:?} (was {:?})", new.etcd, *current);
        *current = new.etcd.clone();
        Ok(Some(note))
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
        v.cut_off.is_none() && v.leader.as_deref() == Some(&*self.me())
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
        let cv = self.view().clusters.get(&*ctx.name).cloned().unwrap_or_default();
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
                &[cmp, Compare::ValueIs(&self.key("leader"), &self.me())],
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
            let c = v.clusters.entry(ctx.name.to_string()).or_default();
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
                    .filter(|i| **i != *self.me() && cv.seen.get(*i).is_none_or(|&e| e < epoch))
                    .cloned()
                    .collect(),
                read_back: cv.seen.get(&*self.me()).is_some_and(|&e| e >= epoch),
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
            .put(&key, &json!({"epoch": epoch, "by": &*self.me()}).to_string(), lease)
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
            .filter(|i| **i != *self.me() && held.get(*i) != Some(&epoch))
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
    let c = view.clusters.get(&*ctx.name);
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

/// A cluster a reload added: routed by the agreed state from the start, as the others
/// were at start (no writes until the leader has published its primary).
pub fn adopt(shared: &Shared, ctx: &ClusterCtx) {
    if let Some(coord) = get(shared) {
        apply(ctx, &coord.view(), true);
    }
}

/// Start coordinating: until etcd has been read once, no writes are routed.
pub fn spawn(shared: Arc<Shared>, cfg: CoordinationConfig) -> JoinHandle<()> {
    let lease_ttl = Duration::from_secs(cfg.lease_s);
    let coord = Arc::new(Coordinator {
        etcd: Etcd::new(&cfg.etcd, (lease_ttl / 3).min(Duration::from_secs(1))),
        members: Mutex::new(cfg.etcd.clone()),
        me: Mutex::new(cfg.instance.as_str().into()),
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
    for ctx in shared.clusters().values() {
        apply(ctx, &coord.view(), true);
    }
    tokio::spawn(round::watchdog(shared.clone(), coord.clone(), lease_ttl));
    tokio::spawn(round::run(shared, coord, lease_ttl))
}
