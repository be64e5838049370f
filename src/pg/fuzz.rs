//! Fuzz targets: every decoder the proxy runs on untrusted bytes, and the
//! transaction-pooling machine driven by arbitrary event sequences. Each target takes
//! raw bytes (the shape cargo-fuzz / libFuzzer expect), so a coverage-guided fuzzer can
//! drive them; the toolchain here is stable-only, so `examples/fuzz.rs` drives them with
//! seeded random inputs (`make fuzz`), and a short run of each is a unit test.
//!
//! Invariants checked besides "no panic":
//! - decoders: a decoded view lies inside its input; the framer finds the same
//!   boundaries however the stream is cut;
//! - machine: a server connection is released for reuse only when its transaction
//!   status is idle, nothing is owed and the client is not pinned, judged by a model
//!   of the connection built from the bytes alone (every Sync/Query sent answered by a
//!   ReadyForQuery, the last one idle, no extended-protocol message after the last
//!   Sync, nothing pinning ever sent); bytes for a server exist only while one is held;
//!   both output streams are whole messages; nothing happens after the session ended.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;

use crate::pg::classify::{blank_literals, Classifier};
use crate::pg::pool::ConnState;
use crate::pg::protocol::framing::{FrameError, Framer};
use crate::pg::protocol::startup::parse_startup;
use crate::pg::protocol::views::{self, ErrorFields, ParameterStatus, Parse, Query, StatementRef};
use crate::pg::txn::machine::{Action, Config, Machine};

pub const TARGETS: &[&str] = &["views", "startup", "framer", "classify", "machine"];

