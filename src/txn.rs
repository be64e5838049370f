//! A client session in transaction pooling mode. The client holds a pooled server
//! connection only from the start of a transaction (or of a lone statement) to the
//! ReadyForQuery that ends it. Between transactions it holds nothing, so a failed node
//! costs it nothing, and its next transaction is routed afresh.
//!
//! To make that transparent, the session:
//! - replays the client's session state (startup parameters, `SET`s) on each connection
//!   it gets, as one round trip and only when it differs;
//! - renames protocol-level named prepared statements to content-addressed names
//!   (`sy_<hash>`) and prepares them on whatever connection the client gets, swallowing
//!   the responses the client did not ask for (`Expect` queue);
//! - pins the client to its connection for what cannot move (SQL PREPARE, LISTEN,
//!   session advisory locks, temporary tables, WITH HOLD cursors);
//! - with `read_write_split`, sends a unit of work that only reads to a standby, and
//!   retries it elsewhere if that standby fails before any byte reached the client.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::admin::metrics::RoutedLabels;
use crate::cancel::Registration;
use crate::classify::SetAction;
use crate::config::Config;
use crate::pool::{Pool, PoolError, PoolKey, PooledConn};
use crate::protocol::messages::{self, Severity};
use crate::protocol::sqlstate;
use crate::protocol::views::{self, ErrorFields, ParameterStatus, Parse, Query, StatementRef};
use crate::proxy::{ClusterCtx, Shared};
use crate::routing::{self, Endpoint};
use crate::topology::{Health, Role};

const BUFFER: usize = 8192;

/// Buffers start empty: a client that has not sent anything since it logged in (with
/// thousands of clients, most of them) gets 512 bytes to read into, and `BUFFER` once
/// it is busy.
fn ready_to_read(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buf.reserve(512);
    } else if buf.capacity() - buf.len() < 512 {
        buf.reserve(BUFFER);
    }
}

/// What the transaction-mode session knows of its client.
pub struct TxnClient {
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
    pub peer: SocketAddr,
}

/// How a transaction-mode session ended.
#[derive(Debug)]
pub enum TxnEnd {
    ClientClosed,
    Fatal(&'static str, String),
    Shutdown,
    /// The server connection was lost (inside the session loop: maybe retried).
    Lost(String),
    /// A standby refused a read it cannot run (inside the session loop: the read is
    /// retried on the primary when nothing of its answer reached the client).
    StandbyRefused(String),
}

enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Topology,
    Shutdown,
}

/// A client's named prepared statement.
struct Stmt {
    hash: u64,
    /// The Parse message under the server-side name, ready to send.
    parse: Bytes,
    server_name: String,
    /// Query text as the client sent it (its encoding, not necessarily UTF-8).
    query: Box<[u8]>,
}

/// A response the server owes us, in order: whether the client should see it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    ParseComplete {
        pass: bool,
        /// The statement it creates (unnamed: None).
        hash: Option<u64>,
    },
    CloseComplete {
        pass: bool,
    },
    /// A Sync or simple Query: answered by ReadyForQuery.
    Ready,
}

struct Held {
    conn: PooledConn,
    pool: Arc<Pool>,
    role: Role,
    /// Requests answered by ReadyForQuery still outstanding.
    pending: i32,
    status: u8,
    /// Whether any byte of this unit's answer was written to the client (retry is safe
    /// only before). Answers queued in `out` but not yet written do not count: they are
    /// dropped when the unit is retried.
    answered: bool,
    /// `out` holds part of this unit's answer (not only notices or reported settings,
    /// which may come at any time and say nothing of how far the unit got).
    answer_queued: bool,
    /// This unit is a read routed by read/write splitting (may be retried).
    retryable: bool,
    queries: prometheus_client::metrics::counter::Counter,
}

pub struct TxnSession<'a> {
    client: TcpStream,
    who: TxnClient,
    cluster: &'a ClusterCtx,
    endpoint: Endpoint,
    shared: &'a Shared,
    config: Arc<Config>,
    cbuf: BytesMut,
    sbuf: BytesMut,
    out: BytesMut,
    /// Client messages queued for the held server (see `forward` / `flush`).
    sout: BytesMut,
    /// A message that starts the next unit of work, held back until the current one ends.
    stash: Option<Bytes>,
    /// Answers the held server owes, in order (kept here so its allocation is reused).
    expect: VecDeque<Expect>,
    /// Client messages of the current unit as received, for a retry on another node.
    sent: Vec<Bytes>,
    /// Per node: its pool for this client and its routed-queries counter, looked up once.
    pools: HashMap<String, (Arc<Pool>, prometheus_client::metrics::counter::Counter)>,
    password: Option<String>,
    held: Option<Held>,
    /// The client's named statements, by the name it gave them (bytes in its encoding).
    stmts: HashMap<Box<[u8]>, Stmt>,
    /// Session state the client asked for: setting name → statement that sets it.
    desired: BTreeMap<String, String>,
    pinned: Option<&'static str>,
    cancel: Registration,
    /// SETs of the unit in progress: they count once it ends without error or rollback.
    pending_sets: Vec<SetAction>,
    unit_failed: bool,
}

fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

/// The client's startup parameters as the statements that recreate them. `set_config`
/// takes the value as a string, exactly as a startup packet or `-c` does (a list such as
/// `search_path=a,b` stays a list).
pub fn startup_state(params: &[(String, String)]) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    let mut set = |name: &str, value: &str| {
        let name = name.to_ascii_lowercase();
        state.insert(
            name.clone(),
            format!(
                "SELECT pg_catalog.set_config({}, {}, false)",
                quote_literal(&name),
                quote_literal(value)
            ),
        );
    };
    for (k, v) in params {
        if k == "options" {
            // "-c name=value" / "-cname=value" / "--name=value", space separated.
            let mut words = v.split_whitespace();
            while let Some(w) = words.next() {
                let pair = match w {
                    "-c" => words.next(),
                    w if w.starts_with("-c") => Some(&w[2..]),
                    w if w.starts_with("--") => Some(&w[2..]),
                    _ => None,
                };
                if let Some((name, value)) = pair.and_then(|p| p.split_once('=')) {
                    set(&name.replace('-', "_"), value);
                }
            }
        } else {
            set(k, v);
        }
    }
    state
}

