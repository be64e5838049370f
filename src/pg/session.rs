//! One client session, start to end: startup packet, authentication, choosing a node,
//! logging in there, then relaying both directions until one side ends or the node stops
//! being a valid place for this session (it went down, or stopped being primary).
//!
//! States: `Negotiate` (TLS, `tls::negotiate`) → `Startup` → `Authenticate` (both in
//! `login`) → `Connect` → `Relay`. Every way out before the
//! relay sends the client one ErrorResponse with a SQLSTATE; a way out during the relay
//! does so when the client's stream is at a message boundary.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use tokio::sync::watch;

use crate::cluster::freshness::{self, Floor};
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{ClusterSnapshot, Health, NodeState, NodeStats, Role};
use crate::cluster::ClusterCtx;
use crate::config::{ClientTls, Config, PoolMode};
use crate::error::Error;
use crate::obs::clients::NewClient;
use crate::obs::digest::Place;
use crate::obs::digest::Route;
use crate::obs::metrics::RoutedLabels;
use crate::pg::credential::Credential;
use crate::pg::digests::SessionStatements;
use crate::pg::fresh::{self, Causal, FreshMetrics};
use crate::pg::login::{login, Client, Reject};
use crate::pg::pool::{Budget, BudgetAsk};
use crate::pg::protocol::framing::{FrameError, Framer};
use crate::pg::protocol::messages;
use crate::pg::protocol::tags::{BackendTag, FrontendTag, TxStatus};
use crate::pg::protocol::views;
use crate::pg::server::{self, ServerConn};
use crate::pg::tls::negotiate;
use crate::pg::txn::{Driver, TxnClient};
use crate::proxy::cancel::Registration;
use crate::proxy::connector::NodeSlot;
use crate::proxy::connector::{self, Accept};
use crate::proxy::limits::Refusal;
use crate::proxy::shared::{Arrival, Shared};
use crate::proxy::stream::{goodbye, write_flush, ClientStream};
use crate::proxy::timeouts::{Fired, Waiting, Watch};

const RELAY_BUFFER: usize = 8192;

impl Client {
    /// Enter this client in the list operators see (SHOW CLIENTS, pools, shutdown).
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        shared: &Shared,
        cluster: &ClusterCtx,
        endpoint: Endpoint,
        peer: SocketAddr,
        node: std::borrow::Cow<'static, str>,
        server_addr: String,
        server_pid: i32,
    ) -> crate::obs::clients::ClientGuard {
        shared.clients.add(NewClient {
            cluster: cluster.name.clone(),
            endpoint,
            peer,
            user: self.user.clone(),
            database: self.database.clone(),
            application_name: self
                .params
                .iter()
                .find(|(k, _)| k == "application_name")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
            node,
            server_addr,
            server_pid,
        })
    }
}

/// What `connect` hands to the relay.
struct Connected {
    node: String,
    addr: String,
    role: Role,
    server: ServerConn,
    _slot: NodeSlot,
    /// Its place under `max_server_connections`.
    _budget: Budget,
    _cancel: Registration,
    stats: Arc<NodeStats>,
    /// The receiver routing used: anything newer than the routing snapshot wakes the relay.
    topology: watch::Receiver<Arc<ClusterSnapshot>>,
    /// The client's causal token (SHOW/SET switchyard.causal_token are answered here).
    causal: Causal,
}

pub use crate::config::ADMIN_DATABASE;

/// A client that authenticated for the admin console (`-d switchyard`): the app hands
/// it to `admin::console` (sessions know nothing of the admin layer above them).
pub struct AdminClient {
    pub stream: ClientStream,
    pub user: String,
    /// Read past the login (`login::Client::unread`): the console's first input.
    pub unread: BytesMut,
}

/// Serve one client from its first byte to its last; returns it instead when it asked
/// for the admin console.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    cluster: Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    forced: Option<Box<Refusal>>,
) -> Option<AdminClient> {
    // The login, then the session, each boxed, the login's state freed before the
    // session starts: an idle client's task holds only what its session needs.
    let forced = forced.map(|f| *f);
    let session = match Box::pin(admit(tcp, peer, &cluster, endpoint, &shared, forced)).await {
        Admitted::Session(session) => session,
        Admitted::Admin(admin) => return Some(admin),
        Admitted::Gone => return None,
    };
    session.await;
    None
}

