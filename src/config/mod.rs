//! The TOML configuration: the contract in `docs` (keys may be added, never renamed)
//! plus validation that names the offending key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// Fill `value` from `file` or `env` when one is given (only one of the three may be).
fn secret(
    key: &str,
    value: &mut Option<String>,
    file: &Option<std::path::PathBuf>,
    env: &Option<String>,
) -> Result<(), ConfigError> {
    if value.is_some() as u8 + file.is_some() as u8 + env.is_some() as u8 > 1 {
        return Err(invalid(key, format!("give only one of {key}, {key}_file, {key}_env")));
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| invalid(format!("{key}_file"), format!("cannot read {}: {e}", f.display())))?;
        *value = Some(text.trim_end_matches(['\n', '\r']).to_string());
    }
    if let Some(var) = env {
        let v = std::env::var(var)
            .map_err(|_| invalid(format!("{key}_env"), format!("environment variable {var} is not set")))?;
        *value = Some(v);
    }
    Ok(())
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The database name that asks for the admin console instead of a cluster (`psql -d
/// switchyard` on any PostgreSQL listener).
pub const ADMIN_DATABASE: &str = "switchyard";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// Several instances agreeing through etcd; absent: this instance decides alone.
    #[serde(default)]
    pub coordination: Option<CoordinationConfig>,
    /// The certificate clients see (TLS on the listeners); absent: no client TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Users not in `[[users]]` are looked up on the cluster's servers.
    #[serde(default)]
    pub auth_query: Option<AuthQueryConfig>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// What the proxy records about the statements it relays.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Per-statement statistics (`/queries`, `SHOW QUERIES`, `switchyard top`).
    #[serde(default = "default::telemetry_query_digests")]
    pub query_digests: bool,
    /// Digests kept per worker thread; past it the least-called tenth is evicted.
    #[serde(default = "default::telemetry_max_digests")]
    pub max_digests: usize,
    /// OTLP/HTTP receiver of traces (`http://host:4318`); else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; neither: no traces.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The traces' `service.name`; else `OTEL_SERVICE_NAME`, else "switchyard".
    #[serde(default)]
    pub service_name: Option<String>,
    /// Share of statements without a sampled parent that are traced.
    #[serde(default = "default::telemetry_sample_ratio")]
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> TelemetryConfig {
        TelemetryConfig {
            query_digests: default::telemetry_query_digests(),
            max_digests: default::telemetry_max_digests(),
            otlp_endpoint: None,
            service_name: None,
            sample_ratio: default::telemetry_sample_ratio(),
        }
    }
}

/// PgBouncer's `auth_user` + `auth_query`: a client whose user is not in `[[users]]`
/// is checked against the SCRAM verifier this query returns from the cluster it
/// connects to (a node that is up, the primary first); results are cached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthQueryConfig {
    /// Who runs the query: a superuser, or a role allowed to run a SECURITY DEFINER
    /// function that reads `pg_authid`.
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Takes the user name as `$1`; returns (name, verifier) or no row.
    #[serde(default = "default::auth_query_query")]
    pub query: String,
    #[serde(default = "default::auth_query_database")]
    pub database: String,
    /// How long a verifier is used before it is looked up again (a lookup that fails
    /// then keeps the last one: a failover does not lock users out).
    #[serde(default = "default::auth_query_cache_s")]
    pub cache_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    /// Client certificates signed by this CA are verified when presented.
    #[serde(default)]
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// TLS toward a cluster's servers, as libpq's `sslmode`: `prefer` and `require`
/// encrypt without checking who the server is; the verify modes check the certificate
/// against `server_ca_file` (and, for `verify-full`, the node's host name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        })
    }
}

