//! Where the server's answers to a session's commands end, and whether the session is
//! inside a transaction: what a relay needs to hold or move a session only between
//! transactions (a switchover), while it passes bytes on as they come.
//!
//! Written by hand because no crate follows a MySQL response stream incrementally
//! without buffering whole packets: `mysql_common` parses complete packets, and the
//! relay never holds one (a row may be 16 MiB). `Answers` reads each server packet's
//! header and at most the first `PREFIX` bytes of its payload.
//!
//! The shapes followed (MySQL client/server protocol, `CLIENT_PROTOCOL_41`):
//! - OK (`0x00`), ERR (`0xFF`), or EOF (`0xFE`, under 9 bytes) ends an answer;
//! - a result set: a column count, that many column definitions, an EOF (unless
//!   `CLIENT_DEPRECATE_EOF`), rows, then EOF (or an OK with header `0xFE` and less than
//!   `0xFFFFFF` bytes, under `CLIENT_DEPRECATE_EOF`); `SERVER_MORE_RESULTS_EXISTS` in
//!   the final status means another result follows; an ERR may end the rows;
//! - `LOCAL INFILE` (`0xFB`): the client sends a file, then the server's OK or ERR;
//! - `COM_STMT_PREPARE`: an OK with the numbers of parameters and columns, then their
//!   definitions (each group followed by an EOF unless `CLIENT_DEPRECATE_EOF`);
//! - a cursor opened by `COM_STMT_EXECUTE` (`SERVER_STATUS_CURSOR_EXISTS`): the column
//!   definitions only; rows come with `COM_STMT_FETCH`;
//! - `COM_STMT_CLOSE`, `COM_STMT_SEND_LONG_DATA`, `COM_QUIT`: no answer.
//!
//! Anything else (a replication stream, an unknown command) makes the session's state
//! unknown from then on (`lost`): such a session is never moved.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::obs::digest::{Digest, Finished};

use super::protocol::MAX_CHUNK;

/// Payload bytes of a packet looked at: header byte, two length-encoded integers and
/// the status flags of an OK packet.
const PREFIX: usize = 24;

/// With `track`: the payload bytes looked at of a packet that may be an answer's OK,
/// whose session-state part names the GTID of a commit. (An OK is small; one larger
/// than this is read like any packet, and its GTID is not learned: see `untracked_ok`.)
const TRACK_PREFIX: usize = 512;

pub(super) const SERVER_SESSION_STATE_CHANGED: u16 = 0x4000;
/// Session-state entry types (MySQL's `enum_session_state_type`).
const SESSION_TRACK_SYSTEM_VARIABLES: u8 = 0;
const SESSION_TRACK_GTIDS: u8 = 3;

const SERVER_STATUS_IN_TRANS: u16 = 0x0001;
pub(super) const SERVER_STATUS_AUTOCOMMIT: u16 = 0x0002;
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;
pub(super) const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
const SERVER_STATUS_IN_TRANS_READONLY: u16 = 0x2000;

/// What kind of answer a command gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// OK, ERR, EOF, or result sets.
    Response,
    /// `COM_STMT_PREPARE`'s answer.
    Prepare,
    /// `COM_STMT_FETCH`: rows and an EOF (or ERR).
    Rows,
    /// `COM_FIELD_LIST`: column definitions until an EOF (or ERR).
    Fields,
    /// `COM_STATISTICS`: one text packet.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first packet of an answer (or of the next result set).
    First,
    /// `n` more column definitions, then (`eof`) an EOF.
    Columns { n: u64, eof: bool },
    /// Rows until the terminator.
    Rows,
    /// The OK or ERR after a `LOCAL INFILE` file.
    AfterFile,
    /// `n` more packets not looked at (a prepare's definitions), then the answer ends.
    Skip(u64),
    /// Column definitions until an EOF.
    FieldDefs,
}

