//! The admin console, in the PgBouncer manner: `psql -d switchyard` as a user with
//! `admin = true` gets SHOW commands and operator actions over the simple query protocol.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::proxy::stream::ClientStream;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::info;

use crate::admin::pool_rows;
use crate::admin::status::node_status;
use crate::cluster::routing;
use crate::error::Error;
use crate::pg::protocol::messages;
use crate::pg::protocol::tags::{FrontendTag, TxStatus};
use crate::pg::{message_length, Inbox};
use crate::proxy::shared::Shared;

pub use crate::config::ADMIN_DATABASE;
const MAX_COMMAND: usize = 64 * 1024;

const HELP: &str = "SHOW CLUSTERS | NODES | POOLS | LIMITS | CLIENTS | SERVERS | STATS | EVENTS | QUERIES [cluster]; RESET QUERIES; RELOAD; PAUSE [cluster]; RESUME [cluster]; DRAIN <node>; UNDRAIN <node> (node as name or cluster.name); SWITCHOVER <cluster> TO <node>; UPGRADE";

/// A command's answer: rows to show, or a tag only, or an error for the client.
enum Answer {
    Rows {
        columns: Vec<&'static str>,
        rows: Vec<Vec<String>>,
    },
    Done(String),
    Error(String),
}

pub async fn run(mut stream: ClientStream, unread: BytesMut, user: &str, shared: &Shared) {
    let config = shared.config();
    let mut out = BytesMut::new();
    if !config.user(user).is_some_and(|u| u.admin) {
        let e = Error::insufficient_privilege(format!(
            "user \"{user}\" may not use the admin console: set admin = true for it in [[users]]"
        ));
        let _ = stream.write_all(&e.to_fatal()).await;
        let _ = stream.flush().await;
        shared.metrics.error(e.code().as_str());
        return;
    }
    for (k, v) in [
        ("server_version", "15.0 (switchyard)"),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        messages::parameter_status(&mut out, k, v);
    }
    messages::backend_key_data(&mut out, 0, 0);
    messages::ready_for_query(&mut out, TxStatus::Idle);
    if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    info!(user = %user, "admin console session started");
    let mut inbox = Inbox::holding(unread);
    loop {
        let length = |buf: &[u8]| {
            message_length(buf, MAX_COMMAND).map_err(|len| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("invalid message length {len}"))
            })
        };
        let message = match inbox.next(&mut stream, length).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = stream.write_all(&Error::protocol(e.to_string()).to_fatal()).await;
                let _ = stream.flush().await;
                return;
            }
            Err(_) => return,
        };
        let (tag, body) = (message[0], &message[5..]);
        out.clear();
        match FrontendTag::of(tag) {
            Some(FrontendTag::Terminate) => return,
            Some(FrontendTag::Query) => {
                let sql = String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(body)).into_owned();
                for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    info!(user = %user, command = %statement, "admin command");
                    let answer = match switchover_command(statement) {
                        Some((cluster, to)) => match crate::ha::switchover::switchover(shared, &cluster, &to).await {
                            Ok(r) => Answer::Rows {
                                columns: vec!["step", "ms"],
                                rows: r
                                    .steps
                                    .iter()
                                    .map(|(s, ms)| vec![s.clone(), ms.to_string()])
                                    .chain(std::iter::once(vec!["held".to_string(), r.hold_ms.to_string()]))
                                    .collect(),
                            },
                            Err(e) => Answer::Error(e.to_string()),
                        },
                        // The app carries it out (it owns the listeners); this session
                        // stays on this process, which drains and exits after it.
                        None if statement.eq_ignore_ascii_case("UPGRADE") => match shared.upgrade().await {
                            Ok(pid) => Answer::Rows {
                                columns: vec!["new_pid"],
                                rows: vec![vec![pid.to_string()]],
                            },
                            Err(e) => Answer::Error(e),
                        },
                        None => execute(statement, shared),
                    };
                    write_answer(&mut out, answer);
                }
                if sql.trim().trim_matches(';').is_empty() {
                    messages::empty_query_response(&mut out);
                }
                messages::ready_for_query(&mut out, TxStatus::Idle);
            }
            // Extended protocol: nothing to do until Sync, then one error.
            Some(FrontendTag::Sync) => {
                out.extend_from_slice(
                    &Error::unsupported("the admin console understands only simple queries").to_error(Some(HELP)),
                );
                messages::ready_for_query(&mut out, TxStatus::Idle);
            }
            _ => continue,
        }
        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// `SWITCHOVER <cluster> TO <node>`: (cluster, node).
