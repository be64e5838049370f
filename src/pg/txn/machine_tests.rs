//! The machine fed with the byte sequences real clients send (as pgbench, psycopg
//! and Django do) and servers answer, with no sockets.
use super::*;
use crate::pg::classify::CausalStatement;
use postgres_protocol::message::frontend as fe;

/// Frontend messages, encoded as clients encode them.
pub fn query(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    fe::query(sql, &mut b).unwrap();
    b
}

pub fn parse(name: &str, sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    fe::parse(name, sql, std::iter::empty(), &mut b).unwrap();
    b
}

pub fn bind(stmt: &str) -> BytesMut {
    let mut b = BytesMut::new();
    fe::bind(
        "",
        stmt,
        Some(0),
        Vec::<i32>::new(),
        |_: i32, _| Ok(postgres_protocol::IsNull::No),
        Some(0),
        &mut b,
    )
    .map_err(|_| ())
    .unwrap();
    b
}

pub fn describe_portal() -> BytesMut {
    let mut b = BytesMut::new();
    fe::describe(b'P', "", &mut b).unwrap();
    b
}

pub fn execute() -> BytesMut {
    let mut b = BytesMut::new();
    fe::execute("", 0, &mut b).unwrap();
    b
}

pub fn sync() -> BytesMut {
    let mut b = BytesMut::new();
    fe::sync(&mut b);
    b
}

pub fn cat(parts: &[BytesMut]) -> BytesMut {
    let mut b = BytesMut::new();
    for p in parts {
        b.extend_from_slice(p);
    }
    b
}

/// Backend messages, as a server sends them.
pub fn be(tag: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(&[tag]);
    b.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    b.extend_from_slice(body);
    b
}

pub fn ready(status: u8) -> BytesMut {
    be(b'Z', &[status])
}

pub fn error(severity: &str, code: &str, msg: &str) -> BytesMut {
    be(
        b'E',
        format!("S{severity}\0V{severity}\0C{code}\0M{msg}\0\0").as_bytes(),
    )
}

pub fn notice(code: &str, msg: &str) -> BytesMut {
    be(b'N', format!("SWARNING\0VWARNING\0C{code}\0M{msg}\0\0").as_bytes())
}

pub fn row_answer() -> BytesMut {
    cat(&[
        be(b'T', b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0"),
        be(b'D', b"\0\x01\0\0\0\x011"),
        be(b'C', b"SELECT 1\0"),
    ])
}

/// Message tags of a byte stream.
pub fn tags(mut b: &[u8]) -> String {
    let mut t = String::new();
    while let Some((tag, len)) = views::header(b) {
        t.push(tag as char);
        b = &b[len as usize + 1..];
    }
    t
}

pub struct Harness {
    pub m: Machine<'static>,
    pub conn: ConnState,
    pub held: Option<Arc<str>>,
    pub log: Vec<Action>,
    /// Session advisory locks the server says the connection holds (`CountLocks`).
    pub locks: u64,
}

pub fn classifier() -> &'static Classifier {
    static K: std::sync::OnceLock<Classifier> = std::sync::OnceLock::new();
    K.get_or_init(|| Classifier::new(&[]))
}

/// The machine's config in these tests (rw endpoint, `split` on or off).
fn harness_config(split: bool) -> Config {
    Config {
        cluster: "main".into(),
        read_only_endpoint: false,
        split,
        max_message: 1 << 20,
        client_pid: 777,
        client_key: 1,
        digests: true,
        traces: true,
    }
}

impl Harness {
    /// A greeted transaction-mode session (rw endpoint, `split` on or off).
    pub fn new(split: bool) -> Harness {
        let m = Machine::new(
            harness_config(split),
            vec![("application_name".into(), "pgbench".into())],
            classifier(),
            None,
        );
        let mut h = Harness {
            m,
            conn: ConnState {
                pid: 4242,
                ..ConnState::default()
            },
            held: None,
            log: Vec::new(),
            locks: 0,
        };
        // The greeting: a connection, the startup settings replayed, the server's
        // parameters passed on, the connection released.
        h.conn.report(views::ParameterStatus {
            name: b"client_encoding",
            value: b"UTF8",
        });
        h.perform(true);
        assert_eq!(tags(&h.m.to_server), "Q", "application_name replayed");
        h.m.to_server.clear();
        h.server(&cat(&[
            be(b'C', b"SELECT 1\0"),
            be(b'S', b"application_name\0pgbench\0"),
            ready(b'I'),
        ]));
        assert_eq!(tags(&h.m.to_client), "SSKZ");
        h.m.to_client.clear();
        h.m.flushed_to_client();
        h.perform(true);
        assert!(h.held.is_none(), "released after the greeting");
        assert!(h.m.take_greeted_by_server(), "a greeting to remember");
        assert!(!h.m.take_greeted_by_server(), "once");
        h.log.clear();
        h
    }

    /// Perform the machine's actions as a driver would; acquired connections are on
    /// the primary when `primary`.
    pub fn perform(&mut self, primary: bool) {
        while let Some(a) = self.m.next_action() {
            self.log.push(a.clone());
            match a {
                Action::Acquire { exclude, .. } => {
                    let node: Arc<str> = if primary { "p".into() } else { "s1".into() };
                    let node = if exclude.as_deref() == Some(&*node) {
                        Arc::from("s2")
                    } else {
                        node
                    };
                    self.held = Some(node.clone());
                    self.m.on_acquired(&node, primary, &mut self.conn);
                }
                Action::Release { reuse } => {
                    assert!(self.held.take().is_some(), "release without a connection");
                    if !reuse {
                        self.conn = ConnState {
                            pid: self.conn.pid + 1,
                            ..ConnState::default()
                        };
                    }
                }
                Action::Causal(stmt) => self.m.on_causal_reply(Ok(match stmt {
                    CausalStatement::Show => CausalReply::Show("sy1.a.1.10".into()),
                    CausalStatement::Set(_) => CausalReply::Set,
                    CausalStatement::Reset => CausalReply::Reset,
                })),
                // What a test says the server holds.
                Action::CountPins => self.m.on_pins_counted(Some(self.locks)),
                // The test answers (`on_listened`) itself.
                Action::Listen(_) => {}
                Action::CloseIdle(_) | Action::End(_) => {}
            }
        }
    }

    pub fn client(&mut self, bytes: &[u8]) {
        let mut input = BytesMut::from(bytes);
        self.client_buf(&mut input, false);
    }