/// The answers a session is owed, followed packet by packet.
#[derive(Debug)]
pub struct Answers {
    deprecate_eof: bool,
    /// Commands sent whose answer has not started.
    queue: VecDeque<Expect>,
    /// The answer being read, and where in it.
    current: Option<(Expect, State)>,
    /// The packet being read: payload bytes still to come, and the prefix seen so far.
    remaining: usize,
    header: [u8; 4],
    header_have: usize,
    /// (In an Option only so that `packet` can borrow it while `self` is borrowed
    /// mutably: taken out and put back, never reallocated.)
    prefix: Option<Box<[u8; TRACK_PREFIX]>>,
    prefix_have: usize,
    prefix_want: usize,
    /// The previous packet was a full 16 MiB chunk: this one continues it.
    continued: bool,
    /// Sequence id of the server's last packet.
    last_seq: u8,
    /// The last status flags said a transaction is open.
    pub in_transaction: bool,
    /// Commands seen (progress, for the client timeouts).
    pub commands: u64,
    /// Something not followed happened: the session's state is unknown for good.
    pub lost: bool,
    /// The status flags of the last answer's end.
    pub status: u16,
    /// Read whole the OK packets that end answers, for the session state the server
    /// reports there (`CLIENT_SESSION_TRACK`): `gtid`.
    pub track: bool,
    /// The GTID of the last commit the server reported (`last_gtid` on MariaDB, the
    /// GTIDs tracker on MySQL), until the relay takes it.
    pub gtid: Option<String>,
    /// Answers that ended with an OK packet (header 0x00) since the relay last looked:
    /// commands that may have written.
    pub oks: u32,
    /// Of those, OKs too large to be read whole: their GTID, if any, is not known.
    pub untracked_ok: bool,
    /// Transaction pooling: collect the session's changes the server reports
    /// (`vars`, `schema`, `unexplained_change`), until the relay takes them.
    pub collect_state: bool,
    /// Session variables set (name, new value), in order.
    pub vars: Vec<(String, String)>,
    /// The current database, when it changed.
    pub schema: Option<String>,
    /// The server said the session's state changed, naming no variable or database:
    /// a user variable, a temporary table, a prepared statement... (the session must
    /// keep its connection).
    pub unexplained_change: bool,
    /// Follow statements for the query digests: an entry per command owed an answer
    /// (`stmts`, beside `queue`), finished when its answer ends (`finished`). Set once,
    /// before the first command.
    pub statements: bool,
    stmts: VecDeque<Statement>,
    /// Statements prepared on this connection (`COM_STMT_PREPARE`'s id) → digest.
    pub prepared: HashMap<u32, Arc<Digest>>,
    /// Statements answered since the relay last took them.
    pub finished: Vec<Finished>,
    /// SQLSTATE classes of the ERRs the server answered with since the relay last took
    /// them (for `/metrics`).
    pub errors: Vec<[u8; 2]>,
}

/// A command owed an answer, for the query digests.
#[derive(Debug, Default)]
struct Statement {
    digest: Option<Arc<Digest>>,
    /// A `COM_STMT_PREPARE`: its answer names the statement (`stmt_id`), not a run.
    prepare: bool,
    stmt_id: Option<u32>,
    sent: Option<Instant>,
    rows: u64,
    failed: bool,
    trace: Option<crate::obs::trace::TraceParent>,
}

/// Statements a connection may have prepared at once in the digests' map (a client
/// that never closes them cannot grow it further; their runs then go unrecorded).
const MAX_PREPARED: usize = 1024;

