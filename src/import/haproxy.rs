//! `switchyard import haproxy --cfg haproxy.cfg`: an HAProxy + Patroni setup as a
//! `switchyard.toml`.
//!
//! HAProxy in front of Patroni listens on one port per role (`bind *:5000` for the
//! primary, `*:5001` for the replicas) and learns which servers serve it by asking
//! Patroni's REST API (`option httpchk OPTIONS /primary`, `check port 8008`). Switchyard
//! asks PostgreSQL itself and serves both roles of one cluster: so each tcp-mode
//! `listen` (or `frontend` and its `default_backend`) is read as a role, from the
//! Patroni endpoint its check asks, and the ones whose servers are the same set become
//! one cluster, primary checks as its `listen_rw`, replica checks as its `listen_ro`.
//! Anything else (HTTP services, routing by ACL, checks that are not Patroni's) is not
//! converted and said so; if nothing is left, the import fails with the reasons.
//!
//! HAProxy has no users: the logins pass through to PostgreSQL. The output looks them up
//! there (`[auth_query]`) with the password of a login the operator gives in the
//! environment (`PASSWORD_ENV`), and shows how to list users instead.
//!
//! The reader of HAProxy's file is in `read.rs`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::{name_of, quote, unique_name, write_node, ImportError, Notes};
use read::{listen_addr, millis, server_addr, server_options, Kind, Line, Section};

mod read;

/// The file to convert (its text and the name to cite in messages).
pub struct Input<'a> {
    pub cfg: &'a str,
    pub cfg_name: &'a str,
}

/// The login the health monitor and `[auth_query]` use, until the operator says
/// otherwise: Patroni's superuser.
const LOGIN_USER: &str = "postgres";

/// Where that login's password comes from; `switchyard check` needs it set.
pub const PASSWORD_ENV: &str = "SWITCHYARD_POSTGRES_PASSWORD";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Rw,
    Ro,
}

/// Patroni's REST API health checks: the role a backend checking one serves here, or
/// none, and what differs in Switchyard ("" when nothing does).
const ENDPOINTS: &[(&str, Option<Role>, &str)] = &[
    ("/", Some(Role::Rw), ""),
    ("/primary", Some(Role::Rw), ""),
    ("/master", Some(Role::Rw), ""),
    ("/read-write", Some(Role::Rw), ""),
    (
        "/leader",
        Some(Role::Rw),
        "Patroni's /leader is also true for the leader of a standby cluster, which is read-only; listen_rw serves only a primary",
    ),
    (
        "/standby-leader",
        Some(Role::Ro),
        "Patroni's /standby-leader is only the leader of a standby cluster; listen_ro reads from any of its standbys within max_replica_lag_ms",
    ),
    ("/replica", Some(Role::Ro), ""),
    (
        "/read-only",
        Some(Role::Ro),
        "Patroni's /read-only includes the primary, so HAProxy spread reads over it too; listen_ro reads from the primary only when no standby is within max_replica_lag_ms",
    ),
    (
        "/sync",
        Some(Role::Ro),
        "Patroni's /sync is only the synchronous standbys; listen_ro reads from any standby within max_replica_lag_ms (and, with read_your_writes, a client's reads see its own writes)",
    ),
    (
        "/synchronous",
        Some(Role::Ro),
        "Patroni's /synchronous is only the synchronous standbys; listen_ro reads from any standby within max_replica_lag_ms (and, with read_your_writes, a client's reads see its own writes)",
    ),
    (
        "/async",
        Some(Role::Ro),
        "Patroni's /async is only the asynchronous standbys; listen_ro reads from any standby within max_replica_lag_ms",
    ),
    (
        "/asynchronous",
        Some(Role::Ro),
        "Patroni's /asynchronous is only the asynchronous standbys; listen_ro reads from any standby within max_replica_lag_ms",
    ),
    (
        "/read-only-sync",
        Some(Role::Ro),
        "Patroni's /read-only-sync is the synchronous standbys and the primary; listen_ro reads from any standby within max_replica_lag_ms, else the primary",
    ),
    (
        "/quorum",
        Some(Role::Ro),
        "Patroni's /quorum is only the quorum standbys; listen_ro reads from any standby within max_replica_lag_ms",
    ),
    (
        "/read-only-quorum",
        Some(Role::Ro),
        "Patroni's /read-only-quorum is the quorum standbys and the primary; listen_ro reads from any standby within max_replica_lag_ms, else the primary",
    ),
    (
        "/health",
        None,
        "Patroni's /health is true on any running node, whatever its role: no Switchyard endpoint sends clients to every node alike",
    ),
    ("/liveness", None, "Patroni's /liveness says only that Patroni runs"),
    ("/readiness", None, "Patroni's /readiness says only that the node is ready"),
];