/// What the login of a client led to.
enum Admitted<'a> {
    /// Its session, to run.
    Session(Pin<Box<dyn Future<Output = ()> + Send + 'a>>),
    /// A client of the admin console.
    Admin(AdminClient),
    /// It left, was refused (and told why), or only asked to cancel a query.
    Gone,
}

/// TLS, startup and authentication of a client, then its session set up (in session
/// mode, with its server connection).
async fn admit<'a>(
    tcp: TcpStream,
    peer: SocketAddr,
    cluster: &'a Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: &'a Arc<Shared>,
    forced: Option<Refusal>,
) -> Admitted<'a> {
    let Arrival {
        config,
        login_timeout,
        tls_mode,
        tls,
    } = shared.arrival(&tcp, cluster);
    let require_tls = (tls_mode == ClientTls::Require).then_some(&*cluster.name);
    let started = tokio::time::Instant::now();
    // The TLS handshake and the login are boxed: their state is large and lives only
    // while they run; inline, every idle client's session future would be as large.
    let handshake = Box::pin(negotiate(tcp, tls.as_ref().map(|t| &t.acceptor)));
    let mut stream = match tokio::time::timeout(login_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(cluster = %cluster.name, peer = %peer, reason = %e, "client left during TLS negotiation");
            return Admitted::Gone;
        }
        Err(_) => return Admitted::Gone,
    };
    let left = login_timeout.saturating_sub(started.elapsed());
    // SCRAM-SHA-256-PLUS binds to the certificate this connection's handshake used.
    let channel = tls.as_ref().filter(|_| stream.is_tls()).map(|t| t.end_point.clone());
    let outcome = match tokio::time::timeout(
        left,
        Box::pin(login(
            &mut stream,
            shared,
            cluster,
            require_tls,
            channel.as_deref(),
            forced,
        )),
    )
    .await
    {
        Ok(Ok(Some(client))) if client.database == ADMIN_DATABASE => {
            return Admitted::Admin(AdminClient {
                stream,
                user: client.user,
                unread: client.unread,
            })
        }
        Ok(Ok(Some(client))) => match causal_floor(&client, cluster) {
            Err(e) => Err(Reject::Error(e)),
            Ok(floor) if cluster.settings().pool_mode == PoolMode::Transaction => {
                // Boxed, as session mode's relay below: a session future holds the state
                // of one mode only, not the larger of the two.
                return Admitted::Session(serve_transaction_mode(
                    stream, peer, client, floor, cluster, endpoint, shared,
                ));
            }
            Ok(floor) => Box::pin(connect(&mut stream, &client, floor, cluster, endpoint, shared, &config))
                .await
                .map(|(c, waited)| (client, c, waited)),
        },
        Ok(Ok(None)) => return Admitted::Gone, // a cancel request, already handled
        Ok(Err(r)) => Err(r),
        Err(_) => Err(Reject::Error(Error::protocol(format!(
            "startup and authentication did not finish within {} ms (proxy.client_login_timeout_ms)",
            login_timeout.as_millis()
        )))),
    };
    let (client, connected, wait) = match outcome {
        Ok(ok) => ok,
        Err(Reject::Refused(e)) => {
            shared.metrics.error(e.code().as_str());
            Box::pin(goodbye(&mut stream, &e.to_fatal())).await;
            return Admitted::Gone;
        }
        Err(reject) => {
            let Reject::Error(e) = reject else {
                return Admitted::Gone;
            };
            if !e.is_forwarded() {
                shared.metrics.error(e.code().as_str());
            }
            Box::pin(goodbye(&mut stream, &e.to_fatal())).await;
            info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, code = %e.code(), side = ?e.side(), reason = %e, "client rejected");
            return Admitted::Gone;
        }
    };
    Admitted::Session(Box::pin(serve_session_mode(
        stream, client, connected, wait, peer, cluster, endpoint, shared, config,
    )))
}

