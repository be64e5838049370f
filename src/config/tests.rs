//! Unit tests of the config: parsing, defaults, the validation rules and the keys they name.

use super::*;

#[test]
fn pool_sizes_are_shared_among_workers() {
    let s = PoolSettings {
        size: 5,
        min_size: 3,
        idle_timeout: Duration::from_secs(1),
        lifetime: Duration::from_secs(1),
        checkout_timeout: Duration::from_secs(1),
        reserve_size: 3,
        reserve_timeout: Duration::from_secs(1),
    };
    let parts: Vec<(u32, u32, u32)> = (0..2)
        .map(|w| s.share(w, 2))
        .map(|p| (p.size, p.min_size, p.reserve_size))
        .collect();
    assert_eq!(parts, vec![(3, 2, 2), (2, 1, 1)]);
    assert_eq!(s.share(0, 1).size, 5);
    // Fewer connections than workers: one each.
    let one = PoolSettings {
        size: 1,
        min_size: 0,
        ..s
    };
    assert_eq!((one.share(0, 4).size, one.share(3, 4).size), (1, 1));
}

const GOOD: &str = r#"
[health]
interval_ms = 500
[[users]]
name = "app"
password = "secret"
[clusters.main]
listen_rw = "127.0.0.1:6432"
listen_ro = "127.0.0.1:6433"
[[clusters.main.nodes]]
name = "default"
host = "127.0.0.1"
port = 5432
"#;

#[test]
fn contract_example_parses_with_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.health.interval_ms, 500);
    assert_eq!(c.health.fall, 2);
    let m = &c.clusters["main"];
    assert_eq!(m.max_replica_lag_ms, 10000);
    assert_eq!(m.read_balance, ReadBalance::Priority);
    assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
    assert_eq!(c.health_login(), ("app".into(), Some("secret".into())));
}

#[test]
fn client_tls_needs_a_certificate_and_automatic_failover_a_manager() {
    let with = |extra: &str| Config::parse(&GOOD.replace("[clusters.main]\n", &format!("[clusters.main]\n{extra}\n")));
    let err = with("client_tls = \"require\"").unwrap_err().to_string();
    assert!(
        err.contains("clusters.main.client_tls") && err.contains("[tls]"),
        "{err}"
    );
    let c = with("").unwrap();
    assert_eq!(c.clusters["main"].client_tls(false), ClientTls::Disable);
    assert_eq!(c.clusters["main"].client_tls(true), ClientTls::Allow);
    let err = with("failover = \"automatic\"").unwrap_err().to_string();
    assert!(
        err.contains("clusters.main.failover") && err.contains("manager"),
        "{err}"
    );
    let c = Config::parse(&format!(
        "{}\n[clusters.main.manager]\nuser = \"postgres\"\n",
        GOOD.replace("[clusters.main]\n", "[clusters.main]\nfailover = \"automatic\"\n")
    ))
    .unwrap();
    assert_eq!(c.clusters["main"].failover_hold(), Duration::from_secs(10));
    assert_eq!(
        with("").unwrap().clusters["main"].failover_hold(),
        Duration::from_secs(5)
    );
}

