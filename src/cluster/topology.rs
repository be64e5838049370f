//! What Switchyard believes about each node, and the pure rules that move that belief
//! when a health check succeeds or fails (rise/fall). The health monitor feeds
//! observations in; routing and sessions only read snapshots.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{ReadBalance, SplitBrainRule};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check has finished yet.
    Unknown,
    Up,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Unknown,
    Primary,
    Standby,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Standby => "standby",
        })
    }
}

/// `Observation::lag_ms` of a replica that has no lag figure (MySQL's NULL
/// `Seconds_Behind_Master`: replication stopped): no reads go to it.
pub const LAG_UNKNOWN: u64 = u64::MAX;

/// What one successful health check saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub role: Role,
    /// Replay delay of a standby; 0 for a primary.
    pub lag_ms: u64,
    /// Primary: current WAL insert position. Standby: last replayed position.
    pub lsn: Option<u64>,
    /// Primary: the timeline it writes on (split-brain rule). Standby: the timeline its
    /// WAL receiver is streaming (None when not streaming or not visible to the health
    /// user).
    pub timeline: Option<u32>,
    /// Standby only: whether its WAL receiver is streaming (None: not visible to the
    /// health user, who needs `pg_monitor` or `pg_read_all_stats` to see it).
    pub streaming: Option<bool>,
    /// The cluster's system identifier (`pg_control_system()`), if known.
    pub system_id: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct NodeState {
    pub name: String,
    pub addr: String,
    pub health: Health,
    pub role: Role,
    pub lag_ms: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub lsn: Option<u64>,
    /// Primary: its timeline. Standby: the timeline it last streamed (kept while its
    /// receiver is disconnected, so an orphan is recognised by it).
    pub timeline: Option<u32>,
    /// Standby: its WAL receiver streams (see `Observation::streaming`).
    pub streaming: Option<bool>,
    pub last_error: Option<String>,
    pub last_check: Option<SystemTime>,
    /// When `health` last changed.
    pub since: SystemTime,
    /// Set by an operator (`DRAIN`): no new sessions, current ones finish.
    pub drained: bool,
    /// Made read-only by a switchover: never the primary again until it reports being a
    /// standby (of the new primary).
    pub fenced: bool,
    /// Sessions on this node now. Shared by every snapshot of the node, so the count
    /// survives snapshot changes; sessions hold a clone.
    pub active: Arc<AtomicU32>,
    pub stats: Arc<NodeStats>,
    /// When the check last recorded began (`ClusterState::record_from`).
    observed_from: Option<std::time::Instant>,
    ok_streak: u32,
    fail_streak: u32,
}

/// Running totals of one node, kept across snapshots (shared `Arc`).
#[derive(Debug, Default)]
pub struct NodeStats {
    pub sessions_total: AtomicU64,
    /// Simple-protocol queries plus extended-protocol Executes routed to the node.
    pub queries_total: AtomicU64,
    pub connect_failures_total: AtomicU64,
    /// Unix ms of the last "server connection failed" warning, for rate limiting.
    last_failure_warning_ms: AtomicU64,
}

impl NodeStats {
    /// Count a failed server connection attempt; true when it deserves a warning (at most
    /// one a second per node: a dead node is tried by every new transaction until the
    /// health monitor marks it down, and each attempt would otherwise log a line).
    pub fn connect_failed(&self) -> bool {
        let total = self.connect_failures_total.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let last = self.last_failure_warning_ms.load(Ordering::Relaxed);
        total == 0
            || (now.saturating_sub(last) >= 1000
                && self
                    .last_failure_warning_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok())
    }
}

/// A change worth a log line and a look by every session on the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub old_health: Health,
    pub new_health: Health,
    pub old_role: Role,
    pub new_role: Role,
    pub reason: String,
}

impl NodeState {
    pub fn new(name: &str, addr: &str) -> NodeState {
        NodeState {
            name: name.to_string(),
            addr: addr.to_string(),
            health: Health::Unknown,
            role: Role::Unknown,
            lag_ms: None,
            lag_bytes: None,
            lsn: None,
            timeline: None,
            streaming: None,
            last_error: None,
            last_check: None,
            since: SystemTime::now(),
            drained: false,
            fenced: false,
            active: Arc::new(AtomicU32::new(0)),
            stats: Arc::default(),
            observed_from: None,
            ok_streak: 0,
            fail_streak: 0,
        }
    }

