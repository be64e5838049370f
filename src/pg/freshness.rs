//! PostgreSQL's side of fresh reads (the rules are `cluster::freshness`):
//! - the **oracle** answers "a primary WAL position at or after every commit already
//!   acknowledged" with `pg_current_wal_insert_lsn()` on the primary. It is asked lazily,
//!   by the first read that follows a write (or a `SHOW switchyard.causal_token`), never
//!   per write, so write-only and read-only traffic pay nothing; concurrent askers share
//!   one query (each needs only a query *started* after its own commit).
//! - a **probe** per standby polls `pg_last_wal_replay_lsn()` every few milliseconds,
//!   only while some read waits on that standby, and publishes what it saw.
//!
//! Both run on the control runtime with their own tokio-postgres connections (the
//! health user's login): the data path only awaits a watch channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use crate::cluster::freshness::{qualifies, Floor};
use crate::cluster::health::Login;
use crate::cluster::topology::{ClusterSnapshot, ClusterState};
use crate::pg::health::parse_lsn;
use crate::pg::txn::statements::OwnStatement;
use crate::tls::ServerTls;

/// How often a standby's replay position is polled while reads may need it soon (while
/// one waits, polls follow each other back to back).
const PROBE_EVERY: Duration = Duration::from_millis(2);
/// How long a probe keeps polling after the last read that needed its node.
const PROBE_LINGER: Duration = Duration::from_secs(1);
/// Bound on one oracle or probe query (a frozen server must not hold a read longer
/// than its `causal_wait_ms`, which bounds the wait anyway).
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The health user's login, replaced on reload; read by the tasks at each (re)connect.
/// The health user's login and the cluster's `server_tls`.
type SharedLogin = Arc<Mutex<Option<(Arc<Login>, Arc<ServerTls>)>>>;

/// The I/O half: oracle and probes of one cluster.
pub struct Freshness {
    state: Arc<ClusterState>,
    runtime: Handle,
    login: SharedLogin,
    oracle: Arc<Oracle>,
    probes: Mutex<HashMap<String, Arc<Probe>>>,
    /// Bumped whenever a probe learns a replay position: waiters look again.
    seen: watch::Sender<u64>,
    epoch: Instant,
    /// `WRITE_FLOOR_SQL` and `WRITE_FLOOR_SHORT_SQL` as statements a write's own
    /// connection runs (`floor_question`).
    floor_long: OwnStatement,
    floor_short: OwnStatement,
}

struct Oracle {
    /// Queries started so far.
    started: AtomicU64,
    kick: Notify,
    /// (the query's number, what it answered).
    answer: watch::Sender<(u64, Option<Floor>)>,
    spawned: std::sync::Once,
    /// The WAL page and segment sizes from the first answer that had them (0: not yet);
    /// fixed at initdb, so the same on every node of a cluster.
    page: AtomicU64,
    segment: AtomicU64,
}

impl Oracle {
    fn new() -> Oracle {
        Oracle {
            started: AtomicU64::new(0),
            kick: Notify::new(),
            answer: watch::channel((0, None)).0,
            spawned: std::sync::Once::new(),
            page: AtomicU64::new(0),
            segment: AtomicU64::new(0),
        }
    }
}

struct Probe {
    replayed: AtomicU64,
    waiters: AtomicU32,
    /// When a read last needed this node's position (ms since `epoch`): the probe keeps
    /// polling for `PROBE_LINGER` after that, so that the next fresh reads find the
    /// position known instead of waiting for it.
    wanted_ms: AtomicU64,
    kick: Notify,
}

impl Freshness {
    /// Background work runs on `runtime` (the control runtime).
    pub fn new(state: Arc<ClusterState>, runtime: Handle) -> Freshness {
        Freshness {
            state,
            runtime,
            login: Arc::default(),
            oracle: Arc::new(Oracle::new()),
            probes: Mutex::new(HashMap::new()),
            seen: watch::channel(0).0,
            epoch: Instant::now(),
            floor_long: OwnStatement::new(WRITE_FLOOR_SQL),
            floor_short: OwnStatement::new(WRITE_FLOOR_SHORT_SQL),
        }
    }

    /// Reads need the replay positions of `candidates` now: keep their probes polling
    /// for a while.
    pub fn want(&self, candidates: &[usize], snap: &ClusterSnapshot) {
        let now = self.epoch.elapsed().as_millis() as u64;
        for &i in candidates {
            let p = self.probe(&snap.nodes[i].name);
            if p.wanted_ms.swap(now, Ordering::Relaxed) + (PROBE_LINGER.as_millis() as u64) < now + 1 {
                // The probe may be idle: wake it.
                p.kick.notify_one();
            }
        }
    }

