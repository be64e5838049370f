//! Per-thread repeaters of `tokio::sync::watch` channels.
//!
//! A session on a worker thread that waits on a process-wide channel joins and leaves
//! that channel's waiter list, a lock every worker thread takes, once per transaction.
//! Instead, the first session of a thread to ask starts a task on that thread which
//! waits on the channel once and repeats each change into a `Hub` of the thread's own;
//! sessions wait on that one. A change then costs one extra wake-up per worker thread.
//!
//! Why not a `watch` channel of the thread's own (what this was): a transaction-pooling
//! session waits on it in every turn of its `select!`, and a `watch` wait is a fresh
//! `Notified` each time: its waiter list locked to join and again to leave when another
//! branch wins, twice per transaction. A `Signal` registers once, when the session
//! subscribes; a wait is then two atomic loads and an `AtomicWaker` registration, which
//! stores nothing while the session's task stays the same.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::watch;

static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// (key of the repeated channel, this thread's hub of it).
    static REPEATERS: RefCell<Vec<(u64, Arc<Hub>)>> = const { RefCell::new(Vec::new()) };
}

/// A key for one repeated channel, unique in the process.
pub fn key() -> u64 {
    NEXT_KEY.fetch_add(1, Ordering::Relaxed)
}

/// The repeated channel's sender is gone (the process is going away, or the cluster
/// was removed and its state dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// One thread's copy of a channel's changes: a version, and the wakers of the sessions
/// that wait on it, each in a slot of its own for as long as its `Signal` lives.
#[derive(Default)]
struct Hub {
    version: AtomicU64,
    closed: AtomicBool,
    /// Taken only to subscribe, unsubscribe and tell of a change; never by a wait.
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    slots: Vec<Option<Arc<AtomicWaker>>>,
    free: Vec<usize>,
}

impl Hub {
    fn subscribe(self: &Arc<Hub>) -> Signal {
        let waker = Arc::new(AtomicWaker::new());
        let mut w = self.waiters.lock().unwrap();
        let slot = match w.free.pop() {
            Some(i) => {
                w.slots[i] = Some(waker.clone());
                i
            }
            None => {
                w.slots.push(Some(waker.clone()));
                w.slots.len() - 1
            }
        };
        drop(w);
        Signal {
            seen: self.version.load(Ordering::Acquire),
            hub: self.clone(),
            waker,
            slot,
            marked: false,
        }
    }

    /// A change (or, `close`, the end): every waiting session wakes.
    fn tell(&self, close: bool) {
        match close {
            true => self.closed.store(true, Ordering::Release),
            false => {
                self.version.fetch_add(1, Ordering::AcqRel);
            }
        }
        // Wakers are woken after the lock is let go: a waker may run code of its own.
        let wakers: Vec<Arc<AtomicWaker>> = self.waiters.lock().unwrap().slots.iter().flatten().cloned().collect();
        for w in wakers {
            w.wake();
        }
    }
}

/// A session's subscription to one channel through its thread's hub: told of every
/// change after it subscribed (or after `mark_changed`). Works from any thread; it is
/// only cheapest on the one it was made on.
pub struct Signal {
    hub: Arc<Hub>,
    waker: Arc<AtomicWaker>,
    slot: usize,
    /// The hub's version when this subscriber last looked.
    seen: u64,
    /// `mark_changed` was called and not yet seen.
    marked: bool,
}

impl Signal {
    /// A change since the last look (`Ok(false)`: none), or the channel closed.
    pub fn has_changed(&self) -> Result<bool, Closed> {
        if self.hub.closed.load(Ordering::Acquire) {
            return Err(Closed);
        }
        Ok(self.marked || self.hub.version.load(Ordering::Acquire) != self.seen)
    }

    /// Count as changed: the next wait returns at once.
    pub fn mark_changed(&mut self) {
        self.marked = true;
    }