    pub fn client_buf(&mut self, input: &mut BytesMut, primary: bool) {
        loop {
            self.m
                .on_client_input(input, self.held.as_ref().map(|_| &mut self.conn));
            if !self.m.has_actions() {
                break;
            }
            self.perform(primary);
        }
    }

    pub fn server(&mut self, bytes: &[u8]) {
        let mut input = BytesMut::from(bytes);
        self.m.on_server_input(&mut input, &mut self.conn);
        assert!(input.is_empty());
    }

    /// What the client gets now (the driver writes it out).
    pub fn take_client(&mut self) -> String {
        let t = tags(&self.m.to_client);
        self.m.to_client.clear();
        self.m.flushed_to_client();
        t
    }

    pub fn take_server(&mut self) -> BytesMut {
        self.m.to_server.split()
    }

    pub fn released(&self) -> Vec<bool> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Release { reuse } => Some(*reuse),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn pgbench_prepared_select_only() {
    let mut h = Harness::new(true);
    let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    // pgbench -M prepared: PQprepare (Parse + Sync), answered without a server.
    h.client(&cat(&[parse("P_0", sql), sync()]));
    assert_eq!(h.take_client(), "1Z");
    assert!(h.log.is_empty(), "no connection for a lone Parse + Sync");
    // PQsendQueryPrepared: Bind, Describe portal, Execute, Sync; a read: a standby.
    h.client(&cat(&[bind("P_0"), describe_portal(), execute(), sync()]));
    assert!(matches!(
        h.log[0],
        Action::Acquire {
            to: Target::Readable,
            read: true,
            exclude: None,
            rerun: false,
        }
    ));
    // Prepared under its content address first (answers dropped), then the client's.
    let out = h.take_server();
    assert_eq!(tags(&out), "CPBDES");
    assert!(
        !out.windows(3).any(|w| w == b"P_0"),
        "the client's name never reaches a server"
    );
    h.server(&cat(&[
        be(b'3', b""),
        be(b'1', b""),
        be(b'2', b""),
        row_answer(),
        ready(b'I'),
    ]));
    assert_eq!(h.take_client(), "2TDCZ");
    h.perform(false);
    assert_eq!(h.released(), vec![true]);
    // Next transaction on the same (pooled) connection: no re-prepare.
    h.log.clear();
    h.client(&cat(&[bind("P_0"), describe_portal(), execute(), sync()]));
    assert_eq!(tags(&h.take_server()), "BDES");
}

#[test]
fn a_pipeline_with_an_error_midway() {
    let mut h = Harness::new(false);
    // psycopg pipeline: three statements, the second fails.
    let pipeline = cat(&[
        parse("s1", "SELECT 1"),
        bind("s1"),
        execute(),
        parse("", "SELECT 1/0"),
        bind(""),
        execute(),
        parse("s3", "SET TIME ZONE 'UTC'"),
        bind("s3"),
        execute(),
        sync(),
    ]);
    h.client(&pipeline);
    assert_eq!(tags(&h.take_server()), "CPBEPBECPBES");
    h.server(&cat(&[
        be(b'3', b""),
        be(b'1', b""),
        be(b'2', b""),
        be(b'D', b"\0\x01\0\0\0\x011"),
        be(b'C', b"SELECT 1\0"),
        be(b'1', b""),
        be(b'2', b""),
        error("ERROR", "22012", "division by zero"),
        ready(b'I'),
    ]));
    // The client sees its answers, up to the error, and the ReadyForQuery; the error's
    // class is counted.
    assert_eq!(h.take_client(), "12DC12EZ");
    assert_eq!(h.m.server_errors, [*b"22"]);
    // s3 was never created on the server, and its SET never happened.
    let s3 = h.m.stmts.get(b"s3").unwrap().hash;
    assert!(!h.conn.prepared.contains(&s3));
    assert!(!h.m.state.desired.contains_key("timezone"));
    h.perform(false);
    assert_eq!(h.released(), vec![true]);
}

#[test]
fn deallocate_of_an_unknown_statement_gets_the_servers_error() {
    let mut h = Harness::new(false);
    h.client(&query("DEALLOCATE nope"));
    assert_eq!(&h.take_server()[..], &query("DEALLOCATE nope")[..]);
    h.server(&cat(&[
        error("ERROR", "26000", "prepared statement \"nope\" does not exist"),
        ready(b'I'),
    ]));
    assert_eq!(h.take_client(), "EZ");
}

#[test]
fn a_read_is_retried_elsewhere_before_its_first_answer_byte() {
    let mut h = Harness::new(true);
    h.client(&cat(&[parse("", "SELECT 1"), bind(""), execute(), sync()]));
    let first = h.take_server();
    assert_eq!(h.held.as_deref(), Some("s1"));
    // The standby warns of its immediate shutdown, then goes: nothing reached the
    // client, so the same unit runs on another node.
    h.server(&notice(
        "57P01",
        "terminating connection due to immediate shutdown command",
    ));
    h.perform(false);
    assert_eq!(h.held.as_deref(), Some("s2"));
    assert!(
        matches!(&h.log[..], [Action::Acquire { .. }, Action::Release { reuse: false }, Action::Acquire { to: Target::Readable, read: true, exclude: Some(n), rerun: true }] if n == "s1")
    );
    assert_eq!(h.take_client(), "", "the warning is not passed on");
    let again = h.take_server();
    assert_eq!(
        tags(&again),
        "QPBES",
        "session state replayed on the new connection, then the unit"
    );
    assert!(again.ends_with(&first));
    h.server(&cat(&[
        be(b'C', b"SELECT 1\0"),
        ready(b'I'),
        be(b'1', b""),
        be(b'2', b""),
        row_answer(),
        ready(b'I'),
    ]));
    assert_eq!(h.take_client(), "12TDCZ");
}

#[test]
fn a_read_answered_in_part_is_not_retried() {
    let mut h = Harness::new(true);
    h.client(&query("SELECT 1"));
    h.server(&be(b'T', b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0"));
    assert_eq!(h.take_client(), "T");
    h.m.on_server_lost("connection reset");
    h.perform(false);
    assert!(matches!(h.log.last(), Some(Action::End(Some(e))) if e.code().as_str() == "08006"));
    assert_eq!(h.released(), vec![false]);
}

#[test]
fn a_read_a_standby_refuses_runs_on_the_primary() {
    let mut h = Harness::new(true);
    h.client(&query("SELECT * FROM unlogged_t"));
    h.take_server();
    h.server(&cat(&[
        error(
            "ERROR",
            "0A000",
            "cannot access temporary or unlogged relations during recovery",
        ),
        ready(b'I'),
    ]));
    // The refusal is not the client's error, and the unit goes on elsewhere.
    assert!(h.m.server_errors.is_empty());
    assert!(matches!(h.m.next_action(), Some(Action::Release { reuse: false })));
    assert!(h.m.rerun_next());
    assert!(matches!(
        h.m.next_action(),
        Some(Action::Acquire {
            to: Target::Primary,
            read: false,
            exclude: None,
            rerun: true,
        })
    ));
    assert_eq!(h.take_client(), "", "the refusal is not passed on");
}

/// The simple Queries in `out`, as text.
fn queries(out: &[u8]) -> Vec<String> {
    let mut b = out;
    let mut v = Vec::new();
    while let Some((tag, len)) = views::header(b) {
        let m = &b[..len as usize + 1];
        if tag == b'Q' {
            v.push(String::from_utf8_lossy(&m[5..m.len() - 1]).into_owned());
        }
        b = &b[m.len()..];
    }
    v
}

/// The next unit gets another connection, with the client's settings already applied.
fn another_connection(h: &mut Harness) {
    h.conn = ConnState {
        pid: h.conn.pid + 1,
        applied: std::mem::take(&mut h.conn.applied),
        ..ConnState::default()
    };
}

#[test]
fn sql_prepared_statements_follow_the_client_to_any_connection() {
    let mut h = Harness::new(false);
    let prepare = "PREPARE p (int) AS SELECT $1 * 2";
    h.client(&query(prepare));
    assert_eq!(queries(&h.take_server()), [prepare]);
    h.server(&cat(&[be(b'C', b"PREPARE\0"), ready(b'I')]));
    assert_eq!(h.take_client(), "CZ");
    h.perform(true);
    assert_eq!(h.released(), vec![true], "a PREPARE does not pin");
    // The next unit on a connection that never saw it: prepared there first, its
    // answers dropped.
    another_connection(&mut h);
    h.client(&query("EXECUTE p(1)"));
    assert_eq!(queries(&h.take_server()), [prepare, "EXECUTE p(1)"]);
    h.server(&cat(&[be(b'C', b"PREPARE\0"), ready(b'I')]));
    h.server(&cat(&[be(b'C', b"SELECT 1\0"), ready(b'I')]));
    assert_eq!(h.take_client(), "CZ");
    h.perform(true);
    // Where it is already: nothing more.
    h.client(&query("EXECUTE p(2)"));
    assert_eq!(queries(&h.take_server()), ["EXECUTE p(2)"]);
    h.server(&cat(&[be(b'C', b"SELECT 1\0"), ready(b'I')]));
    h.take_client();
    h.perform(true);
    // Another client's statement of that name on the connection: replaced first.
    h.conn.sql_prepared.insert("p".into(), 99);
    h.client(&query("EXECUTE p(3)"));
    assert_eq!(queries(&h.take_server()), ["DEALLOCATE \"p\"", prepare, "EXECUTE p(3)"]);
    h.server(&cat(&[be(b'C', b"DEALLOCATE\0"), ready(b'I')]));
    h.server(&cat(&[be(b'C', b"PREPARE\0"), ready(b'I')]));
    h.server(&cat(&[be(b'C', b"SELECT 1\0"), ready(b'I')]));
    assert_eq!(h.take_client(), "CZ");
    h.perform(true);
    // DEALLOCATE: the server's, then the name is unknown again; another client's
    // statement of the name on a connection is taken away before this client's EXECUTE.
    h.client(&query("DEALLOCATE p"));
    assert_eq!(queries(&h.take_server()), ["DEALLOCATE p"]);
    h.server(&cat(&[be(b'C', b"DEALLOCATE\0"), ready(b'I')]));
    h.take_client();
    h.perform(true);
    assert!(h.conn.sql_prepared.is_empty());
    h.conn.sql_prepared.insert("p".into(), 99);
    h.client(&query("EXECUTE p(4)"));
    assert_eq!(queries(&h.take_server()), ["DEALLOCATE \"p\"", "EXECUTE p(4)"]);
}

#[test]
fn a_failed_prepare_is_not_the_clients() {
    let mut h = Harness::new(false);
    h.client(&query("PREPARE p AS SELECT nope"));
    h.take_server();
    h.server(&cat(&[
        error("ERROR", "42703", "column \"nope\" does not exist"),
        ready(b'I'),
    ]));
    h.take_client();
    h.perform(true);
    assert!(h.conn.sql_prepared.is_empty());
    another_connection(&mut h);
    h.client(&query("EXECUTE p"));
    assert_eq!(queries(&h.take_server()), ["EXECUTE p"], "nothing to replay");
}

#[test]
fn a_client_pinned_by_advisory_locks_is_free_once_the_server_holds_none() {
    let mut h = Harness::new(false);
    let one = |h: &mut Harness, sql: &str| {
        h.client(&query(sql));
        h.take_server();
        h.server(&cat(&[be(b'C', b"SELECT 1\0"), ready(b'I')]));
        h.take_client();
        h.perform(true);
    };
    one(&mut h, "SELECT pg_advisory_lock(1)");
    one(&mut h, "SELECT pg_advisory_lock(2)");
    assert!(h.released().is_empty(), "pinned while it holds a lock");
    // One of two released: the server still holds one; the client stays pinned.
    h.locks = 1;
    one(&mut h, "SELECT pg_advisory_unlock(1)");
    assert!(h.log.iter().any(|a| matches!(a, Action::CountPins)));
    assert!(h.released().is_empty());
    // An ordinary statement asks nothing.
    h.log.clear();
    one(&mut h, "SELECT 1");
    assert!(!h.log.iter().any(|a| matches!(a, Action::CountPins)));
    // The last one: the connection goes back to the pool, and the next unit gets one.
    h.locks = 0;
    one(&mut h, "SELECT pg_advisory_unlock(2)");
    assert_eq!(h.released(), vec![true]);
    h.log.clear();
    h.client(&query("SELECT 2"));
    h.perform(true);
    assert!(matches!(h.log[..], [Action::Acquire { .. }]));
}

#[test]
fn a_lock_does_not_end_a_pin_that_lasts() {
    let mut h = Harness::new(false);
    for sql in [
        "SELECT pg_advisory_lock(1)",
        // A LISTEN in a transaction is the server's: a pin that lasts.
        "BEGIN; LISTEN jobs; COMMIT",
        "SELECT pg_advisory_unlock_all()",
    ] {
        h.client(&query(sql));
        h.take_server();
        h.server(&cat(&[be(b'C', b"SELECT 1\0"), ready(b'I')]));
        h.take_client();
        h.perform(true);
    }
    assert!(!h
        .log
        .iter()
        .any(|a| matches!(a, Action::CountPins | Action::Release { .. })));
}

#[test]
fn listen_between_transactions_is_the_proxys_and_pins_nothing() {
    let mut h = Harness::new(false);
    h.client(&query("/* app */ LISTEN jobs; UNLISTEN *"));
    assert!(h.take_server().is_empty(), "no server connection for it");
    let ops = match h.log.last() {
        Some(Action::Listen(ops)) => ops.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ops.len(), 2);
    h.m.on_listened(Ok(()));
    assert_eq!(h.take_client(), "CCZ");
    h.client(&query("LISTEN jobs"));
    h.m.on_listened(Err("no primary".into()));
    assert_eq!(h.take_client(), "EZ");
    assert!(!h.log.iter().any(|a| matches!(a, Action::Acquire { .. })));
    // Inside a transaction it is the server's, and pins as before.
    h.client(&query("BEGIN"));
    h.take_server();
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.take_client();
    h.client(&query("LISTEN jobs"));
    assert_eq!(queries(&h.take_server()), ["LISTEN jobs"]);
    assert!(maybe_listen(b"  -- x\n listen a") && maybe_listen(b"UNLISTEN *") && !maybe_listen(b"SELECT 1"));
}

#[test]
fn a_unit_that_pins_keeps_its_connection_until_the_client_leaves() {
    let mut h = Harness::new(false);
    h.client(&query("BEGIN; LISTEN jobs; COMMIT"));
    h.server(&cat(&[
        be(b'C', b"BEGIN\0"),
        be(b'C', b"LISTEN\0"),
        be(b'C', b"COMMIT\0"),
        ready(b'I'),
    ]));
    assert_eq!(h.take_client(), "CCCZ");
    h.perform(true);
    assert!(h.released().is_empty(), "pinned: not released");
    // Its own NOTIFY carries the pid the client was given.
    h.client(&query("NOTIFY jobs"));
    let mut n = BytesMut::new();
    n.extend_from_slice(&4242i32.to_be_bytes());
    n.extend_from_slice(b"jobs\0\0");
    h.server(&cat(&[be(b'C', b"NOTIFY\0"), be(b'A', &n), ready(b'I')]));
    let out = h.m.to_client.split();
    // CommandComplete (12 bytes), then NotificationResponse: tag, length, pid.
    assert_eq!(tags(&out), "CAZ");
    assert_eq!(&out[17..21], &777i32.to_be_bytes()[..]);
    h.client(b"X\0\0\0\x04");
    h.perform(true);
    assert_eq!(h.released(), vec![false], "a pinned connection is closed, never pooled");
    assert!(matches!(h.log.last(), Some(Action::End(None))));
}

#[test]
fn a_large_row_is_streamed_not_buffered() {
    let mut h = Harness::new(false);
    h.client(&query("SELECT big FROM t"));
    h.take_server();
    let mut row = vec![0u8, 1];
    row.extend_from_slice(&(200_000u32).to_be_bytes());
    row.extend(std::iter::repeat_n(b'x', 200_000));
    let answer = cat(&[be(b'D', &row), be(b'C', b"SELECT 1\0"), ready(b'I')]);
    let mut input = BytesMut::new();
    let mut passed = 0;
    for chunk in answer.chunks(50_000) {
        input.extend_from_slice(chunk);
        h.m.on_server_input(&mut input, &mut h.conn);
        assert!(input.len() < 70_000, "never buffers a whole large message");
        passed += h.m.to_client.len();
        h.m.to_client.clear();
    }
    assert_eq!(passed, answer.len(), "everything passed, once, in order");
    h.perform(false);
    assert_eq!(h.released(), vec![true]);
}

#[test]
fn bad_client_input_ends_the_session_with_08p01() {
    let mut h = Harness::new(false);
    h.client(b"?\0\0\0\x04");
    h.perform(true);
    assert!(matches!(h.log.last(), Some(Action::End(Some(e))) if e.code().as_str() == "08P01"));
    let mut h = Harness::new(false);
    h.client(&be(b'P', b"name-without-query"));
    h.perform(true);
    assert!(matches!(h.log.last(), Some(Action::End(Some(e))) if e.message().contains("malformed Parse")));
    assert_eq!(h.released(), vec![false]);
}

#[test]
fn the_causal_token_is_answered_by_the_proxy_between_transactions() {
    let mut h = Harness::new(false);
    h.client(&query("SHOW switchyard.causal_token"));
    assert_eq!(h.take_client(), "TDCZ");
    assert!(
        h.log.iter().all(|a| matches!(a, Action::Causal(_))),
        "no server connection: {:?}",
        h.log
    );
    h.client(&query("SET switchyard.causal_token = 'sy1.a.1.10'"));
    assert_eq!(h.take_client(), "CZ");
    // Inside a transaction block it is the server's business (a placeholder setting).
    h.log.clear();
    h.client(&query("BEGIN"));
    h.take_server();
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.take_client();
    h.client(&query("SHOW switchyard.causal_token"));
    assert_eq!(tags(&h.take_server()), "Q");
    assert!(!h.log.iter().any(|a| matches!(a, Action::Causal(_))));
}

#[test]
fn a_unit_on_the_primary_that_may_write_is_reported_once_it_ends() {
    let mut h = Harness::new(true);
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    assert!(!h.m.take_wrote(), "not before it ends");
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'I')]));
    h.perform(true);
    assert!(h.m.take_wrote());
    assert!(!h.m.take_wrote(), "reported once");
    // Nor does a unit that only sets session settings (Django's time zone).
    h.client_buf(&mut query("SET TIME ZONE 'UTC'"), true);
    h.server(&cat(&[be(b'C', b"SET\0"), ready(b'I')]));
    h.perform(true);
    assert!(!h.m.take_wrote());
    // A transaction whose first statement only sets something still writes after it.
    h.client_buf(&mut query("BEGIN"), true);
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.client_buf(&mut query("SET LOCAL work_mem = '8MB'"), true);
    h.server(&cat(&[be(b'C', b"SET\0"), ready(b'T')]));
    h.client_buf(&mut query("INSERT INTO t VALUES (2)"), true);
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'T')]));
    h.client_buf(&mut query("COMMIT"), true);
    h.server(&cat(&[be(b'C', b"COMMIT\0"), ready(b'I')]));
    h.perform(true);
    assert!(h.m.take_wrote());
    // A proven read, even one that ran on the primary, wrote nothing.
    h.client_buf(&mut query("SELECT 1"), true);
    h.server(&cat(&[row_answer(), ready(b'I')]));
    h.perform(true);
    assert!(!h.m.take_wrote());
}

