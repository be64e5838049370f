//! A client's side of fresh reads (both pool modes): the floor its reads must see (its
//! own writes, a causal token it presented), and where a read with a floor may go.
//! The rules are in `cluster::freshness`; this is the per-client bookkeeping and the
//! bounded wait before a read is placed.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use std::sync::Arc;

use crate::cluster::freshness::{self, Floor, Token, WriteFloor};
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{ClusterSnapshot, Role};
use crate::cluster::ClusterCtx;
use crate::config::{ClusterConfig, ReadYourWrites};
use crate::error::Error;
use crate::obs::metrics::Metrics;
use crate::pg::classify::{self, CausalStatement};
use crate::pg::protocol::tags::FrontendTag;
use crate::pg::protocol::views;

/// How long learning the primary's WAL position may take before a read gives up on a
/// standby and goes to the primary (a healthy primary answers in well under 1 ms).
const ORACLE_WITHIN: Duration = Duration::from_secs(1);

/// Session mode: how long `SET switchyard.causal_token` waits at least for the session's
/// node to replay the token (the alternative there is an error, not the primary).
const SESSION_SET_WAIT: Duration = Duration::from_secs(1);

/// The floor a client's reads must see.
pub use crate::pg::protocol::messages::{write_causal_reply, CausalReply};

pub struct Causal {
    read_your_writes: bool,
    wait: Duration,
    /// The client's writes: this connection's own, or shared by the user's connections.
    writes: Arc<WriteFloor>,
    /// A token the client presented (SET, startup option).
    token: Option<Floor>,
    /// A read came since the client's last write ended (or it has not written yet): the
    /// next write's floor is learned as it ends (`floor_wanted_now`).
    read_after_write: bool,
    /// The write's own connection answers the floor question (false once it could not:
    /// the oracle is left to do it).
    ask_writer: bool,
    metrics: FreshMetrics,
}

/// The cluster's fresh-read metrics, looked up once per client.
#[derive(Clone)]
pub struct FreshMetrics {
    to_standby: Counter,
    to_primary: Counter,
    waited: Histogram,
}

impl FreshMetrics {
    pub fn new(metrics: &Metrics, cluster: &str) -> FreshMetrics {
        let h = metrics.client_handles(cluster);
        FreshMetrics {
            to_standby: h.reads_to_standby.clone(),
            to_primary: h.reads_to_primary_for_freshness.clone(),
            waited: h.causal_wait.clone(),
        }
    }
}

/// What to place a read with: the floor (None: any readable node) and whether the
/// client waited for a standby to catch up.
pub struct Placement {
    floor: Option<Floor>,
    /// The floor is not known (the primary did not say): only the primary is fresh.
    primary_only: bool,
    /// A standby other than the primary could have taken it but for freshness.
    standby_was_possible: bool,
}

impl Causal {
    /// A client of `user` on `database` (whose writes the floor follows).
    pub fn new(
        cc: &ClusterConfig,
        cluster: &ClusterCtx,
        (user, database): (&str, &str),
        token: Option<Floor>,
        metrics: FreshMetrics,
    ) -> Causal {
        let writes = match cc.read_your_writes {
            ReadYourWrites::User => cluster.shared_floor(user, database),
            _ => Arc::default(),
        };
        Causal {
            read_your_writes: cc.read_your_writes != ReadYourWrites::Off,
            wait: Duration::from_millis(cc.causal_wait_ms),
            writes,
            token,
            read_after_write: true,
            ask_writer: true,
            metrics,
        }
    }

    /// A unit that may have written committed on the primary.
    pub fn wrote(&mut self) {
        self.writes.wrote();
    }

    /// A write unit just ended on the primary (transaction mode): whether to learn its
    /// floor on its own connection now, before that goes back to the pool (`Driver`),
    /// and if so the writes the answer covers. Only when a read followed the client's
    /// previous write (or this is its first): one is then likely to follow this one, and
    /// finds its floor known instead of asking the oracle on the control thread and
    /// waiting there. Asked just after the client has its answer, the question overlaps
    /// with the client's turn. A client that only writes asks nothing after its first.
    pub fn floor_wanted_now(&mut self) -> Option<u64> {
        if !self.read_your_writes || !self.ask_writer || !std::mem::take(&mut self.read_after_write) {
            return None;
        }
        self.writes.pending().1
    }

    /// Whether a write unit starting now should have its floor asked in the same write
    /// as its commit (`Machine::ask_floor`), for the same reason as `floor_wanted_now`:
    /// if so, the writes counted so far (all answered before the question can run).
    pub fn floor_wanted_soon(&self) -> Option<u64> {
        (self.read_your_writes && self.ask_writer && self.read_after_write).then(|| self.writes.count())
    }

