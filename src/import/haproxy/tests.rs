use super::read::{listen_addr, millis as haproxy_millis, server_addr, words};
use super::*;
use crate::config::{Config, PoolMode, ReadBalance};

/// Convert, then load the result with the real config loader, the password the header
/// asks for given as an operator would.
fn convert_ok(cfg: &str) -> (String, Config) {
    let out = convert(&Input {
        cfg,
        cfg_name: "haproxy.cfg",
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let filled = out.replace(
        &format!("password_env = \"{PASSWORD_ENV}\""),
        "password = \"postgres-secret\"",
    );
    assert_eq!(
        filled.matches("password = \"postgres-secret\"").count(),
        2,
        "[health] and [auth_query] take the one password\n{out}"
    );
    let config = Config::parse(&filled).unwrap_or_else(|e| panic!("{e}\n{out}"));
    (out, config)
}

fn convert_err(cfg: &str) -> String {
    convert(&Input {
        cfg,
        cfg_name: "haproxy.cfg",
    })
    .unwrap_err()
    .to_string()
}

/// The shape of the example in Patroni's repository: one listen section, `option
/// httpchk` alone (OPTIONS /, which Patroni answers 200 on the primary only), a REST API
/// port per node.
const PATRONI_EXAMPLE: &str = r#"
global
    maxconn 100

defaults
    log global
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen stats
    mode http
    bind *:7000
    stats enable
    stats uri /

listen batman
    bind *:5000
    option httpchk
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
    server postgresql_127.0.0.1_5432 127.0.0.1:5432 maxconn 100 check port 8008
    server postgresql_127.0.0.1_5433 127.0.0.1:5433 maxconn 100 check port 8009
"#;

#[test]
fn patronis_example_becomes_one_cluster_that_passes_check() {
    let (out, c) = convert_ok(PATRONI_EXAMPLE);
    assert_eq!(c.clusters.len(), 1, "{out}");
    let (name, cluster) = c.clusters.iter().next().unwrap();
    assert_eq!(name, "batman", "named after the listen section");
    assert_eq!(cluster.listen_rw.as_deref(), Some("0.0.0.0:5000"));
    assert_eq!(cluster.listen_ro, None, "no replica check in the file");
    assert_eq!(cluster.pool_mode, PoolMode::Session);
    let nodes: Vec<(&str, &str, u16)> = cluster
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.host.as_str(), n.port))
        .collect();
    assert_eq!(
        nodes,
        [
            ("postgresql_127_0_0_1_5432", "127.0.0.1", 5432),
            ("postgresql_127_0_0_1_5433", "127.0.0.1", 5433)
        ]
    );
    // inter / fall / rise, timeout check.
    assert_eq!(
        (c.health.interval_ms, c.health.fall, c.health.rise, c.health.timeout_ms),
        (3000, 3, 2, 5000)
    );
    assert_eq!(c.health.user.as_deref(), Some("postgres"));
    // timeout connect: one attempt; times (retries + 1): the whole connect phase.
    assert_eq!(cluster.server_login_timeout_ms, 4000);
    assert_eq!(cluster.connect_timeout_ms, 12_000);
    // timeout client / server: a silent connection is cut after 30 minutes.
    assert_eq!(cluster.client_idle_timeout_ms, 1_800_000);
    assert_eq!(cluster.idle_transaction_timeout_ms, 1_800_000);
    assert_eq!(cluster.max_server_connections, Some(100), "server maxconn");
    assert_eq!(c.proxy.max_clients, 100, "global maxconn");
    assert_eq!(cluster.max_clients, None, "the listen section has no maxconn");
    // No users in HAProxy: looked up on the servers; the [[users]] way is shown.
    assert!(c.users.is_empty());
    assert_eq!(c.auth_query.as_ref().unwrap().user, "postgres");
    assert!(out.contains("# [[users]]\n# name = \"app\""), "{out}");
    assert!(out.contains(&format!(
        "give the password of PostgreSQL's \"postgres\" user in {PASSWORD_ENV}"
    )));
    // The stats page is offered as a commented [admin] section, not opened.
    assert!(c.admin.http_listen.is_none());
    assert!(out.contains("# [admin]\n# http_listen = \"0.0.0.0:7000\""), "{out}");
    for said in [
        "server option on-marked-down shutdown-sessions: not needed",
        "log global (defaults, line 6): Switchyard logs to stderr",
        "HAProxy relayed PostgreSQL's TLS",
    ] {
        assert!(out.contains(said), "{said}\n{out}");
    }
    // As written, check asks for the password.
    if std::env::var_os(PASSWORD_ENV).is_none() {
        let err = Config::parse(&out).unwrap_err().to_string();
        assert!(err.contains(PASSWORD_ENV), "{err}");
    }
}

