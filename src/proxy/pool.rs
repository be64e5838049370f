//! The engine-neutral part of a connection pool: which idle connections to keep and which
//! to hand out, decided as a pure function of time (`now` is always an argument, so the
//! rules are tested without sleeping). An engine's pool (`pg::pool`) keeps one `IdleList`
//! beside its slots (a semaphore of `pool_size`) and its logins.
//!
//! Idle connections are handed out newest first (LIFO): under light load the same few
//! stay warm and the others age out, so the pool shrinks back by itself.

use std::time::{Duration, Instant};

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The data path runs on one single-threaded runtime per worker thread, and a server
/// connection is only ever used on the worker that opened it: its socket is registered
/// with that worker's event loop, so no wakeup crosses threads. Each worker has its own
/// pools (both engines), which share the configured sizes (`PoolSettings::share`).
pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// Called once at the start of worker thread `index`.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// What the list needs to know of a connection.
pub trait Pooled {
    /// When it was opened (`lifetime` counts from here).
    fn created(&self) -> Instant;
    /// Whether it is still sound (its server has not closed it). Asked only of a
    /// connection about to be handed out or kept.
    fn alive(&self) -> bool;
}

/// The rules of one pool (`server_idle_timeout_ms`, `server_lifetime_ms`,
/// `min_pool_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    /// Idle connections kept even past their idle timeout.
    pub min_size: usize,
}

impl Limits {
    fn too_old(&self, created: Instant, now: Instant) -> bool {
        past(created, self.lifetime, now)
    }
}

/// More than `d` has passed from `since` to `now`. An addition and a comparison: cheaper
/// than the subtraction `saturating_duration_since` does, which checkouts and check-ins
/// paid on every transaction (`bench/instructions`). A sum past what `Instant` holds
/// never passes.
fn past(since: Instant, d: Duration, now: Instant) -> bool {
    since.checked_add(d).is_some_and(|end| now > end)
}

/// Connections dropped on the way, by reason (for the log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Idle past the idle timeout, or open past the lifetime.
    pub expired: usize,
    /// Closed by the server.
    pub dead: usize,
}

struct Entry<C> {
    conn: C,
    /// Idle since.
    since: Instant,
}

pub struct IdleList<C> {
    /// Oldest first: the newest is at the end.
    entries: Vec<Entry<C>>,
}

impl<C> Default for IdleList<C> {
    fn default() -> Self {
        IdleList { entries: Vec::new() }
    }
}