#[test]
fn passwords_may_come_from_a_file_or_the_environment_but_only_one_place() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    std::fs::write(&f, "from-file\n").unwrap();
    let c =
        Config::parse(&GOOD.replace("password = \"secret\"", &format!("password_file = \"{}\"", f.display()))).unwrap();
    assert_eq!(c.users[0].password.as_deref(), Some("from-file"));
    std::env::set_var("SWITCHYARD_TEST_PW", "from-env");
    let c = Config::parse(&GOOD.replace("password = \"secret\"", "password_env = \"SWITCHYARD_TEST_PW\"")).unwrap();
    assert_eq!(c.users[0].password.as_deref(), Some("from-env"));
    let err = Config::parse(&GOOD.replace("password = \"secret\"", "password_env = \"SWITCHYARD_NO_SUCH_VAR\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("users[0].password_env") && err.contains("SWITCHYARD_NO_SUCH_VAR"),
        "{err}"
    );
    let err = Config::parse(&GOOD.replace(
        "password = \"secret\"",
        "password = \"x\"\npassword_env = \"SWITCHYARD_TEST_PW\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("give only one of"), "{err}");
    let err = Config::parse(&GOOD.replace("password = \"secret\"", "password_file = \"/nonexistent/pw\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("users[0].password_file") && err.contains("/nonexistent/pw"),
        "{err}"
    );
}

#[test]
fn unknown_key_is_named() {
    let err = Config::parse(&GOOD.replace("interval_ms", "intervall_ms")).unwrap_err();
    assert!(err.to_string().contains("intervall_ms"), "{err}");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (GOOD.replace("6433", "x"), "clusters.main.listen_ro"),
        (GOOD.replace("interval_ms = 500", "fall = 0"), "health.fall"),
        (GOOD.replace("password = \"secret\"", ""), "users[0].password"),
        (
            GOOD.replace("\"127.0.0.1:6433\"", "\"127.0.0.1:6432\""),
            "clusters.main.listen_ro",
        ),
    ];
    for (text, key) in cases {
        let err = Config::parse(&text).unwrap_err();
        assert!(err.to_string().starts_with(key), "expected {key}: {err}");
    }
}

#[test]
fn server_tls_verifiers_and_auth_query_rules() {
    let with = |extra: &str| Config::parse(&GOOD.replace("[clusters.main]\n", &format!("[clusters.main]\n{extra}\n")));
    assert_eq!(with("").unwrap().clusters["main"].server_tls, ServerTlsMode::Prefer);
    let err = with("server_tls = \"verify-full\"").unwrap_err().to_string();
    assert!(
        err.contains("clusters.main.server_tls") && err.contains("server_ca_file"),
        "{err}"
    );
    assert!(with("server_tls = \"verify-ca\"\nserver_ca_file = \"/ca.crt\"").is_ok());
    assert!(with("server_tls = \"sometimes\"").is_err());

    // A SCRAM verifier as the password: scram-sha-256 only, well formed, and not a
    // password for health checks.
    let verifier = "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let user = |pw: &str, extra: &str| GOOD.replace("password = \"secret\"", &format!("password = \"{pw}\"\n{extra}"));
    let err = Config::parse(&user(verifier, "")).unwrap_err().to_string();
    assert!(err.contains("health.password"), "{err}");
    let ok =
        Config::parse(&user(verifier, "").replace("interval_ms = 500", "interval_ms = 500\npassword = \"h\"")).unwrap();
    assert!(ok.users[0].has_scram_verifier() && ok.users[0].plaintext_password().is_none());
    let err = Config::parse(&user(verifier, "auth = \"md5\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("users[0].auth"), "{err}");
    let err = Config::parse(&user("SCRAM-SHA-256$4096:bad", ""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("users[0].password") && err.contains("pg_authid"), "{err}");

    // No [[users]] at all: auth_query and a health user needed.
    let no_users = GOOD.replace("[[users]]\nname = \"app\"\npassword = \"secret\"\n", "");
    let err = Config::parse(&no_users).unwrap_err().to_string();
    assert!(err.contains("auth_query"), "{err}");
    let aq = "[auth_query]\nuser = \"lookup\"\npassword = \"x\"\n";
    let err = Config::parse(&format!("{aq}{no_users}")).unwrap_err().to_string();
    assert!(err.contains("health.user"), "{err}");
    let c = Config::parse(&format!(
        "{aq}{}",
        no_users.replace("interval_ms = 500", "interval_ms = 500\nuser = \"h\"\npassword = \"h\"")
    ))
    .unwrap();
    assert_eq!(c.auth_query.as_ref().unwrap().cache_s, 30);
    let err = Config::parse(&format!("[auth_query]\nuser = \"l\"\nquery = \"SELECT 1\"\n{GOOD}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth_query.query"), "{err}");
}

#[test]
fn mysql_clusters_take_the_same_keys_as_postgresql() {
    let with = |extra: &str| {
        Config::parse(&GOOD.replace(
            "[clusters.main]\n",
            &format!("[clusters.main]\nengine = \"mysql\"\n{extra}\n"),
        ))
    };
    let c = with("").unwrap();
    assert_eq!(c.clusters["main"].engine, Engine::Mysql);
    assert_eq!(Config::parse(GOOD).unwrap().clusters["main"].engine, Engine::Postgresql);
    // Automatic failover needs a manager, on MySQL as on PostgreSQL.
    let err = with("failover = \"automatic\"").unwrap_err().to_string();
    assert!(err.starts_with("clusters.main.failover"), "{err}");
    // Fresh reads: the same keys as PostgreSQL's.
    let c = with("read_your_writes = \"user\"\ncausal_wait_ms = 250").unwrap();
    assert_eq!(c.clusters["main"].causal_wait_ms, 250);
    let c = with(
        "failover = \"automatic\"\nfailover_max_lag_bytes = 0\nmanager = { user = \"root\", replication_user = \"repl\", replication_password = \"r\" }",
    )
    .unwrap();
    let m = c.clusters["main"].manager.as_ref().unwrap();
    assert_eq!(
        (m.replication_user.as_deref(), m.replication_password.as_deref()),
        (Some("repl"), Some("r"))
    );
    let err = with("engine = \"oracle\"").unwrap_err().to_string();
    assert!(err.contains("engine"), "{err}");
    // Limits and pools: a MySQL pool is per user, so sizes per database are refused.
    let with_pool = |pool: &str| {
        Config::parse(&format!(
            "{}\n[[clusters.main.pools]]\n{pool}\npool_size = 3\n",
            GOOD.replace(
                "[clusters.main]\n",
                "[clusters.main]\nengine = \"mysql\"\nreserve_pool_size = 2\nmax_server_connections = 30\n",
            )
        ))
    };
    let c = with_pool("user = \"app\"").unwrap();
    assert_eq!(c.pool_settings("main", "app", "").size, 3);
    assert_eq!(c.server_connection_caps("main", "app").0, Some(30));
    let err = with_pool("database = \"app\"").unwrap_err().to_string();
    assert!(
        err.starts_with("clusters.main.pools") && err.contains("per user"),
        "{err}"
    );
}

#[test]
fn a_users_pool_size_replaces_the_clusters_and_timeouts_fall_back_to_the_cluster() {
    let text = format!(
        "{GOOD}\n[[users]]\nname = \"reports\"\npassword = \"x\"\npool_size = 2\nquery_timeout_ms = 0\nmax_clients = 3\n"
    )
    .replace(
        "[clusters.main]\n",
        "[clusters.main]\nmin_pool_size = 4\nquery_timeout_ms = 500\nidle_transaction_timeout_ms = 100\n",
    );
    let c = Config::parse(&text).unwrap();
    let reports = c.pool_settings("main", "reports", "app");
    assert_eq!((reports.size, reports.min_size), (2, 2));
    assert_eq!(c.pool_settings("main", "app", "app").size, 20);
    let t = c.client_timeouts("main", "reports");
    assert_eq!(t.query, None, "the user's 0 turns the cluster's off");
    assert_eq!(t.idle_transaction, Some(Duration::from_millis(100)));
    assert_eq!(c.client_timeouts("main", "app").query, Some(Duration::from_millis(500)));
    for bad in ["max_clients = 0", "pool_size = 0"] {
        let text = format!("{GOOD}\n[[users]]\nname = \"x\"\npassword = \"x\"\n{bad}\n");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("users[1]."), "{e}");
    }
    let e = Config::parse(&format!("{GOOD}\n[proxy]\nmax_clients = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("proxy.max_clients"), "{e}");
}

#[test]
fn the_most_specific_pool_size_wins() {
    let text = format!(
        "{GOOD}\n[[users]]\nname = \"reports\"\npassword = \"x\"\npool_size = 3\n\n\
         [[clusters.main.pools]]\ndatabase = \"analytics\"\npool_size = 4\n\n\
         [[clusters.main.pools]]\nuser = \"reports\"\ndatabase = \"analytics\"\npool_size = 5\n\n\
         [[clusters.main.pools]]\nuser = \"app\"\npool_size = 6\n"
    );
    let c = Config::parse(&text).unwrap();
    let size = |user: &str, db: &str| c.pool_settings("main", user, db).size;
    assert_eq!(size("reports", "analytics"), 5, "user and database");
    assert_eq!(size("app", "analytics"), 4, "database before user");
    assert_eq!(size("app", "app"), 6, "user in [[pools]]");
    assert_eq!(size("reports", "app"), 3, "the user's own pool_size");
    assert_eq!(size("other", "app"), 20, "the cluster's");
    let bad = format!("{GOOD}\n[[clusters.main.pools]]\npool_size = 2\n");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(e.starts_with("clusters.main.pools[0]"), "{e}");
}

#[test]
fn telemetry_keys_are_checked() {
    let with = |t: &str| Config::parse(&format!("[telemetry]\n{t}\n{GOOD}"));
    let c = with("otlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 0.5").unwrap();
    assert_eq!(c.telemetry.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
    assert!(c.telemetry.query_digests);
    let e = with("sample_ratio = 1.5").unwrap_err().to_string();
    assert!(e.contains("telemetry.sample_ratio"), "{e}");
    let e = with("otlp_endpoint = \"https://collector:4318\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("telemetry.otlp_endpoint") && e.contains("http://"), "{e}");
}