/// The primary-and-standbys shape of Percona's and many blog posts' configs: two listen
/// sections on the same three servers, `OPTIONS /primary` and `OPTIONS /replica`, and a
/// stats page with a password.
const PRIMARY_AND_STANDBYS: &str = r#"
global
    maxconn 2000
    log 127.0.0.1 local0
    chroot /var/lib/haproxy
    user haproxy
    group haproxy
    daemon
    stats socket /run/haproxy/admin.sock mode 660 level admin

defaults
    log global
    mode tcp
    option tcplog
    option dontlognull
    retries 3
    timeout queue 1m
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    timeout check 10s

listen stats
    bind 10.0.0.5:7000
    mode http
    stats enable
    stats uri /stats
    stats refresh 10s
    stats auth admin:hunter2-stats

listen postgres_primary
    bind 10.0.0.5:5000
    maxconn 800
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 2s fall 3 rise 2 on-marked-down shutdown-sessions
    server db1 10.0.1.11:5432 maxconn 300 check port 8008
    server db2 10.0.1.12:5432 maxconn 300 check port 8008
    server db3 10.0.1.13:5432 maxconn 300 check port 8008

listen postgres_replicas
    bind 10.0.0.5:5001
    maxconn 1200
    balance leastconn
    option httpchk OPTIONS /replica
    http-check expect status 200
    default-server inter 2s fall 3 rise 2 on-marked-down shutdown-sessions
    server db1 10.0.1.11:5432 maxconn 300 check port 8008
    server db2 10.0.1.12:5432 maxconn 300 check port 8008
    server db3 10.0.1.13:5432 maxconn 300 check port 8008

userlist stats_users
    user ops insecure-password s3cret-ops
"#;

#[test]
fn a_primary_and_a_replica_listener_on_the_same_servers_are_one_cluster() {
    let (out, c) = convert_ok(PRIMARY_AND_STANDBYS);
    assert_eq!(c.clusters.len(), 1, "{out}");
    let cluster = &c.clusters["postgres"];
    assert_eq!(cluster.listen_rw.as_deref(), Some("10.0.0.5:5000"));
    assert_eq!(cluster.listen_ro.as_deref(), Some("10.0.0.5:5001"));
    assert_eq!(cluster.nodes.len(), 3);
    assert_eq!(cluster.read_balance, ReadBalance::LeastConnections, "balance leastconn");
    assert_eq!(cluster.max_clients, Some(2000), "maxconn of both listeners");
    assert_eq!(cluster.max_server_connections, Some(300));
    assert_eq!(cluster.connect_timeout_ms, 40_000, "10 s × (3 retries + 1)");
    assert_eq!(c.proxy.max_clients, 2000);
    assert_eq!(c.health.interval_ms, 2000);
    for secret in ["hunter2", "s3cret-ops"] {
        assert!(!out.contains(secret), "passwords are not copied into comments\n{out}");
    }
    for said in [
        "chroot /var/lib/haproxy (global, line 5)",
        "stats socket",
        "option tcplog (defaults, line 14)",
        "timeout queue 1m (defaults, line 17): a session waiting under max_server_connections",
        "# http_listen = \"10.0.0.5:7000\"",
        "1 settings not imported: HAProxy's users for HTTP authentication, not database logins",
    ] {
        assert!(out.contains(said), "{said}\n{out}");
    }
}

/// An Ansible-generated setup: PgBouncer on each node (servers on 6432) beside direct
/// PostgreSQL ports, replicas checked with a lag bound, sync and async replica ports,
/// HAProxy 2.2's `http-check send`.
const GENERATED: &str = r#"
global
    maxconn 100000
    log /dev/log local0
    stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners
    hard-stop-after 30s

defaults
    mode               tcp
    log                global
    option             tcplog
    retries            2
    timeout queue      5s
    timeout connect    5s
    timeout client     60m
    timeout server     60m
    timeout check      15s

listen master
    bind 10.128.64.140:5000
    maxconn 10000
    option httpchk
    http-check send meth OPTIONS uri /primary
    http-check expect status 200
    default-server inter 3s fastinter 1s fall 3 rise 4 on-marked-down shutdown-sessions
    server pgnode01 10.128.64.140:6432 check port 8008
    server pgnode02 10.128.64.142:6432 check port 8008
    server pgnode03 10.128.64.143:6432 check port 8008