fn switchover_command(statement: &str) -> Option<(String, String)> {
    let words: Vec<&str> = statement.split_whitespace().collect();
    match words.as_slice() {
        [cmd, cluster, to, node] if cmd.eq_ignore_ascii_case("SWITCHOVER") && to.eq_ignore_ascii_case("TO") => {
            Some((cluster.to_string(), node.to_string()))
        }
        _ => None,
    }
}

fn write_answer(out: &mut BytesMut, answer: Answer) {
    match answer {
        Answer::Rows { columns, rows } => {
            messages::row_description_text(out, &columns);
            for row in &rows {
                messages::data_row_text(out, row);
            }
            command_complete(out, &format!("SHOW {}", rows.len()));
        }
        Answer::Done(tag) => command_complete(out, &tag),
        Answer::Error(msg) => out.extend_from_slice(&Error::syntax(msg).to_error(Some(HELP))),
    }
}

fn command_complete(out: &mut BytesMut, tag: &str) {
    messages::command_complete(out, tag);
}

fn unix(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        d.subsec_millis()
    )
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// Run one admin command.
fn execute(statement: &str, shared: &Shared) -> Answer {
    let words: Vec<String> = statement.split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    let arg = statement
        .split_whitespace()
        .nth(1)
        .map(|s| s.trim_matches('"').to_string());
    let now = SystemTime::now();
    match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["SHOW", "CLUSTERS"] => Answer::Rows {
            columns: vec![
                "cluster",
                "listen_rw",
                "listen_ro",
                "primary",
                "paused",
                "nodes",
                "clients",
                "failover",
                "leader",
                "epoch",
                "view",
            ],
            rows: shared
                .clusters()
                .values()
                .map(|c| {
                    let snap = c.state.snapshot();
                    let primary = match routing::write_primary(&snap) {
                        Ok(p) => snap.nodes[p].name.clone(),
                        Err(e) => format!("none: {e}"),
                    };
                    let clients = snap.nodes.iter().map(|n| n.sessions()).sum::<u32>();
                    let failover = shared
                        .config()
                        .clusters
                        .get(&*c.name)
                        .map(|cc| format!("{:?}", cc.failover).to_lowercase())
                        .unwrap_or_default();
                    // Coordination: the leader, the published primary's epoch, and this
                    // instance's own view (what it would publish, or why it routes no writes).
                    let coord = crate::ha::coord::get(shared).map(|k| k.view());
                    let (leader, epoch, view) = match (&coord, &snap.coordination) {
                        (Some(v), Some(agreed)) => (
                            v.leader.clone().unwrap_or_default(),
                            agreed.epoch.to_string(),
                            match (&agreed.cut_off, routing::primary(&snap)) {
                                (Some(why), _) => why.clone(),
                                (None, Ok(p)) => format!("sees {} primary", snap.nodes[p].name),
                                (None, Err(e)) => e.to_string(),
                            },
                        ),
                        _ => (String::new(), String::new(), "standalone".to_string()),
                    };
                    vec![
                        c.name.to_string(),
                        opt(c.settings().listen_rw.clone()),
                        opt(c.settings().listen_ro.clone()),
                        primary,
                        c.is_paused().to_string(),
                        snap.nodes.len().to_string(),
                        clients.to_string(),
                        failover,
                        leader,
                        epoch,
                        view,
                    ]
                })
                .collect(),
        },
        ["SHOW", "NODES"] => Answer::Rows {
            columns: vec![
                "cluster",
                "node",
                "addr",
                "health",
                "role",
                "drained",
                "lag_ms",
                "lag_bytes",
                "timeline",
                "sessions",
                "last_check_ms_ago",
                "last_error",
                "detached",
            ],
            rows: shared
                .clusters()
                .values()
                .flat_map(|c| {
                    let snap = c.state.snapshot();
                    (0..snap.nodes.len())
                        .map(|i| {
                            let s = node_status(&snap, i, now);
                            vec![
                                c.name.to_string(),
                                s.name,
                                s.addr,
                                s.health,
                                s.role,
                                s.drained.to_string(),
                                opt(s.lag_ms),
                                opt(s.lag_bytes),
                                opt(s.timeline),
                                s.sessions.to_string(),
                                opt(s.last_check_ms_ago),
                                opt(s.last_error),
                                s.detached.unwrap_or_default(),
                            ]
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
        },
        ["SHOW", "POOLS"] => Answer::Rows {
            columns: vec![
                "cluster", "node", "database", "user", "in_use", "idle", "waiting", "size",
            ],
            rows: pool_rows(shared)
                .into_iter()
                .map(|p| {
                    vec![
                        p.cluster,
                        p.node,
                        p.database,
                        p.user,
                        p.in_use.to_string(),
                        p.idle.to_string(),
                        p.waiting.to_string(),
                        p.size.to_string(),
                    ]
                })
                .chain(shared.clusters().values().filter_map(|c| {
                    let w = c.waiting.load(std::sync::atomic::Ordering::Relaxed);
                    (w > 0).then(|| {
                        vec![
                            c.name.to_string(),
                            String::new(),
                            "*".into(),
                            "*".into(),
                            "0".into(),
                            "0".into(),
                            w.to_string(),
                            "0".into(),
                        ]
                    })
                }))
                .collect(),
        },
        ["SHOW", "LIMITS"] => {
            let config = shared.config();
            Answer::Rows {
                columns: vec![
                    "cluster",
                    "clients",
                    "max_clients",
                    "proxy_clients",
                    "proxy_max_clients",
                    "refusals and timeouts",
                ],
                rows: shared
                    .clusters()
                    .values()
                    .map(|c| {
                        let v = shared.admissions.view(&c.name);
                        vec![
                            c.name.to_string(),
                            v.clients.to_string(),
                            opt(config
                                .clusters
                                .get(&*c.name)
                                .and_then(|cc| cc.max_clients)
                                .map(|m| m.to_string())),
                            v.proxy_clients.to_string(),
                            config
                                .proxy
                                .max_clients
                                .min(shared.admissions.descriptor_cap())
                                .to_string(),
                            v.counts
                                .iter()
                                .map(|(what, n)| format!("{what}={n}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                        ]
                    })
                    .collect(),
            }
        }
        ["SHOW", "CLIENTS"] => Answer::Rows {
            columns: vec![
                "id",
                "cluster",
                "endpoint",
                "user",
                "database",
                "addr",
                "application_name",
                "node",
                "state",
                "connected_at",
            ],
            rows: shared
                .clients
                .list()
                .iter()
                .map(|c| {
                    vec![
                        c.id.to_string(),
                        c.cluster.to_string(),
                        c.endpoint.to_string(),
                        c.user.clone(),
                        c.database.clone(),
                        c.peer.to_string(),
                        c.application_name.clone(),
                        c.node.to_string(),
                        c.state().into(),
                        unix(c.connected_at),
                    ]
                })
                .collect(),
        },
        ["SHOW", "SERVERS"] => Answer::Rows {
            columns: vec![
                "cluster",
                "node",
                "addr",
                "server_pid",
                "user",
                "database",
                "client_id",
                "state",
            ],
            rows: shared
                .clients
                .list()
                .iter()
                .map(|c| {
                    vec![
                        c.cluster.to_string(),
                        c.node.to_string(),
                        c.server_addr.clone(),
                        c.server_pid.to_string(),
                        c.user.clone(),
                        c.database.clone(),
                        c.id.to_string(),
                        c.state().into(),
                    ]
                })
                .collect(),
        },
        ["SHOW", "STATS"] => Answer::Rows {
            columns: vec![
                "cluster",
                "node",
                "sessions_total",
                "queries_total",
                "connect_failures_total",
                "sessions_now",
            ],
            rows: shared
                .clusters()
                .values()
                .flat_map(|c| {
                    let snap = c.state.snapshot();
                    snap.nodes
                        .iter()
                        .map(|n| {
                            use std::sync::atomic::Ordering::Relaxed;
                            vec![
                                c.name.to_string(),
                                n.name.clone(),
                                n.stats.sessions_total.load(Relaxed).to_string(),
                                n.stats.queries_total.load(Relaxed).to_string(),
                                n.stats.connect_failures_total.load(Relaxed).to_string(),
                                n.sessions().to_string(),
                            ]
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
        },
        ["SHOW", "EVENTS"] => Answer::Rows {
            columns: vec!["at", "cluster", "node", "old", "new", "reason"],
            rows: shared
                .clusters()
                .values()
                .flat_map(|c| {
                    c.state
                        .events()
                        .into_iter()
                        .map(|e| vec![unix(e.at), c.name.to_string(), e.node, e.old, e.new, e.reason])
                        .collect::<Vec<_>>()
                })
                .collect(),
        },
        ["SHOW", "QUERIES", rest @ ..] if rest.len() <= 1 => {
            let ask = crate::admin::QueriesAsk {
                cluster: statement
                    .split_whitespace()
                    .nth(2)
                    .map(|s| s.trim_matches('"').to_string()),
                ..Default::default()
            };
            match crate::admin::query_rows(shared, &ask) {
                Ok(rows) => Answer::Rows {
                    columns: vec![
                        "cluster", "digest", "query", "node", "role", "route", "calls", "errors", "rows", "total_ms",
                        "mean_ms", "min_ms", "max_ms", "p50_ms", "p99_ms",
                    ],
                    rows: rows
                        .into_iter()
                        .map(|r| {
                            vec![
                                r.cluster,
                                r.digest,
                                r.query,
                                opt(r.node),
                                opt(r.role),
                                opt(r.route.map(|r| r.as_str())),
                                r.calls.to_string(),
                                r.errors.to_string(),
                                r.rows.to_string(),
                                r.total_time_ms.to_string(),
                                r.mean_time_ms.to_string(),
                                r.min_time_ms.to_string(),
                                r.max_time_ms.to_string(),
                                r.p50_ms.to_string(),
                                r.p99_ms.to_string(),
                            ]
                        })
                        .collect(),
                },
                Err(e) => Answer::Error(e),
            }
        }
        ["RESET", "QUERIES"] => {
            shared.digests.reset();
            Answer::Done("RESET".into())
        }
        ["RELOAD"] => match shared.reload() {
            Ok(_) => Answer::Done("RELOAD".into()),
            Err(e) => Answer::Error(e),
        },
        ["PAUSE" | "RESUME", rest @ ..] if rest.len() <= 1 => {
            let pause = words[0] == "PAUSE";
            let targets: Vec<_> = match &arg {
                Some(name) => match shared.cluster(name) {
                    Some(c) => vec![c.clone()],
                    None => return Answer::Error(format!("no cluster named \"{name}\"")),
                },
                None => shared.clusters().values().cloned().collect(),
            };
            for c in targets {
                c.set_paused(pause);
            }
            Answer::Done(words[0].clone())
        }
        ["DRAIN" | "UNDRAIN", _] => {
            let drain = words[0] == "DRAIN";
            let target = arg.unwrap_or_default();
            let (cluster, node) = match target.split_once('.') {
                Some((c, n)) => (Some(c.to_string()), n.to_string()),
                None => (None, target.clone()),
            };
            let matching: Vec<_> = shared
                .clusters()
                .values()
                .filter(|c| cluster.as_deref().is_none_or(|name| name == &*c.name))
                .filter(|c| c.state.snapshot().index(&node).is_some())
                .cloned()
                .collect();
            match matching.as_slice() {
                [] => Answer::Error(format!("no node named \"{target}\"")),
                [one] => {
                    one.set_drained(&node, drain);
                    Answer::Done(words[0].clone())
                }
                _ => Answer::Error(format!(
                    "node name \"{node}\" is in several clusters: write cluster.node"
                )),
            }
        }
        ["SHOW", "HELP"] | ["HELP"] => Answer::Rows {
            columns: vec!["commands"],
            rows: vec![vec![HELP.to_string()]],
        },
        _ => Answer::Error(format!("unknown admin command \"{statement}\"")),
    }
}
