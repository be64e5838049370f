//! Unit tests of the node state and the cluster snapshot: rise/fall, lag, timelines, detached standbys, the per-thread snapshot copies.

use super::*;

fn ok(role: Role) -> Result<Observation, String> {
    Ok(Observation {
        role,
        lag_ms: 0,
        lsn: Some(100),
        timeline: Some(1),
        streaming: None,
        system_id: None,
    })
}

#[test]
fn first_check_decides_then_fall_and_rise_apply() {
    let t = SystemTime::now();
    let mut n = NodeState::new("a", "h:1");
    let tr = n.apply(ok(Role::Primary), 2, 3, t).unwrap();
    assert_eq!((tr.new_health, tr.new_role), (Health::Up, Role::Primary));
    // Two failures with fall = 3: still up, still primary.
    assert!(n.apply(Err("refused".into()), 2, 3, t).is_none());
    assert!(n.apply(Err("refused".into()), 2, 3, t).is_none());
    assert_eq!(n.health, Health::Up);
    let tr = n.apply(Err("refused".into()), 2, 3, t).unwrap();
    assert_eq!((tr.new_health, tr.new_role), (Health::Down, Role::Unknown));
    assert!(tr.reason.contains("3 consecutive"));
    // One success with rise = 2 is not enough.
    assert!(n.apply(ok(Role::Standby), 2, 3, t).is_none());
    assert_eq!(n.health, Health::Down);
    let tr = n.apply(ok(Role::Standby), 2, 3, t).unwrap();
    assert_eq!((tr.new_health, tr.new_role), (Health::Up, Role::Standby));
}

#[test]
fn a_failure_in_between_resets_the_streak() {
    let t = SystemTime::now();
    let mut n = NodeState::new("a", "h:1");
    n.apply(ok(Role::Standby), 2, 2, t);
    n.apply(Err("x".into()), 2, 2, t);
    n.apply(ok(Role::Standby), 2, 2, t);
    n.apply(Err("x".into()), 2, 2, t);
    assert_eq!(n.health, Health::Up);
}

#[test]
fn a_fenced_node_promoted_again_on_a_newer_timeline_is_no_longer_fenced() {
    let t = SystemTime::now();
    let primary = |timeline| {
        Ok(Observation {
            role: Role::Primary,
            lag_ms: 0,
            lsn: Some(1),
            timeline: Some(timeline),
            streaming: None,
            system_id: None,
        })
    };
    let mut n = NodeState::new("a", "h:1");
    n.apply(primary(3), 1, 1, t);
    n.fenced = true;
    // Still the old primary (down and back on the same timeline): fenced.
    n.apply(Err("refused".into()), 1, 1, t);
    n.apply(primary(3), 1, 1, t);
    assert!(n.fenced);
    // Rewound and promoted by someone else (timeline 4) without a check seeing it
    // as a standby in between.
    n.apply(primary(4), 1, 1, t);
    assert!(!n.fenced);
}

#[test]
fn role_change_is_immediate() {
    let t = SystemTime::now();
    let mut n = NodeState::new("a", "h:1");
    n.apply(ok(Role::Standby), 2, 2, t);
    let tr = n.apply(ok(Role::Primary), 2, 2, t).unwrap();
    assert_eq!((tr.old_role, tr.new_role), (Role::Standby, Role::Primary));
    assert!(tr.reason.contains("promoted"));
}

#[test]
fn describe_names_state_and_reason() {
    let t = SystemTime::now();
    let mut n = NodeState::new("default", "h:1");
    n.apply(Err("connection refused".into()), 2, 2, t);
    assert_eq!(
        n.describe(t + Duration::from_secs(4)),
        "default down (connection refused, 4s ago)"
    );
}

