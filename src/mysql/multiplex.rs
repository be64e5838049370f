//! Transaction pooling for MySQL sessions (`pool_mode = "transaction"`): a session
//! holds a server connection only while it is not at rest (a command's answer owed, a
//! transaction open) or pinned; in between, the connection goes back to its pool
//! (`pool.rs`) and the session's next command gets one again, perhaps another.
//!
//! - **Session state.** Pooled connections ask the server to report, in each OK, the
//!   session variables the proxy can set again (`moving::REPLAYED`), the current
//!   database, and whether anything else changed (`session_track_state_change`). The
//!   relay collects what the client set (`Tracked::desired`); a connection handed to the
//!   client is brought in line with it first: `SET @@session.…` for the differences,
//!   `USE`, and a `COM_RESET_CONNECTION` first when the connection has settings the
//!   client never made. Usually the settings already match and nothing is sent.
//! - **Pinning.** A change the server reports without naming it (a user variable, a
//!   temporary table, a prepared statement, a lock), a statement the relay's scan finds
//!   unmovable (`moving::scan`), a protocol-level prepared statement, `COM_CHANGE_USER`,
//!   or a client without session tracking (`CLIENT_SESSION_TRACK`) keeps the session on
//!   its connection until it disconnects (or `COM_RESET_CONNECTION` clears its state);
//!   that connection is then closed, not pooled.
//! - **Where.** Each connection comes through the shared connector, so routing, holds
//!   (PAUSE, a switchover) and fresh reads (a ro session's connection is taken on a node
//!   known to have applied what it must see, else the primary) apply per transaction.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mysql_common::constants::CapabilityFlags;
use tracing::debug;

use super::moving::REPLAYED;
use super::pool::{Checkout, Class, ConnMeta, ConnState, Pool, PoolKey, PooledConn};
use super::protocol::{self, first_value, read_packet, write_packet};
use super::relay::{Relay, INTERCEPT_MAX};
use super::server::{LoginRequest, ServerConn};
use super::session::{set_read_only, End, MysqlDialer};
use super::ClusterInfo;
use crate::cluster::routing::Endpoint;
use crate::cluster::topology::{ClusterSnapshot, NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::config::PoolSettings;
use crate::error::Error;
use crate::proxy::connector::{self, Dialer, NodeSlot};
use crate::proxy::shared::Shared;
use crate::proxy::stream::ClientStream;

/// A pooled connection's pool and place while a session holds it.
pub(super) struct Lease {
    pool: Arc<Pool>,
    meta: ConnMeta,
}

/// The statement that makes a pooled connection report what transaction pooling
/// follows: the replayed variables (and MariaDB's `last_gtid`, for fresh reads), the
/// database, and any other change.
pub(super) fn tracking_sql(maria: bool) -> String {
    let mut vars: Vec<&str> = REPLAYED.iter().map(|(m, y)| if maria { *m } else { *y }).collect();
    if maria {
        vars.push("last_gtid");
    }
    let gtids = if maria { "" } else { ", session_track_gtids = OWN_GTID" };
    format!(
        "SET SESSION session_track_system_variables = '{}', session_track_schema = ON, session_track_state_change = ON{gtids}",
        vars.join(",")
    )
}

/// A connection from a cluster's pools (the connector's `Dialer` in transaction
/// pooling).
pub(super) struct PoolDialer<'a> {
    pub(super) login: MysqlDialer<'a>,
    pub(super) info: &'a ClusterInfo,
    pub(super) settings: PoolSettings,
    pub(super) maria: bool,
}

pub(super) struct Checked {
    /// The connection and the session state it has.
    pub(super) conn: (ServerConn, ConnState),
    pub(super) lease: Lease,
    pub(super) slot: NodeSlot,
}

impl PoolDialer<'_> {
    fn pool(&self, node: &NodeState) -> Arc<Pool> {
        self.info.pools.get(
            PoolKey {
                worker: crate::proxy::pool::worker(),
                node: node.name.clone(),
                user: self.login.request.user.to_string(),
                endpoint: self.login.endpoint,
            },
            self.settings,
        )
    }

    fn class(&self) -> Class {
        let req = &self.login.request;
        (req.capabilities.bits(), req.collation, req.database.is_some())
    }

    fn idle(node: &NodeState, pool: Arc<Pool>, conn: PooledConn) -> Checked {
        node.active.fetch_add(1, Ordering::Relaxed);
        let PooledConn { conn, state, meta } = conn;
        Checked {
            conn: (conn, state),
            lease: Lease { pool, meta },
            slot: NodeSlot(node.active.clone()),
        }
    }
}

