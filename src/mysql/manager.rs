//! MySQL / MariaDB's side of the control plane (`cluster::control::Control`), through
//! the `[clusters.NAME.manager]` login: fence a primary (`read_only`, client sessions
//! killed), promote a replica only after it applied what it received
//! (`MASTER_GTID_WAIT` / `WAIT_FOR_EXECUTED_GTID_SET`), repoint replicas by GTID, and
//! rejoin an old primary whose history is a prefix of the new primary's.
//!
//! Two dialects: MariaDB 10.6+ (`SHOW ALL SLAVES STATUS`, `gtid_binlog_pos`, `CHANGE
//! MASTER TO … MASTER_USE_GTID`) and MySQL 8.0.23+ (`SHOW REPLICA STATUS`,
//! `gtid_executed`, `CHANGE REPLICATION SOURCE TO … SOURCE_AUTO_POSITION = 1`,
//! `super_read_only`). The statements and the GTID arithmetic are pure functions here,
//! unit tested against answers recorded from both servers; only MariaDB runs in the
//! integration tests (no MySQL 8 server package is at hand).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};

use crate::cluster::control::{Candidate, Control, Mark, Reclaim};
use crate::cluster::topology::{NodeState, Observation};
use crate::config::{ClusterConfig, ManagerConfig, ServerTlsMode};
use crate::mysql::gtid::{mariadb_pos, GtidSet};
use crate::mysql::health::{self, describe, gtid_position, same_host};

/// Which server's statements to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    MariaDb,
    MySql,
}

impl Flavor {
    pub fn of(version: &str) -> Flavor {
        if version.contains("MariaDB") {
            Flavor::MariaDb
        } else {
            Flavor::MySql
        }
    }

    /// The GTIDs a node's own binary log holds: what it would send to a replica, and
    /// the history compared when an old primary is rejoined.
    fn history(self) -> &'static str {
        match self {
            Flavor::MariaDb => "SELECT @@global.gtid_binlog_pos",
            Flavor::MySql => "SELECT @@global.gtid_executed",
        }
    }

    /// Make the node read-only (MySQL: for SUPER users too; MariaDB has no such switch:
    /// users with READ_ONLY ADMIN, which SUPER includes, can still write).
    fn set_read_only(self) -> &'static str {
        match self {
            Flavor::MariaDb => "SET GLOBAL read_only = 1",
            Flavor::MySql => "SET GLOBAL super_read_only = 1",
        }
    }

    fn set_writable(self) -> &'static [&'static str] {
        match self {
            Flavor::MariaDb => &["SET GLOBAL read_only = 0"],
            Flavor::MySql => &["SET GLOBAL super_read_only = 0", "SET GLOBAL read_only = 0"],
        }
    }

    fn stop_io(self) -> &'static str {
        match self {
            Flavor::MariaDb => "STOP SLAVE IO_THREAD",
            Flavor::MySql => "STOP REPLICA IO_THREAD",
        }
    }

    fn stop(self) -> &'static str {
        match self {
            Flavor::MariaDb => "STOP SLAVE",
            Flavor::MySql => "STOP REPLICA",
        }
    }

    fn start(self) -> &'static str {
        match self {
            Flavor::MariaDb => "START SLAVE",
            Flavor::MySql => "START REPLICA",
        }
    }

    fn reset_all(self) -> &'static str {
        match self {
            Flavor::MariaDb => "RESET SLAVE ALL",
            Flavor::MySql => "RESET REPLICA ALL",
        }
    }

    /// Wait until the node executed a GTID set/position, bounded in seconds; both
    /// return 0 when it has (MariaDB -1, MySQL 1 on timeout).
    fn wait(self) -> &'static str {
        match self {
            Flavor::MariaDb => "SELECT MASTER_GTID_WAIT(?, ?)",
            Flavor::MySql => "SELECT WAIT_FOR_EXECUTED_GTID_SET(?, ?)",
        }
    }

    /// Replicate from `host:port` by GTID. `login`: the replication user to set (a node
    /// that never replicated, or was reset, has none); otherwise the one it has is
    /// kept. `own_history`: start from the node's own binary log (an old primary
    /// rejoining: MariaDB's `current_pos`), not from what it last replicated.
    pub fn change_source(self, host: &str, port: u16, login: Option<(&str, &str)>, own_history: bool) -> String {
        let mut s = match self {
            Flavor::MariaDb => format!("CHANGE MASTER TO MASTER_HOST = {}, MASTER_PORT = {port}", quote(host)),
            Flavor::MySql => format!(
                "CHANGE REPLICATION SOURCE TO SOURCE_HOST = {}, SOURCE_PORT = {port}",
                quote(host)
            ),
        };
        if let Some((user, password)) = login {
            let (u, p) = match self {
                Flavor::MariaDb => ("MASTER_USER", "MASTER_PASSWORD"),
                Flavor::MySql => ("SOURCE_USER", "SOURCE_PASSWORD"),
            };
            s += &format!(", {u} = {}, {p} = {}", quote(user), quote(password));
        }
        s += match (self, own_history) {
            (Flavor::MariaDb, false) => ", MASTER_USE_GTID = slave_pos",
            (Flavor::MariaDb, true) => ", MASTER_USE_GTID = current_pos",
            // MySQL's auto-positioning sends what gtid_executed lacks, whatever it is.
            (Flavor::MySql, _) => ", SOURCE_AUTO_POSITION = 1",
        };
        s
    }
}

