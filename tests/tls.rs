//! TLS from clients: certificates made here with `openssl`, real clients (psql,
//! pgbench, psycopg) with libpq's sslmode, both pool modes, the admin console, cancel
//! over TLS, `client_tls = "require"`, certificates replaced on reload.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::certs::{make_certs, make_certs_with};
use common::*;

fn tls_top(cert: &Path, key: &Path) -> String {
    format!(
        "[health]\ninterval_ms = 500\nuser = \"{APP_USER}\"\n\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[users]]\nname = \"ops\"\npassword = \"ops\"\nadmin = true\n",
        cert.display(),
        key.display()
    )
}

fn verify_full(port: u16, ca: &Path, db: &str) -> String {
    format!(
        "host=localhost port={port} user={APP_USER} dbname={db} sslmode=verify-full sslrootcert={}",
        ca.display()
    )
}

#[test]
fn clients_connect_over_tls_in_both_pool_modes() {
    let cluster = LocalCluster::start(1).unwrap();
    let (ca, cert, key) = make_certs(cluster.dir(), "");
    for (name, mode) in [
        ("session", "pool_mode = \"session\""),
        ("txn", "pool_mode = \"transaction\""),
    ] {
        let proxy = Proxy::start(&cluster, name, mode, &tls_top(&cert, &key));
        // verify-full: the proxy's certificate, for this host name, from this CA.
        let port_row = psql_conninfo(&verify_full(proxy.rw, &ca, APP_DB), "SELECT inet_server_port()").unwrap();
        assert_eq!(node_of(&cluster, &port_row), 0);
        // Reads through ro, over TLS too.
        assert_eq!(
            psql_conninfo(&verify_full(proxy.ro, &ca, APP_DB), "SELECT pg_is_in_recovery()").unwrap(),
            "t"
        );
        // SCRAM-SHA-256-PLUS: libpq binds to the certificate it saw, and insists.
        let bound = format!("{} channel_binding=require", verify_full(proxy.rw, &ca, APP_DB));
        assert_eq!(psql_conninfo(&bound, "SELECT 1").unwrap(), "1");
        // A plaintext client is still served (client_tls defaults to "allow").
        let plain = format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DB} sslmode=disable",
            proxy.rw
        );
        assert_eq!(psql_conninfo(&plain, "SELECT 1").unwrap(), "1");
        // A certificate from another CA is refused by the client, as it should be.
        let (other_ca, _, _) = make_certs(cluster.dir(), "other-");
        let err = psql_conninfo(&verify_full(proxy.rw, &other_ca, APP_DB), "SELECT 1").unwrap_err();
        assert!(err.contains("certificate verify failed"), "{err}");
        // The admin console over TLS.
        let console = format!(
            "host=localhost port={} user=ops password=ops dbname=switchyard sslmode=verify-full sslrootcert={}",
            proxy.rw,
            ca.display()
        );
        let nodes = psql_conninfo(&console, "SHOW NODES").unwrap();
        assert!(nodes.contains("|up|primary|"), "{nodes}");
    }
    // pgbench over TLS on the transaction-mode proxy, tables in place now.
    let proxy = Proxy::start(&cluster, "txn2", "pool_mode = \"transaction\"", &tls_top(&cert, &key));
    pgbench(proxy.rw, &["-i", "-s", "1", "-q"]);
    for protocol in ["simple", "extended", "prepared"] {
        let out = Command::new("pgbench")
            .args(["-h", "localhost", "-p", &proxy.rw.to_string(), "-U", APP_USER])
            .args(["-c", "4", "-j", "2", "-T", "2", "-M", protocol, "-S"])
            .arg(APP_DB)
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &ca)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && text.contains("number of failed transactions: 0"),
            "{protocol}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn channel_binding_follows_the_certificates_signature_hash() {
    let cluster = LocalCluster::start(0).unwrap();
    for digest in ["-sha384", "-sha512"] {
        let (ca, cert, key) = make_certs_with(cluster.dir(), &digest[1..], digest);
        let proxy = Proxy::start(&cluster, &digest[1..], "", &tls_top(&cert, &key));
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        let want = format!("{}WithRSAEncryption", &digest[1..]);
        assert!(
            String::from_utf8_lossy(&text.stdout).contains(&want),
            "not signed with {want}"
        );
        let bound = format!("{} channel_binding=require", verify_full(proxy.rw, &ca, APP_DB));
        assert_eq!(psql_conninfo(&bound, "SELECT 1").unwrap(), "1", "{digest}");
    }
}

#[test]
fn require_refuses_plaintext_before_authentication_and_cancel_works_over_tls() {
    let cluster = LocalCluster::start(1).unwrap();
    let (ca, cert, key) = make_certs(cluster.dir(), "");
    let proxy = Proxy::start(&cluster, "require", "client_tls = \"require\"", &tls_top(&cert, &key));
    let plain = format!(
        "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DB} sslmode=disable",
        proxy.rw
    );
    let err = psql_conninfo(&plain, "SELECT 1").unwrap_err();
    assert!(err.contains("requires TLS") && err.contains("sslmode=require"), "{err}");
    assert_eq!(
        psql_conninfo(&verify_full(proxy.rw, &ca, APP_DB), "SELECT 1").unwrap(),
        "1"
    );
    // A statement cancelled over TLS (psycopg: the session and its cancel request).
    let out = python(
        "tls_cancel.py",
        &[],
        &[(
            "DSN",
            format!("{} password={APP_PASSWORD}", verify_full(proxy.rw, &ca, APP_DB)),
        )],
    );
    assert!(out.contains("cancelled"), "{out}");
    // psycopg's own libpq is 17+ (the binary wheel): direct TLS was tried too.
    assert!(out.contains("direct TLS ok"), "{out}");
}

#[test]
fn certificates_are_reloaded_without_dropping_sessions() {
    let cluster = LocalCluster::start(1).unwrap();
    let (ca, cert, key) = make_certs(cluster.dir(), "");
    let proxy = Proxy::start(&cluster, "reload", "pool_mode = \"transaction\"", &tls_top(&cert, &key));
    // A session open over TLS across the reload (psql reading statements from a pipe).
    let mut held = Command::new("psql")
        .args(["-X", "-q", "-At", &verify_full(proxy.rw, &ca, APP_DB)])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let stdin = held.stdin.as_mut().unwrap();
    writeln!(stdin, "SELECT 'before';").unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // New certificate files in place of the old ones, then SIGHUP.
    let (new_ca, new_cert, new_key) = make_certs(cluster.dir(), "new-");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_for(
        "new connections with the new certificate",
        Duration::from_secs(10),
        || psql_conninfo(&verify_full(proxy.rw, &new_ca, APP_DB), "SELECT 1").ok(),
    );
    assert!(psql_conninfo(&verify_full(proxy.rw, &ca, APP_DB), "SELECT 1").is_err());
    // The session from before still works.
    let stdin = held.stdin.as_mut().unwrap();
    writeln!(stdin, "SELECT 'after';").unwrap();
    drop(held.stdin.take());
    let out = held.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "before\nafter", "{text}");

    // A broken certificate file is refused by the reload; the running one stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    proxy.signal(libc::SIGHUP);
    wait_for("the reload rejected", Duration::from_secs(10), || {
        proxy.log_text().contains("reload rejected").then_some(())
    });
    assert_eq!(
        psql_conninfo(&verify_full(proxy.rw, &new_ca, APP_DB), "SELECT 1").unwrap(),
        "1"
    );
}
