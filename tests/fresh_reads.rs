//! Fresh reads over plain asynchronous replication whose standbys apply WAL 2 s late
//! (`recovery_min_apply_delay`, no `remote_apply`): read-your-writes within a client
//! connection, causal tokens across connections, and standbys left behind by a failover.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::SimpleQueryMessage;

const DELAY: Duration = Duration::from_secs(2);
const SPLIT: &str = "pool_mode = \"transaction\"\nread_write_split = true";

/// First column of the first row of a simple query.
async fn one(c: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    let rows = c.simple_query(sql).await.map_err(|e| db_text(&e))?;
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .ok_or_else(|| format!("no row from {sql}"))
}

/// A connection with a causal token given as a startup option.
async fn connect_with_token(port: u16, token: &str) -> Result<Held, String> {
    connect_options(port, &format!("-c switchyard.causal_token={token}"))
        .await
        .map_err(|e| db_text(&e))
}

/// Table `t (id int PRIMARY KEY)` for everyone, replayed on every standby.
fn table_t(cluster: &LocalCluster) {
    cluster
        .sql_db(0, APP_DB, "CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    cluster.sql_db(0, APP_DB, "GRANT ALL ON t TO PUBLIC").unwrap();
    cluster.wait_replayed(Duration::from_secs(10)).unwrap();
}

fn delayed_cluster(standbys: usize) -> LocalCluster {
    let cluster = LocalCluster::start(standbys).unwrap();
    cluster.apply_late(DELAY).unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_write_sees_it_and_reads_alone_stay_on_standbys() {
    let cluster = delayed_cluster(1);
    let admin = free_port();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        SPLIT,
        &format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\""),
    );
    table_t(&cluster);

    // Reads that follow no write go to the standby.
    let reader = connect(proxy.rw).await.unwrap();
    for _ in 0..3 {
        assert_eq!(one(&reader, "SELECT pg_is_in_recovery()").await.unwrap(), "t");
    }

    let c = connect(proxy.rw).await.unwrap();
    for id in 1..=5 {
        c.simple_query(&format!("INSERT INTO t VALUES ({id})")).await.unwrap();
        // The next transaction, a read: it must see the row, wherever it runs.
        let seen = one(&c, &format!("SELECT count(*) FROM t WHERE id = {id}"))
            .await
            .unwrap();
        assert_eq!(seen, "1", "read after write {id} missed it");
    }
    // The standby really is late: a reader with no writes of its own misses the row.
    assert_eq!(one(&reader, "SELECT count(*) FROM t WHERE id = 5").await.unwrap(), "0");
    // Once the standby has replayed the writes, the writer's reads go back to it.
    let back = Instant::now();
    wait_for("writer's reads back on the standby", Duration::from_secs(15), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(one(&c, "SELECT pg_is_in_recovery()"))
        });
        (r.as_deref() == Ok("t")).then_some(())
    });
    report(&format!(
        "reads back on the standby {:?} after the last write",
        back.elapsed()
    ));
    let metrics = http_get(admin, "/metrics").1;
    assert!(
        metrics.contains("switchyard_reads_to_standby_total{cluster=\"main\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_reads_to_primary_for_freshness_total{cluster=\"main\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_causal_token_makes_another_connections_reads_fresh_in_both_pool_modes() {
    let cluster = delayed_cluster(1);
    table_t(&cluster);
    let mut next = 100;
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&cluster, mode, &format!("pool_mode = \"{mode}\""), "");
        let writer = connect(proxy.rw).await.unwrap();
        // Without a token the delayed standby misses the write (what makes this a test).
        next += 1;
        writer
            .simple_query(&format!("INSERT INTO t VALUES ({next})"))
            .await
            .unwrap();
        let plain = connect(proxy.ro).await.unwrap();
        let q = format!("SELECT count(*) FROM t WHERE id = {next}");
        assert_eq!(one(&plain, &q).await.unwrap(), "0", "{mode}: the standby is not late");

        next += 1;
        writer
            .simple_query(&format!("INSERT INTO t VALUES ({next})"))
            .await
            .unwrap();
        let token = one(&writer, "SHOW switchyard.causal_token").await.unwrap();
        assert!(token.starts_with("sy1."), "{mode}: token {token:?}");
        let q = format!("SELECT count(*) FROM t WHERE id = {next}");
        // As a startup option, in both modes.
        let fresh = connect_with_token(proxy.ro, &token).await.unwrap();
        assert_eq!(one(&fresh, &q).await.unwrap(), "1", "{mode}: startup token");
        // With SET on a connection already open.
        next += 1;
        writer
            .simple_query(&format!("INSERT INTO t VALUES ({next})"))
            .await
            .unwrap();
        let token = one(&writer, "SHOW switchyard.causal_token").await.unwrap();
        let q = format!("SELECT count(*) FROM t WHERE id = {next}");
        let set = plain
            .simple_query(&format!("SET switchyard.causal_token = '{token}'"))
            .await;
        if mode == "transaction" {
            set.unwrap();
            assert_eq!(one(&plain, "SHOW switchyard.causal_token").await.unwrap(), token);
            assert_eq!(one(&plain, &q).await.unwrap(), "1", "{mode}: SET token");
        } else {
            // A session-mode session cannot move off its late standby: the SET says so.
            let text = db_text(&set.unwrap_err());
            assert!(text.starts_with("55000") && text.contains("startup option"), "{text}");
        }
        plain.simple_query("RESET switchyard.causal_token").await.unwrap();
        assert_eq!(one(&plain, "SHOW switchyard.causal_token").await.unwrap(), "");

        // A token of another cluster (another system identifier) is refused, clearly.
        let parts: Vec<&str> = token.split('.').collect();
        let foreign = format!("sy1.1.{}.{}", parts[2], parts[3]);
        let err = plain
            .simple_query(&format!("SET switchyard.causal_token = '{foreign}'"))
            .await
            .unwrap_err();
        let text = db_text(&err);
        assert!(
            text.starts_with("22023") && text.contains("another cluster"),
            "{mode}: {text}"
        );
        // The session goes on.
        assert_eq!(one(&plain, "SELECT 1").await.unwrap(), "1");
        let err = connect_with_token(proxy.ro, &foreign).await.err().expect("refused");
        assert!(
            err.contains("22023") && err.contains("another cluster"),
            "{mode}: {err}"
        );
        let err = connect_with_token(proxy.ro, "nonsense").await.err().expect("refused");
        assert!(err.contains("22023"), "{mode}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_orphan_standby_gets_no_reads_and_old_tokens_stay_good() {
    let cluster = LocalCluster::start(2).unwrap();
    let admin = free_port();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        SPLIT,
        &format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\""),
    );
    let writer = connect(proxy.rw).await.unwrap();
    writer
        .simple_query("CREATE TABLE before_failover (id int); INSERT INTO before_failover VALUES (1)")
        .await
        .unwrap();
    let token = one(&writer, "SHOW switchyard.causal_token").await.unwrap();
    drop(writer);
    cluster.wait_replayed(Duration::from_secs(10)).unwrap();

    // The demo's failover: the primary stops, failover1 is promoted, failover2 still
    // follows the dead primary.
    cluster.stop_node(0, "fast").unwrap();
    cluster.promote(1).unwrap();
    wait_for("writes on failover1", Duration::from_secs(15), || {
        (psql(proxy.rw, "/* switchyard:primary */ SELECT inet_server_port()").ok()?
            == cluster.nodes[1].port.to_string())
        .then_some(())
    });
    psql(
        proxy.rw,
        "CREATE TABLE after_failover (id int); INSERT INTO after_failover VALUES (2)",
    )
    .unwrap();
    // Every read through ro sees the table made on the new primary: failover2 is out.
    let mut stale = 0;
    for _ in 0..20 {
        match psql(proxy.ro, "SELECT id FROM after_failover") {
            Ok(v) => assert_eq!(v, "2"),
            Err(_) => stale += 1,
        }
    }
    assert_eq!(stale, 0, "reads served by the orphan standby");
    let (_, status) = http_get(admin, "/status");
    assert!(
        status.contains("not streaming") || status.contains("older than the primary"),
        "{status}"
    );
    // A token from before the failover is honoured on the new timeline.
    let fresh = connect_with_token(proxy.ro, &token).await.unwrap();
    assert_eq!(one(&fresh, "SELECT count(*) FROM before_failover").await.unwrap(), "1");

    // Repointed at the new primary, failover2 streams timeline 2 and gets reads again.
    cluster.follow(2, 1).unwrap();
    let back = Instant::now();
    wait_for("reads on failover2 again", Duration::from_secs(30), || {
        (lands_on(&cluster, proxy.ro) == Ok(2)).then_some(())
    });
    report(&format!(
        "repointed orphan back in the read rotation after {:?}",
        back.elapsed()
    ));
    assert_eq!(psql(proxy.ro, "SELECT id FROM after_failover").unwrap(), "2");
}

