//! `switchyard import pgbouncer --ini pgbouncer.ini [--userlist userlist.txt]`: a
//! PgBouncer setup as a `switchyard.toml`.
//!
//! PgBouncer routes by database name on one port; Switchyard routes by port to a cluster
//! of servers and passes the database name through. So the `[databases]` entries are
//! grouped by the servers they point to (and their pool mode): each group becomes a
//! cluster, the first on PgBouncer's own `listen_addr:listen_port`, the others on the
//! next ports up (said in a comment above each). A `host=` list (PgBouncer 1.17+)
//! becomes the cluster's nodes, among which Switchyard finds the primary by itself.
//!
//! The readers of PgBouncer's files are in `read.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub use super::ImportError;
use super::{name_of, quote, unique_name, write_node, Notes};
use read::{millis, parse_connstr, parse_ini, parse_userlist, Entry};

mod read;

/// The files to convert (their text and the names to cite in messages).
pub struct Input<'a> {
    pub ini: &'a str,
    pub ini_name: &'a str,
    pub userlist: Option<&'a str>,
}

/// Servers a database entry points to and the pool mode it gets: databases with the
/// same ones share a cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    servers: Vec<(String, u16)>,
    pool_mode: String,
}

#[derive(Debug, Default)]
struct Group {
    databases: Vec<String>,
    /// Per database: its own pool size.
    pool_sizes: Vec<(String, u32)>,
}

/// Settings of `[pgbouncer]` that Switchyard does not need or has no equivalent for,
/// with why (said once each, in the closing comment).
const NO_EQUIVALENT: &[(&str, &str)] = &[
    (
        "logfile",
        "Switchyard logs to stderr (journald under systemd; --log-format json)",
    ),
    ("pidfile", "no pid file: run it under systemd or a container runtime"),
    ("syslog", "logs go to stderr"),
    ("user", "run it as a dedicated user (the Debian package's unit does)"),
    ("unix_socket_dir", "Switchyard listens on TCP only"),
    ("unix_socket_mode", "Switchyard listens on TCP only"),
    ("unix_socket_group", "Switchyard listens on TCP only"),
    (
        "server_reset_query",
        "not needed: transaction pooling tracks each client's session state and brings a connection to it",
    ),
    ("server_reset_query_always", "not needed (see server_reset_query)"),
    ("server_check_query", "health checks are built in ([health])"),
    ("server_check_delay", "health checks run every health.interval_ms"),
    (
        "server_round_robin",
        "reads are spread over healthy standbys (read_balance)",
    ),
    (
        "ignore_startup_parameters",
        "not needed: startup parameters are applied to each server connection",
    ),
    (
        "max_prepared_statements",
        "not needed: prepared statements are tracked in transaction pooling",
    ),
    ("so_reuseport", "not needed"),
    ("pkt_buf", "not needed"),
    ("sbuf_loopcnt", "not needed"),
    ("stats_period", "metrics are live (/metrics, SHOW commands)"),
    ("application_name_add_host", "not supported"),
    ("disable_pqexec", "not supported"),
    (
        "server_login_retry",
        "a failed login is retried on the next transaction, or on another node",
    ),
    (
        "server_fast_close",
        "not needed: sessions move off a node that stops serving",
    ),
    ("dns_max_ttl", "node host names are resolved at each connection"),
    ("dns_nxdomain_ttl", "node host names are resolved at each connection"),
    (
        "dns_zone_check_period",
        "node host names are resolved at each connection",
    ),
    ("resolv_conf", "the system resolver is used"),
    ("verbose", "SWITCHYARD_LOG=debug"),
    (
        "log_disconnections",
        "a session's end is logged when the proxy ends it (at debug otherwise)",
    ),
    ("log_pooler_errors", "errors are logged"),
    ("log_stats", "metrics are live (/metrics)"),
    ("tcp_keepalive", "not configurable"),
    ("tcp_keepcnt", "not configurable"),
    ("tcp_keepidle", "not configurable"),
    ("tcp_keepintvl", "not configurable"),
    ("tcp_user_timeout", "not configurable"),
    ("tcp_defer_accept", "not configurable"),
    ("tcp_socket_buffer", "not configurable"),
    ("listen_backlog", "not configurable"),
    (
        "peer_id",
        "several instances agree through etcd instead ([coordination])",
    ),
];