/// The SQLSTATE the session ended with, if it ended.
fn ended_with(h: &Harness) -> Option<String> {
    h.log.iter().find_map(|a| match a {
        Action::End(Some(e)) => Some(e.code().as_str().to_string()),
        _ => None,
    })
}

#[test]
fn a_commit_in_flight_when_the_primary_dies_is_08007() {
    // An explicit transaction that wrote: COMMIT sent, no answer.
    let mut h = Harness::new(false);
    h.client_buf(&mut query("BEGIN"), true);
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'T')]));
    h.client_buf(&mut query("COMMIT"), true);
    h.m.on_server_lost("connection reset");
    h.perform(true);
    assert_eq!(ended_with(&h).as_deref(), Some("08007"));

    // A write outside a transaction block commits by itself: the same. Also when the
    // topology ends the session first (a frozen primary never resets the socket).
    let mut h = Harness::new(false);
    h.client_buf(
        &mut cat(&[parse("", "INSERT INTO t VALUES ($1)"), bind(""), execute(), sync()]),
        true,
    );
    h.m.on_evicted("node p is down", false);
    h.perform(true);
    assert_eq!(ended_with(&h).as_deref(), Some("08007"));
}

#[test]
fn a_transaction_lost_before_its_commit_is_08006() {
    // Mid-transaction: it rolled back for sure.
    let mut h = Harness::new(false);
    h.client_buf(&mut query("BEGIN"), true);
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.m.on_server_lost("connection reset");
    h.perform(true);
    assert_eq!(ended_with(&h).as_deref(), Some("08006"));

    // The autocommit write was answered; the next statement, a read, was in flight.
    let mut h = Harness::new(false);
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'I')]));
    h.perform(true);
    h.client_buf(&mut query("SELECT 1"), true);
    h.m.on_server_lost("connection reset");
    h.perform(true);
    assert_eq!(ended_with(&h).as_deref(), Some("08006"));

    // Preparing a write (tokio-postgres's first round trip) executes nothing.
    let mut h = Harness::new(false);
    h.client_buf(
        &mut cat(&[parse("", "INSERT INTO t VALUES ($1)"), describe_portal(), sync()]),
        true,
    );
    h.m.on_server_lost("connection reset");
    h.perform(true);
    assert_eq!(ended_with(&h).as_deref(), Some("08006"));

    // A read-only transaction's COMMIT decides nothing. (A plain BEGIN counts as a
    // write, as a multi-statement "BEGIN; INSERT ..." may hide one: its COMMIT is 08007.)
    let mut h = Harness::new(false);
    h.client_buf(&mut query("BEGIN READ ONLY"), true);
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.client_buf(&mut query("SELECT 1"), true);
    h.server(&cat(&[row_answer(), ready(b'T')]));
    h.client_buf(&mut query("COMMIT"), true);
    h.m.on_server_lost("connection reset");
    h.perform(true);
    assert_eq!(ended_with(&h).as_deref(), Some("08006"));
}