impl Flavor {
    /// For a node given a source anew (a rejoined old primary has no replication
    /// settings of its own): retry the source every second, not MariaDB's 60 s, and the
    /// heartbeat period the other replicas use, so a frozen source is told from a live
    /// one as quickly on this node.
    pub fn retry_and_heartbeat(self, period: Option<Duration>) -> String {
        let (retry, heartbeat) = match self {
            Flavor::MariaDb => ("MASTER_CONNECT_RETRY", "MASTER_HEARTBEAT_PERIOD"),
            Flavor::MySql => ("SOURCE_CONNECT_RETRY", "SOURCE_HEARTBEAT_PERIOD"),
        };
        let mut s = format!(", {retry} = 1");
        if let Some(p) = period {
            s += &format!(", {heartbeat} = {}", p.as_secs_f64());
        }
        s
    }
}

/// A string literal (quote doubled, backslash escaped).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Client connections the fence ends: not our own, not the server's threads, and not
/// the binlog dumps that feed the replicas (they must catch up with the fenced primary).
const CLIENT_SESSIONS: &str = "SELECT ID FROM information_schema.PROCESSLIST \
    WHERE ID <> CONNECTION_ID() AND USER NOT IN ('system user', 'event_scheduler') \
    AND COMMAND NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon', 'Slave_IO', 'Slave_SQL', 'Slave_worker', 'Killed')";

/// One row of `SHOW ALL SLAVES STATUS` / `SHOW REPLICA STATUS`, by column name.
pub type StatusRow = HashMap<String, String>;

fn status_row(row: &Row) -> StatusRow {
    let mut m = HashMap::new();
    for (i, col) in row.columns_ref().iter().enumerate() {
        if let Some(Ok(Some(v))) = row.get_opt::<Option<String>, usize>(i) {
            m.insert(col.name_str().into_owned(), v);
        }
    }
    m
}

/// A column by its MariaDB / MySQL 5.7 name or its MySQL 8 name.
fn field<'a>(row: &'a StatusRow, old: &str, new: &str) -> Option<&'a str> {
    row.get(old).or_else(|| row.get(new)).map(String::as_str)
}

