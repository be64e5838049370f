//! The control plane: changing which node is the primary. A planned `switchover`
//! (operator's request) and an automatic `failover` (primary lost), both through the
//! `manager` superuser login; the two never run at once on a cluster (`ClusterCtx::ha`).
//! With `[coordination]`, several instances agree through etcd (`coord`, over `etcd`):
//! one leader decides, and writes go only to the primary it published.

pub mod coord;
pub mod etcd;
pub mod failover;
pub mod manager;
pub mod switchover;