listen master_direct
    bind 10.128.64.140:5002
    maxconn 10000
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 3s fastinter 1s fall 3 rise 4 on-marked-down shutdown-sessions
    server pgnode01 10.128.64.140:5432 check port 8008
    server pgnode02 10.128.64.142:5432 check port 8008
    server pgnode03 10.128.64.143:5432 check port 8008

listen replicas
    bind 10.128.64.140:5001
    maxconn 10000
    option httpchk OPTIONS /replica?lag=100MB
    balance roundrobin
    http-check expect status 200
    default-server inter 3s fastinter 1s fall 3 rise 2 on-marked-down shutdown-sessions
    server pgnode01 10.128.64.140:6432 check port 8008
    server pgnode02 10.128.64.142:6432 check port 8008
    server pgnode03 10.128.64.143:6432 check port 8008

listen replicas_sync
    bind 10.128.64.140:5003
    maxconn 10000
    option httpchk OPTIONS /sync
    balance roundrobin
    http-check expect status 200
    default-server inter 3s fastinter 1s fall 3 rise 2 on-marked-down shutdown-sessions
    server pgnode01 10.128.64.140:6432 check port 8008
    server pgnode02 10.128.64.142:6432 check port 8008
    server pgnode03 10.128.64.143:6432 check port 8008

listen replicas_async
    bind 10.128.64.140:5004
    maxconn 10000
    option httpchk OPTIONS /async?lag=100MB
    balance first
    http-check expect status 200
    default-server inter 3s fastinter 1s fall 3 rise 2 on-marked-down shutdown-sessions
    server pgnode01 10.128.64.140:6432 check port 8008
    server pgnode02 10.128.64.142:6432 check port 8008
    server pgnode03 10.128.64.143:6432 check port 8008
"#;

#[test]
fn every_port_keeps_serving_and_what_differs_is_said() {
    let (out, c) = convert_ok(GENERATED);
    let listens: Vec<(&str, Option<&str>, Option<&str>, u16)> = c
        .clusters
        .iter()
        .map(|(n, c)| {
            (
                n.as_str(),
                c.listen_rw.as_deref(),
                c.listen_ro.as_deref(),
                c.nodes[0].port,
            )
        })
        .collect();
    // PgBouncer's ports and PostgreSQL's are different servers: two clusters; the sync
    // and async ports are further clusters on the same servers, so no client loses its port.
    assert_eq!(
        listens,
        [
            ("direct", Some("10.128.64.140:5002"), None, 5432),
            ("main", Some("10.128.64.140:5000"), Some("10.128.64.140:5001"), 6432),
            ("replicas_async", None, Some("10.128.64.140:5004"), 6432),
            ("replicas_sync", None, Some("10.128.64.140:5003"), 6432),
        ],
        "{out}"
    );
    assert_eq!(c.clusters["main"].read_balance, ReadBalance::RoundRobin);
    assert_eq!(
        c.clusters["replicas_async"].read_balance,
        ReadBalance::Priority,
        "balance first"
    );
    assert_eq!(c.clusters["main"].max_clients, Some(20_000));
    assert_eq!(c.clusters["main"].max_server_connections, None, "no server maxconn");
    assert_eq!(c.proxy.shutdown_timeout_ms, 30_000, "hard-stop-after");
    assert_eq!((c.health.interval_ms, c.health.rise), (3000, 4), "the first listener's");
    for said in [
        "rise: Switchyard has one value; rise 4 (listen master) is written, not rise 2 (listen replicas)",
        "?lag=100MB: Patroni's bound on a replica's lag, in bytes (100MB); Switchyard bounds it in time",
        "Patroni's /sync is only the synchronous standbys",
        "server option fastinter 1s: one check interval",
        "cluster main: nodes on port 6432, PgBouncer's",
        "# A further cluster on the servers of cluster main, so that this port keeps serving.",
    ] {
        assert!(out.contains(said), "{said}\n{out}");
    }
    assert!(
        out.contains("listen_rw = \"10.128.64.140:5000\"  # listen master: OPTIONS /primary; here the primary"),
        "http-check send names the endpoint\n{out}"
    );
}

/// A frontend/backend split (the Consul-template style): `GET /master`, binds without
/// an address, an ACL-routed frontend, an HTTP site and checks that are not Patroni's in
/// the same file.
const SPLIT_AND_MIXED: &str = r#"
defaults
    mode tcp
    timeout connect 5000
    timeout client 30s
    timeout server 30s

frontend ft_postgresql
    bind :5432
    default_backend bk_master

