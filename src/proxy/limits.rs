//! Admission: how many clients may be connected at once, proxy-wide
//! (`proxy.max_clients`), per cluster and per user (`max_clients` there), and the
//! file-descriptor budget that keeps those limits answerable.
//!
//! A client is counted from the moment its startup names its user (PostgreSQL's startup
//! packet, MySQL's handshake response) until its session ends; one over a limit is
//! refused with SQLSTATE 53300 (MySQL 1040, or 1203 for a user's limit) at once, before
//! authentication, and nothing else is disturbed. Admin console logins are not counted,
//! so an operator can still look in when the proxy is full.
//!
//! The counts sit behind one mutex: it is taken twice per client connection (in and
//! out), never per message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::config::Config;
use crate::error::Error;
use crate::proxy::shared::Shared;

/// The limits that apply to one arriving client, read from the running config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub proxy: u32,
    pub cluster: Option<u32>,
    pub user: Option<u32>,
}

impl Limits {
    pub fn of(config: &Config, cluster: &str, user: &str) -> Limits {
        Limits {
            proxy: config.proxy.max_clients,
            cluster: config.clusters.get(cluster).and_then(|c| c.max_clients),
            user: config.user(user).and_then(|u| u.max_clients),
        }
    }
}

/// Which limit refused a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Proxy {
        limit: u32,
    },
    Cluster {
        cluster: String,
        limit: u32,
    },
    User {
        user: String,
        limit: u32,
    },
    /// The process is out of file descriptors (`RLIMIT_NOFILE`): the reserve answered.
    Descriptors,
}

impl Refusal {
    /// The metric label (`switchyard_clients_refused_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Proxy { .. } => "proxy_max_clients",
            Refusal::Cluster { .. } => "cluster_max_clients",
            Refusal::User { .. } => "user_max_clients",
            Refusal::Descriptors => "file_descriptors",
        }
    }

    /// What the client is told (53300; MySQL 1040, or 1203 for a user's limit).
    pub fn error(&self) -> Error {
        match self {
            Refusal::Proxy { limit } => Error::too_many_clients(format!(
                "too many clients: Switchyard already serves {limit} (proxy.max_clients); retry later, or raise proxy.max_clients"
            )),
            Refusal::Cluster { cluster, limit } => Error::too_many_clients(format!(
                "too many clients for cluster \"{cluster}\": it already has {limit} (clusters.{cluster}.max_clients); retry later, or raise that limit"
            )),
            Refusal::User { user, limit } => Error::too_many_clients_of_user(format!(
                "too many clients for user \"{user}\": it already has {limit} connected (max_clients of [[users]] \"{user}\"); close some of them, or raise that limit"
            )),
            Refusal::Descriptors => Error::too_many_clients(
                "too many clients: Switchyard is out of file descriptors (RLIMIT_NOFILE); retry later, or raise the limit (LimitNOFILE= in its systemd unit, ulimit -n)",
            ),
        }
    }
}

/// Count a client of `user` on `cluster` against the running config's limits, or
/// refuse it (`forced`: refused already, e.g. out of descriptors). A refusal is counted
/// in the metrics and logged once per interval with how many there were.
pub fn admit(shared: &Shared, cluster: &str, user: &str, forced: Option<Refusal>) -> Result<Admission, Error> {
    let refusal = match forced {
        Some(r) => r,
        None => match shared
            .admissions
            .admit(Limits::of(&shared.config(), cluster, user), cluster, user)
        {
            Ok(a) => return Ok(a),
            Err(r) => r,
        },
    };
    Err(refused(shared, cluster, user, refusal))
}

/// An admitted client now logs in as `user` (MySQL's `COM_CHANGE_USER`): counted under
/// that user from now on, or refused by that user's `max_clients` (counted and logged as
/// `admit` does; the client keeps its place until its session ends).
pub fn change_user(shared: &Shared, admission: &mut Admission, user: &str) -> Result<(), Error> {
    let limit = shared.config().user(user).and_then(|u| u.max_clients);
    match admission.change_user(limit, user) {
        Ok(()) => Ok(()),
        Err(r) => {
            let cluster = admission.cluster.clone();
            Err(refused(shared, &cluster, user, r))
        }
    }
}