    /// The login for the oracle and probes (the health user's, with the cluster's
    /// `server_tls`); set on start and reload.
    pub fn set_login(&self, login: Arc<Login>, tls: Arc<ServerTls>) {
        *self.login.lock().unwrap() = Some((login, tls));
    }

    /// A floor at or after every write the primary acknowledged before this call: the
    /// primary's WAL insert position from a query started after it. None if the primary
    /// could not be asked within `within` (the caller then reads from the primary).
    pub async fn write_floor(&self, within: Duration) -> Option<Floor> {
        let oracle = &self.oracle;
        oracle.spawned.call_once(|| {
            self.runtime
                .spawn(run_oracle(self.oracle.clone(), self.state.clone(), self.login.clone()));
        });
        let ticket = oracle.started.load(Ordering::SeqCst) + 1;
        let mut rx = oracle.answer.subscribe();
        oracle.kick.notify_one();
        let answered = tokio::time::timeout(within, rx.wait_for(|(n, _)| *n >= ticket))
            .await
            .ok()
            .and_then(|r| r.ok().map(|answer| answer.1));
        answered.flatten()
    }

    /// The question that learns a write's floor on the write's own connection (the
    /// driver asks it there as a write ends, `Causal::floor_wanted_now`): once the WAL
    /// sizes are known, without them (reading the settings made up a third of its
    /// cost).
    pub fn floor_question(&self) -> &OwnStatement {
        match self.oracle.segment.load(Ordering::Relaxed) {
            0 => &self.floor_long,
            _ => &self.floor_short,
        }
    }

    /// The floor in an answer to `floor_question`.
    pub fn floor_answer(&self, cols: &[Option<String>]) -> Option<Floor> {
        floor_of_row(&self.oracle, cols)
    }

    /// The replay position of node `i` as best known: its last health check or a newer
    /// probe.
    pub fn replayed(&self, snap: &ClusterSnapshot, i: usize) -> u64 {
        let n = &snap.nodes[i];
        let probed = self
            .probes
            .lock()
            .unwrap()
            .get(&n.name)
            .map_or(0, |p| p.replayed.load(Ordering::Relaxed));
        n.lsn.unwrap_or(0).max(probed)
    }

    /// Wait up to `within` until one of the standbys `candidates` has replayed `need`,
    /// polling their replay positions meanwhile. True if one has.
    pub async fn wait(&self, candidates: &[usize], need: Floor, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let snap = self.state.snapshot();
        let probes: Vec<Arc<Probe>> = candidates.iter().map(|&i| self.probe(&snap.nodes[i].name)).collect();
        let mut seen = self.seen.subscribe();
        for p in &probes {
            p.waiters.fetch_add(1, Ordering::SeqCst);
            p.kick.notify_one();
        }
        let found = loop {
            let snap = self.state.snapshot();
            if candidates
                .iter()
                .any(|&i| i < snap.nodes.len() && qualifies(&snap, i, need, self.replayed(&snap, i)))
            {
                break true;
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => {}
                _ => break false,
            }
        };
        for p in &probes {
            p.waiters.fetch_sub(1, Ordering::SeqCst);
        }
        found
    }

    fn probe(&self, node: &str) -> Arc<Probe> {
        let mut probes = self.probes.lock().unwrap();
        if let Some(p) = probes.get(node) {
            return p.clone();
        }
        let p = Arc::new(Probe {
            replayed: AtomicU64::new(0),
            waiters: AtomicU32::new(0),
            wanted_ms: AtomicU64::new(0),
            kick: Notify::new(),
        });
        probes.insert(node.to_string(), p.clone());
        self.runtime.spawn(run_probe(
            p.clone(),
            node.to_string(),
            self.state.clone(),
            self.login.clone(),
            self.seen.clone(),
            self.epoch,
        ));
        p
    }
}

/// A connection to `addr` ("host:port") as the health user.
async fn open(addr: &str, login: &SharedLogin, app: &str) -> Option<Client> {
    let (login, tls) = login.lock().unwrap().clone()?;
    let (host, port) = addr.rsplit_once(':')?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host.trim_start_matches('[').trim_end_matches(']'))
        .port(port.parse().ok()?)
        .user(&login.user)
        .dbname(&login.database)
        .application_name(app)
        .connect_timeout(QUERY_TIMEOUT);
    if let Some(pw) = &login.password {
        cfg.password(pw);
    }
    let (client, _task) = tokio::time::timeout(QUERY_TIMEOUT, tls.connect_pg(&mut cfg))
        .await
        .ok()?
        .ok()?;
    Some(client)
}

