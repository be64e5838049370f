//! The relay of one MySQL session: bytes through, both directions at once, reading only
//! packet headers (`Scanner`), so no packet is ever buffered whole. `pump` runs a
//! client-to-server and a server-to-client side in one task and stops them only between
//! whole writes: when the client sends a command the proxy handles itself
//! (`own_command`; handled in `commands.rs`), when the session's node stops being valid
//! (the client gets an ERR packet at the sequence id it expects), or at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;

use super::auth::Client;
use super::protocol::{self, write_packet, Scanner};
use super::server::ServerConn;
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{Health, NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::config::UserConfig;
use crate::error::Error;
use crate::obs::digest::{record, Route};
use crate::proxy::cancel::Registration;
use crate::proxy::shared::Shared;
use crate::proxy::stream::{write_flush, ClientStream};
use crate::proxy::timeouts::Fired;
use crate::tls::ServerWrite;

use super::session::End;

pub(super) use super::tracked::Tracked;

pub(super) const RELAY_BUFFER: usize = 16 * 1024;
use super::answers::SERVER_STATUS_AUTOCOMMIT;
/// Bytes of a command looked at to tell whether the proxy handles it (`KILL ...`).
const PEEK: usize = 64;
/// Largest command the proxy takes whole to handle it itself.
pub(super) const INTERCEPT_MAX: usize = 64 * 1024;

pub(super) struct Relay<'a> {
    pub(super) cluster: &'a ClusterCtx,
    pub(super) endpoint: Endpoint,
    /// The node of the server connection held now (a switchover moves it).
    pub(super) node: NodeState,
    pub(super) shared: &'a Shared,
    pub(super) client: &'a Client,
    /// Who the session is logged in as now (`COM_CHANGE_USER` changes it).
    pub(super) user: UserConfig,
    /// Our connection id's entry in the shared cancel/KILL registry.
    pub(super) registered: Registration,
    pub(super) inbound: Inbound,
    /// A command was sent and no byte of its answer came back yet. (Atomic only because
    /// both directions, one `Send` future, touch it; nothing is shared between threads.)
    pub(super) awaiting: AtomicBool,
    /// The client was already told why the session ends.
    pub(super) told: bool,
    /// Server bytes on their way to the client (kept across pauses).
    pub(super) sbuf: BytesMut,
    /// Where the server's answers end and whether a transaction is open (shared by
    /// both directions of the pump; never contended).
    pub(super) tracked: Mutex<Tracked>,
    /// The node stopped being the primary while this rw session was between
    /// transactions: it moves to the new primary before its next command.
    pub(super) move_pending: AtomicBool,
    /// This session's count on its node (replaced when it moves).
    pub(super) slot: crate::proxy::connector::NodeSlot,
    /// Fresh reads: the writes and token the session's reads must see (`fresh.rs`).
    pub(super) fresh: super::fresh::Fresh,
    /// Transaction pooling: the connection goes back to its pool whenever the session
    /// is at rest and not pinned (`multiplex.rs`).
    pub(super) multiplex: bool,
    /// Transaction pooling: the pool slot of the connection held now.
    pub(super) lease: Option<super::multiplex::Lease>,
    /// Transaction pooling with `read_write_split` (rw): reads take read-only
    /// connections from the replicas' pools (`multiplex.rs`).
    pub(super) split_tx: bool,
    /// The connection held now serves one command only (a split read): the next waits
    /// for it to go back.
    pub(super) one_command: bool,
    /// rw: the server reports each commit's GTID on this connection.
    pub(super) tracking: bool,
    /// The client timeouts of this session's user on its cluster.
    pub(super) timeouts: crate::config::ClientTimeouts,
    /// rw with `read_write_split`: the replica connection for reads (`split.rs`).
    pub(super) split: Option<super::split::Split>,
    /// The listener's counters of bytes read from and written to clients (relayed).
    pub(super) bytes: (Counter, Counter),
}

/// What the relay knows of the client's side of the stream.
#[derive(Default)]
pub(super) struct Inbound {
    pub(super) scanner: Scanner,
    /// Sequence id of the client's last packet.
    pub(super) last_seq: u8,
    /// The client sent COM_QUIT: the server closing is expected.
    pub(super) quit: bool,
    /// LOAD DATA LOCAL INFILE: the client is sending a file (packets until an empty
    /// one), whose sequence ids wrap through 0 without being commands.
    pub(super) in_file: bool,
    /// Why this session cannot be moved to another server connection, if it cannot:
    /// state its statements left there (`moving::scan`).
    pub(super) sticky: Option<&'static str>,
    /// Protocol-level prepared statements opened minus closed.
    pub(super) prepared: i64,
    /// Bumped by each command that may change session settings a replica connection
    /// must mirror (`SET`, `USE`, `COM_INIT_DB`; split reads bring it in line).
    pub(super) state_generation: u64,
    /// Transaction pooling: commands passed on to the connection held now.
    pub(super) lease_commands: u32,
}

