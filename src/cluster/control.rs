//! What the control plane (`ha/`) does to servers, as one interface both engines
//! implement (`pg::manager::PgControl`, `mysql::manager::MyControl`), so that failover
//! and switchover are written once: their steps, bounds, coordination and the order of
//! fencing, repointing and promoting are the same for PostgreSQL and MySQL/MariaDB; only
//! the statements differ.
//!
//! Every method works on a connection the caller opened with [`Control::connect`] as
//! the cluster's `[clusters.NAME.manager]` login. The caller bounds each call with its
//! own deadline (a frozen server must not stall a failover); methods that wait on the
//! server (`promote`, `wait_applied`) are given how long they may.

use std::future::Future;
use std::time::Duration;

use crate::cluster::topology::{NodeState, Observation};

/// What a standby said when asked just before a failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Index in the snapshot (lower = higher priority).
    pub index: usize,
    pub name: String,
    /// PostgreSQL's timeline; None on MySQL (no timelines).
    pub timeline: Option<u32>,
    /// What it received and will apply: WAL position (PostgreSQL, bytes), or the number
    /// of transactions in its received GTID set (MySQL: `Gtid_IO_Pos` /
    /// `Retrieved_Gtid_Set` joined with what it executed).
    pub received: Option<u64>,
    /// What it applied, in the same unit.
    pub replayed: Option<u64>,
    /// Its replication connection to the primary is alive (PostgreSQL: its WAL receiver
    /// heard from it within the fall window; MySQL: the IO thread is connected). The
    /// primary then lives, cut off from Switchyard only: no failover.
    pub hears_primary: bool,
}

impl Candidate {
    pub fn position(&self) -> u64 {
        self.received.max(self.replayed).unwrap_or(0)
    }
}

/// Where a fenced primary stopped: what a standby must have applied before it may be
/// promoted in a switchover (PostgreSQL: a WAL position; MySQL: a GTID set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark(pub String);

/// What became of an old primary the control plane looked at after a failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaim {
    /// It was a standby already (someone rejoined it): nothing to do.
    Standby,
    /// It was writable: made read-only and its client sessions ended. It stays out of
    /// routing until it is made a standby (PostgreSQL: `pg_rewind` by the operator).
    Fenced,
    /// Made read-only and rejoined as a replica of the new primary (its history was a
    /// prefix of the new primary's).
    Rejoined,
    /// Made read-only, not rejoined: it has transactions the new primary lacks (named).
    Diverged(String),
    /// Made read-only; it could be rejoined, but Switchyard cannot do it (why).
    NotRejoined(String),
}

/// One engine's operations on servers for the control plane.
pub trait Control: Send + Sync + 'static {
    /// A manager connection to one node.
    type Conn: Send;

    /// Log in to `node` as the manager, within `timeout`.
    fn connect(&self, node: &NodeState, timeout: Duration) -> impl Future<Output = Result<Self::Conn, String>> + Send;

    /// Does the node say it is a writable primary (the failover's confirm step)?
    fn is_primary(&self, c: &mut Self::Conn) -> impl Future<Output = Result<bool, String>> + Send;

    /// Where a standby is (None: it is not a standby any more). `window`: how recently
    /// it must have heard from the primary to count as hearing it.
    fn survey(
        &self,
        c: &mut Self::Conn,
        index: usize,
        node: &NodeState,
        window: Duration,
    ) -> impl Future<Output = Result<Option<Candidate>, String>> + Send;

    /// Make a standby stop receiving from its primary (before a failover chooses among
    /// the standbys: MySQL's IO thread; PostgreSQL keeps streaming, a no-op there).
    fn stop_receiving(&self, c: &mut Self::Conn) -> impl Future<Output = Result<(), String>> + Send;

    /// Make a primary stop taking writes (read-only, other client sessions ended) and
    /// say where its history ends.
    fn fence(&self, c: &mut Self::Conn) -> impl Future<Output = Result<Mark, String>> + Send;

    /// Undo `fence` (a switchover that gives up before promoting).
    fn unfence(&self, c: &mut Self::Conn) -> impl Future<Output = Result<(), String>> + Send;

    /// Wait up to `within` until the standby has applied everything up to `mark`;
    /// whether it has.
    fn wait_applied(
        &self,
        c: &mut Self::Conn,
        mark: &Mark,
        within: Duration,
    ) -> impl Future<Output = Result<bool, String>> + Send;

    /// Make a standby replicate from `primary` instead (before `primary` is promoted:
    /// PostgreSQL standbys then cascade from it and follow its timeline switch).
    fn repoint(&self, c: &mut Self::Conn, primary: &NodeState) -> impl Future<Output = Result<(), String>> + Send;

    /// Promote a standby; it is writable when this returns. On MySQL it first applies
    /// what it received (bounded by `within`: a promotion never drops received
    /// transactions silently).
    fn promote(
        &self,
        c: &mut Self::Conn,
        node: &str,
        within: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// What the node is now, as its health monitor would see it (to route at once).
    fn observe(&self, c: &mut Self::Conn) -> impl Future<Output = Result<Observation, String>> + Send;

    /// After a failover or a switchover: make the old primary read-only if it is
    /// writable, and rejoin it to `new` if the engine can and its history allows.
    /// `end_sessions`: also end every client session on it (after a failover; a
    /// switchover leaves them, as Switchyard's own move to the new primary by
    /// themselves).
    fn reclaim(
        &self,
        old: &mut Self::Conn,
        new: &NodeState,
        within: Duration,
        end_sessions: bool,
    ) -> impl Future<Output = Result<Reclaim, String>> + Send;
}