/// A floor at or after every write acknowledged before it started: the primary's WAL
/// insert position, the name of its WAL file (whose first 8 hex digits are the
/// timeline), and the WAL page and segment sizes `reachable` needs, all as text, in one
/// answer. The sizes come from `current_setting`, a lookup: `pg_settings` made each
/// answer cost the primary about 0.5 ms instead of 0.08 (it builds every setting's row).
/// Every function is named with its schema, and no operator is used: the health user's
/// `search_path` may be anything.
const WRITE_FLOOR_SQL: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text, \
    pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), \
    pg_catalog.current_setting('wal_block_size'), \
    pg_catalog.pg_size_bytes(pg_catalog.current_setting('wal_segment_size'))::text";

/// `WRITE_FLOOR_SQL` without the sizes, once they are known.
const WRITE_FLOOR_SHORT_SQL: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text, \
    pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn())";

/// The floor in an answer to `WRITE_FLOOR_SQL` (whose sizes `sizes` keeps) or to
/// `WRITE_FLOOR_SHORT_SQL` (with the sizes `sizes` has).
fn floor_of_row(sizes: &Oracle, cols: &[Option<String>]) -> Option<Floor> {
    let col = |i: usize| cols.get(i)?.as_deref();
    let lsn = parse_lsn(col(0)?)?;
    let timeline = u32::from_str_radix(col(1)?.get(..8)?, 16).ok()?;
    let (page, segment) = match (col(2), col(3)) {
        (Some(page), Some(segment)) => {
            let (page, segment): (u64, u64) = (page.parse().ok()?, segment.parse().ok()?);
            sizes.page.store(page, Ordering::Relaxed);
            sizes.segment.store(segment, Ordering::Relaxed);
            (page, segment)
        }
        (None, None) if cols.len() == 2 => (
            sizes.page.load(Ordering::Relaxed),
            sizes.segment.load(Ordering::Relaxed),
        ),
        _ => return None,
    };
    if segment == 0 {
        return None;
    }
    Some(Floor {
        timeline,
        lsn: reachable(lsn, page, segment),
    })
}

/// The WAL insert position as a standby's replay position can reach it. When the last
/// record ended exactly at a page boundary, PostgreSQL reports the insert position past
/// the next page's header (24 bytes, 40 on a segment's first page), where no record
/// ends: a standby that replayed everything would stay below it until more WAL came.
fn reachable(lsn: u64, page: u64, segment: u64) -> u64 {
    if segment > 0 && lsn % segment == 40 {
        lsn - 40
    } else if page > 0 && lsn % page == 24 {
        lsn - 24
    } else {
        lsn
    }
}

/// A connection with its one statement prepared (a query by text would cost a second
/// round trip to prepare it each time).
struct Prepared {
    addr: String,
    client: Client,
    statement: Statement,
    broken: AtomicBool,
}

async fn prepare(addr: &str, login: &SharedLogin, sql: &str) -> Option<Arc<Prepared>> {
    let client = open(addr, login, "switchyard-causal").await?;
    let statement = tokio::time::timeout(QUERY_TIMEOUT, client.prepare(sql))
        .await
        .ok()?
        .ok()?;
    Some(Arc::new(Prepared {
        addr: addr.to_string(),
        client,
        statement,
        broken: AtomicBool::new(false),
    }))
}

/// Answers `write_floor` requests: each kick starts a query at once, pipelined on one
/// connection even while earlier ones are in flight, and answers everyone who asked
/// before it started.
async fn run_oracle(oracle: Arc<Oracle>, state: Arc<ClusterState>, login: SharedLogin) {
    let mut conn: Option<Arc<Prepared>> = None;
    loop {
        oracle.kick.notified().await;
        let n = oracle.started.fetch_add(1, Ordering::SeqCst) + 1;
        let snap = state.snapshot();
        let addr = crate::cluster::routing::primary(&snap)
            .ok()
            .map(|p| snap.nodes[p].addr.clone());
        let Some(addr) = addr else {
            publish(&oracle, n, None);
            continue;
        };
        if conn
            .as_ref()
            .is_none_or(|c| c.addr != addr || c.broken.load(Ordering::Relaxed))
        {
            conn = prepare(&addr, &login, WRITE_FLOOR_SQL).await;
        }
        let Some(c) = conn.clone() else {
            publish(&oracle, n, None);
            continue;
        };
        let oracle = oracle.clone();
        tokio::spawn(async move {
            let answer = match tokio::time::timeout(QUERY_TIMEOUT, c.client.query_one(&c.statement, &[])).await {
                Ok(Ok(row)) => {
                    let cols: Vec<Option<String>> = (0..row.len()).map(|i| row.get(i)).collect();
                    floor_of_row(&oracle, &cols)
                }
                _ => {
                    c.broken.store(true, Ordering::Relaxed);
                    None
                }
            };
            publish(&oracle, n, answer);
        });
    }
}