/// A unit of work ended between transactions: its SETs count if it ended without error
/// or rollback (a failed or rolled-back SET changed nothing on the server either).
fn settle_sets(
    pending: &mut Vec<SetAction>,
    failed: &mut bool,
    desired: &mut BTreeMap<String, String>,
    applied: &mut BTreeMap<String, String>,
    startup: &[(String, String)],
) {
    let sets = std::mem::take(pending);
    if std::mem::replace(failed, false) {
        return;
    }
    for s in sets {
        match s {
            SetAction::Set { name, statement } => {
                applied.insert(name.clone(), statement.clone());
                desired.insert(name, statement);
            }
            SetAction::Reset { name } => {
                applied.remove(&name);
                desired.remove(&name);
            }
            SetAction::ResetAll => {
                // RESET ALL brings a direct connection back to its startup values; the
                // pooled one now has server defaults, and gets those values at the next sync.
                applied.clear();
                let ro = desired.get("default_transaction_read_only").cloned();
                *desired = startup_state(startup);
                if let Some(ro) = ro {
                    desired.insert("default_transaction_read_only".into(), ro);
                }
            }
        }
    }
}

/// Reported parameters a client can change for its session (the rest describe the server
/// or are managed by the proxy).
fn client_settable(name: &str) -> bool {
    !matches!(
        name,
        "server_version"
            | "server_encoding"
            | "integer_datetimes"
            | "is_superuser"
            | "session_authorization"
            | "in_hot_standby"
            | "default_transaction_read_only"
            | "scram_iterations"
    )
}

/// Errors with which a standby refuses what a primary would run: reads of unlogged or
/// temporary tables, SERIALIZABLE ("feature not supported" in hot standby), and a
/// statement the classifier took for a read that writes after all (read-only
/// transaction). A split read refused so before its answer reached the client is run
/// again on the primary.
fn standby_refusal(code: &[u8]) -> bool {
    code == b"0A000" || code == b"25006"
}

/// A Parse message for `server_name` with the client's statement content (`after_name`).
fn parse_message(server_name: &str, after_name: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    views::encode_parse(&mut b, server_name.as_bytes(), after_name);
    b.freeze()
}

/// The content address of a statement: its query and parameter types (`after_name`).
fn statement_hash(after_name: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    after_name.hash(&mut h);
    h.finish()
}

impl<'a> TxnSession<'a> {
    pub fn new(
        client: TcpStream,
        who: TxnClient,
        cluster: &'a ClusterCtx,
        endpoint: Endpoint,
        shared: &'a Shared,
        config: Arc<Config>,
        cancel: Registration,
    ) -> Self {
        let mut desired = startup_state(&who.params);
        if endpoint == Endpoint::ReadOnly {
            // The ro endpoint may fall back to the primary: keep it read-only there too.
            desired.insert(
                "default_transaction_read_only".into(),
                "SET default_transaction_read_only = on".into(),
            );
        }
        let password = config.user(&who.user).and_then(|u| u.password.clone());
        TxnSession {
            client,
            who,
            cluster,
            endpoint,
            shared,
            config,
            cbuf: BytesMut::new(),
            sbuf: BytesMut::new(),
            out: BytesMut::new(),
            sout: BytesMut::new(),
            stash: None,
            expect: VecDeque::new(),
            sent: Vec::new(),
            pools: HashMap::new(),
            password,
            held: None,
            stmts: HashMap::new(),
            desired,
            pinned: None,
            cancel,
            pending_sets: Vec::new(),
            unit_failed: false,
        }
    }

    fn cluster_config(&self) -> &crate::config::ClusterConfig {
        &self.config.clusters[&self.cluster.name]
    }

    /// The pool of a node for this client.
    /// The pool of a node for this client, and the node's routed-queries counter: found
    /// once per node and kept, so taking a connection allocates nothing.
    fn pool(&mut self, node: &crate::topology::NodeState) -> (Arc<Pool>, prometheus_client::metrics::counter::Counter) {
        if let Some((pool, queries)) = self.pools.get(&node.name) {
            if pool.key.addr == node.addr {
                return (pool.clone(), queries.clone());
            }
        }
        let key = PoolKey {
            cluster: self.cluster.name.clone(),
            node: node.name.clone(),
            addr: node.addr.clone(),
            database: self.who.database.clone(),
            user: self.who.user.clone(),
        };
        let pool = self.shared.pools.get(key, self.cluster_config().pool_settings());
        let labels = RoutedLabels {
            cluster: self.cluster.name.clone(),
            node: node.name.clone(),
            role: node.role.to_string(),
        };
        let queries = self.shared.metrics.queries_routed.get_or_create(&labels).clone();
        self.pools.insert(node.name.clone(), (pool.clone(), queries.clone()));
        (pool, queries)
    }