#[test]
fn a_unit_that_gets_no_connection_is_refused_and_the_session_goes_on() {
    let mut h = Harness::new(false);
    // A simple query: ErrorResponse, ReadyForQuery, no end.
    let mut input = query("INSERT INTO t VALUES (1)");
    h.m.on_client_input(&mut input, None);
    assert!(matches!(h.m.next_action(), Some(Action::Acquire { .. })));
    h.m.on_acquire_failed(Error::no_route("no primary available for cluster \"main\""));
    assert_eq!(h.take_client(), "EZ");
    assert!(h.m.next_action().is_none(), "the session goes on");

    // An extended-protocol batch: the rest up to Sync is dropped, then ReadyForQuery.
    let mut input = cat(&[parse("", "INSERT INTO t VALUES ($1)"), bind(""), execute(), sync()]);
    h.m.on_client_input(&mut input, None);
    assert!(matches!(h.m.next_action(), Some(Action::Acquire { .. })));
    h.m.on_acquire_failed(Error::pool_exhausted("no free server connection"));
    h.m.on_client_input(&mut input, None);
    assert!(input.is_empty());
    assert_eq!(h.take_client(), "EZ");

    // The next unit gets its connection and runs.
    h.client_buf(&mut query("SELECT 1"), true);
    h.server(&cat(&[row_answer(), ready(b'I')]));
    h.perform(true);
    assert_eq!(h.take_client(), "TDCZ");
    assert_eq!(ended_with(&h), None);
}

