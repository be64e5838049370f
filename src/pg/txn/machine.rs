//! Transaction pooling as a state machine with no I/O. The driver (`driver.rs`) feeds it
//! what arrives (client bytes, server bytes, a connection acquired, a connection lost,
//! the node evicted) and performs what it asks for: bytes in `to_server` / `to_client`,
//! and `Action`s (acquire a connection, release it, close idle connections, end).
//!
//! One unit of work holds a server connection: from the first message of a transaction
//! or of a statement outside one, to the ReadyForQuery (status idle) that ends it with
//! nothing more owed. Between units the client holds nothing.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tracing::{info, warn};

use super::ask::{self, Asked};
use super::conn::ConnState;
use super::owed::{Owed, OwedQueue, Verdict};
use super::running::Running;
use super::spares;
use super::state::SessionState;
use super::statements::{OwnStatement, SqlStatements, Statements};
use super::unit;
use crate::error::{Error, SqlState};
use crate::pg::classify::{self, Classification, Classifier};
use crate::pg::protocol::messages;
pub use crate::pg::protocol::messages::{write_causal_reply, CausalReply};
use crate::pg::protocol::tags::{BackendTag, FrontendTag, TxStatus};
use crate::pg::protocol::views::{self, ErrorFields, ParameterStatus, Parse, Query, StatementRef};
use crate::traceparent::{traceparent, TraceParent};

pub use super::action::{Action, Config, Target};
use crate::proxy::timeouts::Waiting;

/// Where the session is. The held connection, if any, is `Machine::unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Startup: the first connection is acquired and brought to the client's settings,
    /// then the client is greeted. Nothing the client sends is looked at before.
    Greeting,
    /// Greeted: units run as the client sends them.
    Serving,
    /// A connection is being acquired (the `Action::Acquire` is queued or under way):
    /// for a new unit, whose first message is stashed, or with `rerun` for the unit in
    /// progress, to run again from `sent`. `read`: the unit is a proven read.
    Acquiring { read: bool, rerun: bool },
    /// A new unit was refused before it reached a server: the client's messages are
    /// dropped up to its next Sync, as a server does after an error in the extended
    /// protocol, then ReadyForQuery.
    SkippingToSync,
    /// The session ended (its `Action::End` is queued).
    Ended,
}

/// The unit of work in progress, on the held connection.
struct Unit {
    node: Arc<str>,
    on_primary: bool,
    server_pid: i32,
    /// A read routed by splitting: may run again elsewhere until answered.
    retryable: bool,
    /// Transaction status of the last ReadyForQuery.
    status: TxStatus,
    /// Extended-protocol messages were sent after the last Sync: the server is inside a
    /// batch (a pipelining client sends the next one before the last is answered).
    batch_open: bool,
    /// Some of this unit's answer was written to the client (retry is safe only before).
    answered: bool,
    /// Ran a statement on the primary, for the rw endpoint, that is neither a proven read
    /// nor a change of session settings only: may have written.
    may_write: bool,
    /// A commit of a transaction that may have written was sent and not yet answered
    /// (a COMMIT, or a write outside a transaction block, which commits by itself).
    commit_in_flight: bool,
    /// What the statement last parsed or bound does (extended protocol). Only its
    /// Execute makes the unit one that may have written, or puts a commit in flight.
    bound: Bound,
    /// `to_client` holds part of the answer (not only notices or reported settings,
    /// which may come at any time and say nothing of how far the unit got).
    answer_queued: bool,
    /// Something sent since the last Sync or Query may not be followed at once by a
    /// question of the proxy's own (`Classification::no_question_after`: it may leave a
    /// transaction block open, or is a COPY FROM): no floor question goes after it.
    no_question_after: bool,
    /// The write-floor question went with this unit's commit (`Machine::ask_floor`);
    /// and its answer is still to come.
    floor_asked: bool,
    floor_pending: bool,
}

/// What the statement last parsed or bound does (extended protocol); its Execute does it.
#[derive(Debug, Clone, Copy, Default)]
struct Bound {
    /// It may write (neither a proven read nor a change of settings only).
    writes: bool,
    /// It may write and does not begin a transaction block: outside one it commits by
    /// itself.
    writes_alone: bool,
    /// It commits.
    commits: bool,
}

pub struct Machine<'a> {
    cfg: Config,
    classifier: &'a Classifier,
    pub state: SessionState,
    stmts: Statements,
    /// The client's SQL-level prepared statements.
    sql_stmts: SqlStatements,
    /// LISTEN / UNLISTEN statements the driver is carrying out (`Action::Listen`).
    listening: Vec<crate::pg::notify::ListenOp>,
    owed: OwedQueue,
    unit: Option<Unit>,
    /// Why the client keeps its server connection between units: the first reason that
    /// lasts, or one that can be left (`classify::releasable`) until one that lasts comes.
    pinned: Option<&'static str>,
    /// Pinned only for reasons that can be left, and a statement may have released
    /// them since: ask the server at the end of the unit whether any are left.
    check_pins: bool,
    /// A client message taken from the input but not dispatched yet: the first of a unit
    /// waiting for its connection, or the next unit's, held back until this one ends.
    /// With it, whether it is a Query already looked at for a causal-token statement and
    /// LISTEN between units (and found to be neither): not looked at again when it is
    /// taken back once its connection is there.
    stash: Option<(Bytes, bool)>,
    /// The client's messages of the unit in progress as received, for a retry (kept
    /// here, not in `Unit`, so its allocation is reused); only while the unit is
    /// `retryable` and unanswered.
    sent: Vec<Bytes>,
    phase: Phase,
    pub to_server: BytesMut,
    pub to_client: BytesMut,
    actions: VecDeque<Action>,
    /// Client statements executed (Query, Execute), for the routed-queries counter.
    pub queries: u64,
    /// Read-your-writes: the question that learns the WAL position a write's commit
    /// reached, to send in the same write as the unit's commit (set by the driver for a
    /// unit whose floor a read is likely to need soon; `Causal::floor_wanted_soon`). The
    /// server answers it right after the commit, from what it already read: no round
    /// trip and no wake-up of its own, unlike a question asked after the answer.
    pub ask_floor: Option<&'a OwnStatement>,
    /// Its answer as it comes (the row, or None after an error), then, whole, for the
    /// driver (`take_floor`).
    floor_row: Option<Option<Vec<Option<String>>>>,
    floor: Option<Asked>,
    /// Bytes of a large server message still to pass on as they arrive.
    streaming: usize,
    /// The client's stream is inside a message (part of a streamed one was passed on
    /// and the rest never came): nothing of the proxy's own may be written to it.
    client_mid_message: bool,
    /// A unit that may have written ended since the driver last asked (`take_wrote`).
    wrote: bool,
    /// The client was greeted with a server's report, which the driver may remember
    /// (`take_greeted_by_server`).
    greeted_by_server: bool,
    /// Statements in flight on the held connection and those finished, for the query
    /// digests (only with `Config::digests`; the driver times and records them).
    pub running: Running,
    /// SQLSTATE classes of the server errors passed to the client since the driver last
    /// took them (for `/metrics`).
    pub server_errors: Vec<[u8; 2]>,
    /// Notifications the client sent (the server backend's pid, channel, payload) since
    /// the driver last took them: when they come back through the shared listener, they
    /// carry the client's own pid, as on a direct connection.
    pub notified: Vec<(i32, String, String)>,
    /// UNLISTENs (and `DISCARD ALL`) the client sent to the server since the driver last
    /// took them: they end its LISTENs on the shared connection too.
    pub unlistened: Vec<crate::pg::notify::ListenOp>,
}

