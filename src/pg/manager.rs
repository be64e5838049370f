//! PostgreSQL's side of the control plane (`cluster::control::Control`), through the
//! `[clusters.NAME.manager]` superuser login: fence a primary (read-only, sessions
//! ended), promote a standby (`pg_promote`), repoint standbys (`primary_conninfo`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;
use tracing::warn;

use crate::cluster::control::{Candidate, Control, Mark, Reclaim};
use crate::cluster::topology::{NodeState, Observation};
use crate::config::ManagerConfig;
use crate::pg::health::{self, parse_lsn};
use crate::tls::ServerTls;

/// The manager login of one cluster, with the cluster's `server_tls`.
#[derive(Clone)]
pub struct Manager {
    pub login: ManagerConfig,
    pub tls: Arc<ServerTls>,
}

/// PostgreSQL's `Control`: the manager login of one cluster.
pub struct PgControl(pub Manager);

const SURVEY_SQL: &str = "SELECT pg_is_in_recovery(),
  pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
  (SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1),
  COALESCE((SELECT status = 'streaming' AND last_msg_receipt_time > now() - make_interval(secs => $1)
            FROM pg_stat_wal_receiver LIMIT 1), false)";

impl Control for PgControl {
    type Conn = Client;

    async fn connect(&self, node: &NodeState, timeout: Duration) -> Result<Client, String> {
        connect(&self.0, &node.addr, &node.name, timeout).await
    }

    async fn is_primary(&self, c: &mut Client) -> Result<bool, String> {
        let row = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| describe(&e))?;
        Ok(!row.get::<_, bool>(0))
    }

    async fn survey(
        &self,
        c: &mut Client,
        index: usize,
        node: &NodeState,
        window: Duration,
    ) -> Result<Option<Candidate>, String> {
        let row = c
            .query_one(SURVEY_SQL, &[&window.as_secs_f64()])
            .await
            .map_err(|e| describe(&e))?;
        if !row.get::<_, bool>(0) {
            return Ok(None);
        }
        let lsn = |i: usize| row.get::<_, Option<String>>(i).as_deref().and_then(parse_lsn);
        Ok(Some(Candidate {
            index,
            name: node.name.clone(),
            timeline: row.get::<_, Option<i32>>(3).map(|t| t as u32).or(node.timeline),
            received: lsn(1),
            replayed: lsn(2),
            hears_primary: row.get(4),
        }))
    }

    async fn stop_receiving(&self, _c: &mut Client) -> Result<(), String> {
        // A PostgreSQL standby's position only grows along one timeline; the promoted
        // one is chosen as the most advanced and the others cascade from it.
        Ok(())
    }

    async fn fence(&self, c: &mut Client) -> Result<Mark, String> {
        fence(c).await.map_err(|e| describe(&e))?;
        // One tiny transaction of our own, committed synchronously: its commit flushes
        // every WAL record before it (asynchronous commits included), and the flush
        // position after it is the end of a record, which a standby's replay position
        // can equal (the insert position may sit past a page header, where replay never
        // stops until more WAL comes).
        c.batch_execute("SET synchronous_commit = on; BEGIN READ WRITE; SELECT txid_current(); COMMIT")
            .await
            .map_err(|e| describe(&e))?;
        let lsn: String = c
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(|e| describe(&e))?
            .get(0);
        Ok(Mark(lsn))
    }

    async fn unfence(&self, c: &mut Client) -> Result<(), String> {
        unfence(c).await.map_err(|e| describe(&e))
    }

    async fn wait_applied(&self, c: &mut Client, mark: &Mark, within: Duration) -> Result<bool, String> {
        let target = parse_lsn(&mark.0).ok_or_else(|| format!("unreadable WAL position {}", mark.0))?;
        let until = Instant::now() + within;
        loop {
            let replayed = c
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await
                .ok()
                .and_then(|r| r.get::<_, Option<String>>(0))
                .and_then(|s| parse_lsn(&s));
            if replayed.is_some_and(|r| r >= target) {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn repoint(&self, c: &mut Client, primary: &NodeState) -> Result<(), String> {
        let (host, port) = primary.addr.rsplit_once(':').unwrap_or((&primary.addr, "5432"));
        let current: String = c
            .query_one("SHOW primary_conninfo", &[])
            .await
            .map_err(|e| describe(&e))?
            .get(0);
        let conninfo = repointed(&current, host, port);
        c.batch_execute(&format!(
            "ALTER SYSTEM SET primary_conninfo = '{}'",
            conninfo.replace('\'', "''")
        ))
        .await
        .map_err(|e| describe(&e))?;
        c.batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(|e| describe(&e))
    }

    async fn promote(&self, c: &mut Client, node: &str, within: Duration) -> Result<(), String> {
        promote(c, node, within).await
    }

    async fn observe(&self, c: &mut Client) -> Result<Observation, String> {
        health::check_now(c).await
    }

    async fn reclaim(
        &self,
        old: &mut Client,
        _new: &NodeState,
        _within: Duration,
        _end_sessions: bool,
    ) -> Result<Reclaim, String> {
        if !self.is_primary(old).await? {
            return Ok(Reclaim::Standby);
        }
        // Rejoining takes pg_rewind and a restart on the old primary's host, where
        // Switchyard runs nothing (demote_command is the operator's hook for it).
        fence(old).await.map_err(|e| describe(&e))?;
        Ok(Reclaim::Fenced)
    }
}

/// Log in to `addr` (`host:port`) as the manager, to database `postgres`.
pub async fn connect(manager: &Manager, addr: &str, node: &str, timeout: Duration) -> Result<Client, String> {
    let tls = &manager.tls;
    let manager = &manager.login;
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("bad address {addr}"))?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host)
        .port(port.parse().map_err(|_| format!("bad port in {addr}"))?)
        .user(&manager.user)
        .dbname("postgres")
        .application_name("switchyard-manager")
        .connect_timeout(timeout);
    if let Some(pw) = &manager.password {
        cfg.password(pw);
    }
    // connect_timeout bounds the TCP connect only; a frozen server accepts and then
    // never answers the startup packet.
    let (client, _task) = match tokio::time::timeout(timeout, tls.connect_pg(&mut cfg)).await {
        Ok(r) => r.map_err(|e| format!("cannot log in to \"{node}\" as the manager user: {}", describe(&e)))?,
        Err(_) => {
            return Err(format!(
                "\"{node}\" did not answer the manager login within {} ms",
                timeout.as_millis()
            ))
        }
    };
    Ok(client)
}