impl Answers {
    pub fn new(deprecate_eof: bool) -> Answers {
        Answers {
            deprecate_eof,
            queue: VecDeque::new(),
            current: None,
            remaining: 0,
            header: [0; 4],
            header_have: 0,
            prefix: Some(Box::new([0; TRACK_PREFIX])),
            prefix_have: 0,
            prefix_want: 0,
            continued: false,
            last_seq: 0,
            in_transaction: false,
            commands: 0,
            lost: false,
            status: 0,
            track: false,
            gtid: None,
            oks: 0,
            untracked_ok: false,
            collect_state: false,
            vars: Vec::new(),
            schema: None,
            unexplained_change: false,
            statements: false,
            stmts: VecDeque::new(),
            prepared: HashMap::new(),
            finished: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// What the command just passed to `command` runs (`digest`; a prepare names a
    /// statement instead), written to the server at `sent`.
    pub fn describe_last(&mut self, digest: Option<Arc<Digest>>, prepare: bool, sent: Instant) {
        if let Some(s) = self.stmts.back_mut() {
            s.digest = digest;
            s.prepare = prepare;
            s.sent = Some(sent);
        }
    }

    /// The command just passed to `command` carries the application's trace context.
    pub fn trace_last(&mut self, trace: Option<crate::obs::trace::TraceParent>) {
        if let Some(s) = self.stmts.back_mut() {
            s.trace = trace;
        }
    }

    /// An answer ended: its statement is finished (or its prepared statement known).
    fn answer_done(&mut self) {
        let Some(s) = self.stmts.pop_front() else { return };
        match (s.prepare, s.digest) {
            (true, Some(d)) => {
                if let (Some(id), false) = (s.stmt_id, s.failed) {
                    if self.prepared.len() >= MAX_PREPARED {
                        self.prepared.clear();
                    }
                    self.prepared.insert(id, d);
                }
            }
            (false, Some(digest)) => self.finished.push(Finished {
                digest,
                sent: s.sent,
                rows: s.rows,
                failed: s.failed,
                trace: s.trace,
            }),
            _ => {}
        }
    }

    /// Every answer owed has been read whole.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.current.is_none() && self.remaining == 0 && self.header_have == 0
    }

    /// Where a packet of the proxy's own may go into an answer that is cut short: the
    /// sequence id after the server's last packet, when the stream is between packets.
    pub fn next_seq_mid_answer(&self) -> Option<u8> {
        let between = self.remaining == 0 && self.header_have == 0 && !self.continued;
        (between && self.current.is_some()).then(|| self.last_seq.wrapping_add(1))
    }

    /// Between transactions with nothing owed: a session the proxy may hold or move.
    pub fn at_rest(&self) -> bool {
        self.idle() && !self.in_transaction && !self.lost
    }

    /// The client sent a command (its first payload byte).
    pub fn command(&mut self, cmd: u8) {
        self.commands += 1;
        let expect = match cmd {
            // COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE: no answer.
            0x01 | 0x18 | 0x19 => return,
            0x16 => Expect::Prepare,
            0x1c => Expect::Rows,
            0x04 => Expect::Fields,
            0x09 => Expect::Text,
            // COM_INIT_DB, COM_QUERY, COM_CREATE_DB, COM_DROP_DB, COM_REFRESH,
            // COM_SHUTDOWN, COM_PROCESS_INFO, COM_PROCESS_KILL, COM_DEBUG, COM_PING,
            // COM_CHANGE_USER, COM_STMT_EXECUTE, COM_STMT_RESET, COM_SET_OPTION,
            // COM_RESET_CONNECTION, MariaDB's COM_STMT_BULK_EXECUTE.
            0x02 | 0x03 | 0x05..=0x08 | 0x0a | 0x0c..=0x0e | 0x11 | 0x17 | 0x1a | 0x1b | 0x1f | 0xfa => {
                Expect::Response
            }
            // A replication stream, or something new: not followed.
            _ => {
                self.lost = true;
                Expect::Response
            }
        };
        self.queue.push_back(expect);
        if self.statements {
            self.stmts.push_back(Statement::default());
        }
    }

    /// Server bytes, as they pass.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let between = self.remaining == 0 && self.prefix_want == self.prefix_have;
            if between && self.header_have == 0 && !self.continued && matches!(self.current, Some((_, State::Rows))) {
                // Rows, the bulk of most answers: each counted and passed over, in one
                // loop, up to whatever is not a plain row (the end of the rows, an ERR,
                // an empty or a 16 MiB packet: `packet` looks at those).
                let (mut rows, mut last_seq) = (0, self.last_seq);
                while let [l0, l1, l2, seq, head, ..] = *data {
                    let len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
                    if len == 0 || len == MAX_CHUNK || head >= 0xFE {
                        break;
                    }
                    rows += 1;
                    last_seq = seq;
                    match data.get(4 + len..) {
                        Some(rest) => data = rest,
                        None => {
                            // The row goes on in the next read.
                            self.remaining = 4 + len - data.len();
                            data = &[];
                        }
                    }
                }
                if rows > 0 {
                    self.last_seq = last_seq;
                    if self.statements {
                        if let Some(s) = self.stmts.front_mut() {
                            s.rows += rows;
                        }
                    }
                    continue;
                }
            }
            if between && self.header_have == 0 && data.len() >= 4 {
                // A packet whose header and looked-at bytes are all in `data` (the usual
                // case: a read holds many small rows) is looked at in place, without
                // copying its first bytes aside.
                let len = u32::from_le_bytes([data[0], data[1], data[2], 0]) as usize;
                let want = if self.continued {
                    0
                } else {
                    len.min(self.prefix_limit(len))
                };
                if data.len() >= 4 + want {
                    self.last_seq = data[3];
                    let continuation = self.continued;
                    self.continued = len == MAX_CHUNK;
                    if !continuation {
                        self.packet(len, &data[4..4 + want]);
                    }
                    let took = (4 + len).min(data.len());
                    self.remaining = 4 + len - took;
                    self.prefix_have = 0;
                    self.prefix_want = 0;
                    data = &data[took..];
                    continue;
                }
            }
            if between && self.header_have < 4 {
                // A packet header.
                let n = (4 - self.header_have).min(data.len());
                self.header[self.header_have..self.header_have + n].copy_from_slice(&data[..n]);
                self.header_have += n;
                data = &data[n..];
                if self.header_have < 4 {
                    return;
                }
                let len = u32::from_le_bytes([self.header[0], self.header[1], self.header[2], 0]) as usize;
                self.last_seq = self.header[3];
                self.header_have = 0;
                let continuation = self.continued;
                self.continued = len == MAX_CHUNK;
                self.remaining = len;
                self.prefix_have = 0;
                self.prefix_want = if continuation {
                    0
                } else {
                    len.min(self.prefix_limit(len))
                };
                if !continuation && len == 0 {
                    self.packet(0, &[]);
                }
                continue;
            }
            if self.prefix_have < self.prefix_want {
                let n = (self.prefix_want - self.prefix_have).min(data.len());
                self.prefix.as_mut().expect("the prefix buffer is here")[self.prefix_have..self.prefix_have + n]
                    .copy_from_slice(&data[..n]);
                self.prefix_have += n;
                self.remaining -= n;
                data = &data[n..];
                if self.prefix_have == self.prefix_want {
                    let len = self.remaining + self.prefix_have;
                    let prefix = self.prefix.take().expect("the prefix buffer is put back");
                    self.packet(len, &prefix[..self.prefix_want]);
                    self.prefix = Some(prefix);
                }
                continue;
            }
            let n = self.remaining.min(data.len());
            self.remaining -= n;
            data = &data[n..];
        }
    }

    /// Payload bytes to look at of a packet `len` bytes long that starts now.
    fn prefix_limit(&self, len: usize) -> usize {
        // With `track`, also a small packet in rows: the OK (0xFE) that ends them under
        // CLIENT_DEPRECATE_EOF may name a commit (a write answered with rows).
        if self.track && (self.at_answer_start() || len <= TRACK_PREFIX) {
            TRACK_PREFIX
        } else {
            PREFIX
        }
    }

    /// One packet of the server's: its payload length and its first bytes.
    fn packet(&mut self, len: usize, p: &[u8]) {
        // A row, the bulk of most answers: counted, nothing more. (0xFE may end the
        // rows and 0xFF is an ERR: those, and an empty packet, take the long way.)
        if let (Some((_, State::Rows)), Some(&head)) = (self.current, p.first()) {
            if head < 0xFE {
                if self.statements {
                    if let Some(s) = self.stmts.front_mut() {
                        s.rows += 1;
                    }
                }
                return;
            }
        }
        let (expect, state) = match self.current {
            Some(c) => c,
            None => match self.queue.pop_front() {
                Some(e) => (e, State::First),
                None => {
                    // Unasked: a server's goodbye before it closes, or a protocol the
                    // proxy does not follow.
                    self.lost = true;
                    return;
                }
            },
        };
        let head = p.first().copied();
        if self.statements {
            if let Some(s) = self.stmts.front_mut() {
                let err = head == Some(0xFF) && !matches!(state, State::Columns { n: 1.., .. } | State::Skip(_));
                s.failed |= err;
                match (expect, state, head) {
                    (Expect::Response, State::First | State::AfterFile, Some(0x00)) => {
                        s.rows += p.get(1..).and_then(lenenc).map_or(0, |(n, _)| n);
                    }
                    (Expect::Prepare, State::First, Some(0x00)) if p.len() >= 5 => {
                        s.stmt_id = Some(u32::from_le_bytes([p[1], p[2], p[3], p[4]]));
                    }
                    _ => {}
                }
            }
        }
        let eof = head == Some(0xFE) && len < 9;
        // The end of rows: EOF, or under CLIENT_DEPRECATE_EOF an OK with header 0xFE
        // (a row starting with 0xFE is at least 2^24 bytes long).
        let rows_end = head == Some(0xFE) && if self.deprecate_eof { len < MAX_CHUNK } else { len < 9 };
        let next = match (expect, state) {
            // An ERR ends any answer, also right after the last column definition (a
            // query killed before its first row). Only inside definitions is 0xFF not an
            // ERR (they never start with it; the guard is for a length-prefixed field).
            _ if head == Some(0xFF) && !matches!(state, State::Columns { n: 1.., .. } | State::Skip(_)) => {
                // 0xFF, the error number (2 bytes), '#' and the SQLSTATE (protocol 4.1).
                // (Bounded: a reader that never takes them costs nothing more.)
                if let (Some(&[b'#', a, b]), true) = (p.get(3..6), self.errors.len() < 64) {
                    self.errors.push([a, b]);
                }
                None
            }
            (Expect::Text, _) => None,
            (_, State::Skip(n)) => (n > 1).then_some(State::Skip(n - 1)),
            (Expect::Response, State::First | State::AfterFile) => match head {
                Some(0x00) => {
                    self.oks = self.oks.saturating_add(1);
                    if self.track {
                        if p.len() == len {
                            self.session_state(p);
                        } else {
                            self.untracked_ok = true;
                        }
                    }
                    self.ok(p, 1).then_some(State::First)
                }
                Some(0xFE) if eof => self.eof_status(p).then_some(State::First),
                Some(0xFB) if state == State::First => Some(State::AfterFile),
                _ if state == State::AfterFile => {
                    self.lost = true;
                    None
                }
                _ => match lenenc(p) {
                    Some((n, _)) => Some(State::Columns {
                        n,
                        eof: !self.deprecate_eof,
                    }),
                    None => {
                        self.lost = true;
                        None
                    }
                },
            },
            (_, State::Columns { n, eof }) => {
                if n > 0 {
                    Some(State::Columns { n: n - 1, eof })
                } else if eof {
                    // The EOF after the column definitions: a cursor ends the answer.
                    let status = status_of_eof(p).unwrap_or(0);
                    if status & SERVER_STATUS_CURSOR_EXISTS != 0 {
                        self.set_status(status);
                        None
                    } else {
                        Some(State::Rows)
                    }
                } else {
                    // Deprecated EOF: this packet is already a row or the terminator.
                    return self.rows_packet(expect, rows_end, p);
                }
            }
            (_, State::Rows) | (Expect::Rows, State::First) => return self.rows_packet(expect, rows_end, p),
            (Expect::Prepare, State::First) => {
                if head != Some(0x00) || p.len() < 9 {
                    self.lost = true;
                    None
                } else {
                    let columns = u16::from_le_bytes([p[5], p[6]]) as u64;
                    let params = u16::from_le_bytes([p[7], p[8]]) as u64;
                    // Each group of definitions, then an EOF unless deprecated.
                    let group = |n: u64| if n > 0 && !self.deprecate_eof { n + 1 } else { n };
                    let n = group(params) + group(columns);
                    (n > 0).then_some(State::Skip(n))
                }
            }
            (Expect::Fields, State::First) | (_, State::FieldDefs) => (!eof).then_some(State::FieldDefs),
            _ => {
                self.lost = true;
                None
            }
        };
        self.current = next.map(|s| (expect, s));
        if self.current.is_none() && self.statements {
            self.answer_done();
        }
    }

    fn rows_packet(&mut self, expect: Expect, rows_end: bool, p: &[u8]) {
        if self.statements && !rows_end {
            if let Some(s) = self.stmts.front_mut() {
                s.rows += 1;
            }
        }
        self.current = if rows_end {
            let status = if self.deprecate_eof {
                if self.track {
                    self.session_state(p);
                }
                ok_status(p, 1)
            } else {
                status_of_eof(p)
            };
            let more = status.is_some_and(|s| s & SERVER_MORE_RESULTS_EXISTS != 0);
            self.set_status(status.unwrap_or(0));
            more.then_some((expect, State::First))
        } else {
            Some((expect, State::Rows))
        };
        if self.current.is_none() && self.statements {
            self.answer_done();
        }
    }

    /// An OK packet (status flags after two length-encoded integers from `at`): true
    /// when another result follows.
    fn ok(&mut self, p: &[u8], at: usize) -> bool {
        match ok_status(p, at) {
            Some(s) => {
                self.set_status(s);
                s & SERVER_MORE_RESULTS_EXISTS != 0
            }
            None => {
                self.lost = true;
                false
            }
        }
    }

    fn eof_status(&mut self, p: &[u8]) -> bool {
        let s = status_of_eof(p).unwrap_or(0);
        self.set_status(s);
        s & SERVER_MORE_RESULTS_EXISTS != 0
    }

    /// The next packet may start an answer (or the next result of one).
    fn at_answer_start(&self) -> bool {
        match self.current {
            None => true,
            Some((_, state)) => matches!(state, State::First | State::AfterFile),
        }
    }

    /// The session state an OK packet reports (the whole payload `p`): the GTID of a
    /// commit, if it names one.
    fn session_state(&mut self, p: &[u8]) {
        let Some(state) = ok_state(p) else { return };
        if let Some(gtid) = state.gtid {
            self.gtid = Some(gtid);
        }
        if self.collect_state {
            let explained = !state.vars.is_empty() || state.schema.is_some();
            self.unexplained_change |= state.changed && !explained;
            self.vars.extend(state.vars);
            if state.schema.is_some() {
                self.schema = state.schema;
            }
        }
    }

    fn set_status(&mut self, s: u16) {
        self.status = s;
        self.in_transaction = s & (SERVER_STATUS_IN_TRANS | SERVER_STATUS_IN_TRANS_READONLY) != 0;
    }
}