impl<'a> Machine<'a> {
    /// A session just authenticated. With `greeting` (what a server reported to an
    /// earlier client of the same login, as ParameterStatus messages: `pg::greetings`)
    /// the client is greeted at once;
    /// else the first action acquires a connection, brings it to the client's startup
    /// settings and greets the client with what that server reports.
    pub fn new(
        cfg: Config,
        startup: impl Into<std::sync::Arc<[(String, String)]>>,
        classifier: &'a Classifier,
        greeting: Option<&[u8]>,
    ) -> Machine<'a> {
        let state = SessionState::new(startup, cfg.read_only_endpoint);
        let mut m = Machine {
            greeted_by_server: false,
            phase: Phase::Greeting,
            cfg,
            classifier,
            state,
            stmts: Statements::default(),
            sql_stmts: SqlStatements::default(),
            listening: Vec::new(),
            owed: OwedQueue::default(),
            unit: None,
            pinned: None,
            check_pins: false,
            stash: None,
            sent: Vec::new(),
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            actions: VecDeque::new(),
            queries: 0,
            ask_floor: None,
            floor_row: None,
            floor: None,
            streaming: 0,
            client_mid_message: false,
            wrote: false,
            running: Running::default(),
            server_errors: Vec::new(),
            notified: Vec::new(),
            unlistened: Vec::new(),
        };
        if let Some(status) = greeting {
            m.write_greeting(status);
            return m;
        }
        // The greeting's connection: where the session's first unit would go. (Not a
        // unit of the client's: never run again elsewhere.)
        let first = m.route(m.cfg.read_only_endpoint, None, false);
        m.actions.push_back(first);
        m
    }

    /// The routing decision for a unit, in one place: a proven read (`read`) goes to a
    /// readable node where reads may go elsewhere (the ro endpoint, or the rw endpoint
    /// with `read_write_split`), everything else to the primary; on the ro endpoint
    /// everything is read on a readable node, except a read a standby refused (only a
    /// primary runs it): its rerun goes to the primary, where the session's
    /// default_transaction_read_only still holds.
    fn route(&self, read: bool, exclude: Option<String>, rerun: bool) -> Action {
        let readable = if self.cfg.read_only_endpoint {
            read || !rerun
        } else {
            read && self.cfg.split
        };
        Action::Acquire {
            to: if readable { Target::Readable } else { Target::Primary },
            read,
            exclude,
            rerun,
        }
    }

    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The client's stream is at a message boundary: the proxy may add its own message
    /// (a goodbye); otherwise it can only close.
    pub fn client_at_boundary(&self) -> bool {
        !self.client_mid_message
    }

    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The next action runs the unit just released again (a moved read): the unit goes
    /// on rather than ends.
    pub fn rerun_next(&self) -> bool {
        matches!(self.actions.front(), Some(Action::Acquire { rerun: true, .. }))
    }

    pub fn read_only_endpoint(&self) -> bool {
        self.cfg.read_only_endpoint
    }

    /// The node of the held connection.
    pub fn node(&self) -> Option<&str> {
        self.unit.as_ref().map(|u| &*u.node)
    }

    /// The held connection writes (rw endpoint, primary): evicted when that node stops
    /// being the primary; else when it stops being readable.
    pub fn writes(&self) -> bool {
        !self.cfg.read_only_endpoint && self.unit.as_ref().is_some_and(|u| u.on_primary)
    }

    /// What the session waits for (the client timeouts: `proxy::timeouts`).
    pub fn waiting(&self) -> Waiting {
        match (&self.unit, self.phase) {
            (_, Phase::Greeting | Phase::Acquiring { .. } | Phase::Ended) => Waiting::Other,
            _ if !self.owed.is_empty() => Waiting::Server,
            (Some(u), _) if u.status != TxStatus::Idle || u.batch_open => Waiting::ClientInTransaction,
            _ => Waiting::Client,
        }
    }

    /// A client timeout ends the session with `e`. A held connection goes back to its
    /// pool if the driver rolled its transaction back (`rolled_back`) and nothing of
    /// this client's stays on it; else it is closed, so its server rolls back.
    pub fn on_timeout(&mut self, e: Error, rolled_back: bool) {
        self.release(rolled_back && self.pinned.is_none());
        self.end(Some(e));
    }

    fn end(&mut self, e: Option<Error>) {
        if self.phase != Phase::Ended {
            self.phase = Phase::Ended;
            self.actions.push_back(Action::End(e.map(Box::new)));
        }
    }

    /// The connection's state lets another client have it: idle, nothing owed, the
    /// client not pinned to it.
    fn reusable(&self) -> bool {
        self.pinned.is_none()
            && self.owed.is_empty()
            && self
                .unit
                .as_ref()
                .is_some_and(|u| u.status == TxStatus::Idle && !u.batch_open)
    }

    fn release(&mut self, reuse: bool) {
        self.streaming = 0;
        self.running.clear();
        if let Some(u) = self.unit.take() {
            self.wrote |= u.may_write && u.on_primary && !self.cfg.read_only_endpoint;
            self.actions.push_back(Action::Release { reuse });
        }
    }

    /// At rest between units (the driver gives its buffers back): the last unit's
    /// messages, kept for a rerun that can no longer come, are let go of, and with them
    /// the read buffer they are views of.
    ///
    /// The queues' storage goes back to the thread's spares until the client sends again
    /// (`spares`).
    pub fn rest(&mut self) {
        if self.unit.is_none() && matches!(self.phase, Phase::Serving) {
            self.sent.clear();
            // (Once given back, the actions' queue has no storage: nothing more to do.)
            if self.actions.capacity() > 0 && self.queues_empty() {
                spares::give_back(self.take_queues());
            }
        }
    }

    fn queues_empty(&mut self) -> bool {
        let (stmts, finished) = self.running.storage();
        let running_empty = stmts.is_empty() && finished.is_empty();
        running_empty && self.actions.is_empty() && self.owed.storage().is_empty() && self.sent.is_empty()
    }

    fn take_queues(&mut self) -> spares::Queues {
        let (stmts, finished) = self.running.storage();
        spares::Queues {
            actions: std::mem::take(&mut self.actions),
            owed: std::mem::take(self.owed.storage()),
            stmts: std::mem::take(stmts),
            finished: std::mem::take(finished),
            sent: std::mem::take(&mut self.sent),
        }
    }

    fn put_queues(&mut self, q: spares::Queues) {
        spares::refill(&mut self.actions, q.actions);
        spares::refill(self.owed.storage(), q.owed);
        let (stmts, finished) = self.running.storage();
        spares::refill(stmts, q.stmts);
        spares::refill(finished, q.finished);
        spares::refill(&mut self.sent, q.sent);
    }

    /// Whether a unit that may have written on the primary ended since the last call:
    /// the client's reads must then see a WAL position the driver learns after it.
    pub fn take_wrote(&mut self) -> bool {
        std::mem::take(&mut self.wrote)
    }

    /// The answer to the write-floor question sent with the unit's commit (`ask_floor`),
    /// once: None if none was sent; `Asked::Lost` if the connection went before it came.
    pub fn take_floor(&mut self) -> Option<Asked> {
        self.floor.take()
    }

    /// Between transactions with nothing owed (held connection or not): the proxy may
    /// answer a statement itself.
    pub fn between_units(&self) -> bool {
        self.owed.is_empty()
            && self
                .unit
                .as_ref()
                .is_none_or(|u| u.status == TxStatus::Idle && !u.batch_open)
    }

    /// The driver carried out `Action::Listen`: the client gets what a server would say.
    pub fn on_listened(&mut self, result: Result<(), String>) {
        let ops = std::mem::take(&mut self.listening);
        match result {
            Ok(()) => {
                for op in &ops {
                    messages::command_complete(&mut self.to_client, op.tag());
                }
            }
            Err(why) => messages::error_response(
                &mut self.to_client,
                messages::Severity::Error,
                "55000",
                &format!("LISTEN could not take effect: {why}"),
                Some("retry; Switchyard listens for transaction-pooled clients on one connection to the primary"),
            ),
        }
        messages::ready_for_query(&mut self.to_client, TxStatus::Idle);
    }

    /// The driver's answer to `Action::Causal`: written as a server would.
    pub fn on_causal_reply(&mut self, reply: Result<CausalReply, Error>) {
        write_causal_reply(&mut self.to_client, reply);
    }

    /// The driver got a connection (`conn`) on `node` after `Acquire`.
    pub fn on_acquired(&mut self, node: &Arc<str>, on_primary: bool, conn: &mut ConnState) {
        self.owed.clear();
        let (read, rerun) = match self.phase {
            Phase::Acquiring { read, rerun } => {
                self.phase = Phase::Serving;
                (read, rerun)
            }
            _ => (false, false),
        };
        if !rerun {
            self.sent.clear();
        }
        self.unit = Some(Unit {
            may_write: false,
            commit_in_flight: false,
            bound: Bound::default(),
            node: node.clone(),
            on_primary,
            server_pid: conn.pid,
            // A proven read placed on a standby: by splitting, or on the ro endpoint.
            retryable: read && (self.cfg.split || self.cfg.read_only_endpoint),
            status: TxStatus::Idle,
            batch_open: false,
            answered: false,
            answer_queued: false,
            no_question_after: false,
            floor_asked: false,
            floor_pending: false,
        });
        self.floor = None;
        // Bring the connection to the client's settings, in the same write as the
        // unit's first messages: no round trip of its own.
        let replay = self.state.replay(&conn.applied);
        if !replay.is_empty() {
            for sql in replay {
                if postgres_protocol::message::frontend::query(&sql, &mut self.to_server).is_ok() {
                    self.owed.push(Owed::Replay);
                }
            }
            conn.applied = self.state.desired.clone();
        }
        if self.phase == Phase::Greeting && self.owed.is_empty() {
            return self.greet(conn);
        }
        if rerun {
            let sent = std::mem::take(&mut self.sent);
            for msg in sent {
                if let Err(e) = self.forward(msg, conn) {
                    self.release(false);
                    self.end(Some(e));
                    return;
                }
            }
        }
    }

    /// Connecting failed (`Acquire` could not be met). Before the greeting (or for a
    /// unit running again, or when Switchyard is shutting down) that ends the session.
    /// A new unit, though, has not run anywhere: the client gets the error as an
    /// ErrorResponse, as a server would answer a statement it refused, and keeps its
    /// session (the next transaction may find a primary, a free connection...).
    pub fn on_acquire_failed(&mut self, e: Error) {
        let fresh_unit = matches!(self.phase, Phase::Acquiring { rerun: false, .. }) && self.unit.is_none();
        if !fresh_unit || e.code() == SqlState::ADMIN_SHUTDOWN {
            return self.end(Some(e));
        }
        let Some((first, _)) = self.stash.take() else {
            return self.end(Some(e));
        };
        self.to_client.extend_from_slice(&e.to_error(None));
        self.phase = match FrontendTag::of(first[0]) {
            // A simple query, a function call, or the Sync itself: answered now.
            Some(FrontendTag::Query | FrontendTag::FunctionCall | FrontendTag::Sync) => {
                messages::ready_for_query(&mut self.to_client, TxStatus::Idle);
                Phase::Serving
            }
            _ => Phase::SkippingToSync,
        }
    }

    /// The end of the client's login (`login::Client::unsent`), written before anything
    /// else the client gets: the greeting then goes out in the same write.
    pub fn login_reply_first(&mut self, mut reply: BytesMut) {
        if !reply.is_empty() {
            reply.extend_from_slice(&self.to_client);
            self.to_client = reply;
        }
    }

    /// The initial greeting, once the connection has the client's startup settings: the
    /// server's parameters in its own spelling (as a direct connection would report
    /// them), our BackendKeyData, ReadyForQuery.
    fn greet(&mut self, conn: &ConnState) {
        self.write_greeting(&crate::pg::greetings::encode(&conn.reported));
        self.greeted_by_server = true;
        let reuse = self.reusable();
        self.release(reuse);
    }

    /// `status`: the ParameterStatus messages (`greetings::encode`).
    fn write_greeting(&mut self, status: &[u8]) {
        // With room for BackendKeyData and ReadyForQuery: one allocation.
        self.to_client.reserve(status.len() + 32);
        self.to_client.extend_from_slice(status);
        messages::backend_key_data(&mut self.to_client, self.cfg.client_pid, self.cfg.client_key);
        messages::ready_for_query(&mut self.to_client, TxStatus::Idle);
        self.phase = Phase::Serving;
    }

    /// Whether the client was just greeted with what the held connection's server
    /// reported (`ConnState::reported`, for `pg::greetings`); true once.
    pub fn take_greeted_by_server(&mut self) -> bool {
        std::mem::take(&mut self.greeted_by_server)
    }

    /// Bytes from the client (`input`, complete messages are taken from it). `conn` is
    /// the held connection's state, if one is held.
    pub fn on_client_input(&mut self, input: &mut BytesMut, mut conn: Option<&mut ConnState>) {
        // (Only into empty queues: a spare set replaces what they hold.)
        if self.actions.capacity() == 0 && self.queues_empty() {
            if let Some(q) = spares::take() {
                self.put_queues(q);
            }
        }
        // Nothing a client sends before its greeting is looked at until then (it would
        // land on the connection the greeting borrows).
        while matches!(self.phase, Phase::Serving | Phase::SkippingToSync) && self.actions.is_empty() {
            let (msg, checked) = match self.next_client_message(input) {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    self.release(false);
                    return self.end(Some(e));
                }
            };
            // The floor question went with the unit's commit and is not answered yet: the
            // client's next message (a Terminate too) waits for that answer. It would run
            // after the question, and the floor would not cover it; and once the answer is
            // in, the unit ends and the connection is free for whoever comes next.
            if self.unit.as_ref().is_some_and(|u| u.floor_pending) {
                self.stash = Some((msg, checked));
                return;
            }
            let tag = FrontendTag::of(msg[0]);
            if tag == Some(FrontendTag::Terminate) {
                return self.on_client_closed();
            }
            if self.phase == Phase::SkippingToSync {
                if tag == Some(FrontendTag::Sync) {
                    self.phase = Phase::Serving;
                    messages::ready_for_query(&mut self.to_client, TxStatus::Idle);
                }
                continue;
            }
            let query = match tag == Some(FrontendTag::Query) && !checked && self.between_units() {
                true => Query::decode(&msg[5..]).ok(),
                false => None,
            };
            let looked_at = query.is_some();
            if let Some(q) = query {
                if let Some(stmt) = classify::causal_statement(q.sql) {
                    self.actions.push_back(Action::Causal(stmt));
                    return;
                }
                // LISTEN / UNLISTEN between transactions: the shared listening
                // connection's, not this client's server connection's.
                if maybe_listen(q.sql) {
                    let c = self.classifier.classify_bytes(q.sql);
                    if !c.listens.is_empty() {
                        self.listening = c.listens.clone();
                        self.actions.push_back(Action::Listen(c.listens.clone()));
                        return;
                    }
                }
            }
            match (self.unit.as_ref(), conn.as_deref_mut()) {
                (Some(u), Some(c)) => {
                    // A read sent to a standby ends with its Sync/Query: what follows is
                    // a new unit, routed on its own once this one is answered.
                    if u.retryable && self.owed.pending() > 0 && self.owed.last() == Some(Owed::Ready) {
                        self.stash = Some((msg, false));
                        return;
                    }
                    if let Err(e) = self.forward(msg, c) {
                        self.release(false);
                        return self.end(Some(e));
                    }
                }
                _ => {
                    if self.answer_without_server(&msg, input) {
                        continue;
                    }
                    // Whether it only reads matters only where reads may go elsewhere.
                    let read = (self.cfg.split || self.cfg.read_only_endpoint)
                        && unit::reads(&msg, input, &self.stmts, self.classifier, &self.state);
                    self.phase = Phase::Acquiring { read, rerun: false };
                    self.stash = Some((msg, looked_at));
                    let acquire = self.route(read, None, false);
                    self.actions.push_back(acquire);
                    return;
                }
            }
        }
    }

    /// The client closed its connection (or sent Terminate).
    pub fn on_client_closed(&mut self) {
        let reuse = self.reusable();
        self.release(reuse);
        self.end(None);
    }

    /// The next complete client message: the stashed one first, with its mark (see
    /// `stash`).
    fn next_client_message(&mut self, input: &mut BytesMut) -> Result<Option<(Bytes, bool)>, Error> {
        if let Some(m) = self.stash.take() {
            return Ok(Some(m));
        }
        let Some((tag, len)) = views::header(input) else {
            return Ok(None);
        };
        if FrontendTag::of(tag).is_none() {
            return Err(Error::protocol(format!(
                "invalid frontend message type {}",
                views::printable(tag)
            )));
        }
        if len < 4 || len > self.cfg.max_message {
            return Err(Error::protocol(format!(
                "message of type {} is {len} bytes, over the limit of {} bytes (proxy.max_message_bytes)",
                views::printable(tag),
                self.cfg.max_message
            )));
        }
        if input.len() < len as usize + 1 {
            return Ok(None);
        }
        Ok(Some((input.split_to(len as usize + 1).freeze(), false)))
    }

    /// A lone `Parse(name) + Sync` between units is answered here, without a server
    /// connection: the statement is recorded and prepared on whatever connection first
    /// needs it. Besides saving a round trip, this matters for clients that prepare
    /// synchronously while another of their connections holds a transaction (pgbench -M
    /// prepared): waiting for a pooled connection there would deadlock. Only statements
    /// the grammar accepts are deferred; anything else goes to a server so the client
    /// gets the server's own error at once.
    fn answer_without_server(&mut self, msg: &Bytes, input: &mut BytesMut) -> bool {
        if FrontendTag::of(msg[0]) != Some(FrontendTag::Parse) {
            return false;
        }
        let Some((sync, sync_len)) = views::header(input) else {
            return false;
        };
        if FrontendTag::of(sync) != Some(FrontendTag::Sync) {
            return false;
        }
        // The Sync must be complete too, to be answered now.
        if input.len() < sync_len as usize + 1 {
            return false;
        }
        let Ok(p) = Parse::decode(&msg[5..]) else {
            return false;
        };
        if p.name.is_empty() {
            return false;
        }
        let class = self.classifier.classify_parse(p.query);
        if !class.parses {
            return false;
        }
        self.stmts.define(&p, class);
        // (What the statement does to the session is observed when it is executed: see
        // the Bind case of `forward`.)
        let _ = input.split_to(sync_len as usize + 1);
        messages::parse_complete(&mut self.to_client);
        messages::ready_for_query(&mut self.to_client, TxStatus::Idle);
        true
    }

    /// Track what a statement does to the session: SETs to replay, pins, databases that
    /// must be free.
    fn observe(&mut self, c: &Classification) {
        self.state.observe(&c.sets);
        if let Some(why) = c.pins {
            // A reason that lasts replaces one that can be left.
            if self
                .pinned
                .is_none_or(|p| classify::releasable(p) && !classify::releasable(why))
            {
                self.pinned = Some(why);
                match classify::releasable(why) {
                    true => {
                        info!(cluster = %self.cfg.cluster, reason = why, "client pinned to its server connection while its session holds it")
                    }
                    false => {
                        info!(cluster = %self.cfg.cluster, reason = why, "client pinned to its server connection until it disconnects")
                    }
                }
            }
        }
        self.check_pins |= c.may_unpin && self.pinned.is_some_and(classify::releasable);
        if let Some(db) = &c.frees_database {
            self.actions.push_back(Action::CloseIdle(db.clone()));
        }
    }

    /// Queue one client message for the held server, renaming prepared statements.
    fn forward(&mut self, msg: Bytes, conn: &mut ConnState) -> Result<(), Error> {
        let unit = self.unit.as_mut().expect("a unit holds a connection");
        // Kept only where `rerun` may send them again: a read that can still move.
        if unit.retryable && !unit.answered {
            self.sent.push(msg.clone());
        }
        let tag = msg[0];
        // Vetted by `next_client_message`.
        let kind = FrontendTag::of(tag).expect("a frontend message");
        let batch_was_open = unit.batch_open;
        if kind.opens_batch() {
            unit.batch_open = true;
        } else if kind.requests_ready() {
            unit.batch_open = false;
        }
        let body = &msg[5..];
        let out = &mut self.to_server;
        let malformed = |e: views::Malformed| Error::protocol(format!("client sent a {e}"));
        let observed = match kind {
            FrontendTag::Query => {
                let q = Query::decode(body).map_err(malformed)?;
                let c = self.classifier.classify_bytes(q.sql);
                for (channel, payload) in &c.notifies {
                    self.notified.push((unit.server_pid, channel.clone(), payload.clone()));
                }
                self.unlistened.extend(c.unlistens.iter().cloned());
                if c.discards_all {
                    self.unlistened.push(crate::pg::notify::ListenOp::UnlistenAll);
                }
                // SQL prepared statements: the connection's made the client's first.
                let sql = &mut self.sql_stmts;
                for name in &c.executes {
                    sql.ensure(name, out, &mut self.owed, &mut conn.sql_prepared);
                }
                for (name, text) in &c.prepares {
                    sql.preparing(name, text, out, &mut self.owed, &mut conn.sql_prepared);
                }
                let sql_deallocate = match c.deallocate.as_deref() {
                    Some("") => {
                        sql.forget_all(&mut conn.sql_prepared);
                        false
                    }
                    Some(name) => sql.deallocate(name, out, &mut self.owed, &mut conn.sql_prepared),
                    None => false,
                };
                if c.discards_all {
                    sql.forget_all(&mut conn.sql_prepared);
                    conn.prepared.clear();
                }
                self.owed.push(Owed::Ready);
                self.queries += 1;
                if self.cfg.digests {
                    self.running.query(Some(&c.digest));
                    let trace = trace_in(self.cfg.traces, q.sql);
                    self.running.trace_last(trace);
                }
                match c.deallocate.as_deref() {
                    Some(name) if !sql_deallocate => self
                        .stmts
                        .deallocate(&msg, name, out, &mut self.owed, &mut conn.prepared)
                        .map_err(|e| Error::protocol(e.to_string()))?,
                    _ => out.extend_from_slice(&msg),
                }
                Some(c)
            }
            FrontendTag::Sync | FrontendTag::FunctionCall => {
                if kind == FrontendTag::FunctionCall {
                    unit.may_write = true;
                }
                if self.cfg.digests {
                    self.running.sync();
                }
                self.owed.push(Owed::Ready);
                out.extend_from_slice(&msg);
                None
            }
            FrontendTag::Parse => {
                let p = Parse::decode(body).map_err(malformed)?;
                let c = self.classifier.classify_parse(p.query);
                // SQL PREPARE / EXECUTE in the extended protocol: a replay (a simple
                // Query) can go only between requests, before the first message of one.
                let between_requests = !batch_was_open;
                if !c.prepares.is_empty() && self.pinned.is_none_or(classify::releasable) {
                    self.pinned = Some("SQL PREPARE in the extended protocol");
                    info!(cluster = %self.cfg.cluster, reason = "SQL PREPARE in the extended protocol", "client pinned to its server connection until it disconnects");
                }
                if between_requests {
                    for name in &c.executes {
                        self.sql_stmts.ensure(name, out, &mut self.owed, &mut conn.sql_prepared);
                    }
                }
                self.stmts.parse(&msg, &p, &c, out, &mut self.owed, &mut conn.prepared);
                if p.name.is_empty() && self.cfg.digests {
                    let trace = trace_in(self.cfg.traces, p.query);
                    self.running.parsed_unnamed(Some((c.digest.clone(), trace)));
                }
                Some(c)
            }
            FrontendTag::Bind | FrontendTag::Describe => {
                let r = if kind == FrontendTag::Bind {
                    StatementRef::decode_bind(body)
                } else {
                    StatementRef::decode_target(body, "Describe")
                }
                .map_err(malformed)?;
                let stmt = self.stmts.refer(tag, &msg, &r, out, &mut self.owed, &mut conn.prepared);
                // Executing a named statement does what its text does.
                match stmt {
                    Some(stmt) if kind == FrontendTag::Bind => {
                        let c = stmt.class.clone();
                        if self.cfg.digests {
                            let trace = trace_in(self.cfg.traces, &stmt.query);
                            self.running.bound(Some((c.digest.clone(), trace)), false);
                        }
                        Some(c)
                    }
                    _ => {
                        if kind == FrontendTag::Bind && self.cfg.digests {
                            self.running.bound(None, r.statement.is_empty());
                        }
                        None
                    }
                }
            }
            FrontendTag::Close => {
                let r = StatementRef::decode_target(body, "Close").map_err(malformed)?;
                self.stmts.close(&msg, &r, out, &mut self.owed, &mut conn.prepared);
                None
            }
            FrontendTag::Execute => {
                self.queries += 1;
                if self.cfg.digests {
                    self.running.execute();
                }
                let b = unit.bound;
                // A statement only parsed or described wrote nothing: executed, it may.
                unit.may_write |= b.writes;
                // Outside a transaction block a write commits by itself (at Sync).
                unit.commit_in_flight |=
                    (b.writes_alone && unit.status == TxStatus::Idle) || (b.commits && unit.may_write);
                out.extend_from_slice(&msg);
                None
            }
            _ => {
                out.extend_from_slice(&msg);
                None
            }
        };
        if let Some(c) = observed {
            if let Some(u) = self.unit.as_mut() {
                let writes = !c.read_only && !c.settings_only;
                let writes_alone = writes && c.begins.is_none();
                if kind == FrontendTag::Query {
                    u.may_write |= writes;
                    // Outside a transaction block a write commits as it ends.
                    u.commit_in_flight |= (writes_alone && u.status == TxStatus::Idle) || (c.commits && u.may_write);
                } else {
                    u.bound = Bound {
                        writes,
                        writes_alone,
                        commits: c.commits,
                    };
                }
                u.no_question_after |= c.no_question_after;
            }
            self.observe(&c);
        }
        if kind.requests_ready() {
            self.ask_floor_with_commit(conn);
        }
        Ok(())
    }

    /// Read-your-writes: what was just queued ends with the unit's commit (a write
    /// outside a transaction block, a COMMIT), and nothing in it may leave a block open
    /// or start a COPY FROM: the floor question follows in the same write (`ask_floor`).
    /// It then runs outside any transaction of the client's, after the commit, on the
    /// same server.
    fn ask_floor_with_commit(&mut self, conn: &mut ConnState) {
        let Some(u) = self.unit.as_mut() else { return };
        let no_question = std::mem::take(&mut u.no_question_after);
        let Some(question) = self.ask_floor else { return };
        if !u.commit_in_flight
            || no_question
            || u.floor_asked
            || u.batch_open
            || !u.on_primary
            || self.cfg.read_only_endpoint
            || self.pinned.is_some()
            // The client's own NOTIFY: the driver holds the answer's ReadyForQuery until
            // the notification is back, as a direct connection would show it
            // (`Driver::own_notifications_first`). The question would let that answer go
            // out first.
            || !self.notified.is_empty()
        {
            return;
        }
        question.queue(&mut self.to_server, &mut self.owed, &mut conn.prepared);
        u.floor_asked = true;
        u.floor_pending = true;
    }

    /// The driver is about to write `to_server` out (at `now`): the statements in it
    /// start now.
    pub fn sending(&mut self, now: std::time::Instant) {
        self.running.sent(now);
    }

    /// The driver wrote `to_client` out.
    pub fn flushed_to_client(&mut self) {
        if let Some(u) = self.unit.as_mut() {
            u.answered |= std::mem::take(&mut u.answer_queued);
        }
    }

    /// Bytes from the held server (`input`; complete messages are taken from it).
    pub fn on_server_input(&mut self, input: &mut BytesMut, conn: &mut ConnState) {
        let mut done = false;
        // The rest of a large message already being passed on.
        if self.streaming > 0 {
            let n = self.streaming.min(input.len());
            self.to_client.extend_from_slice(&input.split_to(n));
            self.streaming -= n;
            if self.streaming > 0 {
                return;
            }
            self.client_mid_message = false;
        }
        while let Some((byte, len)) = views::header(input) {
            // A length word is an Int32 of at least 4 (itself).
            if !(4..=i32::MAX as u32).contains(&len) {
                self.release(false);
                return self.end(Some(Error::server_protocol(format!(
                    "server sent a message of type {} with invalid length {len}",
                    views::printable(byte)
                ))));
            }
            let tag = BackendTag::of(byte);
            if input.len() < len as usize + 1 {
                // A large message the proxy passes on unchanged (a big row, COPY data)
                // is streamed, never buffered whole; the few it looks into are small.
                if len as usize + 1 > STREAM_ABOVE && !tag.looked_into() && !self.owed.replaying() {
                    if let Some(unit) = self.unit.as_mut() {
                        let verdict = self.owed.on_message(tag, &mut conn.prepared);
                        debug_assert_eq!(verdict, Verdict::Pass);
                        unit.answer_queued = true;
                        self.streaming = len as usize + 1 - input.len();
                        self.client_mid_message = true;
                        self.to_client.extend_from_slice(&input.split());
                    }
                }
                break;
            }
            // Looked at where it is, then copied on and taken off the input (no
            // `split_to`: a shared buffer's reference counts, per message).
            let whole = len as usize + 1;
            let Some(unit) = self.unit.as_mut() else {
                input.advance(whole);
                return;
            };
            let msg = &mut input[..whole];
            // A read that can still move: a server going away, or refusing what only a
            // primary runs, costs the client nothing.
            if unit.retryable && !unit.answered && matches!(tag, BackendTag::ErrorResponse | BackendTag::NoticeResponse)
            {
                let e = ErrorFields::decode(&msg[5..]);
                let reason = || String::from_utf8_lossy(e.message).into_owned();
                // An ErrorResponse FATAL/PANIC, or the WARNING of an immediate shutdown
                // or of a crash elsewhere (class 57): the server is going away.
                let code = SqlState::parse(e.code);
                if (tag == BackendTag::ErrorResponse && e.ends_session())
                    || (tag == BackendTag::NoticeResponse && code.is_some_and(|c| c.server_going_away()))
                {
                    let reason = reason();
                    input.clear();
                    return self.on_server_lost(&reason);
                }
                if tag == BackendTag::ErrorResponse
                    && !unit.on_primary
                    && code.is_some_and(|c| c.only_a_primary_runs_it())
                {
                    info!(cluster = %self.cfg.cluster, node = %unit.node, reason = %reason(), "standby refused a read; running it on the primary");
                    if self.rerun(None) {
                        // The rest of the refusal (its ReadyForQuery) is of no interest.
                        input.clear();
                        return;
                    }
                }
            }
            if tag == BackendTag::ReadyForQuery {
                // Whoever asked, the connection's transaction status is what the server
                // said last.
                if let Some(u) = self.unit.as_mut() {
                    u.status = TxStatus::of(msg.get(5).copied().unwrap_or(0));
                }
            }
            let verdict = self.owed.on_message(tag, &mut conn.prepared);
            if self.cfg.digests && matches!(verdict, Verdict::Pass | Verdict::Ready) {
                self.running.on_message(tag, &msg[5..]);
            }
            if tag == BackendTag::ReadyForQuery && (self.owed.is_empty() || self.owed.only_floor()) {
                if let Some(u) = self.unit.as_mut() {
                    u.commit_in_flight = false;
                }
            }
            match verdict {
                Verdict::ReplayError => {
                    let e = ErrorFields::decode(&msg[5..]);
                    warn!(cluster = %self.cfg.cluster, code = %String::from_utf8_lossy(e.code),
                          reason = %String::from_utf8_lossy(e.message), "restoring session state failed");
                    input.advance(whole);
                    continue;
                }
                Verdict::Drop => {
                    // A setting replayed by the proxy: the server's spelling of it.
                    if tag == BackendTag::ParameterStatus {
                        if let Ok(s) = ParameterStatus::decode(&msg[5..]) {
                            conn.report(s);
                        }
                    }
                    input.advance(whole);
                    continue;
                }
                Verdict::FloorRow | Verdict::FloorFailed => {
                    // Only a question that ran outside a transaction block answers for the
                    // commit (the client's last ReadyForQuery said idle).
                    let status = self.unit.as_ref().map(|u| u.status);
                    let row = match (verdict, status) {
                        (Verdict::FloorRow, Some(TxStatus::Idle)) => ask::row_of(msg),
                        _ => None,
                    };
                    self.floor_row = Some(row);
                    input.advance(whole);
                    continue;
                }
                Verdict::FloorEnd => {
                    if let Some(u) = self.unit.as_mut() {
                        u.floor_pending = false;
                    }
                    self.floor = Some(match self.floor_row.take() {
                        Some(Some(row)) => Asked::Row(row),
                        _ => Asked::NoRow,
                    });
                    done = self.owed.is_empty()
                        && self
                            .unit
                            .as_ref()
                            .is_some_and(|u| u.status == TxStatus::Idle && !u.batch_open);
                    input.advance(whole);
                    continue;
                }
                Verdict::Pass | Verdict::Ready => {}
            }
            let unit = self.unit.as_mut().expect("checked above");
            if verdict == Verdict::Ready {
                self.sql_stmts.settled();
            }
            match tag {
                BackendTag::CommandComplete if msg[5..].starts_with(b"ROLLBACK") => self.state.unit_failed(),
                BackendTag::CommandComplete if msg[5..] == *b"PREPARE\0" => {
                    self.sql_stmts.confirmed(&mut conn.sql_prepared)
                }
                BackendTag::ErrorResponse => {
                    self.state.unit_failed();
                    let code = ErrorFields::decode(&msg[5..]).code;
                    self.server_errors.push([
                        code.first().copied().unwrap_or(b'?'),
                        code.get(1).copied().unwrap_or(b'?'),
                    ]);
                }
                BackendTag::ParameterStatus => match ParameterStatus::decode(&msg[5..]) {
                    Ok(s) => {
                        conn.report(s);
                        self.state.reported(s, &mut conn.applied);
                    }
                    Err(e) => {
                        self.release(false);
                        return self.end(Some(Error::server_protocol(format!("server sent a {e}"))));
                    }
                },
                // The client's own NOTIFY (while pinned by LISTEN): show it with the pid
                // the client was given, as a direct connection would.
                BackendTag::Notification if views::notification_pid(&msg[5..]) == Some(unit.server_pid) => {
                    msg[5..9].copy_from_slice(&self.cfg.client_pid.to_be_bytes());
                }
                BackendTag::ReadyForQuery if verdict == Verdict::Ready && unit.status == TxStatus::Idle => {
                    self.state.settle(&mut conn.applied);
                    done = self.owed.is_empty() && !unit.batch_open;
                }
                _ => {}
            }
            unit.answer_queued |= !tag.is_asynchronous();
            self.to_client.extend_from_slice(msg);
            input.advance(whole);
        }
        if self.phase == Phase::Greeting && self.owed.is_empty() {
            return self.greet(conn);
        }
        if done {
            self.unit_done();
        }
    }

    /// A unit ended between transactions with nothing owed.
    fn unit_done(&mut self) {
        if let Some(u) = self.unit.as_ref() {
            self.wrote |= u.may_write && u.on_primary && !self.cfg.read_only_endpoint;
        }
        if self.pinned.is_none() {
            let reuse = self.reusable();
            self.release(reuse);
        } else if let Some(u) = self.unit.as_mut() {
            // Pinned: the next unit runs on this connection too.
            self.sent.clear();
            u.answered = false;
            u.answer_queued = false;
            // Unless what pinned it (locks, cursors, temporary tables) is all gone.
            if std::mem::take(&mut self.check_pins) && u.status == TxStatus::Idle && !u.batch_open {
                self.actions.push_back(Action::CountPins);
            }
        }
    }

    /// What the server said of the session advisory locks, WITH HOLD cursors and
    /// temporary objects the held connection's session holds (`Action::CountPins`;
    /// None: it could not say). None left: the client is no longer pinned, and the
    /// connection goes back to its pool.
    pub fn on_pins_counted(&mut self, held: Option<u64>) {
        if held != Some(0) || !self.pinned.is_some_and(classify::releasable) {
            return;
        }
        let was = self.pinned.take();
        info!(cluster = %self.cfg.cluster, reason = was, "what pinned the client is released: client no longer pinned");
        if self.reusable() {
            self.release(true);
        }
    }

    /// Run the unit in progress again from its first message on another connection: a
    /// readable node other than the current one (`exclude`), or the primary (None). Only
    /// for a split read whose answer has not reached the client; false otherwise.
    fn rerun(&mut self, exclude: Option<String>) -> bool {
        let Some(u) = self.unit.as_mut() else {
            return false;
        };
        if !u.retryable || u.answered || self.sent.is_empty() {
            return false;
        }
        // Whatever the failed server said for this unit is dropped; what was queued for
        // it is sent again from `sent`.
        self.running.lost();
        self.to_server.clear();
        self.to_client.clear();
        self.owed.clear();
        self.state.unit_restarted();
        self.release(false);
        // Lost or evicted (a node to avoid): the read moves to another readable node;
        // refused as a read only a primary runs (none): it goes to the primary.
        let read = exclude.is_some();
        self.phase = Phase::Acquiring { read, rerun: true };
        let acquire = self.route(read, exclude, true);
        self.actions.push_back(acquire);
        true
    }

    /// The held connection failed (reset, EOF, write error): retry the unit elsewhere if
    /// it may move, else end the session saying why.
    pub fn on_server_lost(&mut self, reason: &str) {
        self.connection_gone(reason, |cluster, node| Error::server_lost(cluster, node, reason));
    }

    /// The held connection's node is no longer valid for it (`reason`; `node_up`: still
    /// healthy). A read not yet answered simply moves to another node.
    pub fn on_evicted(&mut self, reason: &str, node_up: bool) {
        self.connection_gone(reason, |_, _| Error::evicted(node_up, reason));
    }

    /// The held connection cannot go on: a read not yet answered runs again on another
    /// node; otherwise the session ends with `error`, or with "resolution unknown" when a
    /// commit was in flight.
    fn connection_gone(&mut self, reason: &str, error: impl FnOnce(&str, &str) -> Error) {
        let Some(node) = self.node().map(str::to_string) else {
            return;
        };
        // The client has every answer it asked for: only the proxy's own question is
        // lost with the connection, and the session goes on (its next unit elsewhere).
        if self.owed.only_floor() {
            self.owed.clear();
            self.floor = Some(Asked::Lost);
            self.release(false);
            return;
        }
        if self.rerun(Some(node.clone())) {
            warn!(cluster = %self.cfg.cluster, node = %node, reason = %reason, "server connection lost or evicted before a read was answered; retrying it on another node");
            return;
        }
        let unknown = self.unit.as_ref().is_some_and(|u| u.commit_in_flight);
        self.running.lost();
        self.release(false);
        let e = if unknown {
            Error::resolution_unknown(&self.cfg.cluster, &node, reason)
        } else {
            error(&self.cfg.cluster, &node)
        };
        self.end(Some(e));
    }
}

/// Might `sql` be LISTEN / UNLISTEN statements? (Its first keyword, past blanks and
/// comments: a cheap test before classifying, on every Query between transactions.)
fn maybe_listen(sql: &[u8]) -> bool {
    let mut s = sql;
    loop {
        s = s.trim_ascii_start();
        if let Some(rest) = s.strip_prefix(b"--") {
            s = rest.splitn(2, |&b| b == b'\n').nth(1).unwrap_or(b"");
        } else if s.starts_with(b"/*") {
            s = s.get(classify::block_comment_end(s, 0)..).unwrap_or(b"");
        } else {
            break;
        }
    }
    let word: &[u8] = s.get(..8).unwrap_or(s);
    word.len() >= 6 && (word[..6].eq_ignore_ascii_case(b"listen") || word.eq_ignore_ascii_case(b"unlisten"))
}

/// The trace context in a statement's text, when traces are on (`on`).
fn trace_in(on: bool, sql: &[u8]) -> Option<TraceParent> {
    on.then(|| traceparent(sql)).flatten()
}

/// Server messages larger than this are passed on as they arrive rather than whole.
const STREAM_ABOVE: usize = 64 * 1024;

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;

#[path = "carry.rs"]
pub mod carry;
