//! Defaults of keys that are not their type's default, one function per key, named
//! `<section>_<key>` (serde's `default = "..."` takes a path).

use super::*;

pub fn auth_query_cache_s() -> u64 {
    30
}

pub fn auth_query_database() -> String {
    "postgres".into()
}

pub fn auth_query_query() -> String {
    "SELECT rolname::text, rolpassword FROM pg_catalog.pg_authid \
     WHERE rolname = $1 AND rolcanlogin AND (rolvaliduntil IS NULL OR rolvaliduntil > now())"
        .into()
}

pub fn cluster_checkout_timeout_ms() -> u64 {
    5000
}

pub fn cluster_connect_timeout_ms() -> u64 {
    5000
}

pub fn cluster_failover() -> FailoverMode {
    FailoverMode::Follow
}

pub fn cluster_failover_cooldown_s() -> u64 {
    300
}

pub fn cluster_failover_max_lag_bytes() -> u64 {
    1 << 20
}

pub fn cluster_max_server_logins() -> u32 {
    16
}

pub fn cluster_max_replica_lag_ms() -> u64 {
    10000
}

pub fn cluster_pool_mode() -> PoolMode {
    PoolMode::Session
}

pub fn cluster_pool_size() -> u32 {
    20
}

pub fn cluster_reserve_pool_timeout_ms() -> u64 {
    1000
}

pub fn cluster_read_balance() -> ReadBalance {
    ReadBalance::Priority
}

pub fn cluster_read_your_writes() -> ReadYourWrites {
    ReadYourWrites::Session
}

pub fn cluster_server_idle_timeout_ms() -> u64 {
    600_000
}

pub fn cluster_server_lifetime_ms() -> u64 {
    3_600_000
}

pub fn cluster_server_login_timeout_ms() -> u64 {
    2000
}

pub fn cluster_split_brain() -> SplitBrainRule {
    SplitBrainRule::NewestTimeline
}

pub fn cluster_switchover_timeout_ms() -> u64 {
    15000
}

pub fn coordination_lease_s() -> u64 {
    5
}

pub fn coordination_prefix() -> String {
    "/switchyard".into()
}

pub fn health_database() -> String {
    "postgres".into()
}

pub fn health_fall() -> u32 {
    2
}

pub fn health_interval_ms() -> u64 {
    1000
}

pub fn health_rise() -> u32 {
    2
}

pub fn health_timeout_ms() -> u64 {
    1000
}

pub fn node_port() -> u16 {
    5432
}

pub fn proxy_client_login_timeout_ms() -> u64 {
    15000
}

pub fn proxy_max_clients() -> u32 {
    5000
}

pub fn proxy_log_connections() -> bool {
    true
}

pub fn proxy_max_message_bytes() -> u32 {
    256 << 20
}

pub fn proxy_shutdown_timeout_ms() -> u64 {
    10000
}

pub fn user_auth() -> AuthMethod {
    AuthMethod::ScramSha256
}

pub fn telemetry_query_digests() -> bool {
    true
}

pub fn telemetry_max_digests() -> usize {
    5_000
}

pub fn telemetry_sample_ratio() -> f64 {
    0.01
}