/// The first seed article's setup, done properly: Django with two aliases (`default` on
/// listen_rw, `replica` on listen_ro), a POST that creates an object and redirects, and
/// a GET that reads it through the replica. With django_switchyard's middleware the GET
/// finds it (200); without, the late standby does not have it yet (404).
#[test]
fn django_post_redirect_get_reads_its_own_write_through_the_replica_alias() {
    let cluster = delayed_cluster(1);
    let mut migrated = false;
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&cluster, mode, &format!("pool_mode = \"{mode}\""), "");
        let env = [
            ("SY_HOST", "127.0.0.1".to_string()),
            ("SY_RW_PORT", proxy.rw.to_string()),
            ("SY_RO_PORT", proxy.ro.to_string()),
            ("SY_USER", APP_USER.to_string()),
            ("SY_PASSWORD", APP_PASSWORD.to_string()),
            ("SY_DB", APP_DB.to_string()),
        ];
        if !migrated {
            python("django_check.py", &["migrate"], &env);
            // The tables must be on the standby before reads go there.
            cluster.wait_replayed(Duration::from_secs(15)).unwrap();
            migrated = true;
        }
        let out = python("django_causal_check.py", &["with-middleware"], &env);
        assert!(out.contains("ok: with-middleware"), "{mode}: {out}");
        let out = python("django_causal_check.py", &["without-middleware"], &env);
        assert!(out.contains("ok: without-middleware"), "{mode}: {out}");
    }
}

