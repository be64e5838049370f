//! `[auth_query]`: users not listed in `[[users]]` are looked up on the servers of the
//! cluster the client connects to (its primary first, then any node that is up), as
//! PgBouncer's `auth_user` / `auth_query` do. The query returns the user's SCRAM
//! verifier; the client is checked against it, and the ClientKey its login reveals
//! logs the proxy in to the servers (`backend::scram`), so no password is stored
//! anywhere in Switchyard.
//!
//! Verifiers are cached per (cluster, user) for `cache_s`. When a lookup fails (no node
//! reachable: a failover in progress), the last verifier found is used rather than
//! locking the user out; a user the query no longer returns is forgotten at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::backend::scram::Credential;
use crate::cluster::health::db_error as describe;
use crate::cluster::routing;
use crate::cluster::topology::Health;
use crate::cluster::ClusterCtx;
use crate::config::{AuthMethod, AuthQueryConfig, UserConfig};
use crate::error::Error;
use crate::frontend::auth::Verifier;
use crate::protocol::scram::ScramSecret;

struct Cached {
    verifier: Verifier,
    at: Instant,
}

#[derive(Default)]
pub struct AuthQuery {
    cache: Mutex<HashMap<(String, String), Cached>>,
}

impl AuthQuery {
    /// The verifier of `user` for clients of `cluster`. Ok(None): the query returns no
    /// row (or no verifier) for that user.
    pub async fn verifier(
        &self,
        cfg: &AuthQueryConfig,
        cluster: &ClusterCtx,
        user: &str,
    ) -> Result<Option<Verifier>, Error> {
        let key = (cluster.name.clone(), user.to_string());
        let cached = self
            .cache
            .lock()
            .unwrap()
            .get(&key)
            .map(|c| (c.verifier.clone(), c.at.elapsed() < Duration::from_secs(cfg.cache_s)));
        if let Some((v, true)) = &cached {
            return Ok(Some(v.clone()));
        }
        match lookup(cfg, cluster, user).await {
            Ok(Some(text)) => {
                if ScramSecret::parse(&text).is_none() {
                    return Err(Error::not_authorized(format!(
                        "auth_query returned a secret for user \"{user}\" that is not a SCRAM-SHA-256 verifier \
                         (an md5 hash?); set password_encryption = 'scram-sha-256' on the server and set the password again"
                    )));
                }
                let mut v = Verifier::new(&UserConfig {
                    name: user.to_string(),
                    password: Some(text),
                    password_file: None,
                    password_env: None,
                    auth: AuthMethod::ScramSha256,
                    admin: false,
                });
                if let Some((old, _)) = &cached {
                    v.carry_over(old);
                }
                self.cache.lock().unwrap().insert(
                    key,
                    Cached {
                        verifier: v.clone(),
                        at: Instant::now(),
                    },
                );
                Ok(Some(v))
            }
            Ok(None) => {
                self.cache.lock().unwrap().remove(&key);
                Ok(None)
            }
            Err(e) => match cached {
                Some((v, _)) => {
                    warn!(cluster = %cluster.name, user = %user, reason = %e, "auth_query failed; using the verifier found last time");
                    Ok(Some(v))
                }
                None => Err(Error::connect_failed(format!(
                    "cannot check user \"{user}\": auth_query failed on cluster \"{}\": {e}",
                    cluster.name
                ))),
            },
        }
    }

    /// What a user found by the query logs in to servers with (after its client's login).
    pub fn credential(&self, cluster: &str, user: &str) -> Option<Credential> {
        self.cache
            .lock()
            .unwrap()
            .get(&(cluster.to_string(), user.to_string()))
            .map(|c| c.verifier.server_credential())
    }

    /// Forget everything (on reload: the query or its login may have changed).
    pub fn clear(&self) {
        self.cache.lock().unwrap().clear();
    }
}

/// Run the query on the primary, else on each node that is up, until one answers.
async fn lookup(cfg: &AuthQueryConfig, cluster: &ClusterCtx, user: &str) -> Result<Option<String>, String> {
    let snap = cluster.state.snapshot();
    let primary = routing::primary(&snap).ok();
    let mut order: Vec<usize> = primary.into_iter().collect();
    order.extend((0..snap.nodes.len()).filter(|&i| snap.nodes[i].health == Health::Up && Some(i) != primary));
    if order.is_empty() {
        return Err("no node is up".into());
    }
    let tls = cluster.server_tls();
    let timeout = snap.server_login_timeout;
    let mut failures = Vec::new();
    for i in order {
        let node = &snap.nodes[i];
        let attempt = async {
            let (host, port) = node.addr.rsplit_once(':').ok_or("bad node address")?;
            let mut pg = tokio_postgres::Config::new();
            pg.host(host.trim_start_matches('[').trim_end_matches(']'))
                .port(port.parse().map_err(|_| "bad node port")?)
                .user(&cfg.user)
                .dbname(&cfg.database)
                .application_name("switchyard-auth-query")
                .connect_timeout(timeout);
            if let Some(pw) = &cfg.password {
                pg.password(pw);
            }
            let connector = tls.postgres(&mut pg);
            let (client, conn) = pg.connect(connector).await.map_err(|e| describe(&e))?;
            let task = tokio::spawn(conn);
            let rows = client.query(cfg.query.as_str(), &[&user]).await;
            task.abort();
            let rows = rows.map_err(|e| describe(&e))?;
            Ok::<_, String>(
                rows.first()
                    .and_then(|r| r.try_get::<_, Option<String>>(1).ok().flatten()),
            )
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(found)) => {
                debug!(cluster = %cluster.name, node = %node.name, user = %user, found = found.is_some(), "auth_query");
                return Ok(found);
            }
            Ok(Err(e)) => failures.push(format!("{}: {e}", node.name)),
            Err(_) => failures.push(format!("{}: no answer within {} ms", node.name, timeout.as_millis())),
        }
    }
    Err(failures.join("; "))
}
