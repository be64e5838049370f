//! Per-thread repeaters of `tokio::sync::watch` channels.
//!
//! A session on a worker thread that waits on a process-wide channel joins and leaves
//! that channel's waiter list, a lock every worker thread takes, once per transaction.
//! Instead, the first session of a thread to ask starts a task on that thread which
//! waits on the channel once and repeats each change to the thread's own `Hub`;
//! sessions wait on that one, whose lock only their thread takes. A change then costs
//! one extra wake-up per worker thread.
//!
//! The hub is written here rather than being a second `watch` channel: a session joins
//! and leaves its waiters on every turn of its loop (once at rest, once while its
//! server answers), and a `watch` wait (a `Notified` in an intrusive list, with its own
//! atomic state) cost about 330 instructions each time, 6 % of a pgbench -S
//! transaction under `bench/instructions`. Here a wait is a slot in a vector behind an
//! uncontended lock, and the slot is the receiver's from one wait to the next (until a
//! change empties them all), so a wait that ends without a change (the usual turn)
//! registers nothing: one lock, two comparisons. The cost: a session keeps its waker
//! there while it does something else, and a change wakes it once for nothing.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// (key of the repeated channel, this thread's hub for it).
    static REPEATERS: RefCell<Vec<(u64, Arc<Hub>)>> = const { RefCell::new(Vec::new()) };
}

/// A key for one repeated channel, unique in the process.
pub fn key() -> u64 {
    NEXT_KEY.fetch_add(1, Ordering::Relaxed)
}

/// Told of every change of the channel `upstream` subscribes to (the first call on a
/// thread calls it), from this thread's repeater of it. Changes before this thread's
/// repeater started are not repeated: callers look at the channel's value themselves
/// when they start. Must be called inside a tokio runtime (the worker's); the repeater
/// ends when the channel's sender is dropped, and so does its entry here.
pub fn repeat<T: Send + Sync + 'static>(key: u64, upstream: impl FnOnce() -> watch::Receiver<T>) -> Receiver {
    REPEATERS.with_borrow_mut(|repeaters| {
        repeaters.retain(|(_, hub)| !hub.state.lock().unwrap().closed);
        if let Some((_, hub)) = repeaters.iter().find(|(k, _)| *k == key) {
            return Receiver::new(hub.clone());
        }
        let hub = Arc::new(Hub::default());
        let mut upstream = upstream();
        let repeater = hub.clone();
        tokio::spawn(async move {
            while upstream.changed().await.is_ok() {
                repeater.notify(false);
            }
            repeater.notify(true);
        });
        repeaters.push((key, hub.clone()));
        Receiver::new(hub)
    })
}

/// One thread's copy of a channel: how many changes it has seen, and the tasks waiting
/// for the next.
#[derive(Default)]
struct Hub {
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    /// Changes repeated so far.
    version: u64,
    /// The upstream channel's sender is gone (not a change: as with `watch`, a receiver
    /// then gets `Err`, after any change it has not seen).
    closed: bool,
    /// Times the waiters were woken and emptied (a change, or the close).
    epoch: u64,
    /// Waiting tasks, by slot; a `Receiver` keeps its slot from one wait to the next. A
    /// change wakes and empties them all, so a slot taken in an earlier epoch is gone.
    waiters: Vec<Option<Waker>>,
    /// Slots free for reuse.
    free: Vec<usize>,
}

impl Hub {
    fn notify(&self, closed: bool) {
        let woken = {
            let mut st = self.state.lock().unwrap();
            match closed {
                true => st.closed = true,
                false => st.version += 1,
            }
            st.epoch += 1;
            st.free.clear();
            std::mem::take(&mut st.waiters)
        };
        // Woken outside the lock: a woken task on another thread may poll at once.
        for waker in woken.into_iter().flatten() {
            waker.wake();
        }
    }
}

/// The upstream channel closed (its sender was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A session's end of its thread's hub, as `watch::Receiver<()>` is of a channel:
/// changes since it last looked are seen once.
pub struct Receiver {
    hub: Arc<Hub>,
    seen: u64,
    /// (slot, the hub's epoch when it was taken) of this receiver's waits: a slot from an
    /// earlier epoch is gone.
    slot: Option<(usize, u64)>,
}

impl Receiver {
    fn new(hub: Arc<Hub>) -> Receiver {
        let seen = hub.state.lock().unwrap().version;
        Receiver { hub, seen, slot: None }
    }

    /// Whether a change came since this receiver last looked; `Err` once the channel
    /// closed.
    pub fn has_changed(&self) -> Result<bool, Closed> {
        let st = self.hub.state.lock().unwrap();
        match st.closed {
            true => Err(Closed),
            false => Ok(st.version != self.seen),
        }
    }

    /// The next `changed` returns at once.
    pub fn mark_changed(&mut self) {
        self.seen = self.seen.wrapping_sub(1);
    }

    /// Wait for a change not seen yet (and mark it seen); `Err` once the channel closed
    /// with none.
    pub fn changed(&mut self) -> Changed<'_> {
        Changed { rx: self }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some((i, epoch)) = self.slot.take() {
            let mut st = self.hub.state.lock().unwrap();
            // Not if a change emptied the waiters since: the slot may be another's now.
            if epoch == st.epoch {
                st.waiters[i] = None;
                st.free.push(i);
            }
        }
    }
}