    pub fn sessions(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Fold one check result into the state. The first result after start decides at
    /// once (nothing to protect yet); after that, health flips only after `rise`
    /// consecutive successes or `fall` consecutive failures. A role reported by the
    /// server itself is believed at once: it is a fact, not a guess.
    pub fn apply(
        &mut self,
        result: Result<Observation, String>,
        rise: u32,
        fall: u32,
        now: SystemTime,
    ) -> Option<Transition> {
        let (old_health, old_role) = (self.health, self.role);
        self.last_check = Some(now);
        let reason;
        match result {
            Ok(obs) => {
                self.ok_streak += 1;
                self.fail_streak = 0;
                self.last_error = None;
                if self.health != Health::Up && (self.health == Health::Unknown || self.ok_streak >= rise) {
                    self.health = Health::Up;
                }
                if self.health == Health::Up {
                    self.role = obs.role;
                }
                // A fenced old primary is released once it follows (a standby), or once
                // it is promoted again onto a newer timeline than it was fenced on: then
                // someone made it a primary anew, and the timelines decide as for any
                // two primaries.
                let promoted_again = obs.role == Role::Primary
                    && matches!((obs.timeline, self.timeline), (Some(new), Some(old)) if new > old);
                if obs.role == Role::Standby || promoted_again {
                    self.fenced = false;
                }
                self.lag_ms = (obs.lag_ms != LAG_UNKNOWN).then_some(obs.lag_ms);
                self.lsn = obs.lsn;
                // A standby whose receiver is disconnected keeps the timeline it last
                // streamed: that is what shows it to be an orphan after a failover.
                if obs.timeline.is_some() || obs.role == Role::Primary {
                    self.timeline = obs.timeline;
                }
                self.streaming = if obs.role == Role::Standby { obs.streaming } else { None };
                reason = match (old_role, obs.role) {
                    (Role::Primary, Role::Standby) => "server is in recovery now".to_string(),
                    (Role::Standby, Role::Primary) => "server left recovery (promoted)".to_string(),
                    _ if old_health == Health::Unknown => "first check".to_string(),
                    _ => format!("{} consecutive good checks", self.ok_streak),
                };
            }
            Err(err) => {
                self.fail_streak += 1;
                self.ok_streak = 0;
                if self.health != Health::Down && (self.health == Health::Unknown || self.fail_streak >= fall) {
                    self.health = Health::Down;
                    // A down server's role is not known; it must be re-learned before use.
                    self.role = Role::Unknown;
                    self.lag_ms = None;
                    self.lag_bytes = None;
                    self.streaming = None;
                }
                reason = if self.fail_streak > 1 {
                    format!("{err} ({} consecutive failed checks)", self.fail_streak)
                } else {
                    err.clone()
                };
                self.last_error = Some(err);
            }
        }
        if self.health != old_health {
            self.since = now;
        }
        (self.health != old_health || self.role != old_role).then_some(Transition {
            old_health,
            new_health: self.health,
            old_role,
            new_role: self.role,
            reason,
        })
    }

    pub fn is_usable(&self) -> bool {
        self.health == Health::Up
    }

    /// Up, but its latest check failed: probably on its way down.
    pub fn is_suspect(&self) -> bool {
        self.health == Health::Up && self.fail_streak > 0
    }

    /// One phrase for error messages, e.g. `default down (connection refused, 4s ago)`.
    pub fn describe(&self, now: SystemTime) -> String {
        let ago = |t: SystemTime| {
            let s = now.duration_since(t).unwrap_or(Duration::ZERO).as_secs();
            format!("{s}s ago")
        };
        let drained = if self.drained { " (drained)" } else { "" };
        let text = match self.health {
            Health::Up => match (self.role, self.lag_ms) {
                (Role::Standby, Some(lag)) if lag > 0 => {
                    format!("{} standby (lag {lag} ms)", self.name)
                }
                (Role::Standby, None) => format!("{} standby (not replicating)", self.name),
                _ => format!("{} {}", self.name, self.role),
            },
            Health::Down => format!(
                "{} down ({}, {})",
                self.name,
                self.last_error.as_deref().unwrap_or("no answer"),
                ago(self.since)
            ),
            Health::Unknown => format!("{} not checked yet", self.name),
        };
        text + drained
    }
}

/// The routing settings of a cluster, carried in its snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_replica_lag_ms: u64,
    pub read_balance: ReadBalance,
    pub split_brain: SplitBrainRule,
}

