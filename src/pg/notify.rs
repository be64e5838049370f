//! LISTEN / NOTIFY in transaction pooling without pinning: one server connection per
//! cluster, database and user listens on behalf of every client that asked (`Hub`), and
//! hands each notification to the clients of its channel through bounded queues; the
//! transaction driver writes them to its client between transactions.
//!
//! Written here rather than with tokio-postgres's notification stream: the listener must
//! log in with the client's own credential (SCRAM pass-through), follow the primary
//! through failovers, and pass the server's NotificationResponse bytes on unchanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::cluster::ClusterCtx;
pub use crate::pg::classify::ListenOp;
use crate::pg::credential::Credential;
use crate::pg::protocol::tags::BackendTag;
use crate::pg::protocol::views;
use crate::pg::server::{self, ServerConn};
use crate::tls::write_flush;

/// Notifications waiting for one client at most; past it the client is dropped from its
/// channels and its session ended (`Subscription::overflowed`).
pub const QUEUE: usize = 1024;

/// A client's end: notifications of its channels, and whether it fell too far behind.
pub struct Subscription {
    pub id: u64,
    pub rx: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<Bytes>,
    pub overflowed: Arc<AtomicBool>,
    listener: mpsc::UnboundedSender<Cmd>,
    /// The channels the client listens on.
    pub channels: std::collections::HashSet<String>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.listener.send(Cmd::Gone { client: self.id });
    }
}

enum Cmd {
    Listen {
        client: u64,
        channel: String,
        tx: mpsc::Sender<Bytes>,
        overflowed: Arc<AtomicBool>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Unlisten {
        client: u64,
        channel: Option<String>,
    },
    Gone {
        client: u64,
    },
}

/// The listeners, by cluster, database and user.
#[derive(Default)]
pub struct Hub {
    listeners: Mutex<HashMap<(String, String, String), mpsc::UnboundedSender<Cmd>>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Who a listener logs in as.
pub struct Who {
    pub cluster: Arc<ClusterCtx>,
    pub database: String,
    pub user: String,
    pub credential: Credential,
}

impl Hub {
    /// A client's subscription, on the listener for its cluster, database and user
    /// (started when there is none).
    pub fn subscribe(&self, who: Who) -> Subscription {
        let key = (who.cluster.name.to_string(), who.database.clone(), who.user.clone());
        let mut listeners = self.listeners.lock().unwrap();
        let listener = match listeners.get(&key) {
            Some(l) if !l.is_closed() => l.clone(),
            _ => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(Listener::new(who).run(rx));
                listeners.insert(key, tx.clone());
                tx
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        Subscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            rx,
            tx,
            overflowed: Arc::new(AtomicBool::new(false)),
            listener,
            channels: Default::default(),
        }
    }
}

impl Subscription {
    /// UNLISTENs the client sent to the server (in a transaction, or with other
    /// statements, or its `DISCARD ALL`): its LISTENs here end too.
    pub fn forget(&mut self, ops: &[ListenOp]) {
        for op in ops {
            let channel = match op {
                ListenOp::Listen(_) => continue,
                ListenOp::Unlisten(c) => {
                    self.channels.remove(c);
                    Some(c.clone())
                }
                ListenOp::UnlistenAll => {
                    self.channels.clear();
                    None
                }
            };
            let _ = self.listener.send(Cmd::Unlisten {
                client: self.id,
                channel,
            });
        }
    }

