//! The runnable examples under `examples/` (the seed articles' Django apps behind
//! Switchyard), in their short form: each starts the demo cluster, migrates, runs its
//! app, kills servers under it, and must show the app still serving.

mod common;

use std::process::Command;

use common::*;

fn run_example(dir: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("make")
        .args(["-C", &format!("{root}/examples/{dir}"), "ci"])
        .env("SWITCHYARD", switchyard_bin())
        .env("RW_PORT", free_port().to_string())
        .env("RO_PORT", free_port().to_string())
        .env("HTTP_PORT", free_port().to_string())
        .output()
        .expect("run make");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{dir}:\n{text}");
    assert!(text.contains("ok: the app kept serving"), "{dir}:\n{text}");
    report(&format!(
        "{dir}: {}",
        text.lines().find(|l| l.starts_with("done:")).unwrap_or("")
    ));
    text
}

/// The second seed article's `default` / `failover1` / `failover2`, replaced by one
/// alias: the primary killed under the app, Switchyard promotes a standby.
#[test]
fn the_postgres_seed_app_keeps_serving_when_its_primary_dies() {
    let out = run_example("django-seed-postgres");
    assert!(
        out.contains("failover1 up primary") || out.contains("failover2 up primary"),
        "{out}"
    );
}

/// The first seed article's two aliases and router: both replicas killed under the
/// app, its reads go to the primary.
#[test]
fn the_mysql_seed_app_keeps_serving_when_its_replicas_die() {
    run_example("django-seed-mysql");
}
