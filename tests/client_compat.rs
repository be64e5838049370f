//! What client libraries' own test suites found through Switchyard (issue 14), one
//! check per cause (tests/python/compat_check.py, psycopg 3), in session mode and in
//! transaction mode with read/write splitting, against a primary and a standby.

mod common;

use common::*;

const SPLIT: &str = "pool_mode = \"transaction\"\npool_size = 10\ncheckout_timeout_ms = 20000\nread_write_split = true";

#[test]
fn client_suite_findings_hold_in_session_mode() {
    let cluster = LocalCluster::start(1).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "", "");
    let out = python(
        "compat_check.py",
        &["--port", &proxy.rw.to_string(), "--mode", "session"],
        &[],
    );
    assert!(out.contains("ok: all compat checks passed"), "{out}");
}

#[test]
fn client_suite_findings_hold_in_transaction_mode_with_splitting() {
    let cluster = LocalCluster::start(1).unwrap();
    // Read-your-writes off: the checks' reads right after their writes then go to the
    // standby, as the retry path below needs (with it on they run on the primary).
    let proxy = Proxy::start(&cluster, "proxy", &format!("{SPLIT}\nread_your_writes = \"off\""), "");
    let out = python(
        "compat_check.py",
        &["--port", &proxy.rw.to_string(), "--mode", "transaction", "--split"],
        &[],
    );
    assert!(out.contains("ok: all compat checks passed"), "{out}");
    let log = proxy.log_text();
    // The unlogged-table reads were refused by the standby, then run on the primary.
    assert!(
        log.contains("standby refused a read; running it on the primary"),
        "{log}"
    );
    assert!(log.contains("closed idle pooled connections to a database a statement needs free"));
}