    /// Get a server connection on the best candidate for this unit of work; `read` says
    /// whether the unit only reads. Tries candidates in order, waits for the topology
    /// within `connect_timeout_ms`.
    async fn acquire(&mut self, read: bool, exclude: &HashSet<String>) -> Result<(), TxnEnd> {
        if self.cluster.is_paused() {
            self.cluster.wait_unpaused().await;
        }
        let split = self.endpoint == Endpoint::ReadOnly || (read && self.cluster_config().read_write_split);
        let target = if split { Endpoint::ReadOnly } else { Endpoint::ReadWrite };
        // Subscribed only once there is something to wait for.
        let mut rx: Option<tokio::sync::watch::Receiver<Arc<crate::topology::ClusterSnapshot>>> = None;
        let (connect_timeout, login_timeout) = {
            let s = self.cluster.state.snapshot();
            (s.connect_timeout, s.server_login_timeout)
        };
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let mut failures = Vec::new();
        loop {
            let snap = match rx.as_mut() {
                Some(rx) => rx.borrow_and_update().clone(),
                None => self.cluster.state.snapshot(),
            };
            let turn = self.cluster.turn.fetch_add(1, Ordering::Relaxed);
            let problem = match routing::route(target, &snap, turn) {
                Ok(candidates) => {
                    for i in candidates {
                        let node = &snap.nodes[i];
                        if exclude.contains(&node.name) {
                            continue;
                        }
                        let (pool, queries) = self.pool(node);
                        let require_primary = target == Endpoint::ReadWrite;
                        match pool
                            .checkout(self.password.as_deref(), require_primary, login_timeout)
                            .await
                        {
                            Ok(conn) => {
                                node.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
                                self.shared
                                    .cancels
                                    .retarget(&self.cancel, Some((&node.addr, conn.conn.pid, conn.conn.key)));
                                self.expect.clear();
                                self.sent.clear();
                                self.held = Some(Held {
                                    conn,
                                    pool,
                                    role: node.role,
                                    pending: 0,
                                    status: b'I',
                                    answered: false,
                                    answer_queued: false,
                                    retryable: split && self.endpoint == Endpoint::ReadWrite,
                                    queries,
                                });
                                return self.sync_state().await;
                            }
                            Err(e @ PoolError::Exhausted { .. }) => return Err(TxnEnd::Fatal("53300", e.to_string())),
                            Err(PoolError::Server(e)) if e.try_next_node() => {
                                if node.stats.connect_failed() {
                                    warn!(cluster = %self.cluster.name, node = %node.name, reason = %e, "server connection failed; trying next candidate");
                                } else {
                                    tracing::debug!(cluster = %self.cluster.name, node = %node.name, reason = %e, "server connection failed; trying next candidate");
                                }
                                failures.push(format!("{}: {e}", node.name));
                            }
                            Err(PoolError::Server(crate::server::ServerError::Refused { code, message, .. })) => {
                                return Err(TxnEnd::Fatal(
                                    if code == "3D000" {
                                        "3D000"
                                    } else {
                                        sqlstate::CONNECTION_FAILURE
                                    },
                                    message,
                                ))
                            }
                            Err(PoolError::Server(e)) => {
                                return Err(TxnEnd::Fatal(
                                    sqlstate::CONNECTION_FAILURE,
                                    format!("cannot log in to node \"{}\": {e}", node.name),
                                ))
                            }
                        }
                    }
                    format!(
                        "could not connect to any server of cluster \"{}\": {}; node states: {}",
                        self.cluster.name,
                        failures.join("; "),
                        snap.describe_nodes()
                    )
                }
                Err(e) => e.to_string(),
            };
            let Some(rx) = rx.as_mut() else {
                // Subscribe, then look again: a change between the two is not lost.
                rx = Some(self.cluster.state.subscribe());
                continue;
            };
            let now = tokio::time::Instant::now();
            if now >= deadline || tokio::time::timeout(deadline - now, rx.changed()).await.is_err() {
                let code = if failures.is_empty() {
                    sqlstate::CANNOT_CONNECT_NOW
                } else {
                    sqlstate::CONNECTION_FAILURE
                };
                return Err(TxnEnd::Fatal(code, problem));
            }
        }
    }