#[test]
fn a_query_looked_at_once_before_its_checkout_is_not_mistaken_for_the_next() {
    let mut h = Harness::new(false);
    // Looked at for a causal-token statement before the checkout, not after it.
    let mut input = query("SELECT 1");
    h.m.on_client_input(&mut input, None);
    assert!(matches!(h.m.next_action(), Some(Action::Acquire { .. })));
    h.m.on_acquire_failed(Error::no_route("no primary available for cluster \"main\""));
    assert_eq!(h.take_client(), "EZ");
    // The refused query's mark does not carry over to the next message.
    h.log.clear();
    h.client(&query("SHOW switchyard.causal_token"));
    assert_eq!(h.take_client(), "TDCZ");
    assert!(h.log.iter().all(|a| matches!(a, Action::Causal(_))), "{:?}", h.log);
    // Nor to the message after a unit that ran.
    h.client_buf(&mut query("SELECT 1"), true);
    h.server(&cat(&[row_answer(), ready(b'I')]));
    h.perform(true);
    assert_eq!(h.take_client(), "TDCZ");
    h.log.clear();
    h.client(&query("SHOW switchyard.causal_token"));
    assert_eq!(h.take_client(), "TDCZ");
    assert!(h.log.iter().all(|a| matches!(a, Action::Causal(_))), "{:?}", h.log);
}

#[test]
fn a_refusal_while_shutting_down_ends_the_session() {
    let mut h = Harness::new(false);
    let mut input = query("SELECT 1");
    h.m.on_client_input(&mut input, None);
    assert!(matches!(h.m.next_action(), Some(Action::Acquire { .. })));
    h.m.on_acquire_failed(Error::shutdown());
    assert!(matches!(h.m.next_action(), Some(Action::End(Some(_)))));
}

