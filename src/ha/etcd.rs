//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/...`, `/v3/lease/...`),
//! enough for leases, compare-and-swap transactions and prefix reads.
//!
//! Why not the `etcd-client` crate: it brings gRPC (tonic, prost, a protobuf build
//! step) for a handful of calls a second; the gateway ships with every etcd since 3.3
//! (Debian's 3.4 included) and `ureq` is already a dependency. Calls are blocking and
//! run on tokio's blocking pool, each bounded by a timeout; every configured endpoint is
//! tried in turn, so the loss of one etcd member costs one timeout at most.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd refused the request: {0}")]
    Refused(String),
}

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub lease: i64,
}

/// A comparison of a transaction.
pub enum Compare<'a> {
    /// The key does not exist.
    Absent(&'a str),
    /// The key's value is exactly this.
    ValueIs(&'a str, &'a str),
    /// The key was last modified at this revision.
    ModRevision(&'a str, i64),
}

/// An operation of a transaction.
pub enum Op<'a> {
    Put { key: &'a str, value: &'a str, lease: i64 },
    Delete(&'a str),
}

#[derive(Clone)]
pub struct Etcd {
    /// The members' client URLs, tried in order (replaced on reload: `set_endpoints`).
    endpoints: Arc<RwLock<Arc<Vec<String>>>>,
    agent: ureq::Agent,
}

fn endpoints(urls: &[String]) -> Arc<Vec<String>> {
    Arc::new(urls.iter().map(|e| e.trim_end_matches('/').to_string()).collect())
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> String {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// int64 fields come as strings from the gateway.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of a prefix range: the prefix with its last byte incremented.
fn prefix_end(prefix: &str) -> String {
    let mut b = prefix.as_bytes().to_vec();
    while let Some(last) = b.pop() {
        if last < 0xff {
            b.push(last + 1);
            return B64.encode(&b);
        }
    }
    B64.encode([0u8])
}

impl Etcd {
    pub fn new(endpoints: &[String], timeout: Duration) -> Etcd {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Etcd {
            endpoints: Arc::new(RwLock::new(self::endpoints(endpoints))),
            agent,
        }
    }

    /// Talk to these members from the next request on (a reload changed
    /// `coordination.etcd`; requests in flight finish with the old list).
    pub fn set_endpoints(&self, urls: &[String]) {
        *self.endpoints.write().unwrap() = endpoints(urls);
    }

    /// POST `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &'static str, body: Value) -> Result<Value, EtcdError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let body = body.to_string();
            let mut errors = Vec::new();
            let endpoints = this.endpoints.read().unwrap().clone();
            for e in endpoints.iter() {
                let url = format!("{e}{path}");
                match this
                    .agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .send(&body)
                {
                    Ok(mut resp) => {
                        let status = resp.status().as_u16();
                        let text = resp.body_mut().read_to_string().unwrap_or_default();
                        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        if status == 200 {
                            return Ok(v);
                        }
                        // A member without a leader (partitioned) answers 503: try the next.
                        let msg = v["error"]
                            .as_str()
                            .or(v["message"].as_str())
                            .unwrap_or(&text)
                            .to_string();
                        if status >= 500 {
                            errors.push(format!("{e}: {msg}"));
                            continue;
                        }
                        return Err(EtcdError::Refused(msg));
                    }
                    Err(err) => errors.push(format!("{e}: {err}")),
                }
            }
            Err(EtcdError::Unreachable(errors.join("; ")))
        })
        .await
        .unwrap_or_else(|e| Err(EtcdError::Unreachable(e.to_string())))
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", json!({"TTL": ttl.as_secs().max(1).to_string()}))
            .await?;
        Ok(int(&v["ID"]))
    }

    /// Renew lease `id`; false when it has expired (its keys are gone).
    pub async fn keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let v = self.call("/v3/lease/keepalive", json!({"ID": id.to_string()})).await?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({"ID": id.to_string()}))
            .await
            .map(|_| ())
    }

    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), EtcdError> {
        let mut body = json!({"key": b64(key), "value": b64(value)});
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        self.call("/v3/kv/put", body).await.map(|_| ())
    }

    /// Every key under `prefix`, and the store's revision.
    pub async fn range(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix), "range_end": prefix_end(prefix)}),
            )
            .await?;
        let kvs = v["kvs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|kv| Kv {
                        key: unb64(&kv["key"]),
                        value: unb64(&kv["value"]),
                        mod_revision: int(&kv["mod_revision"]),
                        create_revision: int(&kv["create_revision"]),
                        lease: int(&kv["lease"]),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((kvs, int(&v["header"]["revision"])))
    }

    /// Run `success` if every comparison holds, else nothing; whether it held.
    pub async fn txn(&self, compare: &[Compare<'_>], success: &[Op<'_>]) -> Result<bool, EtcdError> {
        let compare: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => {
                    json!({"key": b64(k), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
                }
                Compare::ValueIs(k, v) => {
                    json!({"key": b64(k), "target": "VALUE", "result": "EQUAL", "value": b64(v)})
                }
                Compare::ModRevision(k, r) => {
                    json!({"key": b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()})
                }
            })
            .collect();
        let success: Vec<Value> = success
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let mut p = json!({"key": b64(key), "value": b64(value)});
                    if *lease != 0 {
                        p["lease"] = json!(lease.to_string());
                    }
                    json!({"request_put": p})
                }
                Op::Delete(k) => json!({"request_delete_range": {"key": b64(k)}}),
            })
            .collect();
        let v = self
            .call("/v3/kv/txn", json!({"compare": compare, "success": success}))
            .await?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prefix_range_ends_after_every_key_under_it() {
        use base64::Engine;
        let end = super::B64.decode(super::prefix_end("/sy/main/")).unwrap();
        assert_eq!(end, b"/sy/main0");
        assert_eq!(super::int(&serde_json::json!("42")), 42);
        assert_eq!(super::int(&serde_json::json!(7)), 7);
    }
}
