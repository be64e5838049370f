//! Routing policy: a pure function from a cluster snapshot to an ordered list of
//! candidate nodes, or a reason why there is none. No I/O, no clocks, no locks; the
//! session tries the candidates in order.

use std::fmt;

use smallvec::{smallvec, SmallVec};

pub use crate::cluster::topology::Policy;
use crate::cluster::topology::{ClusterSnapshot, Detached, Health, Role};
use crate::config::{ReadBalance, SplitBrainRule};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ReadWrite,
    ReadOnly,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::ReadWrite => "rw",
            Endpoint::ReadOnly => "ro",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// No node is up and primary.
    NoPrimary { cluster: String, nodes: String },
    /// Several nodes are primary and the split-brain rule picks none of them.
    SplitBrain {
        cluster: String,
        primaries: Vec<String>,
        nodes: String,
    },
    /// The only primaries are on a timeline older than one already seen: old primaries
    /// that came back while the promoted one is unreachable.
    StalePrimary {
        cluster: String,
        stale: Vec<String>,
        newest: u32,
        nodes: String,
    },
    /// Nothing can serve reads: no standby within lag and no primary.
    NoReadable { cluster: String, nodes: String },
    /// Coordination: this instance has lost etcd for longer than its lease.
    Uncoordinated { cluster: String, why: String },
    /// Coordination: the node that reports primary is not the one the leader published.
    NotPublished {
        cluster: String,
        node: String,
        published: Option<String>,
        epoch: u64,
    },
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoRoute::NoPrimary { cluster, nodes } => {
                write!(f, "no primary available for cluster \"{cluster}\": {nodes}")
            }
            NoRoute::SplitBrain { cluster, primaries, nodes } => write!(
                f,
                "split brain in cluster \"{cluster}\": {} all report primary; refusing writes until only one does: {nodes}",
                primaries.join(" and ")
            ),
            NoRoute::StalePrimary { cluster, stale, newest, nodes } => write!(
                f,
                "no primary available for cluster \"{cluster}\": {} reports primary but timeline {newest} has been seen on a promoted node, so it is an old primary; refusing writes to it: {nodes}",
                stale.join(" and ")
            ),
            NoRoute::NoReadable { cluster, nodes } => write!(
                f,
                "no server available for reads in cluster \"{cluster}\" (no standby within max_replica_lag_ms and no primary): {nodes}"
            ),
            NoRoute::Uncoordinated { cluster, why } => write!(
                f,
                "no writes through this Switchyard instance for cluster \"{cluster}\": {why}; another instance may be serving them"
            ),
            NoRoute::NotPublished { cluster, node, published, epoch } => match published {
                Some(p) => write!(
                    f,
                    "no primary available for cluster \"{cluster}\": {node} reports primary but the leader published {p} (epoch {epoch}); waiting for them to agree"
                ),
                None if *epoch == 0 => write!(
                    f,
                    "no primary available for cluster \"{cluster}\": {node} reports primary but no primary has been published in etcd yet"
                ),
                None => write!(
                    f,
                    "no primary available for cluster \"{cluster}\": the leader withdrew the primary (epoch {epoch}) to change it; writes wait until every Switchyard instance has confirmed and the new one is published ({node} reports primary)"
                ),
            },
        }
    }
}