/// What the proxy does with a command instead of passing it on.
pub(super) enum Own {
    Kill {
        query_only: bool,
        id: u32,
    },
    Reset,
    ChangeUser,
    /// `SELECT` / `SET @switchyard_causal_token`, or a statement that names it in a
    /// form the proxy does not answer (None).
    Token(Option<super::fresh::TokenStatement>),
}

/// Why the relay of both directions stopped.
pub(super) enum Pause {
    /// The client sent a command the proxy handles itself (its payload); both
    /// directions are at rest, between chunks.
    Own(Vec<u8>),
    /// A command arrived while the session is held (PAUSE, a switchover) or must move;
    /// it waits in the client buffer, and the session is between transactions.
    Hold,
    /// ro: a command arrived at rest after the session's floor moved: its node must be
    /// found fresh enough first (it waits in the client buffer).
    Fresh,
    /// rw with splitting: a read a replica may answer (its payload), taken out at rest.
    Split(Vec<u8>),
    /// Transaction pooling: the session is at rest and not pinned; its connection goes
    /// back to the pool.
    Release,
    /// `query_timeout_ms` fired: the answer in flight is held (the connection stays
    /// this session's) while `KILL QUERY` goes to its server.
    KillQuery,
    End(End),
}

/// What `Inbound::relay` stopped at.
enum Stop {
    Own(Vec<u8>),
    Hold,
    Fresh,
    Split(Vec<u8>),
}

/// A command the proxy may handle itself (`payload`: its start); Some(true): take it
/// whole and look. `tracking`: the rw connection has GTID tracking on, which a reset
/// turns off (the proxy turns it on again).
fn own_command(endpoint: Endpoint, payload: &[u8], tracking: bool, multiplex: bool) -> Option<bool> {
    match payload.first() {
        Some(&protocol::COM_QUERY) => {
            let rest = payload[1..].trim_ascii_start();
            let kill = rest.len() >= 5 && rest[..4].eq_ignore_ascii_case(b"kill") && rest[4].is_ascii_whitespace();
            (kill || super::fresh::mentions_token(rest)).then_some(true)
        }
        Some(&protocol::COM_PROCESS_KILL | &protocol::COM_CHANGE_USER) => Some(true),
        Some(&protocol::COM_RESET_CONNECTION) => (endpoint == Endpoint::ReadOnly || tracking).then_some(true),
        // A pooled connection is not the client's to close.
        Some(&protocol::COM_QUIT) => multiplex.then_some(true),
        _ => None,
    }
}

/// How long a command the proxy handles itself waits for the answer streaming to the
/// client to reach a chunk boundary (a client that sent it while not reading).
const SETTLE: Duration = Duration::from_secs(30);

