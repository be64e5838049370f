//! Fresh reads: which standby has replayed far enough for a read that must see a given
//! write, and how to find that out without waiting for the next health check.
//!
//! A **floor** is a WAL position on a timeline. A client's floor rises when one of its
//! write units commits on the primary (read-your-writes) and when it presents a causal
//! token. A standby may serve a read with a floor when it streams the floor's timeline
//! and has replayed up to the floor's position; else the read waits up to
//! `causal_wait_ms` for one to get there, then goes to the primary.
//!
//! The pure rules (`Token`, `Floor`, `required`, `qualifies`) are here with their tests;
//! the I/O around them is the engine's (`pg::freshness::Freshness`):
//! - the **oracle** answers "a primary WAL position at or after every commit already
//!   acknowledged" with `pg_current_wal_insert_lsn()` on the primary. It is asked lazily,
//!   by the first read that follows a write (or a `SHOW switchyard.causal_token`), never
//!   per write, so write-only and read-only traffic pay nothing; concurrent askers share
//!   one query (each needs only a query *started* after its own commit).
//! - a **probe** per standby polls `pg_last_wal_replay_lsn()` every few milliseconds,
//!   only while some read waits on that standby, and publishes what it saw.
//!

use std::fmt;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::cluster::topology::{ClusterSnapshot, Health, Role};

/// A WAL position on a timeline: what a read must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floor {
    pub timeline: u32,
    pub lsn: u64,
}

impl Floor {
    /// A floor at least as demanding as both. Positions on different timelines are not
    /// comparable; the newer timeline wins and the position is the larger of the two,
    /// which can only ask for more than needed, never less.
    pub fn join(a: Option<Floor>, b: Option<Floor>) -> Option<Floor> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Floor {
                timeline: a.timeline.max(b.timeline),
                lsn: a.lsn.max(b.lsn),
            }),
            (a, b) => a.or(b),
        }
    }
}

/// The floor of a client's writes for read-your-writes: kept per client connection, or
/// shared by every connection of one user to one database (`read_your_writes = "user"`,
/// for applications that write on one connection and read on the next).
#[derive(Default)]
pub struct WriteFloor {
    inner: Mutex<WriteFloorState>,
}

#[derive(Default)]
struct WriteFloorState {
    floor: Option<Floor>,
    /// Writes that ended so far, and how many of them `floor` is known to cover.
    writes: u64,
    covered: u64,
}

impl WriteFloor {
    /// A unit that may have written ended on the primary.
    pub fn wrote(&self) {
        self.inner.lock().unwrap().writes += 1;
    }

    /// The floor learned so far, and the write count a new floor must cover if some
    /// write is not covered yet.
    pub fn pending(&self) -> (Option<Floor>, Option<u64>) {
        let s = self.inner.lock().unwrap();
        (s.floor, (s.writes > s.covered).then_some(s.writes))
    }

    /// Writes that ended so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap().writes
    }

    /// `floor` was asked for after the first `covers` writes had ended.
    pub fn learned(&self, floor: Floor, covers: u64) {
        let mut s = self.inner.lock().unwrap();
        s.floor = Floor::join(s.floor, Some(floor));
        s.covered = s.covered.max(covers);
    }
}

/// The text form of a floor that clients carry between connections: version, cluster
/// system identifier (0 if unknown), timeline, position, e.g. `sy1.1b2f….1.3000148`.
/// Opaque to clients; all hex so it needs no quoting anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub system_id: u64,
    pub floor: Floor,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    OtherCluster { token: u64, cluster: u64 },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed => f.write_str(
                "invalid value for switchyard.causal_token: not a token from SHOW switchyard.causal_token",
            ),
            TokenError::OtherCluster { token, cluster } => write!(
                f,
                "switchyard.causal_token comes from another cluster (system identifier {token}, this cluster is {cluster}); use a token from this cluster's connections"
            ),
        }
    }
}

impl Token {
    pub fn encode(&self) -> String {
        format!(
            "sy1.{:x}.{:x}.{:x}",
            self.system_id, self.floor.timeline, self.floor.lsn
        )
    }

    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let mut parts = text.trim().split('.');
        let hex = |p: Option<&str>| {
            p.filter(|p| !p.is_empty() && p.len() <= 16)
                .and_then(|p| u64::from_str_radix(p, 16).ok())
        };
        if parts.next() != Some("sy1") {
            return Err(TokenError::Malformed);
        }
        let (Some(system_id), Some(timeline), Some(lsn), None) =
            (hex(parts.next()), hex(parts.next()), hex(parts.next()), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let timeline = u32::try_from(timeline).map_err(|_| TokenError::Malformed)?;
        Ok(Token {
            system_id,
            floor: Floor { timeline, lsn },
        })
    }

