//! One MySQL client, start to end (session pooling: one server connection per client,
//! opened after the client authenticated, closed when it leaves).
//!
//! `Greet` (our handshake, with the servers' version and capabilities) →
//! `Authenticate` (`mysql_native_password`, or `caching_sha2_password`'s fast path when
//! the client starts with it) → `Connect` (the shared connector: routing, candidates in
//! order, waiting for the topology; the login checks `@@read_only` on rw) → `Relay`.
//!
//! The relay (`relay.rs`) passes bytes on as they come and reads only packet headers,
//! except for the commands the proxy answers or completes itself (`commands.rs`). When
//! the session's node stops being valid (down, demoted, split brain), the client gets
//! an ERR packet saying why, with the sequence id it expects, and the connection closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mysql_common::constants::CapabilityFlags;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth::{authenticate, new_nonce, Hello};
use super::fresh::{Fresh, TOKEN_ATTRIBUTE};
use super::multiplex::{bring_in_line, Checked, PoolDialer};
use super::pool::ConnState;
use super::protocol::{self, write_packet};
use super::server::{self, LoginRequest, ServerConn};
use crate::cluster::routing::Endpoint;
use crate::cluster::topology::NodeState;
use crate::cluster::ClusterCtx;
use crate::config::{ClientTls, Config, PoolMode, ReadYourWrites};
use crate::error::Error;
use crate::obs::clients::NewClient;
use crate::proxy::budget::{login_place, BudgetAsk};
use crate::proxy::cancel::Target as KillTarget;
use crate::proxy::connector::{self, Dialer, NodeSlot};
use crate::proxy::limits::Refusal;
use crate::proxy::shared::{Arrival, Shared};
use crate::proxy::stream::{linger, ClientStream};
use crate::tls::ServerTls;

/// How a session ended.
#[derive(Debug)]
pub(crate) enum End {
    ClientClosed,
    ServerClosed,
    Io(std::io::Error),
    Failed(Error),
}

pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    cluster: Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    forced: Option<Refusal>,
) {
    let Arrival {
        config,
        login_timeout,
        tls_mode,
        tls,
    } = shared.arrival(&tcp, &cluster);
    // Plain until the client asks for TLS (`authenticate` upgrades it in place).
    let mut stream = Some(ClientStream::Plain(tcp));
    let id = shared.cancels.mint_mysql_id();
    let nonce = new_nonce();
    let greeting = super::ClusterInfo::of(&cluster).greeting();
    let offered = match &greeting {
        Some(g) => protocol::proxy_capabilities() & g.capabilities,
        None => protocol::proxy_capabilities(),
    } | CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_PLUGIN_AUTH
        | if tls.is_some() {
            CapabilityFlags::CLIENT_SSL
        } else {
            CapabilityFlags::empty()
        };
    let version = greeting
        .as_ref()
        .map(|g| g.version.clone())
        .unwrap_or_else(|| "5.5.5-10.11.0-MariaDB-switchyard".into());
    let collation = greeting.as_ref().map_or(45, |g| g.collation); // utf8mb4_general_ci
    let authenticated = tokio::time::timeout(
        login_timeout,
        authenticate(
            &mut stream,
            &shared,
            Hello {
                id,
                nonce: &nonce,
                offered,
                version: &version,
                collation,
                tls: tls.as_ref().map(|t| &t.acceptor),
                require_tls: tls_mode == ClientTls::Require,
                cluster: &cluster.name,
                forced,
            },
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err((
            2,
            Error::protocol(format!(
                "authentication did not finish within {} ms (proxy.client_login_timeout_ms)",
                login_timeout.as_millis()
            )),
        ))
    });
    let Some(mut tcp) = stream else {
        debug!(cluster = %cluster.name, peer = %peer, "client left during the TLS handshake");
        return;
    };
    let client = match authenticated {
        Ok(c) => c,
        Err((seq, e)) => {
            reject(&mut tcp, seq, &e, &shared).await;
            if e.code() == crate::error::SqlState::TOO_MANY_CONNECTIONS {
                return; // a limit's refusal: `limits::admit` logs those, throttled
            }
            info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", code = e.mysql_code().number, reason = %e, "client rejected");
            return;
        }
    };
    let reply_seq = client.seq.wrapping_add(1);
    let Some(cc) = config.clusters.get(&*cluster.name) else {
        return; // removed by a reload while the client logged in
    };
    let info = super::ClusterInfo::of(&cluster);
    let writes = match cc.read_your_writes {
        ReadYourWrites::User => info.user_writes(&client.user.name),
        _ => Arc::default(),
    };
    let mut fresh = Fresh::new(cc, writes, info.maria(), &cluster.name);
    // A causal token given at login applies to the session; the server never sees it.
    let mut attributes = client.attributes.clone();
    if let Some(token) = attributes.as_mut().and_then(|a| a.remove(TOKEN_ATTRIBUTE)) {
        if let Err(e) = fresh.set_token(&token) {
            reject(&mut tcp, reply_seq, &e, &shared).await;
            info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", code = e.mysql_code().number, reason = %e, "client rejected");
            return;
        }
    }
    let mut dialer = MysqlDialer::new(
        &cluster,
        &shared.config(),
        LoginRequest {
            user: &client.user.name,
            password: client.user.password.as_deref(),
            database: client.database.as_deref(),
            capabilities: client.capabilities,
            collation: client.collation,
            attributes,
        },
        endpoint,
    );
    let mut rx = cluster.state.subscribe();
    let multiplex = cc.pool_mode == PoolMode::Transaction;
    // Transaction pooling: the session state the client builds, from its login on.
    let desired = ConnState {
        vars: Default::default(),
        db: client
            .database
            .as_deref()
            .map(|d| String::from_utf8_lossy(d).into_owned()),
    };
    let connected = if multiplex {
        let mut pooled = PoolDialer {
            login: dialer,
            info,
            settings: cc.pool_settings(),
            maria: info.maria(),
        };
        match connector::connect(&cluster, endpoint, None, None, Some(&mut rx), &mut pooled).await {
            Ok(c) => {
                let node = c.node().clone();
                let waited = c.waited;
                let Checked {
                    conn: (mut conn, mut state),
                    lease,
                    slot,
                } = c.conn;
                let caps = client.capabilities & conn.greeting.capabilities;
                let target = (&cluster.name[..], &node.name[..]);
                match bring_in_line(&mut conn, &mut state, &desired, caps, info.maria(), endpoint, target).await {
                    Ok(()) => Ok((node, conn, slot, Some(lease), waited)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    } else {
        connector::connect(&cluster, endpoint, None, None, Some(&mut rx), &mut dialer)
            .await
            .map(|c| {
                let node = c.node().clone();
                let waited = c.waited;
                let (server, slot) = c.conn;
                (node, server, slot, None, waited)
            })
    };
    let (node, server, slot, lease, waited) = match connected {
        Ok(c) => c,
        Err(e) => {
            reject(&mut tcp, reply_seq, &e, &shared).await;
            info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", code = e.mysql_code().number, reason = %e, "client rejected");
            return;
        }
    };
    // The server's own OK: its status flags (autocommit) and session state are what
    // the client must see.
    // (Transaction pooling: a pooled connection's login OK may carry the state of the
    // client it was opened for; this client gets the status flags only.)
    let login_ok = if multiplex {
        let status = super::answers::status_of_ok(&server.login_ok).unwrap_or(0);
        super::fresh::ok_with_status(status & !super::answers::SERVER_SESSION_STATE_CHANGED)
    } else {
        server.login_ok.clone()
    };
    if write_packet(&mut tcp, reply_seq, &login_ok).await.is_err() {
        return;
    }
    let registered = shared.cancels.register_mysql(
        id,
        KillTarget {
            cluster: cluster.name.clone(),
            addr: node.addr.clone(),
            server_id: server.thread_id as i32,
            server_key: 0,
            user: client.user.name.clone(),
            active: true,
        },
    );
    let _entry = shared.clients.add(NewClient {
        cluster: cluster.name.clone(),
        endpoint,
        peer,
        user: client.user.name.clone(),
        database: String::from_utf8_lossy(client.database.as_deref().unwrap_or_default()).into_owned(),
        application_name: client
            .attributes
            .as_ref()
            .and_then(|a| a.get("program_name").cloned())
            .unwrap_or_default(),
        node: node.name.clone().into(),
        server_addr: node.addr.clone(),
        server_pid: server.thread_id as i32,
    });
    if shared.config().proxy.log_connections {
        info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", user = %client.user.name,
              node = %node.name, server_thread = server.thread_id, setup_ms = waited.as_millis() as u64, multiplex, "session started");
    }
    let gauge = shared.metrics.client_connected(&cluster.name, endpoint);
    let caps = client.capabilities & server.greeting.capabilities;
    let mut answers = super::answers::Answers::new(caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF));
    answers.track = server.tracking || multiplex;
    answers.collect_state = multiplex;
    answers.statements = shared.digests.tracking();
    answers.status = super::answers::status_of_ok(&server.login_ok).unwrap_or(0);
    let tracking = server.tracking;
    let mut tracked = super::relay::Tracked::new(answers, counter_for(endpoint, &cluster));
    tracked.desired = desired;
    if multiplex && !caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK) {
        tracked.pinned = Some(super::multiplex::PIN_NO_TRACKING);
    }
    let mut relay = super::relay::Relay {
        cluster: &cluster,
        endpoint,
        node: node.clone(),
        shared: &shared,
        client: &client,
        user: client.user.clone(),
        registered,
        inbound: Default::default(),
        awaiting: AtomicBool::new(false),
        told: false,
        sbuf: BytesMut::with_capacity(super::relay::RELAY_BUFFER),
        tracked: std::sync::Mutex::new(tracked),
        move_pending: AtomicBool::new(false),
        slot,
        fresh,
        tracking,
        split: (endpoint == Endpoint::ReadWrite && cc.read_write_split && !multiplex).then(Default::default),
        multiplex,
        lease,
        split_tx: endpoint == Endpoint::ReadWrite && cc.read_write_split && multiplex,
        one_command: false,
        timeouts: config.client_timeouts_of(&cluster.settings(), &client.user.name),
        bytes: shared.metrics.client_bytes(&cluster.name, endpoint),
    };
    let end = relay.run(&mut tcp, server, rx).await;
    let node = relay.node.clone();
    drop(relay);
    drop(gauge);
    match &end {
        End::Failed(e) if e.is_client_timeout() => {
            debug!(cluster = %cluster.name, peer = %peer, engine = "mysql", node = %node.name, code = e.mysql_code().number, reason = %e, "session ended by a client timeout")
        }
        End::Failed(e) => {
            let key = format!("{}/{}", cluster.name, e.mysql_code().number);
            if let Some(n) = shared.admissions.session_ends.hit(&key, std::time::Instant::now()) {
                warn!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", node = %node.name, code = e.mysql_code().number, reason = %e, ended = n, "session ended by proxy (ended: how many with this code since the last such line)")
            }
        }
        other => debug!(cluster = %cluster.name, peer = %peer, node = %node.name, end = ?other, "session ended"),
    }
}

/// rw sessions count toward what a switchover waits for.
fn counter_for(endpoint: Endpoint, cluster: &ClusterCtx) -> Option<Arc<std::sync::atomic::AtomicU32>> {
    (endpoint == Endpoint::ReadWrite).then(|| super::ClusterInfo::of(cluster).unsettled.clone())
}

/// Send `e` as an ERR packet with sequence id `seq`, then close without losing it.
async fn reject(tcp: &mut ClientStream, seq: u8, e: &Error, shared: &Shared) {
    shared.metrics.error(e.code().as_str());
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        write_packet(tcp, seq, &protocol::err_payload(e)),
    )
    .await;
    linger(tcp).await;
}

