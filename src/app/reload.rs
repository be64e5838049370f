//! SIGHUP and the console's RELOAD: re-read the config file and apply what it changed
//! while clients keep running. Everything is checked first (the file, TLS files, every
//! new listening address bound), then applied; a reload that fails a check changes
//! nothing. Only a cluster's engine, and `[coordination]`'s identity (instance, prefix,
//! lease), still need a restart or an upgrade: those are logged and left as they run.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::serving::{wanted, Listener, Serves, Serving};
use super::{build_cluster, listen_key, policy, start_monitors};
use crate::cluster::topology::NodeState;
use crate::cluster::ClusterCtx;
use crate::config::{Config, Engine};
use crate::proxy::shared::{Clusters, Shared};
use crate::tls::ServerTls;

/// The listening sockets a new config needs opened (already bound, so that the old
/// ones close only once these accept) and the names of those it closes.
struct Listeners {
    open: Vec<(String, String, std::net::TcpListener, Serves)>,
    close: Vec<String>,
}

/// Bind every address of `new` not listened on yet, with `clusters` the contexts of
/// its clusters; Err(why) if one cannot be bound (nothing then changes).
fn plan_listeners(new: &Config, clusters: &Clusters, serving: &Serving) -> Result<Listeners, String> {
    let current = serving.listeners.lock().unwrap();
    let wanted = wanted(new, clusters);
    let mut plan = Listeners {
        open: Vec::new(),
        close: Vec::new(),
    };
    for (name, addr, serves) in wanted.iter().cloned() {
        match current.iter().find(|l| l.name == name) {
            Some(l) if l.listens_at(&addr) => continue,
            Some(_) => plan.close.push(name.clone()),
            None => {}
        }
        let l = std::net::TcpListener::bind(&addr)
            .map_err(|e| format!("cannot listen on {addr} ({}): {e}", listen_key(&name)))?;
        plan.open.push((name, addr, l, serves));
    }
    for l in current.iter() {
        if !wanted.iter().any(|(name, ..)| *name == l.name) {
            plan.close.push(l.name.clone());
        }
    }
    Ok(plan)
}

/// Open the new listeners, then close the ones they replace (a moved address never
/// leaves a moment with neither) and those no longer wanted.
fn apply_listeners(shared: &Arc<Shared>, serving: &Serving, plan: Listeners, notes: &mut Vec<String>) {
    let closing: Vec<Listener> = {
        let mut listeners = serving.listeners.lock().unwrap();
        let (closing, keep) = listeners.drain(..).partition(|l| plan.close.contains(&l.name));
        *listeners = keep;
        closing
    };
    for (name, addr, l, serves) in plan.open {
        let was = closing.iter().find(|l| l.name == name).map(|l| l.local);
        match serving.open(shared, (name.clone(), addr.clone()), l, serves) {
            Ok(local) => notes.push(match was {
                Some(was) => format!("{} moved to {local} (was {was})", listen_key(&name)),
                None => format!("{} listening on {local}", listen_key(&name)),
            }),
            Err(e) => {
                error!(listener = %name, addr = %addr, error = %e, "cannot accept on a new listening socket");
                notes.push(format!("{} could not listen on {addr}: {e}", listen_key(&name)));
            }
        }
    }
    for l in closing {
        if !notes.iter().any(|n| n.starts_with(&listen_key(&l.name))) {
            notes.push(format!("{} closed (was {})", listen_key(&l.name), l.local));
        }
        l.close();
    }
}