/// A refusal counted (metrics, `SHOW LIMITS`) and logged once per interval: what the
/// client is told.
fn refused(shared: &Shared, cluster: &str, user: &str, refusal: Refusal) -> Error {
    shared.metrics.client_refused(cluster, refusal.reason());
    shared.admissions.note(cluster, refusal.reason());
    let e = refusal.error();
    if let Some(n) = shared.admissions.refusals_logged.hit(Instant::now()) {
        warn!(cluster = %cluster, user = %user, reason = refusal.reason(), refused = n, error = %e,
              "clients refused by a limit (refused: how many since the last such line)");
    }
    e
}

/// A client timeout fired on `cluster`: counted (metrics, `SHOW LIMITS`) and logged once
/// per interval per kind with how many there were (`what` says what the proxy does).
pub fn timed_out(shared: &Shared, cluster: &str, fired: crate::proxy::timeouts::Fired, what: &str) {
    use crate::proxy::timeouts::Fired;
    shared.metrics.client_timeout(cluster, fired.label());
    shared.admissions.note(cluster, fired.label());
    let kind = match fired {
        Fired::ClientIdle => 0,
        Fired::IdleTransaction => 1,
        Fired::Query => 2,
    };
    if let Some(n) = shared.admissions.timeouts_logged[kind].hit(Instant::now()) {
        tracing::info!(cluster = %cluster, timeout = fired.label(), fired = n, action = what,
                       "client timeouts (fired: how many since the last such line)");
    }
}

#[derive(Default)]
struct Counts {
    total: u32,
    clusters: HashMap<String, u32>,
    users: HashMap<String, u32>,
}

/// The clients counted now, and a log line's throttle for refusals.
pub struct Admissions {
    counts: Mutex<Counts>,
    /// Clients the file-descriptor limit leaves room for (`descriptor_budget`): past
    /// it a client is refused before `accept` itself would start failing.
    descriptor_cap: std::sync::atomic::AtomicU32,
    /// Refusals are logged once per interval with a count, not once each.
    pub refusals_logged: Throttle,
    /// So are client timeouts, per kind (client_idle, idle_transaction, query).
    timeouts_logged: [Throttle; 3],
    /// And sessions the proxy ended, per cluster and code (`session ended by proxy`).
    pub session_ends: Throttles,
    /// Refusals by (cluster, reason) and client timeouts by (cluster, kind) since start,
    /// for `SHOW LIMITS` and `/status` (the metrics have them too).
    events: Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
}

/// What `SHOW LIMITS` and `/status` show of one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsView {
    /// Clients of the cluster counted now, and of the whole proxy.
    pub clients: u32,
    pub proxy_clients: u32,
    /// Refusals and timeouts since start, by reason (`Refusal::reason`, `Fired::label`).
    pub counts: Vec<(&'static str, u64)>,
}

/// One admitted client; dropping it (the session ended) frees its place.
pub struct Admission {
    admissions: Arc<Admissions>,
    cluster: String,
    user: String,
}

impl Default for Admissions {
    fn default() -> Self {
        Admissions {
            counts: Mutex::default(),
            descriptor_cap: std::sync::atomic::AtomicU32::new(u32::MAX),
            refusals_logged: Throttle::default(),
            timeouts_logged: Default::default(),
            session_ends: Throttles::default(),
            events: Mutex::default(),
        }
    }
}

impl Admissions {
    /// Refuse clients past `cap` for want of file descriptors (set at start from
    /// `descriptor_budget`).
    pub fn set_descriptor_cap(&self, cap: u32) {
        self.descriptor_cap.store(cap, std::sync::atomic::Ordering::Relaxed);
    }