fn machine(read_only_endpoint: bool, split: bool) -> Machine<'static> {
    Machine::new(
        Config {
            cluster: "main".into(),
            read_only_endpoint,
            split,
            max_message: 1 << 20,
            client_pid: 777,
            client_key: 1,
            digests: true,
            traces: true,
        },
        Vec::new(),
        classifier(),
        None,
    )
}

#[test]
fn every_routing_decision_is_the_machines_and_travels_in_the_acquire() {
    let target = |a: Action| match a {
        Action::Acquire { to, .. } => to,
        other => panic!("not an acquire: {other:?}"),
    };
    // (ro endpoint, split, read, rerun) -> where
    let table = [
        ((false, false, false, false), Target::Primary),
        ((false, false, true, false), Target::Primary), // no split: reads stay on rw
        ((false, true, true, false), Target::Readable),
        ((false, true, false, false), Target::Primary),
        ((false, true, true, true), Target::Readable), // a lost read moves on
        ((false, true, false, true), Target::Primary), // refused by a standby
        ((true, false, false, false), Target::Readable), // ro: everything reads
        ((true, false, true, true), Target::Readable),
        ((true, false, false, true), Target::Primary), // ro: only a primary runs it
    ];
    for ((ro, split, read, rerun), want) in table {
        let m = machine(ro, split);
        assert_eq!(
            target(m.route(read, None, rerun)),
            want,
            "ro {ro} split {split} read {read} rerun {rerun}"
        );
    }
    // The greeting's connection goes where the session's units would.
    for (ro, want) in [(false, Target::Primary), (true, Target::Readable)] {
        let mut m = machine(ro, true);
        assert!(matches!(m.next_action(), Some(Action::Acquire { to, rerun: false, .. }) if to == want));
        assert_eq!(m.phase, Phase::Greeting);
    }
}

#[test]
fn the_phase_follows_greeting_acquiring_and_a_refused_unit() {
    let mut h = Harness::new(false);
    assert_eq!(h.m.phase, Phase::Serving, "the harness greets");
    // A unit whose connection cannot be had: the client is told, keeps its session,
    // and what it sent up to its Sync is dropped.
    h.m.on_client_input(&mut BytesMut::from(&bind("")[..]), None);
    assert!(matches!(h.m.phase, Phase::Acquiring { rerun: false, .. }));
    assert!(matches!(h.m.next_action(), Some(Action::Acquire { rerun: false, .. })));
    h.m.on_acquire_failed(Error::no_route("test"));
    assert_eq!(h.m.phase, Phase::SkippingToSync);
    h.m.on_client_input(&mut BytesMut::from(&cat(&[execute(), sync()])[..]), None);
    assert_eq!(h.m.phase, Phase::Serving);
    assert!(!h.m.has_actions(), "dropped up to the Sync, not sent anywhere");
    // A failure to get the connection for a rerun, or at the greeting, ends the session.
    let mut m = machine(false, false);
    let _ = m.next_action();
    m.on_acquire_failed(Error::no_route("test"));
    assert!(matches!(m.next_action(), Some(Action::End(Some(_)))));
    assert_eq!(m.phase, Phase::Ended);
}

#[test]
fn a_remembered_greeting_greets_at_once_and_the_first_unit_gets_the_startup_settings() {
    let mut reported = crate::pg::greetings::Reported::new();
    reported.insert(b"client_encoding"[..].into(), b"UTF8"[..].into());
    reported.insert(b"application_name"[..].into(), b"pgbench"[..].into());
    let mut m = Machine::new(
        Config {
            cluster: "main".into(),
            read_only_endpoint: false,
            split: false,
            max_message: 1 << 20,
            client_pid: 777,
            client_key: 1,
            digests: true,
            traces: true,
        },
        vec![("application_name".into(), "pgbench".into())],
        classifier(),
        Some(&crate::pg::greetings::encode(&reported)),
    );
    assert_eq!(m.phase, Phase::Serving);
    assert!(!m.has_actions(), "no connection for the greeting");
    assert_eq!(tags(&m.to_client), "SSKZ");
    // The end of the login goes first, in the same write as the greeting.
    m.login_reply_first(BytesMut::new());
    assert_eq!(tags(&m.to_client), "SSKZ");
    let mut ok = BytesMut::new();
    crate::pg::protocol::messages::auth_ok(&mut ok);
    m.login_reply_first(ok);
    assert_eq!(tags(&m.to_client), "RSSKZ");
    assert!(!m.take_greeted_by_server(), "nothing new to remember");
    m.to_client.clear();
    m.flushed_to_client();
    // The first unit's connection is brought to the client's settings before its query.
    m.on_client_input(&mut query("SELECT 1"), None);
    assert!(matches!(
        m.next_action(),
        Some(Action::Acquire {
            to: Target::Primary,
            ..
        })
    ));
    let mut conn = ConnState::default();
    m.on_acquired(&Arc::from("p"), true, &mut conn);
    m.on_client_input(&mut BytesMut::new(), Some(&mut conn));
    assert_eq!(tags(&m.to_server), "QQ", "application_name replayed, then the query");
    assert!(conn.applied.contains_key("application_name"));
}

#[test]
fn finished_statements_carry_their_digest_rows_and_trace_context() {
    let mut h = Harness::new(false);
    let tp = "/*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/";
    // Simple protocol.
    h.client(&query(&format!("SELECT 1 {tp}")));
    h.m.sending(std::time::Instant::now());
    h.server(&cat(&[row_answer(), ready(b'I')]));
    // Extended, the unnamed statement (psycopg 3).
    h.perform(true);
    h.client(&cat(&[
        parse("", &format!("SELECT $1::int {tp}")),
        bind(""),
        execute(),
        sync(),
    ]));
    h.m.sending(std::time::Instant::now());
    h.server(&cat(&[be(b'1', b""), be(b'2', b""), row_answer(), ready(b'I')]));
    let got: Vec<_> =
        h.m.running
            .finished
            .iter()
            .map(|f| {
                (
                    f.digest.text.to_string(),
                    f.rows,
                    f.sent.is_some(),
                    f.trace.map(|t| t.span_id[7]),
                )
            })
            .collect();
    assert_eq!(
        got,
        [
            ("SELECT $1".to_string(), 1, true, Some(0x31)),
            ("SELECT $1::int".to_string(), 1, true, Some(0x31))
        ]
    );
}