/// A reload removed `ctx`: its health checks stop; its sessions end at their next
/// transaction boundary, told why (57P01); those still inside a transaction after
/// `proxy.shutdown_timeout_ms` are ended then, and its pools closed. Returns its
/// clients now.
fn retire(shared: &Arc<Shared>, serving: &Serving, ctx: Arc<ClusterCtx>) -> usize {
    // Counted first: told to end, idle ones go at once.
    let clients = shared.clients.list().iter().filter(|c| *c.cluster == *ctx.name).count();
    ctx.retire();
    for (_, task) in ctx.monitors.lock().unwrap().drain() {
        task.abort();
    }
    let grace = Duration::from_millis(shared.config().proxy.shutdown_timeout_ms);
    let shared = shared.clone();
    serving.control.spawn(async move {
        tokio::time::sleep(grace).await;
        // A cluster with no nodes evicts every session still holding a connection.
        ctx.state.update(|snap| {
            snap.nodes.clear();
            true
        });
        // Unless a later reload added a cluster of the same name (it has pools of its own).
        let closed = match shared.cluster(&ctx.name) {
            None => crate::pg::PgShared::of(&shared).pools.forget_cluster(&ctx.name),
            Some(_) => 0,
        };
        if ctx.engine == Engine::Mysql {
            for p in crate::mysql::ClusterInfo::of(&ctx).pools.all() {
                p.clear_idle();
            }
        }
        info!(cluster = %ctx.name, idle_closed = closed, "removed cluster: its last sessions are ended and its pools closed");
    });
    clients
}

