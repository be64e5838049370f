//! The one place that turns "a server for this client" into a connection, for both pool
//! modes: ask routing for candidates, try them in order, and when none works wait for the
//! health monitor to change its mind, all within the cluster's `connect_timeout_ms`. How
//! a connection is made on one node (a fresh login in session mode, a pool checkout in
//! transaction mode) is the caller's `Dialer`.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cluster::freshness;
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{ClusterSnapshot, NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::error::Error;

/// Makes a connection on one node. An error that says `retry_elsewhere` sends the
/// connector on to the next candidate; any other ends the attempt (the client hears it).
#[allow(async_fn_in_trait)] // used generically only, never as `dyn`
pub trait Dialer {
    type Conn;
    async fn dial(&mut self, node: &NodeState, timeout: Duration) -> Result<Self::Conn, Error>;

    /// A connection on `node` at once, if one is ready (a pool's idle connection), for
    /// `connect_now`; None when only `dial` can make one.
    fn dial_now(&mut self, _node: &NodeState) -> Option<Self::Conn> {
        None
    }
}

/// A connection and the node it is on (`snapshot.nodes[index]`, as routing saw it).
pub struct Connected<C> {
    pub conn: C,
    pub snapshot: Arc<ClusterSnapshot>,
    pub index: usize,
    /// How long the client waited for it.
    pub waited: Duration,
}

impl<C> Connected<C> {
    pub fn node(&self) -> &NodeState {
        &self.snapshot.nodes[self.index]
    }
}

/// Which candidates a caller will take (`accept(snapshot, index)`): fresh reads take
/// only standbys that replayed far enough, and the primary.
pub type Accept<'a> = &'a (dyn Fn(&ClusterSnapshot, usize) -> bool + Sync);

/// Counts a client in `cluster.waiting` (clients with no node yet, shown by SHOW POOLS
/// and /status) while it lives: only around the connector's waits, so the common case
/// writes no counter every worker thread shares.
struct Waiting<'a>(&'a ClusterCtx);