    /// Carry out a client's LISTEN / UNLISTEN statements; a LISTEN returns once the
    /// listener's own LISTEN took effect, so nothing committed after the client's answer
    /// is missed.
    pub async fn apply(&mut self, ops: &[ListenOp]) -> Result<(), String> {
        for op in ops {
            match op {
                ListenOp::Listen(channel) => {
                    let (done, wait) = oneshot::channel();
                    self.listener
                        .send(Cmd::Listen {
                            client: self.id,
                            channel: channel.clone(),
                            tx: self.tx.clone(),
                            overflowed: self.overflowed.clone(),
                            done,
                        })
                        .map_err(|_| "the listening connection is gone".to_string())?;
                    match tokio::time::timeout(Duration::from_secs(10), wait).await {
                        Ok(Ok(r)) => r?,
                        Ok(Err(_)) => return Err("the listening connection is gone".into()),
                        Err(_) => return Err("no listening connection within 10 s".into()),
                    }
                    self.channels.insert(channel.clone());
                }
                ListenOp::Unlisten(channel) => {
                    self.channels.remove(channel);
                    let _ = self.listener.send(Cmd::Unlisten {
                        client: self.id,
                        channel: Some(channel.clone()),
                    });
                }
                ListenOp::UnlistenAll => {
                    self.channels.clear();
                    let _ = self.listener.send(Cmd::Unlisten {
                        client: self.id,
                        channel: None,
                    });
                }
            }
        }
        Ok(())
    }
}

struct Subscriber {
    client: u64,
    tx: mpsc::Sender<Bytes>,
    overflowed: Arc<AtomicBool>,
}

struct Listener {
    who: Who,
    channels: HashMap<String, Vec<Subscriber>>,
    conn: Option<ServerConn>,
    buf: BytesMut,
}

/// A channel name as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Listener {
    fn new(who: Who) -> Listener {
        Listener {
            who,
            channels: HashMap::new(),
            conn: None,
            buf: BytesMut::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        enum Event {
            Cmd(Option<Cmd>),
            Read(bool),
        }
        loop {
            let event = match self.conn.as_mut() {
                Some(conn) => {
                    let buf = &mut self.buf;
                    tokio::select! {
                        cmd = rx.recv() => Event::Cmd(cmd),
                        r = conn.stream.read_buf(buf) => Event::Read(matches!(r, Ok(n) if n > 0)),
                    }
                }
                None => Event::Cmd(rx.recv().await),
            };
            let cmd = match event {
                Event::Read(true) => {
                    self.dispatch();
                    continue;
                }
                Event::Read(false) => {
                    self.lost("the server closed the connection").await;
                    continue;
                }
                Event::Cmd(cmd) => cmd,
            };
            let Some(cmd) = cmd else { return };
            self.handle(cmd).await;
            if self.channels.is_empty() {
                // Nobody listens: the server connection goes.
                self.conn = None;
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Listen {
                client,
                channel,
                tx,
                overflowed,
                done,
            } => {
                if !self.channels.contains_key(&channel) {
                    if let Err(e) = self.ask(&format!("LISTEN {}", quoted(&channel))).await {
                        let _ = done.send(Err(e));
                        return;
                    }
                }
                let subs = self.channels.entry(channel).or_default();
                if !subs.iter().any(|s| s.client == client) {
                    subs.push(Subscriber { client, tx, overflowed });
                }
                let _ = done.send(Ok(()));
            }
            Cmd::Unlisten { client, channel } => self.drop_client(client, channel.as_deref()).await,
            Cmd::Gone { client } => self.drop_client(client, None).await,
        }
    }

    /// Take `client` off `channel` (None: all), and UNLISTEN the channels nobody wants.
    async fn drop_client(&mut self, client: u64, channel: Option<&str>) {
        let mut empty = Vec::new();
        for (name, subs) in self.channels.iter_mut() {
            if channel.is_none_or(|c| c == name) {
                subs.retain(|s| s.client != client);
                if subs.is_empty() {
                    empty.push(name.clone());
                }
            }
        }
        for name in empty {
            self.channels.remove(&name);
            if self.conn.is_some() {
                let _ = self.ask(&format!("UNLISTEN {}", quoted(&name))).await;
            }
        }
    }

    /// Run one statement of its own on the listening connection (connecting first if
    /// needed); notifications that arrive meanwhile are dispatched.
    async fn ask(&mut self, sql: &str) -> Result<(), String> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let conn = self.conn.as_mut().expect("connected");
        let mut q = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut q).map_err(|e| e.to_string())?;
        if let Err(e) = write_flush(&mut conn.stream, &q).await {
            self.conn = None;
            return Err(format!("the listening connection failed: {e}"));
        }
        let mut failed = None;
        loop {
            while let Some((tag, len)) = views::header(&self.buf) {
                let whole = len as usize + 1;
                if self.buf.len() < whole {
                    break;
                }
                let msg = self.buf.split_to(whole).freeze();
                match BackendTag::of(tag) {
                    BackendTag::Notification => self.deliver(msg),
                    BackendTag::ErrorResponse => {
                        failed =
                            Some(String::from_utf8_lossy(views::ErrorFields::decode(&msg[5..]).message).into_owned())
                    }
                    BackendTag::ReadyForQuery => return failed.map_or(Ok(()), Err),
                    _ => {}
                }
            }
            let conn = self.conn.as_mut().expect("connected");
            match tokio::time::timeout(Duration::from_secs(10), conn.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    self.conn = None;
                    return Err("the listening connection failed".into());
                }
            }
        }
    }