/// The answer of query `n`, unless a later one already answered (it covers more).
fn publish(oracle: &Oracle, n: u64, answer: Option<Floor>) {
    oracle.answer.send_if_modified(|cur| {
        if n > cur.0 {
            *cur = (n, answer);
            true
        } else {
            false
        }
    });
}

/// Polls one node's replay position while some read waits on it.
async fn run_probe(
    probe: Arc<Probe>,
    node: String,
    state: Arc<ClusterState>,
    login: SharedLogin,
    seen: watch::Sender<u64>,
    epoch: Instant,
) {
    let mut conn: Option<Arc<Prepared>> = None;
    loop {
        let idle_ms = (epoch.elapsed().as_millis() as u64).saturating_sub(probe.wanted_ms.load(Ordering::Relaxed));
        if probe.waiters.load(Ordering::SeqCst) == 0 && idle_ms > PROBE_LINGER.as_millis() as u64 {
            probe.kick.notified().await;
            continue;
        }
        let snap = state.snapshot();
        let Some(i) = snap.index(&node) else { return };
        let addr = snap.nodes[i].addr.clone();
        if conn.as_ref().is_none_or(|c| c.addr != addr) {
            conn = prepare(&addr, &login, "SELECT pg_last_wal_replay_lsn()::text").await;
        }
        let mut ok = false;
        if let Some(c) = &conn {
            let q = c.client.query_one(&c.statement, &[]);
            if let Ok(Ok(row)) = tokio::time::timeout(QUERY_TIMEOUT, q).await {
                let lsn: Option<String> = row.get(0);
                if let Some(lsn) = lsn.as_deref().and_then(parse_lsn) {
                    probe.replayed.fetch_max(lsn, Ordering::Relaxed);
                    seen.send_modify(|v| *v += 1);
                    ok = true;
                }
            }
        }
        if !ok {
            // The node restarted or is gone: what it said before no longer counts.
            conn = None;
            probe.replayed.store(0, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else if probe.waiters.load(Ordering::SeqCst) == 0 {
            // A read that starts waiting kicks the probe out of this pause.
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = probe.kick.notified() => {}
            }
        }
        // With reads waiting, the next poll follows at once: each is a round trip to
        // the standby, and a waiting read is released by the first that shows it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_floor_is_read_from_the_text_columns_of_its_answer() {
        let row = |cols: &[Option<&str>]| cols.iter().map(|c| c.map(String::from)).collect::<Vec<_>>();
        let o = Oracle::new();
        let wal = Some("0000001A0000000000000003");
        // The short answer needs the sizes, which only the long one has.
        assert_eq!(floor_of_row(&o, &row(&[Some("0/3000148"), wal])), None);
        let f = floor_of_row(&o, &row(&[Some("0/3000148"), wal, Some("8192"), Some("16777216")]));
        assert_eq!(
            f,
            Some(Floor {
                timeline: 0x1a,
                lsn: 0x3000148
            })
        );
        // Past a page header: taken back to the page's start, with the sizes in the row.
        let f = floor_of_row(&o, &row(&[Some("0/3002018"), wal, Some("8192"), Some("16777216")]));
        assert_eq!(f.map(|f| f.lsn), Some(0x3002000));
        // ...or, in a short answer, with the sizes learned before.
        let f = floor_of_row(&o, &row(&[Some("0/3004018"), wal]));
        assert_eq!(
            f,
            Some(Floor {
                timeline: 0x1a,
                lsn: 0x3004000
            })
        );
        assert_eq!(
            floor_of_row(&o, &row(&[None, wal, Some("8192"), Some("16777216")])),
            None
        );
        assert_eq!(floor_of_row(&o, &row(&[Some("0/1"), wal, None, None])), None);
        assert_eq!(floor_of_row(&o, &row(&[Some("0/1"), Some("0000")])), None);
        assert_eq!(floor_of_row(&o, &row(&[Some("0/1")])), None);
    }

    #[test]
    fn an_insert_position_past_a_page_header_is_taken_back_to_the_boundary() {
        let (page, seg) = (8192, 16 << 20);
        assert_eq!(reachable(3 * 8192 + 24, page, seg), 3 * 8192);
        assert_eq!(reachable(2 * (16 << 20) + 40, page, seg), 2 * (16 << 20));
        // A record that ends 40 bytes into a page that does not start a segment stays.
        assert_eq!(reachable(3 * 8192 + 40, page, seg), 3 * 8192 + 40);
        assert_eq!(reachable(3 * 8192 + 100, page, seg), 3 * 8192 + 100);
    }
}