impl<'a> Waiting<'a> {
    fn new(cluster: &'a ClusterCtx) -> Waiting<'a> {
        cluster.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(cluster)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// Where the next balanced choice among candidates starts, per thread: a shared
    /// counter would be written by every worker on every unit.
    static TURN: Cell<usize> = const { Cell::new(0) };
}

/// The common case of transaction mode, without an await: the first candidate that
/// `connect` would try has a connection ready (`Dialer::dial_now`). None when it has not,
/// or when anything else would have to happen (a PAUSE, no route, a login, a wait): the
/// caller then runs `connect`, which starts over. Being synchronous, it also keeps the
/// connector's state out of the caller's future, which lives as long as the client.
pub fn connect_now<D: Dialer>(
    cluster: &ClusterCtx,
    endpoint: Endpoint,
    exclude: Option<&str>,
    accept: Option<Accept<'_>>,
    dialer: &mut D,
) -> Option<Connected<D::Conn>> {
    if cluster.is_paused() {
        return None;
    }
    let snapshot = cluster.state.snapshot();
    let turn = TURN.replace(TURN.get().wrapping_add(1));
    let candidates = routing::route(endpoint, &snapshot, turn).ok()?;
    let index = candidates
        .into_iter()
        .find(|&i| exclude != Some(snapshot.nodes[i].name.as_str()) && accept.is_none_or(|f| f(&snapshot, i)))?;
    let node = &snapshot.nodes[index];
    let conn = dialer.dial_now(node)?;
    node.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
    Some(Connected {
        conn,
        snapshot,
        index,
        waited: Duration::ZERO,
    })
}

/// Connect for `endpoint` (`ReadWrite`: the primary; `ReadOnly`: a readable node),
/// skipping the node named `exclude` and candidates `accept` refuses. `rx`, when the caller watches the topology (the
/// session-mode relay does), is the receiver to use, so that the caller has seen every
/// change up to its node's choice; otherwise one is subscribed only if there is
/// something to wait for. A PAUSE holds the attempt without limit (an operator asked for
/// exactly that).
pub async fn connect<D: Dialer>(
    cluster: &ClusterCtx,
    endpoint: Endpoint,
    exclude: Option<&str>,
    accept: Option<Accept<'_>>,
    mut rx: Option<&mut watch::Receiver<Arc<ClusterSnapshot>>>,
    dialer: &mut D,
) -> Result<Connected<D::Conn>, Error> {
    if cluster.is_paused() {
        let _waiting = Waiting::new(cluster);
        cluster.wait_unpaused().await;
    }
    let started = Instant::now();
    let first = match rx.as_deref_mut() {
        Some(rx) => rx.borrow_and_update().clone(),
        None => cluster.state.snapshot(),
    };
    let (connect_timeout, login_timeout) = (first.connect_timeout, first.server_login_timeout);
    let mut deadline = started + connect_timeout;
    let mut first = Some(first);
    // Set once the cluster was seen without a primary: the wait is then a hold.
    let mut held = false;
    let mut own_rx = None;
    let mut failures: Vec<String> = Vec::new();
    loop {
        // Out of file descriptors on this pass (the proxy's, not a node's fault).
        let mut exhausted: Option<Error> = None;
        let snap = match (first.take(), rx.as_deref_mut().or(own_rx.as_mut())) {
            (Some(snap), _) => snap,
            (None, Some(rx)) => rx.borrow_and_update().clone(),
            (None, None) => cluster.state.snapshot(),
        };
        // A read that must see something (`accept` given) is held the same way, from the
        // primary's loss (`freshness::reads_held_until`), then may take any standby: it
        // gets time for one login after the hold.
        let reads_held_until = match (endpoint, accept) {
            (Endpoint::ReadOnly, Some(_)) => freshness::reads_held_until(&snap).filter(|&end| end > Instant::now()),
            _ => None,
        };
        if let Some(end) = reads_held_until {
            held = true;
            deadline = deadline.max(end + login_timeout);
        }
        let turn = TURN.replace(TURN.get().wrapping_add(1));
        let routed = routing::route(endpoint, &snap, turn);
        // No primary at all (its node is down, a failover is under way): a rw attempt
        // waits up to `failover_hold_ms` for one instead of failing at once. Once
        // extended, the deadline stays extended, so a primary that appears late is used.
        // (Looked at only when routing found nothing: the primary is not judged twice
        // on the hot path.)
        if endpoint == Endpoint::ReadWrite && !held && routed.is_err() && routing::write_primary(&snap).is_err() {
            held = true;
            deadline = deadline.max(started + snap.failover_hold);
        }
        let problem = match routed {
            Ok(candidates) => {
                let mut not_fresh = 0;
                for index in candidates {
                    let node = &snap.nodes[index];
                    if exclude == Some(node.name.as_str()) {
                        continue;
                    }
                    if accept.is_some_and(|f| !f(&snap, index)) {
                        not_fresh += 1;
                        continue;
                    }
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        break;
                    }
                    match dialer.dial(node, login_timeout.min(remaining)).await {
                        Ok(conn) => {
                            // The topology may have changed during the login: never hand
                            // over a connection the caller would have to give up at once.
                            let now = match rx.as_deref_mut() {
                                Some(rx) => rx.borrow_and_update().clone(),
                                None => cluster.state.snapshot(),
                            };
                            let changed = !Arc::ptr_eq(&now, &snap);
                            if let Some(reason) =
                                changed.then(|| routing::eviction(endpoint, &now, &node.name)).flatten()
                            {
                                failures.push(format!("{}: {reason}", node.name));
                                continue;
                            }
                            node.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
                            return Ok(Connected {
                                conn,
                                snapshot: snap.clone(),
                                index,
                                waited: started.elapsed(),
                            });
                        }
                        // No other node would do better; a descriptor may be free soon.
                        Err(e) if e.is_out_of_descriptors() => {
                            exhausted = Some(e);
                            break;
                        }
                        Err(e) if e.retry_elsewhere() || (node.role == Role::Standby && e.standby_behind()) => {
                            // One warning a second per node: a dead node that the monitor
                            // has not marked down yet is tried by every new request.
                            if node.stats.connect_failed() {
                                warn!(cluster = %cluster.name, endpoint = %endpoint, node = %node.name, reason = %e, "server connection failed; trying next candidate");
                            } else {
                                debug!(cluster = %cluster.name, endpoint = %endpoint, node = %node.name, reason = %e, "server connection failed; trying next candidate");
                            }
                            failures.push(format!("{}: {e}", node.name));
                        }
                        Err(e) => return Err(e),
                    }
                }
                format!(
                    "could not connect to any {} server of cluster \"{}\": {}; node states: {}",
                    if endpoint == Endpoint::ReadWrite {
                        "primary"
                    } else {
                        "readable"
                    },
                    cluster.name,
                    if not_fresh > 0 && failures.is_empty() {
                        format!("{not_fresh} node(s) not known to have what this client must read (its own writes or causal token): standbys not replayed that far, or a primary on an older timeline than the token's")
                    } else {
                        failures.join("; ")
                    },
                    snap.describe_nodes()
                )
            }
            Err(no_route) => no_route.to_string(),
        };
        if let Some(e) = exhausted {
            // Try again shortly, within the deadline: refused clients are leaving and
            // take their descriptors with them.
            let retry = Instant::now() + Duration::from_millis(100);
            if retry >= deadline {
                return Err(e);
            }
            tokio::time::sleep_until(retry).await;
            continue;
        }
        // Nothing usable now: wait for the health monitor to change its mind.
        let waiter = match rx.as_deref_mut() {
            Some(rx) => rx,
            None => match own_rx.as_mut() {
                Some(rx) => rx,
                None => {
                    // Subscribe, then look again: a change between the two is not lost.
                    own_rx = Some(cluster.state.subscribe());
                    continue;
                }
            },
        };
        let now = Instant::now();
        // Look again when the topology changes, or when a read hold ends (the same
        // snapshot then accepts more).
        let wake = reads_held_until.map_or(deadline, |end| end.min(deadline));
        let _waiting = Waiting::new(cluster);
        let changed = now < deadline
            && match tokio::time::timeout(wake.saturating_duration_since(now), waiter.changed()).await {
                Ok(Ok(())) => true,
                Ok(Err(_)) => false,
                Err(_) => wake < deadline,
            };
        if !changed {
            let mut problem = problem;
            if held {
                problem = format!(
                    "{problem} (waited {} ms for a primary{})",
                    started.elapsed().as_millis(),
                    cluster.ha.note().map(|n| format!("; {n}")).unwrap_or_default()
                );
            }
            return Err(if failures.is_empty() {
                Error::no_route(problem)
            } else {
                Error::connect_failed(problem)
            });
        }
    }
}

/// Keeps a node's session count right however the session ends (even by panic).
pub struct NodeSlot(pub Arc<AtomicU32>);

impl Drop for NodeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::topology::{ClusterState, Observation, Policy};
    use crate::config::{Engine, ReadBalance, ServerTlsMode, SplitBrainRule};
    use crate::tls::ServerTls;
    use std::time::SystemTime;