/// A cluster with a late standby, Switchyard in transaction pooling in front, the test
/// project migrated (and the tables on the standby); the environment its checks read.
fn migrated_django_project() -> (LocalCluster, Proxy, [(&'static str, String); 6]) {
    let cluster = delayed_cluster(1);
    let proxy = Proxy::start(&cluster, "proxy", "pool_mode = \"transaction\"", "");
    let env = [
        ("SY_HOST", "127.0.0.1".to_string()),
        ("SY_RW_PORT", proxy.rw.to_string()),
        ("SY_RO_PORT", proxy.ro.to_string()),
        ("SY_USER", APP_USER.to_string()),
        ("SY_PASSWORD", APP_PASSWORD.to_string()),
        ("SY_DB", APP_DB.to_string()),
    ];
    python("django_check.py", &["migrate"], &env);
    cluster.wait_replayed(Duration::from_secs(15)).unwrap();
    (cluster, proxy, env)
}

/// The same under ASGI: the project served by uvicorn over real HTTP, a sync and an
/// async view (the ORM's async API) reading on the replica alias.
#[test]
fn django_under_asgi_reads_its_own_write_across_requests() {
    let (_cluster, _proxy, env) = migrated_django_project();
    let out = python("django_asgi_check.py", &["with-middleware"], &env);
    assert!(out.contains("ok: with-middleware"), "{out}");
    let out = python("django_asgi_check.py", &["without-middleware"], &env);
    assert!(out.contains("ok: without-middleware"), "{out}");
}

/// Celery with a real broker (redis-server) and a real worker: a task sent right after a
/// write reads it through the replica alias over a standby 2 s late, 20 of 20 with
/// django_switchyard's Celery integration; without it, the same tasks read the late
/// standby and miss it.
#[test]
fn a_celery_task_sent_after_a_write_reads_it_through_the_replica_alias() {
    let (_cluster, _proxy, env) = migrated_django_project();
    let with = python("celery_causal_check.py", &["with-integration"], &env);
    assert!(with.contains("ok: with-integration"), "{with}");
    let without = python("celery_causal_check.py", &["without-integration"], &env);
    assert!(without.contains("ok: without-integration"), "{without}");
    for out in [with, without] {
        report(out.lines().find(|l| l.contains(" of ")).unwrap_or(""));
    }
}

/// Run `program args` in the repository; its output, asserting it succeeded.
fn run_in_repo(program: &str, args: &[&str]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}:\n{text}");
    text
}

/// django_switchyard's own unit tests (no database needed), on the Django installed
/// (5.2) and on Django 4.2 LTS (in a virtual environment that sees the rest).
#[test]
fn django_switchyard_unit_tests_pass_on_django_4_2_and_5_2() {
    let tests = "python/django_switchyard/tests";
    let out = run_in_repo("python3", &["-m", "pytest", "-q", "-p", "no:cacheprovider", tests]);
    report(&format!("Django 5.2: {}", out.lines().last().unwrap_or("")));
    let venv = tempfile::tempdir().unwrap();
    let venv = venv.path().to_str().unwrap();
    run_in_repo("python3", &["-m", "venv", "--system-site-packages", venv]);
    let python = format!("{venv}/bin/python");
    run_in_repo(
        &python,
        &[
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "Django>=4.2,<4.3",
        ],
    );
    let version = run_in_repo(&python, &["-c", "import django; print(django.get_version())"]);
    assert!(version.starts_with("4.2"), "{version}");
    let out = run_in_repo(&python, &["-m", "pytest", "-q", "-p", "no:cacheprovider", tests]);
    report(&format!(
        "Django {}: {}",
        version.trim(),
        out.lines().last().unwrap_or("")
    ));
}

/// The package as PyPI would get it: a wheel and an sdist that `twine check` accepts,
/// the wheel carrying `py.typed`, and the code passing `mypy --strict`.
#[test]
fn django_switchyard_builds_a_checked_wheel_and_sdist_and_is_typed() {
    let dist = tempfile::tempdir().unwrap();
    let dist = dist.path().to_str().unwrap();
    run_in_repo(
        "python3",
        &["-m", "build", "--outdir", dist, "python/django_switchyard"],
    );
    let files: Vec<String> = std::fs::read_dir(dist)
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with(".whl")) && files.iter().any(|f| f.ends_with(".tar.gz")),
        "{files:?}"
    );
    let mut args = vec!["-m", "twine", "check", "--strict"];
    args.extend(files.iter().map(String::as_str));
    run_in_repo("python3", &args);
    let wheel = files.iter().find(|f| f.ends_with(".whl")).unwrap();
    let listing = run_in_repo("python3", &["-m", "zipfile", "-l", wheel]);
    assert!(listing.contains("django_switchyard/py.typed"), "{listing}");
    run_in_repo(
        "python3",
        &[
            "-m",
            "mypy",
            "--strict",
            "--ignore-missing-imports",
            "python/django_switchyard/django_switchyard",
        ],
    );
}

