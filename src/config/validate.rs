//! `Config::validate`: the rules a config must satisfy beyond its shape, each error
//! naming the key at fault.

use std::collections::HashSet;

use super::*;

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.health;
        for (key, v) in [
            ("health.interval_ms", h.interval_ms),
            ("health.timeout_ms", h.timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if h.rise == 0 {
            return Err(invalid("health.rise", "must be at least 1"));
        }
        if h.fall == 0 {
            return Err(invalid("health.fall", "must be at least 1"));
        }
        if self.proxy.max_clients == 0 {
            return Err(invalid("proxy.max_clients", "must be at least 1"));
        }
        let t = &self.telemetry;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(invalid("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if let Some(e) = &t.otlp_endpoint {
            if !e.starts_with("http://") {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    "must be an http:// URL of an OTLP/HTTP receiver (https is not supported yet: send to a local OpenTelemetry Collector)",
                ));
            }
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.max_clients == Some(0) {
                return Err(invalid(format!("users[{i}].max_clients"), "must be at least 1"));
            }
            if u.max_server_connections == Some(0) {
                return Err(invalid(
                    format!("users[{i}].max_server_connections"),
                    "must be at least 1",
                ));
            }
            if u.pool_size == Some(0) {
                return Err(invalid(format!("users[{i}].pool_size"), "must be at least 1"));
            }
        }
        for (name, c) in &self.clusters {
            if c.max_clients == Some(0) {
                return Err(invalid(format!("clusters.{name}.max_clients"), "must be at least 1"));
            }
            for (i, p) in c.pools.iter().enumerate() {
                if p.pool_size == 0 {
                    return Err(invalid(
                        format!("clusters.{name}.pools[{i}].pool_size"),
                        "must be at least 1",
                    ));
                }
                if p.user.is_none() && p.database.is_none() {
                    return Err(invalid(
                        format!("clusters.{name}.pools[{i}]"),
                        "give a user, a database or both (the cluster's own size is pool_size)",
                    ));
                }
            }
            if c.max_server_connections == Some(0) {
                return Err(invalid(
                    format!("clusters.{name}.max_server_connections"),
                    "must be at least 1",
                ));
            }
            if c.max_server_logins == 0 {
                return Err(invalid(
                    format!("clusters.{name}.max_server_logins"),
                    "must be at least 1",
                ));
            }
            if c.engine == Engine::Mysql {
                if let Some(p) = c.pools.iter().find(|p| p.database.is_some()) {
                    return Err(invalid(
                        format!("clusters.{name}.pools"),
                        format!(
                            "MySQL/MariaDB pools are per user (a connection changes database with COM_INIT_DB): drop database = \"{}\" or give the user's size",
                            p.database.as_deref().unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        if self.proxy.max_message_bytes < 1024 {
            return Err(invalid("proxy.max_message_bytes", "must be at least 1024"));
        }
        if let Some(a) = &self.admin.http_listen {
            if a.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    "admin.http_listen",
                    format!("\"{a}\" is not an address like 127.0.0.1:9930"),
                ));
            }
        }
        if self.users.is_empty() && self.auth_query.is_none() {
            return Err(invalid(
                "users",
                "at least one [[users]] entry is required (or [auth_query] to look users up on the servers)",
            ));
        }
        if self.users.is_empty() && self.health.user.is_none() {
            return Err(invalid("health.user", "required when [[users]] is empty"));
        }
        if let Some(q) = &self.auth_query {
            if !q.query.contains("$1") {
                return Err(invalid("auth_query.query", "must take the user name as $1"));
            }
        }
        let mut names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(invalid(format!("users[{i}].name"), "must not be empty"));
            }
            if !names.insert(&u.name) {
                return Err(invalid(
                    format!("users[{i}].name"),
                    format!("duplicate user \"{}\"", u.name),
                ));
            }
            if u.auth != AuthMethod::Trust && u.password.is_none() {
                return Err(invalid(
                    format!("users[{i}].password"),
                    format!("required for auth = {:?}", u.auth),
                ));
            }
            if u.has_scram_verifier()
                && u.password
                    .as_deref()
                    .and_then(crate::scram::ScramSecret::parse)
                    .is_none()
            {
                return Err(invalid(
                    format!("users[{i}].password"),
                    "looks like a SCRAM verifier but is not one: expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (base64), as in pg_authid.rolpassword",
                ));
            }
            if u.has_scram_verifier() && u.auth != AuthMethod::ScramSha256 {
                return Err(invalid(
                    format!("users[{i}].auth"),
                    "a SCRAM verifier as the password works with auth = \"scram-sha-256\" only (md5 and cleartext need the password itself)",
                ));
            }
        }
        let (health_user, health_password) = self.health_login();
        if health_password.is_none() && self.user(&health_user).is_some_and(UserConfig::has_scram_verifier) {
            return Err(invalid(
                "health.password",
                format!("required: user \"{health_user}\" has a SCRAM verifier in [[users]], and health checks need a password"),
            ));
        }
        if let Some(u) = &h.user {
            if h.password.is_none() && self.user(u).is_none() {
                return Err(invalid(
                    "health.password",
                    "required when health.user is not one of [[users]]",
                ));
            }
        }
        if self.clusters.is_empty() {
            return Err(invalid("clusters", "at least one [clusters.<name>] table is required"));
        }
        if let Some(c) = &self.coordination {
            if c.etcd.is_empty() {
                return Err(invalid("coordination.etcd", "at least one etcd URL is required"));
            }
            if let Some(bad) = c.etcd.iter().find(|u| !u.starts_with("http://")) {
                return Err(invalid(
                    "coordination.etcd",
                    format!("\"{bad}\" is not an http:// URL (etcd's client URL, e.g. http://127.0.0.1:2379)"),
                ));
            }
            if c.instance.is_empty() || c.instance.contains('/') {
                return Err(invalid("coordination.instance", "must be a non-empty name without '/'"));
            }
            if c.lease_s == 0 {
                return Err(invalid("coordination.lease_s", "must be at least 1"));
            }
        }
        let mut listens = HashSet::new();
        for (cname, c) in &self.clusters {
            if c.listen_rw.is_none() && c.listen_ro.is_none() {
                return Err(invalid(
                    format!("clusters.{cname}.listen_rw"),
                    "a cluster needs listen_rw, listen_ro or both",
                ));
            }
            for (key, addr) in [("listen_rw", &c.listen_rw), ("listen_ro", &c.listen_ro)] {
                if let Some(a) = addr {
                    let parsed: SocketAddr = a.parse().map_err(|_| {
                        invalid(
                            format!("clusters.{cname}.{key}"),
                            format!("\"{a}\" is not an address like 127.0.0.1:6432"),
                        )
                    })?;
                    if !listens.insert(parsed) {
                        return Err(invalid(format!("clusters.{cname}.{key}"), format!("{a} is used twice")));
                    }
                }
            }
            if c.pool_size == 0 {
                return Err(invalid(format!("clusters.{cname}.pool_size"), "must be at least 1"));
            }
            if c.min_pool_size > c.pool_size {
                return Err(invalid(
                    format!("clusters.{cname}.min_pool_size"),
                    "must not exceed pool_size",
                ));
            }
            if c.causal_wait_ms > 60_000 {
                return Err(invalid(
                    format!("clusters.{cname}.causal_wait_ms"),
                    "must be at most 60000 (a read waits this long before going to the primary)",
                ));
            }
            // MySQL splits in session pooling (a session keeps a replica connection
            // beside its primary one); PostgreSQL splits per transaction.
            if c.read_write_split && c.pool_mode != PoolMode::Transaction && c.engine != Engine::Mysql {
                return Err(invalid(
                    format!("clusters.{cname}.read_write_split"),
                    "needs pool_mode = \"transaction\"",
                ));
            }
            if self.tls.is_none() && matches!(c.client_tls, Some(ClientTls::Allow | ClientTls::Require)) {
                return Err(invalid(
                    format!("clusters.{cname}.client_tls"),
                    "needs a [tls] section with cert_file and key_file",
                ));
            }
            if matches!(c.server_tls, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull) && c.server_ca_file.is_none()
            {
                return Err(invalid(
                    format!("clusters.{cname}.server_tls"),
                    format!(
                        "\"{}\" needs server_ca_file (the CA that signed the servers' certificates)",
                        c.server_tls
                    ),
                ));
            }
            if c.failover == FailoverMode::Automatic && c.manager.is_none() {
                return Err(invalid(
                    format!("clusters.{cname}.failover"),
                    format!("\"automatic\" needs [clusters.{cname}.manager] (a superuser login to promote a standby and repoint the others)"),
                ));
            }
            for (key, v) in [
                ("connect_timeout_ms", c.connect_timeout_ms),
                ("server_login_timeout_ms", c.server_login_timeout_ms),
            ] {
                if v == 0 {
                    return Err(invalid(format!("clusters.{cname}.{key}"), "must be greater than 0"));
                }
            }
            if c.nodes.is_empty() {
                return Err(invalid(
                    format!("clusters.{cname}.nodes"),
                    "at least one node is required",
                ));
            }
            let mut node_names = HashSet::new();
            for (i, n) in c.nodes.iter().enumerate() {
                if n.name.is_empty() {
                    return Err(invalid(
                        format!("clusters.{cname}.nodes[{i}].name"),
                        "must not be empty",
                    ));
                }
                if !node_names.insert(&n.name) {
                    return Err(invalid(
                        format!("clusters.{cname}.nodes[{i}].name"),
                        format!("duplicate node \"{}\"", n.name),
                    ));
                }
                if n.host.is_empty() {
                    return Err(invalid(
                        format!("clusters.{cname}.nodes[{i}].host"),
                        "must not be empty",
                    ));
                }
                if n.port == 0 {
                    return Err(invalid(format!("clusters.{cname}.nodes[{i}].port"), "must not be 0"));
                }
            }
        }
        Ok(())
    }
}