/// Whether a cluster's listeners take TLS from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientTls {
    /// SSLRequest answered `N`.
    Disable,
    /// TLS when the client asks for it; plaintext otherwise.
    Allow,
    /// Plaintext clients are refused before authentication.
    Require,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    /// etcd client URLs (`http://host:2379`), tried in order.
    pub etcd: Vec<String>,
    /// This instance's name, unique among the instances of one prefix.
    pub instance: String,
    /// Keys live under this prefix (several Switchyard groups may share one etcd).
    #[serde(default = "default::coordination_prefix")]
    pub prefix: String,
    /// The lease of this instance's keys, in seconds: an instance out of touch with
    /// etcd for longer stops routing writes, and another may take over as leader.
    #[serde(default = "default::coordination_lease_s")]
    pub lease_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default::health_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default::health_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default::health_rise")]
    pub rise: u32,
    #[serde(default = "default::health_fall")]
    pub fall: u32,
    /// Login used by the health monitor; defaults to the first `[[users]]` entry.
    pub user: Option<String>,
    pub password: Option<String>,
    /// The password read from this file (trailing newline dropped) instead.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// The password taken from this environment variable instead.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Database the monitor connects to.
    #[serde(default = "default::health_database")]
    pub database: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: default::health_interval_ms(),
            timeout_ms: default::health_timeout_ms(),
            rise: default::health_rise(),
            fall: default::health_fall(),
            user: None,
            password: None,
            password_file: None,
            password_env: None,
            database: default::health_database(),
        }
    }
}

impl HealthConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Operator interfaces.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `/health`, `/status`, `/metrics`, the status page; off when unset.
    pub http_listen: Option<String>,
    /// A bearer token required by the admin HTTP endpoint for everything but `/health`
    /// and the Patroni-style role checks; from the config, a file or the environment.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
}

/// Settings of the client-facing side that are not per cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// A client that has not finished startup and authentication by then is dropped
    /// (PostgreSQL's `authentication_timeout`).
    #[serde(default = "default::proxy_client_login_timeout_ms")]
    pub client_login_timeout_ms: u64,
    /// Largest protocol message accepted from a client. Messages are streamed, not
    /// buffered, so this is a sanity limit, not a memory reservation.
    #[serde(default = "default::proxy_max_message_bytes")]
    pub max_message_bytes: u32,
    /// On SIGTERM/SIGINT, how long sessions in a transaction may take to finish.
    #[serde(default = "default::proxy_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// Worker threads of the data path (0: one per core). `SWITCHYARD_THREADS` in the
    /// environment overrides it. Pool sizes are shared among them.
    #[serde(default)]
    pub threads: usize,
    /// Clients connected at once, all clusters together; the next one is refused with
    /// SQLSTATE 53300 (MySQL 1040). Admin console logins are not counted.
    #[serde(default = "default::proxy_max_clients")]
    pub max_clients: u32,
    /// One info line per client session that starts (PgBouncer's `log_connections`).
    /// Off for applications that connect per request, whose logs would be mostly these
    /// lines; the sessions are still counted in `/metrics`.
    #[serde(default = "default::proxy_log_connections")]
    pub log_connections: bool,
}