frontend ft_postgresql_ro
    bind :5433
    bind :::5433 v6only
    acl from_office src 192.168.0.0/16
    default_backend bk_replica

backend bk_master
    option httpchk GET /master
    http-check expect status 200
    server pg-a pg-a.internal:5432 check port 8008 inter 1s
    server pg-b pg-b.internal:5432 check port 8008 inter 1s backup

backend bk_replica
    option httpchk HEAD /read-only HTTP/1.1\r\nHost:\ patroni
    http-check expect status 200
    server pg-a pg-a.internal:5432 check port 8008 inter 1s weight 10
    server pg-b pg-b.internal:5432 check port 8008 inter 1s weight 20

frontend ft_reports
    bind :6543
    use_backend bk_master if { src 10.1.0.0/16 }
    default_backend bk_replica

listen pg_any
    bind :5500
    option pgsql-check user haproxy
    server pg-a pg-a.internal:5432 check
    server pg-b pg-b.internal:5432 check

listen pg_health
    bind :5501
    option httpchk GET /health
    server pg-a pg-a.internal:5432 check port 8008

frontend web
    mode http
    bind :80
    default_backend app

backend app
    mode http
    server app1 10.0.2.1:8080 check

listen tls_primary
    bind :5600 ssl crt /etc/haproxy/pg.pem
    option httpchk OPTIONS /primary
    server pg-a pg-a.internal:5432 check port 8008
    server pg-b pg-b.internal:5432 check port 8008
"#;

#[test]
fn frontends_map_through_their_backend_and_the_rest_is_refused_with_reasons() {
    let (out, c) = convert_ok(SPLIT_AND_MIXED);
    assert_eq!(c.clusters.len(), 2, "{out}");
    let pg = &c.clusters["postgresql"];
    assert_eq!(pg.listen_rw.as_deref(), Some("0.0.0.0:5432"), "bind :5432");
    assert_eq!(pg.listen_ro.as_deref(), Some("0.0.0.0:5433"));
    let hosts: Vec<&str> = pg.nodes.iter().map(|n| n.host.as_str()).collect();
    assert_eq!(hosts, ["pg-a.internal", "pg-b.internal"]);
    assert_eq!(pg.server_login_timeout_ms, 5000, "no unit: milliseconds");
    assert_eq!(pg.client_idle_timeout_ms, 30_000);
    assert_eq!(c.health.interval_ms, 1000, "inter on the server lines");
    let tls = &c.clusters["tls"];
    assert_eq!(tls.listen_rw.as_deref(), Some("0.0.0.0:5600"));
    for said in [
        "frontend ft_reports (line 30): routes by ACL (use_backend bk_master if { src 10.1.0.0/16 })",
        "listen pg_any (line 35): option pgsql-check sees that PostgreSQL answers, not which node is the primary",
        "listen pg_health (line 41): GET /health: Patroni's /health is true on any running node",
        "frontend web (line 46): mode http: an HTTP service",
        "bind :::5433: a listener takes one address; 0.0.0.0:5433 is written, not [::]:5433",
        "acl from_office src 192.168.0.0/16 (frontend ft_postgresql_ro, line 15): Switchyard routes by port only",
        "Patroni's /read-only includes the primary",
        "bind ... ssl crt /etc/haproxy/pg.pem: HAProxy ended TLS that clients opened directly",
        "server option backup: no backup nodes",
        "server option weight 10: reads are spread by read_balance, without weights",
    ] {
        assert!(out.contains(said), "{said}\n{out}");
    }
    assert!(
        !out.contains("backend app (line"),
        "a backend only a skipped frontend uses is not said twice\n{out}"
    );
    assert!(
        !out.contains("\r"),
        "the check's escaped header does not break a comment line"
    );
}

#[test]
fn a_file_with_nothing_to_convert_is_an_error_that_says_why() {
    let err = convert_err(
        "global\n  maxconn 100\nfrontend web\n  mode http\n  bind :80\n  default_backend app\n\
         backend app\n  mode http\n  server a 10.0.0.1:8080 check\n\
         listen pg\n  bind :5000\n  server pg1 10.0.0.1:5432\n",
    );
    assert!(err.starts_with("haproxy.cfg: nothing to import"), "{err}");
    assert!(err.contains("frontend web (line 3): mode http"), "{err}");
    assert!(
        err.contains("listen pg (line 10): no Patroni role check"),
        "a listener without checks: its role is unknown\n{err}"
    );

    let err = convert_err("listen pg\n  bind :5000\n  option httpchk OPTIONS /primary\n  http-check expect status 503\n  server a 10.0.0.1:5432 check port 8008\n");
    assert!(
        err.contains("http-check expect status 503: Patroni answers 200 or 503"),
        "{err}"
    );

    let err =
        convert_err("listen pg\n  bind :5000\n  option httpchk OPTIONS /primary\n  server a 10.0.0.1:5432 port 8008\n");
    assert!(err.contains("its servers have no `check`"), "{err}");

    let err = convert_err("  bind :5000\nlisten pg\n");
    assert!(err.starts_with("haproxy.cfg:1: \"bind\" before any section"), "{err}");
    let err = convert_err("listen pg\n  bind \"unterminated :5000\n");
    assert!(err.starts_with("haproxy.cfg:2: unterminated \" quote"), "{err}");
}