/// Lines of tcp-mode proxies, `defaults` and `global` that need nothing in Switchyard or
/// have no equivalent there, with why (said once each, in the closing comment). Keyed
/// by the first word, or the first two for `option`, `timeout`, `http-check`, `stats`.
const NO_EQUIVALENT: &[(&str, &str)] = &[
    (
        "log",
        "Switchyard logs to stderr (journald under systemd; --log-format json)",
    ),
    (
        "log-format",
        "Switchyard logs to stderr (journald under systemd; --log-format json)",
    ),
    ("option tcplog", "sessions are logged at info (start, end, node)"),
    ("option httplog", "HTTP only"),
    ("option dontlognull", "sessions are logged at info (start, end, node)"),
    (
        "option log-health-checks",
        "node state changes are logged and in /status",
    ),
    (
        "option redispatch",
        "not needed: a session that cannot log in to a node tries the next candidate",
    ),
    ("option tcpka", "not configurable"),
    ("option clitcpka", "not configurable"),
    ("option srvtcpka", "not configurable"),
    ("option forwardfor", "HTTP only"),
    ("option http-server-close", "HTTP only"),
    ("option httpclose", "HTTP only"),
    ("option http-keep-alive", "HTTP only"),
    ("option abortonclose", "a client that leaves ends its session"),
    (
        "timeout queue",
        "a session waiting under max_server_connections waits up to connect_timeout_ms",
    ),
    ("timeout http-request", "HTTP only"),
    ("timeout http-keep-alive", "HTTP only"),
    ("timeout client-fin", "not needed"),
    ("timeout server-fin", "not needed"),
    ("timeout tarpit", "HTTP only"),
    ("chroot", "confine it with systemd (the unit's ProtectSystem=strict)"),
    ("user", "run it as a dedicated user (the Debian package's unit does)"),
    ("group", "run it as a dedicated user (the Debian package's unit does)"),
    ("uid", "run it as a dedicated user (the Debian package's unit does)"),
    ("gid", "run it as a dedicated user (the Debian package's unit does)"),
    (
        "daemon",
        "Switchyard runs in the foreground, under systemd or a container runtime",
    ),
    (
        "master-worker",
        "Switchyard runs in the foreground, under systemd or a container runtime",
    ),
    ("pidfile", "no pid file: run it under systemd or a container runtime"),
    (
        "stats socket",
        "the admin console (psql -d switchyard) and the admin HTTP endpoint",
    ),
    (
        "stats timeout",
        "the admin console (psql -d switchyard) and the admin HTTP endpoint",
    ),
    ("nbthread", "proxy.threads: one worker per core unless set"),
    ("nbproc", "proxy.threads: one worker per core unless set"),
    ("cpu-map", "not configurable"),
    (
        "ulimit-n",
        "LimitNOFILE in the systemd unit (see the Limits and timeouts guide)",
    ),
    ("maxpipes", "not needed"),
    (
        "spread-checks",
        "checks of the nodes run in parallel every health.interval_ms",
    ),
    ("retries", "used for connect_timeout_ms"),
    ("fullconn", "no dynamic server limits; max_server_connections is fixed"),
    ("hash-type", "reads are spread by read_balance"),
    ("source", "not configurable"),
    ("acl", "Switchyard routes by port only"),
    ("tcp-request", "Switchyard routes by port only"),
    ("tcp-response", "Switchyard routes by port only"),
    ("errorfile", "HTTP only"),
    ("http-request", "HTTP only"),
    ("http-response", "HTTP only"),
    ("compression", "HTTP only"),
    ("cookie", "HTTP only"),
    (
        "option tcp-check",
        "Switchyard checks each node by logging in to PostgreSQL ([health])",
    ),
    (
        "tcp-check",
        "Switchyard checks each node by logging in to PostgreSQL ([health])",
    ),
    (
        "option pgsql-check",
        "Switchyard checks each node by logging in to PostgreSQL ([health])",
    ),
    (
        "external-check",
        "Switchyard checks each node by logging in to PostgreSQL ([health])",
    ),
];

/// Server options (`server` and `default-server` lines) with no equivalent, with why.
const SERVER_OPTIONS: &[(&str, &str)] = &[
    ("fastinter", "one check interval for all states (health.interval_ms)"),
    ("downinter", "one check interval for all states (health.interval_ms)"),
    ("slowstart", "a node that comes back gets its share at once"),
    ("weight", "reads are spread by read_balance, without weights"),
    ("backup", "no backup nodes: the role a node reports decides what it serves"),
    (
        "disabled",
        "listed as a node all the same: Switchyard checks it like the others (remove it if it must not serve)",
    ),
    ("addr", "Switchyard checks the node's own address"),
    (
        "check-ssl",
        "not needed: that was TLS toward Patroni's REST API, which Switchyard does not ask",
    ),
    ("verify", "not needed: that was for TLS toward the server or Patroni's REST API"),
    ("ca-file", "not needed: that was for TLS toward the server or Patroni's REST API (server_ca_file checks the servers' own TLS)"),
    ("crt", "client certificates toward the servers are not supported"),
    (
        "ssl",
        "HAProxy opened TLS to the server directly; Switchyard uses PostgreSQL's own TLS negotiation toward the servers (server_tls, default prefer)",
    ),
    (
        "resolvers",
        "node host names are resolved at each connection, by the system resolver",
    ),
    ("init-addr", "node host names are resolved at each connection"),
    ("send-proxy", "the PROXY protocol toward the servers is not supported"),
    ("send-proxy-v2", "the PROXY protocol toward the servers is not supported"),
    ("agent-check", "Switchyard checks each node by logging in to PostgreSQL ([health])"),
    ("minconn", "max_server_connections is fixed"),
    ("maxqueue", "waiting sessions are bounded in time (connect_timeout_ms), not in number"),
    ("on-marked-up", "no backup sessions to end"),
    ("error-limit", "a node is Down after health.fall failed checks"),
    ("observe", "a node is Down after health.fall failed checks"),
];

/// Words of section names that say a role, not which cluster (dropped from cluster names).
const ROLE_WORDS: &[&str] = &[
    "primary", "master", "leader", "rw", "write", "writer", "writes", "read", "reads", "reader", "ro", "only",
    "replica", "replicas", "standby", "standbys", "slave", "slaves", "sync", "async", "backend", "frontend", "listen",
    "be", "fe", "ft", "bk", "front", "back",
];

/// The sections as read, and the lines whose setting was used (the others are listed).
struct Cfg<'a> {
    sections: &'a [Section],
    used: RefCell<BTreeSet<usize>>,
}

