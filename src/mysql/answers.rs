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

use std::collections::VecDeque;

use super::protocol::MAX_CHUNK;

/// Payload bytes of a packet looked at: header byte, two length-encoded integers and
/// the status flags of an OK packet.
const PREFIX: usize = 24;

const SERVER_STATUS_IN_TRANS: u16 = 0x0001;
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
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
    prefix: [u8; PREFIX],
    prefix_have: usize,
    prefix_want: usize,
    /// The previous packet was a full 16 MiB chunk: this one continues it.
    continued: bool,
    /// Sequence id of the server's last packet.
    last_seq: u8,
    /// The last status flags said a transaction is open.
    pub in_transaction: bool,
    /// Something not followed happened: the session's state is unknown for good.
    pub lost: bool,
}

impl Answers {
    pub fn new(deprecate_eof: bool) -> Answers {
        Answers {
            deprecate_eof,
            queue: VecDeque::new(),
            current: None,
            remaining: 0,
            header: [0; 4],
            header_have: 0,
            prefix: [0; PREFIX],
            prefix_have: 0,
            prefix_want: 0,
            continued: false,
            last_seq: 0,
            in_transaction: false,
            lost: false,
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
    }

    /// Server bytes, as they pass.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining == 0 && self.header_have < 4 && self.prefix_want == self.prefix_have {
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
                self.prefix_want = if continuation { 0 } else { len.min(PREFIX) };
                if !continuation && len == 0 {
                    self.packet(0, &[]);
                }
                continue;
            }
            if self.prefix_have < self.prefix_want {
                let n = (self.prefix_want - self.prefix_have).min(data.len());
                self.prefix[self.prefix_have..self.prefix_have + n].copy_from_slice(&data[..n]);
                self.prefix_have += n;
                self.remaining -= n;
                data = &data[n..];
                if self.prefix_have == self.prefix_want {
                    let len = self.remaining + self.prefix_have;
                    let prefix = self.prefix;
                    self.packet(len, &prefix[..self.prefix_want]);
                }
                continue;
            }
            let n = self.remaining.min(data.len());
            self.remaining -= n;
            data = &data[n..];
        }
    }

    /// One packet of the server's: its payload length and its first bytes.
    fn packet(&mut self, len: usize, p: &[u8]) {
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
        let eof = head == Some(0xFE) && len < 9;
        // The end of rows: EOF, or under CLIENT_DEPRECATE_EOF an OK with header 0xFE
        // (a row starting with 0xFE is at least 2^24 bytes long).
        let rows_end = head == Some(0xFE) && if self.deprecate_eof { len < MAX_CHUNK } else { len < 9 };
        let next = match (expect, state) {
            // An ERR ends any answer (definitions never start with 0xFF).
            _ if head == Some(0xFF) && !matches!(state, State::Columns { .. } | State::Skip(_)) => None,
            (Expect::Text, _) => None,
            (_, State::Skip(n)) => (n > 1).then_some(State::Skip(n - 1)),
            (Expect::Response, State::First | State::AfterFile) => match head {
                Some(0x00) => self.ok(p, 1).then_some(State::First),
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
    }

    fn rows_packet(&mut self, expect: Expect, rows_end: bool, p: &[u8]) {
        self.current = if rows_end {
            let status = if self.deprecate_eof {
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

    fn set_status(&mut self, s: u16) {
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

/// An EOF packet's status flags (header, warnings, status).
fn status_of_eof(p: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes([*p.get(3)?, *p.get(4)?]))
}

#[cfg(test)]
#[path = "answers_tests.rs"]
mod tests;