    /// What the question sent with a write unit's commit answered (None: the server
    /// could not say, and is not asked again). `before`: what `floor_wanted_soon` gave
    /// as the unit started. The floor covers those writes and the unit's own; writes of
    /// the user's other connections counted since are left to the oracle.
    pub fn learned_with_commit(&mut self, answer: Option<Floor>, before: u64) {
        self.read_after_write = false;
        self.learned_now(answer, before + 1);
    }

    /// What the writer's connection answered to `floor_wanted_now`'s question (None: it
    /// could not say, and is not asked again; the oracle answers instead).
    pub fn learned_now(&mut self, answer: Option<Floor>, covers: u64) {
        match answer {
            Some(f) => self.writes.learned(f, covers),
            None => self.ask_writer = false,
        }
    }

    /// The floor of the client's writes, learning it from the primary first if a write
    /// ended since it was last learned; Err(known floor) if the primary could not tell.
    async fn resolve(&mut self, cluster: &ClusterCtx) -> Result<Option<Floor>, Option<Floor>> {
        let (known, pending) = self.writes.pending();
        let Some(covers) = pending else {
            return Ok(known);
        };
        // No primary: nobody can say, and asking would only wait.
        let snap = cluster.state.snapshot();
        if routing::primary(&snap).is_err() {
            return Err(known);
        }
        match crate::pg::PgCluster::of(cluster)
            .freshness
            .write_floor(ORACLE_WITHIN)
            .await
        {
            Some(f) => {
                self.writes.learned(f, covers);
                Ok(Floor::join(known, Some(f)))
            }
            None => Err(known),
        }
    }

    /// `SHOW switchyard.causal_token`: a token for everything this client wrote or was
    /// given, empty if nothing.
    pub async fn show(&mut self, cluster: &ClusterCtx) -> Result<String, Error> {
        let Ok(own) = self.resolve(cluster).await else {
            return Err(Error::no_route(format!(
                "cannot make a causal token now: the primary of cluster \"{}\" did not report its WAL position; try again when it is back",
                cluster.name
            )));
        };
        let snap = cluster.state.snapshot();
        Ok(Floor::join(own, self.token)
            .map(|floor| {
                Token {
                    system_id: snap.system_id.unwrap_or(0),
                    floor,
                }
                .encode()
            })
            .unwrap_or_default())
    }

    /// Answer `SHOW`/`SET`/`RESET switchyard.causal_token`. `session_node`: the node a
    /// session-mode connection is bound to (a `SET` must then wait for that node).
    pub async fn answer(
        &mut self,
        stmt: CausalStatement,
        cluster: &ClusterCtx,
        session_node: Option<&str>,
    ) -> Result<CausalReply, Error> {
        match stmt {
            CausalStatement::Show => self.show(cluster).await.map(CausalReply::Show),
            CausalStatement::Set(v) => match session_node {
                Some(node) => self.set_for_node(&v, cluster, node).await.map(|_| CausalReply::Set),
                None => self.set(&v, &cluster.state.snapshot()).map(|_| CausalReply::Set),
            },
            CausalStatement::Reset => {
                self.reset();
                Ok(CausalReply::Reset)
            }
        }
    }

    /// `SET switchyard.causal_token = text` (empty: none).
    pub fn set(&mut self, text: &str, snap: &ClusterSnapshot) -> Result<(), Error> {
        self.token = freshness::parse_token(text, snap).map_err(|e| Error::invalid_parameter(e.to_string()))?;
        Ok(())
    }

    pub fn reset(&mut self) {
        self.token = None;
    }

    /// The token the client presented, if any (carried to a successor process).
    pub fn token(&self) -> Option<Floor> {
        self.token
    }

    /// Session mode, where a session cannot move: `SET switchyard.causal_token` on a
    /// session on `node` waits (up to `causal_wait_ms`) for that node to replay the token,
    /// and fails, saying what to do instead, if it does not.
    pub async fn set_for_node(&mut self, text: &str, cluster: &ClusterCtx, node: &str) -> Result<(), Error> {
        let snap = cluster.state.snapshot();
        let floor = freshness::parse_token(text, &snap).map_err(|e| Error::invalid_parameter(e.to_string()))?;
        let fresh_now = |snap: &ClusterSnapshot| {
            let Some(i) = snap.index(node) else { return false };
            let need = floor.map(|f| freshness::required(snap, f));
            match need {
                None => true,
                _ if snap.nodes[i].role == Role::Primary => true,
                Some(None) => false,
                Some(Some(need)) => freshness::qualifies(
                    snap,
                    i,
                    need,
                    crate::pg::PgCluster::of(cluster).freshness.replayed(snap, i),
                ),
            }
        };
        if !fresh_now(&snap) {
            if let (Some(i), Some(Some(need))) = (snap.index(node), floor.map(|f| freshness::required(&snap, f))) {
                let started = Instant::now();
                crate::pg::PgCluster::of(cluster)
                    .freshness
                    .wait(&[i], need, self.wait.max(SESSION_SET_WAIT))
                    .await;
                self.metrics.waited.observe(started.elapsed().as_secs_f64());
            }
            if !fresh_now(&cluster.state.snapshot()) {
                return Err(Error::not_fresh(format!(
                    "node \"{node}\" has not replayed up to this causal token within {} ms, and a session-mode connection cannot move; connect with the token as a startup option (-c switchyard.causal_token=...) to be placed on a node that has",
                    self.wait.max(SESSION_SET_WAIT).as_millis()
                )));
            }
        }
        self.token = floor;
        Ok(())
    }

