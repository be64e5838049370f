//! Per-thread repeaters of `tokio::sync::watch` channels.
//!
//! A session on a worker thread that waits on a process-wide channel joins and leaves
//! that channel's waiter list, a lock every worker thread takes, once per transaction.
//! Instead, the first session of a thread to ask starts a task on that thread which
//! waits on the channel once and repeats each change into a channel of the thread's
//! own; sessions wait on that one, whose lock only their thread touches. A change then
//! costs one extra wake-up per worker thread.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// (key of the repeated channel, a receiver of this thread's repeater).
    static REPEATERS: RefCell<Vec<(u64, watch::Receiver<()>)>> = const { RefCell::new(Vec::new()) };
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
pub fn repeat<T: Send + Sync + 'static>(
    key: u64,
    upstream: impl FnOnce() -> watch::Receiver<T>,
) -> watch::Receiver<()> {
    REPEATERS.with_borrow_mut(|repeaters| {
        repeaters.retain(|(_, rx)| rx.has_changed().is_ok());
        if let Some((_, rx)) = repeaters.iter().find(|(k, _)| *k == key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(());
        let mut upstream = upstream();
        tokio::spawn(async move {
            while upstream.changed().await.is_ok() {
                tx.send_replace(());
            }
        });
        repeaters.push((key, rx.clone()));
        rx
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_change_reaches_every_local_receiver_and_one_repeater_serves_a_thread() {
        let (tx, rx) = watch::channel(0);
        let k = key();
        let mut a = repeat(k, || rx.clone());
        let mut b = repeat::<i32>(k, || panic!("one repeater per thread and channel"));
        tokio::task::yield_now().await; // the repeater subscribes before the change
        tx.send_replace(1);
        tokio::time::timeout(std::time::Duration::from_secs(5), a.changed())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), b.changed())
            .await
            .unwrap()
            .unwrap();
        drop((tx, rx));
        // The sender is gone: the repeater ends, its receivers see it closed.
        assert!(tokio::time::timeout(std::time::Duration::from_secs(5), a.changed())
            .await
            .unwrap()
            .is_err());
    }
}