/// The one node that is the primary: up, reports primary, not fenced by a switchover,
/// not on a timeline older than one already seen, and the winner of the split-brain rule
/// if several qualify. Drain
/// does not change who the primary is.
pub fn primary(snap: &ClusterSnapshot) -> Result<usize, NoRoute> {
    let reports = |i: usize| {
        let n = &snap.nodes[i];
        n.health == Health::Up && n.role == Role::Primary && !n.fenced
    };
    // The common case, asked for every unit of work: one node reports primary and its
    // timeline is current. One pass, nothing collected; what it returns is what the
    // general rule below would.
    let mut only = None;
    for i in 0..snap.nodes.len() {
        if reports(i) {
            only = match only {
                None => Some(Some(i)),
                Some(_) => Some(None),
            };
        }
    }
    if let Some(Some(i)) = only {
        if snap.nodes[i].timeline.is_none_or(|t| t >= snap.newest_timeline) {
            return Ok(i);
        }
    }
    let reporting: Nodes = (0..snap.nodes.len()).filter(|&i| reports(i)).collect();
    let split_brain = |primaries: &[usize]| NoRoute::SplitBrain {
        cluster: snap.name.clone(),
        primaries: primaries.iter().map(|&i| snap.nodes[i].name.clone()).collect(),
        nodes: snap.describe_nodes(),
    };
    if reporting.len() > 1 && snap.policy.split_brain == SplitBrainRule::Refuse {
        return Err(split_brain(&reporting));
    }
    let (current, stale): (Nodes, Nodes) = reporting
        .iter()
        .copied()
        .partition(|&i| snap.nodes[i].timeline.is_none_or(|t| t >= snap.newest_timeline));
    match current.as_slice() {
        [] if !stale.is_empty() => Err(NoRoute::StalePrimary {
            cluster: snap.name.clone(),
            stale: stale
                .iter()
                .map(|&i| {
                    format!(
                        "{} (timeline {})",
                        snap.nodes[i].name,
                        snap.nodes[i].timeline.unwrap_or(0)
                    )
                })
                .collect(),
            newest: snap.newest_timeline,
            nodes: snap.describe_nodes(),
        }),
        [] => Err(NoRoute::NoPrimary {
            cluster: snap.name.clone(),
            nodes: snap.describe_nodes(),
        }),
        [one] => Ok(*one),
        many => newest_timeline(snap, many).ok_or_else(|| split_brain(&reporting)),
    }
}

/// The node writes may go to: `primary()`, and under coordination only while this
/// instance is in touch with etcd and only if it is the primary the leader published, so
/// that every instance writes to the same node.
pub fn write_primary(snap: &ClusterSnapshot) -> Result<usize, NoRoute> {
    let p = primary(snap)?;
    if let Some(c) = &snap.coordination {
        if let Some(why) = &c.cut_off {
            return Err(NoRoute::Uncoordinated {
                cluster: snap.name.clone(),
                why: why.clone(),
            });
        }
        if c.published.as_deref() != Some(snap.nodes[p].name.as_str()) {
            return Err(NoRoute::NotPublished {
                cluster: snap.name.clone(),
                node: snap.nodes[p].name.clone(),
                published: c.published.clone(),
                epoch: c.epoch,
            });
        }
    }
    Ok(p)
}

/// The primary whose timeline is strictly higher than every other primary's; none on a
/// tie or when any timeline is unknown.
fn newest_timeline(snap: &ClusterSnapshot, primaries: &[usize]) -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    let mut tie = false;
    for &i in primaries {
        let tli = snap.nodes[i].timeline?;
        match best {
            Some((b, _)) if tli == b => tie = true,
            Some((b, _)) if tli < b => {}
            _ => {
                best = Some((tli, i));
                tie = false;
            }
        }
    }
    if tie {
        None
    } else {
        best.map(|(_, i)| i)
    }
}

/// Node indexes, in order of preference. Inline up to 8: routing allocates nothing for
/// a cluster of that size (it runs once per transaction in transaction mode).
pub type Nodes = SmallVec<[usize; 8]>;