#[test]
fn defaults_apply_to_the_sections_after_them_and_can_be_cancelled() {
    // The check is in defaults (some configs do this); a later defaults section resets it,
    // and `no option httpchk` cancels it in one section.
    let cfg = "defaults\n  mode tcp\n  option httpchk OPTIONS /primary\n  default-server inter 5s check port 8008\n\
               listen a\n  bind 127.0.0.1:5000\n  server n1 10.0.0.1:5432\n  server n2 10.0.0.2:5432\n\
               listen b\n  bind 127.0.0.1:5001\n  no option httpchk\n  server n1 10.0.0.1:5432\n\
               defaults\n  mode tcp\n\
               listen c\n  bind 127.0.0.1:5002\n  server n1 10.0.0.1:5432 check\n";
    let (out, c) = convert_ok(cfg);
    assert_eq!(c.clusters.len(), 1, "{out}");
    assert_eq!(c.clusters["a"].listen_rw.as_deref(), Some("127.0.0.1:5000"));
    assert_eq!(c.health.interval_ms, 5000, "default-server of the defaults section");
    assert!(out.contains("listen b (line 9): no Patroni role check"), "{out}");
    assert!(out.contains("listen c (line 15): no Patroni role check"), "{out}");
}

#[test]
fn haproxy_syntax_is_read_as_haproxy_reads_it() {
    assert_eq!(
        words(r#"  stats realm HAProxy\ Statistics  # a comment"#).unwrap(),
        ["stats", "realm", "HAProxy Statistics"]
    );
    assert_eq!(
        words(r#"option httpchk GET / "HTTP/1.1\r\nHost: x" '#literal\n'"#).unwrap(),
        ["option", "httpchk", "GET", "/", "HTTP/1.1\r\nHost: x", "#literal\\n"]
    );
    assert!(words("bind 'open").is_err());
    assert_eq!(haproxy_millis("4s"), Some(4000));
    assert_eq!(haproxy_millis("3000"), Some(3000), "no unit: milliseconds");
    assert_eq!(haproxy_millis("30m"), Some(1_800_000));
    assert_eq!(haproxy_millis("1h"), Some(3_600_000));
    assert_eq!(haproxy_millis("1500us"), Some(2));
    assert_eq!(haproxy_millis("soon"), None);
    assert_eq!(listen_addr("*:5000").unwrap(), "0.0.0.0:5000");
    assert_eq!(listen_addr(":5001").unwrap(), "0.0.0.0:5001");
    assert_eq!(listen_addr("ipv6@:5000").unwrap(), "[::]:5000");
    assert_eq!(listen_addr(":::5000").unwrap(), "[::]:5000");
    assert_eq!(listen_addr("10.0.0.5:6432").unwrap(), "10.0.0.5:6432");
    assert!(listen_addr(":5000-5005").unwrap_err().contains("port range"));
    assert!(listen_addr("db.example:5000").unwrap_err().contains("host name"));
    assert!(listen_addr("unix@/run/pg.sock").unwrap_err().contains("TCP only"));
    assert!(listen_addr("${BIND}:5000").unwrap_err().contains("environment"));
    assert_eq!(server_addr("10.0.0.1:5432").unwrap(), ("10.0.0.1".into(), Some(5432)));
    assert_eq!(server_addr("pg-0:5432").unwrap(), ("pg-0".into(), Some(5432)));
    assert_eq!(server_addr("pg-0").unwrap(), ("pg-0".into(), None));
    assert_eq!(server_addr("fe80::1").unwrap(), ("fe80::1".into(), None));
    assert!(server_addr("pg-0:+1").is_err());
    assert_eq!(cluster_name("postgres_primary_backend"), "postgres");
    assert_eq!(cluster_name("master"), "");
    assert_eq!(cluster_name("ft_replicas"), "");
}