/// One cluster's view at an instant: everything routing needs, nodes and policy alike.
/// Cloned on change (a handful of nodes), shared as `Arc` so readers never lock.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    pub name: String,
    pub nodes: Vec<NodeState>,
    pub policy: Policy,
    /// Bound on the whole connect phase of a new session.
    pub connect_timeout: Duration,
    /// Bound on one server login attempt.
    pub server_login_timeout: Duration,
    /// How long a rw connect waits while the cluster has no primary (a failover).
    pub failover_hold: Duration,
    /// Highest timeline ever reported by a primary of this cluster (since start). A
    /// primary below it is an old primary that came back: it never gets writes, even
    /// while the newer one is unreachable.
    pub newest_timeline: u32,
    /// A WAL position on `newest_timeline` at or after the point where it began (the
    /// first position a primary reported on it): a standby past it has left every older
    /// timeline behind. Causal tokens from an older timeline are judged against it.
    pub timeline_start: u64,
    /// The cluster's system identifier, from the first node that reported one: causal
    /// tokens carry it, so one from another cluster is refused.
    pub system_id: Option<u64>,
    /// With `[coordination]`: what the instances agreed through etcd.
    pub coordination: Option<Coordination>,
    /// Since when the cluster has had no primary (by the routing rule), if it has none:
    /// reads that must see a client's writes wait up to `failover_hold` from then for a
    /// primary instead of going to a standby that may not have them. Kept by
    /// `ClusterState`, the only writer of published snapshots.
    pub no_primary_since: Option<Instant>,
}

/// The agreed state of a cluster under coordination, as this instance last read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coordination {
    /// The primary the leader published (writes go only there).
    pub published: Option<String>,
    /// Incremented by every publication of a new primary.
    pub epoch: u64,
    /// Set when this instance has been out of touch with etcd for longer than its lease:
    /// it must not route writes (another instance may have moved on).
    pub cut_off: Option<String>,
}

/// Why an up standby gets no reads although its lag may look fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// Its WAL receiver is not streaming while a primary is up: it is not following it.
    NotStreaming,
    /// It streamed a timeline older than the primary's: it follows a primary that is
    /// gone (an orphan after a failover).
    OldTimeline { standby: u32, primary: u32 },
}

impl fmt::Display for Detached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Detached::NotStreaming => f.write_str("not streaming from the primary"),
            Detached::OldTimeline { standby, primary } => {
                write!(f, "on timeline {standby}, older than the primary's {primary}")
            }
        }
    }
}

impl ClusterSnapshot {
    pub fn new(name: &str, nodes: Vec<NodeState>, policy: Policy, connect_timeout: Duration) -> ClusterSnapshot {
        ClusterSnapshot {
            name: name.to_string(),
            nodes,
            policy,
            connect_timeout,
            server_login_timeout: connect_timeout,
            failover_hold: connect_timeout,
            newest_timeline: 0,
            timeline_start: 0,
            system_id: None,
            coordination: None,
            no_primary_since: None,
        }
    }

    /// Why standby `i` must not serve reads, given the primary (`routing::primary`), if
    /// it must not. With no primary up every standby is as good as it gets: reads go on.
    pub fn detached(&self, i: usize, primary: Option<usize>) -> Option<Detached> {
        let n = &self.nodes[i];
        let p = &self.nodes[primary?];
        if n.health != Health::Up || n.role != Role::Standby {
            return None;
        }
        if let (Some(s), Some(pt)) = (n.timeline, p.timeline) {
            if s < pt {
                return Some(Detached::OldTimeline {
                    standby: s,
                    primary: pt,
                });
            }
        }
        (n.streaming == Some(false)).then_some(Detached::NotStreaming)
    }

    pub fn index(&self, node: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == node)
    }

    /// Recompute standby byte lag from the primary's position. Only meaningful with a
    /// single primary; left unset otherwise.
    fn refresh_byte_lag(&mut self) {
        let primaries: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.is_usable() && n.role == Role::Primary)
            .filter_map(|n| n.lsn)
            .collect();
        let head = if primaries.len() == 1 { Some(primaries[0]) } else { None };
        for n in &mut self.nodes {
            n.lag_bytes = match (n.health, n.role, head, n.lsn) {
                (Health::Up, Role::Primary, _, _) => Some(0),
                (Health::Up, Role::Standby, Some(h), Some(l)) => Some(h.saturating_sub(l)),
                _ => None,
            };
        }
    }

    pub fn describe_nodes(&self) -> String {
        let now = SystemTime::now();
        self.nodes
            .iter()
            .map(|n| n.describe(now))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A recorded change: health/role transitions and operator actions.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: SystemTime,
    pub node: String,
    pub old: String,
    pub new: String,
    pub reason: String,
}

const EVENTS_KEPT: usize = 200;

