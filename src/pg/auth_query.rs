//! `[auth_query]`: users not listed in `[[users]]` are looked up on the servers of the
//! cluster the client connects to (its primary first, then any node that is up), as
//! PgBouncer's `auth_user` / `auth_query` do. The query returns the user's SCRAM
//! verifier; the client is checked against it, and the ClientKey its login reveals
//! logs the proxy in to the servers (`backend::scram`), so no password is stored
//! anywhere in Switchyard.
//!
//! Results are cached per (cluster, user) for `cache_s`, users not found too, so that a
//! client cannot tell a known user from an unknown one by timing, nor make the proxy
//! query the servers at will (one lookup per user at a time, `MAX_LOOKUPS` in all).
//! When a lookup fails (no node reachable: a failover in progress), the last result is
//! used rather than locking the user out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::cluster::routing;
use crate::cluster::topology::Health;
use crate::cluster::ClusterCtx;
use crate::config::{AuthMethod, AuthQueryConfig, UserConfig};
use crate::error::Error;
use crate::pg::auth::Verifier;
use crate::pg::health::db_error as describe;
use crate::scram::ScramSecret;

/// A lookup's result: the verifier, or None when the query returned no user.
struct Cached {
    verifier: Option<Verifier>,
    at: Instant,
}

type Key = (String, String);

/// At most this many (cluster, user) results are kept; past it, expired ones go.
const MAX_CACHED: usize = 10_000;
/// Lookups running at once, over all users: clients that have not authenticated
/// cannot make the proxy open more connections to the servers than this.
const MAX_LOOKUPS: usize = 4;

pub struct AuthQuery {
    cache: Mutex<HashMap<Key, Cached>>,
    /// One lookup per (cluster, user) at a time; the others wait for its result.
    flights: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    lookups: Semaphore,
}

impl Default for AuthQuery {
    fn default() -> Self {
        AuthQuery {
            cache: Mutex::default(),
            flights: Mutex::default(),
            lookups: Semaphore::new(MAX_LOOKUPS),
        }
    }
}

impl AuthQuery {
    /// The verifier of `user` for clients of `cluster`. Ok(None): the query returns no
    /// usable verifier for that user (no row, no password, an md5 hash: logged), which
    /// the caller must treat exactly like a wrong password. An error only when no
    /// lookup could be made and nothing is known; it names no node or user detail (the
    /// client has not authenticated); the log has them.
    pub async fn verifier(
        &self,
        cfg: &AuthQueryConfig,
        cluster: &ClusterCtx,
        user: &str,
    ) -> Result<Option<Verifier>, Error> {
        let ttl = Duration::from_secs(cfg.cache_s);
        let key = (cluster.name.to_string(), user.to_string());
        if let Some(fresh) = self.fresh(&key, ttl) {
            return Ok(fresh);
        }
        let flight = self.flights.lock().unwrap().entry(key.clone()).or_default().clone();
        let result = async {
            let _one = flight.lock().await;
            if let Some(fresh) = self.fresh(&key, ttl) {
                return Ok(fresh);
            }
            let _permit = self.lookups.acquire().await.expect("never closed");
            self.refresh(cfg, cluster, &key).await
        }
        .await;
        // Forget the flight when nobody else waits on it (the map holds one reference,
        // this call another), so probing many names leaves nothing behind.
        let mut flights = self.flights.lock().unwrap();
        if flights.get(&key).is_some_and(|f| Arc::strong_count(f) <= 2) {
            flights.remove(&key);
        }
        result
    }

    /// A cached result younger than `ttl`.
    fn fresh(&self, key: &Key, ttl: Duration) -> Option<Option<Verifier>> {
        let cache = self.cache.lock().unwrap();
        cache
            .get(key)
            .filter(|c| c.at.elapsed() < ttl)
            .map(|c| c.verifier.clone())
    }

    async fn refresh(&self, cfg: &AuthQueryConfig, cluster: &ClusterCtx, key: &Key) -> Result<Option<Verifier>, Error> {
        let user = key.1.as_str();
        let found = match lookup(cfg, cluster, user).await {
            Ok(found) => found,
            Err(e) => {
                let last = self.cache.lock().unwrap().get(key).map(|c| c.verifier.clone());
                return match last {
                    Some(v) => {
                        warn!(cluster = %cluster.name, user = %user, reason = %e, "auth_query failed; using what it returned last time");
                        Ok(v)
                    }
                    None => {
                        warn!(cluster = %cluster.name, user = %user, reason = %e, "auth_query failed; the client is refused");
                        Err(Error::connect_failed(
                            "authentication is not available now: the user lookup (auth_query) failed; the Switchyard log says why",
                        ))
                    }
                };
            }
        };
        let secret = found.as_deref().and_then(|text| match ScramSecret::parse(text) {
            Some(s) => Some((text, s)),
            None => {
                warn!(cluster = %cluster.name, user = %user,
                      "auth_query returned a secret that is not a SCRAM-SHA-256 verifier (an md5 hash?): the user cannot log in through Switchyard; set password_encryption = 'scram-sha-256' on the server and set the password again");
                None
            }
        });
        let mut cache = self.cache.lock().unwrap();
        // The same verifier as before: keep the entry, and with it the key a client's
        // login taught it (several logins may be under way with it).
        let verifier = match (secret, cache.get(key).and_then(|c| c.verifier.clone())) {
            (Some((_, s)), Some(old)) if old.secret() == &s => Some(old),
            (Some((text, _)), _) => Some(Verifier::new(&UserConfig::with_password(
                user,
                text,
                AuthMethod::ScramSha256,
            ))),
            (None, _) => None,
        };
        if cache.len() >= MAX_CACHED {
            let ttl = Duration::from_secs(cfg.cache_s);
            cache.retain(|_, c| c.at.elapsed() < ttl);
        }
        cache.insert(
            key.clone(),
            Cached {
                verifier: verifier.clone(),
                at: Instant::now(),
            },
        );
        Ok(verifier)
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
            let (client, task) = tls.connect_pg(&mut pg).await.map_err(|e| describe(&e))?;
            let rows = client.query(cfg.query.as_str(), &[&user]).await;
            task.abort();
            let rows = rows.map_err(|e| describe(&e))?;
            let found: Result<Option<String>, String> = match rows.first() {
                None => Ok(None),
                Some(r) => r.try_get::<_, Option<String>>(1).map_err(|e| {
                    format!("auth_query must return (user name, verifier) with the verifier as text: {e}")
                }),
            };
            found
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
