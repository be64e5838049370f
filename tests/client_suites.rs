//! Slices of client libraries' own test suites (psycopg 3.3.4, SQLAlchemy 2.0.58,
//! Django 5.2's runner) directly against PostgreSQL and through Switchyard in session
//! mode and in transaction mode with read/write splitting (`compat/run --slice`; the
//! plain transaction-mode target too with `make compat-slice`, to keep this test
//! command under half an hour). A test that passes direct and fails through the proxy
//! fails this test, unless `compat/allowlist.toml` says why it never can in
//! transaction mode. The full suites: `make compat`.

use std::process::Command;

fn compat_slice(suite: &str) {
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{repo}/compat/run"))
        .args(["--slice", "--suite", suite])
        .args(["--target", "session", "--target", "transaction+split"])
        .args([
            "--junit-dir",
            &format!("{}/compat-{suite}", std::env::temp_dir().display()),
        ])
        .env("SWITCHYARD_BIN", env!("CARGO_BIN_EXE_switchyard"))
        .current_dir(repo)
        .output()
        .expect("run compat/run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "{suite}: tests pass direct and fail through Switchyard:\n{text}"
    );
}

/// psycopg's tests are not on PyPI: they come from `../shared/suites` (or
/// `$SWITCHYARD_SUITES`), which a machine may not have. Without them this test says so
/// loudly and checks nothing; everything else still runs.
fn psycopg_tests_present() -> bool {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        std::env::var("SWITCHYARD_SUITES").ok().map(std::path::PathBuf::from),
        repo.parent().map(|p| p.join("shared/suites")),
        Some("/work/shared/suites".into()),
    ]
    .into_iter()
    .flatten()
    .any(|d| d.join("psycopg-3.3.4-tests.tar.gz").exists())
}

#[test]
fn psycopg_slice_gives_the_same_results_as_direct() {
    if !psycopg_tests_present() {
        eprintln!(
            "SKIPPED: psycopg-3.3.4-tests.tar.gz not found (SWITCHYARD_SUITES, ../shared/suites, /work/shared/suites)"
        );
        return;
    }
    compat_slice("psycopg");
}

#[test]
fn sqlalchemy_postgresql_dialect_gives_the_same_results_as_direct() {
    compat_slice("sqlalchemy");
}

#[test]
fn django_runner_with_parallel_2_gives_the_same_results_as_direct() {
    compat_slice("django");
}