/// The live, shared state of one cluster: the snapshot channel and recent events.
pub struct ClusterState {
    pub name: String,
    tx: watch::Sender<Arc<ClusterSnapshot>>,
    events: Mutex<VecDeque<Event>>,
    /// (when, WAL position) of the primary, one sample per check: standby lag is the
    /// age of the oldest primary position the standby has not replayed yet.
    wal_samples: Mutex<VecDeque<(SystemTime, u64)>>,
    /// Which node is the primary (the routing policy's rule, split brain included),
    /// given by the caller so that topology does not depend on routing.
    primary_of: fn(&ClusterSnapshot) -> Option<usize>,
    /// Names this cluster in the per-thread snapshot copies (`snapshot`) and repeaters.
    id: u64,
    /// Bumped after every change of the snapshot, under the channel's write lock.
    generation: AtomicU64,
}

thread_local! {
    /// This thread's copy of each cluster's snapshot, with the generation it was taken
    /// at. Every transaction-mode unit reads the snapshot; reading the channel (a lock)
    /// and cloning its `Arc` (a reference count) each time would make every worker
    /// thread write the same few cache lines per transaction. A copy per thread is
    /// written by its own thread only, and taken again only after a change.
    /// (cluster id, generation, copy): a few clusters, searched in order.
    static SNAPSHOTS: RefCell<Vec<(u64, u64, Arc<ClusterSnapshot>)>> = const { RefCell::new(Vec::new()) };
}

/// Enough samples for lag up to ~1 hour at 1 check per second.
const WAL_SAMPLES_KEPT: usize = 3600;

impl ClusterState {
    /// `primary_of`: the rule that names the primary (`routing::primary`); the lag of
    /// standbys is measured against that node's WAL positions only.
    pub fn new(mut snapshot: ClusterSnapshot, primary_of: fn(&ClusterSnapshot) -> Option<usize>) -> Arc<ClusterState> {
        let name = snapshot.name.clone();
        snapshot.no_primary_since = primary_of(&snapshot).is_none().then(Instant::now);
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Arc::new(ClusterState {
            name,
            tx,
            events: Mutex::new(VecDeque::new()),
            wal_samples: Mutex::new(VecDeque::new()),
            primary_of,
            id: crate::local_watch::key(),
            generation: AtomicU64::new(0),
        })
    }

