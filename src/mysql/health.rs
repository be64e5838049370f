//! The health monitor of a MySQL / MariaDB node: one task per node with its own
//! `mysql_async` connection, asking the server whether it is writable and whether and
//! how it replicates. Same contract as the PostgreSQL monitor (`cluster::health`):
//! every check bounded by `timeout_ms`, results folded into `ClusterState`.
//!
//! A node is **primary** when it is writable (`@@read_only` = 0, `@@innodb_read_only`
//! = 0, and on MySQL `@@super_read_only` = 0) and does not replicate from another node of the cluster.
//! Anything else is a **standby** (replica), readable only while its SQL thread applies
//! (`Seconds_Behind_Master` NULL because the SQL thread stopped: no lag figure, no
//! reads) and, while a primary is up, only while its IO thread streams from it. Two
//! writable non-replicating nodes are a split brain: MySQL has no timeline to tell the
//! old primary from the new one, so writes are refused until an operator makes one read
//! only (`routing::primary`).

use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::health::{self, Login, Observer, Probe};
use crate::cluster::topology::{ClusterState, Observation, Role, LAG_UNKNOWN};
use crate::config::{HealthConfig, ServerTlsMode};

use super::{ClusterInfo, Replication};

pub struct Target {
    pub cluster: Arc<ClusterState>,
    pub node: String,
    pub host: String,
    pub port: u16,
    /// Every node of the cluster (host, port): replication from one of them makes a
    /// writable node a replica, not a primary.
    pub peers: Vec<(String, u16)>,
    /// Where the greeting (version, capabilities) is kept for the front end.
    pub info: Arc<ClusterInfo>,
    /// The cluster's `server_tls` and `server_ca_file`.
    pub tls: ServerTlsMode,
    pub ca_file: Option<std::path::PathBuf>,
}

struct Session {
    conn: Conn,
    mariadb: bool,
    /// `SHOW REPLICA STATUS` (MySQL 8.0.22+) or the older `SHOW SLAVE STATUS`.
    replica_status: &'static str,
}

/// One replication channel as `SHOW ALL SLAVES STATUS` / `SHOW REPLICA STATUS` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    pub source_host: String,
    pub source_port: u16,
    pub io_running: bool,
    pub sql_running: bool,
    /// `Seconds_Behind_Master`; None when NULL.
    pub seconds_behind: Option<u64>,
}

/// The pure rule: what a node is, from what it says about itself. `position`: how many
/// transactions its GTID set holds (`gtid_position`), which the topology compares with
/// the primary's to measure lag in transactions and, from the primary's history, in time.
pub fn observe(writable: bool, channels: &[Channel], peers: &[(String, u16)], position: Option<u64>) -> Observation {
    // A channel with both threads stopped does not make a replica: an operator's
    // `STOP REPLICA; SET GLOBAL read_only = 0` promotion (the split-brain rule still
    // guards against a second writable node).
    let from_peer: Vec<&Channel> = channels
        .iter()
        .filter(|c| c.io_running || c.sql_running)
        .filter(|c| {
            peers
                .iter()
                .any(|(h, p)| *p == c.source_port && same_host(h, &c.source_host))
        })
        .collect();
    let role = if writable && from_peer.is_empty() {
        Role::Primary
    } else {
        Role::Standby
    };
    let (lag_ms, streaming) = if role == Role::Primary {
        (0, None)
    } else {
        match from_peer.first().copied().or(channels.first()) {
            // Read-only and replicating from nothing: a fenced old primary or a replica
            // whose replication was reset. Its data is as old as the last write it saw.
            None => (LAG_UNKNOWN, Some(false)),
            Some(c) if !c.sql_running => (LAG_UNKNOWN, Some(false)),
            // Applying, but not receiving: its source is gone (failover under way) or
            // unreachable. Routing reads it only while there is no primary to compare.
            Some(c) if !c.io_running => (c.seconds_behind.unwrap_or(0) * 1000, Some(false)),
            Some(c) => (c.seconds_behind.map_or(LAG_UNKNOWN, |s| s * 1000), Some(true)),
        }
    };
    Observation {
        role,
        lag_ms,
        lsn: position,
        timeline: None,
        streaming,
        system_id: None,
    }
}