    /// The token's floor, if it belongs to the cluster whose identifier is `cluster`
    /// (unknown on either side: accepted).
    pub fn check(&self, cluster: Option<u64>) -> Result<Floor, TokenError> {
        match cluster {
            Some(c) if self.system_id != 0 && self.system_id != c => Err(TokenError::OtherCluster {
                token: self.system_id,
                cluster: c,
            }),
            _ => Ok(self.floor),
        }
    }
}

/// Parse a token text and check it belongs to the cluster: the empty text is no token.
pub fn parse_token(text: &str, snap: &ClusterSnapshot) -> Result<Option<Floor>, TokenError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    Token::parse(text)?.check(snap.system_id).map(Some)
}

/// What a standby must have done to serve a read with `floor`, given what is known of
/// the cluster's timelines: `None` when no standby can (the floor is on a timeline newer
/// than any primary seen: only the primary knows it).
///
/// A floor from an older timeline (a token from before a failover) is judged on the
/// current one: a standby must stream it and be past the point where it began
/// (`timeline_start`), which means it has left the old history behind; the old position
/// still counts, since history below the switch point is shared.
pub fn required(snap: &ClusterSnapshot, floor: Floor) -> Option<Floor> {
    let newest = snap.newest_timeline;
    if newest == 0 || floor.timeline == newest {
        return Some(floor);
    }
    if floor.timeline > newest {
        return None;
    }
    Some(Floor {
        timeline: newest,
        lsn: floor.lsn.max(snap.timeline_start),
    })
}

/// May standby `i` serve a read that needs `need` (from `required`), having replayed up
/// to `replayed`? It must stream the right timeline; when its timeline is not visible
/// (a health user without `pg_read_all_stats`) the cluster's newest is assumed.
pub fn qualifies(snap: &ClusterSnapshot, i: usize, need: Floor, replayed: u64) -> bool {
    let n = &snap.nodes[i];
    if n.health != Health::Up || n.role != Role::Standby {
        return false;
    }
    let timeline = n.timeline.unwrap_or(snap.newest_timeline);
    (timeline == need.timeline || need.timeline == 0) && replayed >= need.lsn
}

/// Has primary `i` every write up to `floor`? Yes on its own timeline or an older one
/// (history below a switch point is shared; what an old timeline wrote after it is gone
/// anyway), no on a newer one; an unknown timeline is taken as current.
pub fn primary_has(snap: &ClusterSnapshot, i: usize, floor: Option<Floor>) -> bool {
    match (floor, snap.nodes[i].timeline) {
        (Some(f), Some(t)) => f.timeline <= t,
        _ => true,
    }
}