    /// Count a client of `user` on `cluster` if every limit leaves room for it.
    pub fn admit(self: &Arc<Self>, limits: Limits, cluster: &str, user: &str) -> Result<Admission, Refusal> {
        let mut c = self.counts.lock().unwrap();
        if c.total >= limits.proxy {
            return Err(Refusal::Proxy { limit: limits.proxy });
        }
        if c.total >= self.descriptor_cap.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Refusal::Descriptors);
        }
        let in_cluster = c.clusters.get(cluster).copied().unwrap_or(0);
        if let Some(limit) = limits.cluster.filter(|l| in_cluster >= *l) {
            return Err(Refusal::Cluster {
                cluster: cluster.to_string(),
                limit,
            });
        }
        let of_user = c.users.get(user).copied().unwrap_or(0);
        if let Some(limit) = limits.user.filter(|l| of_user >= *l) {
            return Err(Refusal::User {
                user: user.to_string(),
                limit,
            });
        }
        c.total += 1;
        *c.clusters.entry(cluster.to_string()).or_default() += 1;
        *c.users.entry(user.to_string()).or_default() += 1;
        Ok(Admission {
            admissions: self.clone(),
            cluster: cluster.to_string(),
            user: user.to_string(),
        })
    }

    /// A client carried from a predecessor process (binary upgrade): counted like any
    /// other, never refused (it is connected already, and was admitted there).
    pub fn admit_carried(self: &Arc<Self>, cluster: &str, user: &str) -> Admission {
        let mut c = self.counts.lock().unwrap();
        c.total += 1;
        *c.clusters.entry(cluster.to_string()).or_default() += 1;
        *c.users.entry(user.to_string()).or_default() += 1;
        Admission {
            admissions: self.clone(),
            cluster: cluster.to_string(),
            user: user.to_string(),
        }
    }

    /// Count a refusal or a fired timeout of `cluster` (`what`: its label).
    pub fn note(&self, cluster: &str, what: &'static str) {
        *self
            .events
            .lock()
            .unwrap()
            .entry((cluster.to_string(), what))
            .or_default() += 1;
    }

    /// Clients, refusals and timeouts of `cluster`.
    pub fn view(&self, cluster: &str) -> LimitsView {
        let (proxy_clients, clients) = self.counted(cluster);
        let counts = self
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, _), _)| c == cluster)
            .map(|((_, what), n)| (*what, *n))
            .collect();
        LimitsView {
            clients,
            proxy_clients,
            counts,
        }
    }

    /// The descriptor cap in force (u32::MAX: none set).
    pub fn descriptor_cap(&self) -> u32 {
        self.descriptor_cap.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Clients counted now: all, and of `cluster`.
    pub fn counted(&self, cluster: &str) -> (u32, u32) {
        let c = self.counts.lock().unwrap();
        (c.total, c.clusters.get(cluster).copied().unwrap_or(0))
    }
}

impl Admission {
    /// Count this client under `user` instead, if `limit` (that user's `max_clients`)
    /// leaves room.
    pub fn change_user(&mut self, limit: Option<u32>, user: &str) -> Result<(), Refusal> {
        if user == self.user {
            return Ok(());
        }
        let mut guard = self.admissions.counts.lock().unwrap();
        let users = &mut guard.users;
        let of_user = users.get(user).copied().unwrap_or(0);
        if let Some(limit) = limit.filter(|l| of_user >= *l) {
            return Err(Refusal::User {
                user: user.to_string(),
                limit,
            });
        }
        *users.entry(user.to_string()).or_default() += 1;
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
        self.user = user.to_string();
        Ok(())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut guard = self.admissions.counts.lock().unwrap();
        let c = &mut *guard;
        c.total -= 1;
        for (map, key) in [(&mut c.clusters, &self.cluster), (&mut c.users, &self.user)] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

/// Lets one log line through per interval and counts the events it stood for, so a
/// flood of the same failure (refusals, `accept` out of descriptors) costs a line per
/// interval, not a line each.
pub struct Throttle {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(Duration::from_secs(10))
    }
}

impl Throttle {
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// One more event at `now`: Some(events since the last line, this one included)
    /// when a line is due.
    pub fn hit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap();
        s.1 += 1;
        match s.0 {
            Some(last) if now.duration_since(last) < self.interval => None,
            _ => {
                let n = s.1;
                *s = (Some(now), 0);
                Some(n)
            }
        }
    }

    /// Events held back since the last line, once the interval has passed since it:
    /// their line is due although no new event came to let it through (the flood ended).
    pub fn due(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap();
        match s.0 {
            Some(last) if s.1 > 0 && now.duration_since(last) >= self.interval => {
                let n = s.1;
                *s = (Some(now), 0);
                Some(n)
            }
            _ => None,
        }
    }
}