/// Candidates for a new session, best first; `turn` rotates `round_robin`. Drained nodes
/// get no new sessions.
pub fn route(endpoint: Endpoint, snap: &ClusterSnapshot, turn: usize) -> Result<Nodes, NoRoute> {
    let policy = &snap.policy;
    let open = |p: Result<usize, NoRoute>| {
        p.and_then(|p| {
            if snap.nodes[p].drained {
                Err(NoRoute::NoPrimary {
                    cluster: snap.name.clone(),
                    nodes: snap.describe_nodes(),
                })
            } else {
                Ok(p)
            }
        })
    };
    match endpoint {
        // The common case of transaction mode, once per transaction: one look at the
        // nodes.
        Endpoint::ReadWrite => open(write_primary(snap)).map(|p| smallvec![p]),
        Endpoint::ReadOnly => {
            let the_primary = primary(snap);
            // Reads may fall back on the primary even when writes may not go there (this
            // instance cut off from etcd, a publication pending): a read harms nothing.
            let open_primary = open(the_primary.clone());
            let mut standbys: Nodes = (0..snap.nodes.len())
                .filter(|&i| {
                    let n = &snap.nodes[i];
                    n.health == Health::Up
                        && n.role == Role::Standby
                        && !n.drained
                        && n.lag_ms.is_some_and(|l| l <= policy.max_replica_lag_ms)
                        && snap.detached(i, the_primary.as_ref().ok().copied()).is_none()
                })
                .collect();
            match policy.read_balance {
                ReadBalance::Priority => {}
                ReadBalance::RoundRobin => {
                    if !standbys.is_empty() {
                        let k = turn % standbys.len();
                        standbys.rotate_left(k);
                    }
                }
                // Stable sort: ties keep the listed (priority) order.
                ReadBalance::LeastConnections => standbys.sort_by_key(|&i| snap.nodes[i].sessions()),
            }
            // A standby whose latest check failed (frozen? dying?) is still up until `fall`
            // checks say otherwise, but is tried only after the primary: a connect to it
            // may cost a whole connect timeout.
            let (suspect, mut candidates): (Nodes, Nodes) =
                standbys.into_iter().partition(|&i| snap.nodes[i].is_suspect());
            // The primary is the last resort for reads; in an unresolved split brain there
            // is no primary to fall back on, since either could be the stale one.
            if let Ok(p) = open_primary {
                candidates.push(p);
            }
            candidates.extend(suspect);
            if candidates.is_empty() {
                Err(NoRoute::NoReadable {
                    cluster: snap.name.clone(),
                    nodes: snap.describe_nodes(),
                })
            } else {
                Ok(candidates)
            }
        }
    }
}