/// Connections of the fresh-read oracle on the primary (it keeps one open once asked).
fn oracle_connections(cluster: &LocalCluster) -> String {
    cluster
        .sql(
            0,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'switchyard-causal'",
        )
        .unwrap()
}

/// A write that a read is likely to follow (the client read after its previous write,
/// or it is its first) has its WAL position learned on its own connection as it ends,
/// so the read does not wait for the oracle; a write no read followed is left to the
/// oracle, which the next read asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_reads_follow_learns_its_floor_on_its_own_connection() {
    let cluster = delayed_cluster(1);
    let proxy = Proxy::start(&cluster, "proxy", SPLIT, "");
    table_t(&cluster);
    let c = connect(proxy.rw).await.unwrap();
    // Write, read, write, read: each read sees its write, and the oracle is never asked.
    for id in 1..=3 {
        c.simple_query(&format!("INSERT INTO t VALUES ({id})")).await.unwrap();
        let seen = one(&c, &format!("SELECT count(*) FROM t WHERE id = {id}"))
            .await
            .unwrap();
        assert_eq!(seen, "1", "read after write {id} missed it");
    }
    // The extended protocol: the question goes after the Sync that commits.
    c.execute("INSERT INTO t VALUES ($1)", &[&4i32]).await.unwrap();
    assert_eq!(one(&c, "SELECT count(*) FROM t WHERE id = 4").await.unwrap(), "1");
    assert_eq!(oracle_connections(&cluster), "0", "the oracle was asked");
    // COPY FROM STDIN as a session's first write (whose floor is wanted): no question
    // may follow it in the same write (the server reads COPY data next; a Query there
    // fails the COPY), so its connection is asked once the COPY is answered.
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows");
    std::fs::write(&rows, "20\n21\n").unwrap();
    let copy = format!("\\copy t (id) FROM '{}'", rows.display());
    let out = psql_statements(proxy.rw, &[&copy, "SELECT count(*) FROM t WHERE id IN (20, 21)"]);
    assert_eq!(out.last().map(String::as_str), Some("2"), "{out:?}");
    assert_eq!(oracle_connections(&cluster), "0", "the oracle was asked");
    // Two writes in a row: the first's position is learned as it ends (a read followed
    // the write before it), the second's is not (no read followed the first), so the
    // read after it asks the oracle.
    c.simple_query("INSERT INTO t VALUES (10)").await.unwrap();
    c.simple_query("INSERT INTO t VALUES (11)").await.unwrap();
    assert_eq!(one(&c, "SELECT count(*) FROM t WHERE id = 11").await.unwrap(), "1");
    assert_eq!(oracle_connections(&cluster), "1", "the oracle was not asked");
    // The standby is late indeed: asked directly, it does not have the rows yet.
    assert_eq!(
        cluster
            .sql_db(1, APP_DB, "SELECT count(*) FROM t WHERE id IN (3, 11)")
            .unwrap(),
        "0"
    );
}