/// A `Throttle` per key (e.g. ended sessions per cluster and code).
#[derive(Default)]
pub struct Throttles(Mutex<HashMap<String, Arc<Throttle>>>);

impl Throttles {
    pub fn hit(&self, key: &str, now: Instant) -> Option<u64> {
        let t = self.0.lock().unwrap().entry(key.to_string()).or_default().clone();
        t.hit(now)
    }

    /// The keys whose held-back events are due (`Throttle::due`).
    pub fn due(&self, now: Instant) -> Vec<(String, u64)> {
        let map = self.0.lock().unwrap();
        map.iter().filter_map(|(k, t)| Some((k.clone(), t.due(now)?))).collect()
    }
}

/// Log what the throttles held back once a flood is over (every second, from the
/// control runtime): without this, the count of the last interval of a burst would
/// wait for the next event, which may never come.
pub fn flush_logs(shared: &Shared) {
    let now = Instant::now();
    let a = &shared.admissions;
    if let Some(n) = a.refusals_logged.due(now) {
        warn!(
            refused = n,
            "clients refused by a limit (refused: how many since the last such line)"
        );
    }
    for (kind, t) in a.timeouts_logged.iter().enumerate() {
        if let Some(n) = t.due(now) {
            tracing::info!(
                timeout = ["client_idle", "idle_transaction", "query"][kind],
                fired = n,
                "client timeouts (fired: how many since the last such line)"
            );
        }
    }
    for (key, n) in a.session_ends.due(now) {
        warn!(key = %key, ended = n, "sessions ended by proxy (ended: how many like the last such line since it)");
    }
}

/// Raise this process's soft `RLIMIT_NOFILE` to its hard limit (as nginx and HAProxy
/// do): the default soft limit of 1024 would cap clients far below what the machine
/// allows. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return r.rlim_max;
            }
        }
        r.rlim_cur
    }
}

/// This process's soft `RLIMIT_NOFILE` (1024 if it cannot be read).
pub fn fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } {
        0 => r.rlim_cur,
        _ => 1024,
    }
}

/// Descriptors set aside for everything but clients and pools: the event loops, the
/// listeners, logs, the admin side, the accept reserve.
const BASE_DESCRIPTORS: u64 = 64;

/// Descriptors a client may take: its own, and in session mode its server connection's.
fn per_client(config: &Config) -> u64 {
    let session = config
        .clusters
        .values()
        .any(|c| c.pool_mode == crate::config::PoolMode::Session);
    1 + session as u64
}

/// Descriptors the pools and health checks may hold: transaction pools up to
/// `pool_size` per node, user and database (counted for the listed users, one database
/// each); a health check and a manager connection per node.
fn server_descriptors(config: &Config) -> u64 {
    config
        .clusters
        .values()
        .map(|c| {
            let nodes = c.nodes.len() as u64;
            let pools = match c.pool_mode {
                crate::config::PoolMode::Transaction => c.pool_size as u64 * nodes * config.users.len().max(1) as u64,
                crate::config::PoolMode::Session => 0,
            };
            pools + 2 * nodes
        })
        .sum()
}

/// File descriptors a config may need at its worst: `max_clients` clients, and what
/// the pools, checks and the process itself hold.
pub fn descriptors_needed(config: &Config) -> u64 {
    config.proxy.max_clients as u64 * per_client(config) + server_descriptors(config) + BASE_DESCRIPTORS
}

