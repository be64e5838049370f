//! What every session of every cluster shares: the running config, users, clusters,
//! registries (cancels, clients, metrics), each engine's own state (pools) and the shutdown signal. Sessions and the
//! admin interfaces read it; only the app (`app.rs`) builds it and changes the config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::cluster::topology::ClusterSnapshot;
use crate::cluster::ClusterCtx;
use crate::config::Config;
use crate::obs::clients::Clients;
use crate::obs::metrics::Metrics;
use crate::proxy::cancel::CancelRegistry;

/// The clusters by name.
pub type Clusters = BTreeMap<String, Arc<ClusterCtx>>;

/// What every engine's session settles as a client arrives (`Shared::arrival`).
pub struct Arrival {
    /// The running config, read once for the session's start.
    pub config: Arc<Config>,
    /// Bound on the TLS handshake, login and authentication together.
    pub login_timeout: std::time::Duration,
    /// The cluster's `client_tls`, with `[tls]` set or not.
    pub tls_mode: crate::config::ClientTls,
    /// The acceptor, when TLS is offered to this client.
    pub tls: Option<crate::proxy::stream::TlsSetup>,
}

/// What one engine keeps for the whole process. Held as `Any` so that this layer names
/// no engine; the engine finds its own with `Shared::engine`.
pub trait EngineState: Send + Sync + 'static {
    /// `config` is about to become the running config (startup, reload).
    fn config_changed(&self, config: &Config);
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Where the outcome of an operator's upgrade request goes: the successor's pid, or why
/// it failed (this process then serves on).
pub type UpgradeReply = tokio::sync::oneshot::Sender<Result<u32, String>>;

/// Re-reads the config and applies it (installed by the app: it owns the monitors).
pub type Reloader = Box<dyn Fn(&Shared) -> Result<String, String> + Send + Sync>;

