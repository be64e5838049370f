//! Certificates for the TLS tests, made with Debian's `openssl`: a CA, and server
//! certificates it signs (for localhost / 127.0.0.1, for another name, expired).

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A CA and a server certificate for localhost / 127.0.0.1 signed by it, in `dir`.
pub fn make_certs(dir: &Path, prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
    make_certs_with(dir, prefix, "-sha256")
}

/// As `make_certs`, the server certificate signed with `digest` (`-sha384`...).
pub fn make_certs_with(dir: &Path, prefix: &str, digest: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = make_ca(dir, prefix);
    let (cert, key) = sign(
        dir,
        &format!("{prefix}server"),
        (&ca, &ca_key),
        "DNS:localhost,IP:127.0.0.1",
        30,
        digest,
    );
    (ca, cert, key)
}

/// A self-signed CA in `dir`: (certificate, key).
pub fn make_ca(dir: &Path, prefix: &str) -> (PathBuf, PathBuf) {
    let p = |n: &str| dir.join(format!("{prefix}{n}"));
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        &format!("/CN={prefix}test-ca"),
        "-keyout",
        &s(&p("ca.key")),
        "-out",
        &s(&p("ca.crt")),
    ]);
    (p("ca.crt"), p("ca.key"))
}

/// A server certificate `dir/NAME.crt` (key `NAME.key`) signed by `ca`, for the
/// subjectAltName `san` ("DNS:localhost,IP:127.0.0.1"), valid `days` days (0: it
/// expires the second it is made).
pub fn sign(dir: &Path, name: &str, ca: (&Path, &Path), san: &str, days: u32, digest: &str) -> (PathBuf, PathBuf) {
    let p = |ext: &str| dir.join(format!("{name}.{ext}"));
    std::fs::write(p("ext"), format!("subjectAltName={san}\n")).unwrap();
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=switchyard-test-server",
        "-keyout",
        &s(&p("key")),
        "-out",
        &s(&p("csr")),
    ]);
    run(&[
        "x509",
        "-req",
        digest,
        "-in",
        &s(&p("csr")),
        "-CA",
        &s(ca.0),
        "-CAkey",
        &s(ca.1),
        "-CAcreateserial",
        "-days",
        &days.to_string(),
        "-extfile",
        &s(&p("ext")),
        "-out",
        &s(&p("crt")),
    ]);
    (p("crt"), p("key"))
}