/// `read_your_writes = "user"`: a write on one connection is seen by the next connection
/// of the same user (what test suites and apps that reconnect per request do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shared_floor_the_next_connection_of_the_user_sees_the_write() {
    let cluster = delayed_cluster(1);
    let proxy = Proxy::start(&cluster, "proxy", &format!("{SPLIT}\nread_your_writes = \"user\""), "");
    table_t(&cluster);
    for id in 1..=3 {
        let writer = connect(proxy.rw).await.unwrap();
        writer
            .simple_query(&format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap();
        drop(writer);
        let reader = connect(proxy.rw).await.unwrap();
        let q = format!("SELECT count(*) FROM t WHERE id = {id}");
        assert_eq!(
            one(&reader, &q).await.unwrap(),
            "1",
            "write {id} missed by the next connection"
        );
    }
    // The standby is late indeed: asked directly, it does not have the row yet.
    assert_eq!(
        cluster
            .sql_db(1, APP_DB, "SELECT count(*) FROM t WHERE id = 3")
            .unwrap(),
        "0"
    );
}

/// A primary with one standby that applies WAL `late`, through a split rw endpoint with
/// `hold_ms` as the failover hold; table `t` holds row 1, written by the returned
/// connection, whose next read already went to the primary (its floor is known). Then
/// the primary is stopped and Switchyard has seen it down.
async fn writer_left_without_primary(late: Duration, hold_ms: u64) -> (LocalCluster, Proxy, Held) {
    let cluster = LocalCluster::start(1).unwrap();
    let admin = free_port();
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &format!("{SPLIT}\nfailover_hold_ms = {hold_ms}\nmax_replica_lag_ms = 600000"),
        &format!("[admin]\nhttp_listen = \"127.0.0.1:{admin}\""),
    );
    table_t(&cluster);
    cluster.apply_late(late).unwrap();
    let c = connect(proxy.rw).await.unwrap();
    c.simple_query("INSERT INTO t VALUES (1)").await.unwrap();
    assert_eq!(one(&c, "SELECT count(*) FROM t").await.unwrap(), "1");
    assert_eq!(
        one(&c, "SELECT pg_is_in_recovery()").await.unwrap(),
        "f",
        "the standby is late: the primary answers"
    );
    cluster.stop_node(0, "immediate").unwrap();
    wait_for("the primary seen down", Duration::from_secs(20), || {
        let (_, body) = http_get(admin, "/status");
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        (doc["clusters"][0]["nodes"][0]["health"].as_str()? == "down").then_some(())
    });
    (cluster, proxy, c)
}

/// The chaos suite's stale read (seed 5): a read that must see the client's write, in
/// the moment between the primary's loss and a promotion, went to a standby that did
/// not have it. It now waits for the promotion and reads its write there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_primary_a_read_that_must_see_a_write_waits_for_the_promotion() {
    let (cluster, _proxy, c) = writer_left_without_primary(Duration::from_secs(30), 30_000).await;
    let started = Instant::now();
    let promote = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1500));
        // Promotion ends the apply delay: the new primary has every write it received.
        cluster.promote(1).unwrap();
        cluster
    });
    let seen = one(&c, "SELECT count(*) || ' ' || pg_is_in_recovery()::text FROM t").await;
    let waited = started.elapsed();
    let _cluster = promote.await.unwrap();
    assert_eq!(
        seen.unwrap(),
        "1 false",
        "the read must wait for the new primary, not read the late standby"
    );
    assert!(
        waited >= Duration::from_millis(1000),
        "answered after {waited:?}: it did not wait"
    );
    report(&format!("read held {waited:?} until the standby's promotion"));
}

/// When no primary comes back within the hold, reads go on from the standbys that are
/// left, as fresh as they are (documented), instead of failing; and the hold counts
/// from the primary's loss, so the next read does not wait again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_primary_past_the_hold_reads_go_on_from_the_standbys() {
    let (_cluster, _proxy, c) = writer_left_without_primary(Duration::from_secs(30), 2_000).await;
    let seen = one(&c, "SELECT count(*) || ' ' || pg_is_in_recovery()::text FROM t").await;
    assert_eq!(seen.unwrap(), "0 true", "served by the late standby after the hold");
    let started = Instant::now();
    assert_eq!(one(&c, "SELECT pg_is_in_recovery()").await.unwrap(), "t");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "held again: {:?}",
        started.elapsed()
    );
}
