//! Fresh reads on MariaDB through Switchyard: a read on the ro endpoint sees the write
//! the same user made on rw (`read_your_writes = "user"`), or the write a causal token
//! names (`SELECT` / `SET @switchyard_causal_token`, the connection attribute), with a
//! replica that applies everything 2 s late (`MASTER_DELAY = 2`), so a stale read is
//! what happens without them (checked too).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::mysql::*;
use common::*;
use mysql_async::prelude::Queryable;

/// A primary and one replica that applies 2 s late; table `app.fresh` on both.
fn delayed_cluster() -> MariaCluster {
    let c = MariaCluster::start(1).unwrap();
    c.sql(0, "CREATE TABLE app.fresh (id BIGINT PRIMARY KEY)").unwrap();
    c.wait_replicated(0, Duration::from_secs(20)).unwrap();
    c.sql(1, "STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 2; START SLAVE")
        .unwrap();
    c
}

#[derive(serde::Deserialize, Debug)]
struct Outcome {
    fresh: u32,
    stale: u32,
    servers: BTreeMap<String, u32>,
    tokens: Vec<Option<String>>,
    errors: Vec<(String, Option<u32>, String)>,
    #[serde(default)]
    state: Vec<String>,
    #[serde(default)]
    reader: Vec<String>,
}