/// What every session of every cluster shares.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    pub config_path: Option<PathBuf>,
    /// The clusters served now: replaced whole when a reload adds or removes one (a
    /// session keeps the `ClusterCtx` it started with).
    clusters: RwLock<Arc<Clusters>>,
    pub cancels: Arc<CancelRegistry>,
    /// Clients counted against `max_clients` (proxy, cluster, user).
    pub admissions: Arc<crate::proxy::limits::Admissions>,
    pub clients: Arc<Clients>,
    pub metrics: Arc<Metrics>,
    /// Per-statement statistics, one table per worker thread.
    pub digests: Arc<crate::obs::digest::Digests>,
    pub shutdown: watch::Receiver<bool>,
    /// True once this process stops accepting clients: it shuts down (set after
    /// `shutdown`), or a successor took its listeners (set after `successor`). Accept
    /// loops and the admin HTTP server end; sessions between transactions look at both.
    pub leaving: watch::Receiver<bool>,
    /// Names the leaving channel's per-thread repeaters (`shutdown_local`).
    leaving_key: u64,
    /// The process this one hands its clients to (binary upgrade), once it is ready.
    pub successor: OnceLock<Arc<crate::proxy::handover::Successor>>,
    /// Where operators ask for a binary upgrade (`POST /upgrade`, the console's
    /// `UPGRADE`): the app carries it out and answers with the successor's pid or why not.
    pub upgrades: OnceLock<tokio::sync::mpsc::UnboundedSender<UpgradeReply>>,
    pub started: Instant,
    reloader: OnceLock<Reloader>,
    /// Client TLS, built from `[tls]` (rebuilt on reload: new certificates for new
    /// connections, sessions keep theirs).
    tls: RwLock<Option<crate::proxy::stream::TlsSetup>>,
    /// What each engine keeps for the whole process (`pg::PgShared`: users' verifiers,
    /// auth_query's cache, pools of server connections), told of every new config.
    engines: Vec<Box<dyn EngineState>>,
    /// This proxy's coordinator when `[coordination]` is configured (`ha::coord::get`;
    /// set once at start). `Any` because the control plane sits above this layer.
    pub coordinator: OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// The process-wide state of one engine (`T`: its type, e.g. `pg::PgShared`).
    pub fn engine<T: 'static>(&self) -> &T {
        self.engines
            .iter()
            .find_map(|e| e.as_any().downcast_ref())
            .expect("the engine's state is installed at start")
    }

    /// Told when the process begins to leave (shutdown, or a successor is ready),
    /// through this worker thread's repeater of `leaving` (`local_watch`): for sessions,
    /// which wait on it between transactions and then look at `shutdown` and
    /// `successor`. A session that starts after the signal looks at them itself.
    pub fn shutdown_local(&self) -> crate::local_watch::Receiver {
        crate::local_watch::repeat(self.leaving_key, || self.leaving.clone())
    }

    pub fn cluster_snapshots(&self) -> Vec<Arc<ClusterSnapshot>> {
        self.clusters().values().map(|c| c.state.snapshot()).collect()
    }

    /// Every cluster served now (a reload may add or remove some afterwards).
    pub fn clusters(&self) -> Arc<Clusters> {
        self.clusters.read().unwrap().clone()
    }

    /// The cluster called `name`, if it is served now.
    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterCtx>> {
        self.clusters.read().unwrap().get(name).cloned()
    }

    /// Serve `clusters` from now on (a reload added or removed some).
    pub fn set_clusters(&self, clusters: Clusters) {
        *self.clusters.write().unwrap() = Arc::new(clusters);
    }

    /// `workers`: worker threads of the data path, among which pool sizes are shared.
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        clusters: Clusters,
        (shutdown, leaving): (watch::Receiver<bool>, watch::Receiver<bool>),
        engines: Vec<Box<dyn EngineState>>,
    ) -> Result<Shared, String> {
        let tls = config
            .tls
            .as_ref()
            .map(crate::proxy::stream::acceptor)
            .transpose()
            .map_err(|e| format!("cannot set up client TLS: {e}"))?;
        // One table per worker, one for sessions run elsewhere (tests, the admin).
        let digests = Arc::new(crate::obs::digest::Digests::new(
            config.proxy.worker_threads() + 1,
            config.telemetry.query_digests,
            config.telemetry.max_digests,
        ));
        let t = &config.telemetry;
        let traces = crate::obs::trace::TraceSettings::resolve(
            t.otlp_endpoint.as_deref(),
            t.service_name.as_deref(),
            t.sample_ratio,
            |k| std::env::var(k).ok(),
        );
        if let Some(settings) = traces {
            tracing::info!(url = %settings.url, service = %settings.service_name, sample_ratio = settings.sample_ratio, "sending traces over OTLP/HTTP");
            let tracer = crate::obs::trace::Tracer::start(settings)
                .map_err(|e| format!("cannot start the trace exporter: {e}"))?;
            let _ = digests.tracer.set(tracer);
        }
        Ok(Shared {
            config: RwLock::new(Arc::new(config)),
            config_path,
            clusters: RwLock::new(Arc::new(clusters)),
            cancels: Arc::new(CancelRegistry::default()),
            admissions: Arc::default(),
            clients: Arc::new(Clients::default()),
            metrics: Arc::new(Metrics::default()),
            digests,
            shutdown,
            leaving,
            leaving_key: crate::local_watch::key(),
            successor: OnceLock::new(),
            upgrades: OnceLock::new(),
            started: Instant::now(),
            reloader: OnceLock::new(),
            tls: RwLock::new(tls),
            engines,
            coordinator: OnceLock::new(),
        })
    }

    /// A client arrives at `cluster`: no Nagle delay on its socket, its login's bound,
    /// and whether TLS is offered to it.
    pub fn arrival(&self, tcp: &tokio::net::TcpStream, cluster: &ClusterCtx) -> Arrival {
        let _ = tcp.set_nodelay(true);
        let config = self.config();
        let tls_mode = cluster.settings().client_tls(config.tls.is_some());
        let tls = match tls_mode {
            crate::config::ClientTls::Disable => None,
            _ => self.tls(),
        };
        Arrival {
            login_timeout: std::time::Duration::from_millis(config.proxy.client_login_timeout_ms),
            config,
            tls_mode,
            tls,
        }
    }

    /// The client TLS acceptor and channel binding data, if `[tls]` is configured.
    pub fn tls(&self) -> Option<crate::proxy::stream::TlsSetup> {
        self.tls.read().unwrap().clone()
    }

    /// Load `[tls]` of `config` again (before `set_config`); the running acceptor stays
    /// if the files are unreadable.
    pub fn reload_tls(&self, config: &Config) -> Result<(), String> {
        let tls = config.tls.as_ref().map(crate::proxy::stream::acceptor).transpose()?;
        *self.tls.write().unwrap() = tls;
        Ok(())
    }

    /// Make `config` the running config (each engine derives what it needs once).
    pub fn set_config(&self, config: Config) {
        let config = Arc::new(config);
        *self.config.write().unwrap() = config.clone();
        self.digests
            .configure(config.telemetry.query_digests, config.telemetry.max_digests);
        for e in &self.engines {
            e.config_changed(&config);
        }
    }

    /// What a session of `cluster` that must end is told: the cluster was removed by a
    /// reload, or the process is shutting down.
    pub fn ending(&self, cluster: &ClusterCtx) -> crate::error::Error {
        match cluster.retiring() {
            true => crate::error::Error::cluster_removed(&cluster.name),
            false => crate::error::Error::shutdown(),
        }
    }

    /// Resolves when the sessions of `cluster` must end at their next boundary (the
    /// process shuts down, or a reload removed the cluster), with what to tell them.
    pub async fn closing(&self, cluster: &ClusterCtx) -> crate::error::Error {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => {}
            _ = cluster.retirement() => {}
        }
        self.ending(cluster)
    }

    /// Ask the app for a binary upgrade; Ok(the new process's pid) once it serves.
    pub async fn upgrade(&self) -> Result<u32, String> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.upgrades
            .get()
            .ok_or("upgrades are not available in this process")?
            .send(reply)
            .map_err(|_| "this process no longer takes upgrade requests (it is leaving)")?;
        outcome
            .await
            .map_err(|_| "this process stopped before the upgrade finished".to_string())?
    }

    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.reloader.set(reloader);
    }

    /// Re-read the config file and apply what can change while running (SIGHUP, RELOAD).
    pub fn reload(&self) -> Result<String, String> {
        match self.reloader.get() {
            Some(reload) => reload(self),
            None => Err("reload is not available".into()),
        }
    }
}
