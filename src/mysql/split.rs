//! Read/write splitting for MySQL sessions (`read_write_split = true`, rw endpoint): a
//! session keeps a second server connection, on a replica, opened at its first read
//! that can go there, and sends it the statements a replica may answer
//! (`classify::Classifier`), one at a time and only between transactions with
//! autocommit on. Everything else, and every read that cannot go to a replica now,
//! goes to the primary connection as before.
//!
//! - **Session state** is kept identical: before a read, if a statement on the primary
//!   may have changed the session since the replica connection was last brought in line
//!   (`SET`, `USE`, `COM_INIT_DB`: `Inbound::state_generation`), the primary's settings
//!   are read back and set on the replica connection (the switchover move's
//!   `capture_sql` / `replay_sql`), and `READ ONLY` again. A session holding state a
//!   replica connection cannot have (user variables, temporary tables, prepared
//!   statements, locks: `Inbound::unmovable`) reads from the primary from then on.
//! - **Fresh reads**: the read must see the session's writes (and its token); a replica
//!   not known to have applied them is asked to wait (`causal_wait_ms`), else the
//!   primary answers.
//! - **Failures**: a replica that fails before any byte of its answer reached the client
//!   is dropped and the primary answers instead; once the client has part of an answer
//!   the session ends with an error saying so.

use std::time::Duration;

use mysql_common::constants::CapabilityFlags;
use tokio::time::Instant;
use tracing::debug;

use super::answers::Answers;
use super::fresh::Fresh;
use super::moving::{capture_sql, replay_sql};
use super::protocol::{self, first_row, first_value, write_packet};
use super::relay::Relay;
use super::server::{LoginRequest, ServerConn};
use super::session::{set_read_only, End, MysqlDialer};
use super::ClusterInfo;
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{ClusterSnapshot, NodeState, Role};
use crate::error::Error;
use crate::obs::metrics::ClusterLabels;
use crate::proxy::connector::{self, NodeSlot};
use crate::proxy::stream::{write_flush, ClientStream};

/// Largest statement looked at for splitting; a longer one goes to the primary.
pub(super) const SPLIT_MAX: usize = 64 * 1024;

/// How long opening a replica connection, or bringing its settings in line, may take
/// before the read goes to the primary instead.
const REPLICA_STEP: Duration = Duration::from_secs(2);

/// A session's side of splitting.
#[derive(Default)]
pub(super) struct Split {
    replica: Option<Replica>,
}

struct Replica {
    conn: ServerConn,
    node: NodeState,
    _slot: NodeSlot,
    /// The session-state generation its settings match (None: not yet brought in line).
    synced: Option<u64>,
    answers: Answers,
}

impl Split {
    /// Close the replica connection (its session state is no longer the client's).
    pub(super) async fn drop_replica(&mut self) {
        if let Some(mut r) = self.replica.take() {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                write_packet(&mut r.conn.stream, 0, &[protocol::COM_QUIT]),
            )
            .await;
        }
    }
}

