//! What the control plane does to servers, through the `[clusters.NAME.manager]`
//! superuser login: log in, fence a primary (read-only, sessions ended), promote a
//! standby, repoint standbys at a new primary, run the operator's `demote_command`.

use std::time::Duration;

use std::sync::Arc;

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::cluster::topology::{ClusterSnapshot, Health, Role};
use crate::config::ManagerConfig;
use crate::tls::ServerTls;

/// The manager login of one cluster, with the cluster's `server_tls`.
#[derive(Clone)]
pub struct Manager {
    pub login: ManagerConfig,
    pub tls: Arc<ServerTls>,
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
    c.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .await?;
    Ok(())
}

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

/// Point every up standby of `snap` except those in `skip` at `new_addr`. Best effort:
/// a standby that cannot be repointed is logged (it is then detached in routing: no
/// reads) and the operator repoints it.
pub async fn repoint_standbys(
    cluster: &str,
    manager: &Manager,
    snap: &ClusterSnapshot,
    skip: &[usize],
    new_addr: &str,
    timeout: Duration,
) {
    let (host, port) = new_addr.rsplit_once(':').unwrap_or((new_addr, "5432"));
    // All at once, each bounded as a whole (login, SHOW, ALTER SYSTEM, reload): a
    // standby that stalls must not hold up the promotion that follows.
    let each = snap
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| !skip.contains(i) && n.health == Health::Up && n.role == Role::Standby)
        .map(|(_, n)| async move {
            let work = async {
                let c = connect(manager, &n.addr, &n.name, timeout).await?;
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
            };
            let result = match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            };
            match result {
                Ok(()) => info!(cluster = %cluster, node = %n.name, primary = %new_addr, "standby repointed"),
                Err(e) => {
                    warn!(cluster = %cluster, node = %n.name, reason = %e, "could not repoint a standby at the new primary; repoint it by hand")
                }
            }
        });
    futures_util::future::join_all(each).await;
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

/// Run the operator's `demote_command` for the old primary, in the background, bounded
/// by ten minutes; its outcome is logged.
pub fn spawn_demote(command: Option<String>, cluster: &str, old: (&str, &str), new: (&str, &str)) {
    let Some(command) = command else {
        return;
    };
    let split = |addr: &str| {
        let (h, p) = addr.rsplit_once(':').unwrap_or((addr, "5432"));
        (h.to_string(), p.to_string())
    };
    let ((old_host, old_port), (new_host, new_port)) = (split(old.1), split(new.1));
    let env = [
        ("SWITCHYARD_CLUSTER", cluster.to_string()),
        ("SWITCHYARD_OLD_PRIMARY", old.0.to_string()),
        ("SWITCHYARD_OLD_HOST", old_host),
        ("SWITCHYARD_OLD_PORT", old_port),
        ("SWITCHYARD_NEW_PRIMARY", new.0.to_string()),
        ("SWITCHYARD_NEW_HOST", new_host),
        ("SWITCHYARD_NEW_PORT", new_port),
    ];
    let (cluster, node) = (cluster.to_string(), old.0.to_string());
    tokio::spawn(async move {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(&command).envs(env).kill_on_drop(true);
        info!(cluster = %cluster, node = %node, "running demote_command for the old primary");
        match tokio::time::timeout(Duration::from_secs(600), cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => {
                info!(cluster = %cluster, node = %node, "demote_command succeeded")
            }
            Ok(Ok(out)) => warn!(cluster = %cluster, node = %node, status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(), "demote_command failed"),
            Ok(Err(e)) => warn!(cluster = %cluster, node = %node, reason = %e, "demote_command could not be run"),
            Err(_) => {
                warn!(cluster = %cluster, node = %node, "demote_command did not finish within 10 minutes; killed")
            }
        }
    });
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