#[test]
fn a_session_at_rest_is_carried_whole_and_one_in_a_transaction_is_not() {
    let mut h = Harness::new(false);
    h.client(&query("SET search_path = app, public"));
    h.take_server();
    h.server(&cat(&[be(b'C', b"SET\0"), ready(b'I')]));
    h.perform(true);
    assert_eq!(h.take_client(), "CZ");
    let carried = h.m.carry().expect("at rest after the SET");
    assert!(carried.settings.contains_key("search_path"), "{carried:?}");
    assert!(carried.settings.contains_key("application_name"), "{carried:?}");

    // Put back in another machine, it is the same session (and carried the same again).
    let cfg = harness_config(false);
    let mut carried_bytes = carried;
    carried_bytes
        .statements
        .push((b"s1".to_vec(), parse("sy_x", "SELECT $1").to_vec()));
    carried_bytes
        .sql_statements
        .push(("q".into(), "PREPARE q AS SELECT 2".into()));
    let m = Machine::resume(
        cfg,
        vec![("application_name".into(), "pgbench".into())],
        classifier(),
        carried_bytes,
    );
    assert!(m.to_client.is_empty(), "no second greeting");
    assert!(!m.has_actions(), "nothing to acquire before the client speaks");
    let again = m.carry().expect("a resumed machine is at rest");
    assert!(again.settings.contains_key("search_path"));
    assert_eq!(again.statements.len(), 1);
    assert_eq!(again.statements[0].0, b"s1".to_vec());
    assert_eq!(
        again.sql_statements,
        vec![("q".to_string(), "PREPARE q AS SELECT 2".to_string())]
    );

    // Inside a transaction the client holds a connection: it stays.
    h.client(&query("BEGIN"));
    h.take_server();
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.perform(true);
    assert!(h.m.carry().is_none(), "a client in a transaction is not carried");
}

/// The write-floor question of these tests (the driver's lives as long as its cluster).
fn floor_question() -> &'static OwnStatement {
    Box::leak(Box::new(OwnStatement::new("SELECT floor()")))
}

/// A harness whose units on the primary carry the floor question with their commit.
fn asking_floor() -> Harness {
    let mut h = Harness::new(false);
    h.m.ask_floor = Some(floor_question());
    h
}

/// The answer to the write-floor question after its Bind, Execute, Sync (`prepared`:
/// with its Close and Parse first).
fn floor_answer(prepared: bool) -> BytesMut {
    let mut b = match prepared {
        true => cat(&[be(b'3', b""), be(b'1', b"")]),
        false => BytesMut::new(),
    };
    b.extend_from_slice(&cat(&[
        be(b'2', b""),
        be(b'D', b"\0\x01\0\0\0\x090/3000148"),
        be(b'C', b"SELECT 1\0"),
        ready(b'I'),
    ]));
    b
}

/// The simple queries in a stream, and the tags of all its messages.
fn sent(out: &[u8]) -> (Vec<String>, String) {
    (queries(out), tags(out))
}

#[test]
fn the_floor_question_goes_in_the_same_write_as_the_commit() {
    let mut h = asking_floor();
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    // Prepared on the connection the first time: Close, Parse, then Bind, Execute, Sync.
    assert_eq!(
        sent(&h.take_server()),
        (vec!["INSERT INTO t VALUES (1)".to_string()], "QCPBES".to_string())
    );
    // The client's next statement waits for the question's answer: it would run after
    // the question, which would then not cover it.
    h.client_buf(&mut query("SELECT 1"), true);
    assert!(h.take_server().is_empty());
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'I')]));
    assert_eq!(h.take_client(), "CZ", "the client has its answer at once");
    h.perform(true);
    assert!(
        h.released().is_empty(),
        "the connection waits for the question's answer"
    );
    assert!(h.m.take_floor().is_none());
    h.server(&floor_answer(true));
    assert_eq!(h.take_client(), "", "the question's answer is the proxy's");
    h.perform(true);
    assert_eq!(h.released(), vec![true]);
    assert!(h.m.take_wrote());
    assert_eq!(h.m.take_floor(), Some(Asked::Row(vec![Some("0/3000148".into())])));
    assert!(h.m.take_floor().is_none(), "once");
    // The waiting statement is a unit of its own.
    h.client_buf(&mut BytesMut::new(), true);
    assert_eq!(queries(&h.take_server()), vec!["SELECT 1"]);
    h.server(&cat(&[row_answer(), ready(b'I')]));
    assert_eq!(h.take_client(), "TDCZ");

    // An explicit transaction: with its COMMIT, not before; the connection has the
    // statement now.
    h.client_buf(&mut query("BEGIN"), true);
    assert_eq!(sent(&h.take_server()).1, "Q");
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.client_buf(&mut query("UPDATE t SET a = 2"), true);
    assert_eq!(sent(&h.take_server()).1, "Q");
    h.server(&cat(&[be(b'C', b"UPDATE 1\0"), ready(b'T')]));
    assert_eq!(h.take_client(), "CZCZ");
    h.client_buf(&mut query("COMMIT"), true);
    assert_eq!(sent(&h.take_server()), (vec!["COMMIT".to_string()], "QBES".to_string()));
    h.server(&cat(&[be(b'C', b"COMMIT\0"), ready(b'I'), floor_answer(false)]));
    assert_eq!(h.take_client(), "CZ");
    h.perform(true);
    assert_eq!(h.released(), vec![true, true, true]);
    assert!(matches!(h.m.take_floor(), Some(Asked::Row(_))));

    // The extended protocol: after the Sync that commits.
    let mut h = asking_floor();
    h.client_buf(
        &mut cat(&[parse("", "INSERT INTO t VALUES ($1)"), bind(""), execute(), sync()]),
        true,
    );
    assert_eq!(tags(&h.take_server()), "PBESCPBES");
    h.server(&cat(&[
        be(b'1', b""),
        be(b'2', b""),
        be(b'C', b"INSERT 0 1\0"),
        ready(b'I'),
    ]));
    assert_eq!(h.take_client(), "12CZ");
    h.server(&floor_answer(true));
    assert_eq!(h.take_client(), "");
    h.perform(true);
    assert_eq!(h.released(), vec![true]);
    assert!(matches!(h.m.take_floor(), Some(Asked::Row(_))));
}