/// Until when reads that must see something (a floor, or writes whose position the
/// primary could not tell) wait for a primary rather than take a standby that has not
/// shown it has them: `failover_hold` from the moment the cluster lost its primary.
/// A missing primary is most often a failover under way (Switchyard's own with
/// `failover = "automatic"`), and a standby that is behind now may be the one that
/// becomes primary and catches up, or be left behind by it. After the hold, the
/// standbys that are left serve such reads, as fresh as they are (reads go on through
/// an outage). `None`: a primary is up.
pub fn reads_held_until(snap: &ClusterSnapshot) -> Option<Instant> {
    snap.no_primary_since.map(|since| since + snap.failover_hold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::topology::{NodeState, Observation, Policy};
    use std::time::{Duration, SystemTime};

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        let t = Token {
            system_id: 0x7301_2345_6789_abcd,
            floor: Floor {
                timeline: 2,
                lsn: 0x16_B374_D848,
            },
        };
        assert_eq!(t.encode(), "sy1.730123456789abcd.2.16b374d848");
        assert_eq!(Token::parse(&t.encode()), Ok(t));
        for bad in [
            "",
            "sy1",
            "sy2.1.1.1",
            "sy1.1.1",
            "sy1.1.1.1.1",
            "sy1.x.1.1",
            "sy1.1.100000000.1",
            "sy1..1.1",
        ] {
            assert_eq!(Token::parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn a_token_of_another_cluster_is_refused() {
        let t = Token::parse("sy1.aa.1.10").unwrap();
        assert_eq!(t.check(Some(0xaa)), Ok(Floor { timeline: 1, lsn: 0x10 }));
        assert_eq!(t.check(None), Ok(Floor { timeline: 1, lsn: 0x10 }));
        assert_eq!(
            t.check(Some(0xbb)),
            Err(TokenError::OtherCluster {
                token: 0xaa,
                cluster: 0xbb
            })
        );
        assert!(TokenError::OtherCluster { token: 1, cluster: 2 }
            .to_string()
            .contains("another cluster"));
    }

    #[test]
    fn a_write_floor_covers_only_the_writes_before_it_was_asked() {
        let w = WriteFloor::default();
        assert_eq!(w.pending(), (None, None));
        w.wrote();
        let (_, Some(n)) = w.pending() else {
            panic!("a write is pending")
        };
        // Another write ends while the primary is being asked.
        w.wrote();
        w.learned(Floor { timeline: 1, lsn: 10 }, n);
        assert_eq!(w.pending(), (Some(Floor { timeline: 1, lsn: 10 }), Some(2)));
        w.learned(Floor { timeline: 1, lsn: 20 }, 2);
        assert_eq!(w.pending(), (Some(Floor { timeline: 1, lsn: 20 }), None));
    }

    #[test]
    fn join_asks_for_the_most() {
        let a = Floor { timeline: 1, lsn: 100 };
        let b = Floor { timeline: 2, lsn: 50 };
        assert_eq!(Floor::join(Some(a), None), Some(a));
        assert_eq!(Floor::join(None, Some(b)), Some(b));
        assert_eq!(Floor::join(Some(a), Some(b)), Some(Floor { timeline: 2, lsn: 100 }));
        assert_eq!(Floor::join(None, None), None);
    }

    /// Primary "p" on timeline `tli` at 1000; standbys "s1" (streaming `s1_tli`, replayed
    /// 900) and "s2" (streaming `tli`, replayed 500).
    fn cluster(tli: u32, s1_tli: u32) -> ClusterSnapshot {
        let t = SystemTime::now();
        let obs = |role, lsn, timeline| {
            Ok(Observation {
                role,
                lag_ms: 0,
                lsn: Some(lsn),
                timeline: Some(timeline),
                streaming: Some(true),
                system_id: None,
            })
        };
        let mut nodes = vec![
            NodeState::new("p", "h:1"),
            NodeState::new("s1", "h:2"),
            NodeState::new("s2", "h:3"),
        ];
        nodes[0].apply(obs(Role::Primary, 1000, tli), 1, 1, t);
        nodes[1].apply(obs(Role::Standby, 900, s1_tli), 1, 1, t);
        nodes[2].apply(obs(Role::Standby, 500, tli), 1, 1, t);
        let policy = Policy {
            max_replica_lag_ms: 1000,
            read_balance: crate::config::ReadBalance::Priority,
            split_brain: crate::config::SplitBrainRule::Refuse,
        };
        let mut s = ClusterSnapshot::new("c", nodes, policy, Duration::from_secs(1));
        s.newest_timeline = tli;
        s.timeline_start = 700;
        s
    }

    #[test]
    fn an_old_primary_does_not_have_a_floor_from_a_newer_timeline() {
        // Another instance's token after a failover this one has not seen yet: p still
        // reports timeline 1.
        let s = cluster(1, 1);
        assert!(!primary_has(&s, 0, Some(Floor { timeline: 2, lsn: 10 })));
        assert!(primary_has(&s, 0, Some(Floor { timeline: 1, lsn: 5000 })));
        assert!(primary_has(&s, 0, None));
        let s = cluster(3, 3);
        assert!(primary_has(&s, 0, Some(Floor { timeline: 2, lsn: 10 })));
    }

    #[test]
    fn a_standby_serves_a_floor_once_it_replayed_it_on_its_timeline() {
        let s = cluster(1, 1);
        let need = required(&s, Floor { timeline: 1, lsn: 800 }).unwrap();
        assert!(qualifies(&s, 1, need, 900));
        assert!(!qualifies(&s, 2, need, 500));
        // A probe saw it move on.
        assert!(qualifies(&s, 2, need, 800));
        // The primary is never a "qualifying standby".
        assert!(!qualifies(&s, 0, need, 1000));
    }

    #[test]
    fn a_floor_from_before_a_failover_needs_the_new_timeline_past_its_start() {
        // Timeline 2 began at or before 700; s1 still streams timeline 1 (an orphan).
        let s = cluster(2, 1);
        let need = required(&s, Floor { timeline: 1, lsn: 300 }).unwrap();
        assert_eq!(need, Floor { timeline: 2, lsn: 700 });
        assert!(!qualifies(&s, 1, need, 900), "an orphan never qualifies");
        assert!(!qualifies(&s, 2, need, 500), "not past the switch yet");
        assert!(qualifies(&s, 2, need, 700));
    }

    #[test]
    fn a_floor_from_a_timeline_not_seen_yet_goes_to_the_primary() {
        let s = cluster(1, 1);
        assert_eq!(required(&s, Floor { timeline: 3, lsn: 1 }), None);
    }

    #[test]
    fn parse_token_checks_the_cluster() {
        let mut s = cluster(1, 1);
        assert_eq!(parse_token("", &s), Ok(None));
        s.system_id = Some(0xaa);
        assert_eq!(parse_token("sy1.aa.1.10", &s), Ok(Some(Floor { timeline: 1, lsn: 16 })));
        assert!(matches!(
            parse_token("sy1.bb.1.10", &s),
            Err(TokenError::OtherCluster { .. })
        ));
    }
}