    /// Make the held connection's session state what the client asked for, in one
    /// round trip, only when it differs.
    async fn sync_state(&mut self) -> Result<(), TxnEnd> {
        let held = self.held.as_mut().expect("held");
        if held.conn.applied == self.desired {
            return Ok(());
        }
        // One Query per statement, all sent at once: still one round trip, and a
        // statement that fails cannot take the others with it.
        let mut statements: Vec<String> = held
            .conn
            .applied
            .keys()
            .filter(|name| !self.desired.contains_key(*name))
            .map(|name| format!("RESET {}", quote_ident(name)))
            .collect();
        statements.extend(
            self.desired
                .iter()
                .filter(|(name, stmt)| held.conn.applied.get(*name) != Some(stmt))
                .map(|(_, stmt)| stmt.clone()),
        );
        let mut q = BytesMut::new();
        for sql in &statements {
            postgres_protocol::message::frontend::query(sql, &mut q)
                .map_err(|e| TxnEnd::Fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
        }
        let mut remaining = statements.len();
        let io = |e: std::io::Error| {
            TxnEnd::Fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("server connection lost while restoring session state: {e}"),
            )
        };
        held.conn.conn.stream.write_all(&q).await.map_err(io)?;
        // Swallow the answers; a failing SET is reported once in the log, and the
        // connection still gets the rest.
        let mut buf = BytesMut::new();
        loop {
            while buf.len() >= 5 {
                let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
                if buf.len() < len + 1 {
                    break;
                }
                let msg = buf.split_to(len + 1);
                match msg[0] {
                    b'E' => {
                        let e = ErrorFields::decode(&msg[5..]);
                        warn!(cluster = %self.cluster.name, user = %self.who.user, code = %String::from_utf8_lossy(e.code),
                              reason = %String::from_utf8_lossy(e.message), "restoring session state failed");
                    }
                    // The server's own spelling of what was set (see `welcome`).
                    b'S' => held
                        .conn
                        .report(ParameterStatus::decode(&msg[5..]).map_err(server_malformed)?),
                    b'Z' => {
                        remaining -= 1;
                        if remaining == 0 {
                            held.conn.applied = self.desired.clone();
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
            if held.conn.conn.stream.read_buf(&mut buf).await.map_err(io)? == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Give the connection back (between transactions, not pinned).
    fn release(&mut self) {
        if let Some(mut h) = self.held.take() {
            // A pinned connection carries what pinned it (LISTEN, locks, temp tables,
            // SQL prepared statements): never hand it to anyone else.
            if self.pinned.is_some() {
                h.conn.broken = true;
            }
            self.shared.cancels.retarget(&self.cancel, None);
            h.pool.checkin(h.conn);
        }
    }

    /// The next complete client message in the buffer, if any.
    fn next_client_message(&mut self) -> Result<Option<Bytes>, TxnEnd> {
        if let Some(m) = self.stash.take() {
            return Ok(Some(m));
        }
        if self.cbuf.len() < 5 {
            return Ok(None);
        }
        let tag = self.cbuf[0];
        let len = u32::from_be_bytes(self.cbuf[1..5].try_into().unwrap());
        if !matches!(
            tag,
            b'B' | b'C' | b'd' | b'c' | b'f' | b'D' | b'E' | b'H' | b'F' | b'P' | b'Q' | b'S' | b'X'
        ) {
            return Err(TxnEnd::Fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid frontend message type 0x{tag:02x}"),
            ));
        }
        if len < 4 || len > self.config.proxy.max_message_bytes {
            return Err(TxnEnd::Fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "message of type '{}' is {len} bytes, over the limit of {} bytes (proxy.max_message_bytes)",
                    tag as char, self.config.proxy.max_message_bytes
                ),
            ));
        }
        if self.cbuf.len() < len as usize + 1 {
            return Ok(None);
        }
        Ok(Some(self.cbuf.split_to(len as usize + 1).freeze()))
    }

    /// Does the unit of work at the head of the client buffer only read? Looks at every
    /// statement up to the first Sync; an incomplete batch counts as a write.
    fn unit_reads(&self, first: &Bytes) -> bool {
        let classifier = &self.cluster.classifier;
        let route_primary = self
            .desired
            .get("switchyard.route")
            .is_some_and(|s| s.to_ascii_lowercase().contains("primary"));
        // A standby refuses SERIALIZABLE transactions, read-only or not.
        let serializable = self
            .desired
            .get("default_transaction_isolation")
            .is_some_and(|s| s.to_ascii_lowercase().contains("serializable"));
        if route_primary || serializable {
            return false;
        }
        let judge = |msg: &[u8]| -> Option<bool> {
            let body = &msg[5..];
            let query: &[u8] = match msg[0] {
                b'Q' => Query::decode(body).ok()?.sql,
                b'P' => Parse::decode(body).ok()?.query,
                b'B' | b'D' => {
                    let r = if msg[0] == b'B' {
                        StatementRef::decode_bind(body).ok()?
                    } else {
                        StatementRef::decode_target(body, "Describe").ok()?
                    };
                    if r.statement.is_empty() {
                        return Some(true); // judged by its Parse in the same batch
                    }
                    &self.stmts.get(r.statement)?.query
                }
                b'E' | b'H' => return Some(true),
                _ => return Some(false),
            };
            let c = classifier.classify_bytes(query);
            Some(c.read_only && !c.hint_primary)
        };
        if first[0] == b'Q' {
            return judge(first).unwrap_or(false);
        }
        if !judge(first).unwrap_or(false) {
            return false;
        }
        // Walk the rest of the batch already buffered, up to Sync.
        let mut rest = &self.cbuf[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            if rest.len() < len + 1 {
                return false;
            }
            let msg = &rest[..len + 1];
            if msg[0] == b'S' {
                return true;
            }
            if !judge(msg).unwrap_or(false) {
                return false;
            }
            rest = &rest[len + 1..];
        }
        false
    }

    /// A lone `Parse(name) + Sync` between transactions is answered here, without a
    /// server connection: the statement is recorded and prepared on whatever connection
    /// first needs it. Besides saving a round trip, this matters for clients that
    /// prepare synchronously while another of their connections holds a transaction
    /// (pgbench -M prepared): waiting for a pooled connection there would deadlock.
    /// Only statements the grammar accepts are deferred; anything else goes to a server
    /// so the client gets the server's own error at once.
    async fn prepare_without_server(&mut self, msg: &Bytes) -> Result<bool, TxnEnd> {
        if msg[0] != b'P' || self.cbuf.len() < 5 || self.cbuf[0] != b'S' {
            return Ok(false);
        }
        let p = Parse::decode(&msg[5..]).map_err(malformed)?;
        if p.name.is_empty() || !self.cluster.classifier.classify_bytes(p.query).parses {
            return Ok(false);
        }
        // The Sync must be complete too, to be answered now.
        let sync_len = u32::from_be_bytes(self.cbuf[1..5].try_into().unwrap()) as usize;
        if self.cbuf.len() < sync_len + 1 {
            return Ok(false);
        }
        let hash = statement_hash(p.after_name);
        let server_name = format!("sy_{hash:016x}");
        let stmt = Stmt {
            hash,
            parse: parse_message(&server_name, p.after_name),
            server_name,
            query: p.query.into(),
        };
        self.stmts.insert(p.name.into(), stmt);
        // Consume the Sync and answer both. (What the statement does to the session is
        // observed when it is executed: see the Bind case of `forward`.)
        let _ = self.cbuf.split_to(sync_len + 1);
        let mut out = BytesMut::with_capacity(11);
        out.put_slice(b"1\0\0\0\x04");
        messages::ready_for_query(&mut out, b'I');
        self.client.write_all(&out).await.map_err(|_| TxnEnd::ClientClosed)?;
        Ok(true)
    }

    /// Track what a statement does to the session: SETs to replay, pins.
    fn observe_statement(&mut self, c: &crate::classify::Classification) {
        if let Some(db) = &c.frees_database {
            let closed = self.shared.pools.close_idle_to(db);
            info!(cluster = %self.cluster.name, database = %db, closed, "closed idle pooled connections to a database a statement needs free");
        }
        // SETs count only once their unit ends without error or rollback (a failed or
        // rolled-back SET changes nothing on the server either).
        self.pending_sets.extend(c.sets.iter().cloned());
        if let (Some(why), None) = (c.pins, self.pinned) {
            self.pinned = Some(why);
            info!(cluster = %self.cluster.name, user = %self.who.user, peer = %self.who.peer, reason = why, "client pinned to its server connection until it disconnects");
        }
    }

    /// Queue one client message for the held server (in `sout`, sent by `flush`),
    /// rewriting prepared statement names. Writes nothing itself: a whole batch of
    /// pipelined messages goes out in one write.
    fn forward(&mut self, msg: Bytes) -> Result<(), TxnEnd> {
        let held = self.held.as_mut().expect("held");
        if !held.answered {
            self.sent.push(msg.clone());
        }
        let tag = msg[0];
        tracing::trace!(peer = %self.who.peer, tag = %(tag as char), "client message");
        let body = &msg[5..];
        let out = &mut self.sout;
        let mut observe = None;
        match tag {
            b'Q' => {
                let q = Query::decode(body).map_err(malformed)?;
                let c = self.cluster.classifier.classify_bytes(q.sql);
                self.expect.push_back(Expect::Ready);
                held.pending += 1;
                held.queries.inc();
                // DEALLOCATE of a protocol-level statement: the server knows it under its
                // content-addressed name, maybe not even on this connection.
                match c.deallocate.as_deref() {
                    Some("") => {
                        self.stmts.clear();
                        held.conn.prepared.clear();
                        out.extend_from_slice(&msg);
                    }
                    Some(name) if self.stmts.contains_key(name.as_bytes()) => {
                        let stmt = self.stmts.remove(name.as_bytes()).expect("checked");
                        if !held.conn.prepared.remove(&stmt.hash) {
                            // Not here: create it (answers dropped) so the DEALLOCATE
                            // succeeds with the reply the client expects.
                            views::encode_close_statement(out, stmt.server_name.as_bytes());
                            out.extend_from_slice(&stmt.parse);
                            let e = self.expect.pop_back();
                            self.expect.push_back(Expect::CloseComplete { pass: false });
                            self.expect.push_back(Expect::ParseComplete {
                                pass: false,
                                hash: None,
                            });
                            self.expect.extend(e);
                        }
                        postgres_protocol::message::frontend::query(&format!("DEALLOCATE {}", stmt.server_name), out)
                            .map_err(|e| TxnEnd::Fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
                    }
                    _ => out.extend_from_slice(&msg),
                }
                observe = Some(c);
            }
            b'F' | b'S' => {
                self.expect.push_back(Expect::Ready);
                held.pending += 1;
                out.extend_from_slice(&msg);
            }
            b'P' => {
                let p = Parse::decode(body).map_err(malformed)?;
                observe = Some(self.cluster.classifier.classify_bytes(p.query));
                if p.name.is_empty() {
                    self.expect.push_back(Expect::ParseComplete { pass: true, hash: None });
                    out.extend_from_slice(&msg);
                } else {
                    let hash = statement_hash(p.after_name);
                    let server_name = format!("sy_{hash:016x}");
                    let parse = parse_message(&server_name, p.after_name);
                    // The same text may already be prepared on this connection (by this
                    // client earlier, or another): close it first (closing a statement that
                    // does not exist is no error), so the Parse cannot fail with "already
                    // exists" and the client gets its ParseComplete in order.
                    views::encode_close_statement(out, server_name.as_bytes());
                    self.expect.push_back(Expect::CloseComplete { pass: false });
                    self.expect.push_back(Expect::ParseComplete {
                        pass: true,
                        hash: Some(hash),
                    });
                    held.conn.prepared.insert(hash);
                    out.extend_from_slice(&parse);
                    let stmt = Stmt {
                        hash,
                        parse,
                        server_name,
                        query: p.query.into(),
                    };
                    self.stmts.insert(p.name.into(), stmt);
                }
            }
            b'B' | b'D' => {
                let r = if tag == b'B' {
                    StatementRef::decode_bind(body)
                } else {
                    StatementRef::decode_target(body, "Describe")
                }
                .map_err(malformed)?;
                match self.stmts.get(r.statement).filter(|_| !r.statement.is_empty()) {
                    Some(stmt) => {
                        if tag == b'B' {
                            observe = Some(self.cluster.classifier.classify_bytes(&stmt.query));
                        }
                        if !held.conn.prepared.contains(&stmt.hash) {
                            // Prepared by this client on another connection: prepare it
                            // here too, and drop the answers the client did not ask for.
                            views::encode_close_statement(out, stmt.server_name.as_bytes());
                            self.expect.push_back(Expect::CloseComplete { pass: false });
                            out.extend_from_slice(&stmt.parse);
                            self.expect.push_back(Expect::ParseComplete {
                                pass: false,
                                hash: Some(stmt.hash),
                            });
                            held.conn.prepared.insert(stmt.hash);
                        }
                        // The same message with the server-side statement name.
                        r.encode_renamed(out, tag, stmt.server_name.as_bytes());
                    }
                    None => out.extend_from_slice(&msg),
                }
            }
            b'C' => {
                let r = StatementRef::decode_target(body, "Close").map_err(malformed)?;
                let known = if r.statement.is_empty() {
                    None
                } else {
                    self.stmts.remove(r.statement)
                };
                match known {
                    Some(stmt) => {
                        held.conn.prepared.remove(&stmt.hash);
                        views::encode_close_statement(out, stmt.server_name.as_bytes());
                    }
                    None => out.extend_from_slice(&msg),
                }
                self.expect.push_back(Expect::CloseComplete { pass: true });
            }
            b'E' => {
                held.queries.inc();
                out.extend_from_slice(&msg);
            }
            _ => out.extend_from_slice(&msg),
        }
        if let Some(c) = observe {
            self.observe_statement(&c);
        }
        Ok(())
    }

    /// Send what `forward` queued.
    async fn flush(&mut self) -> Result<(), TxnEnd> {
        if self.sout.is_empty() {
            return Ok(());
        }
        let held = self.held.as_mut().expect("held");
        let result = held.conn.conn.stream.write_all(&self.sout).await;
        self.sout.clear();
        result.map_err(|e| TxnEnd::Lost(e.to_string()))
    }

    /// The held server went away: run the unit again elsewhere if it is a read nobody
    /// has seen an answer to, else end the session saying why.
    async fn recover(&mut self, reason: String) -> Result<(), TxnEnd> {
        match self.retry_elsewhere().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.server_failed(reason)),
            Err(TxnEnd::Lost(again)) => Err(self.server_failed(again)),
            Err(e) => Err(e),
        }
    }

    fn server_failed(&mut self, reason: String) -> TxnEnd {
        let node = self.held.as_ref().map(|h| h.pool.key.node.clone()).unwrap_or_default();
        if let Some(h) = self.held.as_mut() {
            h.conn.broken = true;
        }
        self.release();
        TxnEnd::Fatal(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "server connection to node \"{node}\" of cluster \"{}\" was lost: {reason}",
                self.cluster.name
            ),
        )
    }

    /// Handle bytes read from the server: pass them to the client, minus the answers to
    /// requests the proxy made on its own. Returns true when the unit of work is over.
    fn process_server_bytes(&mut self) -> Result<bool, TxnEnd> {
        let held = self.held.as_mut().expect("held");
        let mut done = false;
        while self.sbuf.len() >= 5 {
            let tag = self.sbuf[0];
            let len = u32::from_be_bytes(self.sbuf[1..5].try_into().unwrap()) as usize;
            if len < 4 {
                return Err(TxnEnd::Fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "server sent a malformed message".into(),
                ));
            }
            if self.sbuf.len() < len + 1 {
                // A large message still arriving: pass what is here along if it is not
                // one we may need to drop (those are tiny).
                break;
            }
            let msg = self.sbuf.split_to(len + 1);
            tracing::trace!(peer = %self.who.peer, tag = %(tag as char), expect = ?self.expect, "server message");
            let mut pass = true;
            match tag {
                b'1' | b'3' => {
                    if let Some(pos) = self.expect.iter().position(|e| {
                        matches!(
                            (e, tag),
                            (Expect::ParseComplete { .. }, b'1') | (Expect::CloseComplete { .. }, b'3')
                        )
                    }) {
                        pass = match self.expect.remove(pos) {
                            Some(Expect::ParseComplete { pass, .. } | Expect::CloseComplete { pass }) => pass,
                            _ => true,
                        };
                    }
                }
                // A server going away (immediate shutdown, crash of another backend) warns
                // before it closes: for a read that can still move, that is the loss.
                b'N' if !held.answered && held.retryable && ErrorFields::decode(&msg[5..]).code.starts_with(b"57") => {
                    let e = ErrorFields::decode(&msg[5..]);
                    return Err(TxnEnd::Lost(String::from_utf8_lossy(e.message).into_owned()));
                }
                b'E' if !held.answered && held.retryable => {
                    let e = ErrorFields::decode(&msg[5..]);
                    let why = || String::from_utf8_lossy(e.message).into_owned();
                    if e.ends_session() {
                        // The server is ending this session (shutting down, crashed) before
                        // answering a read: as good as gone; the caller may retry elsewhere.
                        return Err(TxnEnd::Lost(why()));
                    }
                    if held.role != Role::Primary && standby_refusal(e.code) {
                        return Err(TxnEnd::StandbyRefused(why()));
                    }
                    self.unit_failed = true;
                    skip_to_sync(&mut self.expect, &mut held.conn.prepared);
                }
                b'C' if msg[5..].starts_with(b"ROLLBACK") => self.unit_failed = true,
                b'E' => {
                    self.unit_failed = true;
                    skip_to_sync(&mut self.expect, &mut held.conn.prepared);
                }
                b'S' => {
                    // A reported setting changed in the client's session (SET, set_config(),
                    // RESET, a rolled-back SET being undone): remember its final value so the
                    // next connection gets it too. This catches what the classifier cannot
                    // see, such as Django's `SELECT set_config('TimeZone', ...)`.
                    let s = ParameterStatus::decode(&msg[5..]).map_err(server_malformed)?;
                    held.conn.report(s);
                    // A value in another encoding than UTF-8 is not replayed (it would be
                    // re-sent as text the server reads in the client's encoding).
                    if let (Ok(name), Ok(value)) = (std::str::from_utf8(s.name), std::str::from_utf8(s.value)) {
                        let name = name.to_ascii_lowercase();
                        if client_settable(&name) {
                            let stmt = format!(
                                "SELECT pg_catalog.set_config({}, {}, false)",
                                quote_literal(&name),
                                quote_literal(value)
                            );
                            held.conn.applied.insert(name.clone(), stmt.clone());
                            self.desired.insert(name, stmt);
                        }
                    }
                }
                b'A' if views::notification_pid(&msg[5..]) == Some(held.conn.conn.pid) => {
                    // The client's own NOTIFY (while pinned by LISTEN): show it with the
                    // pid the client was given, as a direct connection would.
                    let mut msg = msg;
                    msg[5..9].copy_from_slice(&self.cancel.pid.to_be_bytes());
                    self.out.extend_from_slice(&msg);
                    continue;
                }
                b'Z' => {
                    while let Some(e) = self.expect.pop_front() {
                        if e == Expect::Ready {
                            break;
                        }
                    }
                    held.pending -= 1;
                    held.status = msg.get(5).copied().unwrap_or(b'I');
                    if held.status == b'I' {
                        settle_sets(
                            &mut self.pending_sets,
                            &mut self.unit_failed,
                            &mut self.desired,
                            &mut held.conn.applied,
                            &self.who.params,
                        );
                        done = held.pending <= 0;
                    }
                }
                _ => {}
            }
            if pass {
                held.answer_queued |= !matches!(tag, b'N' | b'S' | b'A');
                self.out.extend_from_slice(&msg);
            }
        }
        Ok(done)
    }