#[test]
fn no_floor_question_where_a_block_may_stay_open_or_nothing_commits() {
    for sql in [
        "COMMIT; BEGIN",
        "UPDATE t SET a = 1; BEGIN",
        "NOTIFY foo, 'n1'",
        "COPY t FROM STDIN",
        "SELECT 1",
        "SET TIME ZONE 'UTC'",
    ] {
        let mut h = asking_floor();
        h.client_buf(&mut query(sql), true);
        assert_eq!(tags(&h.take_server()), "Q", "{sql}");
    }
    // A transaction that wrote and ends AND CHAIN goes on: no question.
    let mut h = asking_floor();
    h.client_buf(&mut query("BEGIN"), true);
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'T')]));
    h.take_server();
    h.client_buf(&mut query("COMMIT AND CHAIN"), true);
    assert_eq!(tags(&h.take_server()), "Q");
    // Nor without `ask_floor`.
    let mut h = Harness::new(false);
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    assert_eq!(tags(&h.take_server()), "Q");
}

#[test]
fn a_floor_question_that_ran_in_a_transaction_block_counts_for_nothing() {
    // A function that opens a block is not something the classifier can see; the
    // server's ReadyForQuery before the question's answer says where it ran.
    let mut h = asking_floor();
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.take_server();
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'T')]));
    let mut answer = floor_answer(true);
    answer.truncate(answer.len() - 6);
    answer.extend_from_slice(&ready(b'T'));
    h.server(&answer);
    assert_eq!(h.take_client(), "CZ");
    h.perform(true);
    assert!(h.released().is_empty(), "in a block: the unit goes on");
    h.client_buf(&mut query("COMMIT"), true);
    assert_eq!(tags(&h.take_server()), "Q", "one question per unit");
    h.server(&cat(&[be(b'C', b"COMMIT\0"), ready(b'I')]));
    h.perform(true);
    assert_eq!(h.released(), vec![true]);
    assert_eq!(h.m.take_floor(), Some(Asked::NoRow));
}

#[test]
fn a_floor_question_the_server_refuses_is_not_the_clients_error() {
    let mut h = asking_floor();
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.take_server();
    // Its Close passes, its Parse fails: the server skips to the Sync.
    h.server(&cat(&[
        be(b'C', b"INSERT 0 1\0"),
        ready(b'I'),
        be(b'3', b""),
        error("ERROR", "42883", "function floor() does not exist"),
        ready(b'I'),
    ]));
    assert_eq!(h.take_client(), "CZ");
    h.perform(true);
    assert_eq!(h.released(), vec![true]);
    assert_eq!(h.m.take_floor(), Some(Asked::NoRow));
    assert!(h.conn.prepared.is_empty(), "the failed Parse created nothing");
}

#[test]
fn a_connection_lost_before_the_floor_answer_costs_the_client_nothing() {
    let mut h = asking_floor();
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.take_server();
    h.server(&cat(&[be(b'C', b"INSERT 0 1\0"), ready(b'I'), be(b'3', b"")]));
    assert_eq!(h.take_client(), "CZ");
    h.m.on_server_lost("connection reset");
    h.perform(true);
    assert_eq!(ended_with(&h), None, "the session goes on");
    assert_eq!(h.released(), vec![false]);
    assert_eq!(h.m.take_floor(), Some(Asked::Lost));
    assert!(h.m.take_wrote());
    // A commit that was not answered yet is still 08007.
    let mut h = asking_floor();
    h.client_buf(&mut query("INSERT INTO t VALUES (1)"), true);
    h.m.on_server_lost("connection reset");
    h.perform(true);
    assert_eq!(ended_with(&h).as_deref(), Some("08007"));
}

/// What tokio-postgres and psycopg do for a statement with parameters: prepare it
/// (Parse, Describe, Sync) in one unit, run it (Bind, Execute, Sync) in the next. Only the
/// second writes, and only its commit carries the floor question.
#[test]
fn a_write_only_prepared_has_not_written() {
    let mut h = asking_floor();
    let mut describe = BytesMut::new();
    fe::describe(b'S', "s0", &mut describe).unwrap();
    h.client_buf(
        &mut cat(&[parse("s0", "INSERT INTO t VALUES ($1)"), describe, sync()]),
        true,
    );
    assert_eq!(tags(&h.take_server()), "CPDS", "no question after a prepare");
    h.server(&cat(&[
        be(b'3', b""),
        be(b'1', b""),
        be(b't', b"\0\x01\0\0\0\x17"),
        be(b'n', b""),
        ready(b'I'),
    ]));
    assert_eq!(h.take_client(), "1tnZ");
    h.perform(true);
    assert_eq!(h.released(), vec![true]);
    assert!(!h.m.take_wrote(), "prepared, not run: nothing written");
    h.client_buf(&mut cat(&[bind("s0"), execute(), sync()]), true);
    assert_eq!(tags(&h.take_server()), "BESCPBES");
    h.server(&cat(&[
        be(b'2', b""),
        be(b'C', b"INSERT 0 1\0"),
        ready(b'I'),
        floor_answer(true),
    ]));
    assert_eq!(h.take_client(), "2CZ");
    h.perform(true);
    assert!(h.m.take_wrote());
    assert!(matches!(h.m.take_floor(), Some(Asked::Row(_))));
}

#[test]
fn a_session_at_rest_gives_its_queues_storage_back_and_its_next_unit_takes_it_again() {
    let mut h = Harness::new(false);
    let unit = |h: &mut Harness| {
        h.client(&query("SELECT 1"));
        h.take_server();
        h.server(&cat(&[row_answer(), ready(b'I')]));
        h.perform(true);
        assert_eq!(h.take_client(), "TDCZ");
        assert_eq!(h.m.running.finished.len(), 1, "the statement finished");
        // The driver records what finished.
        h.m.running.finished.clear();
    };
    unit(&mut h);
    let q = h.m.take_queues();
    assert!(q.has_storage(), "a unit's queues have storage");
    h.m.put_queues(q);
    h.m.rest();
    let q = h.m.take_queues();
    assert!(!q.has_storage(), "at rest the machine holds none");
    h.m.put_queues(q);
    unit(&mut h);
    let q = h.m.take_queues();
    assert!(q.has_storage());
    h.m.put_queues(q);
    // A session holding a connection (inside a transaction) is not at rest: its queues
    // stay.
    h.client(&query("BEGIN"));
    h.server(&cat(&[be(b'C', b"BEGIN\0"), ready(b'T')]));
    h.take_client();
    h.m.rest();
    let q = h.m.take_queues();
    assert!(q.has_storage(), "kept inside a transaction");
    h.m.put_queues(q);
}