impl ProxyConfig {
    /// Worker threads to run: `SWITCHYARD_THREADS`, else `threads`, else one per core.
    pub fn worker_threads(&self) -> usize {
        std::env::var("SWITCHYARD_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .or(Some(self.threads).filter(|n| *n > 0))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            client_login_timeout_ms: default::proxy_client_login_timeout_ms(),
            max_message_bytes: default::proxy_max_message_bytes(),
            shutdown_timeout_ms: default::proxy_shutdown_timeout_ms(),
            threads: 0,
            max_clients: default::proxy_max_clients(),
            log_connections: default::proxy_log_connections(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext, or a SCRAM verifier (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`,
    /// as `pg_authid` stores it): then clients are checked against it and servers
    /// holding the same verifier are answered with the key a client's login reveals.
    pub password: Option<String>,
    /// The password read from this file (trailing newline dropped) instead.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// The password taken from this environment variable instead.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default::user_auth")]
    pub auth: AuthMethod,
    /// May use the admin console (database `switchyard`).
    #[serde(default)]
    pub admin: bool,
    /// Clients of this user connected at once, over all clusters.
    #[serde(default)]
    pub max_clients: Option<u32>,
    /// This user's own `pool_size` (transaction pooling), in place of the cluster's.
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// This user's server connections per node, on every cluster.
    #[serde(default)]
    pub max_server_connections: Option<u32>,
    /// This user's own value of the cluster keys of the same names.
    #[serde(default)]
    pub client_idle_timeout_ms: Option<u64>,
    #[serde(default)]
    pub idle_transaction_timeout_ms: Option<u64>,
    #[serde(default)]
    pub query_timeout_ms: Option<u64>,
}

impl UserConfig {
    /// A user with a password and nothing else set (auth_query's users, tests).
    pub fn with_password(name: &str, password: &str, auth: AuthMethod) -> UserConfig {
        UserConfig {
            name: name.to_string(),
            password: Some(password.to_string()),
            password_file: None,
            password_env: None,
            auth,
            admin: false,
            max_clients: None,
            pool_size: None,
            max_server_connections: None,
            client_idle_timeout_ms: None,
            idle_transaction_timeout_ms: None,
            query_timeout_ms: None,
        }
    }
}

/// What the cluster's servers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Postgresql,
    /// MySQL or MariaDB (the MySQL client/server protocol; `src/mysql/`).
    Mysql,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Postgresql => "postgresql",
            Engine::Mysql => "mysql",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadBalance {
    Priority,
    RoundRobin,
    LeastConnections,
}

/// What the rw endpoint does when more than one node reports itself primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitBrainRule {
    /// Refuse every write until only one primary is left.
    Refuse,
    /// The primary on the strictly highest timeline wins (a promoted standby moves to a
    /// new timeline; an old primary restarted without `pg_rewind` stays on the old one).
    /// A tie is refused.
    NewestTimeline,
}

/// Who promotes a standby when the primary is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverMode {
    /// Someone else promotes (Patroni, repmgr, an operator); Switchyard follows.
    Follow,
    /// Switchyard promotes the most caught-up standby itself (needs `manager`).
    Automatic,
}

/// Read-your-writes for reads sent to standbys (split reads, the ro endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadYourWrites {
    /// After a client's write commits, its reads go only to standbys that replayed it
    /// (waiting up to `causal_wait_ms`, else the primary).
    Session,
    /// As `session`, but every connection of one user to one database shares the floor:
    /// a write on one connection is seen by reads on the next (transaction mode). Costs
    /// read scaling under steady writes: reads then mostly go to the primary.
    User,
    /// Reads go to any standby within `max_replica_lag_ms` (causal tokens still apply).
    Off,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `postgresql` (default) or `mysql` (MySQL / MariaDB).
    #[serde(default)]
    pub engine: Engine,
    pub listen_rw: Option<String>,
    pub listen_ro: Option<String>,
    #[serde(default = "default::cluster_max_replica_lag_ms")]
    pub max_replica_lag_ms: u64,
    #[serde(default = "default::cluster_pool_mode")]
    pub pool_mode: PoolMode,
    #[serde(default = "default::cluster_read_balance")]
    pub read_balance: ReadBalance,
    /// Bound on the whole connect phase of a new session: trying candidates and waiting
    /// for a usable node to appear. Then the client gets an error naming every node.
    #[serde(default = "default::cluster_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bound on one server login attempt (TCP connect, login, role check); a frozen
    /// node costs at most this before the next candidate is tried.
    #[serde(default = "default::cluster_server_login_timeout_ms")]
    pub server_login_timeout_ms: u64,
    #[serde(default = "default::cluster_split_brain")]
    pub split_brain: SplitBrainRule,
    /// Transaction mode: server connections per (node, database, user).
    #[serde(default = "default::cluster_pool_size")]
    pub pool_size: u32,
    /// Idle connections kept open even past the idle timeout.
    #[serde(default)]
    pub min_pool_size: u32,
    #[serde(default = "default::cluster_server_idle_timeout_ms")]
    pub server_idle_timeout_ms: u64,
    #[serde(default = "default::cluster_server_lifetime_ms")]
    pub server_lifetime_ms: u64,
    /// How long a transaction waits for a free server connection before SQLSTATE 53300.
    #[serde(default = "default::cluster_checkout_timeout_ms")]
    pub checkout_timeout_ms: u64,
    /// Transaction mode, rw endpoint: send reads outside a transaction to standbys.
    #[serde(default)]
    pub read_write_split: bool,
    /// Whether a client's reads on a standby see its own earlier writes.
    #[serde(default = "default::cluster_read_your_writes")]
    pub read_your_writes: ReadYourWrites,
    /// How long a read that must be fresh waits for a standby to replay far enough
    /// before it goes to the primary instead. Default 0: straight to the primary, which
    /// measured cheaper than waiting (bench/results: the wait is replication latency,
    /// paid by the client; the primary read is paid by the primary).
    #[serde(default)]
    pub causal_wait_ms: u64,
    /// Functions (besides the built-in list) that never write, so a SELECT calling
    /// them may go to a standby.
    #[serde(default)]
    pub read_only_functions: Vec<String>,
    /// A superuser login for promotion, switchover and repointing standbys.
    #[serde(default)]
    pub manager: Option<ManagerConfig>,
    /// Bound on a whole planned switchover (new transactions are held meanwhile).
    #[serde(default = "default::cluster_switchover_timeout_ms")]
    pub switchover_timeout_ms: u64,
    /// `automatic`: promote a standby when the primary is down by the health rules.
    #[serde(default = "default::cluster_failover")]
    pub failover: FailoverMode,
    /// Automatic failover refuses a standby that received this many bytes of WAL less
    /// than the old primary was last seen to have written.
    #[serde(default = "default::cluster_failover_max_lag_bytes")]
    pub failover_max_lag_bytes: u64,
    /// At most one automatic failover per this many seconds (no flapping).
    #[serde(default = "default::cluster_failover_cooldown_s")]
    pub failover_cooldown_s: u64,
    /// While the cluster has no primary, how long a new rw connection or transaction
    /// waits for one (a failover in progress) before it gets an error. Default: 10000
    /// with `failover = "automatic"` (a promotion is coming), else `connect_timeout_ms`.
    #[serde(default)]
    pub failover_hold_ms: Option<u64>,
    /// Run (by `sh -c`) after a switchover or failover to make the old primary a
    /// standby of the new one (pg_rewind, standby.signal, restart). Gets
    /// SWITCHYARD_CLUSTER, SWITCHYARD_OLD_PRIMARY, SWITCHYARD_OLD_HOST/PORT,
    /// SWITCHYARD_NEW_PRIMARY, SWITCHYARD_NEW_HOST/PORT in its environment.
    #[serde(default)]
    pub demote_command: Option<String>,
    /// TLS from clients: default `allow` when `[tls]` is set, else `disable`.
    #[serde(default)]
    pub client_tls: Option<ClientTls>,
    /// TLS toward the servers (default `prefer`, as libpq).
    #[serde(default)]
    pub server_tls: ServerTlsMode,
    /// CA certificates (PEM) the servers' certificates are checked against.
    #[serde(default)]
    pub server_ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// Clients of this cluster connected at once (both endpoints).
    #[serde(default)]
    pub max_clients: Option<u32>,
    /// Pool sizes for some users and databases (transaction pooling), the most specific
    /// entry winning.
    #[serde(default)]
    pub pools: Vec<PoolSizeConfig>,
    /// Transaction pooling: connections a pool may open past `pool_size` for a client
    /// that has waited `reserve_pool_timeout_ms`.
    #[serde(default)]
    pub reserve_pool_size: u32,
    #[serde(default = "default::cluster_reserve_pool_timeout_ms")]
    pub reserve_pool_timeout_ms: u64,
    /// Server connections per node, all users and databases and both endpoints together.
    #[serde(default)]
    pub max_server_connections: Option<u32>,
    /// Server logins in flight at once per node; more wait their turn in arrival order.
    #[serde(default = "default::cluster_max_server_logins")]
    pub max_server_logins: u32,
    /// A client idle between transactions this long is disconnected (0: never).
    #[serde(default)]
    pub client_idle_timeout_ms: u64,
    /// A client idle inside a transaction this long is disconnected and its transaction
    /// rolled back (0: never).
    #[serde(default)]
    pub idle_transaction_timeout_ms: u64,
    /// A query running this long is cancelled on its server (0: never).
    #[serde(default)]
    pub query_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// MySQL: the login a rejoined old primary replicates with (`CHANGE MASTER TO
    /// MASTER_USER`); without it an old primary is fenced but not rejoined. Replicas that
    /// are only repointed keep the login they have.
    #[serde(default)]
    pub replication_user: Option<String>,
    #[serde(default)]
    pub replication_password: Option<String>,
    #[serde(default)]
    pub replication_password_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub replication_password_env: Option<String>,
}

impl ClusterConfig {
    /// The effective client TLS mode (`tls_configured`: `[tls]` is set).
    pub fn client_tls(&self, tls_configured: bool) -> ClientTls {
        self.client_tls.unwrap_or(if tls_configured {
            ClientTls::Allow
        } else {
            ClientTls::Disable
        })
    }

    pub fn failover_hold(&self) -> Duration {
        Duration::from_millis(self.failover_hold_ms.unwrap_or(match self.failover {
            FailoverMode::Automatic => 10_000,
            FailoverMode::Follow => self.connect_timeout_ms,
        }))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn server_login_timeout(&self) -> Duration {
        Duration::from_millis(self.server_login_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub host: String,
    #[serde(default = "default::node_port")]
    pub port: u16,
}

impl NodeConfig {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl UserConfig {
    /// The `password` is a SCRAM verifier, not a password.
    pub fn has_scram_verifier(&self) -> bool {
        self.password
            .as_deref()
            .is_some_and(|p| p.starts_with("SCRAM-SHA-256$"))
    }

    /// The password, unless what is configured is a SCRAM verifier.
    pub fn plaintext_password(&self) -> Option<&str> {
        self.password.as_deref().filter(|_| !self.has_scram_verifier())
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.resolve_secrets()?;
        config.validate()?;
        Ok(config)
    }

    /// Passwords and the admin token given as `*_file` or `*_env` are read into their
    /// plain field, so that nothing else needs to know where they came from.
    fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        let h = &mut self.health;
        secret("health.password", &mut h.password, &h.password_file, &h.password_env)?;
        let a = &mut self.admin;
        secret("admin.token", &mut a.token, &a.token_file, &a.token_env)?;
        for (i, u) in self.users.iter_mut().enumerate() {
            secret(
                &format!("users[{i}].password"),
                &mut u.password,
                &u.password_file,
                &u.password_env,
            )?;
        }
        if let Some(q) = self.auth_query.as_mut() {
            secret(
                "auth_query.password",
                &mut q.password,
                &q.password_file,
                &q.password_env,
            )?;
        }
        for (name, c) in self.clusters.iter_mut() {
            if let Some(m) = c.manager.as_mut() {
                secret(
                    &format!("clusters.{name}.manager.password"),
                    &mut m.password,
                    &m.password_file,
                    &m.password_env,
                )?;
                secret(
                    &format!("clusters.{name}.manager.replication_password"),
                    &mut m.replication_password,
                    &m.replication_password_file,
                    &m.replication_password_env,
                )?;
            }
        }
        Ok(())
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// (user, password) the health monitor logs in with.
    pub fn health_login(&self) -> (String, Option<String>) {
        match &self.health.user {
            Some(u) => {
                let pw = self
                    .health
                    .password
                    .clone()
                    .or_else(|| self.user(u).and_then(|c| c.plaintext_password().map(str::to_string)));
                (u.clone(), pw)
            }
            None => match self.users.first() {
                Some(u) => (
                    u.name.clone(),
                    self.health
                        .password
                        .clone()
                        .or_else(|| u.plaintext_password().map(str::to_string)),
                ),
                // Validation requires health.user then.
                None => ("postgres".into(), self.health.password.clone()),
            },
        }
    }
}

mod pools;
pub use pools::{ClientTimeouts, PoolSettings, PoolSizeConfig};

mod validate;

#[cfg(test)]
mod tests;

/// Defaults of keys that are not their type's default (`default.rs`).
mod default;
