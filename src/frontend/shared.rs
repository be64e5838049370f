//! What every session of every cluster shares: the running config, users, clusters,
//! registries (cancels, clients, pools, metrics) and the shutdown signal. Sessions and the
//! admin interfaces read it; only the app (`app.rs`) builds it and changes the config.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::backend::pool::Pools;
use crate::cluster::topology::ClusterSnapshot;
use crate::cluster::ClusterCtx;
use crate::config::Config;
use crate::frontend::auth::Verifier;
use crate::frontend::auth_query::AuthQuery;
use crate::frontend::cancel::CancelRegistry;
use crate::obs::clients::Clients;
use crate::obs::metrics::Metrics;

/// Re-reads the config and applies it (installed by the app: it owns the monitors).
pub type Reloader = Box<dyn Fn(&Shared) -> Result<String, String> + Send + Sync>;

/// What every session of every cluster shares.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    verifiers: RwLock<Arc<HashMap<String, Verifier>>>,
    pub config_path: Option<PathBuf>,
    pub clusters: BTreeMap<String, Arc<ClusterCtx>>,
    pub cancels: Arc<CancelRegistry>,
    pub clients: Arc<Clients>,
    pub metrics: Arc<Metrics>,
    pub pools: Pools,
    pub shutdown: watch::Receiver<bool>,
    /// Names the shutdown channel's per-thread repeaters (`shutdown_local`).
    shutdown_key: u64,
    pub started: Instant,
    reloader: OnceLock<Reloader>,
    /// Client TLS, built from `[tls]` (rebuilt on reload: new certificates for new
    /// connections, sessions keep theirs).
    tls: RwLock<Option<crate::frontend::tls::TlsSetup>>,
    /// Users looked up on the servers (`[auth_query]`), cached.
    pub auth_query: AuthQuery,
}

/// Each user's verifier; `old`: the running ones, whose learned SCRAM keys are kept
/// where the user's verifier did not change.
fn verifiers(config: &Config, old: Option<&HashMap<String, Verifier>>) -> HashMap<String, Verifier> {
    config
        .users
        .iter()
        .map(|u| {
            let mut v = Verifier::new(u);
            if let Some(o) = old.and_then(|m| m.get(&u.name)) {
                v.carry_over(o);
            }
            (u.name.clone(), v)
        })
        .collect()
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    pub fn verifiers(&self) -> Arc<HashMap<String, Verifier>> {
        self.verifiers.read().unwrap().clone()
    }

    /// Told when shutdown begins, through this worker thread's repeater of the channel
    /// (`local_watch`): for sessions, which wait on it between transactions. A session
    /// that starts after the signal looks at `shutdown` itself.
    pub fn shutdown_local(&self) -> watch::Receiver<()> {
        crate::local_watch::repeat(self.shutdown_key, || self.shutdown.clone())
    }

    pub fn cluster_snapshots(&self) -> Vec<Arc<ClusterSnapshot>> {
        self.clusters.values().map(|c| c.state.snapshot()).collect()
    }

    /// `workers`: worker threads of the data path, among which pool sizes are shared.
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        clusters: BTreeMap<String, Arc<ClusterCtx>>,
        shutdown: watch::Receiver<bool>,
        workers: usize,
    ) -> Result<Shared, String> {
        let tls = config.tls.as_ref().map(crate::frontend::tls::acceptor).transpose()?;
        Ok(Shared {
            verifiers: RwLock::new(Arc::new(verifiers(&config, None))),
            config: RwLock::new(Arc::new(config)),
            config_path,
            clusters,
            cancels: Arc::new(CancelRegistry::default()),
            clients: Arc::new(Clients::default()),
            metrics: Arc::new(Metrics::default()),
            pools: Pools::new(workers),
            shutdown,
            shutdown_key: crate::local_watch::key(),
            started: Instant::now(),
            reloader: OnceLock::new(),
            tls: RwLock::new(tls),
            auth_query: AuthQuery::default(),
        })
    }

    /// The client TLS acceptor and channel binding data, if `[tls]` is configured.
    pub fn tls(&self) -> Option<crate::frontend::tls::TlsSetup> {
        self.tls.read().unwrap().clone()
    }

    /// Load `[tls]` of `config` again (before `set_config`); the running acceptor stays
    /// if the files are unreadable.
    pub fn reload_tls(&self, config: &Config) -> Result<(), String> {
        let tls = config.tls.as_ref().map(crate::frontend::tls::acceptor).transpose()?;
        *self.tls.write().unwrap() = tls;
        Ok(())
    }

    /// Make `config` the running config (users' verifiers derived from it once).
    pub fn set_config(&self, config: Config) {
        let mut current = self.verifiers.write().unwrap();
        *current = Arc::new(verifiers(&config, Some(&current)));
        *self.config.write().unwrap() = Arc::new(config);
        self.auth_query.clear();
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
