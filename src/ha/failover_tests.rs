//! Unit tests of the automatic failover's pure rules (`trigger`, `choose`): snapshots in, decisions out.

use std::time::{Duration, SystemTime};

use super::*;
use crate::cluster::topology::{NodeState, Observation, Policy};
use crate::config::{ReadBalance, SplitBrainRule};

const POLICY: Policy = Policy {
    max_replica_lag_ms: 1000,
    read_balance: ReadBalance::Priority,
    split_brain: SplitBrainRule::NewestTimeline,
};

/// ("name", "up"/"down", role): a node seen up once, then (if "down") failing `fall`
/// checks in a row, as the monitor would record it.
fn cluster(specs: &[(&str, &str, Role)]) -> ClusterSnapshot {
    let t = SystemTime::now();
    let nodes = specs
        .iter()
        .map(|&(name, health, role)| {
            let mut n = NodeState::new(name, "127.0.0.1:1");
            let seen = Observation {
                role,
                lag_ms: 0,
                lsn: Some(1000),
                timeline: Some(1),
                streaming: None,
                system_id: None,
            };
            n.apply(Ok(seen), 2, 3, t);
            if health == "down" {
                for _ in 0..3 {
                    n.apply(Err("connection refused".into()), 2, 3, t);
                }
            }
            n
        })
        .collect();
    ClusterSnapshot::new("main", nodes, POLICY, Duration::from_secs(1))
}

use Role::{Primary as P, Standby as S};

#[test]
fn a_down_primary_with_no_other_primary_triggers() {
    let c = cluster(&[("default", "down", P), ("failover1", "up", S)]);
    assert_eq!(trigger(&c, Some("default"), false, None), Trigger::Go { old: 0 });
}

#[test]
fn an_up_primary_anywhere_means_nothing_to_do() {
    let c = cluster(&[("default", "up", P), ("failover1", "up", S)]);
    assert_eq!(trigger(&c, Some("default"), false, None), Trigger::Nothing);
    // Someone else already promoted failover1.
    let c = cluster(&[("default", "down", P), ("failover1", "up", P)]);
    assert_eq!(trigger(&c, Some("default"), false, None), Trigger::Nothing);
}

#[test]
fn an_old_primary_that_came_back_is_no_primary() {
    // default was failed over (fenced), came back on the old timeline; failover1, the
    // new primary, is down now.
    let mut c = cluster(&[("default", "up", P), ("failover1", "down", P), ("failover2", "up", S)]);
    c.nodes[0].fenced = true;
    assert_eq!(trigger(&c, Some("failover1"), false, None), Trigger::Go { old: 1 });
    c.nodes[0].fenced = false;
    c.newest_timeline = 2;
    assert_eq!(trigger(&c, Some("failover1"), false, None), Trigger::Go { old: 1 });
    c.nodes[0].timeline = Some(2);
    assert_eq!(trigger(&c, Some("failover1"), false, None), Trigger::Nothing);
}

#[test]
fn a_primary_failing_fewer_checks_than_fall_does_not_trigger() {
    let mut c = cluster(&[("default", "up", P), ("failover1", "up", S)]);
    for _ in 0..2 {
        c.nodes[0].apply(Err("timeout".into()), 2, 3, SystemTime::now());
    }
    assert_eq!(c.nodes[0].health, Health::Up);
    assert_eq!(trigger(&c, Some("default"), false, None), Trigger::Nothing);
}

#[test]
fn no_primary_ever_seen_means_no_failover() {
    let c = cluster(&[("default", "down", P), ("failover1", "up", S)]);
    assert_eq!(trigger(&c, None, false, None), Trigger::Nothing);
}

#[test]
fn pause_and_cooldown_make_it_wait_with_a_reason() {
    let c = cluster(&[("default", "down", P), ("failover1", "up", S)]);
    let Trigger::Wait(why) = trigger(&c, Some("default"), true, None) else {
        panic!("paused must wait");
    };
    assert!(why.contains("paused"), "{why}");
    let Trigger::Wait(why) = trigger(&c, Some("default"), false, Some(Duration::from_secs(42))) else {
        panic!("cooldown must wait");
    };
    assert!(
        why.contains("failover_cooldown_s") && why.contains("43 s left"),
        "{why}"
    );
}

fn cand(index: usize, name: &str, timeline: u32, received: u64) -> Candidate {
    Candidate {
        index,
        name: name.into(),
        timeline: Some(timeline),
        received: Some(received),
        replayed: Some(received.saturating_sub(100)),
        hears_primary: false,
    }
}

#[test]
fn the_most_caught_up_standby_is_chosen() {
    let cands = [cand(1, "failover1", 1, 5000), cand(2, "failover2", 1, 7000)];
    assert_eq!(choose(&cands, "default", Some(7000), 1 << 20), Ok(1));
}

#[test]
fn a_newer_timeline_beats_more_wal() {
    let cands = [cand(1, "failover1", 2, 100), cand(2, "failover2", 1, 9000)];
    assert_eq!(choose(&cands, "default", None, 1 << 20), Ok(0));
}

#[test]
fn equal_positions_go_to_the_higher_priority() {
    let cands = [cand(2, "failover2", 1, 5000), cand(1, "failover1", 1, 5000)];
    assert_eq!(choose(&cands, "default", Some(5000), 0), Ok(1));
}

#[test]
fn a_standby_lagging_past_the_bound_is_refused() {
    let cands = [cand(1, "failover1", 1, 1000)];
    let err = choose(&cands, "default", Some(1000 + 4096), 4095).unwrap_err();
    assert!(
        err.contains("failover1") && err.contains("4096 bytes") && err.contains("failover_max_lag_bytes"),
        "{err}"
    );
    assert_eq!(choose(&cands, "default", Some(1000 + 4096), 4096), Ok(0));
    // A standby ahead of the last position seen (checks are periodic) is fine.
    assert_eq!(choose(&cands, "default", Some(10), 0), Ok(0));
}

#[test]
fn a_standby_still_hearing_the_primary_vetoes_the_failover() {
    let mut cands = [cand(1, "failover1", 1, 5000), cand(2, "failover2", 1, 5000)];
    cands[1].hears_primary = true;
    let err = choose(&cands, "default", None, 1 << 20).unwrap_err();
    assert!(err.contains("failover2 still receives WAL from default"), "{err}");
}

#[test]
fn no_candidate_is_an_error_naming_the_primary() {
    let err = choose(&[], "default", None, 1 << 20).unwrap_err();
    assert!(err.contains("no standby of default"), "{err}");
}

#[test]
fn a_received_position_unknown_falls_back_to_replayed() {
    let mut a = cand(1, "failover1", 1, 0);
    a.received = None;
    a.replayed = Some(8000);
    let b = cand(2, "failover2", 1, 5000);
    assert_eq!(choose(&[a, b], "default", Some(8000), 0), Ok(0));
}