impl Relay<'_> {
    /// A read (`payload`: a whole `COM_QUERY`) taken out of the stream at rest: answered
    /// by a replica when one can, else by the primary connection.
    pub(super) async fn split_read(
        &mut self,
        payload: Vec<u8>,
        client: &mut ClientStream,
        primary: &mut ServerConn,
        caps: CapabilityFlags,
    ) -> Result<(), End> {
        self.inbound.last_seq = 0;
        if self.on_replica(&payload, client, primary, caps).await? {
            return Ok(());
        }
        {
            let mut t = self.tracked.lock().unwrap();
            t.answers.command(protocol::COM_QUERY);
            t.update();
            if t.answers.statements {
                let digest = super::ClusterInfo::of(self.cluster).classifier.digest(&payload[1..]);
                t.answers.describe_last(Some(digest), false, std::time::Instant::now());
                if self.shared.digests.tracing() {
                    t.answers.trace_last(crate::obs::trace::traceparent(&payload[1..]));
                }
            }
        }
        self.inbound.note_state(protocol::COM_QUERY, &payload[1..]);
        write_packet(&mut primary.stream, 0, &payload).await.map_err(End::Io)?;
        self.node
            .stats
            .queries_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.finish_answers(client, primary).await
    }

    /// Run the read on the replica connection (opened, brought in line and found fresh
    /// enough first): Ok(false) when the primary must answer instead (nothing was sent
    /// to the client).
    async fn on_replica(
        &mut self,
        payload: &[u8],
        client: &mut ClientStream,
        primary: &mut ServerConn,
        caps: CapabilityFlags,
    ) -> Result<bool, End> {
        let snap = self.cluster.state.snapshot();
        let Some(split) = self.split.as_mut() else {
            return Ok(false);
        };
        let fit = |name: &str| {
            routing::eviction(Endpoint::ReadOnly, &snap, name).is_none()
                && snap.index(name).is_some_and(|i| snap.nodes[i].role == Role::Standby)
        };
        if split.replica.as_ref().is_some_and(|r| !fit(&r.node.name)) {
            split.drop_replica().await;
        }
        if split.replica.is_none() {
            match self.open_replica(&snap, caps).await {
                Some(r) => self.split.as_mut().expect("split").replica = Some(r),
                None => return Ok(false),
            }
        }
        let generation = self.inbound.state_generation;
        let maria = self.fresh.maria;
        let replica = self.split.as_mut().and_then(|s| s.replica.as_mut()).expect("a replica");
        if replica.synced != Some(generation) {
            // Read back on the primary without a bound of the proxy's own: dropping that
            // query half-answered would leave its answer for the client's next command.
            let values = match first_row(&mut primary.stream, caps, &capture_sql(maria)).await {
                Ok(v) => v.unwrap_or_default(),
                // (A broken connection fails the read's own write to it next.)
                Err(e) => {
                    debug!(cluster = %self.cluster.name, error = %e, "settings not read back; the primary answers");
                    return Ok(false);
                }
            };
            let synced = tokio::time::timeout(REPLICA_STEP, async {
                let (set, database) = replay_sql(maria, &values);
                first_value(&mut replica.conn.stream, caps, &set).await?;
                if let Some(db) = database {
                    first_value(
                        &mut replica.conn.stream,
                        caps,
                        &format!("USE `{}`", db.replace('`', "``")),
                    )
                    .await?;
                }
                // The replayed settings include the primary's read-write transaction mode.
                set_read_only(&mut replica.conn, caps).await
            })
            .await;
            if !matches!(synced, Ok(Ok(()))) {
                debug!(cluster = %self.cluster.name, node = %replica.node.name, "replica connection not brought in line; the primary answers");
                self.split.as_mut().expect("split").drop_replica().await;
                return Ok(false);
            }
            replica.synced = Some(generation);
        }
        if !self.replica_fresh(caps).await {
            return Ok(false);
        }
        let digests = self.shared.digests.tracking();
        let replica = self.split.as_mut().and_then(|s| s.replica.as_mut()).expect("a replica");
        // (Idle here: switching the digests' following on or off keeps them aligned.)
        replica.answers.statements = digests;
        replica.answers.command(protocol::COM_QUERY);
        if digests {
            let digest = super::ClusterInfo::of(self.cluster).classifier.digest(&payload[1..]);
            replica
                .answers
                .describe_last(Some(digest), false, std::time::Instant::now());
            if self.shared.digests.tracing() {
                replica
                    .answers
                    .trace_last(crate::obs::trace::traceparent(&payload[1..]));
            }
        }
        if write_packet(&mut replica.conn.stream, 0, payload).await.is_err() {
            self.split.as_mut().expect("split").drop_replica().await;
            return Ok(false);
        }
        let mut sent = false;
        let mut buf = std::mem::take(&mut self.sbuf);
        let outcome = loop {
            buf.clear();
            match replica.conn.stream.read_some(&mut buf).await {
                Ok(n) if n > 0 => {}
                other => {
                    if !sent {
                        break Ok(false);
                    }
                    let why = match other {
                        Err(e) => e.to_string(),
                        _ => "the server closed the connection".to_string(),
                    };
                    break Err(End::Failed(Error::server_lost(
                        &self.cluster.name,
                        &replica.node.name,
                        why,
                    )));
                }
            }
            replica.answers.feed(&buf);
            if let Err(e) = write_flush(client, &buf).await {
                break Err(End::Io(e));
            }
            sent = true;
            if replica.answers.idle() {
                break Ok(true);
            }
        };
        buf.clear();
        self.sbuf = buf;
        let replica = self.split.as_mut().and_then(|s| s.replica.as_mut()).expect("a replica");
        match outcome {
            Ok(true) => {
                let database = super::digests::client_database(self.client);
                let route = crate::obs::digest::Route::Split;
                let place = super::digests::place(self.cluster, &replica.node, &database, route);
                let worker = crate::proxy::pool::worker();
                let now = std::time::Instant::now();
                crate::obs::digest::record(
                    &self.shared.digests,
                    worker,
                    &mut replica.answers.finished,
                    &place,
                    now,
                    None,
                );
                for class in replica.answers.errors.drain(..) {
                    self.shared.metrics.server_error(&self.cluster.name, class);
                }
                replica
                    .node
                    .stats
                    .queries_total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let unknown = replica.answers.lost || replica.answers.in_transaction;
                self.shared
                    .metrics
                    .reads_to_standby
                    .get_or_create(&ClusterLabels {
                        cluster: self.cluster.name.to_string(),
                    })
                    .inc();
                if unknown {
                    // Its state is no longer known to match: the next read opens another.
                    self.split.as_mut().expect("split").drop_replica().await;
                }
                Ok(true)
            }
            Ok(false) => {
                self.split.as_mut().expect("split").drop_replica().await;
                Ok(false)
            }
            Err(end) => Err(end),
        }
    }

    /// A new replica connection, logged in as the client, if a replica is fit for
    /// reads now (None: the primary answers).
    async fn open_replica(&self, snap: &ClusterSnapshot, _caps: CapabilityFlags) -> Option<Replica> {
        let standby = |snap: &ClusterSnapshot, i: usize| snap.nodes[i].role == Role::Standby;
        let candidates = routing::route(Endpoint::ReadOnly, snap, 0).ok()?;
        if !candidates.iter().any(|&i| standby(snap, i)) {
            return None;
        }
        let mut attributes = self.client.attributes.clone();
        if let Some(a) = attributes.as_mut() {
            a.remove(super::fresh::TOKEN_ATTRIBUTE);
        }
        let mut dialer = MysqlDialer::new(
            self.cluster,
            &self.shared.config(),
            LoginRequest {
                user: &self.user.name,
                password: self.user.password.as_deref(),
                database: None,
                capabilities: self.client.capabilities,
                collation: self.client.collation,
                attributes,
            },
            Endpoint::ReadOnly,
        );
        let connected = tokio::time::timeout(
            REPLICA_STEP,
            connector::connect(
                self.cluster,
                Endpoint::ReadOnly,
                None,
                Some(&standby),
                None,
                &mut dialer,
            ),
        )
        .await;
        match connected {
            Ok(Ok(c)) => {
                let node = c.node().clone();
                let (conn, slot) = c.conn;
                let caps = self.client.capabilities & conn.greeting.capabilities;
                debug!(cluster = %self.cluster.name, node = %node.name, server_thread = conn.thread_id, "replica connection for split reads");
                Some(Replica {
                    conn,
                    node,
                    _slot: slot,
                    synced: None,
                    answers: Answers::new(caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF)),
                })
            }
            Ok(Err(e)) => {
                debug!(cluster = %self.cluster.name, error = %e, "no replica connection; the primary answers");
                None
            }
            Err(_) => None,
        }
    }

    /// Has the replica applied what the session's reads must see (waiting up to
    /// `causal_wait_ms` for it)? No: the primary answers.
    async fn replica_fresh(&mut self, caps: CapabilityFlags) -> bool {
        let (_, need, unknown) = self.fresh.floor(ClusterInfo::of(self.cluster));
        let labels = ClusterLabels {
            cluster: self.cluster.name.to_string(),
        };
        let to_primary = || {
            self.shared
                .metrics
                .reads_to_primary_for_freshness
                .get_or_create(&labels)
                .inc()
        };
        if unknown {
            to_primary();
            return false;
        }
        let Some(need) = need else { return true };
        let info = ClusterInfo::of(self.cluster);
        let maria = self.fresh.maria;
        let wait = self.fresh.wait;
        let replica = self.split.as_mut().and_then(|s| s.replica.as_mut()).expect("a replica");
        if info.has_applied(&replica.node.name, &need) {
            return true;
        }
        let (sql, done) = Fresh::wait_sql(maria, &need, wait);
        let started = Instant::now();
        let answer = tokio::time::timeout(wait + REPLICA_STEP, first_value(&mut replica.conn.stream, caps, &sql)).await;
        self.shared
            .metrics
            .causal_wait_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok(Some(v))) if v == done => {
                info.note_applied(&replica.node.name, &need);
                true
            }
            Ok(Ok(_)) => {
                to_primary();
                false
            }
            _ => {
                self.split.as_mut().expect("split").drop_replica().await;
                to_primary();
                false
            }
        }
    }
}
