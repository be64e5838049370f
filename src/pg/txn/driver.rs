//! The async loop around the transaction-pooling machine: it owns the sockets, reads
//! what arrives, feeds the machine, and performs what the machine asks (write, acquire a
//! pooled connection through the connector, release it, end).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proxy::stream::ClientStream;
use crate::tls::write_flush;
use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use super::ask::{self, Asked};
use super::machine::{Action, Config, Machine, Target};
use super::node_pools::{Asker, NodePool};
use crate::cluster::freshness::Floor;
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{ClusterSnapshot, Health, NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::error::Error;
use crate::obs::digest::Place;
use crate::obs::digest::Route;
use crate::pg::credential::Credential;
use crate::pg::fresh::{Causal, FreshMetrics, Placement};
use crate::pg::pool::{PoolError, PooledConn};
use crate::pg::protocol::tags::BackendTag;
use crate::pg::protocol::views;
use crate::proxy::buffers;
use crate::proxy::cancel::Registration;
use crate::proxy::connector::{self, Accept, Connected, Dialer};
use crate::proxy::shared::Shared;
use crate::proxy::timeouts::{Fired, Waiting, Watch};

/// Room to read into: a lent buffer (`proxy::buffers`) if `buf` has none, more once
/// less than 512 bytes are left.
fn ready_to_read(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buffers::lend(buf);
    } else if buf.capacity() - buf.len() < 512 {
        buf.reserve(buffers::SIZE);
    }
}

/// Read what the client sent. Idle (its buffer given back), a plaintext client is
/// waited on with no buffer at all, and lent one when its socket is readable; a TLS
/// client (rustls reads into its own buffers first) gets 512 bytes to wait with.
/// Cancel-safe, as `select!` needs: nothing is read across an await. (The wait is a
/// `poll_fn` on the socket's readiness rather than `readable()`, whose future would
/// add its waiter to every idle client's session.)
async fn read_client(client: &mut ClientStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    match client {
        ClientStream::Plain(tcp) => loop {
            std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
            let lent = buf.capacity() == 0;
            ready_to_read(buf);
            // A short read forgets the socket's readiness (`tls::read_plain`).
            match crate::tls::try_read_drained(tcp, buf)? {
                Some(n) => return Ok(n),
                None if lent => buffers::give_back(buf),
                None => {}
            }
        },
        ClientStream::Tls(_) => {
            if buf.capacity() == 0 {
                buf.reserve(512);
            } else if buf.capacity() - buf.len() < 512 {
                buf.reserve(buffers::SIZE);
            }
            client.read_buf(buf).await
        }
    }
}

/// The session's timer (made on first use), set to ring at `deadline`.
fn arm(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>, deadline: Instant) -> &mut Pin<Box<tokio::time::Sleep>> {
    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
    if t.deadline() != deadline.into() {
        t.as_mut().reset(deadline.into());
    }
    t
}

/// Must the client's session end: has Switchyard begun to shut down, or did a reload
/// remove its cluster? `local` (this thread's repeater of both) moved, and the flags,
/// behind their channels' locks, are read only then.
fn shutting_down(local: &crate::local_watch::Receiver, shared: &Shared, cluster: &ClusterCtx) -> bool {
    local.has_changed().unwrap_or(true) && (*shared.shutdown.borrow() || cluster.retiring())
}

/// The time, read from the clock at most once (a read costs ~25 ns, and several things
/// that end together want it).
#[derive(Default)]
struct Clock(Option<Instant>);

impl Clock {
    fn now(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// Who the client is.
pub struct TxnClient {
    pub user: String,
    /// What the user logs in to servers with (from the client's own login).
    pub credential: Credential,
    pub database: String,
    /// Shared with the machine's session state (`SessionState`).
    pub params: Arc<[(String, String)]>,
    /// From the startup option `switchyard.causal_token`, checked against the cluster.
    pub causal_token: Option<Floor>,
}

struct Held {
    conn: PooledConn,
    via: Arc<NodePool>,
    on_primary: bool,
    /// Why the unit runs on this node (for the query digests).
    route: Route,
}

/// Transaction mode: a connection from the node's pool.
struct PoolDialer<'a> {
    cluster: &'a ClusterCtx,
    shared: &'a Shared,
    who: &'a TxnClient,
    credential: &'a Credential,
    require_primary: bool,
    /// The listener the client came in on.
    listener: Endpoint,
    /// One per node this client has used: a handful, searched by name (cheaper than
    /// hashing the name for every unit).
    pools: &'a mut Vec<Arc<NodePool>>,
    /// When the unit asked (what a checkout without a wait happens at).
    now: Instant,
}

impl PoolDialer<'_> {
    fn pool(&mut self, node: &NodeState) -> Arc<NodePool> {
        if let Some(i) = self.pools.iter().position(|p| *p.node == *node.name) {
            if self.pools[i].pool.key.addr == node.addr {
                return self.pools[i].clone();
            }
            self.pools.swap_remove(i); // the node moved: a pool for its new address
        }
        let who = Asker {
            user: &self.who.user,
            database: &self.who.database,
            listener: self.listener,
        };
        let p = crate::pg::PgCluster::of(self.cluster)
            .node_pools
            .get(self.cluster, self.shared, node, &who);
        self.pools.push(p.clone());
        p
    }
}