/// The number of transactions in a GTID position: MariaDB's `@@gtid_current_pos`
/// (`domain-server-seq` per domain: the sum of the sequence numbers) or MySQL's
/// `@@gtid_executed` (`uuid:1-5:7-9` per source: the sum of the interval lengths). Both
/// only grow along one replication history, like a WAL position.
pub fn gtid_position(text: &str) -> Option<u64> {
    // No GTIDs at all (MySQL's gtid_mode=OFF, or nothing written yet): no position,
    // so that the replica's own lag figure is kept rather than compared with zeros.
    if text.trim().is_empty() {
        return None;
    }
    let mut total = 0u64;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((_, intervals)) = part.split_once(':') {
            for iv in intervals.split(':') {
                let (a, b) = iv.split_once('-').unwrap_or((iv, iv));
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                total += b.checked_sub(a)? + 1;
            }
        } else {
            total += part.rsplit('-').next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

pub(crate) fn same_host(a: &str, b: &str) -> bool {
    let loopback = |h: &str| h == "localhost" || h == "::1" || h.starts_with("127.");
    a.eq_ignore_ascii_case(b) || (loopback(a) && loopback(b))
}

/// MySQL's probe: one `mysql_async` connection.
struct MyProbe {
    target: Target,
    login: Arc<Login>,
    session: Option<Session>,
    timeout: Duration,
}

impl Probe for MyProbe {
    async fn check(&mut self) -> Result<Observation, String> {
        check(&self.target, &self.login, &mut self.session, self.timeout).await
    }

    fn reset(&mut self) {
        self.session = None;
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
    let probe = MyProbe {
        target,
        login,
        session: None,
        timeout: cfg.timeout(),
    };
    health::run(cluster, node, probe, cfg, observer, shutdown)
}

async fn check(
    target: &Target,
    login: &Login,
    session: &mut Option<Session>,
    timeout: Duration,
) -> Result<Observation, String> {
    if session.is_none() {
        *session = Some(open(target, login, timeout).await?);
    }
    let s = session.as_mut().expect("just opened");
    let sent = tokio::time::Instant::now();
    let (obs, rows, replication) = look(&mut s.conn, s.mariadb, s.replica_status, &target.peers).await?;
    if obs.role == crate::cluster::topology::Role::Primary {
        if let Some(p) = replication
            .gtid
            .as_deref()
            .and_then(|g| super::gtid::Position::parse(s.mariadb, g))
        {
            target.info.note_primary_position(p, sent);
        }
    }
    let (marker, period) = rows.first().map(received_marker).unwrap_or((None, None));
    target
        .info
        .note_heard(&target.node, marker, period, std::time::Instant::now());
    target.info.set_replication(&target.node, replication);
    Ok(obs)
}

/// What a replication channel received so far, as one number that changes while its
/// source lives (MariaDB: heartbeats received + transactions in `Gtid_IO_Pos`), and
/// its heartbeat period. MySQL's status has no heartbeat count: None (the IO thread's
/// state alone then says whether it hears its source).
pub(crate) fn received_marker(row: &Row) -> (Option<u64>, Option<Duration>) {
    let beats = text(row, "Slave_received_heartbeats", "Slave_received_heartbeats").and_then(|v| v.parse::<u64>().ok());
    let received = text(row, "Gtid_IO_Pos", "Gtid_IO_Pos")
        .as_deref()
        .map(|g| gtid_position(g).unwrap_or(0));
    let period = text(row, "Slave_heartbeat_period", "Slave_heartbeat_period")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|p| *p > 0.0)
        .map(Duration::from_secs_f64);
    match (beats, received) {
        (Some(b), Some(r)) => (Some(b + r), period),
        _ => (None, None),
    }
}

/// `SHOW REPLICA STATUS` in the server's dialect.
pub(crate) fn replica_status_sql(mariadb: bool, version: (u16, u16, u16)) -> &'static str {
    if mariadb {
        "SHOW ALL SLAVES STATUS"
    } else if version >= (8, 0, 22) {
        "SHOW REPLICA STATUS"
    } else {
        "SHOW SLAVE STATUS"
    }
}

/// One look at a node on a connection of the caller's (the monitor's, or the control
/// plane's after a promotion): its observation, and its replication channels as rows.
pub(crate) async fn look(
    conn: &mut Conn,
    mariadb: bool,
    replica_status: &str,
    peers: &[(String, u16)],
) -> Result<(Observation, Vec<Row>, Replication), String> {
    // Semi-sync status from the server's status variables (NULL without the plugin):
    // the primary side's, then the replica side's.
    let writable_sql = if mariadb {
        "SELECT @@global.read_only = 0 AND @@global.innodb_read_only = 0, @@global.gtid_current_pos, \
         (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'RPL_SEMI_SYNC_MASTER_STATUS'), \
         (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'RPL_SEMI_SYNC_SLAVE_STATUS')"
    } else {
        "SELECT @@global.read_only = 0 AND @@global.super_read_only = 0 AND @@global.innodb_read_only = 0, \
         @@global.gtid_executed, \
         (SELECT VARIABLE_VALUE FROM performance_schema.global_status WHERE VARIABLE_NAME IN ('Rpl_semi_sync_source_status', 'Rpl_semi_sync_master_status') LIMIT 1), \
         (SELECT VARIABLE_VALUE FROM performance_schema.global_status WHERE VARIABLE_NAME IN ('Rpl_semi_sync_replica_status', 'Rpl_semi_sync_slave_status') LIMIT 1)"
    };
    type Answer = (Option<i64>, Option<String>, Option<String>, Option<String>);
    let (writable, gtid, semi_primary, semi_replica): Answer = conn
        .query_first(writable_sql)
        .await
        .map_err(describe)?
        .unwrap_or((None, None, None, None));
    let rows: Vec<Row> = conn.query(replica_status).await.map_err(describe)?;
    let channels: Vec<Channel> = rows.iter().map(channel).collect();
    let obs = observe(
        writable == Some(1),
        &channels,
        peers,
        gtid.as_deref().and_then(gtid_position),
    );
    let row = rows.first();
    let get = |old: &str, new: &str| row.and_then(|r| text(r, old, new)).filter(|v| !v.is_empty());
    let semi = if obs.role == Role::Primary {
        semi_primary
    } else {
        semi_replica
    };
    let replication = Replication {
        gtid,
        source: channels.first().map(|c| format!("{}:{}", c.source_host, c.source_port)),
        io_thread: get("Slave_IO_Running", "Replica_IO_Running"),
        sql_thread: get("Slave_SQL_Running", "Replica_SQL_Running"),
        received: get("Gtid_IO_Pos", "Retrieved_Gtid_Set"),
        semi_sync: semi.map(|v| v.to_ascii_lowercase()),
        last_error: get("Last_IO_Error", "Last_IO_Error").or_else(|| get("Last_SQL_Error", "Last_SQL_Error")),
    };
    Ok((obs, rows, replication))
}

/// A column by its MariaDB / MySQL 5.7 name or its MySQL 8 name.
pub(crate) fn text(row: &Row, old: &str, new: &str) -> Option<String> {
    let get = |name: &str| row.get_opt::<Option<String>, _>(name).and_then(|r| r.ok()).flatten();
    get(old).or_else(|| get(new))
}

pub(crate) fn channel(row: &Row) -> Channel {
    let yes = |v: Option<String>| v.as_deref() == Some("Yes");
    Channel {
        source_host: text(row, "Master_Host", "Source_Host").unwrap_or_default(),
        source_port: text(row, "Master_Port", "Source_Port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
        io_running: yes(text(row, "Slave_IO_Running", "Replica_IO_Running")),
        sql_running: yes(text(row, "Slave_SQL_Running", "Replica_SQL_Running")),
        seconds_behind: text(row, "Seconds_Behind_Master", "Seconds_Behind_Source").and_then(|s| s.parse().ok()),
    }
}

async fn open(target: &Target, login: &Login, timeout: Duration) -> Result<Session, String> {
    let opts = OptsBuilder::default()
        .ip_or_hostname(target.host.clone())
        .tcp_port(target.port)
        .user(Some(login.user.clone()))
        .pass(login.password.clone())
        .prefer_socket(false)
        .stmt_cache_size(0);
    // `prefer` against servers known to offer no TLS: plaintext at once (each refused
    // attempt is a connection cut short, which MySQL counts against the host).
    let no_tls_offered = target.tls == ServerTlsMode::Prefer
        && target.info.greeting().is_some_and(|g| {
            !g.capabilities
                .contains(mysql_common::constants::CapabilityFlags::CLIENT_SSL)
        });
    let tls = if no_tls_offered {
        ServerTlsMode::Disable
    } else {
        target.tls
    };
    let conn = match ssl_opts(tls, target.ca_file.as_deref()) {
        None => Conn::new(opts).await.map_err(describe)?,
        Some(ssl) => match Conn::new(opts.clone().ssl_opts(ssl)).await {
            // `prefer`: plaintext when TLS cannot be had, as sessions do.
            Err(e) if target.tls == ServerTlsMode::Prefer => {
                tracing::debug!(node = %target.node, reason = %describe(e), "TLS with the MySQL server failed; server_tls = \"prefer\": plaintext");
                Conn::new(opts).await.map_err(describe)?
            }
            other => other.map_err(describe)?,
        },
    };
    // Then the raw greeting (version and capabilities, for the greeting the proxy
    // shows its own clients), only once the login worked: a connection that stops at
    // the greeting counts against the server's max_connect_errors, which a successful
    // login resets.
    let addr = format!("{}:{}", target.host, target.port);
    let hello = super::server::greet(&addr, timeout)
        .await
        .map_err(|e| e.message().to_string())?;
    drop(hello.stream);
    let mariadb = hello.greeting.version.contains("MariaDB");
    let replica_status = replica_status_sql(mariadb, conn.server_version());
    target.info.set_greeting(hello.greeting);
    Ok(Session {
        conn,
        mariadb,
        replica_status,
    })
}

/// `server_tls` in `mysql_async`'s terms: the same checks as the sessions' own TLS
/// (`tls::ServerTls`): prefer/require encrypt only (require checks the chain when a CA
/// is given), verify-ca checks the chain, verify-full the chain and the host name.
pub(crate) fn ssl_opts(mode: ServerTlsMode, ca: Option<&std::path::Path>) -> Option<mysql_async::SslOpts> {
    let base = mysql_async::SslOpts::default();
    let with_ca = |o: mysql_async::SslOpts| match ca {
        Some(p) => o
            .with_root_certs(vec![p.to_path_buf().into()])
            .with_disable_built_in_roots(true),
        None => o,
    };
    match mode {
        ServerTlsMode::Disable => None,
        ServerTlsMode::Prefer => Some(base.with_danger_accept_invalid_certs(true)),
        ServerTlsMode::Require if ca.is_none() => Some(base.with_danger_accept_invalid_certs(true)),
        ServerTlsMode::Require | ServerTlsMode::VerifyCa => {
            Some(with_ca(base).with_danger_skip_domain_validation(true))
        }
        ServerTlsMode::VerifyFull => Some(with_ca(base)),
    }
}

pub(crate) fn describe(e: mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => format!("{} ({})", s.message, s.code),
        mysql_async::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Vec<(String, u16)> {
        vec![("127.0.0.1".into(), 3306), ("127.0.0.1".into(), 3307)]
    }

    fn chan(io: bool, sql: bool, behind: Option<u64>) -> Channel {
        Channel {
            source_host: "127.0.0.1".into(),
            source_port: 3306,
            io_running: io,
            sql_running: sql,
            seconds_behind: behind,
        }
    }

    #[test]
    fn writable_and_not_replicating_is_primary() {
        let o = observe(true, &[], &peers(), None);
        assert_eq!((o.role, o.lag_ms, o.streaming), (Role::Primary, 0, None));
    }

    #[test]
    fn a_writable_replica_of_a_peer_is_not_a_primary() {
        let o = observe(true, &[chan(true, true, Some(2))], &peers(), None);
        assert_eq!((o.role, o.lag_ms, o.streaming), (Role::Standby, 2000, Some(true)));
    }

    #[test]
    fn replication_from_outside_the_cluster_does_not_make_a_replica() {
        let mut c = chan(true, true, Some(0));
        c.source_port = 9999;
        assert_eq!(observe(true, &[c], &peers(), None).role, Role::Primary);
    }

    #[test]
    fn a_writable_node_whose_replication_is_stopped_is_a_primary() {
        let o = observe(true, &[chan(false, false, None)], &peers(), None);
        assert_eq!(o.role, Role::Primary);
    }

    #[test]
    fn stopped_replication_means_no_lag_figure() {
        let stopped = observe(false, &[chan(false, false, None)], &peers(), None);
        assert_eq!((stopped.lag_ms, stopped.streaming), (LAG_UNKNOWN, Some(false)));
        let reset = observe(false, &[], &peers(), None);
        assert_eq!((reset.role, reset.lag_ms), (Role::Standby, LAG_UNKNOWN));
    }

    #[test]
    fn a_replica_whose_source_is_gone_keeps_applying() {
        let o = observe(false, &[chan(false, true, None)], &peers(), Some(7));
        assert_eq!((o.role, o.lag_ms, o.streaming), (Role::Standby, 0, Some(false)));
    }

    #[test]
    fn gtid_positions_count_transactions() {
        assert_eq!(gtid_position(""), None, "no GTIDs: no position");
        assert_eq!(gtid_position("0-1-100"), Some(100));
        assert_eq!(gtid_position("0-1-100,1-2-5"), Some(105));
        assert_eq!(
            gtid_position("3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5:11-18"),
            Some(13)
        );
        assert_eq!(
            gtid_position("3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5,\n4E11FA47-71CA-11E1-9E33-C80AA9429562:1"),
            Some(6)
        );
        assert_eq!(gtid_position("0-1-x"), None);
    }

    #[test]
    fn loopback_names_are_one_host() {
        assert!(same_host("localhost", "127.0.0.1"));
        assert!(!same_host("10.0.0.1", "127.0.0.1"));
    }
}
