use super::*;
use crate::config::{Config, PoolMode};

/// A PgBouncer setup as its documentation describes one: transaction pooling in front
/// of one server, SCRAM, a userlist with a password, a verifier and an MD5 hash.
const INI: &str = r#"
;; pgbouncer.ini of a Django site
[databases]
app = host=127.0.0.1 port=5432 dbname=app
reports = host=127.0.0.1 port=5432 dbname=app_reports pool_size=4

[users]
batch = pool_size=2 max_user_connections=5

[pgbouncer]
listen_addr = *
listen_port = 6432
auth_type = scram-sha-256
auth_file = /etc/pgbouncer/userlist.txt
admin_users = admin
stats_users = stats
pool_mode = transaction
default_pool_size = 20
min_pool_size = 2
reserve_pool_size = 5
reserve_pool_timeout = 3
max_client_conn = 1000
server_idle_timeout = 600
server_lifetime = 3600
query_timeout = 30
query_wait_timeout = 120
idle_transaction_timeout = 60
client_idle_timeout = 0
log_connections = 0
log_disconnections = 0
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
server_reset_query = DISCARD ALL
client_tls_sslmode = require
client_tls_cert_file = /etc/pgbouncer/server.crt
client_tls_key_file = /etc/pgbouncer/server.key
"#;

const USERLIST: &str = r#"
"app" "app-secret"
"admin" "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=:dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q="
"legacy" "md5a3556571e93b0d20722ba62be61e8c2d"
"batch" "batch ""quoted"" secret"
"#;

fn convert_ok(ini: &str, userlist: Option<&str>) -> (String, Config) {
    let out = convert(&Input {
        ini,
        ini_name: "pgbouncer.ini",
        userlist,
    })
    .unwrap();
    let config = Config::parse(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    (out, config)
}

#[test]
fn a_transaction_pooling_setup_becomes_a_config_that_passes_check() {
    let (out, c) = convert_ok(INI, Some(USERLIST));
    assert_eq!(c.proxy.max_clients, 1000);
    assert!(!c.proxy.log_connections, "log_connections = 0\n{out}");
    assert!(
        Config::parse(&out.replace("log_connections = false", ""))
            .unwrap()
            .proxy
            .log_connections,
        "on unless turned off, as in PgBouncer"
    );
    assert_eq!(c.clusters.len(), 1, "one server: one cluster\n{out}");
    let (name, cluster) = c.clusters.iter().next().unwrap();
    assert_eq!(name, "app");
    assert_eq!(cluster.listen_rw.as_deref(), Some("0.0.0.0:6432"));
    assert_eq!(cluster.pool_mode, PoolMode::Transaction);
    assert_eq!(
        (cluster.pool_size, cluster.min_pool_size, cluster.reserve_pool_size),
        (20, 2, 5)
    );
    assert_eq!(cluster.reserve_pool_timeout_ms, 3000);
    assert_eq!(cluster.server_idle_timeout_ms, 600_000);
    assert_eq!(cluster.server_lifetime_ms, 3_600_000);
    assert_eq!(cluster.query_timeout_ms, 30_000);
    assert_eq!(cluster.checkout_timeout_ms, 120_000);
    assert_eq!(cluster.idle_transaction_timeout_ms, 60_000);
    assert_eq!(cluster.client_idle_timeout_ms, 0, "0 in PgBouncer is off, as here");
    assert_eq!(cluster.nodes.len(), 1);
    assert_eq!(
        (cluster.nodes[0].host.as_str(), cluster.nodes[0].port),
        ("127.0.0.1", 5432)
    );
    assert_eq!(
        c.pool_settings(name, "app", "reports").size,
        4,
        "the database's pool_size"
    );
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.cert_file.to_str(), Some("/etc/pgbouncer/server.crt"));
    assert_eq!(cluster.client_tls, Some(crate::config::ClientTls::Require));

    // Users: the password, the verifier (and its admin flag), the quoted quote; the MD5
    // hash cannot be used and is left out, said so.
    let names: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["app", "admin", "batch"]);
    assert!(c.user("admin").unwrap().admin);
    assert!(c.user("admin").unwrap().has_scram_verifier());
    assert_eq!(
        c.user("batch").unwrap().password.as_deref(),
        Some("batch \"quoted\" secret")
    );
    assert_eq!(c.user("batch").unwrap().pool_size, Some(2));
    assert_eq!(c.user("batch").unwrap().max_server_connections, Some(5));
    assert!(
        out.contains("legacy's password in the userlist is an MD5 hash"),
        "{out}"
    );
    assert_eq!(c.health.user.as_deref(), Some("app"), "a user with its password");

    // What has no equivalent is listed, not dropped silently.
    for said in [
        "logfile = /var/log/pgbouncer/pgbouncer.log",
        "ignore_startup_parameters = extra_float_digits: not needed",
        "server_reset_query = DISCARD ALL: not needed",
        "dbname=app_reports: Switchyard passes the client's database name through",
        "stats_users",
        "log_disconnections = 0: a session's end is logged when the proxy ends it",
    ] {
        assert!(out.contains(said), "{said}\n{out}");
    }
}