impl Dialer for PoolDialer<'_> {
    type Conn = Held;

    fn dial_now(&mut self, node: &NodeState) -> Option<Held> {
        let via = self.pool(node);
        let conn = via.pool.checkout_idle(self.credential, self.now)?;
        Some(Held {
            conn,
            on_primary: node.role == Role::Primary,
            via,
            route: Route::Primary,
        })
    }

    async fn dial(&mut self, node: &NodeState, timeout: Duration) -> Result<Held, Error> {
        let via = self.pool(node);
        match via
            .pool
            .checkout(
                self.credential,
                self.require_primary,
                || self.cluster.server_tls(),
                timeout,
                || {
                    let max = self.cluster.settings().max_server_logins;
                    (self.cluster.login_gates.of(&node.name, max), max)
                },
                crate::pg::pool::BudgetAsk {
                    cluster: self.cluster,
                    idle: &crate::pg::PgShared::of(self.shared).pools,
                    node: &node.name,
                    user: &self.who.user,
                    caps: self
                        .shared
                        .config()
                        .server_connection_caps(&self.cluster.name, &self.who.user),
                },
            )
            .await
        {
            Ok(conn) => Ok(Held {
                conn,
                on_primary: node.role == Role::Primary,
                via,
                route: Route::Primary,
            }),
            Err(e @ PoolError::Exhausted { .. }) => Err(Error::pool_exhausted(e.to_string())),
            Err(PoolError::Server(e)) => Err(e.into_error(&self.cluster.name, &node.name)),
        }
    }
}

pub struct Driver<'a> {
    client: ClientStream,
    who: TxnClient,
    cluster: &'a ClusterCtx,
    shared: &'a Shared,
    cancel: Registration,
    /// What the client's user logs in to servers with.
    credential: Credential,
    pool_wait: Histogram,
    causal: Causal,
    /// A write unit ended since the last Release (`note_writes`; the machine reports it
    /// once, often on the server's answer before the Release is handled).
    wrote_since_release: bool,
    /// The writes counted as the unit started (`Causal::floor_wanted_soon`), when its
    /// commit carries the floor question (`Machine::ask_floor`).
    floor_before: u64,
    machine: Machine<'a>,
    /// Boxed: an idle client holds none, and inline the connection would enlarge
    /// every idle client's session by its size (one small allocation per unit instead,
    /// from the allocator's per-thread cache).
    held: Option<Box<Held>>,
    pools: Vec<Arc<NodePool>>,
    cbuf: BytesMut,
    sbuf: BytesMut,
    /// The client timeouts' clock.
    watch: Watch,
    /// The timer of its next deadline, made when one is first armed and reset after:
    /// boxed, as most sessions have none and inline it would enlarge them all.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    listener: Endpoint,
    unit: Unit,
    /// The client's LISTENs, on the shared listening connection (`pg::notify`).
    /// Boxed: few clients LISTEN, and inline it would enlarge every idle client.
    notify: Option<Box<crate::pg::notify::Subscription>>,
    /// Notifications the client sent lately (`Machine::notified`), to show with its own
    /// pid when they come back.
    own_notifies: std::collections::VecDeque<(i32, String, String)>,
    /// Bytes read from and written to the client since they were last added to the
    /// listener's counters (at the end of each unit, and of the session), and those.
    bytes_in: u64,
    bytes_out: u64,
    received: Counter,
    sent: Counter,
}

/// The unit (transaction) in progress: what its duration and its span need.
#[derive(Default)]
struct Unit {
    /// When the request that began it arrived (None: no unit, or it never got a
    /// connection).
    started: Option<Instant>,
    pool_wait: Duration,
    causal_wait: Duration,
    retries: u32,
    statements: u32,
    failed: bool,
    trace: crate::obs::trace::UnitTrace,
}

enum Event {
    Client(std::io::Result<usize>),
    /// A notification for the client's LISTENs (None: the listener let it go).
    Notification(Option<bytes::Bytes>),
    Server(std::io::Result<usize>),
    Topology,
    Shutdown,
    Timeout,
}