impl<C: Pooled> IdleList<C> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Park a connection given back at `now`. One past its lifetime is not kept: it is
    /// handed back to be closed.
    pub fn check_in(&mut self, conn: C, now: Instant, limits: &Limits) -> Result<(), C> {
        if limits.too_old(conn.created(), now) {
            return Err(conn);
        }
        self.entries.push(Entry { conn, since: now });
        Ok(())
    }

    /// The newest sound idle connection at `now`. Those idle past the idle timeout (but
    /// the newest `min_size`, which `prune` keeps warm for this), open past the lifetime,
    /// or closed by their server are dropped on the way.
    pub fn take(&mut self, now: Instant, limits: &Limits) -> (Option<C>, Dropped) {
        let mut dropped = Dropped::default();
        while let Some(Entry { conn, since }) = self.entries.pop() {
            // Its place among the idle ones, newest first, as `prune` counts.
            let newest = dropped.expired + dropped.dead;
            let idle_expired = newest >= limits.min_size && past(since, limits.idle_timeout, now);
            if idle_expired || limits.too_old(conn.created(), now) {
                dropped.expired += 1;
                continue;
            }
            if !conn.alive() {
                dropped.dead += 1;
                continue;
            }
            return (Some(conn), dropped);
        }
        (None, dropped)
    }

    /// Drop what is expired or dead at `now`, keeping the newest `min_size` past their
    /// idle timeout (not past their lifetime, nor dead: those are replaced by new ones).
    pub fn prune(&mut self, now: Instant, limits: &Limits) -> Dropped {
        let mut dropped = Dropped::default();
        let mut kept = Vec::with_capacity(self.entries.len());
        for (i, entry) in self.entries.drain(..).rev().enumerate() {
            let idle_expired = i >= limits.min_size && past(entry.since, limits.idle_timeout, now);
            if idle_expired || limits.too_old(entry.conn.created(), now) {
                dropped.expired += 1;
            } else if !entry.conn.alive() {
                dropped.dead += 1;
            } else {
                kept.push(entry);
            }
        }
        kept.reverse();
        self.entries = kept;
        dropped
    }

    /// Close the connection idle the longest (a server-connection budget is full and
    /// another pool needs the place); false if none is idle.
    pub fn close_oldest(&mut self) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        self.entries.remove(0);
        true
    }

    /// Drop every idle connection (its node went down or was removed); how many.
    pub fn clear(&mut self) -> usize {
        self.entries.drain(..).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A connection with a name, an age and a switch for its server closing it.
    #[derive(Debug)]
    struct Fake {
        name: &'static str,
        created: Instant,
        alive: Rc<Cell<bool>>,
    }

    impl Pooled for Fake {
        fn created(&self) -> Instant {
            self.created
        }
        fn alive(&self) -> bool {
            self.alive.get()
        }
    }

    const LIMITS: Limits = Limits {
        idle_timeout: Duration::from_secs(10),
        lifetime: Duration::from_secs(100),
        min_size: 0,
    };

    fn fake(name: &'static str, created: Instant) -> (Fake, Rc<Cell<bool>>) {
        let alive = Rc::new(Cell::new(true));
        (
            Fake {
                name,
                created,
                alive: alive.clone(),
            },
            alive,
        )
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn making_room_closes_the_connection_idle_the_longest() {
        let t0 = Instant::now();
        let mut idle = IdleList::default();
        for (name, at) in [("old", 0), ("mid", 1), ("new", 2)] {
            idle.check_in(fake(name, t0).0, t0 + s(at), &LIMITS).unwrap();
        }
        assert!(idle.close_oldest());
        assert_eq!(idle.take(t0 + s(3), &LIMITS).0.unwrap().name, "new");
        assert_eq!(idle.take(t0 + s(3), &LIMITS).0.unwrap().name, "mid");
        assert!(!idle.close_oldest(), "nothing idle: no room made");
    }

    #[test]
    fn the_newest_idle_connection_goes_out_first() {
        let t0 = Instant::now();
        let mut idle = IdleList::default();
        for (name, at) in [("a", 0), ("b", 1), ("c", 2)] {
            idle.check_in(fake(name, t0).0, t0 + s(at), &LIMITS).unwrap();
        }
        let names: Vec<_> = (0..3).map(|_| idle.take(t0 + s(3), &LIMITS).0.unwrap().name).collect();
        assert_eq!(names, ["c", "b", "a"]);
        let (none, dropped) = idle.take(t0 + s(3), &LIMITS);
        assert!(none.is_none() && dropped == Dropped::default());
    }

    #[test]
    fn idle_too_long_open_too_long_or_closed_by_the_server_is_never_handed_out() {
        let t0 = Instant::now();
        let mut idle = IdleList::default();
        idle.check_in(fake("idle-long", t0).0, t0, &LIMITS).unwrap();
        idle.check_in(fake("fresh", t0).0, t0 + s(15), &LIMITS).unwrap();
        let (dead, switch) = fake("dead", t0 + s(10));
        idle.check_in(dead, t0 + s(16), &LIMITS).unwrap();
        switch.set(false);
        let (got, dropped) = idle.take(t0 + s(17), &LIMITS);
        assert_eq!(got.unwrap().name, "fresh");
        assert_eq!(dropped, Dropped { expired: 0, dead: 1 });
        let (got, dropped) = idle.take(t0 + s(17), &LIMITS);
        assert!(got.is_none(), "idle 17 s > 10 s");
        assert_eq!(dropped, Dropped { expired: 1, dead: 0 });
        // Past its lifetime: refused at check-in, and dropped if it ages while idle.
        let old = fake("old", t0).0;
        assert!(idle.check_in(old, t0 + s(101), &LIMITS).is_err());
        idle.check_in(fake("aging", t0).0, t0 + s(95), &LIMITS).unwrap();
        assert_eq!(idle.take(t0 + s(101), &LIMITS).1.expired, 1);
    }

    #[test]
    fn pruning_keeps_min_size_past_the_idle_timeout_but_not_past_the_lifetime() {
        let t0 = Instant::now();
        let limits = Limits { min_size: 2, ..LIMITS };
        let mut idle = IdleList::default();
        for (name, created) in [("a", 0), ("b", 0), ("c", 0)] {
            idle.check_in(fake(name, t0 + s(created)).0, t0, &limits).unwrap();
        }
        let (d, switch) = fake("d", t0);
        idle.check_in(d, t0 + s(50), &limits).unwrap();
        // At 60 s: a, b, c idle 60 s; d idle 10 s (not past). The newest two (d, c) stay.
        assert_eq!(idle.prune(t0 + s(60), &limits), Dropped { expired: 2, dead: 0 });
        assert_eq!(idle.len(), 2);
        switch.set(false);
        assert_eq!(idle.prune(t0 + s(61), &limits), Dropped { expired: 0, dead: 1 });
        assert_eq!(idle.take(t0 + s(62), &limits).0.unwrap().name, "c");
        // min_size does not keep one past its lifetime.
        idle.check_in(fake("e", t0).0, t0 + s(99), &limits).unwrap();
        assert_eq!(idle.prune(t0 + s(101), &limits), Dropped { expired: 1, dead: 0 });
        assert!(idle.is_empty());
    }

    #[test]
    fn past_is_strictly_after_and_an_endless_span_never_passes() {
        let t0 = Instant::now();
        assert!(!past(t0, s(10), t0 + s(10)), "at the limit: not past yet");
        assert!(past(t0, s(10), t0 + s(10) + Duration::from_nanos(1)));
        assert!(!past(t0, s(10), t0));
        assert!(
            !past(t0, Duration::MAX, t0 + s(1_000_000)),
            "a sum past Instant's range"
        );
        for (since, d, now) in [(0, 5, 3), (0, 5, 5), (0, 5, 6), (7, 0, 7), (7, 0, 8)] {
            let (since, now) = (t0 + s(since), t0 + s(now));
            assert_eq!(past(since, s(d), now), now.saturating_duration_since(since) > s(d));
        }
    }
}