impl Dialer for PoolDialer<'_> {
    type Conn = Checked;

    fn dial_now(&mut self, node: &NodeState) -> Option<Checked> {
        let pool = self.pool(node);
        match pool.try_checkout(self.class())? {
            Checkout::Idle(conn) => Some(Self::idle(node, pool, conn)),
            // Only a slot: `dial` logs in (it checks out again, which is cheap).
            Checkout::Slot(_) => None,
        }
    }

    async fn dial(&mut self, node: &NodeState, timeout: Duration) -> Result<Checked, Error> {
        let pool = self.pool(node);
        let permit = match pool.checkout(self.class()).await {
            Some(Checkout::Idle(conn)) => return Ok(Self::idle(node, pool, conn)),
            Some(Checkout::Slot(permit)) => permit,
            None => {
                return Err(Error::pool_exhausted(format!(
                    "no server connection for user \"{}\" on node \"{}\" became free within {} ms (this worker thread's share of pool_size: {}, all in use, and the reserve too if any); retry, or raise pool_size / reserve_pool_size / checkout_timeout_ms",
                    pool.key.user,
                    node.name,
                    pool.checkout_timeout.as_millis(),
                    pool.size
                )))
            }
        };
        let (mut conn, slot) = self.login.dial(node, timeout).await?;
        let caps = self.login.request.capabilities & conn.greeting.capabilities;
        if caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK) {
            tokio::time::timeout(timeout, first_value(&mut conn.stream, caps, &tracking_sql(self.maria)))
                .await
                .map_err(|_| Error::connect_failed(format!("node \"{}\" did not answer in time", node.name)))??;
            conn.tracking = true;
        }
        let db = self
            .login
            .request
            .database
            .map(|d| String::from_utf8_lossy(d).into_owned());
        let PooledConn { conn, state, meta } = pool.opened(
            conn,
            ConnState {
                vars: Default::default(),
                db,
            },
            self.class(),
            permit,
        );
        Ok(Checked {
            conn: (conn, state),
            lease: Lease { pool, meta },
            slot,
        })
    }
}

