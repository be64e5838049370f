//! MySQL clients nobody here wrote, through both endpoints of an `engine = "mysql"`
//! cluster (a MariaDB primary and GTID replicas): Django with the mysqlclient driver and
//! a master/follower router, mysqlclient and PyMySQL on their own, sysbench (server-side
//! prepared statements: the binary protocol), mysql_async's prepared statements with a
//! 20 MiB parameter sent as COM_STMT_SEND_LONG_DATA, and SQL-level PREPARE / EXECUTE.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mysql::*;
use common::*;
use mysql_async::prelude::*;

/// max_allowed_packet on every server for the 20 MiB blobs; set before the proxy opens
/// any session, so that every server connection it opens starts with it.
const MAX_PACKET: u64 = 64 * 1024 * 1024;
const BLOB_SIZE: usize = 20 * 1024 * 1024;

fn raise_max_allowed_packet(cluster: &MariaCluster) {
    for i in 0..cluster.nodes.len() {
        cluster
            .sql(i, &format!("SET GLOBAL max_allowed_packet = {MAX_PACKET}"))
            .unwrap();
    }
}

/// The port in the first `server port N` of a django_mysql_check.py output.
fn served_by(out: &str) -> u16 {
    let at = out
        .find("server port ")
        .unwrap_or_else(|| panic!("no server port in:\n{out}"));
    out[at + 12..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no server port in:\n{out}"))
}

#[test]
fn django_on_mysql_migrates_writes_reads_and_keeps_reading_when_replicas_die() {
    let started = Instant::now();
    let mut cluster = MariaCluster::start(2).unwrap();
    let proxy = my_proxy(&cluster, "");
    let env = django_env(&proxy);
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let port = |i: usize| ports[i];
    for phase in ["migrate", "write", "read", "atomic", "read"] {
        let out = python("django_mysql_check.py", &[phase], &env);
        assert!(out.contains(&format!("ok: {phase}")), "{out}");
        print!("{out}");
        if phase == "read" {
            assert_eq!(served_by(&out), port(1), "reads on the first replica:\n{out}");
        }
    }
    // The migration ran on the primary only and reached the replicas by replication.
    cluster.wait_replicated(0, Duration::from_secs(10)).unwrap();
    for i in 1..=2 {
        assert_eq!(cluster.sql(i, "SELECT COUNT(*) FROM app.shop_customer").unwrap(), "2");
        assert_eq!(
            cluster
                .sql(i, "SELECT COUNT(*) FROM app.django_migrations WHERE app = 'shop'")
                .unwrap(),
            "1"
        );
    }

    // Requests keep being served (one Django process, a connection per request) while
    // both replicas are killed, one after the other.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/django_mysql_check.py");
    let mut serve = Command::new("python3");
    serve
        .arg(&script)
        .args(["serve", "9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &env {
        serve.env(k, v);
    }
    let serve = serve.spawn().expect("run python3");
    std::thread::sleep(Duration::from_millis(2000));
    let killed = Instant::now();
    cluster.kill9(1).unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    cluster.kill9(2).unwrap();
    let out = serve.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{text}");
    assert!(out.status.success(), "serve failed:\n{text}");
    let changes: Vec<u16> = text
        .lines()
        .filter(|l| l.starts_with("ok: serve request"))
        .map(served_by)
        .collect();
    assert_eq!(
        changes,
        vec![port(1), port(2), port(0)],
        "requests served by failover1, then failover2, then the primary:\n{text}"
    );
    let failed = text.lines().filter(|l| l.starts_with("error: serve request")).count();
    report(&format!(
        "Django (mysqlclient) requests through the replica alias while both replicas were killed: {failed} failed ({:?} after the first kill)",
        killed.elapsed()
    ));
    assert!(
        failed <= 2,
        "at most the request in flight at each kill may fail:\n{text}"
    );

    // And a fresh process: every read phase passes, served by the primary (read-only).
    let out = python("django_mysql_check.py", &["read"], &env);
    assert!(out.contains("ok: read visible on replica"), "{out}");
    assert_eq!(served_by(&out), port(0), "{out}");
    assert!(
        out.contains("@@read_only=0, @@tx_read_only=1"),
        "the replica alias on the primary is a read-only session:\n{out}"
    );
    assert!(out.contains("a write through replica is refused (1792)"), "{out}");
    assert_eq!(my_lands_on(&cluster, proxy.ro), Ok(0));
    report(&format!("Django on MySQL test: {:?}", started.elapsed()));
}

#[test]
fn mysqlclient_and_pymysql_work_through_rw_and_ro_with_20_mib_blobs() {
    let started = Instant::now();
    let cluster = MariaCluster::start(1).unwrap();
    raise_max_allowed_packet(&cluster);
    let proxy = my_proxy(&cluster, "");
    for driver in ["mysqldb", "pymysql"] {
        let t = Instant::now();
        let out = python(
            "mysql_clients_check.py",
            &[
                "--driver",
                driver,
                "--rw-port",
                &proxy.rw.to_string(),
                "--ro-port",
                &proxy.ro.to_string(),
            ],
            &[],
        );
        print!("{out}");
        assert!(out.contains(&format!("ok: all {driver} checks passed")), "{out}");
        assert!(
            out.contains(&format!("rw on server port {}", cluster.nodes[0].port))
                && out.contains(&format!("ro on server port {}", cluster.nodes[1].port)),
            "{out}"
        );
        report(&format!("{driver} checks through the proxy: {:?}", t.elapsed()));
    }
    // The blob went through rw to the primary and reached the replica by replication.
    assert_eq!(cluster.sql(1, "SELECT COUNT(*) FROM app.kv_mysqldb").unwrap(), "12");
    report(&format!("mysqlclient + PyMySQL test: {:?}", started.elapsed()));
}

#[test]
fn sysbench_oltp_read_write_through_rw_and_read_only_through_ro() {
    let started = Instant::now();
    let cluster = MariaCluster::start(2).unwrap();
    let proxy = my_proxy(&cluster, "");
    let (text, _) = sysbench(proxy.rw, "oltp_read_write", "prepare", &[]);
    assert!(text.contains("Creating table 'sbtest2'"), "{text}");
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();

    let executes = |i| global_status(&cluster, i, "Com_stmt_execute");
    let (before_primary, before_replica) = (executes(0), executes(1));
    for (port, test, node) in [(proxy.rw, "oltp_read_write", 0), (proxy.ro, "oltp_read_only", 1)] {
        // 4 threads on 2 x 1000 rows deadlock now and then, through the proxy or not
        // (InnoDB picks a victim; sysbench retries the transaction and counts an
        // "ignored error"). Only deadlocks are ignored here: any other error fails the
        // run, and every ignored error must be a deadlock the server counted.
        let deadlocks = global_status(&cluster, node, "Innodb_deadlocks");
        let (text, s) = sysbench(port, test, "run", &[]);
        let deadlocks = global_status(&cluster, node, "Innodb_deadlocks") - deadlocks;
        println!("{text}");
        assert!(s.transactions > 0 && s.queries > 0, "{test}: no transactions:\n{text}");
        assert_eq!(
            (s.ignored_errors, s.reconnects),
            (deadlocks, 0),
            "{test}: errors other than the server's {deadlocks} deadlocks, or reconnects:\n{text}"
        );
        if test == "oltp_read_only" {
            assert_eq!(s.ignored_errors, 0, "{text}");
        }
        report(&format!(
            "sysbench {test} through {}: {} transactions, {} queries in 5 s, {} ignored errors (= InnoDB deadlocks), 0 reconnects",
            if node == 0 { "rw" } else { "ro" },
            s.transactions,
            s.queries,
            s.ignored_errors,
        ));
    }
    // The runs used server-side prepared statements (COM_STMT_EXECUTE), each on the
    // node its endpoint routes to.
    let (primary, replica) = (executes(0) - before_primary, executes(1) - before_replica);
    assert!(
        primary > 1000 && replica > 1000,
        "Com_stmt_execute: +{primary} on the primary, +{replica} on failover1"
    );
    assert_eq!(executes(2), 0, "nothing on failover2 (read_balance = priority)");
    // The read-write run's changes reached the replicas, the same rows everywhere.
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();
    let sums = |i| cluster.sql(i, "CHECKSUM TABLE app.sbtest1, app.sbtest2").unwrap();
    assert_eq!(sums(0), sums(1));
    assert_eq!(sums(0), sums(2));
    report(&format!("sysbench test: {:?}", started.elapsed()));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_in_the_binary_protocol_and_in_sql() {
    let started = Instant::now();
    let cluster = MariaCluster::start(1).unwrap();
    raise_max_allowed_packet(&cluster);
    let proxy = my_proxy(&cluster, "");

    // mysql_async: COM_STMT_PREPARE / EXECUTE / CLOSE, binary result rows.
    let mut rw = mysql_async::Conn::new(my_opts(proxy.rw)).await.unwrap();
    let (port, read_only): (u16, u8) = rw.query_first("SELECT @@port, @@read_only").await.unwrap().unwrap();
    assert_eq!((port, read_only), (cluster.nodes[0].port, 0));
    rw.query_drop(
        "CREATE TABLE ps (id INT PRIMARY KEY, name VARCHAR(50), amount DECIMAL(10,2), at DATETIME(6), b LONGBLOB)",
    )
    .await
    .unwrap();
    let insert = rw
        .prep("INSERT INTO ps (id, name, amount, at) VALUES (?, ?, ?, ?)")
        .await
        .unwrap();
    rw.exec_batch(
        &insert,
        (1..=50).map(|i| {
            (
                i,
                format!("name {i} 'ü'"),
                format!("{i}.25"),
                "2024-02-29 12:34:56.789012",
            )
        }),
    )
    .await
    .unwrap();
    let row: (i32, String, String, String) = rw
        .exec_first(
            "SELECT id, name, CAST(amount AS CHAR), CAST(at AS CHAR) FROM ps WHERE id = ?",
            (7,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row,
        (
            7,
            "name 7 'ü'".into(),
            "7.25".into(),
            "2024-02-29 12:34:56.789012".into()
        )
    );
    let sum: (i64, String) = rw
        .exec_first("SELECT COUNT(*), CAST(SUM(amount) AS CHAR) FROM ps WHERE id > ?", (0,))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sum, (50, "1287.50".into()));
    // A server error on EXECUTE: the statement and the connection stay usable.
    let err = rw.exec_drop(&insert, (1, "dup", "1", "2024-01-01")).await.unwrap_err();
    assert!(err.to_string().contains("1062"), "{err}");
    rw.exec_drop(&insert, (51, "after the error", "1", "2024-01-01"))
        .await
        .unwrap();
    rw.close(insert).await.unwrap();
    rw.ping().await.unwrap();

    // A 20 MiB parameter: more than a packet, so sent as COM_STMT_SEND_LONG_DATA chunks
    // (no answer from the server to those), then EXECUTE; the row comes back as a
    // binary row of more than 16 MiB.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let blob: Vec<u8> = (0..BLOB_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let t = Instant::now();
    rw.exec_drop("UPDATE ps SET b = ? WHERE id = ?", (blob.clone(), 1))
        .await
        .unwrap();
    let (len, digest): (u64, String) = rw
        .exec_first("SELECT LENGTH(b), SHA2(b, 256) FROM ps WHERE id = ?", (1,))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((len, digest), (BLOB_SIZE as u64, sha256(&blob)));
    let back: Vec<u8> = rw
        .exec_first("SELECT b FROM ps WHERE id = ?", (1,))
        .await
        .unwrap()
        .unwrap();
    assert!(back == blob, "the blob read back differs: {} bytes", back.len());
    report(&format!(
        "mysql_async 20 MiB COM_STMT_SEND_LONG_DATA + binary row back through rw: {:?}",
        t.elapsed()
    ));
    // Reset (COM_RESET_CONNECTION passes through on rw): session state gone.
    rw.query_drop("SET @v = 42").await.unwrap();
    rw.reset().await.unwrap();
    let v: Option<Option<i64>> = rw.query_first("SELECT @v").await.unwrap();
    assert_eq!(v, Some(None), "a user variable survived COM_RESET_CONNECTION");
    rw.disconnect().await.unwrap();

    // On ro: prepared reads of the replicated rows; a reset keeps the session read-only.
    let mut ro = mysql_async::Conn::new(my_opts(proxy.ro)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n: Result<Option<i64>, _> = ro.exec_first("SELECT COUNT(*) FROM ps WHERE b IS NOT NULL", ()).await;
        if let Ok(Some(1)) = n {
            break;
        }
        assert!(Instant::now() < deadline, "the blob did not replicate: {n:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (port, digest): (u16, String) = ro
        .exec_first("SELECT @@port, SHA2(b, 256) FROM ps WHERE id = ?", (1,))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((port, digest), (cluster.nodes[1].port, sha256(&blob)));
    ro.reset().await.unwrap();
    let tx_read_only: Option<u8> = ro.query_first("SELECT @@tx_read_only").await.unwrap();
    assert_eq!(tx_read_only, Some(1), "ro session no longer read-only after a reset");
    // Refused: 1792 (a read-only transaction) or 1290 (the replica's --read-only).
    let err = ro.exec_drop("DELETE FROM ps WHERE id = ?", (2,)).await.unwrap_err();
    assert!(
        err.to_string().contains("1792") || err.to_string().contains("1290"),
        "{err}"
    );
    let n: Option<i64> = ro.exec_first("SELECT COUNT(*) FROM ps", ()).await.unwrap();
    assert_eq!(n, Some(51));
    ro.disconnect().await.unwrap();

    // SQL-level PREPARE / EXECUTE / DEALLOCATE with the mariadb CLI (text protocol).
    let out = mariadb(
        proxy.rw,
        "SET @x = 20; PREPARE s FROM 'SELECT name FROM ps WHERE id = ? + 1'; EXECUTE s USING @x; \
         SET @x = 41; EXECUTE s USING @x; DEALLOCATE PREPARE s",
    )
    .unwrap();
    assert_eq!(out, "name 21 'ü'\nname 42 'ü'");
    let out = mariadb(
        proxy.ro,
        "PREPARE s FROM 'SELECT COUNT(*) FROM ps WHERE id <= ?'; SET @n = 10; EXECUTE s USING @n; \
         SELECT @@tx_read_only",
    )
    .unwrap();
    // (`@@tx_read_only` is read alone: in a statement that reads a table MariaDB
    // shows 0, proxy or not.)
    assert_eq!(out, "10\n1");
    report(&format!("prepared statements test: {:?}", started.elapsed()));
}

/// Django's own test suite (tests/python/django_suite.py --engine mysql) against `port`
/// as the `django` user, its test databases named after `prefix`: the summary line minus
/// timing, with the FAIL: / ERROR: lines (the same shape as tests/pooling.rs's).
fn django_suite_mysql(port: u16, prefix: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/django_suite.py");
    let t = Instant::now();
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--engine",
            "mysql",
            "--port",
            &port.to_string(),
            "--user",
            "django",
            "--password",
            "django",
            "--db-prefix",
            prefix,
            // Two test processes: the runner clones the test databases with mysqldump
            // piped into the mysql CLI, through the same port.
            "--parallel",
            "2",
            "--labels",
            "basic",
            "queries",
            "transactions",
            "backends",
        ])
        .output()
        .expect("run django_suite.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text
        .lines()
        .find(|l| l.starts_with("django-suite:"))
        .unwrap_or_else(|| panic!("no summary line:\n{text}"))
        .to_string();
    report(&format!("{summary} (wall {:?}, port {port})", t.elapsed()));
    assert!(!summary.contains("ran=0 "), "the suite did not run:\n{text}");
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("FAIL:") || l.starts_with("ERROR:"))
        .collect();
    if !failures.is_empty() {
        println!("{text}");
    }
    // Keep counts, drop the timing.
    format!("{} {:?}", summary.split(" seconds=").next().unwrap(), failures)
}

#[test]
fn djangos_own_test_suite_on_mariadb_gives_the_same_results_through_the_proxy() {
    let started = Instant::now();
    let cluster = MariaCluster::start(1).unwrap();
    // Django's test runner creates and drops test_<prefix>_default / _other (and, with
    // --parallel, their clones): a login with rights on every database. Created on the
    // primary, it reaches the replica by replication.
    cluster
        .sql(
            0,
            "CREATE USER 'django'@'%' IDENTIFIED BY 'django'; GRANT ALL PRIVILEGES ON *.* TO 'django'@'%'",
        )
        .unwrap();
    // Its own database names for each run, as in tests/pooling.rs's PostgreSQL twin.
    let direct = django_suite_mysql(cluster.nodes[0].port, "django_suite");
    // Session pooling; transaction pooling; a split rw endpoint, whose reads see the
    // writes of the user's other connections (the test runner sets up databases on
    // one connection and uses them on others).
    for (mode, extra) in [
        ("session", ""),
        ("transaction", "pool_mode = \"transaction\"\npool_size = 8"),
        ("split", "read_write_split = true\nread_your_writes = \"user\""),
        (
            "transaction_split",
            "read_write_split = true\nread_your_writes = \"user\"\npool_mode = \"transaction\"\npool_size = 8",
        ),
    ] {
        let (rw, ro) = (free_port(), free_port());
        let text = my_config(&cluster, rw, ro, extra) + "\n[[users]]\nname = \"django\"\npassword = \"django\"\n";
        let proxy = my_spawn(&cluster, mode, &text, rw, ro);
        wait_for("MySQL proxy ready", Duration::from_secs(30), || {
            let w = mariadb_as(proxy.rw, "django", "django", None, "SELECT @@read_only").ok()? == "0";
            let r = mariadb(proxy.ro, "SELECT @@read_only").ok()? == "1";
            (w && r).then_some(())
        });
        let through = django_suite_mysql(proxy.rw, &format!("django_suite_{mode}"));
        assert_eq!(
            direct,
            through,
            "{mode}: direct vs through the proxy\n{}",
            proxy.log_text()
        );
        // The proxy run really went through the proxy, and it ended none of those sessions.
        let log = proxy.log_text();
        let sessions = log
            .lines()
            .filter(|l| l.contains("session started") && l.contains("user=django"))
            .count();
        let ended: Vec<&str> = log.lines().filter(|l| l.contains("session ended by proxy")).collect();
        assert!(
            sessions > 10,
            "{mode}: {sessions} django sessions in the proxy log:\n{log}"
        );
        assert!(
            ended.is_empty(),
            "{mode}: sessions ended by the proxy:\n{}",
            ended.join("\n")
        );
        report(&format!(
            "Django suite through the proxy ({mode}): {sessions} client sessions"
        ));
    }
    // Every test database the runs made is gone again (dropped through the proxy too).
    assert_eq!(
        cluster
            .sql(
                0,
                "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name LIKE 'test\\_%'"
            )
            .unwrap(),
        "0"
    );
    report(&format!("Django suite on MariaDB test: {:?}", started.elapsed()));
}

/// A client that pipelines and reads while it writes: a 24 MiB result and, right
/// behind its query, a 24 MiB query. Direct, the server streams the result while the
/// client drains it; through the proxy, too: the relay reads and writes both directions
/// independently (a relay that waits on one write before it reads again stalls here
/// with both directions full).
#[test]
fn a_pipelining_client_with_large_packets_both_ways_does_not_stall() {
    let cluster = MariaCluster::start(1).unwrap();
    raise_max_allowed_packet(&cluster);
    let proxy = my_proxy(&cluster, "");
    let size = (24 * 1024 * 1024).to_string();
    for (what, port) in [("direct", cluster.nodes[0].port), ("through the proxy", proxy.rw)] {
        let out = python("mysql_pipeline.py", &[&port.to_string(), &size], &[]);
        assert!(out.contains("ok "), "{what}: {out}");
    }
}