pub fn run(target: &str, data: &[u8]) {
    match target {
        "views" => views_target(data),
        "startup" => startup_target(data),
        "framer" => framer_target(data),
        "classify" => classify_target(data),
        "machine" => machine_target(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

fn inside(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

/// The frontend/backend message views on arbitrary bodies.
pub fn views_target(data: &[u8]) {
    if let Ok(p) = Parse::decode(data) {
        assert!(inside(data, p.name) && inside(data, p.query) && inside(data, p.after_name));
    }
    if let Ok(q) = Query::decode(data) {
        assert!(inside(data, q.sql));
    }
    for r in [
        StatementRef::decode_bind(data),
        StatementRef::decode_target(data, "Describe"),
    ]
    .into_iter()
    .flatten()
    {
        assert!(inside(data, r.prefix) && inside(data, r.statement) && inside(data, r.tail));
        let mut out = BytesMut::new();
        r.encode_renamed(&mut out, b'B', b"sy_0");
        assert_eq!(views::header(&out).map(|(_, l)| l as usize + 1), Some(out.len()));
    }
    if let Ok(s) = ParameterStatus::decode(data) {
        assert!(inside(data, s.name) && inside(data, s.value));
    }
    let e = ErrorFields::decode(data);
    assert!(inside(data, e.code) && inside(data, e.message));
    let _ = views::notification_pid(data);
}

/// Startup packet bodies (after the length word).
pub fn startup_target(data: &[u8]) {
    let _ = parse_startup(data);
}

/// The relay framer: the same boundaries whether the stream comes whole or cut at
/// arbitrary points (the first byte of `data` seeds the cuts).
pub fn framer_target(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let scan = |cuts: &mut dyn FnMut(usize) -> usize| {
        let mut f = Framer::new(1 << 16);
        let mut seen = Vec::new();
        let mut pos = 0;
        while pos < stream.len() {
            let n = cuts(stream.len() - pos).max(1).min(stream.len() - pos);
            let r = f.scan::<FrameError>(&stream[pos..pos + n], |tag, len| {
                seen.push((tag, len));
                Ok(())
            });
            if r.is_err() {
                seen.push((0, u32::MAX));
                break;
            }
            pos += n;
        }
        (seen, f.at_boundary())
    };
    let whole = scan(&mut |rest| rest);
    let mut step = seed as usize % 7 + 1;
    let cut = scan(&mut |_| {
        step = step * 5 % 11 + 1;
        step
    });
    assert_eq!(whole, cut, "framing depends on how the stream was cut");
}

fn classifier() -> &'static Classifier {
    static K: OnceLock<Classifier> = OnceLock::new();
    K.get_or_init(|| Classifier::new(&[]))
}

/// Pieces of SQL for `classify_target` to build statements from.
const TOKENS: &[&str] = &[
    "SELECT ",
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET v = 1",
    "DELETE FROM t",
    "FROM t ",
    "WHERE ",
    "a ",
    "1 ",
    "'x' ",
    "E'\\'' ",
    "$$ x $$ ",
    "$1 ",
    "( ",
    ") ",
    ", ",
    "; ",
    "-- c\n",
    "/* c */ ",
    "\"q\" ",
    "FOR UPDATE ",
    "WITH w AS (",
    "BEGIN ",
    "COMMIT ",
    "READ ONLY ",
    "ISOLATION LEVEL SERIALIZABLE ",
    "SET ",
    "RESET ALL ",
    "LISTEN x ",
    "PREPARE p AS ",
    "DEALLOCATE ",
    "nextval('s') ",
    "now() ",
    "pg_stat_activity ",
    "CREATE DATABASE d TEMPLATE ",
    "DROP DATABASE ",
    "INTO TEMP x ",
    "1e-5 ",
    "B'01' ",
    "\u{e9} ",
    "= ",
];

/// The statement classifier and its cache key on arbitrary text (bytes in any encoding),
/// and on SQL-like text built from the bytes.
pub fn classify_target(data: &[u8]) {
    check_classification(data);
    let sql: String = data.iter().map(|&b| TOKENS[b as usize % TOKENS.len()]).collect();
    check_classification(sql.as_bytes());
}

fn check_classification(data: &[u8]) {
    let c = classifier().classify_bytes(data);
    if let Ok(sql) = std::str::from_utf8(data) {
        let mut key = String::new();
        blank_literals(sql, &mut key);
        // A statement that reads never pins or changes session state.
        if c.read_only {
            assert!(
                c.pins.is_none() && c.sets.is_empty() && c.frees_database.is_none(),
                "{sql:?}"
            );
        }
    } else {
        assert!(!c.read_only);
    }
}

/// SQL a client might send, to steer the machine into every branch.
const SQL: &[&str] = &[
    "SELECT 1",
    "SELECT * FROM t WHERE id = $1",
    "BEGIN",
    "BEGIN READ ONLY",
    "COMMIT",
    "ROLLBACK",
    "INSERT INTO t VALUES (1)",
    "SET TIME ZONE 'UTC'",
    "RESET ALL",
    "LISTEN jobs",
    "UNLISTEN *",
    "LISTEN a; UNLISTEN b",
    "DEALLOCATE s1",
    "DEALLOCATE ALL",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_advisory_unlock(1)",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "CLOSE c",
    "PREPARE q (int) AS SELECT $1",
    "EXECUTE q(1)",
    "PREPARE q2 AS SELECT 2; EXECUTE q2",
    "DEALLOCATE q",
    "DISCARD ALL",
    "CREATE DATABASE x TEMPLATE y",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SELECT 'caf\u{e9}'",
    "SELEC broken",
    "SHOW switchyard.causal_token",
    "SET switchyard.causal_token = 'sy1.1.1.1'",
    "RESET switchyard.causal_token",
];

const NAMES: &[&str] = &["", "s1", "s2"];

struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn pick<'t, T>(&mut self, table: &'t [T]) -> Option<&'t T> {
        Some(&table[self.byte()? as usize % table.len()])
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

fn msg(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn client_message(b: &mut Bytes, out: &mut BytesMut) -> Option<()> {
    let sql = *b.pick(SQL)?;
    let name = *b.pick(NAMES)?;
    let mut body = Vec::new();
    match b.byte()? % 11 {
        0 => {
            body.extend_from_slice(sql.as_bytes());
            body.push(0);
            msg(b'Q', &body, out);
        }
        1 => {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(sql.as_bytes());
            body.extend_from_slice(b"\0\0\0");
            msg(b'P', &body, out);
        }
        2 => {
            body.push(0);
            body.extend_from_slice(name.as_bytes());
            body.extend_from_slice(b"\0\0\0\0\0\0\0");
            msg(b'B', &body, out);
        }
        3 => {
            body.push(*b.pick(b"SP")?);
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            msg(b'D', &body, out);
        }
        4 => msg(b'E', b"\0\0\0\0\0", out),
        5 => msg(b'S', b"", out),
        6 => {
            body.push(*b.pick(b"SP")?);
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            msg(b'C', &body, out);
        }
        7 => msg(b'H', b"", out),
        8 => msg(b'X', b"", out),
        9 => {
            // Arbitrary bytes: a malformed message, or half of one.
            let n = b.byte()? as usize % 12;
            out.extend_from_slice(b.take(n));
        }
        _ => {
            // A Parse + Sync, answered without a server.
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(sql.as_bytes());
            body.extend_from_slice(b"\0\0\0");
            msg(b'P', &body, out);
            msg(b'S', b"", out);
        }
    }
    Some(())
}

fn server_message(b: &mut Bytes, out: &mut BytesMut, pid: i32) -> Option<()> {
    match b.byte()? % 14 {
        0 => msg(b'1', b"", out),
        1 => msg(b'2', b"", out),
        2 => msg(b'3', b"", out),
        3 => msg(b'C', b.pick(&[&b"SELECT 1\0"[..], b"ROLLBACK\0", b"SET\0"])?, out),
        4 => msg(b'D', b"\0\x01\0\0\0\x011", out),
        5 => msg(b'T', b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0", out),
        6 => {
            let e = *b.pick(&[
                &b"SERROR\0VERROR\0C22012\0Mdivision by zero\0\0"[..],
                b"SFATAL\0VFATAL\0C57P01\0Mterminating\0\0",
                b"SERROR\0VERROR\0C0A000\0Mcannot access unlogged\0\0",
                b"SERROR\0VERROR\0C25006\0Mread-only transaction\0\0",
            ])?;
            msg(b'E', e, out)
        }
        7 => msg(b'N', b"SWARNING\0VWARNING\0C57P01\0Mimmediate shutdown\0\0", out),
        8 => msg(
            b'S',
            b.pick(&[
                &b"TimeZone\0UTC\0"[..],
                b"client_encoding\0UTF8\0",
                b"application_name\0\xa4\0",
            ])?,
            out,
        ),
        9 => {
            let mut body = pid.to_be_bytes().to_vec();
            body.extend_from_slice(b"jobs\0\0");
            msg(b'A', &body, out)
        }
        10 | 11 => msg(b'Z', &[*b.pick(b"IITE")?], out),
        12 => msg(b'n', b"", out),
        _ => {
            let n = b.byte()? as usize % 12;
            out.extend_from_slice(b.take(n));
        }
    }
    Some(())
}

/// Whole messages only.
fn well_formed(mut b: &[u8]) -> bool {
    while !b.is_empty() {
        match views::header(b) {
            Some((_, len)) if len >= 4 && b.len() > len as usize => b = &b[len as usize + 1..],
            _ => return false,
        }
    }
    true
}

/// What the bytes exchanged on one server connection say of its state.
#[derive(Default)]
struct ConnModel {
    requests: usize,
    readies: usize,
    status: u8,
    unsynced: bool,
}

impl ConnModel {
    /// `pinned`: for good (LISTEN); `locked`: until the server says no lock is left.
    fn sent(&mut self, mut b: &[u8], pinned: &mut bool, locked: &mut bool) {
        while let Some((tag, len)) = views::header(b) {
            let m = &b[..len as usize + 1];
            match tag {
                b'S' | b'Q' | b'F' => {
                    self.requests += 1;
                    self.unsynced = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => self.unsynced = true,
                _ => {}
            }
            if matches!(tag, b'Q' | b'P') {
                // A LISTEN the server ran (an UNLISTEN pins nothing).
                *pinned |= (0..m.len().saturating_sub(5))
                    .any(|i| &m[i..i + 6] == b"LISTEN" && (i < 2 || &m[i - 2..i] != b"UN"));
                *locked |= m.windows(16).any(|w| w == b"pg_advisory_lock");
            }
            b = &b[m.len()..];
        }
    }

    fn received(&mut self, mut b: &[u8]) {
        while let Some((tag, len)) = views::header(b) {
            if len < 4 || b.len() < len as usize + 1 {
                return;
            }
            if tag == b'Z' {
                // The status is what the server said last, asked or not (a real server
                // never sends a ReadyForQuery nobody asked for).
                self.readies = (self.readies + 1).min(self.requests);
                self.status = b.get(5).copied().unwrap_or(0);
            }
            b = &b[len as usize + 1..];
        }
    }

    fn reusable(&self, pinned: bool) -> bool {
        self.requests == self.readies && self.status == b'I' && !self.unsynced && !pinned
    }
}

/// The transaction-pooling machine under an arbitrary sequence of client messages,
/// server messages, lost connections, evictions, failed connects and disconnects.
pub fn machine_target(data: &[u8]) {
    let mut b = Bytes { data };
    let Some(flags) = b.byte() else { return };
    let mut m = Machine::new(
        Config {
            cluster: "main".into(),
            read_only_endpoint: flags & 1 != 0,
            split: flags & 2 != 0,
            max_message: 1 << 10,
            client_pid: 777,
            client_key: 1,
            digests: true,
            traces: true,
        },
        vec![("application_name".into(), "fuzz".into())],
        classifier(),
        // Greeted from a remembered greeting, or by a server.
        (flags & 4 != 0).then_some(&[][..]),
    );
    let mut conn: Option<ConnState> = None;
    // Everything the client is sent, walked as one stream (a large message may be passed
    // on in parts).
    let mut client_stream = Framer::new(u32::MAX);
    let mut model = ConnModel::default();
    let mut pinned = false;
    let mut locked = false;
    let mut next_pid = 100;
    let mut cin = BytesMut::new();
    let mut sin = BytesMut::new();
    let mut ended = false;
    let nodes: [Arc<str>; 3] = ["p".into(), "s1".into(), "s2".into()];
    let mut steps = 0;
    // FUZZ_TRACE=1 prints every event: to read a failing input.
    let trace = std::env::var_os("FUZZ_TRACE").is_some();
    while let Some(op) = b.byte() {
        steps += 1;
        if steps > 2000 {
            break;
        }
        // Perform the machine's actions as the driver would.
        while let Some(a) = m.next_action() {
            assert!(!ended, "an action after the session ended: {a:?}");
            if trace {
                eprintln!("action: {a:?}");
            }
            match a {
                Action::Acquire { read, .. } => {
                    assert!(conn.is_none(), "acquire while holding a connection");
                    if b.byte().is_some_and(|x| x % 16 == 0) {
                        m.on_acquire_failed(crate::error::Error::no_route("fuzz"));
                        continue;
                    }
                    let primary = !read || b.byte().is_some_and(|x| x % 2 == 0);
                    let mut c = ConnState {
                        pid: next_pid,
                        ..ConnState::default()
                    };
                    next_pid += 1;
                    sin.clear();
                    let node = if primary { &nodes[0] } else { &nodes[1] };
                    model = ConnModel::default();
                    m.on_acquired(node, primary, &mut c);
                    conn = Some(c);
                }
                Action::Release { reuse } => {
                    assert!(conn.take().is_some(), "release without a connection");
                    if reuse {
                        model.sent(&m.to_server, &mut pinned, &mut locked);
                        assert!(model.reusable(pinned || locked), "a connection offered for reuse in a state that forbids it: requests {} readies {} status {} unsynced {} pinned {}", model.requests, model.readies, model.status as char, model.unsynced, pinned);
                    }
                }
                Action::CloseIdle(_) => {}
                Action::Listen(_) => m.on_listened(if b.byte().is_some_and(|x| x % 4 == 0) {
                    Err("fuzz".into())
                } else {
                    Ok(())
                }),
                // The server says none is left (the model forgets its locks) or some are.
                Action::CountPins => {
                    assert!(conn.is_some(), "a question for a server while none is held");
                    let none = b.byte().is_some_and(|x| x % 2 == 0);
                    locked &= !none;
                    m.on_pins_counted(Some(if none { 0 } else { 1 }));
                }
                Action::Causal(_) => {
                    let reply = match b.byte().unwrap_or(0) % 3 {
                        0 => Ok(crate::pg::txn::machine::CausalReply::Show("sy1.1.1.1".into())),
                        1 => Ok(crate::pg::txn::machine::CausalReply::Set),
                        _ => Err(crate::error::Error::invalid_parameter("fuzz")),
                    };
                    m.on_causal_reply(reply);
                }
                Action::End(e) => {
                    ended = true;
                    // The driver writes a goodbye only at a message boundary.
                    if e.is_some() && m.client_at_boundary() {
                        assert!(
                            client_stream.scan::<FrameError>(&m.to_client, |_, _| Ok(())).is_ok()
                                && client_stream.at_boundary(),
                            "a goodbye would be spliced into a message"
                        );
                    }
                }
            }
        }
        if ended {
            break;
        }
        assert!(
            m.to_server.is_empty() || conn.is_some(),
            "bytes for a server while none is held"
        );
        assert!(well_formed(&m.to_server), "to_server is not whole messages");
        model.sent(&m.to_server, &mut pinned, &mut locked);
        if trace && !m.to_server.is_empty() {
            eprintln!("to server: {:?}", String::from_utf8_lossy(&m.to_server));
        }
        m.to_server.clear();
        match op % 8 {
            0..=2 => {
                if client_message(&mut b, &mut cin).is_none() {
                    break;
                }
                if trace {
                    eprintln!("client in: {:?}", String::from_utf8_lossy(&cin));
                }
                m.on_client_input(&mut cin, conn.as_mut());
            }
            3 | 4 => {
                let Some(c) = conn.as_mut() else { continue };
                if server_message(&mut b, &mut sin, c.pid).is_none() {
                    break;
                }
                let before = sin.clone();
                if trace {
                    eprintln!("server in: {:?}", String::from_utf8_lossy(&sin));
                }
                m.on_server_input(&mut sin, c);
                model.received(&before[..before.len() - sin.len()]);
            }
            5 => {
                let scanned = client_stream.scan::<FrameError>(&m.to_client, |_, _| Ok(()));
                assert!(
                    scanned.is_ok(),
                    "the client's stream is not a sequence of messages: {scanned:?} in {:?}",
                    &m.to_client[..]
                );
                m.to_client.clear();
                m.flushed_to_client();
            }
            6 => match b.byte().unwrap_or(0) % 3 {
                0 => m.on_server_lost("fuzz: reset"),
                1 => m.on_evicted("fuzz: node down", false),
                _ => m.on_client_closed(),
            },
            _ => m.on_client_input(&mut cin, conn.as_mut()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// A short run of every target on seeded random inputs (the long runs: `make fuzz`).
    #[test]
    fn every_target_survives_a_short_run() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for target in TARGETS {
            for _ in 0..3000 {
                let len = rng.random_range(0..256);
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                run(target, &data);
            }
        }
    }
}