    /// Decide what a read must see, waiting (up to `causal_wait_ms`) for a standby to
    /// replay it when none has yet.
    pub async fn place(&mut self, cluster: &ClusterCtx) -> Placement {
        self.read_after_write = true;
        let (own, resolved) = if self.read_your_writes {
            match self.resolve(cluster).await {
                Ok(own) => (own, true),
                Err(known) => (known, false),
            }
        } else {
            (None, true)
        };
        let floor = Floor::join(own, self.token);
        let mut placement = Placement {
            floor,
            primary_only: !resolved,
            standby_was_possible: false,
        };
        if floor.is_none() && resolved {
            return placement;
        }
        let snap = cluster.state.snapshot();
        let standbys: routing::Nodes = routing::route(Endpoint::ReadOnly, &snap, 0)
            .map(|c| c.into_iter().filter(|&i| snap.nodes[i].role == Role::Standby).collect())
            .unwrap_or_default();
        placement.standby_was_possible = !standbys.is_empty();
        let Some(need) = floor.and_then(|f| freshness::required(&snap, f)) else {
            return placement;
        };
        crate::pg::PgCluster::of(cluster).freshness.want(&standbys, &snap);
        if !resolved
            || standbys.is_empty()
            || standbys.iter().any(|&i| {
                freshness::qualifies(
                    &snap,
                    i,
                    need,
                    crate::pg::PgCluster::of(cluster).freshness.replayed(&snap, i),
                )
            })
            || self.wait.is_zero()
        {
            return placement;
        }
        let started = Instant::now();
        crate::pg::PgCluster::of(cluster)
            .freshness
            .wait(&standbys, need, self.wait)
            .await;
        self.metrics.waited.observe(started.elapsed().as_secs_f64());
        placement
    }

    /// Count where a read went.
    pub fn placed(&self, placement: &Placement, role: Role) {
        if role == Role::Standby {
            self.metrics.to_standby.inc();
        } else if placement.held_for_freshness() {
            self.metrics.to_primary.inc();
        }
    }
}

/// `buf` is exactly one simple Query holding a causal-token statement (session mode
/// answers only such a buffer itself; anything else passes through).
pub fn lone_causal_statement(buf: &[u8]) -> Option<CausalStatement> {
    let (tag, len) = views::header(buf)?;
    if FrontendTag::of(tag) != Some(FrontendTag::Query) {
        return None;
    }
    if len as usize + 1 != buf.len() {
        return None;
    }
    classify::causal_statement(views::Query::decode(&buf[5..]).ok()?.sql)
}

impl Placement {
    /// What the read must see (None: anything), for logs.
    pub fn floor(&self) -> Option<Floor> {
        self.floor
    }

    /// No condition on where the read goes.
    /// A standby could have taken the read but for what it must see: on the primary
    /// for freshness.
    pub fn held_for_freshness(&self) -> bool {
        self.standby_was_possible && (self.floor.is_some() || self.primary_only)
    }

    pub fn is_free(&self) -> bool {
        self.floor.is_none() && !self.primary_only
    }

    /// May node `i` of `snap` take the read? The primary always may; a standby if it
    /// replayed the floor. With no primary up, the read waits for one (or for a standby
    /// that has replayed the floor) up to `failover_hold` from the primary's loss; after
    /// that any readable standby may: reads go on through an outage, as fresh as what is
    /// left (`freshness::reads_held_until`).
    pub fn accepts(&self, cluster: &ClusterCtx, snap: &ClusterSnapshot, i: usize) -> bool {
        if snap.nodes[i].role == Role::Primary {
            // A primary has every write of its own history, but not a floor on a newer
            // timeline than it reports: that was written after a failover it is not
            // part of (an old primary back, seen by this instance before the new one).
            return freshness::primary_has(snap, i, self.floor);
        }
        if routing::primary(snap).is_err() && freshness::reads_held_until(snap).is_none_or(|end| Instant::now() >= end)
        {
            return true;
        }
        if self.primary_only {
            return false;
        }
        match self.floor.map(|f| freshness::required(snap, f)) {
            None => true,
            Some(None) => false,
            Some(Some(need)) => freshness::qualifies(
                snap,
                i,
                need,
                crate::pg::PgCluster::of(cluster).freshness.replayed(snap, i),
            ),
        }
    }
}