    /// The session loop.
    pub async fn run(&mut self) -> TxnEnd {
        let mut topology = self.cluster.state.subscribe();
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            // Dispatch every complete client message already buffered.
            loop {
                let msg = match self.next_client_message() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return e,
                };
                if msg[0] == b'X' {
                    if let Some(h) = self.held.as_mut() {
                        if h.pending > 0 || h.status != b'I' {
                            h.conn.broken = true;
                        }
                    }
                    self.release();
                    return TxnEnd::ClientClosed;
                }
                // A read sent to a standby ends with its Sync/Query: what follows is a new
                // unit, routed on its own once this one is answered.
                if self.held.as_ref().is_some_and(|h| h.retryable && h.pending > 0)
                    && self.expect.back() == Some(&Expect::Ready)
                {
                    self.stash = Some(msg);
                    break;
                }
                if self.held.is_none() {
                    if *shutdown.borrow() {
                        return TxnEnd::Shutdown;
                    }
                    match self.prepare_without_server(&msg).await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => return e,
                    }
                    let read = self.unit_reads(&msg);
                    if let Err(e) = self.acquire(read, &HashSet::new()).await {
                        return e;
                    }
                }
                if let Err(e) = self.forward(msg) {
                    return e;
                }
            }
            if self.held.is_some() {
                if let Err(TxnEnd::Lost(reason)) | Err(TxnEnd::Fatal(_, reason)) = self.flush().await {
                    if let Err(e) = self.recover(reason).await {
                        return e;
                    }
                }
            }
            ready_to_read(&mut self.cbuf);
            if self.held.is_some() {
                ready_to_read(&mut self.sbuf);
            }
            let event = {
                let client = &mut self.client;
                let cbuf = &mut self.cbuf;
                let sbuf = &mut self.sbuf;
                let server = self.held.as_mut().map(|h| &mut h.conn.conn.stream);
                let has_server = server.is_some();
                tokio::select! {
                    r = client.read_buf(cbuf) => Event::Client(r),
                    r = async {
                        match server {
                            Some(s) => s.read_buf(sbuf).await,
                            None => std::future::pending().await,
                        }
                    }, if has_server => Event::Server(r),
                    _ = topology.changed() => Event::Topology,
                    _ = shutdown.wait_for(|s| *s), if !has_server => Event::Shutdown,
                }
            };
            match event {
                Event::Client(Ok(n)) if n > 0 => {}
                Event::Client(_) => {
                    if let Some(h) = self.held.as_mut() {
                        h.conn.broken = h.pending > 0 || h.status != b'I';
                    }
                    self.release();
                    return TxnEnd::ClientClosed;
                }
                Event::Server(r) => {
                    let lost = match r {
                        Ok(0) => Some("server closed the connection".to_string()),
                        Err(e) => Some(e.to_string()),
                        Ok(_) => None,
                    };
                    if let Some(reason) = lost {
                        match self.recover(reason).await {
                            Ok(()) => continue,
                            Err(e) => return e,
                        }
                    }
                    let done = match self.process_server_bytes() {
                        Ok(d) => d,
                        Err(TxnEnd::Lost(reason)) => match self.recover(reason).await {
                            Ok(()) => continue,
                            Err(e) => return e,
                        },
                        Err(TxnEnd::StandbyRefused(reason)) => match self.retry_on_primary(reason).await {
                            Ok(()) => continue,
                            Err(e) => return e,
                        },
                        Err(e) => return e,
                    };
                    if !self.out.is_empty() {
                        let out = self.out.split();
                        if let Some(h) = self.held.as_mut() {
                            h.answered |= std::mem::take(&mut h.answer_queued);
                        }
                        if self.client.write_all(&out).await.is_err() {
                            if let Some(h) = self.held.as_mut() {
                                h.conn.broken = true;
                            }
                            self.release();
                            return TxnEnd::ClientClosed;
                        }
                    }
                    if done {
                        if self.pinned.is_none() {
                            self.release();
                        } else if let Some(h) = self.held.as_mut() {
                            self.sent.clear();
                            h.answered = false;
                        }
                    }
                }
                Event::Topology => {
                    let Some(node) = self.held.as_ref().map(|h| h.pool.key.node.clone()) else {
                        continue;
                    };
                    let snap = topology.borrow_and_update().clone();
                    let writes = self.endpoint == Endpoint::ReadWrite
                        && self.held.as_ref().is_some_and(|h| h.role == Role::Primary);
                    let endpoint = if writes {
                        Endpoint::ReadWrite
                    } else {
                        Endpoint::ReadOnly
                    };
                    if let Some(reason) = routing::eviction(endpoint, &snap, &node) {
                        // A read not yet answered simply moves to another node.
                        if self.held.as_ref().is_some_and(|h| h.retryable && !h.answered) && !self.sent.is_empty() {
                            match self.retry_elsewhere().await {
                                Ok(true) => continue,
                                Ok(false) => {}
                                Err(e) => return e,
                            }
                        }
                        let up = snap.index(&node).is_some_and(|i| snap.nodes[i].health == Health::Up);
                        if let Some(h) = self.held.as_mut() {
                            h.conn.broken = true;
                        }
                        self.release();
                        let code = if up {
                            sqlstate::ADMIN_SHUTDOWN
                        } else {
                            sqlstate::CONNECTION_FAILURE
                        };
                        return TxnEnd::Fatal(code, format!("terminating connection: {reason}"));
                    }
                }
                Event::Shutdown => return TxnEnd::Shutdown,
            }
        }
    }

    /// A read on a standby lost its server before any answer reached the client: run
    /// it again on another candidate. Ok(false) when that is not possible.
    async fn retry_elsewhere(&mut self) -> Result<bool, TxnEnd> {
        let Some(h) = self.held.as_ref() else {
            return Ok(false);
        };
        let failed = h.pool.key.node.clone();
        warn!(cluster = %self.cluster.name, node = %failed, "standby lost before answering a read; retrying it on another node");
        self.rerun(Some(failed)).await
    }

    /// A standby refused a read it cannot run (an unlogged table, SERIALIZABLE, a write
    /// the classifier could not see): run it on the primary, if the client has seen
    /// nothing of the refusal yet; else the client gets the standby's error as it is.
    async fn retry_on_primary(&mut self, reason: String) -> Result<(), TxnEnd> {
        let node = self.held.as_ref().map(|h| h.pool.key.node.clone()).unwrap_or_default();
        info!(cluster = %self.cluster.name, node = %node, reason = %reason, "standby refused a read; running it on the primary");
        match self.rerun(None).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(TxnEnd::Fatal(sqlstate::CONNECTION_FAILURE, reason)),
            Err(TxnEnd::Lost(again)) => Err(self.server_failed(again)),
            Err(e) => Err(e),
        }
    }

    /// Run the unit in progress again from its first message on another connection:
    /// another readable node than `failed`, or the primary when `failed` is None. Only
    /// for a split read whose answer has not reached the client. Ok(false) when that is
    /// not possible.
    async fn rerun(&mut self, failed: Option<String>) -> Result<bool, TxnEnd> {
        let Some(h) = self.held.as_mut() else {
            return Ok(false);
        };
        if !h.retryable || h.answered || self.sent.is_empty() {
            return Ok(false);
        }
        h.conn.broken = true;
        let sent = std::mem::take(&mut self.sent);
        // Whatever the failed server said for this unit is dropped.
        self.sbuf.clear();
        self.out.clear();
        self.unit_failed = false;
        self.release();
        let read = failed.is_some();
        let exclude: HashSet<String> = failed.into_iter().collect();
        // The statements this client prepared must be prepared again on the new server.
        self.acquire(read, &exclude).await?;
        self.sout.clear();
        for msg in sent {
            self.forward(msg)?;
        }
        self.flush().await?;
        Ok(true)
    }

    /// Tell the client goodbye with a FATAL message.
    pub async fn goodbye(&mut self, code: &str, msg: &str) {
        let mut b = BytesMut::new();
        messages::error_response(&mut b, Severity::Fatal, code, msg, None);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.write_all(&b)).await;
    }

    /// Initial greeting: the server's parameters (the client's own values where it set
    /// them), our BackendKeyData, ReadyForQuery.
    pub async fn welcome(&mut self) -> Result<(), TxnEnd> {
        // One round trip to a server both proves the route works and gives parameters.
        let read = self.endpoint == Endpoint::ReadOnly;
        self.acquire(read, &HashSet::new()).await?;
        // The connection now has the client's startup settings applied: its reported
        // values are what a direct connection with those settings would report, in the
        // server's spelling (client_encoding 'utf8' is reported as 'UTF8').
        let held = self.held.as_ref().expect("held");
        let mut out = BytesMut::new();
        for (name, value) in &held.conn.reported {
            messages::parameter_status_bytes(&mut out, name, value);
        }
        self.release();
        messages::backend_key_data(&mut out, self.cancel.pid, self.cancel.key);
        messages::ready_for_query(&mut out, b'I');
        self.client.write_all(&out).await.map_err(|_| TxnEnd::ClientClosed)?;
        Ok(())
    }
}