/// Logs in to a node as the client (`request`), under the cluster's
/// `max_server_connections` and `max_server_logins`, and checks the node is what the
/// endpoint needs.
pub(super) struct MysqlDialer<'a> {
    pub(super) request: LoginRequest<'a>,
    pub(super) endpoint: Endpoint,
    pub(super) tls: Arc<ServerTls>,
    cluster: &'a ClusterCtx,
    /// (cluster's, user's) `max_server_connections`.
    caps: (Option<u32>, Option<u32>),
    max_logins: u32,
}

impl<'a> MysqlDialer<'a> {
    pub(super) fn new(
        cluster: &'a ClusterCtx,
        config: &Config,
        request: LoginRequest<'a>,
        endpoint: Endpoint,
    ) -> MysqlDialer<'a> {
        let caps = config.server_connection_caps(&cluster.name, request.user);
        // (A cluster removed by a reload: its sessions are on their way out; one login
        // at a time.)
        let max_logins = config.clusters.get(&*cluster.name).map_or(1, |c| c.max_server_logins);
        MysqlDialer {
            request,
            endpoint,
            tls: cluster.server_tls(),
            cluster,
            caps,
            max_logins,
        }
    }
}

impl Dialer for MysqlDialer<'_> {
    type Conn = (ServerConn, NodeSlot);

    async fn dial(&mut self, node: &NodeState, timeout: Duration) -> Result<Self::Conn, Error> {
        node.active.fetch_add(1, Ordering::Relaxed);
        let slot = NodeSlot(node.active.clone());
        // Room under max_server_connections (closing an idle pooled connection if need
        // be), then a place among the node's logins in flight, both within the login's
        // own bound.
        let until = tokio::time::Instant::now() + timeout;
        let budget = BudgetAsk {
            cluster: self.cluster,
            idle: &super::ClusterInfo::of(self.cluster).pools,
            node: &node.name,
            user: self.request.user,
            caps: self.caps,
        }
        .take(until)
        .await
        .map_err(|full| {
            Error::pool_exhausted(format!(
                "node \"{}\" of cluster \"{}\": {full}",
                node.name, self.cluster.name
            ))
        })?;
        let gate = self.cluster.login_gates.of(&node.name, self.max_logins);
        let place = login_place(&gate, self.max_logins, until)
            .await
            .map_err(|q| Error::connect_failed(q.to_string()))?;
        // What is left of the bound after waiting for room and a place.
        let timeout = until.saturating_duration_since(tokio::time::Instant::now());
        let mut conn = server::login(&node.addr, &self.request, &self.tls, timeout).await?;
        drop(place);
        conn.budget = budget;
        let caps = self.request.capabilities & conn.greeting.capabilities;
        let checked = tokio::time::timeout(timeout, async {
            if self.endpoint == Endpoint::ReadWrite {
                if !server::check_writable(&mut conn, caps).await? {
                    return Err(Error::connect_failed(format!(
                        "node \"{}\" is read-only (@@read_only = 1) although the health monitor saw a primary",
                        node.name
                    )));
                }
                // Fresh reads learn each write's GTID from its OK, when the client
                // reads session state at all (else the OKs must stay as they are).
                if caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK) {
                    let maria = conn.greeting.version.contains("MariaDB");
                    conn.tracking = protocol::first_value(&mut conn.stream, caps, Fresh::tracking_sql(maria))
                        .await
                        .is_ok();
                }
            } else {
                // The ro endpoint may fall back to the primary: read-only there too.
                set_read_only(&mut conn, caps).await?;
            }
            Ok(())
        })
        .await;
        match checked {
            Ok(Ok(())) => Ok((conn, slot)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::connect_failed(format!(
                "node \"{}\" did not answer the proxy's check within {} ms",
                node.name,
                timeout.as_millis()
            ))),
        }
    }
}

/// `SET SESSION TRANSACTION READ ONLY` on a connection of the ro endpoint.
pub(super) async fn set_read_only(conn: &mut ServerConn, caps: CapabilityFlags) -> Result<(), Error> {
    protocol::first_value(&mut conn.stream, caps, "SET SESSION TRANSACTION READ ONLY")
        .await
        .map(|_| ())
}