/// Where a replica is, from its status rows and what it executed (MariaDB:
/// `@@gtid_slave_pos`; MySQL: `@@gtid_executed`). None: it replicates from nothing.
pub fn candidate(flavor: Flavor, rows: &[StatusRow], executed: &str, index: usize, name: &str) -> Option<Candidate> {
    let row = rows.first()?;
    let io = field(row, "Slave_IO_Running", "Replica_IO_Running") == Some("Yes");
    let replayed = gtid_position(executed);
    let received = match flavor {
        Flavor::MariaDb => field(row, "Gtid_IO_Pos", "Gtid_IO_Pos").and_then(gtid_position),
        Flavor::MySql => {
            let mut all = GtidSet::parse(executed).ok()?;
            all.add(&GtidSet::parse(field(row, "Retrieved_Gtid_Set", "Retrieved_Gtid_Set").unwrap_or("")).ok()?);
            Some(all.count())
        }
    };
    Some(Candidate {
        index,
        name: name.to_string(),
        timeline: None,
        received: received.max(replayed),
        replayed,
        hears_primary: io,
    })
}

/// Does a replica whose IO thread says it is connected (`io_connected`) still hear its
/// source? A frozen source keeps the connection open (until `slave_net_timeout`), so
/// the connection alone proves nothing: it must also have received something (an event
/// or a heartbeat) within the fall `window`, or two heartbeat periods if longer, as
/// its health checks saw it. Without such a record (MySQL reports no heartbeat count) the connection decides.
pub fn still_hears(io_connected: bool, heard: Option<crate::mysql::Heard>, now: Instant, window: Duration) -> bool {
    match heard {
        _ if !io_connected => false,
        None => true,
        // A live, idle source sends a heartbeat every period, which the health checks
        // see up to one interval later: silent for the fall window and two periods, it
        // is frozen or gone.
        Some(h) => now.saturating_duration_since(h.changed_at) <= window.max(h.period.map_or(window, |p| p * 2)),
    }
}

/// What the manager needs on `*.*`, each as the alternatives that grant it (MariaDB
/// renamed some in 10.5; `SUPER` still covers most there, and on MySQL 8 it stands in
/// for the dynamic `*_ADMIN` ones).
fn needed(flavor: Flavor) -> &'static [(&'static str, &'static [&'static str])] {
    match flavor {
        Flavor::MariaDb => &[
            ("READ_ONLY ADMIN", &["READ_ONLY ADMIN", "SUPER"]),
            ("REPLICATION SLAVE ADMIN", &["REPLICATION SLAVE ADMIN", "SUPER"]),
            ("CONNECTION ADMIN", &["CONNECTION ADMIN", "SUPER"]),
            ("RELOAD", &["RELOAD"]),
            ("PROCESS", &["PROCESS"]),
            ("SLAVE MONITOR", &["SLAVE MONITOR", "REPLICA MONITOR", "SUPER"]),
            ("REPLICATION CLIENT", &["REPLICATION CLIENT", "BINLOG MONITOR", "SUPER"]),
        ],
        Flavor::MySql => &[
            ("SYSTEM_VARIABLES_ADMIN", &["SYSTEM_VARIABLES_ADMIN", "SUPER"]),
            ("REPLICATION_SLAVE_ADMIN", &["REPLICATION_SLAVE_ADMIN", "SUPER"]),
            ("CONNECTION_ADMIN", &["CONNECTION_ADMIN", "SUPER"]),
            ("RELOAD", &["RELOAD"]),
            ("PROCESS", &["PROCESS"]),
            ("REPLICATION CLIENT", &["REPLICATION CLIENT", "SUPER"]),
        ],
    }
}

/// The privileges the manager lacks, from its `SHOW GRANTS` lines (only grants on
/// `*.*` count; `ALL PRIVILEGES` covers everything).
pub fn missing_grants(flavor: Flavor, grants: &[String]) -> Vec<&'static str> {
    let mut have: Vec<String> = Vec::new();
    for g in grants {
        let upper = g.to_ascii_uppercase();
        let Some(rest) = upper.strip_prefix("GRANT ") else {
            continue;
        };
        let Some((privs, on)) = rest.split_once(" ON ") else {
            continue;
        };
        if !on.trim_start().starts_with("*.*") {
            continue;
        }
        have.extend(privs.split(',').map(|p| p.trim().to_string()));
    }
    if have.iter().any(|p| p == "ALL PRIVILEGES" || p == "ALL") {
        return Vec::new();
    }
    needed(flavor)
        .iter()
        .filter(|(_, any)| !any.iter().any(|a| have.iter().any(|h| h == a)))
        .map(|(name, _)| *name)
        .collect()
}