#[test]
fn servers_and_pool_modes_make_clusters_on_the_next_ports() {
    let ini = "[databases]\n\
        orders = host=db1,db2 port=5432,5433\n\
        legacy = host=db9 pool_mode=session\n\
        * = host=db1,db2 port=5432,5433\n\
        [pgbouncer]\nlisten_addr = 10.0.0.5\nlisten_port = 7000\npool_mode = transaction\nauth_type = md5\n";
    let (out, c) = convert_ok(ini, Some("\"u\" \"pw\"\n"));
    assert_eq!(c.clusters.len(), 2, "{out}");
    let orders = &c.clusters["orders"];
    assert_eq!(orders.pool_mode, PoolMode::Transaction);
    let nodes: Vec<(&str, u16)> = orders.nodes.iter().map(|n| (n.host.as_str(), n.port)).collect();
    assert_eq!(
        nodes,
        [("db1", 5432), ("db2", 5433)],
        "a host list: the cluster's nodes"
    );
    let legacy = &c.clusters["legacy"];
    assert_eq!(legacy.pool_mode, PoolMode::Session);
    // The first in the file keeps PgBouncer's port (whatever the host names' order).
    assert_eq!(orders.listen_rw.as_deref(), Some("10.0.0.5:7000"));
    assert_eq!(legacy.listen_rw.as_deref(), Some("10.0.0.5:7001"));
    assert_eq!(
        orders.listen_ro.as_deref(),
        Some("10.0.0.5:8000"),
        "a host list gets reads"
    );
    assert_eq!(legacy.listen_ro, None);
    assert!(out.contains("their clients connect to 7001"), "{out}");
    assert!(out.contains("* (any other database)"), "{out}");
    assert_eq!(c.users[0].auth, crate::config::AuthMethod::Md5);
}

#[test]
fn a_forced_user_and_unknown_sections_are_reported_and_bad_syntax_names_the_line() {
    let ini = "[databases]\napp = host=127.0.0.1 user=owner password=x\n[peers]\n1 = host=peer1\n[pgbouncer]\nauth_type = hba\n";
    let (out, _) = convert_ok(ini, Some("\"app\" \"pw\"\n"));
    assert!(
        out.contains("user=owner: every client logs in to the servers as itself"),
        "{out}"
    );
    assert!(
        !out.contains("password=x"),
        "a forced password is not copied into comments"
    );
    assert!(out.contains("[peers]: 1 settings not imported"), "{out}");
    assert!(out.contains("auth_type = hba: not supported"), "{out}");

    let err = convert(&Input {
        ini: "[databases]\napp = host='unterminated\n",
        ini_name: "pgbouncer.ini",
        userlist: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("pgbouncer.ini:2: unterminated quote"), "{err}");
    let err = convert(&Input {
        ini: "listen_port = 6432\n",
        ini_name: "p.ini",
        userlist: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("p.ini:1") && err.contains("before any [section]"), "{err}");
}

#[test]
fn connection_strings_durations_and_userlists_are_read_as_pgbouncer_does() {
    assert_eq!(
        parse_connstr(r"host=a  port = 5433 dbname='my db' password='it\'s'").unwrap(),
        [
            ("host".to_string(), "a".to_string()),
            ("port".into(), "5433".into()),
            ("dbname".into(), "my db".into()),
            ("password".into(), "it's".into()),
        ]
    );
    assert!(parse_connstr("host").is_err());
    assert_eq!(millis("3"), Some(3000));
    assert_eq!(millis("0.5"), Some(500));
    assert_eq!(millis("250ms"), Some(250));
    assert_eq!(millis("2min"), Some(120_000));
    assert_eq!(millis("soon"), None);
    assert_eq!(
        parse_userlist("\"a\" \"b\"\n; comment\n\"c\"\"d\" \"e\" extra\n"),
        [("a".to_string(), "b".to_string()), ("c\"d".into(), "e".into())]
    );
}

#[test]
fn user_settings_are_written_once_each_with_pgbouncers_precedence() {
    let ini = "[databases]\nreports = host=zz-prod pool_size=4\nanalytics = host=aa-analytics\n\
        [users]\nbatch = pool_size=2 max_user_connections=5 query_timeout=30\nweb = max_user_connections=0\n\
        [pgbouncer]\npool_mode = transaction\nmax_user_connections = 50\nreserve_pool_size = 3\n\
        reserve_pool_timeout = 0\nserver_lifetime = 0\nlisten_addr = 127.0.0.1,10.0.0.1\n";
    let (out, c) = convert_ok(ini, Some("\"batch\" \"pw\"\n\"web\" \"pw\"\n"));
    let batch = c.user("batch").unwrap();
    assert_eq!(
        batch.max_server_connections,
        Some(5),
        "[users] over the global value, one key"
    );
    assert_eq!(batch.query_timeout_ms, Some(30_000));
    assert_eq!(c.user("web").unwrap().max_server_connections, None, "0 is no limit");
    // The file's first database keeps the port, though its host sorts last.
    assert_eq!(c.clusters["reports"].listen_rw.as_deref(), Some("127.0.0.1:6432"));
    assert_eq!(c.clusters["analytics"].listen_rw.as_deref(), Some("127.0.0.1:6433"));
    // PgBouncer: the user's pool_size wins over the database's.
    assert_eq!(c.pool_settings("reports", "batch", "reports").size, 2);
    assert_eq!(c.pool_settings("reports", "web", "reports").size, 4);
    // reserve_pool_timeout = 0 disables the reserve there.
    assert_eq!(c.clusters["reports"].reserve_pool_size, 0);
    for said in [
        "reserve_pool_timeout = 0 disables",
        "server_lifetime = 0",
        "only 127.0.0.1 is written",
    ] {
        assert!(out.contains(said), "{said}\n{out}");
    }
}
