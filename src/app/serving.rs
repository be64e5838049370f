//! Where clients come in: the listening sockets (opened at start and by reloads,
//! passed to a successor on upgrade), their accept loops, and the worker threads that
//! run the sessions.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info};

use crate::cluster::routing::Endpoint;
use crate::cluster::ClusterCtx;
use crate::config::{Config, Engine};
use crate::proxy::handover::Listening;
use crate::proxy::shared::{Clusters, Shared};

/// What a listening socket serves.
#[derive(Clone)]
pub(super) enum Serves {
    Cluster(Arc<ClusterCtx>, Endpoint),
    /// The admin HTTP endpoint.
    Admin,
}

/// The listening sockets `config` asks for, by name (`cluster/rw`, `cluster/ro`,
/// `admin/http`: also their names in a handover), with their addresses as written and
/// what each serves; `clusters`: the contexts of the config's clusters.
pub(super) fn wanted(config: &Config, clusters: &Clusters) -> Vec<(String, String, Serves)> {
    let mut out = Vec::new();
    for (name, c) in &config.clusters {
        let Some(ctx) = clusters.get(name) else {
            continue;
        };
        for (addr, endpoint) in [(&c.listen_rw, Endpoint::ReadWrite), (&c.listen_ro, Endpoint::ReadOnly)] {
            if let Some(addr) = addr {
                out.push((
                    format!("{name}/{endpoint}"),
                    addr.clone(),
                    Serves::Cluster(ctx.clone(), endpoint),
                ));
            }
        }
    }
    if let Some(addr) = &config.admin.http_listen {
        out.push(("admin/http".to_string(), addr.clone(), Serves::Admin));
    }
    out
}

/// One listening socket of this process.
pub(super) struct Listener {
    pub name: String,
    /// The address as the config writes it (a reload compares the new config's).
    pub configured: String,
    pub local: SocketAddr,
    /// A copy of the socket, to pass to a successor (binary upgrade).
    pub fd: OwnedFd,
    /// Sent, or dropped: the accept loop ends and the socket closes.
    stop: watch::Sender<bool>,
}

impl Listener {
    /// Does it listen where `addr` (as a config writes it) says?
    pub fn listens_at(&self, addr: &str) -> bool {
        use std::net::ToSocketAddrs;
        self.configured == addr || addr.to_socket_addrs().is_ok_and(|mut a| a.any(|a| a == self.local))
    }

    /// Stop accepting here (clients already accepted are unaffected).
    pub fn close(self) {
        let _ = self.stop.send(true);
        info!(listener = %self.name, addr = %self.local, "stopped listening");
    }
}

/// What serving clients takes beyond `Shared`: the listening sockets, the workers that
/// run sessions and the control runtime that runs the accept loops. Reloads open and
/// close listeners through it.
pub(super) struct Serving {
    pub listeners: Mutex<Vec<Listener>>,
    pub workers: Arc<Workers>,
    /// The control runtime (accept loops live there, whichever thread reloads).
    pub control: tokio::runtime::Handle,
    /// Set when the process leaves; poked (no change of value) to wake every session
    /// to look whether its cluster was removed.
    pub leaving_tx: watch::Sender<bool>,
    /// One reload at a time (SIGHUP and the console's RELOAD may meet).
    pub reloading: Mutex<()>,
}

impl Serving {
    /// Serve `serves` on `l` (bound and listening) from now on, as `name`.
    pub fn open(
        &self,
        shared: &Arc<Shared>,
        (name, configured): (String, String),
        l: std::net::TcpListener,
        serves: Serves,
    ) -> std::io::Result<SocketAddr> {
        l.set_nonblocking(true)?;
        let local = l.local_addr()?;
        let fd = l.as_fd().try_clone_to_owned()?;
        let (stop, stopped) = watch::channel(false);
        match &serves {
            Serves::Cluster(ctx, endpoint) => {
                info!(cluster = %ctx.name, endpoint = %endpoint, addr = %local, "listening")
            }
            Serves::Admin => info!(addr = %local, "admin HTTP listening"),
        }
        let (shared, workers) = (shared.clone(), self.workers.clone());
        self.control.spawn(async move {
            let registered = match serves {
                // SAFETY: the listener owns its descriptor, open until the AsyncFd drops
                // it or gives it back (`into_inner`), and `as_raw_fd` always returns it.
                Serves::Cluster(ctx, endpoint) => unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
                    .map(|l| {
                        Box::pin(accept_loop(l, ctx, endpoint, shared, workers, stopped))
                            as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
                    }),
                Serves::Admin => TcpListener::from_std(l)
                    .map(|l| Box::pin(crate::admin::http::serve(l, shared, stopped)) as std::pin::Pin<Box<_>>),
            };
            match registered {
                Ok(serving) => serving.await,
                Err(e) => error!(addr = %local, error = %e, "cannot accept on a listening socket"),
            }
        });
        self.listeners.lock().unwrap().push(Listener {
            name,
            configured,
            local,
            fd,
            stop,
        });
        Ok(local)
    }

