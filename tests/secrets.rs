//! Secrets outside the config file, the admin HTTP token, and secrets kept out of
//! what Switchyard shows.

mod common;

use std::process::Command;

use common::*;

#[test]
fn passwords_from_files_and_environment_and_a_token_for_the_admin_endpoint() {
    let cluster = LocalCluster::start(1).unwrap();
    let dir = cluster.dir();
    std::fs::write(dir.join("app.pw"), format!("{APP_PASSWORD}\n")).unwrap();
    std::fs::write(dir.join("manager.pw"), SUPERUSER_PASSWORD).unwrap();
    const TOKEN: &str = "tok-5d1c-admin-secret";
    std::fs::write(dir.join("admin.token"), TOKEN).unwrap();
    let (rw, ro, admin) = (free_port(), free_port(), free_port());
    // The generated config with every secret moved out of it.
    let text = cluster
        .config_toml(
            rw,
            ro,
            &format!(
                "pool_mode = \"transaction\"\n\n[clusters.main.manager]\nuser = \"postgres\"\npassword_file = \"{}\"\n",
                dir.join("manager.pw").display()
            ),
        )
        .replace(
            &format!("password = \"{APP_PASSWORD}\""),
            &format!("password_file = \"{}\"", dir.join("app.pw").display()),
        );
    let text = format!(
        "[admin]\nhttp_listen = \"127.0.0.1:{admin}\"\ntoken_file = \"{}\"\n\n{text}",
        dir.join("admin.token").display()
    );
    assert!(!text.contains(&format!("password = \"{APP_PASSWORD}\"")), "{text}");
    let proxy = Proxy::launch(&cluster, "files", &text, rw, ro);

    // Clients authenticate with the password from the file; the proxy logs in with it.
    assert_eq!(psql(proxy.rw, "SELECT 1").unwrap(), "1");

    // The token guards what shows or changes the cluster, not /health or role checks.
    assert_eq!(http_get(admin, "/health").0, 200);
    assert_eq!(http_get(admin, "/clusters/main/primary").0, 200);
    assert_eq!(http_get(admin, "/").0, 200);
    for path in ["/status", "/metrics"] {
        let (code, body) = http_get(admin, path);
        assert_eq!(code, 401, "{path}: {body}");
    }
    let bearer = |path: &str| {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut r = agent
            .get(&format!("http://127.0.0.1:{admin}{path}"))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    let (code, status) = bearer("/status");
    assert_eq!(code, 200, "{status}");
    let (code, metrics) = bearer("/metrics");
    assert_eq!(code, 200);
    // The CLI: told what is missing without the token, served with it.
    let cli = |token: Option<&str>| {
        let mut c = Command::new(switchyard_bin());
        c.args(["status", "--url", &format!("http://127.0.0.1:{admin}")]);
        c.env_remove("SWITCHYARD_TOKEN");
        if let Some(t) = token {
            c.env("SWITCHYARD_TOKEN", t);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(None);
    assert!(!ok && out.contains("SWITCHYARD_TOKEN"), "{out}");
    let (ok, out) = cli(Some(TOKEN));
    assert!(ok && out.contains("cluster main"), "{out}");

    // No secret in what Switchyard shows or logs.
    let console = psql_db(proxy.rw, APP_USER, APP_PASSWORD, "switchyard", "SHOW CLUSTERS").unwrap_err();
    let log = proxy.log_text();
    for (what, text) in [
        ("/status", &status),
        ("/metrics", &metrics),
        ("log", &log),
        ("console", &console),
    ] {
        for secret in [TOKEN, SUPERUSER_PASSWORD] {
            assert!(!text.contains(secret), "{what} shows a secret");
        }
    }
    // Secrets in files: no warning about the config's permissions.
    assert!(!log.contains("any local user can read it"), "{log}");
}

#[test]
fn a_world_readable_config_with_passwords_is_warned_about() {
    let cluster = LocalCluster::start(0).unwrap();
    // The usual test config: passwords inline, written with the default umask (0644).
    let proxy = Proxy::start(&cluster, "inline", "", "");
    wait_for("the warning", std::time::Duration::from_secs(5), || {
        proxy.log_text().contains("any local user can read it").then_some(())
    });
}

/// `[[users]]` with `pg_authid`'s SCRAM verifier instead of a password, for `user`.
fn verifier_config(cluster: &LocalCluster, rw: u16, ro: u16, mode: &str, verifier: &str) -> String {
    cluster
        .config_toml(rw, ro, &format!("pool_mode = \"{mode}\""))
        .replace(
            &format!("password = \"{APP_PASSWORD}\""),
            &format!("password = \"{verifier}\""),
        )
        // Health checks need a password of their own (a verifier cannot log in by itself).
        .replace(
            "[health]\n",
            &format!("[health]\nuser = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\n"),
        )
}

#[test]
fn a_user_configured_with_a_scram_verifier_logs_in_to_servers_with_the_clients_key() {
    use switchyard::scram::ScramSecret;
    let cluster = LocalCluster::start(1).unwrap();
    let verifier = cluster
        .sql(
            0,
            &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_USER}'"),
        )
        .unwrap();
    // Our derivation gives the server's own verifier from the password and its salt.
    let parsed = ScramSecret::parse(&verifier).expect("the server stores a SCRAM verifier");
    assert_eq!(
        ScramSecret::from_password(APP_PASSWORD, &parsed.salt, parsed.iterations).to_text(),
        verifier
    );
    for mode in ["session", "transaction"] {
        let (rw, ro) = (free_port(), free_port());
        let text = verifier_config(&cluster, rw, ro, mode, &verifier);
        assert!(!text.contains(&format!("password = \"{APP_PASSWORD}\"")), "{text}");
        // Ready = a client logged in through both endpoints (the proxy then logs in to
        // the servers with the key that client's login revealed).
        let proxy = Proxy::launch(&cluster, &format!("verifier-{mode}"), &text, rw, ro);
        psql(
            proxy.rw,
            "CREATE TABLE IF NOT EXISTS by_verifier (v int); INSERT INTO by_verifier VALUES (1)",
        )
        .unwrap();
        assert!(psql(proxy.ro, "SELECT pg_is_in_recovery()").unwrap() == "t");
        pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
        let out = pgbench(proxy.rw, &["-c", "4", "-j", "2", "-T", "1", "-S"]);
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        let err = psql_as(proxy.rw, APP_USER, "guess", "SELECT 1").unwrap_err();
        assert!(err.contains("password authentication failed"), "{err}");
    }
    // A server holding another verifier (same password, another salt): the login to it
    // fails with the reason, not as a wrong password.
    cluster
        .sql(0, &format!("CREATE ROLE twin LOGIN PASSWORD '{APP_PASSWORD}'"))
        .unwrap();
    let other = cluster
        .sql(0, "SELECT rolpassword FROM pg_authid WHERE rolname = 'twin'")
        .unwrap();
    assert_ne!(other, verifier);
    let (rw, ro) = (free_port(), free_port());
    let proxy = Proxy::spawn(
        &cluster,
        "twin",
        &verifier_config(&cluster, rw, ro, "session", &other),
        rw,
        ro,
    );
    let err = wait_for("the proxy up", std::time::Duration::from_secs(20), || {
        psql(proxy.rw, "SELECT 1")
            .err()
            .filter(|e| !e.contains("Connection refused"))
    });
    assert!(err.contains("another SCRAM verifier"), "{err}");
}

#[test]
fn users_not_in_the_config_are_looked_up_with_auth_query() {
    let cluster = LocalCluster::start(1).unwrap();
    // The least-privilege pattern: a lookup role that may run one SECURITY DEFINER
    // function reading pg_authid, nothing else.
    for sql in [
        "CREATE ROLE alice LOGIN PASSWORD 'alice-pw'",
        "CREATE ROLE sy_auth LOGIN PASSWORD 'sy-auth-pw'",
        "CREATE FUNCTION public.sy_lookup(u name) RETURNS TABLE (usename name, passwd text) \
         LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog \
         AS $$ SELECT rolname, rolpassword FROM pg_authid WHERE rolname = u AND rolcanlogin $$",
        "REVOKE ALL ON FUNCTION public.sy_lookup(name) FROM PUBLIC",
        "GRANT EXECUTE ON FUNCTION public.sy_lookup(name) TO sy_auth",
        "SET password_encryption = 'md5'; CREATE ROLE carol LOGIN PASSWORD 'carol-pw'",
    ] {
        cluster.sql(0, sql).unwrap();
    }
    cluster
        .sql(0, &format!("GRANT ALL ON DATABASE {APP_DB} TO alice"))
        .unwrap();
    let top = "[auth_query]\nuser = \"sy_auth\"\npassword_env = \"SY_AUTH_PW\"\nquery = \"SELECT * FROM public.sy_lookup($1)\"\ncache_s = 1\n";
    std::env::set_var("SY_AUTH_PW", "sy-auth-pw");
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(
            &cluster,
            &format!("auth-query-{mode}"),
            &format!("pool_mode = \"{mode}\""),
            top,
        );
        assert_eq!(
            psql_as(proxy.rw, "alice", "alice-pw", "SELECT current_user").unwrap(),
            "alice"
        );
        assert_eq!(
            psql_as(proxy.ro, "alice", "alice-pw", "SELECT pg_is_in_recovery()").unwrap(),
            "t"
        );
        // A wrong password and a user nobody knows fail alike.
        for (user, pw) in [("alice", "guess"), ("nobody", "guess")] {
            let err = psql_as(proxy.rw, user, pw, "SELECT 1").unwrap_err();
            assert!(
                err.contains(&format!("password authentication failed for user \"{user}\"")),
                "{err}"
            );
        }
        // An md5 hash is not something the proxy can log in to servers with: the
        // client fails like a wrong password, the log says why.
        let err = psql_as(proxy.rw, "carol", "carol-pw", "SELECT 1").unwrap_err();
        assert!(
            err.contains("password authentication failed for user \"carol\""),
            "{err}"
        );
        assert!(proxy.log_text().contains("not a SCRAM-SHA-256 verifier"));
    }
    // A password changed on the server takes effect once the cache (1 s) expires.
    let proxy = Proxy::start(&cluster, "auth-query-change", "pool_mode = \"transaction\"", top);
    assert!(psql_as(proxy.rw, "alice", "alice-pw", "SELECT 1").is_ok());
    cluster.sql(0, "ALTER ROLE alice PASSWORD 'alice-new'").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(psql_as(proxy.rw, "alice", "alice-pw", "SELECT 1").is_err());
    assert_eq!(
        psql_as(proxy.rw, "alice", "alice-new", "SELECT current_user").unwrap(),
        "alice"
    );
}