/// `Receiver::changed`'s future. Dropped before it completes, it leaves the receiver's
/// waker in its slot for the next wait (`Receiver` frees the slot).
pub struct Changed<'a> {
    rx: &'a mut Receiver,
}

impl Future for Changed<'_> {
    type Output = Result<(), Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let rx = &mut *self.get_mut().rx;
        let mut st = rx.hub.state.lock().unwrap();
        if st.version != rx.seen {
            rx.seen = st.version;
            return Poll::Ready(Ok(()));
        }
        if st.closed {
            return Poll::Ready(Err(Closed));
        }
        match rx.slot {
            // The receiver's slot of this epoch: this poll's waker, unless it is there.
            Some((i, epoch)) if epoch == st.epoch => match &mut st.waiters[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            },
            // None yet, or emptied by a change: a new one.
            _ => {
                let waker = Some(cx.waker().clone());
                let i = match st.free.pop() {
                    Some(i) => {
                        st.waiters[i] = waker;
                        i
                    }
                    None => {
                        st.waiters.push(waker);
                        st.waiters.len() - 1
                    }
                };
                rx.slot = Some((i, st.epoch));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn a_change_reaches_every_local_receiver_and_one_repeater_serves_a_thread() {
        let (tx, rx) = watch::channel(0);
        let k = key();
        let mut a = repeat(k, || rx.clone());
        let mut b = repeat::<i32>(k, || panic!("one repeater per thread and channel"));
        tokio::task::yield_now().await; // the repeater subscribes before the change
        assert_eq!(a.has_changed(), Ok(false));
        tx.send_replace(1);
        tokio::time::timeout(Duration::from_secs(5), a.changed())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), b.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.has_changed(), Ok(false), "seen once");
        a.mark_changed();
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .unwrap()
            .unwrap();
        drop((tx, rx));
        // The sender is gone: the repeater ends, its receivers see it closed.
        assert!(tokio::time::timeout(Duration::from_secs(5), a.changed())
            .await
            .unwrap()
            .is_err());
        assert_eq!(b.has_changed(), Err(Closed));
    }

    /// A receiver's waits given up (a select!'s other branch won) keep its one slot for
    /// the next; a dropped receiver frees its slot, but not one a change emptied that
    /// another receiver has taken since.
    #[tokio::test(flavor = "current_thread")]
    async fn a_receiver_keeps_one_slot_and_frees_only_its_own() {
        let (tx, rx) = watch::channel(0);
        let k = key();
        let mut rxs: Vec<Receiver> = (0..3).map(|_| repeat(k, || rx.clone())).collect();
        tokio::task::yield_now().await;
        let hub = rxs[0].hub.clone();
        for _ in 0..100 {
            for r in &mut rxs {
                let mut wait = std::pin::pin!(r.changed());
                assert!(futures_poll_once(wait.as_mut()).is_pending());
            }
        }
        {
            let st = hub.state.lock().unwrap();
            assert_eq!(st.waiters.len(), 3, "one slot per receiver, reused by its waits");
            assert!(st.waiters.iter().all(Option::is_some));
        }
        drop(rxs.pop());
        {
            let st = hub.state.lock().unwrap();
            assert_eq!(
                st.waiters.iter().filter(|w| w.is_some()).count(),
                2,
                "a dropped receiver's slot is freed"
            );
            assert_eq!(st.free, vec![2]);
        }
        // One waited before a change and is dropped after it; another has registered
        // after the change, in the slot the change emptied.
        let mut old = rxs.remove(0);
        tx.send_replace(1);
        tokio::task::yield_now().await; // the repeater notifies
        assert!(
            hub.state.lock().unwrap().waiters.is_empty(),
            "a change empties the slots"
        );
        let mut new = rxs.remove(0);
        new.seen = hub.state.lock().unwrap().version; // seen: it waits for the next
        old.seen = new.seen;
        assert!(futures_poll_once(std::pin::pin!(new.changed())).is_pending());
        assert_eq!(new.slot.map(|(i, _)| i), Some(0));
        assert_eq!(
            old.slot.map(|(i, _)| i),
            Some(0),
            "the same index, from the earlier epoch"
        );
        drop(old);
        assert!(
            hub.state.lock().unwrap().waiters[0].is_some(),
            "the newer receiver keeps its slot"
        );
        tx.send_replace(2);
        tokio::time::timeout(Duration::from_secs(5), new.changed())
            .await
            .unwrap()
            .unwrap();
    }

    /// A wait woken by a change, then given up for another branch, is woken by the
    /// next change too (its slot was emptied: the next wait takes a new one).
    #[tokio::test(flavor = "current_thread")]
    async fn every_change_wakes_a_receiver_that_waits_again() {
        let (tx, rx) = watch::channel(0);
        let mut r = repeat(key(), || rx.clone());
        tokio::task::yield_now().await;
        let tx = Arc::new(tx);
        for v in 1..=5 {
            assert!(futures_poll_once(std::pin::pin!(r.changed())).is_pending());
            // Sent only once the wait below is registered (and asleep).
            let tx = tx.clone();
            tokio::spawn(async move { tx.send_replace(v) });
            tokio::time::timeout(Duration::from_secs(5), r.changed())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.has_changed(), Ok(false));
        }
    }

    fn futures_poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        f.poll(&mut cx)
    }
}