impl Relay<'_> {
    pub(super) async fn run(
        &mut self,
        client: &mut ClientStream,
        server: ServerConn,
        mut topology: tokio::sync::watch::Receiver<Arc<crate::cluster::topology::ClusterSnapshot>>,
    ) -> End {
        let mut cbuf = BytesMut::with_capacity(RELAY_BUFFER);
        let caps = self.client.capabilities & server.greeting.capabilities;
        // None only in transaction pooling, between transactions (`multiplex.rs`).
        let mut held = Some(server);
        if self.multiplex && self.tracked.lock().unwrap().releasable() {
            // Logged in: the connection serves others until the first command.
            self.release(held.take());
        }
        let end = loop {
            let Some(server) = held.as_mut() else {
                match self.next_connection(client, &mut cbuf, &mut topology, caps).await {
                    Ok(conn) => held = Some(conn),
                    Err(end) => break end,
                }
                continue;
            };
            match self.pump(client, server, &mut cbuf, &mut topology).await {
                Pause::End(end) => break end,
                Pause::Own(payload) if self.multiplex && payload == [protocol::COM_QUIT] => {
                    self.inbound.quit = true;
                    break End::ClientClosed;
                }
                Pause::Own(payload) => {
                    if let Err(end) = self.handle_own(&payload, client, server, caps).await {
                        break end;
                    }
                    // COM_CHANGE_USER and COM_RESET_CONNECTION end any transaction and
                    // the session's state.
                    if let Some(&cmd @ (protocol::COM_CHANGE_USER | protocol::COM_RESET_CONNECTION)) = payload.first() {
                        self.tracked.lock().unwrap().answers.in_transaction = false;
                        self.inbound.note_state(cmd, &[]);
                        self.after_own_reset(cmd);
                        // The replica connection's user or state is no longer the client's.
                        if let Some(split) = self.split.as_mut() {
                            split.drop_replica().await;
                        }
                    }
                    if self.multiplex && self.tracked.lock().unwrap().releasable() {
                        self.release(held.take());
                    }
                }
                // Transaction pooling, at rest: a connection from the pool again at the
                // next command, which waits out a hold. (A pinned session is held and
                // moved as in session pooling, below.)
                Pause::Release => self.release(held.take()),
                Pause::Hold if self.multiplex && self.tracked.lock().unwrap().releasable() => {
                    self.move_pending.store(false, Ordering::Relaxed);
                    self.release(held.take());
                }
                Pause::Hold => match self.hold(server, &mut topology, caps).await {
                    Ok(Some(moved)) => held = Some(moved),
                    Ok(None) => {}
                    Err(end) => break end,
                },
                Pause::Fresh => match self.make_fresh(server, &mut topology, caps).await {
                    Ok(Some(moved)) => held = Some(moved),
                    Ok(None) => {}
                    Err(end) => break end,
                },
                Pause::Split(payload) => {
                    if let Err(end) = self.split_read(payload, client, server, caps).await {
                        break end;
                    }
                }
                Pause::KillQuery => self.kill_running_query(server.thread_id).await,
            }
        };
        if let Some(split) = self.split.as_mut() {
            split.drop_replica().await;
        }
        let awaiting = self.awaiting.load(Ordering::Relaxed);
        if self.multiplex && matches!(end, End::ClientClosed) && self.tracked.lock().unwrap().releasable() {
            // A client that left between transactions: its connection serves others.
            self.release(held.take());
        }
        if matches!(end, End::ClientClosed)
            && (!self.inbound.quit || self.multiplex)
            && self.inbound.scanner.at_boundary()
        {
            // The client vanished without COM_QUIT (or, pooled, its COM_QUIT was ours to
            // answer): say goodbye for it, so the server does not count an aborted
            // connection.
            if let Some(server) = held.as_mut() {
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    write_packet(&mut server.stream, 0, &[protocol::COM_QUIT]),
                )
                .await;
            }
        }
        let notice = match &end {
            End::Failed(e) => Some(e.clone()),
            // A server gone while the client waits for an answer, or idle: the client
            // reads why with its next command (unless it was leaving anyway).
            End::ServerClosed | End::Io(_) if !self.inbound.quit => Some(Error::server_lost(
                &self.cluster.name,
                &self.node.name,
                match &end {
                    End::Io(e) => e.to_string(),
                    _ => "the server closed the connection".to_string(),
                },
            )),
            _ => None,
        };
        if let Some(e) = notice.filter(|_| !self.told) {
            // The client expects the answer to its command in flight, or (idle) the
            // answer to its next command: sequence id 1.
            // Cut short in the middle of a multi-packet answer: after its last packet.
            let mid_answer = self.tracked.lock().unwrap().answers.next_seq_mid_answer();
            let seq = if awaiting && self.inbound.scanner.at_boundary() {
                self.inbound.last_seq.wrapping_add(1)
            } else {
                mid_answer.filter(|_| !awaiting).unwrap_or(1)
            };
            self.shared.metrics.error(e.code().as_str());
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                write_packet(client, seq, &protocol::err_payload(&e)),
            )
            .await;
            let _ = client.shutdown().await;
            if let (End::Failed(_), Some(server)) = (&end, held.as_mut()) {
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    write_packet(&mut server.stream, 0, &[protocol::COM_QUIT]),
                )
                .await;
            }
        }
        end
    }

    /// Relay both directions at once until the session ends or the client sends a
    /// command the proxy handles itself. Each direction reads and writes on its own: a
    /// client that keeps sending while a large answer streams back (pipelining) never
    /// finds the relay blocked writing one way while the other way is full, which would
    /// stall both (the server writes its answer before it reads the next command).
    async fn pump(
        &mut self,
        client: &mut ClientStream,
        server: &mut ServerConn,
        cbuf: &mut BytesMut,
        topology: &mut tokio::sync::watch::Receiver<Arc<crate::cluster::topology::ClusterSnapshot>>,
    ) -> Pause {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.stream.split();
        let (endpoint, node, shared) = (self.endpoint, &self.node, self.shared);
        let (received, sent) = &self.bytes;
        let inbound = &mut self.inbound;
        let awaiting = &self.awaiting;
        let tracked = &self.tracked;
        let cluster = self.cluster;
        let move_pending = &self.move_pending;
        let hold = || endpoint == Endpoint::ReadWrite && (move_pending.load(Ordering::Relaxed) || cluster.is_paused());
        let fresh = &self.fresh;
        let self_multiplex = self.multiplex;
        // (Transaction pooling checks at each connection it takes instead.)
        let check_fresh = || endpoint == Endpoint::ReadOnly && !self_multiplex && fresh.needs_check();
        // rw: the writes the server's OKs report (`Answers::gtid`, `oks`).
        let record_writes = (endpoint == Endpoint::ReadWrite).then(|| (fresh.writes.clone(), fresh.maria));
        let tracking = self.tracking;
        let multiplex = self.multiplex;
        let one_command = self.one_command;
        // Set when the server side stops because the connection can go back to the pool.
        let release_now = AtomicBool::new(false);
        let classifier = self
            .split
            .is_some()
            .then(|| &super::ClusterInfo::of(cluster).classifier);
        let digests = tracked
            .lock()
            .unwrap()
            .answers
            .statements
            .then(|| &super::ClusterInfo::of(cluster).classifier);
        let traces = shared.digests.tracing();
        let database = super::digests::client_database(self.client);
        let route = match (endpoint, node.role) {
            (Endpoint::ReadWrite, _) => Route::Primary,
            (Endpoint::ReadOnly, Role::Standby) => Route::Replica,
            (Endpoint::ReadOnly, _) => Route::Fallback,
        };
        let place = super::digests::place(cluster, node, &database, route);
        // The server-to-client side stops at its next chunk boundary when told (a
        // stream is only ever cut between whole writes): at once when it is waiting for
        // the server (it is dropped there), else once its write is done. Two flags rather
        // than a `Notify` to wait on beside each read: that wait cost a lock per answer.
        let stopping = AtomicBool::new(false);
        let writing = AtomicBool::new(false);
        // Set when the process shuts down or a reload removed the cluster while the
        // session was inside a transaction: the transaction may finish, and the session
        // ends once it is at rest (or after `shutdown_timeout_ms`).
        let draining = AtomicBool::new(false);
        let drained = || draining.load(Ordering::Relaxed) && tracked.lock().unwrap().answers.at_rest();
        let client_to_server = async {
            loop {
                // A new command after the last transaction ended: not passed on.
                if !cbuf.is_empty() && drained() {
                    return Pause::End(End::Failed(shared.ending(cluster)));
                }
                let gates = Gates {
                    hold: hold(),
                    fresh: check_fresh(),
                    tracking,
                    split: classifier,
                    writes: record_writes.as_ref().map(|(w, _)| &**w),
                    multiplex,
                    one_command,
                    digests,
                    traces,
                };
                match inbound
                    .relay(cbuf, &mut sw, endpoint, node, awaiting, tracked, gates)
                    .await
                {
                    Err(end) => return Pause::End(end),
                    Ok(Some(Stop::Own(own))) => return Pause::Own(own),
                    Ok(Some(Stop::Hold)) => return Pause::Hold,
                    Ok(Some(Stop::Fresh)) => return Pause::Fresh,
                    Ok(Some(Stop::Split(payload))) => return Pause::Split(payload),
                    Ok(None) => {}
                }
                match cr.read_some(cbuf).await {
                    Ok(0) => return Pause::End(End::ClientClosed),
                    Err(e) => return Pause::End(End::Io(e)),
                    Ok(n) => {
                        received.inc_by(n as u64);
                    }
                }
            }
        };
        let sbuf = &mut self.sbuf;
        let server_to_client = async {
            loop {
                if stopping.load(Ordering::Relaxed) {
                    return None;
                }
                let before = sbuf.len();
                // (Cancel-safe: nothing is read across an await.)
                match sr.read_some(sbuf).await {
                    Ok(0) => return Some(End::ServerClosed),
                    Err(e) => return Some(End::Io(e)),
                    Ok(_) => {}
                }
                {
                    let mut t = tracked.lock().unwrap();
                    t.answers.feed(&sbuf[before..]);
                    t.update();
                    for class in t.answers.errors.drain(..) {
                        shared.metrics.server_error(&cluster.name, class);
                    }
                    if !t.answers.finished.is_empty() {
                        let worker = crate::proxy::pool::worker();
                        let now = std::time::Instant::now();
                        record(&shared.digests, worker, &mut t.answers.finished, &place, now, None);
                    }
                    // Before the client sees the OK of a write: a read it sends next (on
                    // any connection of the user) must find the write counted.
                    if let Some((writes, maria)) = &record_writes {
                        note_writes(&mut t, writes, *maria, tracking);
                    }
                    if multiplex {
                        t.absorb_state();
                    }
                }
                awaiting.store(false, Ordering::Relaxed);
                writing.store(true, Ordering::Relaxed);
                if let Err(e) = write_flush(&mut cw, sbuf).await {
                    return Some(End::Io(e));
                }
                writing.store(false, Ordering::Relaxed);
                sent.inc_by(sbuf.len() as u64);
                sbuf.clear();
                if drained() {
                    return Some(End::Failed(shared.ending(cluster)));
                }
                // The whole answer is with the client and nothing else is owed (no
                // command of the client's has been passed on since: that would be owed).
                if multiplex && tracked.lock().unwrap().releasable() {
                    release_now.store(true, Ordering::Relaxed);
                    return None;
                }
            }
        };
        let watchdog = super::timeouts::watchdog(self.timeouts, tracked);
        tokio::pin!(client_to_server, server_to_client, watchdog);
        // Topology changes, the process leaving and the cluster's removal are waited on
        // through this worker thread's repeaters (`local_watch`): every wake-up of the
        // session polls these branches, and a `watch` wait joins the channel's waiter
        // list, behind a lock all threads take, at each poll. The session's own
        // `topology` receiver still says what changed since it last looked (also before
        // this pump began: looked at once at the start).
        let mut local_topology = cluster.state.subscribe_local();
        let mut leaving = shared.shutdown_local();
        if *shared.shutdown.borrow() || cluster.retiring() {
            leaving.mark_changed();
        }
        let mut look_now = true;
        let mut watching = true;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let pause = loop {
            tokio::select! {
                // In a fixed order, not a random one (which costs a random number at
                // each wake-up): the two directions first, then the rare events.
                biased;
                p = &mut client_to_server => break p,
                e = &mut server_to_client => {
                    if e.is_none() && release_now.load(Ordering::Relaxed) {
                        return Pause::Release;
                    }
                    return Pause::End(e.unwrap_or(End::ServerClosed));
                }
                woke = async {
                    if look_now {
                        Ok(())
                    } else {
                        local_topology.changed().await
                    }
                }, if watching => {
                    look_now = false;
                    match (woke, topology.has_changed()) {
                        (Ok(()), Ok(true)) => {}
                        (Ok(()), Ok(false)) => continue,
                        (Err(_), _) | (_, Err(_)) => {
                            watching = false;
                            continue;
                        }
                    }
                    let snap = topology.borrow_and_update().clone();
                    if let Some(reason) = routing::eviction(endpoint, &snap, &node.name) {
                        // Transaction pooling: a session at rest just gives its
                        // connection back; its next command gets one where it belongs.
                        if multiplex && tracked.lock().unwrap().releasable() {
                            break Pause::Release;
                        }
                        let up = snap.index(&node.name).is_some_and(|i| snap.nodes[i].health == Health::Up);
                        // A rw session between transactions on a node that is up but no
                        // longer the primary (a switchover) moves at its next command.
                        // (No primary yet while a switchover holds the cluster: the new
                        // one comes before the hold ends.)
                        let movable = endpoint == Endpoint::ReadWrite
                            && up
                            && (routing::write_primary(&snap).is_ok() || cluster.is_paused())
                            && tracked.lock().unwrap().answers.at_rest();
                        if movable {
                            move_pending.store(true, Ordering::Relaxed);
                            continue;
                        }
                        break Pause::End(End::Failed(Error::evicted(up, reason)));
                    }
                }
                fired = &mut watchdog => {
                    if fired == Fired::Query {
                        crate::proxy::limits::timed_out(shared, &cluster.name, fired, "KILL QUERY sent to the server");
                        break Pause::KillQuery;
                    }
                    crate::proxy::limits::timed_out(shared, &cluster.name, fired, "session ended");
                    let e = self.timeouts.error(fired);
                    break Pause::End(End::Failed(e));
                }
                woke = leaving.changed(), if drain_until.is_none() => {
                    if woke.is_ok() && !(*shared.shutdown.borrow() || cluster.retiring()) {
                        continue; // a successor, or another cluster's removal
                    }
                    let e = shared.ending(cluster);
                    // Between transactions with nothing owed: now. Otherwise the answer
                    // in flight and the rest of the transaction may come first.
                    if tracked.lock().unwrap().answers.at_rest() {
                        break Pause::End(End::Failed(e));
                    }
                    draining.store(true, Ordering::Relaxed);
                    let grace = Duration::from_millis(shared.config().proxy.shutdown_timeout_ms);
                    drain_until = Some(tokio::time::Instant::now() + grace);
                }
                _ = async {
                    match drain_until {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if drain_until.is_some() => break Pause::End(End::Failed(shared.ending(cluster))),
            }
        };
        // Whatever comes next (the proxy's own answer, an ERR saying why the session
        // ends) goes to the client after whole chunks only. A session that ends waits
        // briefly (shutdown has its own bound); a command of the proxy's waits longer.
        stopping.store(true, Ordering::Relaxed);
        if !writing.load(Ordering::Relaxed) {
            return pause; // waiting for the server: between writes
        }
        let settle = if matches!(pause, Pause::Own(_)) {
            SETTLE
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(settle, &mut server_to_client).await {
            Ok(None) => pause,
            Ok(Some(end)) => Pause::End(end),
            Err(_) => Pause::End(End::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client did not take the rest of an answer within {} s",
                    settle.as_secs()
                ),
            ))),
        }
    }
}