    /// Ready at the next change (seen by this call), or when the channel closes.
    pub fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        if let Some(r) = self.look() {
            return Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        // Looked at again after registering: a change told in between is not lost.
        match self.look() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    /// Wait for the next change (cancel-safe: nothing is seen unless it returns).
    pub async fn changed(&mut self) -> Result<(), Closed> {
        std::future::poll_fn(|cx| self.poll_changed(cx)).await
    }

    fn look(&mut self) -> Option<Result<(), Closed>> {
        if std::mem::take(&mut self.marked) {
            return Some(Ok(()));
        }
        let v = self.hub.version.load(Ordering::Acquire);
        if v != self.seen {
            self.seen = v;
            return Some(Ok(()));
        }
        self.hub.closed.load(Ordering::Acquire).then_some(Err(Closed))
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        let mut w = self.hub.waiters.lock().unwrap();
        w.slots[self.slot] = None;
        w.free.push(self.slot);
    }
}

/// Told of every change of the channel `upstream` subscribes to (the first call on a
/// thread calls it), from this thread's repeater of it. Changes before this thread's
/// repeater started are not repeated: callers look at the channel's value themselves
/// when they start. Must be called inside a tokio runtime (the worker's); the repeater
/// ends when the channel's sender is dropped, and so does its entry here.
pub fn repeat<T: Send + Sync + 'static>(key: u64, upstream: impl FnOnce() -> watch::Receiver<T>) -> Signal {
    REPEATERS.with_borrow_mut(|repeaters| {
        repeaters.retain(|(_, hub)| !hub.closed.load(Ordering::Acquire));
        if let Some((_, hub)) = repeaters.iter().find(|(k, _)| *k == key) {
            return hub.subscribe();
        }
        let hub = Arc::new(Hub::default());
        let mut upstream = upstream();
        let told = hub.clone();
        tokio::spawn(async move {
            while upstream.changed().await.is_ok() {
                told.tell(false);
            }
            told.tell(true);
        });
        let signal = hub.subscribe();
        repeaters.push((key, hub));
        signal
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), f).await.expect("in time")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_change_reaches_every_local_receiver_and_one_repeater_serves_a_thread() {
        let (tx, rx) = watch::channel(0);
        let k = key();
        let mut a = repeat(k, || rx.clone());
        let mut b = repeat::<i32>(k, || panic!("one repeater per thread and channel"));
        tokio::task::yield_now().await; // the repeater subscribes before the change
        assert_eq!(a.has_changed(), Ok(false));
        tx.send_replace(1);
        within(a.changed()).await.unwrap();
        within(b.changed()).await.unwrap();
        assert_eq!(a.has_changed(), Ok(false), "a change is seen once");
        drop((tx, rx));
        // The sender is gone: the repeater ends, its receivers see it closed.
        assert_eq!(within(a.changed()).await, Err(Closed));
        assert_eq!(b.has_changed(), Err(Closed));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_parked_before_the_change_is_woken_and_a_mark_counts_once() {
        let (tx, rx) = watch::channel(0);
        let mut s = repeat(key(), || rx.clone());
        s.mark_changed();
        assert_eq!(s.has_changed(), Ok(true));
        within(s.changed()).await.unwrap();
        let waiting = tokio::spawn(async move {
            s.changed().await.unwrap();
            s
        });
        tokio::task::yield_now().await; // the waiter is parked on the hub
        tx.send_replace(1);
        let s = within(waiting).await.unwrap();
        assert_eq!(s.has_changed(), Ok(false));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_subscriber_frees_its_slot() {
        let (_tx, rx) = watch::channel(0);
        let k = key();
        let a = repeat(k, || rx.clone());
        let hub = a.hub.clone();
        drop(a);
        let _b = repeat::<i32>(k, || unreachable!());
        let w = hub.waiters.lock().unwrap();
        assert_eq!((w.slots.len(), w.free.len()), (1, 0), "the slot was used again");
    }
}
