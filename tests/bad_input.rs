//! Bad input gets an ErrorResponse with the right SQLSTATE, closes that client alone,
//! and never disturbs anyone else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Extra users: `raw` (trust at the proxy, so a hand-made client can get past login)
/// and `legacy` (md5).
const USERS: &str = "[[users]]\nname = \"raw\"\npassword = \"raw\"\nauth = \"trust\"\n\n[[users]]\nname = \"legacy\"\npassword = \"legacy\"\nauth = \"md5\"\n\n[proxy]\nclient_login_timeout_ms = 1000\nmax_message_bytes = 1048576\n";

fn setup() -> (LocalCluster, Proxy) {
    let cluster = LocalCluster::start(0).unwrap();
    for role in ["raw", "legacy"] {
        cluster
            .sql(0, &format!("CREATE ROLE {role} LOGIN PASSWORD '{role}'"))
            .unwrap();
    }
    let proxy = Proxy::start(&cluster, "proxy", "", USERS);
    (cluster, proxy)
}

fn raw(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", APP_DB)] {
        body.extend(k.as_bytes());
        body.push(0);
        body.extend(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// Read messages until ReadyForQuery, an ErrorResponse, or EOF. Returns (tag, body) pairs.
fn read_messages(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).is_err() {
            return out;
        }
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).unwrap();
        let tag = head[0];
        out.push((tag, body));
        if tag == b'Z' || tag == b'E' {
            return out;
        }
    }
}

/// The SQLSTATE and message of the ErrorResponse the proxy sent, then EOF.
fn expect_error(s: &mut TcpStream) -> (String, String) {
    let msgs = read_messages(s);
    let (tag, body) = msgs.last().expect("an ErrorResponse, got nothing");
    assert_eq!(*tag, b'E', "expected ErrorResponse, got {msgs:?}");
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|&b| b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
            Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into(),
            _ => {}
        }
    }
    let mut rest = Vec::new();
    let closed = s.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)),
        "connection should close right after the error: {closed:?} {rest:?}"
    );
    (code, message)
}

fn logged_in(port: u16) -> TcpStream {
    let mut s = raw(port);
    s.write_all(&startup_packet("raw")).unwrap();
    let msgs = read_messages(&mut s);
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{msgs:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_gets_its_sqlstate_and_harms_no_one_else() {
    let (cluster, proxy) = setup();
    let bystander = connect(proxy.rw).await.unwrap();
    bystander
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (1)")
        .await
        .unwrap();

    // Not PostgreSQL at all.
    let mut s = raw(proxy.rw);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (code, msg) = expect_error(&mut s);
    assert_eq!(code, "08P01", "{msg}");
    assert!(msg.contains("invalid startup packet length"), "{msg}");

    // Unsupported protocol version.
    let mut s = raw(proxy.rw);
    s.write_all(&[0, 0, 0, 8, 0, 2, 0, 0]).unwrap();
    let (code, msg) = expect_error(&mut s);
    assert_eq!(code, "0A000", "{msg}");

    // A startup packet without its terminator.
    let mut s = raw(proxy.rw);
    s.write_all(b"\0\0\0\x0f\0\x03\0\0user\0raw").unwrap();
    assert_eq!(expect_error(&mut s).0, "08P01");

    // Truncated startup packet, then silence: the login timeout ends it.
    let mut s = raw(proxy.rw);
    s.write_all(&[0, 0, 0, 100, 0, 3, 0]).unwrap();
    let (code, msg) = expect_error(&mut s);
    assert_eq!(code, "08P01");
    assert!(msg.contains("client_login_timeout_ms"), "{msg}");

    // Truncated and gone.
    let mut s = raw(proxy.rw);
    s.write_all(&[0, 0, 0, 100, 0, 3]).unwrap();
    drop(s);

    // Unknown user, wrong password (SCRAM and md5), through a real client.
    let err = psql_as(proxy.rw, "nobody", "x", "SELECT 1").unwrap_err();
    assert!(err.contains("user \"nobody\" is not allowed to connect"), "{err}");
    let err = psql_as(proxy.rw, APP_USER, "wrong", "SELECT 1").unwrap_err();
    assert!(err.contains("password authentication failed for user \"app\""), "{err}");
    let err = psql_as(proxy.rw, "legacy", "wrong", "SELECT 1").unwrap_err();
    assert!(
        err.contains("password authentication failed for user \"legacy\""),
        "{err}"
    );
    assert_eq!(
        psql_as(proxy.rw, "legacy", "legacy", "SELECT current_user").unwrap(),
        "legacy"
    );
    // The SQLSTATEs themselves, seen by a driver.
    let e = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=app password=wrong dbname=app", proxy.rw),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"));
    let e = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=nobody password=x dbname=app", proxy.rw),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code().map(|c| c.code()), Some("28000"));

    // After login: a message claiming to be 2 GiB.
    let mut s = logged_in(proxy.rw);
    s.write_all(b"Q\x7f\xff\xff\xff").unwrap();
    let (code, msg) = expect_error(&mut s);
    assert_eq!(code, "08P01");
    assert!(msg.contains("over the limit of 1048576 bytes"), "{msg}");

    // After login: an impossible length, and a message type that does not exist.
    let mut s = logged_in(proxy.rw);
    s.write_all(b"Q\0\0\0\x02").unwrap();
    assert_eq!(expect_error(&mut s).0, "08P01");
    let mut s = logged_in(proxy.rw);
    s.write_all(b"z\0\0\0\x04").unwrap();
    let (code, msg) = expect_error(&mut s);
    assert_eq!(code, "08P01");
    assert!(msg.contains("invalid frontend message type 'z'"), "{msg}");

    // A bad SCRAM exchange.
    let mut s = raw(proxy.rw);
    s.write_all(&startup_packet(APP_USER)).unwrap();
    assert_eq!(read_auth_request(&mut s), b'R');
    s.write_all(b"p\0\0\0\x0cPLAIN\0\0\0\0\0").unwrap();
    assert_eq!(expect_error(&mut s).0, "08P01");

    // A well-behaved client in the middle of all this saw nothing.
    let v: i32 = bystander.query_one("SELECT v FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    assert_eq!(psql(proxy.rw, "SELECT 1").unwrap(), "1");
    drop(cluster);
}

/// Read the first authentication request (the proxy waits for our answer after it); its tag.
fn read_auth_request(s: &mut TcpStream) -> u8 {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).unwrap();
    head[0]
}