impl Relay<'_> {
    /// Transaction pooling, between transactions: wait for the client's next command,
    /// then take a connection for it, brought in line with the session's state.
    pub(super) async fn next_connection(
        &mut self,
        client: &mut ClientStream,
        cbuf: &mut bytes::BytesMut,
        topology: &mut tokio::sync::watch::Receiver<Arc<ClusterSnapshot>>,
        caps: CapabilityFlags,
    ) -> Result<ServerConn, End> {
        let ending = (self.shared, self.cluster);
        match self.timeouts.client_idle {
            None => read_at_least(client, cbuf, 5, ending).await?,
            Some(idle) => match tokio::time::timeout(idle, read_at_least(client, cbuf, 5, ending)).await {
                Ok(read) => read?,
                Err(_) => {
                    let fired = crate::proxy::timeouts::Fired::ClientIdle;
                    crate::proxy::limits::timed_out(self.shared, &self.cluster.name, fired, "session ended");
                    return Err(End::Failed(self.timeouts.error(fired)));
                }
            },
        }
        if cbuf[4] == protocol::COM_QUIT && cbuf[3] == 0 {
            self.inbound.quit = true;
            return Err(End::ClientClosed);
        }
        let info = ClusterInfo::of(self.cluster);
        // With splitting: a read a replica may answer takes a read-only connection, on a
        // replica that has applied what the session must see (else on the primary), for
        // this one statement.
        let read = self.split_tx && self.is_split_read(client, cbuf, ending, info).await?;
        let endpoint = if read { Endpoint::ReadOnly } else { self.endpoint };
        self.inbound.lease_commands = 0;
        self.one_command = read;
        let config = self.shared.config();
        if !config.clusters.contains_key(&*self.cluster.name) {
            return Err(End::Failed(Error::cluster_removed(&self.cluster.name)));
        }
        // MySQL pools are per user, not per database (a connection changes database
        // with COM_INIT_DB): the user's size, `users[].pool_size` or a `[[pools]]` entry
        // naming only the user (validation refuses database entries here).
        let settings = config.pool_settings_of(&self.cluster.settings(), &self.user.name, "");
        let mut attributes = self.client.attributes.clone();
        if let Some(a) = attributes.as_mut() {
            a.remove(super::fresh::TOKEN_ATTRIBUTE);
        }
        let desired = self.tracked.lock().unwrap().desired.clone();
        let database = desired.db.clone();
        let mut dialer = PoolDialer {
            login: MysqlDialer::new(
                self.cluster,
                &config,
                LoginRequest {
                    user: &self.user.name,
                    password: self.user.password.as_deref(),
                    database: database.as_deref().map(str::as_bytes),
                    capabilities: self.client.capabilities,
                    collation: self.client.collation,
                    attributes,
                },
                endpoint,
            ),
            info,
            settings,
            maria: self.fresh.maria,
        };
        // A ro read that must see a position: only a node known to have applied it,
        // or the primary.
        let (_, need, unknown) = if endpoint == Endpoint::ReadOnly {
            self.fresh.floor(info)
        } else {
            (0, None, false)
        };
        let fresh = |snap: &ClusterSnapshot, i: usize| {
            snap.nodes[i].role == Role::Primary
                || (!unknown && need.as_ref().is_none_or(|n| info.has_applied(&snap.nodes[i].name, n)))
        };
        let accept: Option<connector::Accept<'_>> = (need.is_some() || unknown).then_some(&fresh);
        let connected = match connector::connect_now(self.cluster, endpoint, None, accept, &mut dialer) {
            Some(c) => c,
            None => connector::connect(self.cluster, endpoint, None, accept, Some(topology), &mut dialer)
                .await
                .map_err(End::Failed)?,
        };
        let node = connected.node().clone();
        let Checked {
            conn: (mut conn, mut state),
            lease,
            slot,
        } = connected.conn;
        let target = (&self.cluster.name[..], &node.name[..]);
        if let Err(e) = bring_in_line(
            &mut conn,
            &mut state,
            &desired,
            caps,
            self.fresh.maria,
            endpoint,
            target,
        )
        .await
        {
            // Not handed out in an unknown state: closed (its slot freed with `lease`).
            debug!(cluster = %self.cluster.name, node = %node.name, error = %e, "pooled connection not brought in line");
            return Err(End::Failed(e));
        }
        self.shared
            .cancels
            .retarget(&self.registered, Some((&node.addr, conn.thread_id as i32, 0)));
        if read && node.role == Role::Standby {
            self.shared
                .metrics
                .reads_to_standby
                .get_or_create(&crate::obs::metrics::ClusterLabels {
                    cluster: self.cluster.name.to_string(),
                })
                .inc();
        }
        self.node = node;
        self.slot = slot;
        self.lease = Some(lease);
        Ok(conn)
    }

    /// Transaction pooling with splitting: is the command at the front of `cbuf` one a
    /// replica may answer, now? (At rest with autocommit on, unpinned, a text query the
    /// classifier calls a read; the whole statement is read in first.)
    async fn is_split_read(
        &mut self,
        client: &mut ClientStream,
        cbuf: &mut bytes::BytesMut,
        ending: (&Shared, &ClusterCtx),
        info: &ClusterInfo,
    ) -> Result<bool, End> {
        {
            let t = self.tracked.lock().unwrap();
            if t.pinned.is_some() || t.answers.status & SERVER_STATUS_AUTOCOMMIT == 0 || !t.answers.at_rest() {
                return Ok(false);
            }
        }
        if cbuf[3] != 0 || cbuf[4] != protocol::COM_QUERY || self.inbound.unmovable().is_some() {
            return Ok(false);
        }
        let len = u32::from_le_bytes([cbuf[0], cbuf[1], cbuf[2], 0]) as usize;
        if len > super::split::SPLIT_MAX {
            return Ok(false);
        }
        read_at_least(client, cbuf, 4 + len, ending).await?;
        Ok(info.classifier.classify(&cbuf[5..4 + len]).read)
    }
}

use super::answers::SERVER_STATUS_AUTOCOMMIT;

/// Read from the client until `cbuf` holds at least `n` bytes (a session between
/// transactions, with no connection: only the client, shutdown and the cluster's removal
/// can wake it; `ending`: the process and the client's cluster).
async fn read_at_least(
    client: &mut ClientStream,
    cbuf: &mut bytes::BytesMut,
    n: usize,
    (shared, cluster): (&Shared, &ClusterCtx),
) -> Result<(), End> {
    while cbuf.len() < n {
        tokio::select! {
            r = client.read_some(cbuf) => match r {
                Ok(0) => return Err(End::ClientClosed),
                Err(e) => return Err(End::Io(e)),
                Ok(_) => {}
            },
            e = shared.closing(cluster) => return Err(End::Failed(e)),
        }
    }
    Ok(())
}