/// The transactions an old primary has that the new one lacks, or None when its
/// history is a prefix of the new primary's (it can rejoin).
///
/// MySQL: `old_history − new_history` (GTID sets name every transaction).
///
/// MariaDB names only the last GTID per domain, and sequence numbers go on across a
/// failover (the new primary continues where it was, under its own server id). So, per
/// domain, the old primary's last `d-s-n` is in the new primary's history when the new
/// primary is at or past `n` and its last transaction from server `s` (its
/// `gtid_slave_pos` once it was promoted, or its current position if it wrote nothing
/// of its own since) is at or past `n`. Otherwise the old primary has `d-s-(k+1)` to
/// `d-s-n` that the new one never got. (MariaDB's `gtid_strict_mode` refuses such a
/// replica too, when it connects: error 1236.)
pub fn extra_history(
    flavor: Flavor,
    old_history: &str,
    new_current: &str,
    new_replicated: &str,
) -> Result<Option<String>, String> {
    match flavor {
        Flavor::MySql => {
            let extra = GtidSet::parse(old_history)?.minus(&GtidSet::parse(new_current)?);
            Ok((!extra.is_empty()).then(|| extra.to_string()))
        }
        Flavor::MariaDb => {
            let (cur, rep) = (mariadb_pos(new_current), mariadb_pos(new_replicated));
            let mut extra = Vec::new();
            for (d, (s, n)) in mariadb_pos(old_history) {
                let known = match (cur.get(&d), rep.get(&d)) {
                    (Some(&(cs, cn)), _) if cs == s => cn,
                    (Some(&(_, cn)), Some(&(rs, rn))) if rs == s => rn.min(cn),
                    _ => 0,
                };
                if n > known {
                    extra.push(if known + 1 == n {
                        format!("{d}-{s}-{n}")
                    } else {
                        format!("{d}-{s}-{} to {d}-{s}-{n}", known + 1)
                    });
                }
            }
            Ok((!extra.is_empty()).then(|| extra.join(", ")))
        }
    }
}

/// MySQL's `Control`: the manager login of one cluster and its nodes' addresses (a
/// node replicating from one of them is a replica).
pub struct MyControl {
    login: ManagerConfig,
    /// What the health checks saw the replicas receive (`ClusterInfo::heard`).
    info: std::sync::Arc<crate::mysql::ClusterInfo>,
    tls: ServerTlsMode,
    ca_file: Option<PathBuf>,
    peers: Vec<(String, u16)>,
}

pub struct MyConn {
    conn: Conn,
    flavor: Flavor,
    replica_status: &'static str,
    mariadb: bool,
}

impl MyControl {
    pub fn new(login: ManagerConfig, cc: &ClusterConfig, info: std::sync::Arc<crate::mysql::ClusterInfo>) -> MyControl {
        MyControl {
            login,
            info,
            tls: cc.server_tls,
            ca_file: cc.server_ca_file.clone(),
            peers: cc.nodes.iter().map(|n| (n.host.clone(), n.port)).collect(),
        }
    }

    async fn status_rows(&self, c: &mut MyConn) -> Result<Vec<StatusRow>, String> {
        let rows: Vec<Row> = c.conn.query(c.replica_status).await.map_err(describe)?;
        Ok(rows.iter().map(status_row).collect())
    }

    async fn one(&self, c: &mut MyConn, sql: &str) -> Result<String, String> {
        let v: Option<Option<String>> = c.conn.query_first(sql).await.map_err(describe)?;
        Ok(v.flatten().unwrap_or_default())
    }