/// Session mode, once the client has its server connection: relay until either side
/// ends.
#[allow(clippy::too_many_arguments)]
async fn serve_session_mode(
    stream: ClientStream,
    client: Client,
    connected: Connected,
    wait: Duration,
    peer: SocketAddr,
    cluster: &ClusterCtx,
    endpoint: Endpoint,
    shared: &Shared,
    config: Arc<Config>,
) {
    shared
        .metrics
        .client_handles(&cluster.name)
        .pool_wait
        .observe(wait.as_secs_f64());
    if config.proxy.log_connections {
        info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, user = %client.user, database = %client.database,
              node = %connected.node, setup_ms = wait.as_millis() as u64, "session started");
    }
    let gauge = shared.metrics.client_connected(&cluster.name, endpoint);
    let node = connected.node.clone();
    let end = Box::pin(relay(
        stream, connected, &client, peer, cluster, endpoint, shared, &config,
    ))
    .await;
    drop(gauge);
    match &end {
        // (Client timeouts are logged, counted, once per interval: `limits::timed_out`.)
        End::Failed(e) if e.is_client_timeout() => {
            debug!(cluster = %cluster.name, peer = %peer, node = %node, code = %e.code(), reason = %e, "session ended by a client timeout")
        }
        End::Failed(e) => {
            if let Some(n) = shared
                .admissions
                .session_ends
                .hit(&format!("{}/{}", cluster.name, e.code()), Instant::now())
            {
                warn!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, node = %node, code = %e.code(), side = ?e.side(), reason = %e, ended = n, "session ended by proxy (ended: how many with this code since the last such line)")
            }
        }
        other => {
            debug!(cluster = %cluster.name, peer = %peer, node = %node, end = ?other, "session ended")
        }
    }
}

/// The floor of a causal token given at startup, checked against the cluster.
fn causal_floor(client: &Client, cluster: &ClusterCtx) -> Result<Option<Floor>, Error> {
    match &client.causal_token {
        None => Ok(None),
        Some(text) => {
            freshness::parse_token(text, &cluster.state.snapshot()).map_err(|e| Error::invalid_parameter(e.to_string()))
        }
    }
}

/// Transaction pooling: greet the client with a server's parameters, then run the
/// pooled session loop (`txn`).
fn serve_transaction_mode<'a>(
    stream: ClientStream,
    peer: SocketAddr,
    client: Client,
    causal_token: Option<Floor>,
    cluster: &'a ClusterCtx,
    endpoint: Endpoint,
    shared: &'a Shared,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    let cancel = shared.cancels.register_pooled(&cluster.name);
    let entry = client.register(
        shared,
        cluster,
        endpoint,
        peer,
        std::borrow::Cow::Borrowed("(transaction pool)"),
        String::new(),
        0,
    );
    let gauge = shared.metrics.client_connected(&cluster.name, endpoint);
    let Client {
        credential,
        user,
        database,
        params,
        _admission: admission,
        unread,
        unsent,
        ..
    } = client;
    let who = TxnClient {
        credential,
        user,
        database,
        params: params.into(),
        causal_token,
    };
    if shared.config().proxy.log_connections {
        info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, "session started (transaction pooling)");
    }
    let mut driver = Driver::new(stream, who, cluster, endpoint, shared, cancel, None);
    driver.login_reply(unsent);
    driver.unread(&unread);
    transaction_session(driver, (gauge, entry, admission), peer, cluster, endpoint, shared)
}

/// A transaction-pooling session's run, boxed with `keep` (what lives as long as the
/// session: its entry in the client list, its gauge, its place under `max_clients`).
/// Built in a plain function: a `Driver` held in an async fn's local (or argument)
/// would take a slot there beside its copy in the future that runs it (the compiler
/// does not overlap them), and every idle client would carry both.
fn transaction_session<'a>(
    mut driver: Driver<'a>,
    keep: impl Send + 'a,
    peer: SocketAddr,
    cluster: &'a ClusterCtx,
    endpoint: Endpoint,
    shared: &'a Shared,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    // The run and the goodbye inline here, not in an async fn of their own: its
    // arguments would take slots beside this future's, in every idle client.
    Box::pin(async move {
        if let Some(e) = driver.run().await {
            note_end(&e, peer, cluster, endpoint, shared);
            // Boxed: its state (a write, a linger with a timer) would otherwise enlarge
            // every session future.
            Box::pin(goodbye(driver.client_mut(), &e.to_fatal())).await;
        }
        drop(keep);
    })
}

/// A transaction-pooling session the proxy ended: counted, and logged (rate-limited).
fn note_end(e: &Error, peer: SocketAddr, cluster: &ClusterCtx, endpoint: Endpoint, shared: &Shared) {
    if !e.is_forwarded() {
        shared.metrics.error(e.code().as_str());
    }
    if e.is_client_timeout() {
        debug!(cluster = %cluster.name, peer = %peer, code = %e.code(), reason = %e, "session ended by a client timeout");
    } else if let Some(n) = shared
        .admissions
        .session_ends
        .hit(&format!("{}/{}", cluster.name, e.code()), Instant::now())
    {
        warn!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, code = %e.code(), side = ?e.side(), reason = %e, ended = n, "session ended by proxy (ended: how many with this code since the last such line)");
    }
}