/// A length-encoded integer at the start of `p`: its value and size.
fn lenenc(p: &[u8]) -> Option<(u64, usize)> {
    let first = *p.first()?;
    let (size, v) = match first {
        0..=0xFA => return Some((first as u64, 1)),
        0xFC => (2, 0),
        0xFD => (3, 0),
        0xFE => (8, 0),
        _ => return None,
    };
    let bytes = p.get(1..1 + size)?;
    let mut value = v;
    for (i, b) in bytes.iter().enumerate() {
        value |= (*b as u64) << (8 * i);
    }
    Some((value, 1 + size))
}

/// An OK packet's status flags: after the header and two length-encoded integers.
fn ok_status(p: &[u8], at: usize) -> Option<u16> {
    let (_, a) = lenenc(p.get(at..)?)?;
    let (_, b) = lenenc(p.get(at + a..)?)?;
    let i = at + a + b;
    Some(u16::from_le_bytes([*p.get(i)?, *p.get(i + 1)?]))
}

/// A length-encoded string at `*at` in `p`, moving past it.
fn lenenc_str<'a>(p: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let (n, size) = lenenc(p.get(*at..)?)?;
    let start = *at + size;
    let end = start.checked_add(usize::try_from(n).ok()?)?;
    let s = p.get(start..end)?;
    *at = end;
    Some(s)
}