    async fn run(&self, c: &mut MyConn, sql: &str) -> Result<(), String> {
        c.conn
            .query_drop(sql)
            .await
            .map_err(|e| format!("{sql}: {}", describe(e)))
    }

    /// Read-only, then every client session killed (a transaction open on the old
    /// primary must not commit there after the new one takes writes).
    ///
    /// The sessions are killed before `read_only` too: setting it waits for commits in
    /// flight, and an old primary that comes back has commits waiting for a semi-sync
    /// acknowledgement that will never come (`rpl_semi_sync_master_timeout`, 10 s by
    /// default), all the while writable.
    async fn make_read_only(&self, c: &mut MyConn) -> Result<(), String> {
        self.kill_client_sessions(c).await?;
        self.run(c, c.flavor.set_read_only()).await?;
        // And whoever connected in between.
        self.kill_client_sessions(c).await
    }

    async fn kill_client_sessions(&self, c: &mut MyConn) -> Result<(), String> {
        let ids: Vec<u64> = c.conn.query(CLIENT_SESSIONS).await.map_err(describe)?;
        for id in ids {
            // Gone already, or a race with its own end: either way not running.
            let _ = c.conn.query_drop(format!("KILL CONNECTION {id}")).await;
        }
        Ok(())
    }

    /// The GTIDs a node executed (MariaDB: what it replicated, `gtid_slave_pos`, for
    /// a replica's survey; MySQL: `gtid_executed`).
    async fn executed(&self, c: &mut MyConn) -> Result<String, String> {
        match c.flavor {
            Flavor::MariaDb => self.one(c, "SELECT @@global.gtid_slave_pos").await,
            Flavor::MySql => self.one(c, "SELECT @@global.gtid_executed").await,
        }
    }

    /// What `switchyard check` says about the manager on `node`: the privileges it
    /// lacks there (empty: all there), or why it could not tell.
    pub async fn missing_privileges(&self, node: &NodeState, timeout: Duration) -> Result<Vec<&'static str>, String> {
        let mut c = self.connect(node, timeout).await?;
        let grants: Vec<String> = tokio::time::timeout(timeout, c.conn.query("SHOW GRANTS"))
            .await
            .map_err(|_| "no answer to SHOW GRANTS".to_string())?
            .map_err(describe)?;
        Ok(missing_grants(c.flavor, &grants))
    }

    fn replication_login(&self) -> Option<(&str, &str)> {
        Some((
            self.login.replication_user.as_deref()?,
            self.login.replication_password.as_deref().unwrap_or(""),
        ))
    }
}

fn split_addr(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("bad address {addr}"))?;
    Ok((
        host.to_string(),
        port.parse().map_err(|_| format!("bad port in {addr}"))?,
    ))
}

impl Control for MyControl {
    type Conn = MyConn;

    async fn connect(&self, node: &NodeState, timeout: Duration) -> Result<MyConn, String> {
        let (host, port) = split_addr(&node.addr)?;
        let opts = OptsBuilder::default()
            .ip_or_hostname(host)
            .tcp_port(port)
            .user(Some(self.login.user.clone()))
            .pass(self.login.password.clone())
            .prefer_socket(false)
            .stmt_cache_size(0);
        let work = async {
            let mut conn = match health::ssl_opts(self.tls, self.ca_file.as_deref()) {
                None => Conn::new(opts).await.map_err(describe)?,
                Some(ssl) => match Conn::new(opts.clone().ssl_opts(ssl)).await {
                    Err(_) if self.tls == ServerTlsMode::Prefer => Conn::new(opts).await.map_err(describe)?,
                    other => other.map_err(describe)?,
                },
            };
            let version: Option<String> = conn.query_first("SELECT VERSION()").await.map_err(describe)?;
            let flavor = Flavor::of(version.as_deref().unwrap_or(""));
            let mariadb = flavor == Flavor::MariaDb;
            let replica_status = health::replica_status_sql(mariadb, conn.server_version());
            Ok::<_, String>(MyConn {
                conn,
                flavor,
                replica_status,
                mariadb,
            })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r.map_err(|e| format!("cannot log in to \"{}\" as the manager user: {e}", node.name)),
            Err(_) => Err(format!(
                "\"{}\" did not answer the manager login within {} ms",
                node.name,
                timeout.as_millis()
            )),
        }
    }