/// A transaction-pooling client carried from the process this one succeeds (binary
/// upgrade, `proxy::handover`): it was greeted there and is between transactions, so
/// its session goes on here from its next message, with no login. `state` is what
/// `Driver::hand_over` sent (`pg::handover::Carried`).
pub async fn resume(
    tcp: TcpStream,
    peer: SocketAddr,
    cluster: Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    state: serde_json::Value,
) {
    // As `serve`: the setting up boxed and freed before the session runs.
    if let Some(session) = Box::pin(carry_in(tcp, peer, &cluster, endpoint, &shared, state)).await {
        session.await;
    }
}

/// The carried client's session, set up; None if it cannot go on here (it was told).
async fn carry_in<'a>(
    tcp: TcpStream,
    peer: SocketAddr,
    cluster: &'a Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: &'a Arc<Shared>,
    state: serde_json::Value,
) -> Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>> {
    let _ = tcp.set_nodelay(true);
    let mut stream = ClientStream::Plain(tcp);
    let carried: crate::pg::handover::Carried = match serde_json::from_value(state) {
        Ok(c) => c,
        Err(e) => {
            warn!(cluster = %cluster.name, peer = %peer, reason = %e, "a client handed over by the old process came with a state this one cannot read; it is asked to reconnect");
            let e = Error::shutdown();
            Box::pin(goodbye(&mut stream, &e.to_fatal())).await;
            return None;
        }
    };
    let config = shared.config();
    if config.clusters.get(&*cluster.name).map(|c| c.pool_mode) != Some(PoolMode::Transaction) {
        warn!(cluster = %cluster.name, peer = %peer, "a transaction-pooling client handed over by the old process, to a cluster this config does not pool by transaction; it is asked to reconnect");
        Box::pin(goodbye(&mut stream, &Error::shutdown().to_fatal())).await;
        return None;
    }
    // Counted under max_clients, never refused: it is connected already.
    let admission = shared.admissions.admit_carried(&cluster.name, &carried.user);
    let cancel = shared
        .cancels
        .register_pooled_as(&cluster.name, Some((carried.pid, carried.key)));
    let client = Client {
        user: carried.user.clone(),
        database: carried.database.clone(),
        params: carried.params.clone(),
        causal_token: None,
        credential: Credential::None,
        _admission: None,
        unread: BytesMut::new(),
        unsent: BytesMut::new(),
    };
    let entry = client.register(
        shared,
        cluster,
        endpoint,
        peer,
        std::borrow::Cow::Borrowed("(transaction pool)"),
        String::new(),
        0,
    );
    let gauge = shared.metrics.client_connected(&cluster.name, endpoint);
    let floor = carried.floor();
    let verifiers = crate::pg::PgShared::of(shared).verifiers();
    let who = TxnClient {
        credential: carried.credential.into_credential(verifiers.get(&carried.user)),
        user: carried.user,
        database: carried.database,
        params: carried.params.into(),
        causal_token: floor,
    };
    debug!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, "session carried over from the old process (transaction pooling)");
    let mut driver = Driver::new(stream, who, cluster, endpoint, shared, cancel, Some(carried.session));
    driver.unread(&carried.unread);
    // Its last writes may not have reached this process's view of the cluster: its next
    // read learns the primary's position first, as after a write.
    driver.assume_wrote();
    if !carried.listening.is_empty() {
        driver.listen_again(&carried.listening).await;
    }
    Some(transaction_session(
        driver,
        (gauge, entry, admission),
        peer,
        cluster,
        endpoint,
        shared,
    ))
}