/// Convert; the result is the text of a `switchyard.toml`.
pub fn convert(input: &Input) -> Result<String, ImportError> {
    let ini = parse_ini(input.ini_name, input.ini)?;
    let mut notes = Notes::default();
    for inc in &ini.includes {
        notes.add(format!("%include {inc}: not read; convert that file's settings too"));
    }
    let settings: BTreeMap<String, Entry> = ini
        .section("pgbouncer")
        .map(|e| (e.key.to_ascii_lowercase(), e.clone()))
        .collect();
    let get = |k: &str| settings.get(k).map(|e| e.value.as_str());
    let mut used: Vec<&str> = Vec::new();
    let mut take = |k: &'static str| {
        used.push(k);
        get(k)
    };
    let global_mode = take("pool_mode").unwrap_or("session").to_ascii_lowercase();
    let addrs: Vec<String> = take("listen_addr")
        .unwrap_or("127.0.0.1")
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    let listen_addr = match addrs.first().map(String::as_str).unwrap_or("*") {
        "*" => {
            notes.add("listen_addr = *: written as 0.0.0.0 (IPv4); a listener takes one address, so give [::] instead for IPv6");
            "0.0.0.0".to_string()
        }
        a if a.contains(':') => format!("[{a}]"),
        a => a.to_string(),
    };
    if addrs.len() > 1 {
        notes.add(format!(
            "listen_addr = {}: a listener takes one address; only {listen_addr} is written",
            addrs.join(",")
        ));
    }
    let listen_port: u16 = match take("listen_port") {
        None => 6432,
        Some(p) => p.trim().parse().unwrap_or_else(|_| {
            notes.add(format!("listen_port = {p}: not a port; 6432 is written"));
            6432
        }),
    };

    // [databases] grouped by servers and pool mode.
    // In the order of the file: the first group keeps PgBouncer's own port.
    let mut groups: Vec<(GroupKey, Group)> = Vec::new();
    for e in ini.section("databases") {
        let params = parse_connstr(&e.value).map_err(|reason| ImportError::Syntax {
            file: input.ini_name.to_string(),
            line: e.line,
            reason,
        })?;
        let p = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let hosts: Vec<&str> = p("host").unwrap_or("127.0.0.1").split(',').map(str::trim).collect();
        let ports: Vec<u16> = p("port")
            .unwrap_or("5432")
            .split(',')
            .map(|x| x.trim().parse().unwrap_or(5432))
            .collect();
        let servers = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = if h.starts_with('/') { "127.0.0.1" } else { h };
                if h.starts_with('/') {
                    notes.add(format!(
                        "database {}: host {h} is a Unix socket directory; Switchyard connects over TCP (127.0.0.1 assumed)",
                        e.key
                    ));
                }
                (host.to_string(), *ports.get(i).or(ports.last()).unwrap_or(&5432))
            })
            .collect();
        let mode = p("pool_mode")
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| global_mode.clone());
        let database = if e.key == "*" { None } else { Some(e.key.clone()) };
        let key = GroupKey {
            servers,
            pool_mode: mode,
        };
        let at = match groups.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                groups.push((key, Group::default()));
                groups.len() - 1
            }
        };
        let group = &mut groups[at].1;
        match &database {
            Some(db) => group.databases.push(db.clone()),
            None => group.databases.push("* (any other database)".into()),
        }
        if let (Some(db), Some(dbname)) = (&database, p("dbname")) {
            if dbname != db {
                notes.add(format!(
                    "database {db}: dbname={dbname}: Switchyard passes the client's database name through; clients must ask for \"{dbname}\""
                ));
            }
        }
        if let (Some(db), Some(size)) = (&database, p("pool_size").and_then(|s| s.parse().ok())) {
            group.pool_sizes.push((db.clone(), size));
        }
        for (k, v) in &params {
            match k.as_str() {
                "host" | "port" | "dbname" | "pool_mode" | "pool_size" => {}
                "user" | "password" => notes.add(format!(
                    "database {}: {k}={}: every client logs in to the servers as itself in Switchyard; a forced user has no equivalent",
                    e.key,
                    if k == "password" { "…" } else { v }
                )),
                other => notes.add(format!("database {}: {other}={v}: no equivalent", e.key)),
            }
        }
    }
    if groups.is_empty() {
        notes.add("no [databases] entry: one cluster for a server on 127.0.0.1:5432 is written; correct its nodes");
        groups.push((
            GroupKey {
                servers: vec![("127.0.0.1".into(), 5432)],
                pool_mode: global_mode.clone(),
            },
            Group {
                databases: vec!["* (any database)".into()],
                ..Group::default()
            },
        ));
    }

    // Users: the userlist, with the auth type and [users] settings.
    let auth_type = take("auth_type").unwrap_or("md5").to_ascii_lowercase();
    let admins: Vec<String> = take("admin_users")
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if take("stats_users").is_some_and(|v| !v.trim().is_empty()) {
        notes.add("stats_users: the admin console has no read-only role; those users are not made admins");
    }
    let mut user_settings: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for e in ini.section("users") {
        match parse_connstr(&e.value) {
            Ok(params) => {
                user_settings.insert(e.key.clone(), params);
            }
            Err(reason) => notes.add(format!("[users] {} (line {}): {reason}; not imported", e.key, e.line)),
        }
    }
    let max_user_connections = take("max_user_connections")
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| *n > 0);
    let max_user_clients = take("max_user_client_connections")
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| *n > 0);
    let mut users = String::new();
    let mut user_pools: Vec<(String, u64)> = Vec::new();
    let mut health_user: Option<String> = None;
    let mut first_user: Option<String> = None;
    let userlist = input.userlist.map(parse_userlist).unwrap_or_default();
    if input.userlist.is_none() {
        if let Some(file) = take("auth_file") {
            notes.add(format!(
                "auth_file = {file}: not read; pass it with --userlist to import its users"
            ));
        }
    } else {
        take("auth_file");
    }
    let method = match auth_type.as_str() {
        "scram-sha-256" | "md5" => auth_type.clone(),
        "trust" | "any" => "trust".into(),
        "plain" => {
            notes.add("auth_type = plain: clients are asked for SCRAM-SHA-256 instead of a cleartext password");
            "scram-sha-256".into()
        }
        other => {
            notes.add(format!(
                "auth_type = {other}: not supported; users get SCRAM-SHA-256 (hba rules belong in pg_hba.conf on the servers, behind the proxy)"
            ));
            "scram-sha-256".into()
        }
    };
    if auth_type == "any" {
        notes.add("auth_type = any: Switchyard always logs in to servers as the client's own user");
    }
    for (name, password) in &userlist {
        let is_verifier = password.starts_with("SCRAM-SHA-256$");
        let is_md5_hash =
            password.len() == 35 && password.starts_with("md5") && password[3..].chars().all(|c| c.is_ascii_hexdigit());
        if is_md5_hash && method != "trust" {
            // Left commented out: the config must not name a user it cannot check.
            let _ = writeln!(
                users,
                "# {name}'s password in the userlist is an MD5 hash, which Switchyard cannot use: give the\n\
                 # password itself or its SCRAM verifier (pg_authid.rolpassword), here or with password_file.\n\
                 # [[users]]\n# name = {}\n",
                quote(name)
            );
            continue;
        }
        let _ = writeln!(users, "[[users]]\nname = {}", quote(name));
        let auth = if is_verifier && method != "trust" {
            "scram-sha-256"
        } else {
            method.as_str()
        };
        if auth != "trust" || !password.is_empty() {
            let _ = writeln!(users, "password = {}", quote(password));
        }
        let _ = writeln!(users, "auth = {}", quote(auth));
        if admins.iter().any(|a| a == name) {
            let _ = writeln!(users, "admin = true  # admin_users");
        }
        // The user's keys: the global defaults, then its own [users] values over them
        // (each key written once).
        let mut keys: BTreeMap<&'static str, (u64, String)> = BTreeMap::new();
        if let Some(n) = max_user_connections {
            keys.insert("max_server_connections", (n.into(), "max_user_connections".into()));
        }
        if let Some(n) = max_user_clients {
            keys.insert("max_clients", (n.into(), "max_user_client_connections".into()));
        }
        for (k, v) in user_settings.get(name).into_iter().flatten() {
            let (key, value) = match k.as_str() {
                "pool_size" => ("pool_size", v.parse::<u64>().ok()),
                // 0 is "no limit" in PgBouncer: no key.
                "max_user_connections" => ("max_server_connections", v.parse::<u64>().ok()),
                "max_user_client_connections" => ("max_clients", v.parse::<u64>().ok()),
                "query_timeout" => ("query_timeout_ms", millis(v)),
                "idle_transaction_timeout" => ("idle_transaction_timeout_ms", millis(v)),
                "client_idle_timeout" => ("client_idle_timeout_ms", millis(v)),
                other => {
                    notes.add(format!("[users] {name}: {other}={v}: no per-user equivalent"));
                    continue;
                }
            };
            match value {
                Some(0) if !key.ends_with("_ms") => {
                    keys.remove(key);
                }
                Some(n) => {
                    keys.insert(key, (n, format!("[users] {k}")));
                }
                None => notes.add(format!("[users] {name}: {k}={v}: not a number; not imported")),
            }
        }
        for (key, (n, from)) in &keys {
            let _ = writeln!(users, "{key} = {n}  # {from}");
        }
        // PgBouncer's [users] pool_size wins over a database's; here the database's
        // entry would, so the pair gets its own entry.
        if let Some((n, _)) = keys.get("pool_size") {
            user_pools.push((name.clone(), *n));
        }
        users.push('\n');
        first_user.get_or_insert_with(|| name.clone());
        if health_user.is_none() && !is_verifier && !password.is_empty() {
            health_user = Some(name.clone());
        }
    }
    for name in user_settings.keys() {
        if !userlist.iter().any(|(u, _)| u == name) {
            notes.add(format!(
                "[users] {name}: not in the userlist; its settings were not applied"
            ));
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by `switchyard import pgbouncer` from {}.\n\
         # Review it, then: switchyard check --config switchyard.toml\n\
         # PgBouncer settings with no equivalent are listed at the end.\n",
        input.ini_name
    );

    // [proxy]
    let mut proxy = String::new();
    if let Some(n) = take("max_client_conn").and_then(|v| v.parse::<u32>().ok()) {
        let _ = writeln!(proxy, "max_clients = {n}  # max_client_conn");
    }
    if let Some(ms) = take("client_login_timeout").and_then(millis).filter(|ms| *ms > 0) {
        let _ = writeln!(proxy, "client_login_timeout_ms = {ms}  # client_login_timeout");
    }
    if take("log_connections").is_some_and(|v| matches!(v.trim(), "0" | "off" | "no" | "false")) {
        let _ = writeln!(proxy, "log_connections = false  # log_connections");
    }
    if !proxy.is_empty() {
        let _ = writeln!(out, "[proxy]\n{proxy}");
    }

    // [health]: Switchyard checks every server itself.
    let _ = writeln!(
        out,
        "# Switchyard checks every server in the background (role, lag) and logs in as this user."
    );
    let _ = writeln!(out, "[health]");
    match (&health_user, &first_user) {
        (Some(u), _) => {
            let _ = writeln!(out, "user = {}\n", quote(u));
        }
        (None, Some(u)) => {
            let _ = writeln!(
                out,
                "user = {}\n# Its userlist entry is a SCRAM verifier; health checks need the password itself.\npassword_env = \"SWITCHYARD_HEALTH_PASSWORD\"\n",
                quote(u)
            );
        }
        (None, None) => {
            let user = take("auth_user").unwrap_or("postgres");
            let _ = writeln!(
                out,
                "user = {}\npassword_env = \"SWITCHYARD_HEALTH_PASSWORD\"\n",
                quote(user)
            );
        }
    }

    // [tls]: the certificate clients see.
    let client_mode = take("client_tls_sslmode").unwrap_or("disable").to_ascii_lowercase();
    let (cert, key, ca) = (
        take("client_tls_cert_file"),
        take("client_tls_key_file"),
        take("client_tls_ca_file"),
    );
    let client_tls = match (client_mode.as_str(), cert, key) {
        ("disable", _, _) => None,
        (mode, Some(cert), Some(key)) => {
            let _ = writeln!(out, "[tls]\ncert_file = {}\nkey_file = {}", quote(cert), quote(key));
            if let Some(ca) = ca {
                let _ = writeln!(out, "client_ca_file = {}", quote(ca));
            }
            out.push('\n');
            Some(match mode {
                "allow" | "prefer" => "allow",
                _ => "require",
            })
        }
        (mode, _, _) => {
            notes.add(format!(
                "client_tls_sslmode = {mode} without client_tls_cert_file and client_tls_key_file: no client TLS written"
            ));
            None
        }
    };
    if matches!(client_mode.as_str(), "verify-ca" | "verify-full") {
        notes.add("client_tls_sslmode verify-*: clients' certificates are verified when presented (tls.client_ca_file), not required");
    }

    // [auth_query]
    match (take("auth_user"), take("auth_query")) {
        (Some(user), query) => {
            let _ = writeln!(
                out,
                "# Users not in [[users]] are looked up on the servers (auth_user, auth_query)."
            );
            let _ = writeln!(out, "[auth_query]\nuser = {}", quote(user));
            match userlist.iter().find(|(u, _)| u == user) {
                Some((_, pw)) if !pw.starts_with("SCRAM-SHA-256$") && !pw.starts_with("md5") => {
                    let _ = writeln!(out, "password = {}", quote(pw));
                }
                _ => {
                    let _ = writeln!(out, "password_env = \"SWITCHYARD_AUTH_QUERY_PASSWORD\"");
                }
            }
            if let Some(q) = query {
                let _ = writeln!(out, "query = {}", quote(q));
            }
            if let Some(db) = take("auth_dbname") {
                let _ = writeln!(out, "database = {}", quote(db));
            }
            out.push('\n');
        }
        (None, Some(_)) => notes.add("auth_query without auth_user: not imported"),
        (None, None) => {}
    }

    out.push_str(&users);

    // Clusters.
    let server_mode = take("server_tls_sslmode").map(str::to_ascii_lowercase);
    let server_ca = take("server_tls_ca_file");
    // 0 means "disabled" for these in PgBouncer: said, not written.
    let reserve_off = take("reserve_pool_timeout").and_then(millis) == Some(0);
    if reserve_off && get("reserve_pool_size").is_some_and(|v| v.trim() != "0") {
        notes.add("reserve_pool_timeout = 0 disables PgBouncer's reserve pool: reserve_pool_size is not written");
    }
    if take("server_idle_timeout").and_then(millis) == Some(0) {
        notes.add("server_idle_timeout = 0 (never close idle connections): Switchyard's server_idle_timeout_ms keeps its default");
    }
    if take("server_lifetime").and_then(millis) == Some(0) {
        notes.add("server_lifetime = 0 (use a connection once): no equivalent; server_lifetime_ms keeps its default");
    }
    let cluster_keys: Vec<(&'static str, &'static str, Option<u64>)> = vec![
        (
            "default_pool_size",
            "pool_size",
            take("default_pool_size").and_then(|v| v.parse().ok()),
        ),
        (
            "min_pool_size",
            "min_pool_size",
            take("min_pool_size").and_then(|v| v.parse().ok()),
        ),
        (
            "reserve_pool_size",
            "reserve_pool_size",
            take("reserve_pool_size")
                .and_then(|v| v.parse().ok())
                .filter(|_| !reserve_off),
        ),
        (
            "reserve_pool_timeout",
            "reserve_pool_timeout_ms",
            take("reserve_pool_timeout").and_then(millis).filter(|v| *v > 0),
        ),
        (
            "server_idle_timeout",
            "server_idle_timeout_ms",
            take("server_idle_timeout").and_then(millis).filter(|v| *v > 0),
        ),
        (
            "server_lifetime",
            "server_lifetime_ms",
            take("server_lifetime").and_then(millis).filter(|v| *v > 0),
        ),
        (
            "server_connect_timeout",
            "server_login_timeout_ms",
            take("server_connect_timeout").and_then(millis).filter(|v| *v > 0),
        ),
        (
            "query_wait_timeout",
            "checkout_timeout_ms",
            take("query_wait_timeout").and_then(millis).filter(|v| *v > 0),
        ),
        (
            "query_timeout",
            "query_timeout_ms",
            take("query_timeout").and_then(millis).filter(|v| *v > 0),
        ),
        (
            "client_idle_timeout",
            "client_idle_timeout_ms",
            take("client_idle_timeout").and_then(millis).filter(|v| *v > 0),
        ),
        (
            "idle_transaction_timeout",
            "idle_transaction_timeout_ms",
            take("idle_transaction_timeout").and_then(millis).filter(|v| *v > 0),
        ),
    ];
    if take("query_wait_timeout").and_then(millis) == Some(0) {
        notes.add("query_wait_timeout = 0 (wait forever): Switchyard always bounds the wait (checkout_timeout_ms)");
    }
    for k in ["max_db_connections"] {
        if let Some(v) = take(k).filter(|v| v.trim() != "0") {
            notes.add(format!(
                "{k} = {v}: no per-database cap; max_server_connections caps a node's connections for all databases"
            ));
        }
    }
    let mut taken_names: Vec<String> = Vec::new();
    for (i, (key, group)) in groups.iter().enumerate() {
        let base = group
            .databases
            .first()
            .filter(|d| !d.starts_with('*'))
            .map(|d| name_of(d))
            .unwrap_or_else(|| "main".into());
        let name = unique_name(base, &mut taken_names);
        let port = listen_port as u32 + i as u32;
        let _ = writeln!(out, "# Databases: {}.", group.databases.join(", "));
        if i > 0 {
            let _ = writeln!(
                out,
                "# PgBouncer served them on port {listen_port}; Switchyard routes by port, so their clients connect to {port}."
            );
        }
        let _ = writeln!(out, "[clusters.{name}]");
        let _ = writeln!(out, "listen_rw = {}", quote(&format!("{listen_addr}:{port}")));
        let ro = quote(&format!("{listen_addr}:{}", port + 1000));
        if key.servers.len() > 1 {
            // PgBouncer spreads a host list's connections over every host, which must
            // all serve: often read replicas. Switchyard sends listen_rw to the one
            // that reports primary and listen_ro over the healthy standbys.
            let _ = writeln!(out, "listen_ro = {ro}  # reads over the standbys of the host list");
            notes.add(format!(
                "cluster {name}: a host list is spread over all its hosts by PgBouncer; here listen_rw goes to the one that is primary and listen_ro ({ro}) over the standbys: point read-only clients (a replica-only list) at listen_ro"
            ));
        } else {
            let _ = writeln!(
                out,
                "# listen_ro = {ro}  # reads spread over the standbys, once they are listed as nodes"
            );
        }
        let mode = match key.pool_mode.as_str() {
            "transaction" => "transaction",
            "statement" => {
                notes.add(format!(
                    "cluster {name}: pool_mode = statement: transaction pooling is written (it allows multi-statement transactions too)"
                ));
                "transaction"
            }
            _ => "session",
        };
        let _ = writeln!(out, "pool_mode = {}", quote(mode));
        for (from, to, value) in &cluster_keys {
            if let Some(v) = value {
                let _ = writeln!(out, "{to} = {v}  # {from}");
            }
        }
        if let Some(c) = client_tls {
            let _ = writeln!(out, "client_tls = {}  # client_tls_sslmode = {client_mode}", quote(c));
        }
        if let Some(mode) = &server_mode {
            let m = match mode.as_str() {
                "disable" => "disable",
                "allow" | "prefer" => "prefer",
                "require" => "require",
                "verify-ca" => "verify-ca",
                "verify-full" => "verify-full",
                other => {
                    notes.add(format!("server_tls_sslmode = {other}: unknown; prefer is written"));
                    "prefer"
                }
            };
            let _ = writeln!(out, "server_tls = {}  # server_tls_sslmode", quote(m));
            if let Some(ca) = server_ca {
                let _ = writeln!(out, "server_ca_file = {}  # server_tls_ca_file", quote(ca));
            }
        }
        out.push('\n');
        let mut node_names: Vec<String> = Vec::new();
        for (host, port) in &key.servers {
            let mut node = name_of(host);
            if node_names.contains(&node) {
                node = format!("{node}_{port}");
            }
            node_names.push(node.clone());
            write_node(&mut out, &name, &node, host, *port);
        }
        if key.servers.len() == 1 {
            let _ = writeln!(
                out,
                "# Add the standbys as more [[clusters.{name}.nodes]]: Switchyard finds the primary among them.\n"
            );
        }
        for (db, size) in &group.pool_sizes {
            let _ = writeln!(
                out,
                "[[clusters.{name}.pools]]\ndatabase = {}\npool_size = {size}  # [databases] pool_size\n",
                quote(db)
            );
            // In PgBouncer a user's pool_size wins over the database's.
            for (user, n) in &user_pools {
                let _ = writeln!(
                    out,
                    "[[clusters.{name}.pools]]\nuser = {}\ndatabase = {}\npool_size = {n}  # [users] pool_size, over the database's\n",
                    quote(user),
                    quote(db)
                );
            }
        }
    }

    // What did not carry over.
    for (k, e) in &settings {
        if used.contains(&k.as_str()) {
            continue;
        }
        match NO_EQUIVALENT.iter().find(|(n, _)| n == k) {
            Some((_, why)) => notes.add(format!("{k} = {}: {why}", e.value)),
            None => notes.add(format!("{k} = {}: no equivalent (line {})", e.value, e.line)),
        }
    }
    for (section, entries) in &ini.sections {
        if !["pgbouncer", "databases", "users"]
            .iter()
            .any(|s| section.eq_ignore_ascii_case(s))
        {
            notes.add(format!("[{section}]: {} settings not imported", entries.len()));
        }
    }
    notes.write_to(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests;
