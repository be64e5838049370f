//! TLS toward the servers (`server_tls`, `server_ca_file`): real PostgreSQL nodes with
//! `ssl = on` and certificates made here with `openssl`, refusing plaintext TCP logins
//! (`hostnossl ... reject`), so every path that works proves it used TLS: sessions in
//! both pool modes, pooled connections under pgbench, health checks. A node whose
//! certificate names another host, or has expired, is Down with that reason.

mod common;

use std::path::Path;
use std::time::Duration;

use common::certs::{make_ca, sign};
use common::*;

/// Give node `i` the certificate `cert`/`key` (copied into its data directory, owned
/// by the server's user), `ssl = on`, and no plaintext TCP logins. `restart`: a
/// restart instead of a reload (open connections keep their old TLS session).
fn serve_tls(cluster: &LocalCluster, i: usize, cert: &Path, key: &Path, restart: bool) {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    let data = &cluster.nodes[i].data;
    let owner = std::fs::metadata(data).unwrap();
    for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
        let dest = data.join(to);
        std::fs::copy(from, &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown(&dest, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    let hba = data.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    if !text.starts_with("hostnossl") {
        std::fs::write(&hba, format!("hostnossl all all 127.0.0.1/32 reject\n{text}")).unwrap();
    }
    cluster.sql(i, "ALTER SYSTEM SET ssl = on").unwrap();
    if restart {
        cluster.stop_node(i, "fast").unwrap();
        cluster.start_node(i).unwrap();
    } else {
        cluster.sql(i, "SELECT pg_reload_conf()").unwrap();
    }
}

/// Node `i`'s entry in `/status`: (health, reason).
fn node_status(admin: u16, i: usize) -> Option<(String, String)> {
    let (_, body) = http_get(admin, "/status");
    let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
    let n = &doc["clusters"][0]["nodes"][i];
    Some((
        n["health"].as_str()?.to_string(),
        n["last_error"].as_str().unwrap_or("").to_string(),
    ))
}

fn wait_health(admin: u16, i: usize, health: &str, reason_has: &str) -> String {
    wait_for("the admin listener", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", admin)).ok()
    });
    wait_for(
        &format!("node {i} {health} ({reason_has})"),
        Duration::from_secs(20),
        || {
            node_status(admin, i)
                .filter(|(h, r)| h == health && r.contains(reason_has))
                .map(|(_, r)| r)
        },
    )
}

const SSL_SQL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[test]
fn servers_are_reached_over_verified_tls_and_a_bad_certificate_makes_a_node_down() {
    let cluster = LocalCluster::start(1).unwrap();
    let dir = cluster.dir();
    let (ca, ca_key) = make_ca(dir, "");
    let good = sign(dir, "good", (&ca, &ca_key), "DNS:localhost,IP:127.0.0.1", 30, "-sha256");
    let other = sign(dir, "other", (&ca, &ca_key), "DNS:db.example.com", 30, "-sha256");
    serve_tls(&cluster, 0, &good.0, &good.1, false);
    serve_tls(&cluster, 1, &other.0, &other.1, false);

    // Plaintext TCP logins are refused by the servers themselves now.
    let direct = format!(
        "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DB} sslmode=disable",
        cluster.nodes[0].port
    );
    assert!(psql_conninfo(&direct, "SELECT 1").is_err());

    let admin = free_port();
    let top = format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\"\n");
    let tls = format!("server_tls = \"verify-full\"\nserver_ca_file = \"{}\"\n", ca.display());
    let proxy = Proxy::start_unchecked(
        &cluster,
        "verify-full",
        &format!("pool_mode = \"transaction\"\n{tls}"),
        &top,
    );
    // The primary's certificate names 127.0.0.1: up, and every session is encrypted.
    wait_health(admin, 0, "up", "");
    assert_eq!(psql(proxy.rw, SSL_SQL).unwrap(), "t");
    // failover1's certificate is from the right CA but for another host: down, with
    // the reason; reads fall back to the primary.
    let reason = wait_health(admin, 1, "down", "certificate");
    assert!(reason.contains("not valid for name"), "{reason}");
    assert_eq!(lands_on(&cluster, proxy.ro), Ok(0));

    // Pooled connections under load, in every protocol (each write is flushed).
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    for protocol in ["simple", "extended", "prepared"] {
        let out = pgbench(proxy.rw, &["-c", "4", "-j", "2", "-T", "2", "-M", protocol]);
        assert!(out.contains("number of failed transactions: 0"), "{protocol}: {out}");
    }

    // Session mode, with verify-ca: the chain is checked, not the name, so failover1
    // is up too and reads go to it over TLS.
    let admin2 = free_port();
    let top2 = format!("[admin]\nhttp_listen = \"127.0.0.1:{admin2}\"\n");
    let tls_ca = format!("server_tls = \"verify-ca\"\nserver_ca_file = \"{}\"\n", ca.display());
    let session = Proxy::start(
        &cluster,
        "verify-ca",
        &format!("pool_mode = \"session\"\n{tls_ca}"),
        &top2,
    );
    wait_health(admin2, 1, "up", "");
    assert_eq!(psql(session.rw, SSL_SQL).unwrap(), "t");
    assert_eq!(lands_on(&cluster, session.ro), Ok(1));
    assert_eq!(psql(session.ro, SSL_SQL).unwrap(), "t");

    // An expired certificate on failover1 (restarted, so the monitor logs in anew):
    // down even for verify-ca.
    let expired = sign(
        dir,
        "expired",
        (&ca, &ca_key),
        "DNS:localhost,IP:127.0.0.1",
        0,
        "-sha256",
    );
    std::thread::sleep(Duration::from_millis(1100));
    serve_tls(&cluster, 1, &expired.0, &expired.1, true);
    let reason = wait_health(admin2, 1, "down", "certificate");
    assert!(reason.to_lowercase().contains("expired"), "{reason}");
    assert_eq!(lands_on(&cluster, session.ro), Ok(0));

    // A certificate from another CA: the new CA file on reload, nodes down.
    let (other_ca, _) = make_ca(dir, "other-");
    let text = std::fs::read_to_string(&session.config)
        .unwrap()
        .replace(&ca.display().to_string(), &other_ca.display().to_string());
    std::fs::write(&session.config, text).unwrap();
    session.signal(libc::SIGHUP);
    let reason = wait_health(admin2, 0, "down", "certificate");
    assert!(
        reason.contains("UnknownIssuer") || reason.contains("issuer"),
        "{reason}"
    );
    let err = psql(session.rw, "SELECT 1").unwrap_err();
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn require_refuses_a_server_without_tls_and_prefer_falls_back() {
    let cluster = LocalCluster::start(0).unwrap();
    let admin = free_port();
    let top = format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\"\n");
    // The test cluster runs with ssl = off.
    let strict = Proxy::start_unchecked(&cluster, "require", "server_tls = \"require\"", &top);
    let reason = wait_health(admin, 0, "down", "TLS");
    assert!(reason.contains("does not support TLS"), "{reason}");
    let err = psql(strict.rw, "SELECT 1").unwrap_err();
    assert!(err.contains("TLS"), "{err}");
    // prefer (the default): plaintext when the server has no TLS.
    let lax = Proxy::start(&cluster, "prefer", "", "");
    assert_eq!(psql(lax.rw, SSL_SQL).unwrap(), "f");
    // verify modes without a CA file are a config error.
    let out = std::process::Command::new(switchyard_bin())
        .args(["check", "--config"])
        .arg({
            let p = cluster.dir().join("bad.toml");
            std::fs::write(
                &p,
                cluster.config_toml(free_port(), free_port(), "server_tls = \"verify-full\""),
            )
            .unwrap();
            p
        })
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("server_ca_file"), "{text}");
}