/// Re-read the config file and apply it: nodes (added, removed, moved), health and
/// routing settings, users, pools, TLS files, clusters added and removed, listening
/// addresses (the new one bound before the old one closes), the admin HTTP address and
/// the etcd members of `[coordination]`. Returns a one-line summary of what changed.
pub(super) fn reload(shared: &Arc<Shared>, serving: &Serving) -> Result<String, String> {
    let _one_at_a_time = serving.reloading.lock().unwrap();
    let path = shared
        .config_path
        .as_ref()
        .ok_or("no config file to reload (started without --config)")?;
    let reject = |e: String| {
        error!(path = %path.display(), reason = %e, "reload rejected; the running config stays");
        format!("reload rejected, the running config stays: {e}")
    };
    let new = Config::load(path).map_err(|e| reject(e.to_string()))?;
    let mut server_tls = Vec::new();
    for (name, c) in &new.clusters {
        let tls = ServerTls::new(c.server_tls, c.server_ca_file.as_deref())
            .map_err(|e| reject(format!("clusters.{name}: {e}")))?;
        server_tls.push((name.clone(), tls));
    }
    // The clusters from now on: the running ones the new config keeps, and the new.
    let running = shared.clusters();
    let mut next: Clusters = Clusters::new();
    let mut added = Vec::new();
    for (name, c) in &new.clusters {
        match running.get(name) {
            Some(ctx) => next.insert(name.clone(), ctx.clone()),
            None => {
                let ctx = build_cluster(name, c, &new).map_err(reject)?;
                added.push(ctx.clone());
                next.insert(name.clone(), ctx)
            }
        };
    }
    let removed: Vec<Arc<ClusterCtx>> = running
        .values()
        .filter(|c| !new.clusters.contains_key(&*c.name))
        .cloned()
        .collect();
    let listeners = plan_listeners(&new, &next, serving).map_err(reject)?;
    shared.reload_tls(&new).map_err(reject)?;

    // Checked: from here on everything applies.
    let old = shared.config();
    let mut notes = Vec::new();
    for (name, tls) in server_tls {
        let Some(ctx) = running.get(&name) else {
            continue;
        };
        ctx.set_server_tls(tls);
        // Idle pooled connections were made under the old rules (plaintext, or not
        // verified): new ones are made under the new.
        let before = old
            .clusters
            .get(&name)
            .map(|o| (o.server_tls, o.server_ca_file.clone()));
        let after = new
            .clusters
            .get(&name)
            .map(|c| (c.server_tls, c.server_ca_file.clone()));
        if before != after {
            let closed: usize = crate::pg::PgShared::of(shared)
                .pools
                .all()
                .iter()
                .filter(|p| p.key.cluster == name)
                .map(|p| p.clear_idle())
                .sum();
            info!(cluster = %name, closed, "server_tls changed: idle server connections closed");
        }
    }
    for (name, c) in &new.clusters {
        let Some(ctx) = running.get(name) else {
            continue;
        };
        if ctx.engine != c.engine {
            warn!(cluster = %name, running = %ctx.engine, configured = %c.engine, "engine changed: needs a restart to take effect");
            notes.push(format!(
                "cluster {name} engine changed: restart or upgrade (SIGUSR2) needed"
            ));
        }
        ctx.set_settings(c.clone());
        let mut added = Vec::new();
        let mut removed = Vec::new();
        ctx.state.update(|snap| {
            let mut nodes = Vec::new();
            for n in &c.nodes {
                match snap.nodes.iter().find(|o| o.name == n.name && o.addr == n.addr()) {
                    Some(existing) => nodes.push(existing.clone()),
                    None => {
                        added.push(n.name.clone());
                        nodes.push(NodeState::new(&n.name, &n.addr()));
                    }
                }
            }
            removed = snap
                .nodes
                .iter()
                .filter(|o| !nodes.iter().any(|n| n.name == o.name && n.addr == o.addr))
                .map(|o| o.name.clone())
                .collect();
            snap.nodes = nodes;
            snap.policy = policy(c);
            snap.connect_timeout = c.connect_timeout();
            snap.server_login_timeout = c.server_login_timeout();
            snap.failover_hold = c.failover_hold();
            true
        });
        crate::pg::PgShared::of(shared)
            .pools
            .apply(name, |user, database| new.pool_settings(name, user, database));
        for n in &added {
            ctx.state
                .push_event(n, String::new(), "added".into(), "configuration reload".into());
        }
        for n in &removed {
            ctx.state
                .push_event(n, String::new(), "removed".into(), "configuration reload".into());
        }
        if !added.is_empty() || !removed.is_empty() {
            notes.push(format!("cluster {name}: nodes added {added:?}, removed {removed:?}"));
        }
    }
    match (&old.coordination, &new.coordination) {
        (Some(_), Some(c)) => match crate::ha::coord::get(shared).map(|coord| coord.reconfigure(c)) {
            Some(Ok(Some(note))) => {
                info!("{note}");
                notes.push(note);
            }
            Some(Err(why)) => {
                warn!("{why}");
                notes.push(why);
            }
            _ => {}
        },
        (None, Some(_)) => notes.push("[coordination] added: restart or upgrade (SIGUSR2) needed".into()),
        (Some(_), None) => notes.push("[coordination] removed: restart or upgrade (SIGUSR2) needed".into()),
        (None, None) => {}
    }
    // The clients the descriptor limit leaves room for depend on the pools' sizes and
    // the pool modes (only when a cap is in force: `run` sets it at start).
    if shared.admissions.descriptor_cap() != u32::MAX {
        let fds = crate::proxy::limits::fd_limit();
        let cap = crate::proxy::limits::descriptor_budget(&new, fds);
        let old_cap = shared.admissions.descriptor_cap();
        if cap < old_cap {
            warn!(fd_limit = fds, clients = cap, was = old_cap, "with the new pools the file-descriptor limit leaves room for fewer clients: the ones past `clients` are refused with 53300 (raise LimitNOFILE / ulimit -n, or lower the pool sizes)");
            notes.push(format!(
                "room for {cap} clients under the file-descriptor limit (was {old_cap})"
            ));
        } else if cap > old_cap {
            info!(
                fd_limit = fds,
                clients = cap,
                was = old_cap,
                "clients the file-descriptor limit leaves room for, with the new pools"
            );
        }
        shared.admissions.set_descriptor_cap(cap);
    }
    shared.set_config(new);
    shared.set_clusters(next);
    for ctx in removed {
        let clients = retire(shared, serving, ctx.clone());
        notes.push(format!(
            "cluster {} removed ({clients} clients end at their next transaction boundary)",
            ctx.name
        ));
    }
    // Every session looks whether its cluster is still served (no change of value).
    serving.leaving_tx.send_modify(|_| {});
    start_monitors(shared);
    for ctx in &added {
        crate::ha::coord::adopt(shared, ctx);
        crate::ha::failover::spawn(shared.clone(), ctx.clone());
        notes.push(format!("cluster {} added", ctx.name));
        info!(cluster = %ctx.name, engine = %ctx.engine, "cluster added by a reload");
    }
    // Last: clients reach a new cluster only once it is set up.
    apply_listeners(shared, serving, listeners, &mut notes);
    let summary = if notes.is_empty() {
        "config reloaded".to_string()
    } else {
        format!("config reloaded: {}", notes.join("; "))
    };
    info!(path = %path.display(), "{summary}");
    Ok(summary)
}
