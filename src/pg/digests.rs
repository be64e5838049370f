//! PostgreSQL's side of the query digests (`obs::digest`): recording what finished on a
//! connection (`record`, both pool modes), and following statements through a
//! session-mode relay (`SessionStatements`), which passes bytes on as they come and sees
//! each message only as the framer finds it in a read.

use std::collections::HashMap;
use std::time::Instant;

use crate::obs::digest::{Digests, Finished, Place};
use crate::obs::trace::traceparent;
use crate::pg::classify::Classifier;
use crate::pg::protocol::tags::{BackendTag, FrontendTag};
use crate::pg::protocol::views::{Parse, Query, StatementRef};
use crate::pg::txn::running::{Named, Running};

/// Add `finished` to this worker's digests (`obs::digest::record`); `unit`: the
/// transaction they ran in, in transaction pooling.
pub fn record(
    digests: &Digests,
    finished: &mut Vec<Finished>,
    place: &Place<'_>,
    now: Instant,
    unit: Option<&mut crate::obs::trace::UnitTrace>,
) {
    crate::obs::digest::record(digests, crate::proxy::pool::worker(), finished, place, now, unit);
}

/// Prepared statements a session-mode client may name at once before the oldest are
/// forgotten (their Executes then go unrecorded): bounds the memory a client that
/// never closes its statements can take.
const MAX_NAMED: usize = 1024;

/// The statements of one session-mode client, followed from its messages: a Query's
/// text, a Parse's (named or not), the statement a Bind binds, each Execute. A message
/// whose body did not arrive in one read (a query text of many kilobytes) counts with
/// no digest: its answer is matched and dropped.
pub struct SessionStatements<'a> {
    classifier: &'a Classifier,
    /// Traces are on: read each statement's `traceparent` comment.
    traces: bool,
    pub running: Running,
    named: HashMap<Box<[u8]>, Named>,
}

impl<'a> SessionStatements<'a> {
    pub fn new(classifier: &'a Classifier, traces: bool) -> SessionStatements<'a> {
        SessionStatements {
            classifier,
            traces,
            running: Running::default(),
            named: HashMap::new(),
        }
    }

    /// A client message (`body`: after the length word, when whole in the read).
    pub fn client_message(&mut self, tag: u8, body: Option<&[u8]>) {
        let traces = self.traces;
        let trace = |sql: &[u8]| if traces { traceparent(sql) } else { None };
        let digest = |sql: &[u8]| self.classifier.classify_bytes(sql).digest.clone();
        match FrontendTag::of(tag) {
            Some(FrontendTag::Query) => {
                let q = body.and_then(|b| Query::decode(b).ok());
                self.running.query(q.as_ref().map(|q| digest(q.sql)).as_ref());
                self.running.trace_last(q.and_then(|q| trace(q.sql)));
            }
            Some(FrontendTag::Parse) => {
                let Some(p) = body.and_then(|b| Parse::decode(b).ok()) else {
                    self.running.parsed_unnamed(None);
                    return;
                };
                let d = (self.classifier.classify_parse(p.query).digest.clone(), trace(p.query));
                if p.name.is_empty() {
                    self.running.parsed_unnamed(Some(d));
                } else {
                    if self.named.len() >= MAX_NAMED {
                        self.named.clear();
                    }
                    self.named.insert(p.name.into(), d);
                }
            }
            Some(FrontendTag::Bind) => match body.and_then(|b| StatementRef::decode_bind(b).ok()) {
                Some(r) => {
                    let named = self.named.get(r.statement).cloned();
                    self.running.bound(named, r.statement.is_empty());
                }
                None => self.running.bound(None, false),
            },
            Some(FrontendTag::Close) => {
                if let Some(r) = body.and_then(|b| StatementRef::decode_target(b, "Close").ok()) {
                    if !r.portal {
                        self.named.remove(r.statement);
                    }
                }
            }
            Some(FrontendTag::Execute) => self.running.execute(),
            Some(FrontendTag::Sync | FrontendTag::FunctionCall) => self.running.sync(),
            _ => {}
        }
    }

    /// A server message the client gets.
    pub fn server_message(&mut self, tag: u8, body: Option<&[u8]>) {
        self.running.on_message(BackendTag::of(tag), body.unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::obs::digest::Digest;
    use std::sync::Arc;

    fn msg(tag: u8, body: &[u8]) -> (u8, Vec<u8>) {
        (tag, body.to_vec())
    }

    #[test]
    fn a_session_follows_simple_and_prepared_statements() {
        let k = Classifier::new(&[]);
        let mut s = SessionStatements::new(&k, true);
        let t0 = Instant::now();
        for (tag, body) in [
            msg(b'Q', b"SELECT 1\0"),
            msg(b'P', b"s1\0SELECT * FROM t WHERE id = $1\0\0\0"),
            msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
        ] {
            s.client_message(tag, Some(&body));
        }
        s.running.sent(t0);
        for (tag, body) in [
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"SELECT 1\0"),
            msg(b'2', b""),
            msg(b'C', b"SELECT 0\0"),
            msg(b'Z', b"I"),
        ] {
            s.server_message(tag, Some(&body));
        }
        let got: Vec<_> = s.running.finished.iter().map(|f| (&*f.digest.text, f.rows)).collect();
        assert_eq!(
            got,
            [
                ("SELECT $1", 1),
                ("SELECT * FROM t WHERE id = $1", 1),
                ("SELECT * FROM t WHERE id = $1", 0)
            ]
        );
        // A query whose text came in pieces is matched with its answer, not recorded.
        s.running.finished.clear();
        s.client_message(b'Q', None);
        s.running.sent(t0);
        s.server_message(b'C', Some(b"SELECT 1\0"));
        s.server_message(b'Z', Some(b"I"));
        assert!(s.running.finished.is_empty() && s.running.is_idle());
    }

    #[test]
    fn recording_keeps_only_what_was_sent() {
        let digests = Digests::new(1, true, 10);
        let d = Arc::new(Digest::new(1, "SELECT 1"));
        let t0 = Instant::now();
        let mut finished = vec![
            Finished {
                digest: d.clone(),
                sent: Some(t0),
                rows: 1,
                failed: false,
                trace: None,
            },
            Finished {
                digest: d,
                sent: None,
                rows: 1,
                failed: false,
                trace: None,
            },
        ];
        let place = Place {
            cluster: "main",
            node: "a",
            addr: "127.0.0.1:5432",
            database: "app",
            system: "postgresql",
            on_primary: true,
            route: crate::obs::digest::Route::Primary,
        };
        record(
            &digests,
            &mut finished,
            &place,
            t0 + std::time::Duration::from_millis(2),
            None,
        );
        assert!(finished.is_empty());
        let rows = digests.rows(
            None,
            crate::obs::digest::Grouping::Node,
            crate::obs::digest::Order::Calls,
            10,
        );
        assert_eq!((rows.len(), rows[0].calls, rows[0].total_time_ms), (1, 1, 2.0));
    }
}
