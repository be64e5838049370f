//! The coordination's decisions, pure functions of a snapshot and the view read from
//! etcd: whether a failover has the agreement it needs (`failover_gate`), whether the
//! leader should publish the primary it sees (`should_publish`), and the next step of a
//! publication (withdraw, then publish once every instance applied it).

use super::View;
use crate::cluster::topology::{ClusterSnapshot, Health, Role};

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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cluster::topology::{NodeState, Observation, Policy};
    use std::time::Duration;

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