    /// Nodes named in `ready` have a connection at once; `dial` makes one anywhere.
    struct Fake {
        ready: Vec<&'static str>,
        dialed: Vec<String>,
    }

    impl Dialer for Fake {
        type Conn = String;
        async fn dial(&mut self, node: &NodeState, _timeout: Duration) -> Result<String, Error> {
            self.dialed.push(node.name.clone());
            Ok(node.name.clone())
        }
        fn dial_now(&mut self, node: &NodeState) -> Option<String> {
            self.ready.contains(&node.name.as_str()).then(|| node.name.clone())
        }
    }

    /// A primary and two standbys, all up.
    fn cluster() -> ClusterCtx {
        let t = SystemTime::now();
        let nodes = [("p", Role::Primary), ("s1", Role::Standby), ("s2", Role::Standby)]
            .into_iter()
            .map(|(name, role)| {
                let mut n = NodeState::new(name, "127.0.0.1:1");
                let seen = Observation {
                    role,
                    lag_ms: 0,
                    lsn: None,
                    timeline: Some(1),
                    streaming: None,
                    system_id: None,
                };
                n.apply(Ok(seen), 1, 1, t);
                n
            })
            .collect();
        let policy = Policy {
            max_replica_lag_ms: 1000,
            read_balance: ReadBalance::Priority,
            split_brain: SplitBrainRule::NewestTimeline,
        };
        let snap = ClusterSnapshot::new("main", nodes, policy, Duration::from_secs(1));
        let state = ClusterState::new(snap, |s| routing::primary(s).ok());
        let tls = ServerTls::new(ServerTlsMode::Disable, None).unwrap();
        let settings = toml::from_str("nodes = []").expect("a cluster's settings");
        ClusterCtx::new("main", state, settings, tls, Engine::Postgresql, Box::new(()))
    }

