//! MySQL / MariaDB clusters (`engine = "mysql"`) against real MariaDB servers: a
//! primary and two GTID replicas (`MariaCluster`), the `mariadb` CLI as client. The
//! scenarios of the PostgreSQL failover tests: replica killed, frozen, replication
//! stopped; primary killed and a replica promoted by an operator; the old primary back
//! writable (split brain); plus login errors and KILL QUERY through the proxy.

mod common;

use std::time::{Duration, Instant};

use common::mysql::*;
use common::*;

#[test]
fn writes_go_to_the_primary_reads_to_a_replica_and_errors_are_mysql_errors() {
    let cluster = MariaCluster::start(2).unwrap();
    let proxy = my_proxy(&cluster, "");
    for _ in 0..3 {
        assert_eq!(my_lands_on(&cluster, proxy.rw), Ok(0));
        assert_eq!(
            my_lands_on(&cluster, proxy.ro),
            Ok(1),
            "read_balance = priority: the first replica"
        );
    }
    mariadb(
        proxy.rw,
        "CREATE TABLE t (v INT PRIMARY KEY); INSERT INTO t VALUES (42)",
    )
    .unwrap();
    let v = wait_for("replicated row", Duration::from_secs(10), || {
        mariadb(proxy.ro, "SELECT v FROM t").ok().filter(|v| v == "42")
    });
    assert_eq!(v, "42");
    // A write through ro is refused by the replica itself (read_only).
    let err = mariadb(proxy.ro, "INSERT INTO t VALUES (1)").unwrap_err();
    assert!(err.contains("1290"), "{err}");
    // Wrong password, unknown user: 1045 from the proxy itself.
    let err = mariadb_as(proxy.rw, MY_APP_USER, "wrong", None, "SELECT 1").unwrap_err();
    assert!(err.contains("1045") && err.contains("28000"), "{err}");
    let err = mariadb_as(proxy.rw, "nobody", "x", None, "SELECT 1").unwrap_err();
    assert!(err.contains("1045"), "{err}");
    // A database the user may not use: the server's own error (1044/1049) passes through.
    let err = mariadb_as(proxy.rw, MY_APP_USER, MY_APP_PASSWORD, Some("nosuchdb"), "SELECT 1").unwrap_err();
    assert!(
        (err.contains("1049") || err.contains("1044")) && err.contains("nosuchdb"),
        "{err}"
    );
    // Garbage instead of a handshake response: an error for that client alone.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.rw)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 4];
    s.read_exact(&mut greeting).unwrap();
    let len = u32::from_le_bytes([greeting[0], greeting[1], greeting[2], 0]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    assert_eq!(body[0], 10, "protocol version 10");
    s.write_all(b"\x05\x00\x00\x01hello").unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(reply.get(4), Some(&0xff), "an ERR packet: {reply:?}");
    assert_eq!(mariadb(proxy.rw, "SELECT v FROM t").unwrap(), "42", "others unaffected");

    // A cluster's client limit: the client over it gets 1040 at once, before its
    // password is checked, and the clients admitted go on.
    let (rw, ro) = (free_port(), free_port());
    let capped = my_spawn(
        &cluster,
        "capped",
        &my_config(&cluster, rw, ro, "max_clients = 2"),
        rw,
        ro,
    );
    wait_for("capped proxy ready", Duration::from_secs(30), || {
        mariadb(capped.rw, "SELECT 1").ok()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use mysql_async::prelude::Queryable;
        let opts = |port: u16| -> mysql_async::Opts {
            mysql_async::OptsBuilder::default()
                .ip_or_hostname("127.0.0.1")
                .tcp_port(port)
                .user(Some(MY_APP_USER))
                .pass(Some(MY_APP_PASSWORD))
                .prefer_socket(false)
                .into()
        };
        let mut a = mysql_async::Conn::new(opts(capped.rw)).await.unwrap();
        let mut b = mysql_async::Conn::new(opts(capped.ro)).await.unwrap();
        let t = Instant::now();
        let err = mariadb_as(capped.rw, "nobody", "wrong", None, "SELECT 1").unwrap_err();
        assert!(
            err.contains("1040") && err.contains("clusters.main.max_clients"),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(3), "refused after {:?}", t.elapsed());
        for c in [&mut a, &mut b] {
            let one: Option<i64> = c.query_first("SELECT 1").await.unwrap();
            assert_eq!(one, Some(1));
        }
        a.disconnect().await.unwrap();
        b.disconnect().await.unwrap();
    });
    wait_for("a freed place", Duration::from_secs(10), || {
        mariadb(capped.rw, "SELECT 1").ok()
    });
}

#[test]
fn killed_replica_moves_reads_to_the_other_then_to_the_primary() {
    let mut cluster = MariaCluster::start(2).unwrap();
    let proxy = my_proxy(&cluster, "");
    assert_eq!(my_lands_on(&cluster, proxy.ro), Ok(1));
    let killed = Instant::now();
    cluster.kill9(1).unwrap();
    wait_for("reads on failover2", Duration::from_secs(10), || {
        (my_lands_on(&cluster, proxy.ro) == Ok(2)).then_some(())
    });
    report(&format!(
        "MariaDB replica kill -9 -> reads on the other replica: {:?}",
        killed.elapsed()
    ));
    cluster.kill9(2).unwrap();
    wait_for("reads on the primary", Duration::from_secs(10), || {
        (my_lands_on(&cluster, proxy.ro) == Ok(0)).then_some(())
    });
    // ro sessions are read-only even on the writable primary.
    let err = mariadb(proxy.ro, "CREATE TABLE x (v INT); INSERT INTO x VALUES (1)").unwrap_err();
    assert!(err.contains("1792"), "{err}");
}

#[test]
fn stopped_replication_or_a_frozen_replica_gets_no_reads() {
    let cluster = MariaCluster::start(2).unwrap();
    let proxy = my_proxy(&cluster, "");
    assert_eq!(my_lands_on(&cluster, proxy.ro), Ok(1));
    cluster.sql(1, "STOP SLAVE").unwrap();
    wait_for("reads leave the stopped replica", Duration::from_secs(10), || {
        (my_lands_on(&cluster, proxy.ro) == Ok(2)).then_some(())
    });
    cluster.sql(1, "START SLAVE").unwrap();
    wait_for("reads back on failover1", Duration::from_secs(10), || {
        (my_lands_on(&cluster, proxy.ro) == Ok(1)).then_some(())
    });
    // SIGSTOP: down by timeout; new reads are not stalled behind it.
    cluster.signal(1, libc::SIGSTOP).unwrap();
    let frozen = Instant::now();
    wait_for("reads leave the frozen replica", Duration::from_secs(15), || {
        (my_lands_on(&cluster, proxy.ro) == Ok(2)).then_some(())
    });
    report(&format!(
        "MariaDB replica SIGSTOP -> reads elsewhere: {:?}",
        frozen.elapsed()
    ));
    cluster.signal(1, libc::SIGCONT).unwrap();
}

#[test]
fn promoted_replica_takes_writes_and_the_old_primary_back_writable_gets_none() {
    let mut cluster = MariaCluster::start(2).unwrap();
    let proxy = my_proxy(&cluster, "");
    mariadb(proxy.rw, "CREATE TABLE t (v INT PRIMARY KEY); INSERT INTO t VALUES (1)").unwrap();
    cluster.wait_replicated(0, Duration::from_secs(10)).unwrap();
    // A session held on the primary learns why it ended with its next command.
    let held = Held::start(proxy.rw);
    cluster.kill9(0).unwrap();
    let said = held.query_after(Duration::from_millis(300));
    assert!(
        said.starts_with("ERROR 1158") && said.contains("node \"default\"") && said.contains("lost"),
        "{said}"
    );
    let err = wait_for("rw refused while there is no primary", Duration::from_secs(10), || {
        mariadb(proxy.rw, "INSERT INTO t VALUES (2)").err()
    });
    assert!(err.contains("primary") || err.contains("1158"), "{err}");
    // The operator promotes failover1 and repoints failover2.
    cluster.promote(1).unwrap();
    cluster.follow(2, 1).unwrap();
    wait_for("writes on failover1", Duration::from_secs(15), || {
        (my_lands_on(&cluster, proxy.rw) == Ok(1)).then_some(())
    });
    mariadb(proxy.rw, "INSERT INTO t VALUES (3)").unwrap();
    cluster.wait_replicated(1, Duration::from_secs(10)).unwrap();
    assert_eq!(cluster.sql(2, "SELECT COUNT(*) FROM app.t WHERE v = 3").unwrap(), "1");
    // The old primary comes back writable, replicating from nobody: two primaries.
    // MySQL has no timeline to tell the stale one, so writes are refused, not guessed.
    cluster.start_node(0).unwrap();
    let err = wait_for("split brain refused", Duration::from_secs(15), || {
        mariadb(proxy.rw, "INSERT INTO t VALUES (4)")
            .err()
            .filter(|e| e.contains("split brain") || e.contains("primaries"))
    });
    assert!(err.contains("default") && err.contains("failover1"), "{err}");
    assert_eq!(
        cluster.sql(0, "SELECT COUNT(*) FROM app.t WHERE v = 4").unwrap(),
        "0",
        "no write on the old primary"
    );
    // The operator makes the old primary a replica of the new one: writes resume.
    cluster.follow(0, 1).unwrap();
    wait_for("writes resume on failover1", Duration::from_secs(15), || {
        mariadb(proxy.rw, "INSERT INTO t VALUES (5)").ok()
    });
    assert_eq!(my_lands_on(&cluster, proxy.rw), Ok(1));
}

#[test]
fn kill_query_through_the_proxy_reaches_the_right_server_connection() {
    let cluster = MariaCluster::start(1).unwrap();
    let proxy = my_proxy(&cluster, "");
    // PyMySQL: one connection sleeps, another kills its query by the id the first one
    // was given in the proxy's greeting (thread_id()), as `mysql`'s Ctrl-C does.
    let out = python("mysql_kill.py", &[&proxy.rw.to_string()], &[]);
    assert!(out.contains("KILLED-OK"), "{out}");
}

#[test]
fn change_user_logs_the_server_connection_in_as_the_new_user() {
    let cluster = MariaCluster::start(0).unwrap();
    cluster
        .sql(
            0,
            "CREATE USER 'app2'@'%' IDENTIFIED BY 'app2'; GRANT ALL ON app.* TO 'app2'@'%'; CREATE TABLE app.t (v INT)",
        )
        .unwrap();
    let (rw, ro) = (free_port(), free_port());
    let text = my_config(&cluster, rw, ro, "") + "\n[[users]]\nname = \"app2\"\npassword = \"app2\"\n";
    let proxy = my_spawn(&cluster, "proxy", &text, rw, ro);
    // No replica: ro falls back to the (writable) primary.
    wait_for("proxy ready", Duration::from_secs(20), || {
        (mariadb(proxy.rw, "SELECT 1").ok()? == "1" && mariadb(proxy.ro, "SELECT 1").ok()? == "1").then_some(())
    });
    let out = python(
        "mysql_change_user.py",
        &[&proxy.rw.to_string(), &proxy.ro.to_string()],
        &[],
    );
    assert!(out.contains("CHANGE-USER-OK"), "{out}");
}

/// `tests/python/mysql_held.py`: a PyMySQL session connected now, queried later.
struct Held(std::process::Child, std::io::BufReader<std::process::ChildStdout>);

impl Held {
    fn start(port: u16) -> Held {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/mysql_held.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "CONNECTED");
        Held(child, out)
    }

    /// Wait `after`, run the query, return the script's last line.
    fn query_after(mut self, after: Duration) -> String {
        use std::io::{BufRead, Write};
        std::thread::sleep(after);
        self.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        self.1.read_line(&mut line).unwrap();
        let _ = self.0.wait();
        line.trim().to_string()
    }
}

