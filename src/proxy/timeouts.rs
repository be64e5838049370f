//! Client timeouts (`client_idle_timeout_ms`, `idle_transaction_timeout_ms`,
//! `query_timeout_ms`) as a pure clock: the session tells it what it is waiting for and
//! when that changed; it says when a timeout is due and which. Both engines and both
//! pooling modes use it; what a fired timeout does (end the client, cancel the query)
//! is the session's.

use std::time::{Duration, Instant};

use crate::config::ClientTimeouts;

/// What a session is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The client's next request, between transactions.
    Client,
    /// The client's next request, inside a transaction.
    ClientInTransaction,
    /// A server's answer to a request in flight.
    Server,
    /// Anything else (logging in, acquiring a connection): no client timeout applies.
    Other,
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    ClientIdle,
    IdleTransaction,
    Query,
}

impl Fired {
    /// The metric label (`switchyard_client_timeouts_total{reason}`).
    pub fn label(self) -> &'static str {
        match self {
            Fired::ClientIdle => "client_idle",
            Fired::IdleTransaction => "idle_transaction",
            Fired::Query => "query",
        }
    }
}

/// The clock of one session.
#[derive(Debug, Clone)]
pub struct Watch {
    timeouts: ClientTimeouts,
    state: Waiting,
    progress: u64,
    since: Instant,
}

impl Watch {
    pub fn new(timeouts: ClientTimeouts, now: Instant) -> Watch {
        Watch {
            timeouts,
            state: Waiting::Other,
            progress: 0,
            since: now,
        }
    }

    /// Any timeout set at all (else the session need not look).
    pub fn armed(&self) -> bool {
        self.timeouts.any()
    }

    /// The session is `state`; `progress` counts answers completed (a change in it, as
    /// a change of state, starts the clock again: a client that keeps a transaction
    /// busy is not idle in it, and the query timeout is per query).
    pub fn observe(&mut self, state: Waiting, progress: u64, now: Instant) {
        if state != self.state || progress != self.progress {
            self.state = state;
            self.progress = progress;
            self.since = now;
        }
    }

    fn limit(&self) -> Option<(Duration, Fired)> {
        match self.state {
            Waiting::Client => self.timeouts.client_idle.map(|d| (d, Fired::ClientIdle)),
            Waiting::ClientInTransaction => self.timeouts.idle_transaction.map(|d| (d, Fired::IdleTransaction)),
            Waiting::Server => self.timeouts.query.map(|d| (d, Fired::Query)),
            Waiting::Other => None,
        }
    }

    /// When the timeout of the present state fires, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.limit().map(|(d, _)| self.since + d)
    }

    /// The timeout due at `now`, if any.
    pub fn due(&self, now: Instant) -> Option<Fired> {
        self.limit()
            .filter(|(d, _)| now.duration_since(self.since) >= *d)
            .map(|(_, f)| f)
    }

    /// A cancel was sent for the query in flight: the next one only after another
    /// whole `query_timeout`.
    pub fn rearm(&mut self, now: Instant) {
        self.since = now;
    }

    /// How often a session that polls (rather than sleeping until `deadline`) should
    /// look: an eighth of the shortest timeout, between 10 ms and 1 s.
    pub fn poll_every(&self) -> Duration {
        let t = &self.timeouts;
        [t.client_idle, t.idle_transaction, t.query]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(1), |d| d / 8)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// What the client is told when `fired` ends it (`ClientTimeouts::error`).
    pub fn error(&self, fired: Fired) -> crate::error::Error {
        self.timeouts.error(fired)
    }
}