/// What a relay of the client's bytes stops at, besides the proxy's own commands.
#[derive(Clone, Copy)]
struct Gates<'a> {
    /// Hold commands at rest (PAUSE, a switchover, a pending move).
    hold: bool,
    /// ro: stop at the next command at rest, to check the node's freshness first.
    fresh: bool,
    /// rw: GTID tracking is on (a reset is the proxy's to complete).
    tracking: bool,
    /// rw with splitting: take out reads a replica may answer.
    split: Option<&'a super::classify::Classifier>,
    /// rw: the session's writes, for statements that write and answer with rows.
    writes: Option<&'a super::fresh::Writes>,
    /// Transaction pooling (COM_QUIT is the proxy's).
    multiplex: bool,
    /// The connection takes one command only (a split read in transaction pooling).
    one_command: bool,
    /// The query digests are on: the classifier that names statements.
    digests: Option<&'a super::classify::Classifier>,
    /// Traces are on: read each statement's `traceparent` comment.
    traces: bool,
}

/// A statement that may write and answer with rows: one with a `RETURNING` clause, or
/// a `CALL` (`text`: its start, as far as it is in the buffer; a `RETURNING` past that
/// is missed, and such a write counts only if its answer ends with an OK).
fn writes_with_rows(text: &[u8]) -> bool {
    let t = text.trim_ascii_start();
    if t.len() > 4 && t[..4].eq_ignore_ascii_case(b"call") && !t[4].is_ascii_alphanumeric() {
        return true;
    }
    // Looked for from each `r` only (the text of every statement passes here).
    memchr::memchr2_iter(b'r', b'R', t).any(|i| {
        t.get(i..i + 9).is_some_and(|w| w.eq_ignore_ascii_case(b"returning"))
            && (i == 0 || !t[i - 1].is_ascii_alphanumeric() && t[i - 1] != b'_')
            && t.get(i + 9).is_none_or(|c| !c.is_ascii_alphanumeric() && *c != b'_')
    })
}