/// How many clients `fds` descriptors leave room for with this config.
pub fn descriptor_budget(config: &Config, fds: u64) -> u32 {
    let left = fds.saturating_sub(server_descriptors(config) + BASE_DESCRIPTORS);
    (left / per_client(config)).min(u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(proxy: u32, cluster: Option<u32>, user: Option<u32>) -> Limits {
        Limits { proxy, cluster, user }
    }

    #[test]
    fn each_limit_refuses_the_client_over_it_and_frees_its_place_on_drop() {
        let a = Arc::new(Admissions::default());
        let l = limits(3, Some(2), Some(1));
        let first = a.admit(l, "main", "app").unwrap();
        assert_eq!(
            a.admit(l, "main", "app").err(),
            Some(Refusal::User {
                user: "app".into(),
                limit: 1
            })
        );
        let second = a.admit(l, "main", "other").unwrap();
        assert_eq!(
            a.admit(l, "main", "third").err(),
            Some(Refusal::Cluster {
                cluster: "main".into(),
                limit: 2
            })
        );
        let third = a.admit(l, "analytics", "third").unwrap();
        assert_eq!(
            a.admit(l, "analytics", "fourth").err(),
            Some(Refusal::Proxy { limit: 3 })
        );
        assert_eq!(a.counted("main"), (3, 2));
        drop(first);
        assert_eq!(a.counted("main"), (2, 1));
        // The user's place is free again, and so are the cluster's and the proxy's.
        let again = a.admit(l, "main", "app").unwrap();
        drop((second, third, again));
        assert_eq!(a.counted("main"), (0, 0));
        assert!(a.counts.lock().unwrap().users.is_empty());
    }

    #[test]
    fn a_change_of_user_moves_the_count_if_the_new_users_limit_has_room() {
        let a = Arc::new(Admissions::default());
        let l = limits(10, None, Some(1));
        let mut first = a.admit(l, "main", "app").unwrap();
        let _second = a.admit(l, "main", "batch").unwrap();
        assert_eq!(
            first.change_user(Some(1), "batch"),
            Err(Refusal::User {
                user: "batch".into(),
                limit: 1
            })
        );
        first.change_user(Some(1), "reports").unwrap();
        let users = |a: &Admissions| a.counts.lock().unwrap().users.clone();
        assert_eq!(users(&a).get("app"), None, "app's place is free");
        assert_eq!(users(&a).get("reports"), Some(&1));
        assert_eq!(a.counted("main"), (2, 2), "still one client each");
        let _app = a.admit(l, "main", "app").unwrap();
        drop(first);
        assert_eq!(users(&a).get("reports"), None);
    }

    #[test]
    fn held_back_events_are_due_once_the_interval_has_passed() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.due(t0), None, "nothing yet");
        assert_eq!(t.hit(t0), Some(1));
        assert_eq!(t.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.hit(t0 + Duration::from_secs(2)), None);
        assert_eq!(t.due(t0 + Duration::from_secs(9)), None, "within the interval");
        assert_eq!(t.due(t0 + Duration::from_secs(10)), Some(2), "the two held back");
        assert_eq!(t.due(t0 + Duration::from_secs(30)), None, "said once");
        let keyed = Throttles::default();
        assert_eq!(keyed.hit("main/08006", t0), Some(1));
        assert_eq!(keyed.hit("main/57P01", t0), Some(1), "another key has its own");
        assert_eq!(keyed.hit("main/08006", t0), None);
        assert_eq!(
            keyed.due(t0 + Duration::from_secs(10)),
            vec![("main/08006".to_string(), 1)]
        );
    }

    #[test]
    fn a_refused_client_is_not_counted() {
        let a = Arc::new(Admissions::default());
        let l = limits(1, None, None);
        let _one = a.admit(l, "main", "app").unwrap();
        for _ in 0..5 {
            assert!(a.admit(l, "main", "app").is_err());
        }
        assert_eq!(a.counted("main"), (1, 1));
    }

    #[test]
    fn refusals_carry_53300_and_mysql_1040_or_1203() {
        let proxy = Refusal::Proxy { limit: 5 }.error();
        assert_eq!(proxy.code().as_str(), "53300");
        assert_eq!(proxy.mysql_code().number, 1040);
        assert!(proxy.message().contains("proxy.max_clients"));
        let user = Refusal::User {
            user: "app".into(),
            limit: 2,
        }
        .error();
        assert_eq!(user.code().as_str(), "53300");
        assert_eq!(user.mysql_code().number, 1203);
        assert!(user.message().contains("\"app\""));
    }

    #[test]
    fn the_throttle_lets_one_line_through_per_interval_with_the_count() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.hit(t0), Some(1));
        for i in 1..=4 {
            assert_eq!(t.hit(t0 + Duration::from_secs(i)), None);
        }
        // The line after the interval stands for the four held back and itself.
        assert_eq!(t.hit(t0 + Duration::from_secs(11)), Some(5));
        assert_eq!(t.hit(t0 + Duration::from_secs(12)), None);
    }
}