    async fn is_primary(&self, c: &mut MyConn) -> Result<bool, String> {
        Ok(self.observe(c).await?.role == crate::cluster::topology::Role::Primary)
    }

    async fn survey(
        &self,
        c: &mut MyConn,
        index: usize,
        node: &NodeState,
        window: Duration,
    ) -> Result<Option<Candidate>, String> {
        let rows = self.status_rows(c).await?;
        let executed = self.executed(c).await?;
        let mut cand = candidate(c.flavor, &rows, &executed, index, &node.name);
        if let Some(cand) = cand.as_mut() {
            cand.hears_primary = still_hears(cand.hears_primary, self.info.heard(&node.name), Instant::now(), window);
        }
        Ok(cand)
    }

    async fn stop_receiving(&self, c: &mut MyConn) -> Result<(), String> {
        self.run(c, c.flavor.stop_io()).await
    }

    /// A switchover's fence: read-only, and the sessions with an open transaction
    /// killed (they must not commit here once the new primary takes writes). Sessions
    /// between transactions are left alone: Switchyard's own are held, and move to the
    /// new primary at their next command with what they set (`mysql::moving`).
    async fn fence(&self, c: &mut MyConn) -> Result<Mark, String> {
        self.run(c, c.flavor.set_read_only()).await?;
        let ids: Vec<u64> = c
            .conn
            .query("SELECT trx_mysql_thread_id FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id <> CONNECTION_ID()")
            .await
            .map_err(describe)?;
        for id in ids {
            let _ = c.conn.query_drop(format!("KILL CONNECTION {id}")).await;
        }
        Ok(Mark(self.one(c, c.flavor.history()).await?))
    }

    async fn unfence(&self, c: &mut MyConn) -> Result<(), String> {
        for sql in c.flavor.set_writable() {
            self.run(c, sql).await?;
        }
        Ok(())
    }

    async fn wait_applied(&self, c: &mut MyConn, mark: &Mark, within: Duration) -> Result<bool, String> {
        if mark.0.trim().is_empty() {
            return Ok(true);
        }
        let secs = within.as_secs_f64().max(0.001);
        let r: Option<Option<i64>> = c
            .conn
            .exec_first(c.flavor.wait(), (mark.0.clone(), secs))
            .await
            .map_err(describe)?;
        Ok(r.flatten() == Some(0))
    }

    async fn repoint(&self, c: &mut MyConn, primary: &NodeState) -> Result<(), String> {
        let (host, port) = split_addr(&primary.addr)?;
        // Keep the channel's heartbeat period (CHANGE MASTER would reset it to half of
        // slave_net_timeout): a short one is what tells a frozen primary from a live one.
        let period = self
            .status_rows(c)
            .await?
            .first()
            .and_then(|r| field(r, "Slave_heartbeat_period", "Slave_heartbeat_period").map(str::to_string))
            .and_then(|p| p.parse::<f64>().ok())
            .filter(|p| *p > 0.0);
        let mut change = c.flavor.change_source(&host, port, None, false);
        if let Some(p) = period {
            change += &format!(", MASTER_HEARTBEAT_PERIOD = {p}");
        }
        self.run(c, c.flavor.stop()).await?;
        self.run(c, &change).await?;
        self.run(c, c.flavor.start()).await
    }