impl<'a> Cfg<'a> {
    /// The last line of section `i` whose first words are `key`, else of the `defaults`
    /// it inherits (`no option X` in the section cancels the default's `option X`);
    /// marked used.
    fn get(&self, i: usize, key: &str) -> Option<&'a Line> {
        let found = self.get_all(i, key).pop();
        if let Some(l) = found {
            self.used.borrow_mut().insert(l.line);
        }
        found
    }

    /// Every such line, the defaults' first (only when the section has none of its own).
    fn get_all(&self, i: usize, key: &str) -> Vec<&'a Line> {
        let key: Vec<&str> = key.split(' ').collect();
        let matches = |l: &&Line| l.words.len() >= key.len() && key.iter().zip(&l.words).all(|(k, w)| k == w);
        let own: Vec<&Line> = self.sections[i].lines.iter().filter(matches).collect();
        if !own.is_empty() {
            return own;
        }
        let negated = self.sections[i].lines.iter().any(|l| {
            l.words.first().is_some_and(|w| w == "no")
                && l.words[1..].iter().map(String::as_str).eq(key.iter().copied())
        });
        match self.sections[i].defaults {
            Some(d) if !negated => self.sections[d].lines.iter().filter(matches).collect(),
            _ => Vec::new(),
        }
    }

    /// A time setting in milliseconds, with the line it came from and where that is.
    fn millis(&self, i: usize, key: &str, notes: &mut Notes) -> Option<Setting> {
        self.value(i, key, notes, millis, "a time")
    }

    fn number(&self, i: usize, key: &str, notes: &mut Notes) -> Option<Setting> {
        self.value(i, key, notes, |v| v.parse().ok(), "a number")
    }

    fn value(
        &self,
        i: usize,
        key: &str,
        notes: &mut Notes,
        parse: impl Fn(&str) -> Option<u64>,
        what: &str,
    ) -> Option<Setting> {
        let l = self.get(i, key)?;
        let own = self.sections[i].lines.iter().any(|x| x.line == l.line);
        let place = if own {
            self.sections[i].title()
        } else {
            "defaults".into()
        };
        match l.arg(key.split(' ').count()).and_then(parse) {
            Some(v) => Some(Setting {
                v,
                text: l.text(),
                place,
            }),
            None => {
                notes.add(format!(
                    "{} ({place}, line {}): not {what}; not imported",
                    l.text(),
                    l.line
                ));
                None
            }
        }
    }

    fn mark(&self, line: usize) {
        self.used.borrow_mut().insert(line);
    }
}

/// A numeric setting: its value, its line as written, and the section it is in.
#[derive(Debug, Clone)]
struct Setting {
    v: u64,
    text: String,
    place: String,
}

impl Setting {
    /// `timeout connect 4s (defaults)`.
    fn from(&self) -> String {
        format!("{} ({})", self.text, self.place)
    }

    fn pair(&self) -> (u64, String) {
        (self.v, self.from())
    }
}

/// One `server` line, with the `default-server` options it inherits.
#[derive(Debug, Clone)]
struct Server {
    name: String,
    host: String,
    port: u16,
    opts: BTreeMap<String, Option<String>>,
}

/// A port clients connect to and the servers it sends them to: a `listen` section, or a
/// `frontend` with its `default_backend`.
struct Listener {
    front: usize,
    back: usize,
    addr: String,
    role: Role,
    /// The check as written (`OPTIONS /primary`).
    check: String,
    servers: Vec<Server>,
}

impl Listener {
    fn title(&self, sections: &[Section]) -> String {
        if self.front == self.back {
            sections[self.front].title()
        } else {
            format!("{} ({})", sections[self.front].title(), sections[self.back].title())
        }
    }
}

/// What becomes one `[clusters.NAME]`: listeners on the same servers, one per role.
struct ClusterOut {
    servers: Vec<Server>,
    rw: Option<usize>,
    ro: Option<usize>,
}