#[test]
fn ssl_and_gssenc_requests_are_declined_and_the_session_continues() {
    let (_cluster, proxy) = setup();
    for code in [80877104i32, 80877103] {
        let mut s = raw(proxy.rw);
        let mut req = 8i32.to_be_bytes().to_vec();
        req.extend(code.to_be_bytes());
        s.write_all(&req).unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"N");
        s.write_all(&startup_packet("raw")).unwrap();
        let msgs = read_messages(&mut s);
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'));
        // BackendKeyData is present (the proxy's own, for cancel routing).
        assert!(msgs.iter().any(|m| m.0 == b'K'));
    }
}

#[test]
fn no_server_available_is_an_error_within_the_connect_timeout() {
    let cluster = LocalCluster::start(0).unwrap();
    let proxy = Proxy::start(&cluster, "proxy", "connect_timeout_ms = 700", "");
    cluster.stop_node(0, "immediate").unwrap();
    for port in [proxy.rw, proxy.ro] {
        let asked = std::time::Instant::now();
        let err = psql(port, "SELECT 1").unwrap_err();
        let took = asked.elapsed();
        assert!(err.contains("cluster \"main\"") && err.contains("default"), "{err}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
    }
    // Once marked down, the message says so and why.
    std::thread::sleep(Duration::from_millis(1500));
    let err = psql(proxy.ro, "SELECT 1").unwrap_err();
    assert!(
        err.contains("no server available for reads in cluster \"main\"")
            && err.contains("default down (connection refused"),
        "{err}"
    );
}

/// A Query sent in the same write as the startup packet, before the login is answered
/// (PostgreSQL runs it; no common client does this), is not lost: the login reads ahead,
/// and what it read past the startup packet is the session's first input, in session
/// and in transaction pooling.
#[test]
fn a_query_sent_with_the_startup_packet_is_run_in_both_pool_modes() {
    let cluster = LocalCluster::start(0).unwrap();
    cluster.sql(0, "CREATE ROLE raw LOGIN PASSWORD 'raw'").unwrap();
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(
            &cluster,
            &format!("proxy-{mode}"),
            &format!("pool_mode = \"{mode}\""),
            USERS,
        );
        let mut s = raw(proxy.rw);
        let mut both = startup_packet("raw");
        let sql = b"SELECT 40 + 2\0";
        both.push(b'Q');
        both.extend(((sql.len() + 4) as i32).to_be_bytes());
        both.extend(sql);
        s.write_all(&both).unwrap();
        let greeting = read_messages(&mut s);
        assert_eq!(greeting.last().map(|m| m.0), Some(b'Z'), "{mode}: {greeting:?}");
        let answer = read_messages(&mut s);
        let row = answer
            .iter()
            .find(|m| m.0 == b'D')
            .unwrap_or_else(|| panic!("{mode}: no DataRow in {answer:?}"));
        assert!(row.1.ends_with(b"42"), "{mode}: {answer:?}");
        assert_eq!(answer.last().map(|m| m.0), Some(b'Z'), "{mode}: {answer:?}");
    }
}