#[test]
fn status_and_metrics_show_mysql_nodes_with_lag_in_transactions() {
    let cluster = MariaCluster::start(2).unwrap();
    let (rw, ro, http) = (free_port(), free_port(), free_port());
    let text = my_config(&cluster, rw, ro, "") + &format!("\n[admin]\nhttp_listen = \"127.0.0.1:{http}\"\n");
    let proxy = my_spawn(&cluster, "proxy", &text, rw, ro);
    wait_for("proxy serving", Duration::from_secs(20), || {
        mariadb(proxy.rw, "SELECT 1").ok()
    });
    let status = || -> serde_json::Value { serde_json::from_str(&http_get(http, "/status").1).unwrap() };
    let node = |s: &serde_json::Value, name: &str| -> serde_json::Value {
        s["clusters"][0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
            .unwrap()
    };
    wait_for("all nodes up", Duration::from_secs(20), || {
        let s = status();
        (node(&s, "default")["role"] == "primary" && node(&s, "failover2")["role"] == "standby").then_some(())
    });
    let s = status();
    assert_eq!(s["clusters"][0]["engine"], "mysql");
    assert_eq!(s["clusters"][0]["primary"], "default");
    // Lag in transactions from GTID positions: 0 once caught up.
    mariadb(proxy.rw, "CREATE TABLE t (v INT); INSERT INTO t VALUES (1)").unwrap();
    cluster.wait_replicated(0, Duration::from_secs(10)).unwrap();
    wait_for("lag 0 transactions", Duration::from_secs(10), || {
        (node(&status(), "failover1")["lag_bytes"] == 0).then_some(())
    });
    // Replication stopped: no lag figure, and the reason routing skips it.
    cluster.sql(1, "STOP SLAVE").unwrap();
    let n = wait_for("failover1 detached", Duration::from_secs(10), || {
        let n = node(&status(), "failover1");
        n["detached"].is_string().then_some(n)
    });
    assert!(n["lag_ms"].is_null(), "{n}");
    let (code, metrics) = http_get(http, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("switchyard_node_up{cluster=\"main\",node=\"failover1\"} 1"),
        "{metrics}"
    );
    let _ = proxy;
}

#[test]
fn tls_on_mysql_listeners_with_client_tls_require() {
    let cluster = MariaCluster::start(1).unwrap();
    let (ca, cert, key) = common::certs::make_certs(cluster.dir(), "");
    let (rw, ro) = (free_port(), free_port());
    let text = my_config(&cluster, rw, ro, "client_tls = \"require\"")
        + &format!(
            "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        );
    let proxy = my_spawn(&cluster, "proxy", &text, rw, ro);
    let ssl = |port: u16, sql: &str| -> Result<String, String> {
        let out = std::process::Command::new("mariadb")
            .args([
                "--no-defaults",
                "-h",
                "localhost",
                "--protocol=tcp",
                "-P",
                &port.to_string(),
            ])
            .args(["-u", MY_APP_USER, &format!("-p{MY_APP_PASSWORD}"), "-N", "-B"])
            .arg(format!("--ssl-ca={}", ca.display()))
            .args(["--ssl-verify-server-cert", "-e", sql, MY_APP_DB])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    };
    let v = wait_for("TLS session through rw", Duration::from_secs(20), || {
        ssl(proxy.rw, "SELECT @@read_only").ok()
    });
    assert_eq!(v, "0");
    // The client's own view of its connection: a cipher is in use.
    let status = ssl(proxy.ro, "status").unwrap();
    assert!(status.contains("Cipher in use"), "{status}");
    // Plaintext is refused before authentication, with a reason.
    let err = mariadb(proxy.rw, "SELECT 1").unwrap_err();
    assert!(err.contains("requires TLS"), "{err}");
}

#[test]
fn tls_toward_mysql_servers_verify_full() {
    let mut cluster = MariaCluster::start(0).unwrap();
    let (ca, cert, key) = common::certs::make_certs(cluster.dir(), "");
    let (other_ca, _, _) = common::certs::make_certs(cluster.dir(), "other-");
    // The server refuses plaintext TCP altogether: whatever works below used TLS.
    cluster.extra_args = vec![
        format!("--ssl-ca={}", ca.display()),
        format!("--ssl-cert={}", cert.display()),
        format!("--ssl-key={}", key.display()),
        "--require-secure-transport=ON".into(),
    ];
    cluster.stop_node(0).unwrap();
    cluster.start_node(0).unwrap();
    let tls = |ca: &std::path::Path| format!("server_tls = \"verify-full\"\nserver_ca_file = \"{}\"", ca.display());
    let (rw, ro) = (free_port(), free_port());
    let proxy = my_spawn(&cluster, "proxy", &my_config(&cluster, rw, ro, &tls(&ca)), rw, ro);
    let cipher = wait_for("a session over TLS", Duration::from_secs(20), || {
        mariadb(proxy.rw, "SHOW SESSION STATUS LIKE 'Ssl_cipher'").ok()
    });
    assert!(
        cipher.starts_with("Ssl_cipher") && cipher.len() > "Ssl_cipher".len() + 2,
        "{cipher}"
    );
    assert_eq!(mariadb(proxy.ro, "SELECT 1").unwrap(), "1");
    // A certificate from another CA: the node is down for this proxy, with the reason.
    let (rw2, ro2) = (free_port(), free_port());
    let bad = my_spawn(
        &cluster,
        "bad",
        &my_config(&cluster, rw2, ro2, &tls(&other_ca)),
        rw2,
        ro2,
    );
    let err = wait_for("refused", Duration::from_secs(20), || {
        mariadb(bad.rw, "SELECT 1")
            .err()
            .filter(|e| !e.contains("Can't connect"))
    });
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[test]
fn load_data_local_infile_packets_are_never_taken_for_commands() {
    let cluster = MariaCluster::start(0).unwrap();
    let (rw, ro) = (free_port(), free_port());
    let proxy = my_spawn(&cluster, "proxy", &my_config(&cluster, rw, ro, ""), rw, ro);
    wait_for("proxy ready", Duration::from_secs(20), || {
        mariadb(proxy.rw, "SELECT 1").ok()
    });
    let dir = cluster.dir().to_str().unwrap().to_string();
    let out = python("mysql_infile.py", &[&proxy.rw.to_string(), &dir], &[]);
    assert!(out.contains("INFILE-OK"), "{out}");
}

/// MySQL 8's libmysqlclient starts with caching_sha2_password and no data, expecting
/// an auth switch; the proxy asks again with its challenge, then takes the fast path.
#[test]
fn a_client_starting_caching_sha2_without_data_is_switched_and_logs_in() {
    use mysql_common::constants::CapabilityFlags;
    use mysql_common::io::ParseBuf;
    use mysql_common::packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse};
    use mysql_common::proto::{MyDeserialize, MySerialize};
    use std::io::{Read, Write};
    let cluster = MariaCluster::start(0).unwrap();
    let (rw, ro) = (free_port(), free_port());
    let proxy = my_spawn(&cluster, "proxy", &my_config(&cluster, rw, ro, ""), rw, ro);
    wait_for("proxy ready", Duration::from_secs(20), || {
        mariadb(proxy.rw, "SELECT 1").ok()
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.rw)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = |s: &mut std::net::TcpStream| -> (u8, Vec<u8>) {
        let mut h = [0u8; 4];
        s.read_exact(&mut h).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
        s.read_exact(&mut body).unwrap();
        (h[3], body)
    };
    let (_, greeting) = read(&mut s);
    let hs = HandshakePacket::deserialize((), &mut ParseBuf(&greeting)).unwrap();
    let caps = CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_PLUGIN_AUTH
        | CapabilityFlags::CLIENT_LONG_PASSWORD
        | CapabilityFlags::CLIENT_TRANSACTIONS;
    let response = HandshakeResponse::new(
        Some(&b""[..]),
        (8, 0, 40),
        Some(&b"app"[..]),
        None::<&[u8]>,
        Some(AuthPlugin::CachingSha2Password),
        caps & hs.capabilities(),
        None,
        1 << 24,
    );
    let mut payload = Vec::new();
    response.serialize(&mut payload);
    let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    packet.push(1);
    packet.extend_from_slice(&payload);
    s.write_all(&packet).unwrap();
    let (seq, switch) = read(&mut s);
    assert_eq!((seq, switch[0]), (2, 0xfe), "an auth switch: {switch:?}");
    let switch = AuthSwitchRequest::deserialize((), &mut ParseBuf(&switch)).unwrap();
    assert_eq!(switch.auth_plugin(), AuthPlugin::CachingSha2Password);
    let scramble = mysql_common::scramble::scramble_sha256(switch.plugin_data(), MY_APP_PASSWORD.as_bytes()).unwrap();
    let mut packet = vec![32, 0, 0, 3];
    packet.extend_from_slice(&scramble);
    s.write_all(&packet).unwrap();
    assert_eq!(read(&mut s), (4, vec![0x01, 0x03]), "fast authentication");
    let (seq, ok) = read(&mut s);
    assert_eq!((seq, ok[0]), (5, 0x00), "logged in: {ok:?}");
}

/// A health check whose answer never arrives (a one-way black hole between Switchyard
/// and the node: requests pass, answers do not) must not leave its connection open on
/// the server, which would otherwise hold the thread until `wait_timeout` (8 hours),
/// one more per failed check. (Suspected from reading `mysql_async`'s drop path, which
/// cleans up in a background task; measured here: the connection is closed within about
/// a second of the timeout.)
#[test]
fn a_health_check_lost_in_a_black_hole_leaves_no_connection_on_the_server() {
    let cluster = MariaCluster::start(0).unwrap();
    let node_port = cluster.nodes[0].port;
    let hole = common::etcd::Forwarder::start(node_port);
    let (rw, ro) = (free_port(), free_port());
    let text =
        my_config(&cluster, rw, ro, "").replace(&format!("port = {node_port}\n"), &format!("port = {}\n", hole.port));
    assert!(text.contains(&format!("port = {}\n", hole.port)), "{text}");
    let proxy = my_spawn(&cluster, "proxy", &text, rw, ro);
    wait_for("rw through the forwarder", Duration::from_secs(30), || {
        (mariadb(proxy.rw, "SELECT @@read_only").ok()? == "0").then_some(())
    });
    let monitors = || {
        cluster
            .sql(
                0,
                &format!("SELECT COUNT(*) FROM information_schema.processlist WHERE user = '{MY_MONITOR_USER}'"),
            )
            .unwrap()
    };
    assert_eq!(monitors(), "1", "the monitor's connection");
    hole.freeze();
    // Checks time out (500 ms) from now on; the one in flight is let go, its server
    // thread ends once our end of the connection is closed.
    let gone = Instant::now();
    wait_for(
        "the stuck monitor connection gone from the server",
        Duration::from_secs(15),
        || (monitors() == "0").then_some(()),
    );
    report(&format!(
        "stuck health connection closed on the server after {:?}",
        gone.elapsed()
    ));
    // And it stays so while the hole lasts (no connection per interval).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(monitors(), "0");
    drop(proxy);
}

/// Client timeouts on MySQL: a runaway query gets `KILL QUERY` (the server's 1317) and
/// the session goes on; an idle transaction and an idle client are ended (4031) with a
/// sentence naming the key; in session and in transaction pooling.
#[test]
fn client_timeouts_kill_a_runaway_query_and_end_idle_clients() {
    use mysql_async::prelude::Queryable;
    let cluster = MariaCluster::start(1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (mode, pool) in [("session", ""), ("transaction", "pool_mode = \"transaction\"\n")] {
        let (rw, ro) = (free_port(), free_port());
        let extra =
            format!("{pool}query_timeout_ms = 700\nidle_transaction_timeout_ms = 700\nclient_idle_timeout_ms = 1500\n");
        let proxy = my_spawn(
            &cluster,
            &format!("timeouts-{mode}"),
            &my_config(&cluster, rw, ro, &extra),
            rw,
            ro,
        );
        wait_for("proxy ready", Duration::from_secs(30), || {
            mariadb(proxy.rw, "SELECT 1").ok()
        });
        rt.block_on(async {
            let opts = || -> mysql_async::Opts {
                mysql_async::OptsBuilder::default()
                    .ip_or_hostname("127.0.0.1")
                    .tcp_port(proxy.rw)
                    .user(Some(MY_APP_USER))
                    .pass(Some(MY_APP_PASSWORD))
                    .db_name(Some(MY_APP_DB))
                    .prefer_socket(false)
                    .into()
            };
            // A runaway query: killed, and the session goes on.
            let mut c = mysql_async::Conn::new(opts()).await.unwrap();
            let t = Instant::now();
            let e = c
                .query_drop("SELECT SLEEP(5) FROM (SELECT 1 UNION SELECT 2) t")
                .await
                .unwrap_err();
            assert!(
                e.to_string().contains("1317") || e.to_string().contains("interrupted"),
                "{mode}: {e}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(4),
                "{mode}: killed after {:?}",
                t.elapsed()
            );
            for _ in 0..5 {
                let one: Option<i64> = c.query_first("SELECT 1").await.unwrap();
                assert_eq!(one, Some(1));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Idle inside a transaction: ended, and what it wrote is rolled back.
            let mut idle_tx = mysql_async::Conn::new(opts()).await.unwrap();
            idle_tx
                .query_drop("CREATE TABLE IF NOT EXISTS timeouts_t (v INT)")
                .await
                .unwrap();
            idle_tx.query_drop("BEGIN").await.unwrap();
            idle_tx.query_drop("INSERT INTO timeouts_t VALUES (1)").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1300)).await;
            let e = idle_tx.query_drop("COMMIT").await.unwrap_err().to_string();
            assert!(
                e.contains("idle_transaction_timeout_ms")
                    || e.contains("4031")
                    || e.to_lowercase().contains("connection"),
                "{mode}: {e}"
            );
            let n: Option<i64> = c.query_first("SELECT count(*) FROM timeouts_t").await.unwrap();
            assert_eq!(n, Some(0), "{mode}: the idle transaction's insert was rolled back");
            // Idle between transactions: ended after client_idle_timeout_ms.
            tokio::time::sleep(Duration::from_millis(2000)).await;
            let e = c.query_drop("SELECT 1").await.unwrap_err().to_string();
            assert!(
                e.contains("client_idle_timeout_ms") || e.contains("4031") || e.to_lowercase().contains("connection"),
                "{mode}: {e}"
            );
        });
        if mode == "session" {
            // A client that stops reading its answer: ended, its server query gone.
            let out = python("mysql_stuck_reader.py", &[&proxy.rw.to_string()], &[]);
            assert!(
                out.contains("server query gone: True") && out.contains("stuck client ended"),
                "{out}"
            );
        }
        let log = proxy.log_text();
        for what in [
            "action=\"KILL QUERY sent to the server\"",
            "timeout=\"idle_transaction\"",
            "timeout=\"client_idle\"",
        ] {
            assert!(log.contains(what), "{mode}: no {what} in the log:\n{log}");
        }
    }
}
