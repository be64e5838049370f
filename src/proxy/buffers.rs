//! Buffers lent to sessions only while they are busy.
//!
//! Most of a pooler's clients are idle most of the time. A session that kept its read
//! and write buffers between transactions would hold 8 KiB or more each way per idle
//! client, most of its memory. So a transaction-pooling session with nothing buffered
//! either way gives its buffers back to its worker thread's spares, waits for the
//! client's socket to become readable with no buffer at all, and takes buffers again
//! when bytes arrive (PgBouncer shares one buffer pool among its clients the same way).
//!
//! Written here rather than taken from a crate: it is a bounded free list of
//! `BytesMut`, per thread so that it needs no lock (a session gives back on whichever
//! worker runs it; buffers may move between threads' lists, which only evens them
//! out). Bounded, so a burst's buffers are freed afterwards rather than hoarded.

use bytes::BytesMut;
use std::cell::RefCell;

/// The room a lent buffer has (one read of a client or a server).
pub const SIZE: usize = 8192;
/// Spare buffers kept per worker thread; more given back are freed.
const SPARES: usize = 64;
/// A buffer that grew beyond this (a large answer) is freed, not kept.
const LARGEST_KEPT: usize = 4 * SIZE;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Give `buf` room to read into if it has none: a spare of this thread's, or a new
/// buffer.
pub fn lend(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        SPARE.with_borrow_mut(|spares| lend_from(spares, buf));
    }
}

/// `lend` for several buffers, with one look at the thread's spares (a session busy
/// again takes three at once).
pub fn lend_all<const N: usize>(bufs: [&mut BytesMut; N]) {
    if bufs.iter().all(|b| b.capacity() > 0) {
        return;
    }
    SPARE.with_borrow_mut(|spares| {
        for buf in bufs {
            if buf.capacity() == 0 {
                lend_from(spares, buf);
            }
        }
    });
}

fn lend_from(spares: &mut Vec<BytesMut>, buf: &mut BytesMut) {
    match spares.pop() {
        Some(spare) => *buf = spare,
        None => buf.reserve(SIZE),
    }
}

/// Take `buf`'s storage back (what it holds is dropped: give back only what is
/// consumed). `buf` is left without any.
pub fn give_back(buf: &mut BytesMut) {
    if buf.capacity() > 0 {
        SPARE.with_borrow_mut(|spares| give_back_to(spares, buf));
    }
}

/// `give_back` for several buffers, with one look at the thread's spares (a session
/// at rest gives back four).
pub fn give_back_all<const N: usize>(bufs: [&mut BytesMut; N]) {
    if bufs.iter().all(|b| b.capacity() == 0) {
        return;
    }
    SPARE.with_borrow_mut(|spares| {
        for buf in bufs {
            if buf.capacity() > 0 {
                give_back_to(spares, buf);
            }
        }
    });
}

fn give_back_to(spares: &mut Vec<BytesMut>, buf: &mut BytesMut) {
    let mut b = std::mem::take(buf);
    b.clear();
    // Messages split off the front leave a buffer whose room starts after them: the
    // whole is reclaimed when nothing else refers to it any more (no allocation; if
    // something still does, the buffer is freed below, not kept).
    if b.capacity() < SIZE {
        let _ = b.try_reclaim(SIZE);
    }
    if (SIZE..=LARGEST_KEPT).contains(&b.capacity()) && spares.len() < SPARES {
        spares.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_back_buffer_is_lent_again_and_small_or_large_ones_are_freed() {
        let mut a = BytesMut::new();
        lend(&mut a);
        assert!(a.capacity() >= SIZE);
        a.extend_from_slice(b"hello");
        let ptr = a.as_ptr();
        give_back(&mut a);
        assert_eq!(a.capacity(), 0, "given back: no storage left");
        let mut b = BytesMut::new();
        lend(&mut b);
        assert_eq!(b.as_ptr(), ptr, "the spare is lent again");
        assert!(b.is_empty(), "lent empty");
        // A lent buffer keeps what it has.
        b.extend_from_slice(b"x");
        lend(&mut b);
        assert_eq!(&b[..], b"x");
        give_back(&mut b);

        // One whose front was split off (messages taken from it, since dropped) is
        // whole again.
        let mut read = BytesMut::new();
        lend(&mut read);
        read.extend_from_slice(&[1; 100]);
        drop(read.split_to(100));
        assert!(read.capacity() < SIZE);
        let ptr = read.as_ptr();
        give_back(&mut read);
        let mut again = BytesMut::new();
        lend(&mut again);
        assert!(again.capacity() >= SIZE);
        assert_eq!(
            again.as_ptr(),
            ptr.wrapping_sub(100),
            "the same storage, from its start"
        );
        give_back(&mut again);

        // Too small (a greeting's) or too large (a big answer's): freed, not kept.
        let before = SPARE.with_borrow(Vec::len);
        let mut small = BytesMut::with_capacity(100);
        give_back(&mut small);
        let mut large = BytesMut::with_capacity(LARGEST_KEPT * 2);
        give_back(&mut large);
        assert_eq!(SPARE.with_borrow(Vec::len), before);
    }

    #[test]
    fn lent_and_given_back_together_as_one_by_one() {
        let mut a = BytesMut::new();
        let mut b = BytesMut::new();
        let mut c = BytesMut::from(&b"kept"[..]);
        let c_ptr = c.as_ptr();
        lend_all([&mut a, &mut b, &mut c]);
        assert!(a.capacity() >= SIZE && b.capacity() >= SIZE);
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!((&c[..], c.as_ptr()), (&b"kept"[..], c_ptr), "one with room keeps it");
        let (a_ptr, b_ptr) = (a.as_ptr(), b.as_ptr());
        let mut none = BytesMut::new();
        give_back_all([&mut a, &mut none, &mut b]);
        assert_eq!((a.capacity(), b.capacity(), none.capacity()), (0, 0, 0));
        // Both are spares again, the last given back lent first.
        let (mut x, mut y) = (BytesMut::new(), BytesMut::new());
        lend_all([&mut x, &mut y]);
        assert_eq!((x.as_ptr(), y.as_ptr()), (b_ptr, a_ptr));
        give_back_all([&mut x, &mut y, &mut c]);
    }

    #[test]
    fn spares_are_bounded() {
        let mut held: Vec<BytesMut> = (0..SPARES + 10).map(|_| BytesMut::with_capacity(SIZE)).collect();
        for b in &mut held {
            give_back(b);
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARES);
    }
}