    /// Log in to the cluster's primary as the client's user.
    async fn connect(&mut self) -> Result<ServerConn, String> {
        let ctx = &self.who.cluster;
        let snap = ctx.state.snapshot();
        let i = crate::cluster::routing::write_primary(&snap).map_err(|e| e.to_string())?;
        let addr = snap.nodes[i].addr.clone();
        let tls = ctx.server_tls();
        let login = server::Login {
            user: &self.who.user,
            credential: &self.who.credential,
            database: &self.who.database,
            params: &[],
            require_primary: true,
            tls: &tls,
        };
        self.buf.clear();
        let conn = server::connect(&addr, &login, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        info!(cluster = %ctx.name, node = %snap.nodes[i].name, database = %self.who.database, user = %self.who.user,
              "listening connection opened for clients' LISTEN");
        Ok(conn)
    }

    /// Whole messages in the buffer: notifications to their channels' clients.
    fn dispatch(&mut self) {
        while let Some((tag, len)) = views::header(&self.buf) {
            let whole = len as usize + 1;
            if self.buf.len() < whole {
                return;
            }
            let msg = self.buf.split_to(whole).freeze();
            if BackendTag::of(tag) == BackendTag::Notification {
                self.deliver(msg);
            }
        }
    }

    /// One NotificationResponse to every client of its channel; a client whose queue is
    /// full is dropped from every channel and told so (`overflowed`).
    fn deliver(&mut self, msg: Bytes) {
        let Some(channel) = msg
            .get(9..)
            .and_then(|b| b.split(|&c| c == 0).next())
            .and_then(|c| std::str::from_utf8(c).ok())
        else {
            return;
        };
        let Some(subs) = self.channels.get_mut(channel) else {
            return;
        };
        let mut behind = Vec::new();
        subs.retain(|s| match s.tx.try_send(msg.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.overflowed.store(true, Ordering::Relaxed);
                behind.push(s.client);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if !behind.is_empty() {
            for subs in self.channels.values_mut() {
                subs.retain(|s| !behind.contains(&s.client));
            }
            warn!(cluster = %self.who.cluster.name, clients = behind.len(), queue = QUEUE,
                  "clients fell too far behind their notifications; their sessions end");
        }
    }

    /// The listening connection failed (a failover, a restart): listen again on the
    /// primary, retrying every second; notifications sent in the gap are lost, and the
    /// clients are told with a notice.
    async fn lost(&mut self, why: &str) {
        self.conn = None;
        warn!(cluster = %self.who.cluster.name, reason = %why, "listening connection lost; listening again on the primary");
        let mut notice = BytesMut::new();
        crate::pg::protocol::messages::notice(
            &mut notice,
            "01000",
            "Switchyard's listening connection was lost (a failover or a restart): notifications sent until it listens again are lost",
        );
        let notice = notice.freeze();
        for subs in self.channels.values() {
            for s in subs {
                let _ = s.tx.try_send(notice.clone());
            }
        }
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        for attempt in 0..60 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mut ok = true;
            for c in &channels {
                if self.ask(&format!("LISTEN {}", quoted(c))).await.is_err() {
                    ok = false;
                    break;
                }
            }
            if ok {
                return;
            }
        }
        warn!(cluster = %self.who.cluster.name, "no primary to listen on for a minute; the clients' LISTENs are dropped");
        self.channels.clear();
    }
}