    /// Copies of every listening socket, for a successor.
    pub fn handoff(&self) -> std::io::Result<Vec<(Listening, OwnedFd)>> {
        self.listeners
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                let named = Listening {
                    name: l.name.clone(),
                    addr: l.local,
                };
                Ok((named, l.fd.try_clone()?))
            })
            .collect()
    }

    /// Forget every listener: their last copies here close (the accept loops end as the
    /// process leaves).
    pub fn forget(&self) {
        self.listeners.lock().unwrap().clear();
    }
}

/// The data path's threads: one single-threaded runtime each. A client's session,
/// and every server connection it uses, live on one worker for good: each socket is
/// registered with that worker's event loop, so serving a request wakes no other thread
/// (the cost that dominated the profile with one shared work-stealing runtime).
pub struct Workers {
    pub(super) handles: Vec<tokio::runtime::Handle>,
    /// Sessions running on each worker: a new client goes to the least busy one.
    sessions: Vec<Arc<AtomicUsize>>,
}

impl Workers {
    pub(super) fn spawn(n: usize) -> anyhow::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        for index in 0..n {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("switchyard-worker-{index}"))
                .spawn(move || {
                    crate::pg::pool::set_worker(index);
                    // I/O and timers only: the signal and process drivers (which
                    // `enable_all` adds) reap child processes at every park.
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                        .expect("a worker runtime");
                    let _ = tx.send(rt.handle().clone());
                    // Runs until the process exits (after `Proxy::shutdown`).
                    rt.block_on(std::future::pending::<()>());
                })
                .context("cannot start a worker thread")?;
            handles.push(rx.recv().context("a worker thread died at start")?);
        }
        info!(workers = n, "worker threads started");
        Ok(Workers {
            sessions: (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect(),
            handles,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.handles.len()
    }

    /// Client connections open now (every worker's sessions, refused ones too).
    pub(super) fn open(&self) -> usize {
        self.sessions.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The least busy worker, and a guard that counts the session there.
    pub(super) fn pick(&self) -> (&tokio::runtime::Handle, SessionCount) {
        let (index, count) = self
            .sessions
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.load(Ordering::Relaxed))
            .expect("at least one worker");
        count.fetch_add(1, Ordering::Relaxed);
        (&self.handles[index], SessionCount(count.clone()))
    }
}

pub(super) struct SessionCount(Arc<AtomicUsize>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept clients and hand each to a worker.
///
/// Out of file descriptors (EMFILE/ENFILE), `accept` fails and the client would wait
/// in the kernel's backlog until its own timeout, unanswered. A reserve descriptor
/// avoids that: it is closed to accept the client, which is then told why it is
/// refused (53300, MySQL 1040), and taken again as soon as a descriptor is free. (The
/// admission's descriptor cap refuses clients before it comes to that; this is for
/// when the estimate is wrong.) Failures are
/// logged once per interval with a count, not every time.
///
/// Told to stop (a reload moved or removed the listener), it first takes the clients
/// already waiting in the socket's backlog, which closing it would refuse.
async fn accept_loop(
    listener: AsyncFd<std::net::TcpListener>,
    ctx: Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    workers: Arc<Workers>,
    mut stop: watch::Receiver<bool>,
) {
    let mut leaving = shared.leaving.clone();
    let failures = crate::proxy::limits::Throttle::default();
    let mut reserve = std::fs::File::open("/dev/null").ok();
    loop {
        // Spent: taken again as soon as a descriptor is free (tried at every turn: the
        // one the refused client frees may go to something else first).
        if reserve.is_none() {
            reserve = std::fs::File::open("/dev/null").ok();
        }
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            // Shutting down, or a successor took the listener (it has its own copy).
            _ = leaving.wait_for(|l| *l) => return,
            _ = stop.changed() => {
                drain_backlog(listener, &ctx, endpoint, &shared, &workers);
                return;
            }
        };
        let (stream, peer, forced) = match accepted {
            // Past the descriptor cap, counting every open client socket (not only the
            // admitted: a burst of new clients would otherwise take the descriptors the
            // pools need before any of them is admitted), a client is refused at once.
            Ok((stream, peer)) if workers.open() >= shared.admissions.descriptor_cap() as usize => {
                (stream, peer, Some(crate::proxy::limits::Refusal::Descriptors))
            }
            Ok((stream, peer)) => (stream, peer, None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) && reserve.is_some() => {
                drop(reserve.take());
                let Ok((stream, peer)) = accept(&listener).await else {
                    reserve = std::fs::File::open("/dev/null").ok();
                    continue;
                };
                (stream, peer, Some(crate::proxy::limits::Refusal::Descriptors))
            }
            Err(e) => {
                if let Some(n) = failures.hit(std::time::Instant::now()) {
                    error!(cluster = %ctx.name, endpoint = %endpoint, error = %e, failures = n,
                           "accept failed (failures: how many since the last such line); raise the file-descriptor limit or lower max_clients");
                }
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The count of failures held back, once accepting works again.
        if let Some(n) = failures.due(std::time::Instant::now()) {
            error!(cluster = %ctx.name, endpoint = %endpoint, failures = n,
                   "accept failed (failures: how many since the last such line); raise the file-descriptor limit or lower max_clients");
        }
        serve_on_worker(stream, peer, forced, (&ctx, endpoint), &shared, &workers);
    }
}

/// The next client, as a non-blocking socket not registered with this (the control)
/// thread's event loop: its session registers it on a worker's. Tokio's own `accept`
/// registers every socket here, and moving it to a worker then costs two more
/// `epoll_ctl` calls per connection (a deregistration here, the worker's registration):
/// the cost applications that connect per request pay most.
async fn accept(listener: &AsyncFd<std::net::TcpListener>) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        let accepted = ready.try_io(|l| {
            // accept4 with SOCK_NONBLOCK: non-blocking from the start, without a
            // further system call.
            let (socket, addr) =
                socket2::SockRef::from(l.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
            let peer = addr
                .as_socket()
                .ok_or_else(|| std::io::Error::other("a TCP listener accepted a non-IP peer"))?;
            Ok((std::net::TcpStream::from(socket), peer))
        });
        if let Ok(result) = accepted {
            return result;
        }
    }
}

/// Run the session of a client accepted at `ctx`'s `endpoint` on the least busy worker.
fn serve_on_worker(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    forced: Option<crate::proxy::limits::Refusal>,
    (ctx, endpoint): (&Arc<ClusterCtx>, Endpoint),
    shared: &Arc<Shared>,
    workers: &Workers,
) {
    let (worker, count) = workers.pick();
    let (ctx, shared) = (ctx.clone(), shared.clone());
    // Boxed: a refusal is rare, and inline it would enlarge every client's task (held
    // here and in the session's first future).
    let forced = forced.map(Box::new);
    worker.spawn(async move {
        let _count = count;
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
            return;
        };
        // The task holds one of these at a time; the others are boxed, so that
        // a PostgreSQL client's task is not as large as the largest of them.
        if ctx.engine == Engine::Mysql {
            Box::pin(crate::mysql::session::serve(
                stream,
                peer,
                ctx,
                endpoint,
                shared,
                forced.map(|f| *f),
            ))
            .await;
            return;
        }
        if let Some(admin) = crate::pg::session::serve(stream, peer, ctx, endpoint, shared.clone(), forced).await {
            Box::pin(crate::admin::console::run(
                admin.stream,
                admin.unread,
                &admin.user,
                &shared,
            ))
            .await;
        }
    });
}

/// A listener told to stop: the clients already in its backlog are served rather than
/// refused when it closes (bounded: the backlog holds only so many).
fn drain_backlog(
    listener: AsyncFd<std::net::TcpListener>,
    ctx: &Arc<ClusterCtx>,
    endpoint: Endpoint,
    shared: &Arc<Shared>,
    workers: &Workers,
) {
    let listener = listener.into_inner();
    for _ in 0..4096 {
        let Ok((stream, peer)) = listener.accept() else {
            return;
        };
        if stream.set_nonblocking(true).is_ok() {
            serve_on_worker(stream, peer, None, (ctx, endpoint), shared, workers);
        }
    }
}