/// Why a session already running on the node named `node` must end now, if it must. A
/// write session lives only while its node is the one `primary()` picks; a read session
/// while its node is up (a lagging or drained standby gets no new sessions but keeps its
/// current ones).
pub fn eviction(endpoint: Endpoint, snap: &ClusterSnapshot, node: &str) -> Option<String> {
    let Some(index) = snap.index(node) else {
        return Some(format!(
            "node \"{node}\" was removed from cluster \"{}\" by a configuration reload",
            snap.name
        ));
    };
    let n = &snap.nodes[index];
    if n.health != Health::Up {
        return Some(format!(
            "node \"{}\" of cluster \"{}\" is down ({})",
            n.name,
            snap.name,
            n.last_error.as_deref().unwrap_or("health checks failed")
        ));
    }
    // An orphan (a standby left on an old timeline by a failover) serves stale data for
    // as long as it is read: its sessions end. A standby merely not streaming for a
    // moment (its primary restarting) keeps them, and only gets no new ones.
    if let Some(d @ Detached::OldTimeline { .. }) = snap.detached(index, primary(snap).ok()) {
        return Some(format!(
            "node \"{}\" of cluster \"{}\" no longer follows the primary ({d}); reconnect to read current data",
            n.name, snap.name
        ));
    }
    if endpoint == Endpoint::ReadOnly && n.role == Role::Primary && primary(snap).ok() != Some(index) {
        return Some(format!(
            "node \"{}\" reports primary but is not the primary of cluster \"{}\" (split brain or an old primary)",
            n.name, snap.name
        ));
    }
    if endpoint == Endpoint::ReadWrite {
        match write_primary(snap) {
            Ok(p) if p == index => {}
            Ok(p) => {
                return Some(format!(
                "node \"{}\" is no longer the primary of cluster \"{}\" (now {} is); reconnect to reach the primary",
                n.name, snap.name, snap.nodes[p].name
            ))
            }
            Err(e) if n.role == Role::Primary => return Some(e.to_string()),
            Err(_) => {
                return Some(format!(
                    "node \"{}\" is no longer the primary of cluster \"{}\" (it reports {})",
                    n.name, snap.name, n.role
                ))
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(e: Endpoint, snap: &ClusterSnapshot, turn: usize) -> Result<Vec<usize>, NoRoute> {
        route(e, snap, turn).map(|n| n.to_vec())
    }
    use crate::cluster::topology::{NodeState, Observation};
    use std::time::{Duration, SystemTime};

    const POLICY: Policy = Policy {
        max_replica_lag_ms: 1000,
        read_balance: ReadBalance::Priority,
        split_brain: SplitBrainRule::NewestTimeline,
    };

    /// Build a cluster from compact specs: ("name", "up"/"down", role, lag_ms, timeline).
    fn cluster(specs: &[(&str, &str, Role, u64, u32)]) -> ClusterSnapshot {
        let t = SystemTime::now();
        let nodes = specs
            .iter()
            .map(|&(name, health, role, lag, tli)| {
                let mut n = NodeState::new(name, "127.0.0.1:1");
                let result = if health == "up" {
                    Ok(Observation {
                        role,
                        lag_ms: lag,
                        lsn: None,
                        timeline: Some(tli),
                        streaming: None,
                        system_id: None,
                    })
                } else {
                    Err("connection refused".to_string())
                };
                n.apply(result, 1, 1, t);
                n
            })
            .collect();
        ClusterSnapshot::new("main", nodes, POLICY, Duration::from_secs(1))
    }

    fn with(c: &ClusterSnapshot, policy: Policy) -> ClusterSnapshot {
        ClusterSnapshot { policy, ..c.clone() }
    }

    use Role::{Primary as P, Standby as S};

    #[test]
    fn rw_goes_to_the_primary_wherever_it_is_listed() {
        let c = cluster(&[("default", "up", S, 0, 1), ("failover1", "up", P, 0, 2)]);
        assert_eq!(routed(Endpoint::ReadWrite, &c, 0), Ok(vec![1]));
    }

    #[test]
    fn rw_never_goes_to_a_standby_even_if_it_is_all_there_is() {
        let c = cluster(&[("default", "down", P, 0, 1), ("failover1", "up", S, 0, 1)]);
        let err = routed(Endpoint::ReadWrite, &c, 0).unwrap_err();
        assert!(matches!(err, NoRoute::NoPrimary { .. }));
        let msg = err.to_string();
        assert!(
            msg.starts_with("no primary available for cluster \"main\": default down (connection refused"),
            "{msg}"
        );
        assert!(msg.ends_with("; failover1 standby"), "{msg}");
    }

    #[test]
    fn ro_prefers_standbys_in_listed_order_then_the_primary() {
        let c = cluster(&[("default", "up", P, 0, 1), ("f1", "up", S, 0, 1), ("f2", "up", S, 0, 1)]);
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![1, 2, 0]));
    }

    #[test]
    fn ro_skips_down_and_lagging_standbys() {
        let c = cluster(&[
            ("default", "up", P, 0, 1),
            ("f1", "down", S, 0, 1),
            ("f2", "up", S, 5000, 1),
        ]);
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![0]));
    }

    #[test]
    fn ro_tries_a_standby_whose_last_check_failed_after_the_primary() {
        let mut c = cluster(&[("default", "up", P, 0, 1), ("f1", "up", S, 0, 1), ("f2", "up", S, 0, 1)]);
        c.nodes[1].apply(Err("no answer within 500 ms".into()), 2, 2, SystemTime::now());
        assert_eq!(c.nodes[1].health, Health::Up);
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![2, 0, 1]));
    }

    #[test]
    fn ro_with_nothing_up_names_every_node() {
        let c = cluster(&[("default", "down", P, 0, 1), ("f1", "down", S, 0, 1)]);
        let msg = routed(Endpoint::ReadOnly, &c, 0).unwrap_err().to_string();
        assert!(msg.contains("default down") && msg.contains("f1 down"), "{msg}");
    }

    #[test]
    fn ro_balancing_modes() {
        let c = cluster(&[
            ("p", "up", P, 0, 1),
            ("a", "up", S, 0, 1),
            ("b", "up", S, 0, 1),
            ("c", "up", S, 0, 1),
        ]);
        let rr = Policy {
            read_balance: ReadBalance::RoundRobin,
            ..POLICY
        };
        assert_eq!(routed(Endpoint::ReadOnly, &with(&c, rr), 1), Ok(vec![2, 3, 1, 0]));
        assert_eq!(routed(Endpoint::ReadOnly, &with(&c, rr), 3), Ok(vec![1, 2, 3, 0]));
        let lc = Policy {
            read_balance: ReadBalance::LeastConnections,
            ..POLICY
        };
        for (node, n) in c.nodes.iter().zip([0, 5, 1, 5]) {
            node.active.store(n, std::sync::atomic::Ordering::Relaxed);
        }
        assert_eq!(routed(Endpoint::ReadOnly, &with(&c, lc), 0), Ok(vec![2, 1, 3, 0]));
    }

    #[test]
    fn split_brain_newest_timeline_wins() {
        // The old primary (timeline 1) came back after failover1 was promoted (timeline 2).
        let c = cluster(&[
            ("default", "up", P, 0, 1),
            ("failover1", "up", P, 0, 2),
            ("failover2", "up", S, 0, 2),
        ]);
        assert_eq!(routed(Endpoint::ReadWrite, &c, 0), Ok(vec![1]));
        // Reads never fall back on the loser.
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![2, 1]));
        assert!(eviction(Endpoint::ReadWrite, &c, "default")
            .unwrap()
            .contains("no longer the primary"));
        assert_eq!(eviction(Endpoint::ReadWrite, &c, "failover1"), None);
    }

    #[test]
    fn split_brain_tie_or_refuse_rule_names_both_nodes() {
        let tie = cluster(&[("default", "up", P, 0, 2), ("failover1", "up", P, 0, 2)]);
        let msg = routed(Endpoint::ReadWrite, &tie, 0).unwrap_err().to_string();
        assert!(
            msg.contains("split brain") && msg.contains("default and failover1"),
            "{msg}"
        );
        let c = cluster(&[("default", "up", P, 0, 1), ("failover1", "up", P, 0, 2)]);
        let refuse = Policy {
            split_brain: SplitBrainRule::Refuse,
            ..POLICY
        };
        assert!(matches!(
            routed(Endpoint::ReadWrite, &with(&c, refuse), 0),
            Err(NoRoute::SplitBrain { .. })
        ));
        // Running write sessions on either primary are ended.
        assert!(eviction(Endpoint::ReadWrite, &with(&c, refuse), "failover1")
            .unwrap()
            .contains("split brain"));
        // With no primary to trust, reads have nowhere to go but standbys.
        assert!(routed(Endpoint::ReadOnly, &with(&c, refuse), 0).is_err());
    }

    #[test]
    fn an_old_primary_never_gets_writes_even_when_the_new_one_is_down() {
        // failover1 was promoted (timeline 2) and is now unreachable; default, the old
        // primary on timeline 1, is back.
        let mut c = cluster(&[("default", "up", P, 0, 1), ("failover1", "down", P, 0, 2)]);
        c.newest_timeline = 2;
        let err = routed(Endpoint::ReadWrite, &c, 0).unwrap_err();
        assert!(matches!(err, NoRoute::StalePrimary { .. }));
        assert!(
            err.to_string()
                .contains("default (timeline 1) reports primary but timeline 2"),
            "{err}"
        );
        // Its read sessions are ended too, and no new ones go there.
        assert!(eviction(Endpoint::ReadOnly, &c, "default")
            .unwrap()
            .contains("old primary"));
        assert!(routed(Endpoint::ReadOnly, &c, 0).is_err());
    }

    #[test]
    fn eviction_rules() {
        let c = cluster(&[
            ("default", "up", S, 0, 1),
            ("f1", "down", S, 0, 1),
            ("f2", "up", S, 99999, 1),
        ]);
        assert!(eviction(Endpoint::ReadWrite, &c, "default")
            .unwrap()
            .contains("no longer the primary"));
        assert!(eviction(Endpoint::ReadOnly, &c, "f1")
            .unwrap()
            .contains("is down (connection refused)"));
        // A lagging standby keeps its read sessions.
        assert_eq!(eviction(Endpoint::ReadOnly, &c, "f2"), None);
        // A node removed by a reload ends its sessions.
        assert!(eviction(Endpoint::ReadOnly, &c, "gone").unwrap().contains("removed"));
    }

    #[test]
    fn drained_nodes_get_no_new_sessions_but_keep_their_current_ones() {
        let mut c = cluster(&[("default", "up", P, 0, 1), ("f1", "up", S, 0, 1), ("f2", "up", S, 0, 1)]);
        c.nodes[1].drained = true;
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![2, 0]));
        assert_eq!(eviction(Endpoint::ReadOnly, &c, "f1"), None);
        c.nodes[0].drained = true;
        let err = routed(Endpoint::ReadWrite, &c, 0).unwrap_err().to_string();
        assert!(err.contains("default primary (drained)"), "{err}");
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![2]));
        assert_eq!(eviction(Endpoint::ReadWrite, &c, "default"), None);
    }

    #[test]
    fn a_standby_not_following_the_primary_gets_no_reads() {
        // After a failover: f1 promoted (timeline 2); f2 still streams timeline 1 from
        // nowhere (an orphan); f3 follows f1 but its receiver is reconnecting.
        let mut c = cluster(&[
            ("default", "down", P, 0, 1),
            ("f1", "up", P, 0, 2),
            ("f2", "up", S, 0, 1),
            ("f3", "up", S, 0, 2),
        ]);
        c.nodes[3].streaming = Some(false);
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![1]));
        assert!(eviction(Endpoint::ReadOnly, &c, "f2")
            .unwrap()
            .contains("on timeline 1, older than the primary's 2"));
        // Not streaming for a moment keeps current sessions.
        assert_eq!(eviction(Endpoint::ReadOnly, &c, "f3"), None);
        // Both follow again: both read.
        c.nodes[2].timeline = Some(2);
        c.nodes[3].streaming = Some(true);
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![2, 3, 1]));
        // With no primary up, standbys serve reads whatever they stream.
        let mut c = cluster(&[("default", "down", P, 0, 1), ("f2", "up", S, 0, 1)]);
        c.nodes[1].streaming = Some(false);
        assert_eq!(routed(Endpoint::ReadOnly, &c, 0), Ok(vec![1]));
    }

    #[test]
    fn a_fenced_primary_is_never_the_primary() {
        // After a switchover: the old primary still reports primary (read-only), the new
        // one too; even the "refuse" rule picks the new one.
        let mut c = with(
            &cluster(&[("default", "up", P, 0, 1), ("failover1", "up", P, 0, 2)]),
            Policy {
                split_brain: SplitBrainRule::Refuse,
                ..POLICY
            },
        );
        assert!(primary(&c).is_err());
        c.nodes[0].fenced = true;
        assert_eq!(primary(&c), Ok(1));
        // Fenced and alone: no primary at all.
        c.nodes[1].health = Health::Down;
        assert!(primary(&c).is_err());
    }
}
