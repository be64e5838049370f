//! One MySQL client, start to end (session pooling: one server connection per client,
//! opened after the client authenticated, closed when it leaves).
//!
//! `Greet` (our handshake, with the servers' version and capabilities) →
//! `Authenticate` (`mysql_native_password`, or `caching_sha2_password`'s fast path when
//! the client starts with it) → `Connect` (the shared connector: routing, candidates in
//! order, waiting for the topology; the login checks `@@read_only` on rw) → `Relay`.
//!
//! The relay passes bytes on as they come and reads only packet headers, except for the
//! commands the proxy answers or completes itself: `KILL [QUERY] <id>` (the id is the
//! proxy's connection id; the kill goes to the right server connection), its binary
//! form `COM_PROCESS_KILL`, and, on the ro
//! endpoint, `COM_RESET_CONNECTION` (read-only is set again after the reset). When the
//! session's node stops being valid (down, demoted, split brain), the client gets an
//! ERR packet saying why, with the sequence id it expects, and the connection closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use mysql_common::constants::CapabilityFlags;
use mysql_common::packets::{AuthPlugin, AuthSwitchRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth::{authenticate, check_answer, denied, login_password, new_nonce, switch_to, Client, Hello};
use super::commands::{parse_change_user, parse_kill};
use super::protocol::{self, read_packet, write_packet, Scanner};
use super::server::{self, LoginRequest, ServerConn};
use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::{Health, NodeState};
use crate::cluster::ClusterCtx;
use crate::config::{AuthMethod, ClientTls, UserConfig};
use crate::error::Error;
use crate::obs::clients::NewClient;
use crate::proxy::cancel::{Registration, Target as KillTarget};
use crate::proxy::connector::{self, Dialer, NodeSlot};
use crate::proxy::shared::Shared;
use crate::proxy::stream::{linger, write_flush, ClientStream};
use crate::tls::{ServerTls, ServerWrite};

const RELAY_BUFFER: usize = 16 * 1024;
/// Bytes of a command looked at to tell whether the proxy handles it (`KILL ...`).
const PEEK: usize = 64;
/// Largest command the proxy takes whole to handle it itself.
const INTERCEPT_MAX: usize = 64 * 1024;

#[derive(Debug)]
enum End {
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
) {
    let _ = tcp.set_nodelay(true);
    let config = shared.config();
    let login_timeout = Duration::from_millis(config.proxy.client_login_timeout_ms);
    let tls_mode = config.clusters[&cluster.name].client_tls(config.tls.is_some());
    let tls = match tls_mode {
        ClientTls::Disable => None,
        _ => shared.tls(),
    };
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
            info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", code = e.mysql_code().number, reason = %e, "client rejected");
            return;
        }
    };
    let reply_seq = client.seq.wrapping_add(1);
    let mut dialer = MysqlDialer {
        request: LoginRequest {
            user: &client.user.name,
            password: client.user.password.as_deref(),
            database: client.database.as_deref(),
            capabilities: client.capabilities,
            collation: client.collation,
            attributes: client.attributes.clone(),
        },
        endpoint,
        tls: cluster.server_tls(),
    };
    let mut rx = cluster.state.subscribe();
    let connected = match connector::connect(&cluster, endpoint, None, None, Some(&mut rx), &mut dialer).await {
        Ok(c) => c,
        Err(e) => {
            reject(&mut tcp, reply_seq, &e, &shared).await;
            info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", code = e.mysql_code().number, reason = %e, "client rejected");
            return;
        }
    };
    let node = connected.node().clone();
    let (server, _slot) = connected.conn;
    // The server's own OK: its status flags (autocommit) and session state are what
    // the client must see.
    if write_packet(&mut tcp, reply_seq, &server.login_ok).await.is_err() {
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
        node: node.name.clone(),
        server_addr: node.addr.clone(),
        server_pid: server.thread_id as i32,
    });
    info!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", user = %client.user.name,
          node = %node.name, server_thread = server.thread_id, setup_ms = connected.waited.as_millis() as u64, "session started");
    let gauge = shared.metrics.client_connected(&cluster.name, endpoint);
    let mut relay = Relay {
        cluster: &cluster,
        endpoint,
        node: &node,
        shared: &shared,
        client: &client,
        user: client.user.clone(),
        registered,
        inbound: Inbound::default(),
        awaiting: AtomicBool::new(false),
        told: false,
        sbuf: BytesMut::with_capacity(RELAY_BUFFER),
    };
    let end = relay.run(&mut tcp, server, rx).await;
    drop(gauge);
    match &end {
        End::Failed(e) => {
            warn!(cluster = %cluster.name, endpoint = %endpoint, peer = %peer, engine = "mysql", node = %node.name, code = e.mysql_code().number, reason = %e, "session ended by proxy")
        }
        other => debug!(cluster = %cluster.name, peer = %peer, node = %node.name, end = ?other, "session ended"),
    }
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

