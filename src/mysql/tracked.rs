//! What the relay tracks of a session between its two directions: the answers owed
//! (`Answers`), the cluster's count of rw sessions not at rest, and, in transaction
//! pooling, the client's session state and whether it pins its connection.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::answers::{Answers, SERVER_STATUS_AUTOCOMMIT};

/// A session's answers owed, and its share of the cluster's count of rw sessions not at
/// rest (what a switchover waits for: `ClusterInfo::unsettled`).
pub(super) struct Tracked {
    pub(super) answers: Answers,
    counter: Option<Arc<AtomicU32>>,
    counted: bool,
    /// Transaction pooling: the session state the client has built, as the server
    /// reported it (what a connection is brought in line with before it is handed to
    /// this client).
    pub(super) desired: super::pool::ConnState,
    /// Transaction pooling: the session holds state a connection cannot be brought in
    /// line with, so it keeps its connection (why).
    pub(super) pinned: Option<&'static str>,
    /// A write answered with rows was counted when sent; its answer is not all read
    /// yet (then it has committed, if autocommit: `Writes::committed`).
    pub(super) rows_write_pending: bool,
}

impl Tracked {
    pub(super) fn new(answers: Answers, counter: Option<Arc<AtomicU32>>) -> Tracked {
        Tracked {
            answers,
            counter,
            counted: false,
            desired: Default::default(),
            pinned: None,
            rows_write_pending: false,
        }
    }

    /// Count this session as unsettled (in a transaction, or an answer owed) or not.
    /// A session whose state the proxy lost track of is not counted: it cannot move
    /// anyway (it is ended at the next command after a switchover), and must not hold
    /// one up for good.
    pub(super) fn update(&mut self) {
        let unsettled = !self.answers.at_rest() && !self.answers.lost;
        if unsettled != self.counted {
            if let Some(c) = &self.counter {
                if unsettled {
                    c.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.fetch_sub(1, Ordering::Relaxed);
                }
            }
            self.counted = unsettled;
        }
    }
}

impl Tracked {
    /// Take the session changes the server reported into `desired` (transaction
    /// pooling); a change it did not name pins the session.
    pub(super) fn absorb_state(&mut self) {
        for (name, value) in self.answers.vars.drain(..) {
            self.desired.vars.insert(name, value);
        }
        if let Some(db) = self.answers.schema.take() {
            self.desired.db = Some(db);
        }
        if self.answers.unexplained_change {
            self.pinned.get_or_insert(
                "session state the server reported without naming it (a user variable, a temporary table, a prepared statement, a lock)",
            );
        }
        if self.answers.lost {
            self.pinned.get_or_insert("an answer the proxy did not follow");
        }
    }

    /// Transaction pooling: the connection may go back to the pool now. Not with
    /// autocommit off: the server reports a transaction open only once a statement
    /// touched a table, and a `SAVEPOINT` before that must stay on its connection.
    pub(super) fn releasable(&self) -> bool {
        self.answers.at_rest() && self.pinned.is_none() && self.answers.status & SERVER_STATUS_AUTOCOMMIT != 0
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.counted {
            if let Some(c) = &self.counter {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}