impl<'a> Driver<'a> {
    pub fn new(
        client: ClientStream,
        who: TxnClient,
        cluster: &'a ClusterCtx,
        endpoint: Endpoint,
        shared: &'a Shared,
        cancel: Registration,
        carried: Option<super::carry::MachineCarry>,
    ) -> Driver<'a> {
        let config = shared.config();
        let credential = who.credential.clone();
        let cc = &*cluster.settings();
        let pool_wait = shared.metrics.client_handles(&cluster.name).pool_wait.clone();
        let pg = crate::pg::PgCluster::of(cluster);
        let cfg = Config {
            cluster: cluster.name.clone(),
            read_only_endpoint: endpoint == Endpoint::ReadOnly,
            split: cc.read_write_split,
            max_message: config.proxy.max_message_bytes,
            client_pid: cancel.pid,
            client_key: cancel.key_secret,
            digests: shared.digests.tracking(),
            traces: shared.digests.tracing(),
        };
        let machine = match carried {
            // Greeted by the process it came from.
            Some(carried) => Machine::resume(cfg, who.params.clone(), &pg.classifier, carried),
            None => {
                let greeting = pg.greetings.get(greeting_of(&who, endpoint), Instant::now());
                Machine::new(cfg, who.params.clone(), &pg.classifier, greeting.as_deref())
            }
        };
        let causal = Causal::new(
            cc,
            cluster,
            (&who.user, &who.database),
            who.causal_token,
            FreshMetrics::new(&shared.metrics, &cluster.name),
        );
        let watch = Watch::new(config.client_timeouts_of(cc, &who.user), Instant::now());
        let (received, sent) = shared.metrics.client_bytes(&cluster.name, endpoint);
        Driver {
            watch,
            timer: None,
            listener: endpoint,
            unit: Unit::default(),
            notify: None,
            own_notifies: Default::default(),
            bytes_in: 0,
            bytes_out: 0,
            received,
            sent,
            causal,
            wrote_since_release: false,
            floor_before: 0,
            client,
            who,
            cluster,
            shared,
            cancel,
            credential,
            pool_wait,
            machine,
            held: None,
            pools: Vec::new(),
            cbuf: BytesMut::new(),
            sbuf: BytesMut::new(),
        }
    }

    /// What the held connection's server reported to the greeting, for the next client
    /// of the same login (`pg::greetings`).
    fn remember_greeting(&self) {
        let Some(h) = &self.held else { return };
        // A ro greeting from the primary (no standby was up) says in_hot_standby=off;
        // kept, it would greet ro clients so after the standbys are back.
        if self.machine.read_only_endpoint() && h.on_primary {
            return;
        }
        let endpoint = match self.machine.read_only_endpoint() {
            true => Endpoint::ReadOnly,
            false => Endpoint::ReadWrite,
        };
        crate::pg::PgCluster::of(self.cluster).greetings.put(
            greeting_of(&self.who, endpoint),
            &h.conn.state.reported,
            Instant::now(),
        );
    }

    /// The client's socket (to say goodbye on).
    pub fn client_mut(&mut self) -> &mut ClientStream {
        &mut self.client
    }

    /// Run the session to its end: None when the client left, else what it was told.
    pub async fn run(&mut self) -> Option<Error> {
        let mut topology = self.cluster.state.subscribe_local();
        let mut shutdown = self.shared.shutdown_local();
        // A session that starts after the signal: seen as a change at once.
        if *self.shared.shutdown.borrow() || self.shared.successor.get().is_some() || self.cluster.retiring() {
            shutdown.mark_changed();
        }
        loop {
            // One clock read for what ends together in this turn: the statements just
            // answered, their unit, and its connection's return to the pool.
            let mut clock = Clock::default();
            // Before a Release: the statements finished on the connection still held.
            self.record_statements(&mut clock);
            // What the machine asked for, in order.
            while let Some(action) = self.machine.next_action() {
                match action {
                    Action::CloseIdle(db) => {
                        let closed = crate::pg::PgShared::of(self.shared).pools.close_idle_to(&db);
                        info!(cluster = %self.cluster.name, database = %db, closed, "closed idle pooled connections to a database a statement needs free");
                    }
                    Action::Release { reuse } => {
                        // Published as the unit ends, before the client hears its answer:
                        // with a shared floor another connection's next read must see it.
                        self.note_writes();
                        let wrote = std::mem::take(&mut self.wrote_since_release);
                        if self.machine.take_greeted_by_server() {
                            self.remember_greeting();
                        }
                        // A read moved to another node goes on as the same unit.
                        if !self.machine.rerun_next() {
                            self.end_unit(clock.now());
                        }
                        if !self.machine.notified.is_empty() && self.notify.is_some() {
                            Box::pin(self.own_notifications_first()).await;
                            clock = Clock::default();
                        }
                        let reuse = match (wrote, self.machine.take_floor()) {
                            (true, Some(answer)) => {
                                self.learned_with_commit(answer);
                                reuse
                            }
                            (true, None) if reuse => Box::pin(self.learn_floor_here()).await,
                            _ => reuse,
                        };
                        self.release(reuse, clock.now())
                    }
                    Action::CountPins => {
                        // Nothing is in flight on the connection (the unit ended with
                        // nothing owed): the question cannot cross the client's answers.
                        let held = match self.machine.to_server.is_empty() {
                            true => Box::pin(self.count_pins()).await,
                            false => Ok(None),
                        };
                        match held {
                            Ok(held) => self.machine.on_pins_counted(held),
                            // What the connection still owes is unknown: it cannot go on.
                            Err(reason) => self.machine.on_server_lost(reason),
                        }
                    }
                    Action::Listen(ops) => {
                        if self.notify.is_none() {
                            if let Some(ctx) = self.shared.cluster(&self.cluster.name) {
                                let hub = &crate::pg::PgShared::of(self.shared).listeners;
                                self.notify = Some(Box::new(hub.subscribe(crate::pg::notify::Who {
                                    cluster: ctx.clone(),
                                    database: self.who.database.clone(),
                                    user: self.who.user.clone(),
                                    credential: self.credential.clone(),
                                })));
                            }
                        }
                        let done = match &mut self.notify {
                            Some(n) => Box::pin(n.apply(&ops)).await,
                            None => Err("no such cluster".to_string()),
                        };
                        self.machine.on_listened(done);
                    }
                    Action::Causal(stmt) => {
                        self.note_writes();
                        // Rare (a causal-token statement): boxed, as `acquire`.
                        let reply = Box::pin(self.causal.answer(stmt, self.cluster, None)).await;
                        self.machine.on_causal_reply(reply);
                    }
                    Action::Acquire { to, exclude, rerun, .. } => {
                        if !self.flush_client().await {
                            self.machine.on_client_closed();
                            continue;
                        }
                        // A new unit waits out a PAUSE (in the connector), and does not
                        // start when Switchyard is shutting down.
                        if !rerun && shutting_down(&shutdown, self.shared, self.cluster) {
                            self.machine.on_acquire_failed(self.shared.ending(self.cluster));
                            continue;
                        }
                        if rerun {
                            self.unit.retries += 1;
                        } else {
                            self.unit.begin(Instant::now());
                        }
                        self.note_writes();
                        // The common case at once; otherwise the connector (and a
                        // read's placement) boxed: their state lives only while they
                        // run, and inline it would make every idle client's session
                        // future as large.
                        let acquired = if self.acquire_now(to, exclude.as_deref()) {
                            Ok(())
                        } else {
                            Box::pin(self.acquire(to, exclude.as_deref())).await
                        };
                        match acquired {
                            Ok(()) => {
                                let h = self.held.as_mut().expect("just acquired");
                                let cluster: &'a ClusterCtx = self.cluster;
                                self.machine.ask_floor = match h.on_primary {
                                    true => self.causal.floor_wanted_soon().map(|before| {
                                        self.floor_before = before;
                                        crate::pg::PgCluster::of(cluster).freshness.floor_question()
                                    }),
                                    false => None,
                                };
                                let h = self.held.as_mut().expect("just acquired");
                                self.machine.on_acquired(&h.via.node, h.on_primary, &mut h.conn.state);
                            }
                            Err(e) => self.machine.on_acquire_failed(e),
                        }
                    }
                    Action::End(e) => {
                        let _ = self.flush_client().await;
                        let now = Instant::now();
                        self.end_unit(now);
                        self.release(false, now);
                        // A goodbye spliced into a half-passed message would garble the
                        // client's stream: then the client only sees the socket close.
                        if !self.machine.client_at_boundary() {
                            if let Some(e) = &e {
                                warn!(cluster = %self.cluster.name, reason = %e, "session ended inside a server message; closing without a goodbye");
                            }
                            return None;
                        }
                        return e.map(|e| *e);
                    }
                }
            }
            // UNLISTENs that went to the server end the client's shared LISTENs too.
            if !self.machine.unlistened.is_empty() {
                let ops = std::mem::take(&mut self.machine.unlistened);
                if let Some(n) = self.notify.as_mut() {
                    n.forget(&ops);
                }
            }
            // The client's own notifications, to know them when they come back.
            for sent in self.machine.notified.drain(..) {
                if self.notify.is_some() {
                    if self.own_notifies.len() == 64 {
                        self.own_notifies.pop_front();
                    }
                    self.own_notifies.push_back(sent);
                }
            }
            // Dispatch every complete client message already buffered.
            self.machine
                .on_client_input(&mut self.cbuf, self.held.as_mut().map(|h| &mut h.conn.state));
            let queries = std::mem::take(&mut self.machine.queries);
            if let (Some(h), true) = (self.held.as_ref(), queries > 0) {
                h.via.queries.inc_by(queries);
            }
            if self.machine.has_actions() {
                continue;
            }
            if !self.machine.to_server.is_empty() {
                let h = self
                    .held
                    .as_mut()
                    .expect("bytes for a server are sent only while one is held");
                if !self.machine.running.is_idle() {
                    self.machine.sending(Instant::now());
                }
                let result = h.conn.conn.stream.send(&self.machine.to_server).await;
                self.machine.to_server.clear();
                if let Err(e) = result {
                    self.machine.on_server_lost(&e.to_string());
                    continue;
                }
            }
            if !self.flush_client().await {
                self.machine.on_client_closed();
                continue;
            }
            if self.held.is_some() {
                ready_to_read(&mut self.sbuf);
            } else if self.cbuf.is_empty() && self.machine.to_client.is_empty() && self.machine.to_server.is_empty() {
                // At rest, nothing buffered either way: the buffers go back to the
                // thread's spares until the client sends again (`proxy::buffers`).
                self.machine.rest();
                buffers::give_back_all([
                    &mut self.cbuf,
                    &mut self.sbuf,
                    &mut self.machine.to_client,
                    &mut self.machine.to_server,
                ]);
            }
            // A client timeout's deadline for the state the session waits in now (only
            // when timeouts are set: reading the clock costs every message otherwise).
            let deadline = match self.watch.armed() {
                true => {
                    self.watch.observe(self.machine.waiting(), 0, Instant::now());
                    self.watch.deadline()
                }
                false => None,
            };
            let timer = deadline.map(|d| arm(&mut self.timer, d));
            let event = {
                let client = &mut self.client;
                let cbuf = &mut self.cbuf;
                let sbuf = &mut self.sbuf;
                let server = self.held.as_mut().map(|h| &mut h.conn.conn.stream);
                let has_server = server.is_some();
                // Notifications reach the client between its transactions only (a
                // pinned client holds its connection then too).
                let idle = !has_server || self.machine.between_units();
                let notify = self.notify.as_mut().filter(|_| idle);
                let listening = notify.is_some();
                // In a fixed order (no random start): an answer first, then the client,
                // then the rare events, which a steady stream from the server delays only
                // until it pauses.
                tokio::select! {
                    biased;
                    r = async {
                        match server {
                            Some(s) => s.read_some(sbuf).await,
                            None => std::future::pending().await,
                        }
                    }, if has_server => Event::Server(r),
                    r = read_client(client, cbuf) => Event::Client(r),
                    n = async {
                        match notify {
                            Some(n) => n.rx.recv().await,
                            None => std::future::pending().await,
                        }
                    }, if listening => Event::Notification(n),
                    // Only a held connection can be evicted: between units the
                    // next checkout routes on the snapshot of its moment. And only
                    // between units does a shutdown (or a reload, or an upgrade) end
                    // the session. One branch for the two: each future is large, and
                    // `select!` keeps every branch's in the session.
                    woke = async {
                        if has_server {
                            let _ = topology.changed().await;
                            Event::Topology
                        } else {
                            let _ = shutdown.changed().await;
                            Event::Shutdown
                        }
                    } => woke,
                    _ = async {
                        match timer {
                            Some(t) => t.await,
                            None => std::future::pending().await,
                        }
                    }, if deadline.is_some() => Event::Timeout,
                }
            };
            match event {
                Event::Client(Ok(n)) if n > 0 => {
                    self.bytes_in += n as u64;
                    // Busy again: room for what the request and its answer need (the
                    // server's answer's too: a request is sent to one nearly always).
                    buffers::lend_all([&mut self.machine.to_client, &mut self.machine.to_server, &mut self.sbuf]);
                }
                Event::Client(_) => self.machine.on_client_closed(),
                Event::Server(Ok(n)) if n > 0 => {
                    let h = self.held.as_mut().expect("read from the held server");
                    self.machine.on_server_input(&mut self.sbuf, &mut h.conn.state);
                    for class in self.machine.server_errors.drain(..) {
                        self.shared.metrics.server_error(&self.cluster.name, class);
                    }
                    self.note_writes();
                }
                Event::Server(r) => {
                    let reason = match r {
                        Err(e) => e.to_string(),
                        Ok(_) => "server closed the connection".to_string(),
                    };
                    self.machine.on_server_lost(&reason);
                }
                Event::Topology => {
                    let Some(node) = self.machine.node().map(str::to_string) else {
                        continue;
                    };
                    let snap = self.cluster.state.snapshot();
                    let endpoint = if self.machine.writes() {
                        Endpoint::ReadWrite
                    } else {
                        Endpoint::ReadOnly
                    };
                    if let Some(reason) = routing::eviction(endpoint, &snap, &node) {
                        let up = snap.index(&node).is_some_and(|i| snap.nodes[i].health == Health::Up);
                        self.machine.on_evicted(&reason, up);
                    }
                }
                Event::Timeout => self.timed_out().await,
                Event::Notification(n) => {
                    let behind = self
                        .notify
                        .as_ref()
                        .is_some_and(|s| s.overflowed.load(std::sync::atomic::Ordering::Relaxed));
                    match n {
                        Some(n) if !behind => {
                            let at = self.machine.to_client.len();
                            self.machine.to_client.extend_from_slice(&n);
                            self.own_pid(at);
                        }
                        _ => {
                            self.notify = None;
                            if behind {
                                self.machine.on_timeout(Error::notifications_behind(), false);
                            }
                        }
                    }
                }
                // Only listened to while no server connection is held: between units.
                // (A closed channel counts: its sender is gone with the proxy, and
                // waiting on it again would return at once, forever.)
                Event::Shutdown => {
                    if *self.shared.shutdown.borrow() || shutdown.has_changed().is_err() {
                        return Some(Error::shutdown());
                    }
                    // A reload removed the client's cluster.
                    if self.cluster.retiring() {
                        return Some(Error::cluster_removed(&self.cluster.name));
                    }
                    // A successor process took the listeners (binary upgrade): the
                    // client goes on there, from its next message; here it just ends.
                    if let Some(to) = self.shared.successor.get() {
                        if self.hand_over(to) {
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// Hand the client to the successor process with everything its session is: its
    /// socket, who it is, its settings, prepared statements, LISTENs, causal token and
    /// cancel key, and what it sent that is not read yet. Only at rest (between units,
    /// holding nothing) and on a plaintext connection: TLS keys cannot leave rustls.
    /// False when the client stays (served here until it leaves or the drain ends).
    fn hand_over(&mut self, to: &crate::proxy::handover::Successor) -> bool {
        use std::os::fd::AsRawFd;
        let ClientStream::Plain(tcp) = &self.client else {
            return false;
        };
        if self.held.is_some() {
            return false;
        }
        let listening = match &self.notify {
            None => Vec::new(),
            Some(n) if n.rx.is_empty() => n.channels.iter().cloned().collect(),
            Some(_) => return false, // notifications still to deliver here
        };
        let Some(session) = self.machine.carry() else {
            return false;
        };
        let Ok(peer) = tcp.peer_addr() else {
            return false;
        };
        let carried = crate::pg::handover::Carried {
            user: self.who.user.clone(),
            database: self.who.database.clone(),
            params: self.who.params.to_vec(),
            credential: crate::pg::handover::CarriedCredential::of(&self.credential),
            pid: self.cancel.pid,
            key: self.cancel.key_secret,
            causal_token: self.causal.token().map(|f| (f.timeline, f.lsn)),
            listening,
            unread: self.cbuf.to_vec(),
            session,
        };
        let message = crate::proxy::handover::Message::Session {
            engine: "postgresql".into(),
            cluster: self.cluster.name.to_string(),
            endpoint: self.listener.into(),
            peer,
            state: match serde_json::to_value(&carried) {
                Ok(v) => v,
                Err(_) => return false,
            },
        };
        match to.hand_over(&message, tcp.as_raw_fd()) {
            Ok(()) => true,
            Err(e) => {
                warn!(cluster = %self.cluster.name, peer = %peer, reason = %e, "could not hand a client to the new process; it stays on this one");
                false
            }
        }
    }

    /// Bytes the client sent before it was carried here (`pg::handover`), read first.
    /// The end of the client's login, not yet written: it goes out first, with the
    /// greeting.
    pub fn login_reply(&mut self, reply: BytesMut) {
        self.machine.login_reply_first(reply);
    }

    pub fn unread(&mut self, bytes: &[u8]) {
        self.cbuf.extend_from_slice(bytes);
    }

    /// The client may have written just before it was carried here.
    pub fn assume_wrote(&mut self) {
        self.causal.wrote();
    }

    /// LISTEN again, on this process's shared listener, on the channels the client
    /// listened on in the process it was carried from. (Notifications sent between the
    /// two are lost, as for a client that reconnects; documented.)
    pub async fn listen_again(&mut self, channels: &[String]) {
        let ops: Vec<crate::pg::notify::ListenOp> = channels
            .iter()
            .map(|c| crate::pg::notify::ListenOp::Listen(c.clone()))
            .collect();
        let hub = &crate::pg::PgShared::of(self.shared).listeners;
        let mut sub = hub.subscribe(crate::pg::notify::Who {
            cluster: match self.shared.cluster(&self.cluster.name) {
                Some(c) => c.clone(),
                None => return,
            },
            database: self.who.database.clone(),
            user: self.who.user.clone(),
            credential: self.credential.clone(),
        });
        if let Err(e) = sub.apply(&ops).await {
            warn!(cluster = %self.cluster.name, reason = %e, "a client carried from the old process could not LISTEN again here");
        }
        self.notify = Some(Box::new(sub));
    }

    /// A client timeout may be due: end the session (idle, idle in a transaction), or
    /// cancel the query in flight. The cancel is sent while the connection is still
    /// held, so it can only reach this client's query, never another client's.
    async fn timed_out(&mut self) {
        let now = Instant::now();
        self.watch.observe(self.machine.waiting(), 0, now);
        let Some(fired) = self.watch.due(now) else { return };
        if fired != Fired::Query {
            crate::proxy::limits::timed_out(self.shared, &self.cluster.name, fired, "session ended");
            let rolled_back = fired == Fired::IdleTransaction && Box::pin(self.roll_back()).await;
            self.machine.on_timeout(self.watch.error(fired), rolled_back);
            return;
        }
        crate::proxy::limits::timed_out(self.shared, &self.cluster.name, fired, "cancel sent to the server");
        let shared = self.shared;
        Box::pin(crate::pg::cancel::forward(
            &shared.cancels,
            self.cancel.pid,
            self.cancel.key_secret,
            |c| shared.cluster(c).map(|ctx| ctx.server_tls()),
        ))
        .await;
        self.watch.rearm(Instant::now());
    }

    /// An idle transaction's end: ROLLBACK on the held connection (nothing is owed on it:
    /// the session waits for the client), read up to its ReadyForQuery; true if the
    /// connection is idle again and may serve others. Bounded by a second.
    async fn roll_back(&mut self) -> bool {
        let Some(h) = self.held.as_mut() else { return false };
        let stream = &mut h.conn.conn.stream;
        let sbuf = &mut self.sbuf;
        let done = async {
            write_flush(stream, b"Q\0\0\0\x0dROLLBACK\0").await.ok()?;
            loop {
                // Whole messages first; the answer is small (CommandComplete, ReadyForQuery).
                while let Some((tag, len)) = crate::pg::protocol::views::header(sbuf) {
                    let whole = len as usize + 1;
                    if sbuf.len() < whole {
                        break;
                    }
                    let msg = sbuf.split_to(whole);
                    match BackendTag::of(tag) {
                        BackendTag::ReadyForQuery => return Some(msg.last() == Some(&b'I')),
                        BackendTag::ErrorResponse => return Some(false),
                        _ => {}
                    }
                }
                if stream.read_buf(sbuf).await.ok()? == 0 {
                    return None;
                }
            }
        };
        let ok = matches!(tokio::time::timeout(Duration::from_secs(1), done).await, Ok(Some(true)));
        self.sbuf.clear();
        ok
    }

    /// How many session advisory locks, WITH HOLD cursors and temporary objects (tables,
    /// views, sequences, functions, types) the held connection's session holds (None: it
    /// could not say). Err: no whole answer within a second, or the connection failed.
    async fn count_pins(&mut self) -> Result<Option<u64>, &'static str> {
        // Named with their schemas, operators too: the client's `search_path` applies.
        const ASK: &str = "SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype OPERATOR(pg_catalog.=) 'advisory' AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()) \
            OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable) \
            OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
            OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc WHERE pronamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
            OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_type WHERE typnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema())";
        let Some(h) = self.held.as_mut() else {
            return Ok(None);
        };
        match ask::ask(&mut h.conn.conn.stream, &mut self.sbuf, ASK).await {
            Asked::Row(cols) => Ok(cols.first().and_then(|c| c.as_deref()?.parse().ok())),
            Asked::NoRow => Ok(None),
            Asked::Lost => Err("no answer within 1 s to the check of what pins the client to its connection"),
        }
    }

    /// Write what the machine has for the client; false if the client is gone.
    /// With `query_timeout_ms` set, a write to a client that does not read (a large
    /// answer it never takes) ends the session at the query's deadline: a cancel cannot
    /// stop a server that is waiting for the client, and the pool wants its connection.
    async fn flush_client(&mut self) -> bool {
        if self.machine.to_client.is_empty() {
            return true;
        }
        let deadline = match self.watch.armed() {
            true => {
                self.watch.observe(self.machine.waiting(), 0, Instant::now());
                self.watch
                    .deadline()
                    .filter(|_| self.machine.waiting() == Waiting::Server)
            }
            false => None,
        };
        self.bytes_out += self.machine.to_client.len() as u64;
        let client = &mut self.client;
        let out = &self.machine.to_client;
        let write = async { client.send(out).await.is_ok() };
        let ok = match deadline {
            None => write.await,
            Some(d) => {
                let timer = arm(&mut self.timer, d);
                tokio::select! {
                    biased;
                    ok = write => ok,
                    _ = timer => {
                        let why = "session ended: the client does not read its answer";
                        crate::proxy::limits::timed_out(self.shared, &self.cluster.name, Fired::Query, why);
                        false
                    }
                }
            }
        };
        self.machine.to_client.clear();
        self.machine.flushed_to_client();
        ok
    }

    /// Add the statements the machine saw finish to this worker's query digests, as run
    /// on the held connection's node.
    fn record_statements(&mut self, clock: &mut Clock) {
        let finished = &mut self.machine.running.finished;
        if finished.is_empty() {
            return;
        }
        match self.held.as_ref() {
            Some(h) => {
                self.unit.statements += finished.len() as u32;
                self.unit.failed |= finished.iter().any(|f| f.failed);
                let place = Place {
                    cluster: &self.cluster.name,
                    node: &h.via.node,
                    addr: &h.via.pool.key.addr,
                    on_primary: h.on_primary,
                    route: h.route,
                    database: &self.who.database,
                    system: "postgresql",
                };
                crate::pg::digests::record(
                    &self.shared.digests,
                    finished,
                    &place,
                    clock.now(),
                    Some(&mut self.unit.trace),
                );
            }
            None => finished.clear(),
        }
    }

    /// The unit in progress ends on the held connection: its duration, its span, the
    /// bytes it moved.
    fn end_unit(&mut self, now: Instant) {
        let Some(started) = self.unit.started.take() else {
            return;
        };
        self.flush_bytes();
        let trace = self.unit.trace.take();
        let Some(h) = self.held.as_ref() else { return };
        let took = now.saturating_duration_since(started);
        h.via.transactions.observe(took.as_secs_f64());
        if let (Some(tracer), Some(ids)) = (self.shared.digests.tracer.get(), trace) {
            let end = std::time::SystemTime::now();
            let u = &self.unit;
            tracer.submit_transaction(
                ids,
                &crate::obs::trace::TransactionSpan {
                    start: end - took,
                    end,
                    system: "postgresql",
                    namespace: &self.who.database,
                    node: &h.via.pool.key.addr,
                    route: h.route.as_str(),
                    cluster: &self.cluster.name,
                    statements: u.statements,
                    pool_wait: u.pool_wait,
                    causal_wait: u.causal_wait,
                    retries: u.retries,
                    failed: u.failed,
                },
            );
        }
    }

    /// The unit that ends sent notifications on channels the client listens to: on a
    /// direct connection they come before the ReadyForQuery that ends it (clients
    /// rely on that: a NOTIFY to oneself is seen when execute() returns). Wait briefly
    /// for them to come back through the shared listener, and put them (and any others
    /// that came meanwhile) there.
    async fn own_notifications_first(&mut self) {
        let Some(sub) = self.notify.as_mut() else { return };
        let mut expected: Vec<(i32, String, String)> = self
            .machine
            .notified
            .iter()
            .filter(|(_, channel, _)| sub.channels.contains(channel))
            .cloned()
            .collect();
        let out = &self.machine.to_client;
        let ready = out.len() >= 6 && out[out.len() - 6] == b'Z';
        if expected.is_empty() || !ready {
            return;
        }
        let mut came = BytesMut::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while !expected.is_empty() {
            let Ok(Some(n)) = tokio::time::timeout_at(deadline, sub.rx.recv()).await else {
                break;
            };
            let at = came.len();
            came.extend_from_slice(&n);
            let (Some(pid), Some(rest)) = (views::notification_pid(&n[5..]), n.get(9..)) else {
                continue;
            };
            let mut fields = rest.split(|&b| b == 0);
            let (Some(channel), Some(payload)) = (fields.next(), fields.next()) else {
                continue;
            };
            if let Some(i) = expected
                .iter()
                .position(|(p, c, m)| *p == pid && c.as_bytes() == channel && m.as_bytes() == payload)
            {
                expected.remove(i);
                came[at + 5..at + 9].copy_from_slice(&self.cancel.pid.to_be_bytes());
            }
        }
        // The rest is matched when it comes, as any notification (`own_pid`).
        let sent = std::mem::take(&mut self.machine.notified);
        self.own_notifies
            .extend(sent.into_iter().filter(|n| expected.contains(n)));
        while self.own_notifies.len() > 64 {
            self.own_notifies.pop_front();
        }
        let rfq = self.machine.to_client.split_off(self.machine.to_client.len() - 6);
        self.machine.to_client.extend_from_slice(&came);
        self.machine.to_client.extend_from_slice(&rfq);
    }

    /// The NotificationResponse at `at` in the client's output: if it is one the client
    /// sent itself (the same server backend, channel and payload), it carries the
    /// client's pid, as on a direct connection (clients skip their own this way).
    fn own_pid(&mut self, at: usize) {
        let msg = &self.machine.to_client[at..];
        let (Some(pid), Some(rest)) = (views::notification_pid(&msg[5..]), msg.get(9..)) else {
            return;
        };
        let mut fields = rest.split(|&b| b == 0);
        let (Some(channel), Some(payload)) = (fields.next(), fields.next()) else {
            return;
        };
        let Some(i) = self
            .own_notifies
            .iter()
            .position(|(p, c, m)| *p == pid && c.as_bytes() == channel && m.as_bytes() == payload)
        else {
            return;
        };
        self.own_notifies.remove(i);
        self.machine.to_client[at + 5..at + 9].copy_from_slice(&self.cancel.pid.to_be_bytes());
    }

    /// Add the bytes counted since the last time to the listener's counters.
    fn flush_bytes(&mut self) {
        self.received.inc_by(std::mem::take(&mut self.bytes_in));
        self.sent.inc_by(std::mem::take(&mut self.bytes_out));
    }

    /// Tell the causal tracker of writes the machine saw complete since the last look.
    fn note_writes(&mut self) {
        if self.machine.take_wrote() {
            self.causal.wrote();
            self.wrote_since_release = true;
        }
    }

    /// Read-your-writes: the floor of the write unit that just ended, asked on the
    /// primary connection it ran on before that goes back to the pool, when a read is
    /// likely to follow (`Causal::floor_wanted_now`). The client has its answer first.
    /// False: the connection did not answer, and must not serve anyone else.
    async fn learn_floor_here(&mut self) -> bool {
        let Some(h) = self.held.as_ref() else { return true };
        // Nothing may be in flight on it: the answer is read here, not relayed.
        if !h.on_primary || !self.machine.to_server.is_empty() || !self.sbuf.is_empty() {
            return true;
        }
        let Some(covers) = self.causal.floor_wanted_now() else {
            return true;
        };
        if !self.flush_client().await {
            self.machine.on_client_closed();
            return true;
        }
        let freshness = &crate::pg::PgCluster::of(self.cluster).freshness;
        let h = self.held.as_mut().expect("held above");
        let asked = ask::ask(
            &mut h.conn.conn.stream,
            &mut self.sbuf,
            freshness.floor_question().sql(),
        )
        .await;
        let floor = match &asked {
            Asked::Row(cols) => freshness.floor_answer(cols),
            _ => None,
        };
        if floor.is_none() {
            debug!(cluster = %self.cluster.name, answer = ?asked, "a write's connection did not tell its WAL position; the oracle will");
        }
        self.causal.learned_now(floor, covers);
        asked != Asked::Lost
    }

    /// Read-your-writes: what the floor question sent with the unit's commit answered
    /// (`Machine::ask_floor`).
    fn learned_with_commit(&mut self, answer: Asked) {
        let freshness = &crate::pg::PgCluster::of(self.cluster).freshness;
        let floor = match &answer {
            Asked::Row(cols) => freshness.floor_answer(cols),
            Asked::NoRow => None,
            // The connection went before it answered: the oracle will.
            Asked::Lost => return,
        };
        if floor.is_none() {
            debug!(cluster = %self.cluster.name, answer = ?answer, "a write's commit did not come with its WAL position; the oracle will tell");
        }
        self.causal.learned_with_commit(floor, self.floor_before);
    }

    fn dialer(&mut self, target: Endpoint) -> PoolDialer<'_> {
        PoolDialer {
            cluster: self.cluster,
            shared: self.shared,
            who: &self.who,
            credential: &self.credential,
            require_primary: target == Endpoint::ReadWrite,
            listener: self.listener,
            pools: &mut self.pools,
            now: self.unit.started.unwrap_or_else(Instant::now),
        }
    }

    /// A connection for the next unit at once, when it is not a read to place and an
    /// idle connection is ready (`connector::connect_now`): the common case, without an
    /// await. False sends the caller to `acquire`.
    fn acquire_now(&mut self, to: Target, exclude: Option<&str>) -> bool {
        if to == Target::Readable {
            return false;
        }
        let target = Endpoint::ReadWrite;
        let cluster = self.cluster;
        let Some(c) = connector::connect_now(cluster, target, exclude, None, &mut self.dialer(target)) else {
            return false;
        };
        self.take(c, None);
        true
    }

    /// A connection for the next unit, through the connector. Run boxed (see `run`).
    async fn acquire(&mut self, to: Target, exclude: Option<&str>) -> Result<(), Error> {
        // The machine decided where (`Machine::route`); a readable node is placed here.
        let split = to == Target::Readable;
        let target = if split { Endpoint::ReadOnly } else { Endpoint::ReadWrite };
        // A read that must see the client's writes (or its causal token) waits here, if
        // it must, for a standby to catch up; then only nodes that have may take it.
        let placement = if split {
            let asked = Instant::now();
            let p = self.causal.place(self.cluster).await;
            self.unit.causal_wait += asked.elapsed();
            Some(p)
        } else {
            None
        };
        let cluster = self.cluster;
        let accept_fresh =
            |snap: &ClusterSnapshot, i: usize| placement.as_ref().is_none_or(|p| p.accepts(cluster, snap, i));
        let accept: Option<Accept<'_>> = match &placement {
            Some(p) if !p.is_free() => Some(&accept_fresh),
            _ => None,
        };
        let mut dialer = self.dialer(target);
        // After a placement the fast path may work now (`acquire_now` does not try a
        // read to place); otherwise it has just failed, and is not tried twice.
        let now = if split {
            connector::connect_now(cluster, target, exclude, accept, &mut dialer)
        } else {
            None
        };
        let c = match now {
            Some(c) => c,
            None => connector::connect(cluster, target, exclude, accept, None, &mut dialer).await?,
        };
        self.take(c, placement.as_ref());
        Ok(())
    }

    /// Hold the connection the connector gave.
    fn take(&mut self, c: Connected<Held>, placement: Option<&Placement>) {
        let mut held = c.conn;
        self.pool_wait.observe(c.waited.as_secs_f64());
        self.unit.pool_wait += c.waited;
        let node = &c.snapshot.nodes[c.index];
        held.route = match placement {
            None => Route::Primary,
            Some(_) if node.role == Role::Standby && self.machine.read_only_endpoint() => Route::Replica,
            Some(_) if node.role == Role::Standby => Route::Split,
            Some(p) if p.held_for_freshness() => Route::Fresh,
            Some(_) => Route::Fallback,
        };
        if let Some(p) = placement {
            self.causal.placed(p, node.role);
            tracing::debug!(cluster = %self.cluster.name, node = %node.name, floor = ?p.floor(), "read placed");
        }
        self.shared
            .cancels
            .retarget(&self.cancel, Some((&node.addr, held.conn.conn.pid, held.conn.conn.key)));
        self.sbuf.clear();
        self.held = Some(Box::new(held));
    }

    /// Give the held connection back: pooled if `reuse` (the machine decided its state
    /// allows it), else closed.
    fn release(&mut self, reuse: bool, now: Instant) {
        if let Some(mut h) = self.held.take() {
            if !reuse {
                h.conn.broken = true;
            }
            self.shared.cancels.retarget(&self.cancel, None);
            h.via.pool.checkin(h.conn, now);
        }
    }
}

impl Drop for Driver<'_> {
    /// However the session ends, the bytes it moved are counted.
    fn drop(&mut self) {
        self.flush_bytes();
    }
}

impl Unit {
    /// A new unit, its request arrived at `now`.
    fn begin(&mut self, now: Instant) {
        *self = Unit {
            started: Some(now),
            ..Unit::default()
        };
    }
}

/// The login a greeting depends on.
fn greeting_of(who: &TxnClient, endpoint: Endpoint) -> crate::pg::greetings::Who<'_> {
    crate::pg::greetings::Who {
        user: &who.user,
        database: &who.database,
        read_only: endpoint == Endpoint::ReadOnly,
        startup: &who.params,
    }
}

#[cfg(test)]
mod tests {
    /// What an idle transaction-mode client costs is mostly its session's future, the
    /// `Driver` most of it: what is there only while a unit runs (the held connection,
    /// LISTENs, a timer) is boxed. A field added inline shows here first (the bench's
    /// idle figure, `bench/run --idle-clients`, is the measure).
    #[test]
    fn an_idle_session_stays_small() {
        let driver = std::mem::size_of::<super::Driver<'static>>();
        assert!(driver <= 1536, "Driver is {driver} bytes");
    }
}