/// Cluster "c" with nodes "p" and "s", not checked yet.
fn primary_and_standby() -> Arc<ClusterState> {
    let policy = Policy {
        max_replica_lag_ms: 1000,
        read_balance: crate::config::ReadBalance::Priority,
        split_brain: crate::config::SplitBrainRule::Refuse,
    };
    let nodes = vec![NodeState::new("p", "h:1"), NodeState::new("s", "h:2")];
    ClusterState::new(ClusterSnapshot::new("c", nodes, policy, Duration::from_secs(1)), |s| {
        crate::cluster::routing::primary(s).ok()
    })
}

fn obs(role: Role, lsn: u64) -> Result<Observation, String> {
    Ok(Observation {
        role,
        lag_ms: 0,
        lsn: Some(lsn),
        timeline: Some(1),
        streaming: None,
        system_id: None,
    })
}

#[test]
fn the_moment_the_primary_was_lost_is_kept_until_one_is_back() {
    let state = primary_and_standby();
    // Not checked yet: no primary since start.
    let start = state
        .snapshot()
        .no_primary_since
        .expect("no primary before the first check");
    state.record("p", obs(Role::Primary, 100), 1, 1);
    state.record("s", obs(Role::Standby, 100), 1, 1);
    assert_eq!(state.snapshot().no_primary_since, None);
    // The primary goes down: the clock starts, and later checks do not restart it.
    state.record("p", Err("connection refused".into()), 1, 1);
    let lost = state.snapshot().no_primary_since.expect("primary down");
    assert!(lost >= start);
    state.record("s", obs(Role::Standby, 100), 1, 1);
    state.record("p", Err("connection refused".into()), 1, 1);
    assert_eq!(state.snapshot().no_primary_since, Some(lost));
    assert_eq!(
        crate::cluster::freshness::reads_held_until(&state.snapshot()),
        Some(lost + state.snapshot().failover_hold)
    );
    // The standby is promoted: a primary again.
    state.record("s", obs(Role::Primary, 200), 1, 1);
    assert_eq!(state.snapshot().no_primary_since, None);
    assert_eq!(crate::cluster::freshness::reads_held_until(&state.snapshot()), None);
}

#[test]
fn standby_lag_is_the_age_of_the_oldest_primary_position_not_replayed() {
    let state = primary_and_standby();
    // The standby claims no lag itself (its receiver is cut off), but it is stuck at
    // 100 while the primary moved to 200 and then 300.
    state.record("p", obs(Role::Primary, 200), 1, 1);
    std::thread::sleep(Duration::from_millis(30));
    state.record("p", obs(Role::Primary, 300), 1, 1);
    state.record("s", obs(Role::Standby, 100), 1, 1);
    let lag = state.snapshot().nodes[1].lag_ms.unwrap();
    assert!(lag >= 30, "lag {lag}");
    // Caught up with the newest sample: no lag.
    state.record("s", obs(Role::Standby, 300), 1, 1);
    assert_eq!(state.snapshot().nodes[1].lag_ms, Some(0));
}

#[test]
fn byte_lag_is_measured_from_the_single_primary() {
    let state = primary_and_standby();
    state.record("p", obs(Role::Primary, 1000), 1, 1);
    state.record("s", obs(Role::Standby, 400), 1, 1);
    assert_eq!(state.snapshot().nodes[1].lag_bytes, Some(600));
    // Both first checks are events.
    let events = state.events();
    assert_eq!(events.len(), 2);
    assert_eq!((events[0].node.as_str(), events[0].new.as_str()), ("p", "up/primary"));
}

#[test]
fn a_check_begun_before_the_last_recorded_one_is_dropped() {
    let state = primary_and_standby();
    let early = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(2));
    // The control plane promoted "s" and recorded what it saw then...
    state.record("s", obs(Role::Primary, 500), 1, 1);
    // ...and the monitor's check, sent before the promotion, answers late.
    assert!(state.record_from("s", obs(Role::Standby, 400), early, 1, 1).is_none());
    assert_eq!(state.snapshot().nodes[1].role, Role::Primary);
    // Its next check counts again.
    state.record_from("s", obs(Role::Standby, 600), std::time::Instant::now(), 1, 1);
    assert_eq!(state.snapshot().nodes[1].role, Role::Standby);
}