/// Greet the client and check who it is. Errors carry the sequence id of the ERR.
struct MysqlDialer<'a> {
    request: LoginRequest<'a>,
    endpoint: Endpoint,
    tls: Arc<ServerTls>,
}

impl Dialer for MysqlDialer<'_> {
    type Conn = (ServerConn, NodeSlot);

    async fn dial(&mut self, node: &NodeState, timeout: Duration) -> Result<Self::Conn, Error> {
        node.active.fetch_add(1, Ordering::Relaxed);
        let slot = NodeSlot(node.active.clone());
        let mut conn = server::login(&node.addr, &self.request, &self.tls, timeout).await?;
        let caps = self.request.capabilities & conn.greeting.capabilities;
        let checked = tokio::time::timeout(timeout, async {
            if self.endpoint == Endpoint::ReadWrite {
                if !server::check_writable(&mut conn, caps).await? {
                    return Err(Error::connect_failed(format!(
                        "node \"{}\" is read-only (@@read_only = 1) although the health monitor saw a primary",
                        node.name
                    )));
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

async fn set_read_only(conn: &mut ServerConn, caps: CapabilityFlags) -> Result<(), Error> {
    protocol::first_value(&mut conn.stream, caps, "SET SESSION TRANSACTION READ ONLY")
        .await
        .map(|_| ())
}

struct Relay<'a> {
    cluster: &'a ClusterCtx,
    endpoint: Endpoint,
    node: &'a NodeState,
    shared: &'a Shared,
    client: &'a Client,
    /// Who the session is logged in as now (`COM_CHANGE_USER` changes it).
    user: UserConfig,
    /// Our connection id's entry in the shared cancel/KILL registry.
    registered: Registration,
    inbound: Inbound,
    /// A command was sent and no byte of its answer came back yet. (Atomic only because
    /// both directions, one `Send` future, touch it; nothing is shared between threads.)
    awaiting: AtomicBool,
    /// The client was already told why the session ends.
    told: bool,
    /// Server bytes on their way to the client (kept across pauses).
    sbuf: BytesMut,
}

/// What the relay knows of the client's side of the stream.
#[derive(Default)]
struct Inbound {
    scanner: Scanner,
    /// Sequence id of the client's last packet.
    last_seq: u8,
    /// The client sent COM_QUIT: the server closing is expected.
    quit: bool,
    /// LOAD DATA LOCAL INFILE: the client is sending a file (packets until an empty
    /// one), whose sequence ids wrap through 0 without being commands.
    in_file: bool,
}

/// What the proxy does with a command instead of passing it on.
enum Own {
    Kill { query_only: bool, id: u32 },
    Reset,
    ChangeUser,
}

/// Why the relay of both directions stopped.
enum Pause {
    /// The client sent a command the proxy handles itself (its payload); both
    /// directions are at rest, between chunks.
    Own(Vec<u8>),
    End(End),
}

/// A command the proxy may handle itself (`payload`: its start); Some(true): take it
/// whole and look.
fn own_command(endpoint: Endpoint, payload: &[u8]) -> Option<bool> {
    match payload.first() {
        Some(&protocol::COM_QUERY) => {
            let rest = payload[1..].trim_ascii_start();
            (rest.len() >= 5 && rest[..4].eq_ignore_ascii_case(b"kill") && rest[4].is_ascii_whitespace())
                .then_some(true)
        }
        Some(&protocol::COM_PROCESS_KILL | &protocol::COM_CHANGE_USER) => Some(true),
        Some(&protocol::COM_RESET_CONNECTION) => (endpoint == Endpoint::ReadOnly).then_some(true),
        _ => None,
    }
}

/// How long a command the proxy handles itself waits for the answer streaming to the
/// client to reach a chunk boundary (a client that sent it while not reading).
const SETTLE: Duration = Duration::from_secs(30);

impl Relay<'_> {
    async fn run(
        &mut self,
        client: &mut ClientStream,
        mut server: ServerConn,
        mut topology: tokio::sync::watch::Receiver<Arc<crate::cluster::topology::ClusterSnapshot>>,
    ) -> End {
        let mut cbuf = BytesMut::with_capacity(RELAY_BUFFER);
        let caps = self.client.capabilities & server.greeting.capabilities;
        let end = loop {
            match self.pump(client, &mut server, &mut cbuf, &mut topology).await {
                Pause::End(end) => break end,
                Pause::Own(payload) => {
                    if let Err(end) = self.handle_own(&payload, client, &mut server, caps).await {
                        break end;
                    }
                }
            }
        };
        let awaiting = self.awaiting.load(Ordering::Relaxed);
        if matches!(end, End::ClientClosed) && !self.inbound.quit && self.inbound.scanner.at_boundary() {
            // The client vanished without COM_QUIT: say goodbye for it, so the server
            // does not count an aborted connection.
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                write_packet(&mut server.stream, 0, &[protocol::COM_QUIT]),
            )
            .await;
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
            let seq = if awaiting && self.inbound.scanner.at_boundary() {
                self.inbound.last_seq.wrapping_add(1)
            } else {
                1
            };
            self.shared.metrics.error(e.code().as_str());
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                write_packet(client, seq, &protocol::err_payload(&e)),
            )
            .await;
            let _ = client.shutdown().await;
            if matches!(end, End::Failed(_)) {
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
        let (endpoint, node, shared) = (self.endpoint, self.node, self.shared);
        let inbound = &mut self.inbound;
        let awaiting = &self.awaiting;
        // The server-to-client side stops at its next chunk boundary when told (a
        // stream is only ever cut between whole writes).
        let stop = tokio::sync::Notify::new();
        let client_to_server = async {
            loop {
                match inbound.relay(cbuf, &mut sw, endpoint, node, awaiting).await {
                    Err(end) => return Pause::End(end),
                    Ok(Some(own)) => return Pause::Own(own),
                    Ok(None) => {}
                }
                match cr.read_buf(cbuf).await {
                    Ok(0) => return Pause::End(End::ClientClosed),
                    Err(e) => return Pause::End(End::Io(e)),
                    Ok(_) => {}
                }
            }
        };
        let sbuf = &mut self.sbuf;
        let server_to_client = async {
            loop {
                tokio::select! {
                    r = sr.read_buf(sbuf) => match r {
                        Ok(0) => return Some(End::ServerClosed),
                        Err(e) => return Some(End::Io(e)),
                        Ok(_) => {}
                    },
                    _ = stop.notified() => return None,
                }
                awaiting.store(false, Ordering::Relaxed);
                if let Err(e) = write_flush(&mut cw, sbuf).await {
                    return Some(End::Io(e));
                }
                sbuf.clear();
            }
        };
        tokio::pin!(client_to_server, server_to_client);
        let mut shutdown = shared.shutdown.clone();
        let mut watching = true;
        let pause = loop {
            tokio::select! {
                p = &mut client_to_server => break p,
                e = &mut server_to_client => return Pause::End(e.unwrap_or(End::ServerClosed)),
                changed = topology.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    let snap = topology.borrow_and_update().clone();
                    if let Some(reason) = routing::eviction(endpoint, &snap, &node.name) {
                        let up = snap.index(&node.name).is_some_and(|i| snap.nodes[i].health == Health::Up);
                        break Pause::End(End::Failed(Error::evicted(up, reason)));
                    }
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    if awaiting.load(Ordering::Relaxed) {
                        // Let the answer in flight reach the client first.
                        let grace = Duration::from_millis(shared.config().proxy.shutdown_timeout_ms);
                        if let Ok(Some(end)) = tokio::time::timeout(grace, &mut server_to_client).await {
                            return Pause::End(end);
                        }
                    }
                    break Pause::End(End::Failed(Error::shutdown()));
                }
            }
        };
        // Whatever comes next (the proxy's own answer, an ERR saying why the session
        // ends) goes to the client after whole chunks only. A session that ends waits
        // briefly (shutdown has its own bound); a command of the proxy's waits longer.
        stop.notify_one();
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

impl Inbound {
    /// Pass on the client's bytes in `cbuf` (to `server`), up to a command the proxy
    /// handles itself, which is taken out whole and returned; bytes after it stay in
    /// `cbuf` for later.
    async fn relay(
        &mut self,
        cbuf: &mut BytesMut,
        server: &mut ServerWrite<'_>,
        endpoint: Endpoint,
        node: &NodeState,
        awaiting: &AtomicBool,
    ) -> Result<Option<Vec<u8>>, End> {
        let mut pos = 0;
        let mut own = None;
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
                    if own_command(endpoint, &rest[4..4 + len.min(PEEK)]).is_some() {
                        if len > INTERCEPT_MAX {
                            return Err(End::Failed(Error::protocol("command too long")));
                        }
                        if rest.len() >= 4 + len {
                            own = Some(rest[4..4 + len].to_vec());
                        }
                        break; // whole: handled after what came before; else wait for it
                    }
                    commands += 1;
                    let cmd = rest.get(4).copied();
                    self.quit |= cmd == Some(protocol::COM_QUIT);
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
        let taken = pos + own.as_ref().map_or(0, |p: &Vec<u8>| 4 + p.len());
        cbuf.advance(taken);
        // Advancing uses up the buffer's front: take it back (no allocation while the
        // buffer is empty or nearly so), so the next read is never a short one.
        cbuf.reserve(RELAY_BUFFER / 2);
        if commands > 0 {
            node.stats.queries_total.fetch_add(commands, Ordering::Relaxed);
        }
        Ok(own)
    }
}

impl Relay<'_> {
    /// A command the proxy looked at and leaves to the server after all.
    async fn pass_to_server(&mut self, server: &mut ServerConn, payload: &[u8]) -> Result<(), End> {
        let mut framed = Vec::new();
        protocol::frame(&mut framed, 0, payload);
        self.awaiting.store(true, Ordering::Relaxed);
        write_flush(&mut server.stream, &framed).await.map_err(End::Io)
    }

    async fn handle_own(
        &mut self,
        payload: &[u8],
        client: &mut ClientStream,
        server: &mut ServerConn,
        caps: CapabilityFlags,
    ) -> Result<(), End> {
        self.inbound.last_seq = 0;
        let own = if payload[0] == protocol::COM_RESET_CONNECTION {
            Some(Own::Reset)
        } else if payload[0] == protocol::COM_CHANGE_USER {
            Some(Own::ChangeUser)
        } else if payload[0] == protocol::COM_PROCESS_KILL {
            // The old binary form of `KILL <id>` (PyMySQL's `kill()`).
            payload.get(1..5).map(|b| Own::Kill {
                query_only: false,
                id: u32::from_le_bytes(b.try_into().expect("4 bytes")),
            })
        } else {
            parse_kill(&payload[1..]).map(|(query_only, id)| Own::Kill { query_only, id })
        };
        let reply: Vec<u8> = match own {
            None => {
                // A KILL the proxy does not take (KILL USER ..., KILL QUERY ID ...):
                // the server runs it.
                return self.pass_to_server(server, payload).await;
            }
            Some(Own::Reset) => {
                write_packet(&mut server.stream, 0, payload).await.map_err(End::Io)?;
                let mut buf = Vec::new();
                read_packet(&mut server.stream, &mut buf, INTERCEPT_MAX)
                    .await
                    .map_err(End::Io)?;
                if buf.first() == Some(&0x00) {
                    set_read_only(server, caps).await.map_err(End::Failed)?;
                }
                buf
            }
            Some(Own::ChangeUser) => return self.change_user(payload, client, server, caps).await,
            Some(Own::Kill { query_only, id }) => {
                let target = self
                    .shared
                    .cancels
                    .mysql_target(id)
                    .filter(|t| t.cluster == self.cluster.name);
                match target {
                    // Not one of ours: a server thread id; the server decides.
                    None => {
                        return self.pass_to_server(server, payload).await;
                    }
                    Some(t) => match self.kill(&t, query_only).await {
                        Ok(()) => protocol::ok_payload(),
                        Err(e) => protocol::err_payload(&e),
                    },
                }
            }
        };
        write_packet(client, 1, &reply).await.map_err(End::Io)?;
        Ok(())
    }

    /// `COM_CHANGE_USER`: the new user's answer to our challenge is checked here (with
    /// an auth switch first when the client's first answer is not one for it), then
    /// the server connection is changed with the server's own challenge. Any failure
    /// ends the session, as MySQL does: no guessing passwords on an open session, and
    /// no session left half changed (MariaDB resets session state before it checks).
    async fn change_user(
        &mut self,
        payload: &[u8],
        client: &mut ClientStream,
        server: &mut ServerConn,
        caps: CapabilityFlags,
    ) -> Result<(), End> {
        let Some(cmd) = parse_change_user(payload, self.client.capabilities) else {
            return self
                .refuse(client, 1, Error::protocol("malformed COM_CHANGE_USER"))
                .await;
        };
        let name = String::from_utf8_lossy(cmd.user).into_owned();
        let mut plugin = cmd
            .plugin
            .map(|p| AuthPlugin::from_bytes(p).into_owned())
            .unwrap_or(AuthPlugin::MysqlNativePassword);
        let config = self.shared.config();
        let Some(user) = config.user(&name).cloned() else {
            debug!(user = %name, "COM_CHANGE_USER to a user not in [[users]]");
            return self.refuse(client, 1, denied(&name, !cmd.auth.is_empty())).await;
        };
        let mut reply_seq = 1;
        if user.auth != AuthMethod::Trust {
            let password = match login_password(&user) {
                Ok(p) => p,
                Err(e) => return self.refuse(client, 1, e).await,
            };
            let mut answer = cmd.auth.to_vec();
            if let Some(to) = switch_to(&plugin, &answer, password) {
                let mut data = self.client.nonce.to_vec();
                data.push(0);
                let switch = AuthSwitchRequest::new(to.as_bytes(), &data[..]);
                write_packet(client, 1, &protocol::to_vec(&switch))
                    .await
                    .map_err(End::Io)?;
                let got = read_packet(client, &mut answer, INTERCEPT_MAX).await.map_err(End::Io)?;
                reply_seq = got.wrapping_add(1);
                plugin = to;
            }
            if let Err(e) = check_answer(&name, password, &self.client.nonce, &plugin, &answer) {
                return self.refuse(client, reply_seq, e).await;
            }
        }
        let change = server::ChangeUser {
            user: &user.name,
            password: user.password.as_deref(),
            database: cmd.database,
            charset: cmd.charset,
            attributes: cmd.attributes,
        };
        if let Err(e) = server::change_user(server, &change, caps, &self.node.addr).await {
            return self.refuse(client, reply_seq, e).await;
        }
        if self.endpoint == Endpoint::ReadOnly {
            set_read_only(server, caps).await.map_err(End::Failed)?;
        }
        self.shared.cancels.set_user(&self.registered, &user.name);
        info!(cluster = %self.cluster.name, engine = "mysql", from = %self.user.name, to = %user.name, "COM_CHANGE_USER");
        self.user = user;
        if plugin == AuthPlugin::CachingSha2Password {
            write_packet(client, reply_seq, &[0x01, 0x03]).await.map_err(End::Io)?;
            reply_seq = reply_seq.wrapping_add(1);
        }
        write_packet(client, reply_seq, &protocol::ok_payload())
            .await
            .map(|_| ())
            .map_err(End::Io)
    }

    /// Tell the client `e` at sequence id `seq` and end the session.
    async fn refuse(&mut self, client: &mut ClientStream, seq: u8, e: Error) -> Result<(), End> {
        let _ = write_packet(client, seq, &protocol::err_payload(&e)).await;
        self.told = true;
        Err(End::Failed(e))
    }

    /// Run `KILL [QUERY] <server thread>` on the target's node, logged in as this client
    /// (the server decides whether this user may kill that one, as it would direct).
    async fn kill(&self, t: &KillTarget, query_only: bool) -> Result<(), Error> {
        let timeout = self.cluster.state.snapshot().server_login_timeout;
        let req = LoginRequest {
            user: &self.user.name,
            password: self.user.password.as_deref(),
            database: None,
            capabilities: protocol::proxy_capabilities(),
            collation: self.client.collation,
            attributes: None,
        };
        let mut conn = server::login(&t.addr, &req, &self.cluster.server_tls(), timeout).await?;
        let caps = protocol::proxy_capabilities() & conn.greeting.capabilities;
        let sql = format!("KILL {}{}", if query_only { "QUERY " } else { "" }, t.server_id);
        let result = protocol::first_value(&mut conn.stream, caps, &sql).await.map(|_| ());
        let _ = write_packet(&mut conn.stream, 0, &[protocol::COM_QUIT]).await;
        info!(cluster = %self.cluster.name, engine = "mysql", by = %self.user.name, of = %t.user, node_addr = %t.addr, server_thread = t.server_id, query_only, ok = result.is_ok(), "KILL forwarded");
        result
    }
}