/// The GTID an OK packet (whole payload, header 0x00) reports in its session state:
/// MariaDB's tracked `last_gtid` variable, or MySQL's GTIDs entry. Layout
/// (`CLIENT_SESSION_TRACK`): header, affected rows, last insert id, status (2),
/// warnings (2), info (length-encoded), then, with `SERVER_SESSION_STATE_CHANGED`, the
/// state as a length-encoded block of entries: type (1), data (length-encoded).
#[cfg(test)]
pub fn ok_gtid(p: &[u8]) -> Option<String> {
    ok_state(p).and_then(|s| s.gtid)
}

/// The session state an OK packet reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionState {
    /// The GTID of a commit.
    pub gtid: Option<String>,
    /// System variables set, with their new values (`last_gtid` not among them).
    pub vars: Vec<(String, String)>,
    /// The new current database.
    pub schema: Option<String>,
    /// The state-change tracker said something changed.
    pub changed: bool,
}

/// Session-state entry types (MySQL's `enum_session_state_type`).
const SESSION_TRACK_SCHEMA: u8 = 1;
const SESSION_TRACK_STATE_CHANGE: u8 = 2;

/// The session state in an OK packet (whole payload; header 0x00 or 0xFE), if it has
/// any (see `ok_gtid` for the layout).
pub fn ok_state(p: &[u8]) -> Option<SessionState> {
    let mut at = 1;
    let (_, a) = lenenc(p.get(at..)?)?;
    at += a;
    let (_, b) = lenenc(p.get(at..)?)?;
    at += b;
    let status = u16::from_le_bytes([*p.get(at)?, *p.get(at + 1)?]);
    at += 4;
    if status & SERVER_SESSION_STATE_CHANGED == 0 || at >= p.len() {
        return None;
    }
    lenenc_str(p, &mut at)?; // info
    let block = lenenc_str(p, &mut at)?;
    let mut state = SessionState::default();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut i = 0;
    while i < block.len() {
        let kind = block[i];
        i += 1;
        let data = lenenc_str(block, &mut i)?;
        match kind {
            SESSION_TRACK_SYSTEM_VARIABLES => {
                let mut j = 0;
                let name = lenenc_str(data, &mut j)?;
                let value = lenenc_str(data, &mut j)?;
                if name.eq_ignore_ascii_case(b"last_gtid") {
                    if !value.is_empty() {
                        state.gtid = Some(text(value));
                    }
                } else {
                    state.vars.push((text(name), text(value)));
                }
            }
            SESSION_TRACK_SCHEMA => {
                let mut j = 0;
                state.schema = Some(text(lenenc_str(data, &mut j)?));
            }
            SESSION_TRACK_STATE_CHANGE => {
                // The data is "1" (MariaDB and MySQL send it bare, not length-encoded
                // again as the documentation's layout suggests; both are read).
                let mut j = 0;
                state.changed |= data == b"1" || lenenc_str(data, &mut j) == Some(b"1");
            }
            SESSION_TRACK_GTIDS => {
                // Encoding specification (0: the GTID set as text), then the set.
                let mut j = 1;
                let set = lenenc_str(data, &mut j)?;
                if !set.is_empty() {
                    state.gtid = Some(text(set));
                }
            }
            _ => {}
        }
    }
    Some(state)
}

/// An OK packet's status flags (whole payload, header included).
pub fn status_of_ok(p: &[u8]) -> Option<u16> {
    ok_status(p, 1)
}

/// An EOF packet's status flags (header, warnings, status).
fn status_of_eof(p: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes([*p.get(3)?, *p.get(4)?]))
}

#[cfg(test)]
#[path = "answers_tests.rs"]
mod tests;