pub use crate::pg::health::db_error as describe;

/// Make a primary stop taking writes: `default_transaction_read_only` (persisted with
/// ALTER SYSTEM, so a restart keeps it) and every other client backend terminated.
pub async fn fence(c: &Client) -> Result<(), tokio_postgres::Error> {
    // Separate statements: ALTER SYSTEM refuses to run inside a transaction block,
    // which is what a multi-statement query is.
    c.batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await?;
    c.batch_execute("SELECT pg_reload_conf()").await?;
    // In the target list, not the WHERE clause: the planner may order a WHERE's
    // conditions as it likes, and would end this session too.
    let ended: Vec<i32> = c
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A terminated backend writes the abort record of the transaction it was in as it
    // exits, after pg_terminate_backend has returned: wait until they are gone (they
    // leave pg_stat_activity after their abort), so that a WAL position taken next is
    // past every record they write. A standby that received one past the position the
    // new primary was promoted at could not follow it. Bounded: a backend stuck in the
    // kernel is not waited for.
    let until = Instant::now() + FENCE_EXIT_WAIT;
    while !ended.is_empty() && Instant::now() < until {
        let left: i64 = c
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", &[&ended])
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// How long `fence` waits for the sessions it ended to be gone.
const FENCE_EXIT_WAIT: Duration = Duration::from_secs(2);

/// Undo `fence` (also run on every node the control plane promotes: a node fenced
/// once, then rewound into a standby, would otherwise be a read-only primary).
pub async fn unfence(c: &Client) -> Result<(), tokio_postgres::Error> {
    c.batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
        .await?;
    c.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(())
}

/// `pg_promote()` and wait for it (bounded), then make sure the new primary is writable.
pub async fn promote(c: &Client, node: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, c.query_one("SELECT pg_promote(true, 30)", &[])).await {
        Ok(Ok(row)) if row.get::<_, bool>(0) => {}
        Ok(Ok(_)) => return Err(format!("pg_promote() on \"{node}\" returned false")),
        Ok(Err(e)) => return Err(describe(&e)),
        Err(_) => return Err("pg_promote() did not return in time".into()),
    }
    if let Err(e) = unfence(c).await {
        warn!(node = %node, reason = %describe(&e), "could not reset default_transaction_read_only on the new primary");
    }
    Ok(())
}

/// `conninfo` with its host and port replaced (other keys, such as the replication
/// user and password, kept as they were). A Unix-socket host (a directory) is kept: the
/// nodes then share a machine and its socket directory, and only the port differs.
pub fn repointed(conninfo: &str, host: &str, port: &str) -> String {
    let socket = conninfo
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("host="))
        .filter(|h| h.trim_matches('\'').starts_with('/'));
    let mut parts: Vec<String> = conninfo
        .split_whitespace()
        .filter(|kv| !kv.starts_with("host=") && !kv.starts_with("port=") && !kv.starts_with("hostaddr="))
        .map(str::to_string)
        .collect();
    parts.push(format!("host={}", socket.unwrap_or(host)));
    parts.push(format!("port={port}"));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn repointing_keeps_the_other_keys() {
        assert_eq!(
            super::repointed(
                "user=rep password=x host=db1 port=5432 sslmode=prefer",
                "10.0.0.2",
                "5433"
            ),
            "user=rep password=x sslmode=prefer host=10.0.0.2 port=5433"
        );
        assert_eq!(
            super::repointed("user=postgres host=/tmp/sy port=5432", "127.0.0.1", "5433"),
            "user=postgres host=/tmp/sy port=5433"
        );
    }
}