impl ClientTimeouts {
    /// What the client is told when `fired` ends it, or its query (PostgreSQL clients
    /// get the server's own 57014 from the cancel instead).
    pub fn error(&self, fired: Fired) -> crate::error::Error {
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis());
        match fired {
            Fired::ClientIdle => crate::error::Error::client_idle(format!(
                "terminating connection: idle for {} ms (client_idle_timeout_ms); reconnect when there is work",
                ms(self.client_idle)
            )),
            Fired::IdleTransaction => crate::error::Error::idle_in_transaction(format!(
                "terminating connection: idle inside a transaction for {} ms (idle_transaction_timeout_ms); the transaction was rolled back",
                ms(self.idle_transaction)
            )),
            Fired::Query => crate::error::Error::query_canceled(format!(
                "canceling statement: it ran longer than {} ms (query_timeout_ms)",
                ms(self.query)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timeouts() -> ClientTimeouts {
        ClientTimeouts {
            client_idle: Some(ms(1000)),
            idle_transaction: Some(ms(200)),
            query: Some(ms(50)),
        }
    }

    #[test]
    fn each_state_has_its_own_timeout_counted_from_when_it_began() {
        let t0 = Instant::now();
        let mut w = Watch::new(timeouts(), t0);
        w.observe(Waiting::Client, 0, t0);
        assert_eq!(w.deadline(), Some(t0 + ms(1000)));
        assert_eq!(w.due(t0 + ms(999)), None);
        assert_eq!(w.due(t0 + ms(1000)), Some(Fired::ClientIdle));
        // A query starts: the query clock, not the idle one.
        w.observe(Waiting::Server, 0, t0 + ms(500));
        assert_eq!(w.due(t0 + ms(549)), None);
        assert_eq!(w.due(t0 + ms(550)), Some(Fired::Query));
        // Inside a transaction, idle.
        w.observe(Waiting::ClientInTransaction, 1, t0 + ms(600));
        assert_eq!(w.due(t0 + ms(799)), None);
        assert_eq!(w.due(t0 + ms(800)), Some(Fired::IdleTransaction));
        // Observing the same state again does not restart the clock...
        w.observe(Waiting::ClientInTransaction, 1, t0 + ms(700));
        assert_eq!(w.due(t0 + ms(800)), Some(Fired::IdleTransaction));
        // ...progress does (another statement of the transaction answered).
        w.observe(Waiting::ClientInTransaction, 2, t0 + ms(700));
        assert_eq!(w.due(t0 + ms(800)), None);
        w.observe(Waiting::Other, 2, t0 + ms(10_000));
        assert_eq!(w.deadline(), None);
        assert_eq!(w.due(t0 + ms(100_000)), None);
    }

    #[test]
    fn unset_timeouts_never_fire_and_a_rearmed_query_waits_a_whole_period_again() {
        let t0 = Instant::now();
        let mut w = Watch::new(
            ClientTimeouts {
                query: Some(ms(100)),
                ..ClientTimeouts::default()
            },
            t0,
        );
        assert!(w.armed());
        w.observe(Waiting::Client, 0, t0);
        assert_eq!(w.due(t0 + ms(1_000_000)), None);
        w.observe(Waiting::Server, 0, t0);
        assert_eq!(w.due(t0 + ms(100)), Some(Fired::Query));
        w.rearm(t0 + ms(100));
        assert_eq!(w.due(t0 + ms(150)), None);
        assert_eq!(w.due(t0 + ms(200)), Some(Fired::Query));
        assert!(!Watch::new(ClientTimeouts::default(), t0).armed());
    }

    #[test]
    fn polling_looks_often_enough_for_the_shortest_timeout() {
        let t0 = Instant::now();
        assert_eq!(Watch::new(timeouts(), t0).poll_every(), ms(10)); // 50 / 8, clamped
        let slow = ClientTimeouts {
            client_idle: Some(Duration::from_secs(60)),
            ..ClientTimeouts::default()
        };
        assert_eq!(Watch::new(slow, t0).poll_every(), Duration::from_secs(1));
        assert_eq!(
            Watch::new(
                ClientTimeouts {
                    idle_transaction: Some(ms(800)),
                    ..ClientTimeouts::default()
                },
                t0
            )
            .poll_every(),
            ms(100)
        );
    }
}