/// Count the writes the server's answers just reported (rw): each commit's GTID when the
/// server tracks them, else every OK-ended answer as a write of unknown position.
pub(super) fn note_writes(t: &mut Tracked, writes: &super::fresh::Writes, maria: bool, tracking: bool) {
    if t.rows_write_pending && t.answers.idle() {
        writes.committed();
        t.rows_write_pending = false;
    }
    let answers = &mut t.answers;
    if let Some(g) = answers.gtid.take() {
        writes.wrote(super::gtid::Position::parse(maria, &g));
    }
    if answers.oks > 0 {
        if !tracking || answers.untracked_ok {
            writes.wrote(None);
        }
        answers.oks = 0;
        answers.untracked_ok = false;
    }
}

impl Inbound {
    /// Pass on the client's bytes in `cbuf` (to `server`), up to a command the proxy
    /// handles itself, which is taken out whole and returned; bytes after it stay in
    /// `cbuf` for later.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &mut self,
        cbuf: &mut BytesMut,
        server: &mut ServerWrite<'_>,
        endpoint: Endpoint,
        node: &NodeState,
        awaiting: &AtomicBool,
        tracked: &Mutex<Tracked>,
        gates: Gates<'_>,
    ) -> Result<Option<Stop>, End> {
        let mut pos = 0;
        let mut own = None;
        let mut held = None;
        // Bytes after `pos` taken out with a split read.
        let mut cbuf_skip = 0;
        let mut commands = 0u64;
        while pos < cbuf.len() {
            if self.scanner.at_boundary() {
                let rest = &cbuf[pos..];
                if rest.len() < 4 {
                    break;
                }
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], 0]) as usize;
                let seq = rest[3];
                // A packet with a sequence id other than 0 that starts a message is file
                // data (the only thing a client sends unasked); an empty one ends it.
                if seq != 0 || self.in_file {
                    self.in_file = len != 0;
                }
                if seq == 0 && !self.in_file && len != 0 {
                    if rest.len() < 4 + len.min(PEEK) {
                        break; // the start of the command is not here yet
                    }
                    if gates.one_command && self.lease_commands > 0 {
                        if let Some(why) = tracked.lock().unwrap().pinned {
                            // The read left state on a replica's read-only connection: it
                            // can neither go back nor take the next command.
                            return Err(End::Failed(Error::not_fresh(format!(
                                "a read sent to a replica left {why} on its connection; reconnect"
                            ))));
                        }
                        // Not on this connection: it waits until this one goes back.
                        break;
                    }
                    if own_command(endpoint, &rest[4..4 + len.min(PEEK)], gates.tracking, gates.multiplex).is_some() {
                        if len > INTERCEPT_MAX {
                            return Err(End::Failed(Error::protocol("command too long")));
                        }
                        if rest.len() >= 4 + len {
                            own = Some(rest[4..4 + len].to_vec());
                        }
                        break; // whole: handled after what came before; else wait for it
                    }
                    if (gates.hold || gates.fresh) && tracked.lock().unwrap().answers.at_rest() {
                        // Held before it reaches the server: the rest stays in cbuf.
                        held = Some(if gates.hold { Stop::Hold } else { Stop::Fresh });
                        break;
                    }
                    if let Some(classifier) = gates.split {
                        if rest[4] == protocol::COM_QUERY
                            && len <= super::split::SPLIT_MAX
                            && self.unmovable().is_none()
                        {
                            let eligible = {
                                let t = tracked.lock().unwrap();
                                // Autocommit on: a read on the replica opens no transaction there.
                                t.answers.at_rest() && t.answers.status & SERVER_STATUS_AUTOCOMMIT != 0
                            };
                            if eligible {
                                if rest.len() < 4 + len {
                                    break; // the whole statement first
                                }
                                if classifier.classify(&rest[5..4 + len]).read {
                                    held = Some(Stop::Split(rest[4..4 + len].to_vec()));
                                    cbuf_skip = 4 + len;
                                    break;
                                }
                            }
                        }
                    }
                    commands += 1;
                    self.lease_commands += 1;
                    let cmd = rest.get(4).copied();
                    self.quit |= cmd == Some(protocol::COM_QUIT);
                    if let Some(cmd) = cmd {
                        let mut t = tracked.lock().unwrap();
                        t.answers.command(cmd);
                        t.update();
                        if let Some(classifier) = gates.digests {
                            super::digests::describe(&mut t.answers, classifier, cmd, &rest[4..], len);
                            if gates.traces && cmd == protocol::COM_QUERY && rest.len() >= 4 + len {
                                t.answers.trace_last(crate::obs::trace::traceparent(&rest[5..4 + len]));
                            }
                        }
                        drop(t);
                        let text = &rest[5..(4 + len).min(rest.len())];
                        self.note_state(cmd, text);
                        if let Some(why) = self.unmovable() {
                            tracked.lock().unwrap().pinned.get_or_insert(why);
                        }
                        if let Some(writes) = gates.writes {
                            // A write answered with rows (`INSERT ... RETURNING`, a
                            // procedure) ends with an EOF that carries no GTID: counted
                            // now, before its answer can reach the client, as a write
                            // of unknown position.
                            if cmd == protocol::COM_QUERY && writes_with_rows(text) {
                                writes.wrote(None);
                                tracked.lock().unwrap().rows_write_pending = true;
                            }
                        }
                    }
                    awaiting.store(
                        !matches!(cmd, Some(protocol::COM_STMT_CLOSE | protocol::COM_STMT_SEND_LONG_DATA)),
                        Ordering::Relaxed,
                    );
                }
                self.last_seq = seq;
            }
            match self.scanner.next(&cbuf[pos..]) {
                Some((n, _)) => pos += n,
                None => break,
            }
        }
        if pos > 0 {
            write_flush(server, &cbuf[..pos]).await.map_err(End::Io)?;
        }
        let taken = pos + own.as_ref().map_or(0, |p: &Vec<u8>| 4 + p.len()) + cbuf_skip;
        cbuf.advance(taken);
        if let Some(stop) = held {
            return Ok(Some(stop));
        }
        // Advancing uses up the buffer's front: take it back (no allocation while the
        // buffer is empty or nearly so), so the next read is never a short one.
        cbuf.reserve(RELAY_BUFFER / 2);
        if commands > 0 {
            node.stats.queries_total.fetch_add(commands, Ordering::Relaxed);
        }
        Ok(own.map(Stop::Own))
    }

    /// What a command leaves on the server connection that a move cannot carry over.
    /// `text`: its payload after the command byte, as far as it is in the buffer.
    pub(super) fn note_state(&mut self, cmd: u8, text: &[u8]) {
        match cmd {
            protocol::COM_QUERY => {
                if let Some(why) = super::moving::scan(text) {
                    self.sticky.get_or_insert(why);
                }
                let first = text.trim_ascii_start();
                let word = |w: &[u8]| {
                    first.len() > w.len()
                        && first[..w.len()].eq_ignore_ascii_case(w)
                        && !first[w.len()].is_ascii_alphanumeric()
                };
                if word(b"set") || word(b"use") {
                    self.state_generation += 1;
                }
            }
            0x02 => self.state_generation += 1, // COM_INIT_DB
            0x16 => self.prepared += 1,         // COM_STMT_PREPARE
            protocol::COM_STMT_CLOSE => self.prepared -= 1,
            protocol::COM_RESET_CONNECTION | protocol::COM_CHANGE_USER => {
                self.sticky = None;
                self.prepared = 0;
                self.state_generation += 1;
            }
            _ => {}
        }
    }

    /// Why the session cannot move, if it cannot.
    pub(super) fn unmovable(&self) -> Option<&'static str> {
        self.sticky
            .or((self.prepared > 0).then_some("a prepared statement (COM_STMT_PREPARE)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_answered_with_rows_are_recognised() {
        assert!(writes_with_rows(b"INSERT INTO t (a) VALUES (1) RETURNING id"));
        assert!(writes_with_rows(b"DELETE FROM t WHERE a = 1 RETURNING *"));
        assert!(writes_with_rows(b"  call do_it(1)"));
        assert!(!writes_with_rows(b"SELECT returning_customers FROM t"));
        assert!(!writes_with_rows(b"INSERT INTO t VALUES (1)"));
        assert!(!writes_with_rows(b"SELECT 1"));
    }

    #[test]
    fn only_the_commands_the_proxy_answers_are_taken_out_of_the_stream() {
        let query = |sql: &str| [&[protocol::COM_QUERY][..], sql.as_bytes()].concat();
        for ep in [Endpoint::ReadWrite, Endpoint::ReadOnly] {
            assert_eq!(own_command(ep, &query("KILL 1073741825"), false, false), Some(true));
            assert_eq!(own_command(ep, &query("  kill\tQUERY 5"), false, false), Some(true));
            assert_eq!(
                own_command(ep, &query("KILLER()"), false, false),
                None,
                "a word that starts with kill"
            );
            assert_eq!(own_command(ep, &query("SELECT 1"), false, false), None);
            assert_eq!(
                own_command(ep, &query("SELECT @switchyard_causal_token"), false, false),
                Some(true)
            );
            assert_eq!(own_command(ep, &query("SELECT @switchyard_x"), false, false), None);
            assert_eq!(
                own_command(ep, &[protocol::COM_PROCESS_KILL, 1, 0, 0, 0], false, false),
                Some(true)
            );
            assert_eq!(own_command(ep, &[protocol::COM_CHANGE_USER], false, false), Some(true));
            assert_eq!(own_command(ep, &[], false, false), None);
        }
        // A reset loses the ro session's READ ONLY, and a rw session's GTID tracking:
        // the proxy sets them again there only.
        assert_eq!(
            own_command(Endpoint::ReadOnly, &[protocol::COM_RESET_CONNECTION], false, false),
            Some(true)
        );
        assert_eq!(
            own_command(Endpoint::ReadWrite, &[protocol::COM_RESET_CONNECTION], false, false),
            None
        );
        assert_eq!(
            own_command(Endpoint::ReadWrite, &[protocol::COM_RESET_CONNECTION], true, false),
            Some(true)
        );
    }
}