/// Convert; the result is the text of a `switchyard.toml`.
pub fn convert(input: &Input) -> Result<String, ImportError> {
    let sections = read::parse(input.cfg_name, input.cfg)?;
    let cfg = Cfg {
        sections: &sections,
        used: RefCell::new(BTreeSet::new()),
    };
    let mut notes = Notes::default();
    // Sections not converted at all: said once each, their lines not listed one by one.
    let mut skipped: BTreeSet<usize> = BTreeSet::new();
    let mut admin: Option<(String, String)> = None;
    let mut listeners: Vec<Listener> = Vec::new();
    let mut referenced: BTreeSet<String> = BTreeSet::new();

    for (i, s) in sections.iter().enumerate() {
        match s.kind {
            Kind::Other => {
                let why = match s.keyword.as_str() {
                    "userlist" => "HAProxy's users for HTTP authentication, not database logins",
                    "resolvers" => "node host names are resolved by the system resolver at each connection",
                    "peers" => "no stick tables to share; several instances agree through etcd ([coordination])",
                    _ => "no equivalent",
                };
                notes.add(format!(
                    "{} (line {}): {} settings not imported: {why}",
                    s.title(),
                    s.line,
                    s.lines.len()
                ));
                skipped.insert(i);
            }
            Kind::Frontend | Kind::Listen => {
                for l in cfg
                    .get_all(i, "use_backend")
                    .into_iter()
                    .chain(cfg.get_all(i, "default_backend"))
                {
                    referenced.insert(l.arg(1).unwrap_or_default().to_string());
                }
                match listener(&cfg, i, &mut notes, &mut admin) {
                    Ok(l) => listeners.push(l),
                    Err(reason) => {
                        notes.add(format!("{} (line {}): {reason}; not imported", s.title(), s.line));
                        skipped.insert(i);
                    }
                }
            }
            _ => {}
        }
    }
    for (i, s) in sections.iter().enumerate() {
        if s.kind == Kind::Backend && !listeners.iter().any(|l| l.back == i) {
            if !referenced.contains(&s.name) {
                notes.add(format!(
                    "{} (line {}): no frontend sends clients to it; not imported",
                    s.title(),
                    s.line
                ));
            }
            skipped.insert(i);
        }
    }
    if listeners.is_empty() {
        let mut reason = String::from(
            "nothing to import: no tcp-mode listen or frontend whose servers are checked against Patroni's REST API (option httpchk OPTIONS /primary, /replica, ...; check port 8008)",
        );
        for n in &notes.0 {
            let _ = write!(reason, "\n- {n}");
        }
        return Err(ImportError::Unsupported {
            file: input.cfg_name.to_string(),
            reason,
        });
    }

    // Listeners on the same set of servers share a cluster, one listener per role; a
    // second of the same role opens another cluster on those servers.
    let mut clusters: Vec<ClusterOut> = Vec::new();
    let key = |servers: &[Server]| {
        let mut k: Vec<(String, u16)> = servers.iter().map(|s| (s.host.clone(), s.port)).collect();
        k.sort();
        k
    };
    for (li, l) in listeners.iter().enumerate() {
        let at = clusters.iter().position(|c| {
            key(&c.servers) == key(&l.servers)
                && match l.role {
                    Role::Rw => c.rw.is_none(),
                    Role::Ro => c.ro.is_none(),
                }
        });
        let c = match at {
            Some(at) => &mut clusters[at],
            None => {
                clusters.push(ClusterOut {
                    servers: l.servers.clone(),
                    rw: None,
                    ro: None,
                });
                clusters.last_mut().expect("just pushed")
            }
        };
        match l.role {
            Role::Rw => c.rw = Some(li),
            Role::Ro => c.ro = Some(li),
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by `switchyard import haproxy` from {}.\n\
         # Review it, then: {PASSWORD_ENV}=... switchyard check --config switchyard.toml\n\
         # Before it passes, give the password of PostgreSQL's \"{LOGIN_USER}\" user in {PASSWORD_ENV}\n\
         # (or password_file), or list your users in [[users]] (see below).\n\
         # Patroni still promotes; Switchyard follows the role each node reports (failover = \"follow\").\n\
         # HAProxy settings with no equivalent are listed at the end.\n",
        input.cfg_name
    );

    // [proxy]: the global section.
    let mut proxy = String::new();
    for (i, s) in sections.iter().enumerate() {
        if s.kind != Kind::Global {
            continue;
        }
        if let Some(n) = cfg.number(i, "maxconn", &mut notes).filter(|n| n.v > 0) {
            let _ = writeln!(
                proxy,
                "max_clients = {}  # {}: HAProxy leaves further clients waiting; Switchyard refuses them with 53300",
                n.v,
                n.from()
            );
        }
        if let Some(t) = cfg.millis(i, "hard-stop-after", &mut notes) {
            let _ = writeln!(proxy, "shutdown_timeout_ms = {}  # {}", t.v, t.from());
        }
    }
    if !proxy.is_empty() {
        let _ = writeln!(out, "[proxy]\n{proxy}");
    }

    // [health]: one set of values for all nodes; HAProxy's are per server.
    let mut interval: Vec<(u64, String)> = Vec::new();
    let mut fall: Vec<(u64, String)> = Vec::new();
    let mut rise: Vec<(u64, String)> = Vec::new();
    let mut check_timeout: Vec<(u64, String)> = Vec::new();
    let mut check_port: Option<String> = None;
    for l in &listeners {
        let title = l.title(&sections);
        for s in &l.servers {
            let opt = |k: &str| s.opts.get(k).cloned().flatten();
            if let Some(v) = opt("inter").as_deref().and_then(millis) {
                interval.push((v, format!("inter {} ({title})", opt("inter").unwrap_or_default())));
            }
            if let Some(v) = opt("fall").and_then(|v| v.parse().ok()) {
                fall.push((v, format!("fall {v} ({title})")));
            }
            if let Some(v) = opt("rise").and_then(|v| v.parse().ok()) {
                rise.push((v, format!("rise {v} ({title})")));
            }
            check_port = check_port.or(opt("port"));
        }
        if let Some(t) = cfg.millis(l.back, "timeout check", &mut notes) {
            check_timeout.push(t.pair());
        }
    }
    let _ = writeln!(
        out,
        "# HAProxy asked Patroni's REST API{} which node is the primary;\n\
         # Switchyard asks PostgreSQL itself on every node (role, replay lag), logging in as\n\
         # this user (a superuser, or a role with pg_monitor and its own password).\n\
         [health]\nuser = {}\npassword_env = {}",
        check_port
            .map(|p| format!(" (check port {})", read::printable(&p)))
            .unwrap_or_default(),
        quote(LOGIN_USER),
        quote(PASSWORD_ENV)
    );
    for (key, values) in [
        ("interval_ms", &interval),
        ("fall", &fall),
        ("rise", &rise),
        ("timeout_ms", &check_timeout),
    ] {
        if let Some((v, from)) = first_of(values, key, &mut notes) {
            if v > 0 {
                let _ = writeln!(out, "{key} = {v}  # {from}");
            }
        }
    }
    out.push('\n');

    // Users: HAProxy has none.
    let _ = writeln!(
        out,
        "# HAProxy passed each login through to PostgreSQL. Switchyard checks logins itself,\n\
         # then logs in to the servers as the same user: [auth_query] looks users up on the\n\
         # servers (their SCRAM verifier in pg_authid: passwords set with\n\
         # password_encryption = 'scram-sha-256'), logging in as \"{LOGIN_USER}\" (or a role that\n\
         # may run a SECURITY DEFINER lookup function: see the TLS and secrets guide).\n\
         [auth_query]\nuser = {}\npassword_env = {}\n",
        quote(LOGIN_USER),
        quote(PASSWORD_ENV)
    );
    let _ = writeln!(
        out,
        "# Or list your applications' users (and drop [auth_query]), each with its password,\n\
         # password_file or password_env, or its SCRAM verifier from pg_authid:\n\
         # [[users]]\n\
         # name = \"app\"\n\
         # password_env = \"APP_PASSWORD\"\n"
    );

    if let Some((addr, title)) = &admin {
        let _ = writeln!(
            out,
            "# HAProxy's statistics page ({title}): Switchyard's admin HTTP endpoint serves a status\n\
             # page, /status, /metrics and Patroni-style role checks. Give it a token\n\
             # (admin.token_file or token_env) before opening it to the network:\n\
             # [admin]\n\
             # http_listen = {}\n",
            quote(addr)
        );
    }

    // Clusters.
    let mut taken: Vec<String> = Vec::new();
    let mut written: Vec<(String, Vec<Server>)> = Vec::new();
    for c in &clusters {
        let members: Vec<&Listener> = [c.rw, c.ro].into_iter().flatten().map(|i| &listeners[i]).collect();
        let base = members
            .iter()
            .flat_map(|l| [l.front, l.back])
            .map(|i| cluster_name(&sections[i].name))
            .find(|n| !n.is_empty())
            .unwrap_or_else(|| "main".into());
        // A further cluster on servers another one has is named after its own section.
        let base = if taken.contains(&base) {
            name_of(&sections[members[0].front].name)
        } else {
            base
        };
        let name = unique_name(base, &mut taken);
        let titles: Vec<String> = members.iter().map(|l| l.title(&sections)).collect();
        let _ = writeln!(out, "# From {}.", titles.join(" and "));
        if let Some(first) = written.iter().find(|(_, servers)| key(servers) == key(&c.servers)) {
            let _ = writeln!(
                out,
                "# A further cluster on the servers of cluster {}, so that this port keeps serving.",
                first.0
            );
        }
        written.push((name.clone(), c.servers.clone()));
        let _ = writeln!(out, "[clusters.{name}]");
        for l in &members {
            let (key, what) = match l.role {
                Role::Rw => ("listen_rw", "the primary"),
                Role::Ro => ("listen_ro", "a standby within max_replica_lag_ms, else the primary"),
            };
            let _ = writeln!(
                out,
                "{key} = {}  # {}: {}; here {what}",
                quote(&l.addr),
                l.title(&sections),
                read::printable(&l.check)
            );
        }
        let _ = writeln!(
            out,
            "pool_mode = \"session\"  # as HAProxy: each client keeps its own server connection (\"transaction\" pools them)"
        );
        if let Some(ro) = c.ro {
            let l = &listeners[ro];
            let (algo, from) = match cfg.get(l.back, "balance") {
                Some(b) => (b.arg(1).unwrap_or_default().to_string(), b.text()),
                None => (
                    "roundrobin".to_string(),
                    "HAProxy's default balance roundrobin".to_string(),
                ),
            };
            match algo.as_str() {
                "roundrobin" | "static-rr" => {
                    let _ = writeln!(out, "read_balance = \"round_robin\"  # {from}");
                }
                "leastconn" => {
                    let _ = writeln!(out, "read_balance = \"least_connections\"  # {from}");
                }
                "first" => {
                    let _ = writeln!(out, "read_balance = \"priority\"  # {from}: the first node in order");
                }
                other => notes.add(format!(
                    "{}: balance {other}: no equivalent; reads go to the first standby in order (read_balance = \"priority\")",
                    l.title(&sections)
                )),
            }
        }
        if let Some(rw) = c.rw {
            let l = &listeners[rw];
            if let Some(b) = cfg.get(l.back, "balance") {
                notes.add(format!(
                    "{}: {}: not needed: one node is the primary",
                    l.title(&sections),
                    b.text()
                ));
            }
        }
        cluster_keys(&cfg, &sections, &members, &mut out, &mut notes);
        out.push('\n');
        let mut node_names: Vec<String> = Vec::new();
        for s in &c.servers {
            let node = unique_name(name_of(&s.name), &mut node_names);
            write_node(&mut out, &name, &node, &s.host, s.port);
        }
        if c.servers.iter().any(|s| s.port == 6432) {
            notes.add(format!(
                "cluster {name}: nodes on port 6432, PgBouncer's: if each node runs a PgBouncer, point the nodes at PostgreSQL itself (Switchyard pools)"
            ));
        }
    }

    // What did not carry over.
    let mut server_opts: BTreeMap<String, (String, &str)> = BTreeMap::new();
    for l in &listeners {
        for s in &l.servers {
            for (k, v) in &s.opts {
                let why = match SERVER_OPTIONS.iter().find(|(o, _)| o == k) {
                    Some((_, why)) => *why,
                    None if k == "on-marked-down" && v.as_deref() == Some("shutdown-sessions") => {
                        "not needed: a session ends when its node goes down or stops being primary"
                    }
                    None if matches!(
                        k.as_str(),
                        "check" | "port" | "inter" | "fall" | "rise" | "maxconn" | "enabled"
                    ) =>
                    {
                        continue
                    }
                    None => "no equivalent",
                };
                // Said once per option, with the first value seen.
                let shown = match v {
                    Some(v) if k != "crt" && k != "ca-file" => format!("{k} {}", read::printable(v)),
                    _ => k.clone(),
                };
                server_opts.entry(k.clone()).or_insert((shown, why));
            }
        }
    }
    for (shown, why) in server_opts.into_values() {
        notes.add(format!("server option {shown}: {why}"));
    }
    let used = cfg.used.borrow();
    for (i, s) in sections.iter().enumerate() {
        if skipped.contains(&i) {
            continue;
        }
        for l in &s.lines {
            if used.contains(&l.line) || matches!(l.words[0].as_str(), "server" | "default-server") {
                continue;
            }
            let text = redacted(l);
            let key2 = l.words.iter().take(2).cloned().collect::<Vec<_>>().join(" ");
            let first = l.words[0].as_str();
            let why = NO_EQUIVALENT
                .iter()
                .find(|(k, _)| *k == key2 || *k == first)
                .map(|(_, why)| *why)
                .or_else(|| first.starts_with("tune.").then_some("not needed"))
                .or_else(|| {
                    first
                        .starts_with("ssl-default-")
                        .then_some("Switchyard's TLS ([tls], server_tls) uses rustls' safe defaults")
                });
            match why {
                Some(why) => notes.add(format!("{text} ({}, line {}): {why}", s.title(), l.line)),
                None => notes.add(format!("{text} ({}, line {}): no equivalent", s.title(), l.line)),
            }
        }
    }
    notes.add(
        "TLS: HAProxy relayed PostgreSQL's TLS between clients and servers untouched; Switchyard ends it: clients that require TLS (sslmode=require, verify-*) need a [tls] section with a certificate and key (see the TLS and secrets guide); toward the servers it uses TLS when they offer it (server_tls = \"prefer\")",
    );
    notes.write_to(&mut out);
    Ok(out)
}

/// A line as it can be shown: the keyword alone when it may hold a secret.
fn redacted(l: &Line) -> String {
    let text = l.text();
    let lower = text.to_ascii_lowercase();
    if ["password", "auth", "secret", "token", "key"]
        .iter()
        .any(|w| lower.contains(w))
    {
        format!("{} …", l.words[0])
    } else {
        text
    }
}

/// The first of a setting's values, said in a note when others differ (Switchyard has
/// one value where HAProxy had one per server or backend).
fn first_of(values: &[(u64, String)], key: &str, notes: &mut Notes) -> Option<(u64, String)> {
    let (v, from) = values.first()?.clone();
    let others: BTreeSet<&str> = values
        .iter()
        .filter(|(x, _)| *x != v)
        .map(|(_, f)| f.as_str())
        .collect();
    if !others.is_empty() {
        notes.add(format!(
            "{key}: Switchyard has one value; {from} is written, not {}",
            others.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Some((v, from))
}

/// A cluster name from a section's name without its role words (`postgres_primary` →
/// `postgres`); empty when nothing else is left.
fn cluster_name(section: &str) -> String {
    let kept: Vec<&str> = section
        .split(['_', '-', '.', ':'])
        .filter(|w| !w.is_empty() && !ROLE_WORDS.contains(&w.to_ascii_lowercase().as_str()))
        .collect();
    if kept.is_empty() {
        String::new()
    } else {
        name_of(&kept.join("_"))
    }
}

/// A frontend or listen section as a listener, or why it is not one.
fn listener(cfg: &Cfg, i: usize, notes: &mut Notes, admin: &mut Option<(String, String)>) -> Result<Listener, String> {
    let sections = cfg.sections;
    let s = &sections[i];
    let mode = cfg.get(i, "mode").and_then(|l| l.arg(1)).unwrap_or("tcp").to_string();
    if mode != "tcp" {
        // Only its address is of use (the section is said as a whole).
        let binds = binds(cfg, i, &mut Notes::default());
        let is_stats = s.lines.iter().any(|l| l.words[0] == "stats")
            || s.lines
                .iter()
                .any(|l| l.words.iter().any(|w| w == "prometheus-exporter"));
        if is_stats {
            if let (None, Some(addr)) = (&admin, binds.first()) {
                *admin = Some((addr.clone(), s.title()));
            }
            return Err(format!(
                "mode {mode}: HAProxy's statistics page; see the commented [admin] section"
            ));
        }
        return Err(format!("mode {mode}: an HTTP service, not a database listener"));
    }
    if let Some(l) = s
        .lines
        .iter()
        .find(|l| l.words[0] == "use_backend" && l.words.iter().any(|w| w == "if" || w == "unless"))
    {
        return Err(format!("routes by ACL ({}): Switchyard routes by port only", l.text()));
    }
    let back = if s.kind == Kind::Listen {
        i
    } else {
        let name = cfg
            .get(i, "use_backend")
            .or_else(|| cfg.get(i, "default_backend"))
            .and_then(|l| l.arg(1))
            .ok_or("no default_backend")?;
        let back = sections
            .iter()
            .position(|b| matches!(b.kind, Kind::Backend | Kind::Listen) && b.name == name)
            .ok_or_else(|| format!("backend {name} is not in the file"))?;
        let bmode = cfg.get(back, "mode").and_then(|l| l.arg(1)).unwrap_or("tcp");
        if bmode != "tcp" {
            return Err(format!("backend {name} is in mode {bmode}"));
        }
        back
    };
    let Some(addr) = binds(cfg, i, notes).first().cloned() else {
        return Err("no bind address Switchyard can listen on".into());
    };
    let (role, check) = role_of(cfg, back, notes)?;
    let servers = servers(cfg, back, notes);
    if servers.is_empty() {
        return Err(format!("{}: no server that can be a node", sections[back].title()));
    }
    if !servers.iter().any(|s| s.opts.contains_key("check")) {
        return Err(format!(
            "{}: its servers have no `check`, so HAProxy sent clients to them whatever Patroni said",
            sections[back].title()
        ));
    }
    Ok(Listener {
        front: i,
        back,
        addr,
        role,
        check,
        servers,
    })
}

/// The addresses a frontend or listen section binds, in order (the ones Switchyard
/// cannot listen on are said in notes).
fn binds(cfg: &Cfg, i: usize, notes: &mut Notes) -> Vec<String> {
    let s = &cfg.sections[i];
    let mut specs: Vec<(String, usize)> = Vec::new();
    // HAProxy 1.x: `listen NAME ADDR:PORT`.
    for a in &s.args {
        specs.extend(a.split(',').filter(|x| !x.is_empty()).map(|x| (x.to_string(), s.line)));
    }
    for l in s.lines.iter().filter(|l| l.words[0] == "bind") {
        cfg.mark(l.line);
        let Some(list) = l.arg(1) else { continue };
        specs.extend(
            list.split(',')
                .filter(|x| !x.is_empty())
                .map(|x| (x.to_string(), l.line)),
        );
        let opts = &l.words[2..];
        if opts.iter().any(|w| w == "ssl") {
            let crt = opts
                .iter()
                .position(|w| w == "crt")
                .and_then(|c| opts.get(c + 1))
                .map(|c| format!(" crt {c}"))
                .unwrap_or_default();
            notes.add(format!(
                "{} (line {}): bind ... ssl{crt}: HAProxy ended TLS that clients opened directly; PostgreSQL clients ask for TLS in the protocol, which Switchyard answers with [tls] cert_file and key_file (a .pem holding both must be split); not written",
                s.title(),
                l.line
            ));
        }
        let other: Vec<&str> = opts
            .iter()
            .map(String::as_str)
            .filter(|w| !matches!(*w, "ssl" | "crt" | "v4v6" | "v6only") && !w.starts_with('/'))
            .collect();
        if !other.is_empty() && !opts.iter().any(|w| w == "ssl") {
            notes.add(format!(
                "{} (line {}): bind options {}: no equivalent",
                s.title(),
                l.line,
                other.join(" ")
            ));
        }
    }
    let mut addrs: Vec<String> = Vec::new();
    for (spec, line) in &specs {
        match listen_addr(spec) {
            Ok(a) if addrs.is_empty() => addrs.push(a),
            Ok(a) => notes.add(format!(
                "{} (line {line}): bind {spec}: a listener takes one address; {} is written, not {a}",
                s.title(),
                addrs[0]
            )),
            Err(why) => notes.add(format!("{} (line {line}): bind {spec}: {why}", s.title())),
        }
    }
    addrs
}

/// The role a backend serves, from the Patroni endpoint its check asks, and the check
/// as written; or why it cannot be told.
fn role_of(cfg: &Cfg, back: usize, notes: &mut Notes) -> Result<(Role, String), String> {
    let title = cfg.sections[back].title();
    let Some(httpchk) = cfg.get(back, "option httpchk") else {
        if cfg.get(back, "option pgsql-check").is_some() {
            return Err("option pgsql-check sees that PostgreSQL answers, not which node is the primary".into());
        }
        if cfg.get(back, "option tcp-check").is_some() {
            return Err("tcp-check: not a Patroni role check".into());
        }
        return Err("no Patroni role check (option httpchk against Patroni's REST API): which node it sends clients to is unknown".into());
    };
    let (mut method, mut uri) = match &httpchk.words[2..] {
        [] => ("OPTIONS".to_string(), "/".to_string()),
        [uri] => ("OPTIONS".to_string(), uri.clone()),
        [method, uri, ..] => (method.clone(), uri.clone()),
    };
    // HAProxy 2.2+: `http-check send meth GET uri /primary`.
    for l in cfg.get_all(back, "http-check send") {
        cfg.mark(l.line);
        let mut w = l.words[2..].iter();
        while let Some(k) = w.next() {
            match (k.as_str(), w.next()) {
                ("meth", Some(v)) => method = v.clone(),
                ("uri", Some(v)) => uri = v.clone(),
                _ => {}
            }
        }
    }
    let check = format!("{method} {uri}");
    if let Some(expect) = cfg.get(back, "http-check expect") {
        let rule: Vec<&str> = expect.words[2..].iter().map(String::as_str).collect();
        if !matches!(
            rule.as_slice(),
            ["status", "200"] | ["status", "200-399"] | ["rstatus", "^2"] | ["rstatus", "^2.."]
        ) {
            return Err(format!(
                "{}: Patroni answers 200 or 503, and this does not expect its 200",
                expect.text()
            ));
        }
    }
    let (path, query) = uri.split_once('?').unwrap_or((uri.as_str(), ""));
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let Some((_, role, differs)) = ENDPOINTS.iter().find(|(p, _, _)| *p == path) else {
        return Err(format!("{check}: not one of Patroni's role checks"));
    };
    let Some(role) = role else {
        return Err(format!("{check}: {differs}"));
    };
    if !differs.is_empty() {
        notes.add(format!("{title}: {check}: {differs}"));
    }
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        let why = match k {
            "lag" => format!("Patroni's bound on a replica's lag, in bytes ({v}); Switchyard bounds it in time: max_replica_lag_ms (default 10 s)"),
            k if k.starts_with("tag_") => "Patroni tags choose no nodes here: list in the cluster only the nodes that may serve".into(),
            "replication_state" => "a standby that stops streaming is seen by the health checks".into(),
            _ => "no equivalent".into(),
        };
        notes.add(format!("{title}: {check}: ?{param}: {why}"));
    }
    Ok((*role, check))
}

/// A backend's servers with the `default-server` options they inherit (the ones that
/// cannot be nodes are said in notes).
fn servers(cfg: &Cfg, back: usize, notes: &mut Notes) -> Vec<Server> {
    let s = &cfg.sections[back];
    let mut defaults: BTreeMap<String, Option<String>> = BTreeMap::new();
    let inherited = s.defaults.map(|d| cfg.sections[d].lines.iter()).into_iter().flatten();
    for l in inherited
        .chain(s.lines.iter())
        .filter(|l| l.words[0] == "default-server")
    {
        cfg.mark(l.line);
        server_options(&l.words[1..], &mut defaults);
    }
    let mut out = Vec::new();
    for l in &s.lines {
        match l.words[0].as_str() {
            "server" => {}
            "server-template" => {
                cfg.mark(l.line);
                notes.add(format!(
                    "{} (line {}): server-template: list the nodes by name",
                    s.title(),
                    l.line
                ));
                continue;
            }
            _ => continue,
        }
        cfg.mark(l.line);
        let (Some(name), Some(addr)) = (l.arg(1), l.arg(2)) else {
            notes.add(format!("{} (line {}): a server without an address", s.title(), l.line));
            continue;
        };
        let (host, port) = match server_addr(addr) {
            Ok((h, Some(p))) => (h, p),
            Ok((_, None)) => {
                notes.add(format!(
                    "{}, server {name} (line {}): no port (HAProxy connects to the port the client came to); not imported: give the node's port",
                    s.title(),
                    l.line
                ));
                continue;
            }
            Err(why) => {
                notes.add(format!(
                    "{}, server {name} (line {}): {why}; not imported",
                    s.title(),
                    l.line
                ));
                continue;
            }
        };
        let mut opts = defaults.clone();
        server_options(&l.words[3..], &mut opts);
        out.push(Server {
            name: name.to_string(),
            host,
            port,
            opts,
        });
    }
    out
}

/// The cluster keys from its listeners' timeouts and limits.
fn cluster_keys(cfg: &Cfg, sections: &[Section], members: &[&Listener], out: &mut String, notes: &mut Notes) {
    let mut connect: Vec<(u64, String)> = Vec::new();
    let mut phase: Vec<(u64, String)> = Vec::new();
    let mut idle: Vec<(u64, String)> = Vec::new();
    let mut idle_missing: Vec<String> = Vec::new();
    for l in members {
        let timeout = |i: usize, key: &str, old: &str, notes: &mut Notes| {
            cfg.millis(i, key, notes).or_else(|| cfg.millis(i, old, notes))
        };
        let retries = cfg.number(l.back, "retries", notes).map(|n| n.v).unwrap_or(3);
        if let Some(t) = timeout(l.back, "timeout connect", "contimeout", notes).filter(|t| t.v > 0) {
            connect.push(t.pair());
            phase.push((
                t.v * (retries + 1),
                format!("{} × (retries {retries} + 1) ({})", t.text, t.place),
            ));
        }
        // In tcp mode HAProxy cuts a connection silent for the client timeout or the
        // server one (whichever ends first), or `timeout tunnel` instead of both.
        let client = timeout(l.front, "timeout client", "clitimeout", notes);
        let server = timeout(l.back, "timeout server", "srvtimeout", notes);
        let tunnel = cfg.millis(l.back, "timeout tunnel", notes);
        let cut = match (tunnel, client, server) {
            (Some(t), _, _) => Some(t),
            (None, Some(c), Some(s)) => Some(if s.v < c.v { s } else { c }),
            (None, c, s) => c.or(s),
        };
        match cut.filter(|t| t.v > 0) {
            Some(t) => idle.push(t.pair()),
            None => idle_missing.push(l.title(sections)),
        }
    }
    if let Some((ms, from)) = first_of(&connect, "server_login_timeout_ms", notes) {
        let _ = writeln!(
            out,
            "server_login_timeout_ms = {ms}  # {from}: one attempt on one server"
        );
    }
    if let Some((ms, from)) = largest(&phase) {
        let _ = writeln!(out, "connect_timeout_ms = {ms}  # {from}");
    }
    if let Some((ms, from)) = largest(&idle) {
        if idle_missing.is_empty() {
            let _ = writeln!(
                out,
                "client_idle_timeout_ms = {ms}  # {from}: HAProxy cut a connection silent this long\n\
                 idle_transaction_timeout_ms = {ms}  # the same, inside a transaction"
            );
            notes.add(format!(
                "{from}: HAProxy also cut a query that ran this long without output; query_timeout_ms cancels one that runs longer, if you relied on that"
            ));
        } else {
            notes.add(format!(
                "{from}: not written: {} has no such timeout, and a cluster has one value",
                idle_missing.join(", ")
            ));
        }
    }
    // Server connections per node: HAProxy queues past a server's maxconn, as
    // Switchyard does past max_server_connections.
    let mut maxconn: Vec<(u64, String)> = Vec::new();
    for l in members {
        for s in &l.servers {
            if let Some(n) = s
                .opts
                .get("maxconn")
                .cloned()
                .flatten()
                .and_then(|v| v.parse::<u64>().ok())
            {
                maxconn.push((n, format!("server maxconn {n} ({})", sections[l.back].title())));
            }
        }
    }
    if let Some((n, from)) = largest(&maxconn) {
        if n > 0 {
            let _ = writeln!(
                out,
                "max_server_connections = {n}  # {from}: HAProxy queued past it, as Switchyard does (up to connect_timeout_ms)"
            );
        }
    }
    // Clients: a listener's maxconn (or its defaults'), summed over both endpoints.
    let mut clients: Vec<(u64, String)> = Vec::new();
    for l in members {
        if let Some(n) = cfg.number(l.front, "maxconn", notes) {
            clients.push(n.pair());
        }
    }
    if clients.len() == members.len() && clients.iter().all(|(n, _)| *n > 0) {
        let total: u64 = clients.iter().map(|(n, _)| n).sum();
        let from: Vec<&str> = clients.iter().map(|(_, f)| f.as_str()).collect();
        let _ = writeln!(
            out,
            "max_clients = {total}  # {}: HAProxy leaves further clients waiting; Switchyard refuses them with 53300",
            from.join(" + ")
        );
    } else if !clients.is_empty() {
        notes.add(format!(
            "{}: not written: the cluster's other endpoint has no maxconn, and max_clients counts both",
            clients.iter().map(|(_, f)| f.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
}

/// The largest of a setting's values (Switchyard cutting or refusing less than HAProxy
/// did never breaks a client).
fn largest(values: &[(u64, String)]) -> Option<(u64, String)> {
    let mut best: Option<&(u64, String)> = None;
    for v in values {
        if best.is_none_or(|b| v.0 > b.0) {
            best = Some(v);
        }
    }
    best.cloned()
}

#[cfg(test)]
mod tests;