/// Make `conn`'s session state the client's (`desired`): a reset first if it has
/// settings the client never made, then the differences, then the database.
/// `(cluster, node)`: where it is, for errors.
pub(super) async fn bring_in_line(
    conn: &mut ServerConn,
    state: &mut ConnState,
    desired: &ConnState,
    caps: CapabilityFlags,
    maria: bool,
    endpoint: Endpoint,
    (cluster, node): (&str, &str),
) -> Result<(), Error> {
    if *state == *desired {
        return Ok(());
    }
    let io = |e: std::io::Error| Error::server_lost(cluster, node, e.to_string());
    if state.vars.keys().any(|k| !desired.vars.contains_key(k)) {
        write_packet(&mut conn.stream, 0, &[protocol::COM_RESET_CONNECTION])
            .await
            .map_err(io)?;
        let mut buf = Vec::new();
        read_packet(&mut conn.stream, &mut buf, INTERCEPT_MAX)
            .await
            .map_err(io)?;
        if buf.first() != Some(&0x00) {
            return Err(protocol::parse_err(&buf, caps));
        }
        if conn.tracking {
            first_value(&mut conn.stream, caps, &tracking_sql(maria)).await?;
        }
        if endpoint == Endpoint::ReadOnly {
            set_read_only(conn, caps).await?;
        }
        state.vars.clear();
    }
    let sets: Vec<String> = desired
        .vars
        .iter()
        .filter(|(k, v)| state.vars.get(*k) != Some(*v))
        .map(|(k, v)| format!("@@session.{k} = {}", sql_value(k, v)))
        .collect();
    if !sets.is_empty() {
        first_value(&mut conn.stream, caps, &format!("SET {}", sets.join(", "))).await?;
    }
    if let Some(db) = desired.db.as_ref().filter(|db| state.db.as_ref() != Some(*db)) {
        first_value(&mut conn.stream, caps, &format!("USE `{}`", db.replace('`', "``"))).await?;
    }
    *state = desired.clone();
    Ok(())
}

impl Relay<'_> {
    /// Give the held connection back to its pool (transaction pooling), with the
    /// session state it has now; one of a pinned session is closed instead.
    pub(super) fn release(&mut self, conn: Option<ServerConn>) {
        let Some(conn) = conn else { return };
        let Some(lease) = self.lease.take() else { return };
        let t = self.tracked.lock().unwrap();
        if t.releasable() {
            let state = t.desired.clone();
            drop(t);
            let Lease { pool, meta } = lease;
            pool.checkin(PooledConn { conn, state, meta });
        }
        self.shared.cancels.retarget(&self.registered, None);
        // The node count of this session (`slot`) stays until the next connection
        // replaces it: the session is still the node's client for SHOW CLIENTS.
    }

    /// After COM_RESET_CONNECTION or COM_CHANGE_USER (transaction pooling): a reset
    /// leaves the server defaults (and unpins); a changed user keeps its connection,
    /// which belongs to another user's pool.
    pub(super) fn after_own_reset(&mut self, cmd: u8) {
        if !self.multiplex {
            return;
        }
        let mut t = self.tracked.lock().unwrap();
        if cmd == protocol::COM_RESET_CONNECTION {
            t.desired.vars.clear();
            // A reset clears the session's state, not what the connection is.
            if !matches!(t.pinned, Some(PIN_CHANGE_USER | PIN_NO_TRACKING)) {
                t.pinned = None;
            }
        } else {
            t.pinned = Some(PIN_CHANGE_USER);
        }
    }
}

/// Why a session keeps its connection: it changed user (the connection belongs to
/// another user's pool now).
pub(super) const PIN_CHANGE_USER: &str = "COM_CHANGE_USER";
/// Why a session keeps its connection: the proxy cannot follow its state.
pub(super) const PIN_NO_TRACKING: &str =
    "a client without session tracking (CLIENT_SESSION_TRACK), whose session state the proxy cannot follow";

/// A variable's value as SQL: digits as they are, anything else quoted
/// (`character_set_results` reported empty is NULL: no conversion).
fn sql_value(name: &str, v: &str) -> String {
    if v.is_empty() && name.eq_ignore_ascii_case("character_set_results") {
        return "NULL".to_string();
    }
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
    }
}
