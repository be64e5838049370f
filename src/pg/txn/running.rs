//! Statements sent to the held server and not yet answered, for the query digests
//! (`obs::digest`): which statement each answer belongs to, how many rows it returned or
//! changed, whether it failed. The driver stamps when they were sent (`sent`) and
//! records what finished (`finished`) with the connection's node; no clock here.
//!
//! A simple Query is one entry (its statements together, as the client sent them),
//! finished by its ReadyForQuery; an Execute is one, finished by CommandComplete,
//! EmptyQueryResponse, PortalSuspended or an ErrorResponse. A Sync marks where a batch
//! ends: Executes still waiting when its ReadyForQuery comes never ran (an earlier
//! message of the batch failed) and are dropped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::obs::digest::Digest;
pub use crate::obs::digest::Finished;
use crate::pg::protocol::tags::BackendTag;
use crate::traceparent::TraceParent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Query,
    Execute,
    /// A Sync or a FunctionCall: a ReadyForQuery that finishes no statement.
    Sync,
}

/// A statement in flight (`Running`'s queue).
#[derive(Debug)]
pub struct Stmt {
    kind: Kind,
    digest: Option<Arc<Digest>>,
    sent: Option<Instant>,
    rows: u64,
    failed: bool,
    trace: Option<TraceParent>,
}

/// A statement of the extended protocol: its digest and the trace context in its text.
pub type Named = (Arc<Digest>, Option<TraceParent>);

#[derive(Debug, Default)]
pub struct Running {
    queue: VecDeque<Stmt>,
    pub finished: Vec<Finished>,
    /// What the unnamed statement last parsed is, and what the portal last bound runs:
    /// an Execute's statement.
    unnamed: Option<Named>,
    bound: Option<Named>,
}

impl Running {
    fn push(&mut self, kind: Kind, digest: Option<&Arc<Digest>>) {
        self.queue.push_back(Stmt {
            kind,
            digest: digest.cloned(),
            sent: None,
            rows: 0,
            failed: false,
            trace: None,
        });
    }

    /// The statement just queued carries the application's trace context.
    pub fn trace_last(&mut self, trace: Option<TraceParent>) {
        if let Some(s) = self.queue.back_mut() {
            s.trace = trace;
        }
    }

    /// A simple Query (`digest` None: its text is not known, its answer is not
    /// recorded).
    pub fn query(&mut self, digest: Option<&Arc<Digest>>) {
        self.push(Kind::Query, digest);
    }

    /// A Parse of the unnamed statement (None: its text is not known).
    pub fn parsed_unnamed(&mut self, statement: Option<Named>) {
        self.unnamed = statement;
    }

    /// A Bind of a named statement (None: not known), or of the unnamed one.
    pub fn bound(&mut self, named: Option<Named>, unnamed: bool) {
        self.bound = if unnamed { self.unnamed.clone() } else { named };
    }

    /// An Execute of the statement last bound (not recorded when it is not known).
    pub fn execute(&mut self) {
        let bound = self.bound.clone();
        self.push(Kind::Execute, bound.as_ref().map(|b| &b.0));
        self.trace_last(bound.and_then(|b| b.1));
    }

    pub fn sync(&mut self) {
        self.push(Kind::Sync, None);
    }

    /// Nothing is in flight or waiting to be stamped.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// What was queued since the last call was written to the server at `now`.
    pub fn sent(&mut self, now: Instant) {
        for s in self.queue.iter_mut().rev() {
            if s.sent.is_some() {
                break;
            }
            s.sent = Some(now);
        }
    }

    fn finish(&mut self, s: Stmt) {
        if let Some(digest) = s.digest {
            self.finished.push(Finished {
                digest,
                sent: s.sent,
                rows: s.rows,
                failed: s.failed,
                trace: s.trace,
            });
        }
    }

