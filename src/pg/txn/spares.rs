//! The machine's queues, lent to a session only while it is busy, as its buffers are
//! (`proxy::buffers`).
//!
//! A queue keeps its storage when emptied, and a client's first statement gives each of
//! them some: the actions for the driver, the answers owed, the statements in flight and
//! those finished (for the query digests), the messages kept for a rerun. That was about
//! 1 KiB more per idle client once it had run one statement (measured with DHAT: 500
//! clients, one `SELECT 1` each), a quarter of what the whole idle session costs. So a
//! session at rest gives their storage back to its worker thread's spares, and takes a
//! spare set again when its client sends: no allocation per unit, and nothing held
//! while idle.
//!
//! Written here rather than taken from a crate for the reason `proxy::buffers` gives: a
//! bounded per-thread free list, no lock (a session runs on one worker thread).

use std::cell::RefCell;
use std::collections::VecDeque;

use bytes::Bytes;

use super::action::Action;
use super::owed::Owed;
use super::running::{Finished, Stmt};

/// Spare sets kept per worker thread (as many as its sessions busy at once need); more
/// given back are freed.
const SPARES: usize = 64;
/// A queue that grew beyond this (a long pipeline) is freed, not kept.
const LARGEST_KEPT: usize = 64;

/// The machine's queues (`Machine::actions`, `OwedQueue`, `Running`, `Machine::sent`).
#[derive(Default)]
pub struct Queues {
    pub actions: VecDeque<Action>,
    pub owed: VecDeque<Owed>,
    pub stmts: VecDeque<Stmt>,
    pub finished: Vec<Finished>,
    pub sent: Vec<Bytes>,
}

thread_local! {
    static SPARE: RefCell<Vec<Queues>> = const { RefCell::new(Vec::new()) };
}

impl Queues {
    /// None of the queues holds anything.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
            && self.owed.is_empty()
            && self.stmts.is_empty()
            && self.finished.is_empty()
            && self.sent.is_empty()
    }

    pub fn has_storage(&self) -> bool {
        self.actions.capacity()
            + self.owed.capacity()
            + self.stmts.capacity()
            + self.finished.capacity()
            + self.sent.capacity()
            > 0
    }

    fn small(&self) -> bool {
        self.actions.capacity() <= LARGEST_KEPT
            && self.owed.capacity() <= LARGEST_KEPT
            && self.stmts.capacity() <= LARGEST_KEPT
            && self.finished.capacity() <= LARGEST_KEPT
            && self.sent.capacity() <= LARGEST_KEPT
    }
}

/// Empty queues to the thread's spares (or freed, when it has enough or they grew
/// large).
pub fn give_back(q: Queues) {
    debug_assert!(q.is_empty());
    if q.small() && q.has_storage() {
        SPARE.with_borrow_mut(|spares| {
            if spares.len() < SPARES {
                spares.push(q);
            }
        });
    }
}

/// A spare set of this thread's, if it has one (otherwise queues allocate when first
/// used, as any queue does).
pub fn take() -> Option<Queues> {
    SPARE.with_borrow_mut(|spares| spares.pop())
}

/// A queue's storage.
pub trait Storage {
    fn capacity(&self) -> usize;
}

impl<T> Storage for VecDeque<T> {
    fn capacity(&self) -> usize {
        VecDeque::capacity(self)
    }
}

impl<T> Storage for Vec<T> {
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
}

/// `*slot = new`. What `slot` held is dropped only if it has storage: a queue without
/// any owns nothing and holds nothing, and its drop would be checks on every unit (they
/// were a third of what lending cost, counted with callgrind).
pub fn refill<C: Storage>(slot: &mut C, new: C) {
    let old = std::mem::replace(slot, new);
    if old.capacity() == 0 {
        std::mem::forget(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_queues_are_given_back_and_lent_again() {
        let mut q = Queues::default();
        q.owed.push_back(Owed::Ready);
        q.actions.push_back(Action::Release { reuse: true });
        let ptr = q.owed.as_slices().0.as_ptr();
        q.owed.clear();
        q.actions.clear();
        give_back(q);
        let mut lent = take().expect("a spare set");
        assert!(lent.owed.capacity() > 0 && lent.actions.capacity() > 0);
        lent.owed.push_back(Owed::Ready);
        assert_eq!(
            lent.owed.as_slices().0.as_ptr(),
            ptr,
            "the spare's storage is lent again"
        );
        assert!(take().is_none(), "lent once");
        // Queues without storage are not kept.
        give_back(Queues::default());
        assert!(take().is_none());
    }

    #[test]
    fn a_queue_that_grew_long_is_freed_not_kept() {
        let mut q = Queues::default();
        q.owed.extend(std::iter::repeat_n(Owed::Ready, LARGEST_KEPT + 1));
        q.owed.clear();
        give_back(q);
        assert!(take().is_none());
    }

    #[test]
    fn refill_replaces_what_a_slot_holds() {
        let mut slot: Vec<u32> = Vec::new();
        refill(&mut slot, vec![1, 2]);
        assert_eq!(slot, [1, 2]);
        // One with storage is dropped as usual.
        refill(&mut slot, Vec::with_capacity(3));
        assert!(slot.is_empty() && slot.capacity() >= 3);
    }
}