/// Choose a node and log in there, trying candidates in order, waiting for the
/// topology to offer one when there is none. The whole phase is bounded by the cluster's
/// `connect_timeout_ms`, each login attempt also by `server_login_timeout_ms`; a PAUSE
/// holds it without limit (an operator asked for exactly that). Returns the session and
/// how long the client waited for it.
async fn connect(
    stream: &mut ClientStream,
    client: &Client,
    causal_token: Option<Floor>,
    cluster: &ClusterCtx,
    endpoint: Endpoint,
    shared: &Shared,
    config: &Config,
) -> Result<(Connected, Duration), Reject> {
    let credential = client.credential.clone();
    let mut params = client.params.clone();
    if endpoint == Endpoint::ReadOnly {
        // The ro endpoint may fall back to the primary; keep it read-only there too.
        params.push(("default_transaction_read_only".into(), "on".into()));
    }
    let server_tls = cluster.server_tls();
    let login = server::Login {
        user: &client.user,
        credential: &credential,
        database: &client.database,
        params: &params,
        require_primary: endpoint == Endpoint::ReadWrite,
        tls: &server_tls,
    };
    // A ro session with a causal token starts on a node that has replayed it (waiting
    // up to causal_wait_ms for a standby, else the primary); the session then stays
    // there, so later reads are at least as fresh.
    let cc = &*cluster.settings();
    let mut session_causal = Causal::new(
        cc,
        cluster,
        (&client.user, &client.database),
        causal_token,
        FreshMetrics::new(&shared.metrics, &cluster.name),
    );
    let mut causal = None;
    if endpoint == Endpoint::ReadOnly {
        let placement = session_causal.place(cluster).await;
        causal = Some(placement);
    }
    let accept_fresh = |snap: &ClusterSnapshot, i: usize| causal.as_ref().is_none_or(|p| p.accepts(cluster, snap, i));
    let accept: Option<Accept<'_>> = match &causal {
        Some(p) if !p.is_free() => Some(&accept_fresh),
        _ => None,
    };
    let mut rx = cluster.state.subscribe();
    let mut dialer = LoginDialer {
        login,
        cluster,
        max_logins: cc.max_server_logins,
        until: tokio::time::Instant::now() + cc.connect_timeout(),
        caps: config.server_connection_caps(&cluster.name, &client.user),
        pools: &crate::pg::PgShared::of(shared).pools,
    };
    let c = connector::connect(cluster, endpoint, None, accept, Some(&mut rx), &mut dialer).await?;
    let snapshot = c.snapshot;
    let node = &snapshot.nodes[c.index];
    if let Some(placement) = &causal {
        session_causal.placed(placement, node.role);
    }
    let (conn, slot, budget) = c.conn;
    let cancel = send_welcome(stream, &conn, shared, &cluster.name, &node.addr).await?;
    Ok((
        Connected {
            node: node.name.clone(),
            addr: node.addr.clone(),
            role: node.role,
            server: conn,
            _slot: slot,
            _budget: budget,
            _cancel: cancel,
            stats: node.stats.clone(),
            topology: rx,
            causal: session_causal,
        },
        c.waited,
    ))
}

/// Session mode: a fresh login on the node, counted in its sessions from the moment it
/// is chosen (so a burst of new sessions spreads under least_connections).
struct LoginDialer<'a> {
    login: server::Login<'a>,
    cluster: &'a ClusterCtx,
    max_logins: u32,
    /// The end of the connect phase (`connect_timeout_ms`): the most a login waits for
    /// its turn or for room under `max_server_connections`.
    until: tokio::time::Instant,
    /// `max_server_connections` (the cluster's, the user's), and the pools whose idle
    /// connections may make room.
    caps: (Option<u32>, Option<u32>),
    pools: &'a crate::pg::pool::Pools,
}

impl connector::Dialer for LoginDialer<'_> {
    type Conn = (ServerConn, NodeSlot, Budget);

    async fn dial(&mut self, node: &NodeState, timeout: Duration) -> Result<Self::Conn, Error> {
        node.active.fetch_add(1, Ordering::Relaxed);
        let slot = NodeSlot(node.active.clone());
        let ask = BudgetAsk {
            cluster: self.cluster,
            idle: self.pools,
            node: &node.name,
            user: self.login.user,
            caps: self.caps,
        };
        let budget = ask
            .take(self.until)
            .await
            .map_err(|f| server::ServerError::Budget(f.0).into_error(&self.cluster.name, &node.name))?;
        let gate = self.cluster.login_gates.of(&node.name, self.max_logins);
        let conn = server::connect_gated(&node.addr, &self.login, timeout, (&gate, self.max_logins), self.until)
            .await
            .map_err(|e| e.into_error(&self.cluster.name, &node.name))?;
        Ok((conn, slot, budget))
    }
}

/// What a client expects after AuthenticationOk: the server's ParameterStatus messages,
/// a BackendKeyData (ours, for cancel routing), ReadyForQuery.
async fn send_welcome(
    stream: &mut ClientStream,
    conn: &ServerConn,
    shared: &Shared,
    cluster: &std::sync::Arc<str>,
    addr: &str,
) -> Result<Registration, Reject> {
    let reg = shared.cancels.register_session(cluster, addr, conn.pid, conn.key);
    let mut out = BytesMut::with_capacity(conn.startup_messages.len() + 32);
    out.extend_from_slice(&conn.startup_messages);
    messages::backend_key_data(&mut out, reg.pid, reg.key_secret);
    messages::ready_for_query(&mut out, TxStatus::Idle);
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(reg)
}