    /// A server message the client sees (`body`: after the length word).
    pub fn on_message(&mut self, tag: BackendTag, body: &[u8]) {
        let Some(front) = self.queue.front_mut() else {
            return;
        };
        match (tag, front.kind) {
            (BackendTag::CommandComplete, Kind::Query) => front.rows += rows_of(body),
            (BackendTag::ErrorResponse, Kind::Query) => front.failed = true,
            (BackendTag::CommandComplete | BackendTag::EmptyQueryResponse | BackendTag::Other(b's'), Kind::Execute) => {
                front.rows = if tag == BackendTag::CommandComplete {
                    rows_of(body)
                } else {
                    0
                };
                let s = self.queue.pop_front().expect("front");
                self.finish(s);
            }
            (BackendTag::ErrorResponse, Kind::Execute) => {
                front.failed = true;
                let s = self.queue.pop_front().expect("front");
                self.finish(s);
            }
            (BackendTag::ReadyForQuery, _) => {
                // Up to the request it answers: Executes before it never ran.
                while let Some(s) = self.queue.pop_front() {
                    match s.kind {
                        Kind::Execute => {}
                        Kind::Sync => break,
                        Kind::Query => {
                            self.finish(s);
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The connection is gone (or the unit runs again elsewhere): what was sent failed
    /// there; the rest never ran.
    pub fn lost(&mut self) {
        while let Some(mut s) = self.queue.pop_front() {
            if s.kind != Kind::Sync && s.sent.is_some() {
                s.failed = true;
                self.finish(s);
            }
        }
    }

    /// The connection goes back or is closed: nothing is in flight on it any more.
    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// The queues' storage, moved in and out at rest (`spares`).
    pub(super) fn storage(&mut self) -> (&mut VecDeque<Stmt>, &mut Vec<Finished>) {
        (&mut self.queue, &mut self.finished)
    }
}

/// The row count of a CommandComplete tag (`SELECT 5`, `INSERT 0 1`, `UPDATE 3`): its
/// last word when that is a number.
fn rows_of(body: &[u8]) -> u64 {
    let tag = body.strip_suffix(b"\0").unwrap_or(body);
    let last = tag.rsplit(|&b| b == b' ').next().unwrap_or(b"");
    if last.is_empty() || !last.iter().all(u8::is_ascii_digit) || last.len() == tag.len() {
        return 0;
    }
    last.iter()
        .fold(0u64, |n, d| n.saturating_mul(10).saturating_add((d - b'0') as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Arc<Digest> {
        Arc::new(Digest::new(text.len() as u64, text))
    }

    #[test]
    fn row_counts_come_from_the_command_tag() {
        assert_eq!(rows_of(b"SELECT 5\0"), 5);
        assert_eq!(rows_of(b"INSERT 0 12\0"), 12);
        assert_eq!(rows_of(b"CREATE TABLE\0"), 0);
        assert_eq!(rows_of(b"BEGIN\0"), 0);
        assert_eq!(rows_of(b"123\0"), 0);
    }

    #[test]
    fn a_simple_query_finishes_at_its_ready_for_query() {
        let mut r = Running::default();
        let t0 = Instant::now();
        r.query(Some(&d("SELECT $1; SELECT $1")));
        r.sent(t0);
        r.on_message(BackendTag::CommandComplete, b"SELECT 1\0");
        r.on_message(BackendTag::CommandComplete, b"SELECT 2\0");
        assert!(r.finished.is_empty());
        r.on_message(BackendTag::ReadyForQuery, b"I");
        assert_eq!(r.finished.len(), 1);
        let f = &r.finished[0];
        assert_eq!((f.rows, f.failed, f.sent), (3, false, Some(t0)));
    }

    #[test]
    fn a_batch_finishes_each_execute_and_drops_those_that_never_ran() {
        let mut r = Running::default();
        let (a, b) = (d("INSERT"), d("SELECT"));
        let (bind_a, bind_b) = (Some((a.clone(), None)), Some((b.clone(), None)));
        r.bound(bind_a.clone(), false);
        r.execute();
        r.bound(bind_b.clone(), false);
        r.execute();
        r.sync();
        r.sent(Instant::now());
        r.on_message(BackendTag::CommandComplete, b"INSERT 0 1\0");
        r.on_message(BackendTag::ErrorResponse, b"");
        r.on_message(BackendTag::ReadyForQuery, b"I");
        let got: Vec<_> = r.finished.iter().map(|f| (&*f.digest.text, f.rows, f.failed)).collect();
        assert_eq!(got, [("INSERT", 1, false), ("SELECT", 0, true)]);
        // A failed Bind: the Execute after it never ran; its batch's error is its.
        r.finished.clear();
        r.bound(bind_a, false);
        r.execute();
        r.bound(bind_b, false);
        r.execute();
        r.sync();
        r.on_message(BackendTag::ErrorResponse, b"");
        r.on_message(BackendTag::ReadyForQuery, b"I");
        assert_eq!(r.finished.len(), 1);
        assert!(r.finished[0].failed && r.finished[0].sent.is_none());
        assert!(r.queue.is_empty());
    }

    #[test]
    fn a_lost_connection_fails_what_was_sent() {
        let mut r = Running::default();
        r.query(Some(&d("UPDATE")));
        r.sent(Instant::now());
        r.query(Some(&d("SELECT")));
        r.lost();
        assert_eq!(r.finished.len(), 1);
        assert!(r.finished[0].failed);
        assert!(r.queue.is_empty());
    }
}