    async fn promote(&self, c: &mut MyConn, node: &str, within: Duration) -> Result<(), String> {
        // Stop receiving (from a primary that is gone, or fenced), then apply all that
        // was received before taking writes: a promotion that skipped the relay log
        // would lose transactions the old primary acknowledged.
        //
        // (MariaDB: a semi-synchronous replica's STOP SLAVE logs in to its source to end
        // the dump thread there, and waits `rpl_semi_sync_slave_kill_conn_timeout`, 5 s
        // by default, when that source is frozen: the docs advise 1 s.)
        let t0 = Instant::now();
        let _ = c.conn.query_drop(c.flavor.stop_io()).await;
        let stopped_ms = t0.elapsed().as_millis() as u64;
        let rows = self.status_rows(c).await?;
        if let Some(row) = rows.first() {
            if field(row, "Slave_SQL_Running", "Replica_SQL_Running") != Some("Yes") {
                let err = field(row, "Last_SQL_Error", "Last_SQL_Error").unwrap_or("");
                if !err.is_empty() {
                    return Err(format!(
                        "\"{node}\" cannot apply what it received (its SQL thread stopped: {err}); not promoting it"
                    ));
                }
            }
            let received = match c.flavor {
                Flavor::MariaDb => field(row, "Gtid_IO_Pos", "Gtid_IO_Pos").unwrap_or("").to_string(),
                Flavor::MySql => field(row, "Retrieved_Gtid_Set", "Retrieved_Gtid_Set")
                    .unwrap_or("")
                    .to_string(),
            };
            if !self.wait_applied(c, &Mark(received.clone()), within).await? {
                return Err(format!(
                    "\"{node}\" did not apply its relay log (up to {received}) within {} ms; not promoting it",
                    within.as_millis()
                ));
            }
        }
        self.run(c, c.flavor.stop()).await?;
        self.run(c, c.flavor.reset_all()).await?;
        for sql in c.flavor.set_writable() {
            self.run(c, sql).await?;
        }
        tracing::info!(node = %node, stop_receiving_ms = stopped_ms, total_ms = t0.elapsed().as_millis() as u64, "replica promoted after applying its relay log");
        Ok(())
    }

    async fn observe(&self, c: &mut MyConn) -> Result<Observation, String> {
        let (obs, ..) = health::look(&mut c.conn, c.mariadb, c.replica_status, &self.peers).await?;
        Ok(obs)
    }

    async fn reclaim(
        &self,
        old: &mut MyConn,
        new: &NodeState,
        within: Duration,
        end_sessions: bool,
    ) -> Result<Reclaim, String> {
        let (host, port) = split_addr(&new.addr)?;
        let rows = self.status_rows(old).await?;
        let follows_new = rows.iter().any(|r| {
            let (h, p) = (
                field(r, "Master_Host", "Source_Host").unwrap_or(""),
                field(r, "Master_Port", "Source_Port").and_then(|p| p.parse::<u16>().ok()),
            );
            same_host(h, &host) && p == Some(port)
        });
        // Read-only first, whatever comes next: it may have come back writable.
        if end_sessions {
            self.make_read_only(old).await?;
        } else {
            self.run(old, old.flavor.set_read_only()).await?;
        }
        if follows_new {
            return Ok(Reclaim::Standby);
        }
        let mut n = self.connect(new, within).await?;
        let new_current = match n.flavor {
            Flavor::MariaDb => self.one(&mut n, "SELECT @@global.gtid_current_pos").await?,
            Flavor::MySql => self.one(&mut n, "SELECT @@global.gtid_executed").await?,
        };
        let new_replicated = self.executed(&mut n).await?;
        let old_history = self.one(old, old.flavor.history()).await?;
        if let Some(extra) = extra_history(old.flavor, &old_history, &new_current, &new_replicated)? {
            return Ok(Reclaim::Diverged(extra));
        }
        let Some(login) = self.replication_login() else {
            return Ok(Reclaim::NotRejoined(
                "its history is a prefix of the new primary's, but manager.replication_user is not configured".into(),
            ));
        };
        let _ = old.conn.query_drop(old.flavor.stop()).await;
        let change = old.flavor.change_source(&host, port, Some(login), true)
            + &old.flavor.retry_and_heartbeat(self.info.heartbeat_period());
        self.run(old, &change).await?;
        self.run(old, old.flavor.start()).await?;
        Ok(Reclaim::Rejoined)
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