#[derive(Debug)]
enum End {
    ClientClosed,
    ClientTerminated,
    ServerClosed,
    // Read only through Debug, in the session-ended log line.
    #[allow(dead_code)]
    Io(std::io::Error),
    /// Ended by the proxy (malformed message, eviction, shutdown): the client is told.
    Failed(Error),
}

#[derive(Debug)]
enum ScanStop {
    Frame(FrameError),
    Tag(u8),
}

impl From<FrameError> for ScanStop {
    fn from(e: FrameError) -> Self {
        ScanStop::Frame(e)
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    mut client: ClientStream,
    c: Connected,
    who: &Client,
    peer: SocketAddr,
    cluster: &ClusterCtx,
    endpoint: Endpoint,
    shared: &Shared,
    config: &Config,
) -> End {
    let Connected {
        node,
        addr,
        role,
        mut server,
        stats,
        mut topology,
        mut causal,
        _cancel: cancel,
        ..
    } = c;
    let mut watch = Watch::new(
        config.client_timeouts_of(&cluster.settings(), &who.user),
        Instant::now(),
    );
    // The proxy's own answers (to SHOW/SET switchyard.causal_token), written to the
    // client by the server-to-client side at a message boundary.
    let (inject_tx, mut inject_rx) = tokio::sync::mpsc::unbounded_channel::<BytesMut>();
    let limit = config.proxy.max_message_bytes;
    let grace = Duration::from_millis(config.proxy.shutdown_timeout_ms);
    let entry = who.register(
        shared,
        cluster,
        endpoint,
        peer,
        node.clone().into(),
        addr.clone(),
        server.pid,
    );
    let info = &entry.info;
    let queries = shared
        .metrics
        .queries_routed
        .get_or_create(&RoutedLabels {
            cluster: cluster.name.to_string(),
            node: node.clone(),
            role: role.to_string(),
        })
        .clone();
    // True while a stream is between messages with nothing half-written: the only moment
    // the proxy may add a message of its own to it. (Atomics only because the session
    // future must be Send; nothing here is shared between threads.)
    let client_clean = AtomicBool::new(true);
    let server_clean = AtomicBool::new(true);
    let last_server_tag = AtomicU8::new(0);
    // Set on shutdown (or the cluster's removal): finish the transaction in flight,
    // then leave.
    let draining = AtomicBool::new(false);
    // The query digests: statements followed as the relay passes them (one task runs
    // both directions, so the lock is never contended; it is never held across an
    // await).
    let statements = shared.digests.tracking().then(|| {
        std::sync::Mutex::new(SessionStatements::new(
            &crate::pg::PgCluster::of(cluster).classifier,
            shared.digests.tracing(),
        ))
    });
    let (received, sent) = shared.metrics.client_bytes(&cluster.name, endpoint);
    let place = Place {
        cluster: &cluster.name,
        node: &node,
        addr: &addr,
        database: &who.database,
        system: "postgresql",
        on_primary: role == Role::Primary,
        route: match (endpoint, role) {
            (Endpoint::ReadWrite, _) => Route::Primary,
            (Endpoint::ReadOnly, Role::Standby) => Route::Replica,
            (Endpoint::ReadOnly, _) => Route::Fallback,
        },
    };
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.stream.split();
        let client_to_server = async {
            let mut buf = BytesMut::with_capacity(RELAY_BUFFER.max(who.unread.len()));
            // What the client sent before its login was answered goes first.
            buf.extend_from_slice(&who.unread);
            let mut unread = !buf.is_empty();
            let mut framer = Framer::new(limit);
            loop {
                if std::mem::take(&mut unread) {
                    received.inc_by(buf.len() as u64);
                } else {
                    buf.clear();
                    match cr.read_some(&mut buf).await {
                        Ok(0) => return End::ClientClosed,
                        Ok(n) => {
                            received.inc_by(n as u64);
                        }
                        Err(e) => return End::Io(e),
                    }
                }
                // Between transactions, a new request waits out a PAUSE, or ends the
                // session when Switchyard is shutting down.
                if framer.at_boundary() && info.idle() {
                    if draining.load(Ordering::Relaxed) {
                        return End::Failed(shared.ending(cluster));
                    }
                    if cluster.is_paused() {
                        cluster.wait_unpaused().await;
                    }
                }
                // A lone simple query for the proxy's own setting is answered here.
                if framer.at_boundary() {
                    if let Some(stmt) = fresh::lone_causal_statement(&buf) {
                        // Session mode does not classify statements: on rw anything may
                        // have written.
                        if endpoint == Endpoint::ReadWrite {
                            causal.wrote();
                        }
                        let reply = causal.answer(stmt, cluster, Some(&node)).await;
                        let mut out = BytesMut::new();
                        crate::pg::txn::machine::write_causal_reply(&mut out, reply);
                        let _ = inject_tx.send(out);
                        continue;
                    }
                }
                let mut terminate = false;
                let mut requests = 0;
                let mut executed = 0;
                // (A block of its own: the guard must be gone before the next await.)
                let scanned = {
                    let mut followed = statements.as_ref().map(|m| m.lock().unwrap());
                    let scanned = framer.scan_bodies(&buf, |byte, _, body| {
                        if let Some(s) = followed.as_mut() {
                            s.client_message(byte, body);
                        }
                        match FrontendTag::of(byte) {
                            Some(FrontendTag::Query | FrontendTag::FunctionCall) => {
                                requests += 1;
                                executed += 1;
                            }
                            Some(FrontendTag::Execute) => executed += 1,
                            Some(FrontendTag::Sync) => requests += 1,
                            Some(FrontendTag::Terminate) => terminate = true,
                            None => return Err(ScanStop::Tag(byte)),
                            _ => {}
                        }
                        Ok(())
                    });
                    if let Some(s) = followed.as_mut() {
                        s.running.sent(Instant::now());
                    }
                    scanned
                };
                match scanned {
                    Ok(()) => {}
                    Err(ScanStop::Frame(e)) => return End::Failed(Error::protocol(e.to_string())),
                    Err(ScanStop::Tag(t)) => {
                        return End::Failed(Error::protocol(format!(
                            "invalid frontend message type {}",
                            views::printable(t)
                        )))
                    }
                }
                info.sent_requests(requests);
                if executed > 0 {
                    queries.inc_by(executed);
                    stats.queries_total.fetch_add(executed, Ordering::Relaxed);
                }
                server_clean.store(false, Ordering::Relaxed);
                if let Err(e) = write_flush(&mut sw, &buf).await {
                    return End::Io(e);
                }
                server_clean.store(framer.at_boundary(), Ordering::Relaxed);
                if terminate {
                    return End::ClientTerminated;
                }
            }
        };
        let server_to_client = async {
            let mut buf = BytesMut::with_capacity(RELAY_BUFFER);
            // Server messages are trusted for size; the framer only tracks boundaries.
            let mut framer = Framer::new(u32::MAX);
            let mut injected = BytesMut::new();
            loop {
                buf.clear();
                tokio::select! {
                    r = sr.read_some(&mut buf) => match r {
                        Ok(0) => return End::ServerClosed,
                        Ok(_) => {}
                        Err(e) => return End::Io(e),
                    },
                    Some(own) = inject_rx.recv() => injected.extend_from_slice(&own),
                }
                if !injected.is_empty() && framer.at_boundary() {
                    if let Err(e) = write_flush(&mut cw, &injected).await {
                        return End::Io(e);
                    }
                    sent.inc_by(injected.len() as u64);
                    injected.clear();
                }
                if buf.is_empty() {
                    continue;
                }
                let mut ready = 0;
                let scanned = {
                    let mut followed = statements.as_ref().map(|m| m.lock().unwrap());
                    let scanned = framer.scan_bodies::<FrameError>(&buf, |tag, _, body| {
                        last_server_tag.store(tag, Ordering::Relaxed);
                        match BackendTag::of(tag) {
                            BackendTag::ReadyForQuery => ready += 1,
                            // (A body is seen when the message is whole in this read.)
                            BackendTag::ErrorResponse => {
                                let code = body.map(|b| crate::pg::protocol::views::ErrorFields::decode(b).code);
                                if let Some(&[a, b, ..]) = code {
                                    shared.metrics.server_error(&cluster.name, [a, b]);
                                }
                            }
                            _ => {}
                        }
                        if let Some(s) = followed.as_mut() {
                            s.server_message(tag, body);
                        }
                        Ok(())
                    });
                    if let Some(s) = followed.as_mut() {
                        crate::pg::digests::record(
                            &shared.digests,
                            &mut s.running.finished,
                            &place,
                            Instant::now(),
                            None,
                        );
                    }
                    scanned
                };
                if let Err(e) = scanned {
                    return End::Failed(Error::server_protocol(format!("server sent a malformed message: {e}")));
                }
                client_clean.store(false, Ordering::Relaxed);
                if let Err(e) = write_flush(&mut cw, &buf).await {
                    return End::Io(e);
                }
                sent.inc_by(buf.len() as u64);
                let boundary = framer.at_boundary();
                client_clean.store(boundary, Ordering::Relaxed);
                for _ in 0..ready {
                    info.ready_for_query(framer.last_ready_status());
                }
                if boundary && draining.load(Ordering::Relaxed) && info.idle() {
                    return End::Failed(shared.ending(cluster));
                }
            }
        };
        let evicted = async {
            loop {
                if topology.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                let snap = topology.borrow_and_update().clone();
                if let Some(reason) = routing::eviction(endpoint, &snap, &node) {
                    let up = snap.index(&node).is_some_and(|i| snap.nodes[i].health == Health::Up);
                    return End::Failed(Error::evicted(up, reason));
                }
            }
        };
        let stop = async {
            let e = shared.closing(cluster).await;
            draining.store(true, Ordering::Relaxed);
            if info.idle() && client_clean.load(Ordering::Relaxed) {
                return End::Failed(e);
            }
            tokio::time::sleep(grace).await;
            End::Failed(e)
        };
        // The client timeouts, looked at a few times per the shortest of them (a timer
        // per message would cost every session; this costs only those with timeouts).
        let watchdog = async {
            if !watch.armed() {
                return std::future::pending().await;
            }
            let every = watch.poll_every();
            // The answers count when the last cancel was sent.
            let mut cancelled_at = None;
            loop {
                tokio::time::sleep(every).await;
                let now = Instant::now();
                let (in_flight, in_transaction, answered) = info.activity();
                let waiting = match (in_flight, in_transaction) {
                    (true, _) => Waiting::Server,
                    (false, true) => Waiting::ClientInTransaction,
                    (false, false) => Waiting::Client,
                };
                watch.observe(waiting, answered, now);
                let Some(fired) = watch.due(now) else { continue };
                // A second query timeout with no answer since the cancel: the client
                // does not read what the server sends (a cancel cannot help then).
                let stuck = fired == Fired::Query && cancelled_at == Some(answered);
                if fired != Fired::Query || stuck {
                    let what = if stuck {
                        "session ended: the client does not read its answer"
                    } else {
                        "session ended"
                    };
                    crate::proxy::limits::timed_out(shared, &cluster.name, fired, what);
                    return End::Failed(watch.error(fired));
                }
                crate::proxy::limits::timed_out(shared, &cluster.name, fired, "cancel sent to the server");
                cancelled_at = Some(answered);
                crate::pg::cancel::forward(&shared.cancels, cancel.pid, cancel.key_secret, |c| {
                    shared.cluster(c).map(|ctx| ctx.server_tls())
                })
                .await;
                watch.rearm(Instant::now());
            }
        };
        tokio::select! {
            e = client_to_server => e,
            e = server_to_client => e,
            e = evicted => e,
            e = stop => e,
            e = watchdog => e,
        }
    };
    let notice = match &end {
        End::Failed(e) => Some(e.clone()),
        // A server that ends a session on purpose says why with an ErrorResponse; say
        // something only when it vanished without a word.
        End::ServerClosed | End::Io(_)
            if BackendTag::of(last_server_tag.load(Ordering::Relaxed)) != BackendTag::ErrorResponse =>
        {
            Some(Error::server_lost(
                &cluster.name,
                &node,
                match &end {
                    End::Io(e) => e.to_string(),
                    _ => "the server closed the connection".to_string(),
                },
            ))
        }
        _ => None,
    };
    if let Some(e) = notice {
        shared.metrics.error(e.code().as_str());
        if client_clean.load(Ordering::Relaxed) {
            goodbye(&mut client, &e.to_fatal()).await;
        }
    }
    // Tell the server we are leaving rather than just dropping the socket, unless that
    // would splice our Terminate into a half-sent client message.
    if matches!(end, End::Failed(_)) && server_clean.load(Ordering::Relaxed) {
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            write_flush(&mut server.stream, b"X\0\0\0\x04"),
        )
        .await;
    }
    end
}