fn check(proxy: &Proxy, mode: &str, n: u32) -> Outcome {
    let out = python("mysql_fresh_check.py", &[mode, &n.to_string()], &django_env(proxy));
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn server_id(cluster: &MariaCluster, i: usize) -> String {
    cluster.sql(i, "SELECT @@server_id").unwrap()
}

/// `read_your_writes = "user"`: a read on ro after the same user's write on rw sees it,
/// 20 of 20: served by the replica when it gets there within `causal_wait_ms`, else by
/// the primary. With `"off"` the same reads miss the rows (the delay is real).
#[test]
fn a_read_on_ro_sees_the_users_write_on_rw() {
    let cluster = delayed_cluster();
    let (primary, replica) = (server_id(&cluster, 0), server_id(&cluster, 1));

    let (proxy, _) = start(&cluster, "read_your_writes = \"off\"");
    let off = check(&proxy, "user", 5);
    assert!(
        off.stale >= 4,
        "the replica applies late, so reads miss the rows: {off:?}"
    );
    drop(proxy);

    // Waiting on the replica: the reads stay there.
    let (proxy, admin) = start(&cluster, "read_your_writes = \"user\"\ncausal_wait_ms = 4000");
    let waited = check(&proxy, "user", 5);
    assert_eq!((waited.fresh, waited.stale), (5, 0), "{waited:?}");
    assert_eq!(waited.servers.get(&replica), Some(&5), "{waited:?}");
    let m = metrics(admin);
    assert!(
        m.contains("switchyard_causal_wait_seconds_count{cluster=\"main\"} 5"),
        "{m}"
    );
    drop(proxy);

    // Not waiting: the session moves to the primary for the read that needs it.
    let (proxy, admin) = start(&cluster, "read_your_writes = \"user\"");
    let moved = check(&proxy, "user", 20);
    assert_eq!((moved.fresh, moved.stale), (20, 0), "{moved:?}");
    assert_eq!(moved.servers.get(&primary), Some(&20), "{moved:?}");
    let m = metrics(admin);
    assert!(
        m.contains("switchyard_sessions_moved_total{cluster=\"main\",outcome=\"moved_for_freshness\"} 1"),
        "{m}"
    );
}

/// Switchyard in front of `cluster` with `extra` in `[clusters.main]` and an admin port
/// (for `/metrics`); ready when rw reaches the primary and ro the replica.
fn start(cluster: &MariaCluster, extra: &str) -> (Proxy, u16) {
    let (rw, ro, admin) = (free_port(), free_port(), free_port());
    let text = format!(
        "[admin]\nhttp_listen = \"127.0.0.1:{admin}\"\n\n{}",
        my_config(cluster, rw, ro, extra)
    );
    let proxy = my_spawn(cluster, "proxy", &text, rw, ro);
    wait_for("MySQL proxy ready", Duration::from_secs(30), || {
        let w = mariadb(proxy.rw, "SELECT @@read_only").ok()? == "0";
        let r = mariadb(proxy.ro, "SELECT @@read_only").ok()? == "1";
        (w && r).then_some(())
    });
    (proxy, admin)
}

fn metrics(admin: u16) -> String {
    http_get(admin, "/metrics").1
}

/// A causal token from one connection makes another connection's reads fresh: SET on
/// an open ro connection (20 of 20, served by the replica once it has the row), and
/// the connection attribute at login. Bad tokens get an error and the connection goes
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_causal_token_carries_a_write_to_another_connection() {
    let cluster = delayed_cluster();
    let replica = server_id(&cluster, 1);
    let (proxy, _) = start(&cluster, "causal_wait_ms = 4000");
    let tokened = check(&proxy, "token", 20);
    assert_eq!((tokened.fresh, tokened.stale), (20, 0), "{tokened:?}");
    assert_eq!(tokened.servers.get(&replica), Some(&20), "{tokened:?}");
    for t in &tokened.tokens {
        let t = t.as_deref().unwrap_or_default();
        assert!(t.starts_with("sy1.m") && t.len() < 100, "{t}");
    }

    let bad = check(&proxy, "bad-tokens", 0);
    let errors: Vec<_> = bad
        .errors
        .iter()
        .map(|(_, code, msg)| (code.unwrap_or(0), msg.as_str()))
        .collect();
    assert_eq!(errors[0].0, 1231, "{errors:?}");
    assert!(errors[0].1.contains("not a token"), "{errors:?}");
    assert!(errors[1].1.contains("another cluster"), "{errors:?}");
    assert!(errors[2].1.contains("PostgreSQL"), "{errors:?}");
    assert_eq!(errors[3].0, 1064, "{errors:?}");
    assert!(errors[3].1.contains("each sent alone"), "{errors:?}");
    assert_eq!(bad.tokens, vec![Some(String::new())]);

    // A client without session tracking (mysql_async): the token of its write comes from
    // the primary's position; given as a connection attribute, it places a new
    // connection's reads.
    let opts = |port: u16| {
        mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(port)
            .user(Some(MY_APP_USER))
            .pass(Some(MY_APP_PASSWORD))
            .db_name(Some(MY_APP_DB))
            // Else mysql_async asks for @@socket and goes around the proxy.
            .prefer_socket(false)
    };
    let mut rw = mysql_async::Conn::new(opts(proxy.rw)).await.unwrap();
    rw.query_drop("INSERT INTO fresh (id) VALUES (7)").await.unwrap();
    let token: String = rw
        .query_first("SELECT @switchyard_causal_token")
        .await
        .unwrap()
        .unwrap();
    assert!(token.starts_with("sy1.m"), "{token}");
    let mut ro = mysql_async::Conn::new(opts(proxy.ro).connect_attribute("switchyard.causal_token", token.clone()))
        .await
        .unwrap();
    let n: u32 = ro
        .query_first("SELECT COUNT(*) FROM fresh WHERE id = 7")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 1, "a token given at login is applied to the first read");
    let server: String = ro.query_first("SELECT @@server_id").await.unwrap().unwrap();
    assert_eq!(server, replica);
    // A bad token at login: refused with the reason.
    let refused = mysql_async::Conn::new(opts(proxy.ro).connect_attribute("switchyard.causal_token", "sy1.m1.0-1-1"))
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("another cluster"), "{refused}");
}

