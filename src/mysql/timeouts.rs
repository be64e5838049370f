//! Client timeouts on MySQL sessions (`client_idle_timeout_ms`,
//! `idle_transaction_timeout_ms`, `query_timeout_ms`): what the relay waits for, read
//! from its answer tracking, fed to the engine-neutral clock (`proxy::timeouts`). The
//! relay acts on what fires (ends the session, or `KILL QUERY` on the server).

use std::sync::Mutex;
use std::time::Instant;

use crate::config::ClientTimeouts;
use crate::proxy::timeouts::{Fired, Waiting, Watch};

use super::tracked::Tracked;

/// Resolves when a timeout fires while the relay runs (never, with none set). Looks a
/// few times per the shortest timeout rather than arming a timer per packet.
pub(super) async fn watchdog(timeouts: ClientTimeouts, tracked: &Mutex<Tracked>) -> Fired {
    let mut watch = Watch::new(timeouts, Instant::now());
    if !watch.armed() {
        return std::future::pending().await;
    }
    let every = watch.poll_every();
    loop {
        tokio::time::sleep(every).await;
        let now = Instant::now();
        let (waiting, progress) = {
            let t = tracked.lock().unwrap();
            let a = &t.answers;
            let waiting = match (a.idle(), a.in_transaction) {
                (false, _) => Waiting::Server,
                (true, true) => Waiting::ClientInTransaction,
                (true, false) => Waiting::Client,
            };
            (waiting, a.commands)
        };
        watch.observe(waiting, progress, now);
        if let Some(fired) = watch.due(now) {
            return fired;
        }
    }
}