    fn fake(ready: &[&'static str]) -> Fake {
        Fake {
            ready: ready.to_vec(),
            dialed: Vec::new(),
        }
    }

    fn name<C>(c: Option<Connected<C>>) -> Option<String> {
        c.map(|c| c.node().name.clone())
    }

    #[tokio::test]
    async fn the_fast_path_takes_only_what_connect_would_try_first() {
        let c = cluster();
        // The primary for writes; the first standby for reads.
        assert_eq!(
            name(connect_now(&c, Endpoint::ReadWrite, None, None, &mut fake(&["p"]))),
            Some("p".into())
        );
        assert_eq!(
            name(connect_now(
                &c,
                Endpoint::ReadOnly,
                None,
                None,
                &mut fake(&["s1", "s2"])
            )),
            Some("s1".into())
        );
        // The first candidate has nothing ready: no jump to the second (connect would
        // open one on the first), the caller runs connect.
        assert_eq!(
            name(connect_now(&c, Endpoint::ReadOnly, None, None, &mut fake(&["s2", "p"]))),
            None
        );
        // Excluded and refused candidates are passed over, as connect does.
        assert_eq!(
            name(connect_now(
                &c,
                Endpoint::ReadOnly,
                Some("s1"),
                None,
                &mut fake(&["s2"])
            )),
            Some("s2".into())
        );
        let not_s1 = |s: &ClusterSnapshot, i: usize| s.nodes[i].name != "s1";
        assert_eq!(
            name(connect_now(
                &c,
                Endpoint::ReadOnly,
                None,
                Some(&not_s1),
                &mut fake(&["s2"])
            )),
            Some("s2".into())
        );
        // A PAUSE is waited out by connect, never skipped.
        c.set_paused(true);
        assert_eq!(
            name(connect_now(&c, Endpoint::ReadWrite, None, None, &mut fake(&["p"]))),
            None
        );
        c.set_paused(false);
        // No primary: nothing at once; connect holds or fails with the reason.
        c.state.update(|s| {
            s.nodes[0].health = crate::cluster::topology::Health::Down;
            true
        });
        assert_eq!(
            name(connect_now(&c, Endpoint::ReadWrite, None, None, &mut fake(&["p"]))),
            None
        );
    }

    #[tokio::test]
    async fn connect_dials_the_first_candidate_when_nothing_is_ready() {
        let c = cluster();
        let mut d = fake(&[]);
        assert_eq!(name(connect_now(&c, Endpoint::ReadOnly, None, None, &mut d)), None);
        let got = connect(&c, Endpoint::ReadOnly, None, None, None, &mut d).await.unwrap();
        assert_eq!(got.node().name, "s1");
        assert_eq!(d.dialed, ["s1"]);
    }
}
