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
        match SPARE.with_borrow_mut(Vec::pop) {
            Some(spare) => *buf = spare,
            None => buf.reserve(SIZE),
        }
    }
}

/// Take `buf`'s storage back (what it holds is dropped: give back only what is
/// consumed). `buf` is left without any.
pub fn give_back(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        return;
    }
    let mut b = std::mem::take(buf);
    b.clear();
    // Messages split off the front leave a buffer whose room starts after them: the
    // whole is reclaimed when nothing else refers to it any more (no allocation; if
    // something still does, the buffer is freed below, not kept).
    if b.capacity() < SIZE {
        let _ = b.try_reclaim(SIZE);
    }
    if (SIZE..=LARGEST_KEPT).contains(&b.capacity()) {
        SPARE.with_borrow_mut(|spares| {
            if spares.len() < SPARES {
                spares.push(b);
            }
        });
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
    fn spares_are_bounded() {
        let mut held: Vec<BytesMut> = (0..SPARES + 10).map(|_| BytesMut::with_capacity(SIZE)).collect();
        for b in &mut held {
            give_back(b);
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARES);
    }
}
