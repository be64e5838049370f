//! PostgreSQL's health probe for the monitor loop (`cluster::health::run`): one
//! tokio-postgres connection per node, one query (`CHECK_SQL`) answering role, WAL
//! position, lag, timeline and whether a standby's WAL receiver streams; the system
//! identifier once per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};
use tracing::warn;

use crate::cluster::health::{run, Login, Observer, Probe};
use crate::cluster::topology::{ClusterState, Observation, Role};
use crate::config::HealthConfig;
use crate::tls::ServerTls;

/// One round trip answers everything: role, lag, WAL position, timeline.
/// The standby's own lag figure (0 when everything received has been replayed, else the
/// age of the last replayed transaction) is only a fallback: the topology measures lag
/// from the primary's WAL positions (`ClusterState::refresh_time_lag`).
/// The timeline of a primary is the first 8 hex digits of its current WAL file name; a
/// standby's is the one its WAL receiver streams. `streaming`: whether a standby's WAL
/// receiver is streaming (NULL when the receiver exists but its status is hidden from a
/// health user without `pg_read_all_stats`).
const CHECK_SQL: &str = "SELECT pg_is_in_recovery() AS standby,
  CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text AS lsn,
  (CASE WHEN NOT pg_is_in_recovery() THEN 0
        WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
        ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) * 1000, 0) END)::float8 AS lag_ms,
  CASE WHEN pg_is_in_recovery()
       THEN (SELECT max(received_tli) FROM pg_stat_wal_receiver WHERE status = 'streaming')
       ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END AS timeline,
  CASE WHEN pg_is_in_recovery()
       THEN (SELECT CASE WHEN count(*) = 0 THEN false
                         WHEN bool_and(status IS NULL) THEN NULL
                         ELSE bool_or(status = 'streaming') END
             FROM pg_stat_wal_receiver) END AS streaming";

/// Asked once per health connection: every node of a cluster has the same one.
const SYSTEM_ID_SQL: &str = "SELECT system_identifier::text FROM pg_control_system()";

pub struct Target {
    pub cluster: Arc<ClusterState>,
    pub node: String,
    pub host: String,
    pub port: u16,
    /// The cluster's `server_tls` (a certificate that fails it makes the node Down).
    pub tls: Arc<ServerTls>,
}

struct Session {
    client: Client,
    check: Statement,
    system_id: Option<u64>,
    task: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // A frozen server would keep the connection task waiting forever.
        self.task.abort();
    }
}

/// PostgreSQL's probe: one tokio-postgres connection, `CHECK_SQL`.
struct PgProbe {
    target: Target,
    login: Arc<Login>,
    session: Option<Session>,
    warned_hidden: bool,
}

impl Probe for PgProbe {
    async fn check(&mut self) -> Result<Observation, String> {
        check(&self.target, &self.login, &mut self.session).await
    }

    fn reset(&mut self) {
        self.session = None;
    }

    fn inspect(&mut self, obs: &Observation) {
        if obs.role == Role::Standby && obs.streaming.is_none() && !self.warned_hidden {
            self.warned_hidden = true;
            warn!(cluster = %self.target.cluster.name, node = %self.target.node, user = %self.login.user,
                  "the health user cannot see pg_stat_wal_receiver (grant it pg_monitor): a standby that stops following the primary after a failover cannot be recognised, and may serve stale reads until its lag passes max_replica_lag_ms");
        }
    }
}

pub fn spawn(
    target: Target,
    cfg: HealthConfig,
    login: Arc<Login>,
    observer: Observer,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let (cluster, node) = (target.cluster.clone(), target.node.clone());
    let probe = PgProbe {
        target,
        login,
        session: None,
        warned_hidden: false,
    };
    run(cluster, node, probe, cfg, observer, shutdown)
}

async fn check(target: &Target, login: &Login, session: &mut Option<Session>) -> Result<Observation, String> {
    if session.is_none() {
        *session = Some(open(target, login).await?);
    }
    let s = session.as_ref().expect("just opened");
    let row = s.client.query_one(&s.check, &[]).await.map_err(describe)?;
    Ok(observation(&row, s.system_id))
}

/// One health check on a connection of the caller's (the switchover looks at a node it
/// just promoted rather than waiting for the monitor's next tick).
pub async fn check_now(client: &Client) -> Result<Observation, String> {
    let row = client.query_one(CHECK_SQL, &[]).await.map_err(describe)?;
    Ok(observation(&row, None))
}

fn observation(row: &tokio_postgres::Row, system_id: Option<u64>) -> Observation {
    let standby: bool = row.get("standby");
    let lsn: Option<String> = row.get("lsn");
    let lag_ms: f64 = row.get("lag_ms");
    let timeline: Option<i32> = row.get("timeline");
    let streaming: Option<bool> = row.get("streaming");
    Observation {
        role: if standby { Role::Standby } else { Role::Primary },
        lag_ms: lag_ms.max(0.0) as u64,
        lsn: lsn.as_deref().and_then(parse_lsn),
        timeline: timeline.map(|t| t as u32),
        streaming,
        system_id,
    }
}

async fn open(target: &Target, login: &Login) -> Result<Session, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&target.host)
        .port(target.port)
        .user(&login.user)
        .dbname(&login.database)
        .application_name("switchyard-health")
        .connect_timeout(Duration::from_secs(30));
    if let Some(pw) = &login.password {
        cfg.password(pw);
    }
    let (client, task) = target.tls.connect_pg(&mut cfg).await.map_err(describe)?;
    let check = client.prepare(CHECK_SQL).await.map_err(describe)?;
    // Not fatal when missing: causal tokens then carry no cluster identity check.
    let system_id = match client.query_one(SYSTEM_ID_SQL, &[]).await {
        Ok(row) => row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok()),
        Err(_) => None,
    };
    Ok(Session {
        client,
        check,
        system_id,
        task,
    })
}

/// A short reason for logs and error messages: the server's own message when there is
/// one, else the underlying I/O error ("connection refused").
fn describe(e: tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    let tls = e.to_string().contains("TLS");
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                _ if tls => format!("{e}: {io}"),
                _ => io.to_string(),
            };
        }
        // "error performing TLS handshake: server does not support TLS"
        if tls {
            return format!("{e}: {s}");
        }
        src = s.source();
    }
    if e.is_closed() {
        return "connection closed".into();
    }
    e.to_string()
}

/// A server's own message and SQLSTATE when there is one, else the client library's
/// error (for the control plane and auth_query, which show it to operators).
pub fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// "16/B374D848" → 0x16_B374D848.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parse_lsn() {
        assert_eq!(super::parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(super::parse_lsn("0/0"), Some(0));
        assert_eq!(super::parse_lsn("x"), None);
    }
}