/// After an error, the server skips the extended-protocol messages up to Sync: their
/// answers will not come, and a skipped or failed Parse created nothing.
fn skip_to_sync(expect: &mut VecDeque<Expect>, prepared: &mut HashSet<u64>) {
    while matches!(
        expect.front(),
        Some(Expect::ParseComplete { .. } | Expect::CloseComplete { .. })
    ) {
        if let Some(Expect::ParseComplete { hash: Some(h), .. }) = expect.pop_front() {
            prepared.remove(&h);
        }
    }
}

fn server_malformed(e: views::Malformed) -> TxnEnd {
    TxnEnd::Fatal(sqlstate::PROTOCOL_VIOLATION, format!("server sent a {e}"))
}

fn malformed(e: views::Malformed) -> TxnEnd {
    TxnEnd::Fatal(sqlstate::PROTOCOL_VIOLATION, format!("client sent a {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_become_set_statements() {
        let state = startup_state(&[
            ("application_name".into(), "shop".into()),
            ("TimeZone".into(), "Europe/Paris".into()),
            (
                "options".into(),
                "-c search_path=app,public --work-mem=4MB -cstatement_timeout=5s".into(),
            ),
            ("DateStyle".into(), "ISO, DMY".into()),
        ]);
        let set = |n: &str, v: &str| format!("SELECT pg_catalog.set_config('{n}', '{v}', false)");
        assert_eq!(state["application_name"], set("application_name", "shop"));
        assert_eq!(state["timezone"], set("timezone", "Europe/Paris"));
        assert_eq!(state["search_path"], set("search_path", "app,public"));
        assert_eq!(state["work_mem"], set("work_mem", "4MB"));
        assert_eq!(state["statement_timeout"], set("statement_timeout", "5s"));
        assert_eq!(state["datestyle"], set("datestyle", "ISO, DMY"));
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