    /// The current snapshot (this thread's copy of it, see `SNAPSHOTS`).
    pub fn snapshot(&self) -> Arc<ClusterSnapshot> {
        // Read before the channel: a change that lands in between makes the copy look
        // older than it is, never newer, so it is taken again next time.
        let generation = self.generation.load(Ordering::Acquire);
        SNAPSHOTS.with_borrow_mut(|copies| {
            let at = copies.iter().position(|(id, _, _)| *id == self.id);
            if let Some(i) = at {
                if copies[i].1 == generation {
                    return copies[i].2.clone();
                }
            }
            let snap = Arc::new(ClusterSnapshot::clone(&self.tx.borrow()));
            match at {
                Some(i) => copies[i] = (self.id, generation, snap.clone()),
                None => copies.push((self.id, generation, snap.clone())),
            }
            snap
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterSnapshot>> {
        self.tx.subscribe()
    }

    /// Told of every change that wakes subscribers, for a session on a worker thread
    /// (read the snapshot itself with `snapshot`), through this thread's repeater of the
    /// channel (`local_watch`). Must be called inside the worker's tokio runtime.
    pub fn subscribe_local(&self) -> crate::local_watch::Receiver {
        crate::local_watch::repeat(self.id, || self.tx.subscribe())
    }

    /// Change the snapshot; `f` says whether sessions must look (wake subscribers).
    pub fn update(&self, f: impl FnOnce(&mut ClusterSnapshot) -> bool) {
        self.tx.send_if_modified(|snap| {
            let mut next = (**snap).clone();
            let notify = f(&mut next);
            next.no_primary_since = match (self.primary_of)(&next) {
                Some(_) => None,
                None => next.no_primary_since.or_else(|| Some(Instant::now())),
            };
            *snap = Arc::new(next);
            self.generation.fetch_add(1, Ordering::Release);
            notify
        });
    }

    pub fn push_event(&self, node: &str, old: String, new: String, reason: String) {
        let mut ev = self.events.lock().unwrap();
        if ev.len() == EVENTS_KEPT {
            ev.pop_front();
        }
        ev.push_back(Event {
            at: SystemTime::now(),
            node: node.to_string(),
            old,
            new,
            reason,
        });
    }

    /// Recent events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().iter().cloned().collect()
    }

    /// Record a check result for the node named `node` (gone after a reload: ignored).
    /// Subscribers (every session) are woken only when health or role changed; lag and
    /// LSN updates are visible to the next reader without waking anyone, so thousands of
    /// idle sessions cost nothing per check.
    pub fn record(&self, node: &str, result: Result<Observation, String>, rise: u32, fall: u32) -> Option<Transition> {
        self.record_from(node, result, std::time::Instant::now(), rise, fall)
    }

    /// `record` for a check that began at `started`. A check that began before the last
    /// one recorded for the node is dropped: the monitor's regular check, sent before a
    /// promotion and answered after the control plane recorded the promoted node, must
    /// not turn it back into a standby for a moment (and end the sessions just moved to it).
    pub fn record_from(
        &self,
        node: &str,
        result: Result<Observation, String>,
        started: std::time::Instant,
        rise: u32,
        fall: u32,
    ) -> Option<Transition> {
        let mut transition = None;
        let mut transition_notify = false;
        let system_id = result.as_ref().ok().and_then(|o| o.system_id);
        self.update(|snap| {
            if let Some(i) = snap.index(node) {
                if snap.nodes[i].observed_from.is_some_and(|prev| started < prev) {
                    return false;
                }
                snap.nodes[i].observed_from = Some(started);
                transition = snap.nodes[i].apply(result, rise, fall, SystemTime::now());
                let n = &snap.nodes[i];
                if snap.system_id.is_none() {
                    snap.system_id = system_id;
                }
                if let (Health::Up, Role::Primary, Some(t)) = (n.health, n.role, n.timeline) {
                    if t > snap.newest_timeline {
                        snap.newest_timeline = t;
                        snap.timeline_start = n.lsn.unwrap_or(u64::MAX);
                        // Sessions must re-judge their primary against the new timeline.
                        transition_notify = true;
                    }
                }
                let eligible_before = self.readable(snap);
                self.refresh_time_lag(snap, i);
                snap.refresh_byte_lag();
                // A standby crossing max_replica_lag_ms, or starting or stopping to
                // follow the primary, changes where reads may go: wake clients waiting
                // for a readable node, and sessions on a standby that became an orphan.
                transition_notify |= self.readable(snap) != eligible_before;
            }
            transition.is_some() || transition_notify
        });
        if let Some(t) = &transition {
            self.push_event(
                node,
                format!("{}/{}", t.old_health, t.old_role),
                format!("{}/{}", t.new_health, t.new_role),
                t.reason.clone(),
            );
        }
        transition
    }

    /// Which nodes reads may go to (for noticing a change).
    fn readable(&self, snap: &ClusterSnapshot) -> Vec<bool> {
        let primary = (self.primary_of)(snap);
        (0..snap.nodes.len())
            .map(|i| {
                let n = &snap.nodes[i];
                n.health == Health::Up
                    && n.role == Role::Standby
                    && n.lag_ms.is_some_and(|l| l <= snap.policy.max_replica_lag_ms)
                    && snap.detached(i, primary).is_none()
            })
            .collect()
    }

    /// Measure every standby's lag against the primary's WAL history, in the proxy.
    /// Asking the standby (`now() - pg_last_xact_replay_timestamp()`) is wrong exactly
    /// when it matters: a standby whose WAL receiver is cut off has replayed all it
    /// received and would report no lag at all. Without primary samples (no primary
    /// seen yet) the standby's own figure stays.
    fn refresh_time_lag(&self, snap: &mut ClusterSnapshot, checked: usize) {
        let now = SystemTime::now();
        let mut samples = self.wal_samples.lock().unwrap();
        let n = &snap.nodes[checked];
        if let (Health::Up, Role::Primary, Some(lsn)) = (n.health, n.role, n.lsn) {
            if (self.primary_of)(snap) == Some(checked) {
                if samples.back().is_none_or(|&(_, last)| lsn > last) {
                    samples.push_back((now, lsn));
                }
                if samples.len() > WAL_SAMPLES_KEPT {
                    samples.pop_front();
                }
            }
        }
        if samples.is_empty() {
            return;
        }
        for n in &mut snap.nodes {
            // A replica that said it has no lag figure (MySQL: replication stopped) keeps
            // none until its own check gives one.
            if let (Health::Up, Role::Standby, Some(replayed), Some(_)) = (n.health, n.role, n.lsn, n.lag_ms) {
                n.lag_ms = Some(match samples.iter().find(|&&(_, lsn)| lsn > replayed) {
                    None => 0,
                    Some(&(since, _)) => now.duration_since(since).unwrap_or(Duration::ZERO).as_millis() as u64,
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "topology_tests.rs"]
mod tests;