/// `read_write_split = true`: one rw endpoint; a read after the session's own write sees
/// it (20 of 20: on the primary, or on the replica once it has waited there), a session
/// that only reads is answered by the replica, and the session's settings hold on the
/// replica connection too.
#[test]
fn a_split_endpoint_reads_its_own_writes_and_sends_other_reads_to_the_replica() {
    let cluster = delayed_cluster();
    let (primary, replica) = (server_id(&cluster, 0), server_id(&cluster, 1));
    let (proxy, admin) = start(&cluster, "read_write_split = true");
    let split = check(&proxy, "split", 20);
    assert_eq!((split.fresh, split.stale), (20, 0), "{split:?}");
    assert_eq!(
        split.servers.get(&primary),
        Some(&20),
        "no wait: the primary answers {split:?}"
    );
    assert_eq!(split.reader, vec![replica.clone(); 3], "{split:?}");
    assert_eq!(
        split.state,
        vec!["+03:00".to_string(), "information_schema".into(), replica.clone()],
        "{split:?}"
    );
    let m = metrics(admin);
    assert!(m.contains("switchyard_reads_to_standby_total{cluster=\"main\"}"), "{m}");
    drop(proxy);

    let (proxy, _) = start(&cluster, "read_write_split = true\ncausal_wait_ms = 4000");
    let waited = check(&proxy, "split", 3);
    assert_eq!((waited.fresh, waited.stale), (3, 0), "{waited:?}");
    assert_eq!(
        waited.servers.get(&replica),
        Some(&3),
        "waited on the replica: {waited:?}"
    );
}

/// The first seed article's two aliases with django_switchyard: `default` on rw, `replica`
/// on ro, the package's middleware and router, mysqlclient (no startup option, so the
/// token goes on with `SET @switchyard_causal_token`). A POST's redirected GET reads
/// through `replica` and finds the new row, 20 of 20 (new connections) and on a kept
/// connection; a view that creates and reads back in one request finds it too, 20 of 20.
/// Without the middleware both miss at least once (the replica applies 2 s late).
#[test]
fn django_two_aliases_read_their_own_writes_through_the_replica() {
    let cluster = delayed_cluster();
    let (proxy, _) = start(&cluster, "");
    let env = django_env(&proxy);
    let out = python("django_mysql_check.py", &["migrate"], &env);
    assert!(out.contains("ok: migrate"), "{out}");
    // The replica applies late: the GETs must not fail for want of the tables.
    cluster.wait_replicated(0, Duration::from_secs(20)).unwrap();

    let out = python("django_mysql_causal_check.py", &["with-middleware"], &env);
    print!("{out}");
    for line in [
        "ok: with-middleware new connection: 20 of 20 reads answered 200",
        "ok: with-middleware kept connection: 5 of 5 reads answered 200",
        "ok: with-middleware in-request: 20 of 20 reads answered 200",
        "ok: with-middleware cleaned up 45 customers",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }

    let out = python("django_mysql_causal_check.py", &["without-middleware"], &env);
    print!("{out}");
    for phase in ["new connection", "in-request"] {
        let line = format!("ok: without-middleware {phase}: ");
        assert!(out.contains(&line), "{line:?} missing:\n{out}");
    }
    assert!(out.contains("ok: without-middleware cleaned up 10 customers"), "{out}");
}

/// Transaction pooling with `read_write_split`: reads take read-only connections from
/// the replica's pool, the rest the primary's; a read after the session's own write
/// still sees it.
#[test]
fn a_split_endpoint_in_transaction_pooling() {
    let cluster = delayed_cluster();
    let (primary, replica) = (server_id(&cluster, 0), server_id(&cluster, 1));
    let (proxy, _) = start(
        &cluster,
        "read_write_split = true\npool_mode = \"transaction\"\npool_size = 4",
    );
    let split = check(&proxy, "split", 20);
    assert_eq!((split.fresh, split.stale), (20, 0), "{split:?}");
    assert_eq!(split.servers.get(&primary), Some(&20), "{split:?}");
    assert_eq!(split.reader, vec![replica.clone(); 3], "{split:?}");
    assert_eq!(
        split.state,
        vec!["+03:00".to_string(), "information_schema".into(), replica],
        "{split:?}"
    );
}
