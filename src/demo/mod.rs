//! Throwaway local clusters for `switchyard demo` and the integration tests, built from
//! the machine's server binaries on loopback: a PostgreSQL primary with streaming
//! standbys (`postgres`), a MariaDB primary with GTID replicas (`mariadb`); and the
//! command itself (`postgres_demo`, `mariadb_demo`): a cluster, Switchyard in front,
//! node states printed as they change.

pub mod mariadb;
pub mod postgres;

use anyhow::{Context, Result};

use crate::app::Proxy;
use crate::cluster::topology::{ClusterSnapshot, Health, Role};
use crate::config::Config;
use postgres::{LocalCluster, APP_DB, APP_PASSWORD, APP_USER};

/// A child process killed when dropped (the demo's etcd and second instance).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A single-member etcd in `dir` on a free client port; its URL.
fn demo_etcd(dir: &std::path::Path) -> Result<(Child, String)> {
    let (client, peer) = (crate::demo::postgres::free_port(), crate::demo::postgres::free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = std::process::Command::new("etcd")
        .args(["--name", "demo", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("demo={peer_url}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log"))?)
        .spawn()
        .context("--instances 2 needs etcd (Debian: apt-get install etcd-server)")?;
    Ok((Child(child), url))
}

pub fn postgres_demo(rw_port: u16, ro_port: u16, http_port: u16, automatic: bool, instances: u8) -> Result<()> {
    println!("Starting a local PostgreSQL cluster (1 primary, 2 streaming standbys)...");
    let cluster = LocalCluster::start(2).context("could not start the local cluster")?;
    let config_text = format!(
        "{}\n[admin]\nhttp_listen = \"127.0.0.1:{http_port}\"\n\n[[users]]\nname = \"admin\"\npassword = \"admin\"\nadmin = true\n",
        cluster.config_toml(
            rw_port,
            ro_port,
            &format!(
                "max_replica_lag_ms = 10000\nread_balance = \"round_robin\"\nfailover = \"{}\"\n\n[clusters.main.manager]\nuser = \"postgres\"\npassword = \"{}\"\n",
                if automatic { "automatic" } else { "follow" },
                crate::demo::postgres::SUPERUSER_PASSWORD
            )
        )
    );
    let (config_text, children, second) =
        with_instances(cluster.dir(), config_text, instances, (rw_port, ro_port, http_port))?;
    let config_path = cluster.dir().join("switchyard.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::parse(&config_text)?;
    let bin = cluster.bin.display().to_string();
    // The servers run as `postgres` when the demo runs as root (as LocalCluster starts
    // them); `runuser` is part of util-linux, present where sudo may not be.
    // SAFETY: geteuid has no preconditions.
    let as_postgres = if unsafe { libc::geteuid() } == 0 {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let (d0, d1) = (cluster.nodes[0].data.display(), cluster.nodes[1].data.display());
    let failover_howto = match automatic {
        false => format!(
            "Or a failover in another terminal (failover = \"follow\": you promote; `--failover automatic` lets Switchyard do it):\n  \
             {as_postgres}{bin}/pg_ctl -D {d0} -m immediate stop     # primary goes down\n  \
             {as_postgres}{bin}/pg_ctl -D {d1} promote               # failover1 takes over"
        ),
        true => format!(
            "Or a failover in another terminal (failover = \"automatic\"):\n  \
             {as_postgres}{bin}/pg_ctl -D {d0} -m immediate stop     # primary goes down; Switchyard promotes\n  \
             the most caught-up standby within about interval x fall + 1 s and repoints the other"
        ),
    };
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("    {:<10} port {}  data {}", n.name, n.port, n.data.display()))
        .collect();
    crate::app::runtime()?.block_on(async {
        let proxy = Proxy::start(config, Some(config_path.clone())).await?;
        println!(
            "\nSwitchyard is running (config: {cfg}).\n\nNodes:\n{nodes}\n\n\
             Connect (password: {APP_PASSWORD}):\n  \
             psql \"host=127.0.0.1 port={rw_port} user={APP_USER} dbname={APP_DB}\"   # read-write: the primary\n  \
             psql \"host=127.0.0.1 port={ro_port} user={APP_USER} dbname={APP_DB}\"   # read-only: a standby\n\n\
             Status page: http://127.0.0.1:{http_port}/   (also /status, /metrics; `switchyard status --url http://127.0.0.1:{http_port} --watch`)\n\
             Admin console: psql \"host=127.0.0.1 port={rw_port} user=admin dbname=switchyard\"   (password: admin; try SHOW NODES)\n\n\
             Django settings:\n  DATABASES = {{\n    'default': {{'ENGINE': 'django.db.backends.postgresql', 'HOST': '127.0.0.1', 'PORT': '{rw_port}',\n                'NAME': '{APP_DB}', 'USER': '{APP_USER}', 'PASSWORD': '{APP_PASSWORD}'}},\n    \
             'replica': {{'ENGINE': 'django.db.backends.postgresql', 'HOST': '127.0.0.1', 'PORT': '{ro_port}',\n                'NAME': '{APP_DB}', 'USER': '{APP_USER}', 'PASSWORD': '{APP_PASSWORD}'}},\n  }}\n\n\
             Try a planned switchover (no client errors in transaction mode):\n  \
             switchyard switchover --url http://127.0.0.1:{http_port} --cluster main --to failover1\n\n\
             {failover_howto}\n\n\
             {second}Node states follow as they change. Ctrl-C stops everything and removes {dir}.\n",
            cfg = config_path.display(),
            nodes = nodes.join("\n"),
            dir = cluster.dir().display(),
        );
        show_states_until_signal(&proxy).await?;
        println!("\nStopping the proxy and the cluster...");
        proxy.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })?;
    drop(children);
    drop(cluster);
    println!("Done.");
    Ok(())
}

/// With `instances == 2`: a local etcd, `[coordination]` added to `config_text` (as
/// `sy1`), and a second instance (`sy2`) as a child process (one coordinator per
/// process) on the next ports up. The config to run, the children to stop at the end,
/// and what to tell the user about the second instance.
fn with_instances(
    dir: &std::path::Path,
    mut config_text: String,
    instances: u8,
    (rw_port, ro_port, http_port): (u16, u16, u16),
) -> Result<(String, Vec<Child>, String)> {
    let mut children = Vec::new();
    if instances != 2 {
        return Ok((config_text, children, String::new()));
    }
    let (etcd, url) = demo_etcd(dir)?;
    children.push(etcd);
    let coordination = |name: &str| format!("\n[coordination]\netcd = [\"{url}\"]\ninstance = \"{name}\"\n");
    let other = config_text
        .replace(
            &format!("127.0.0.1:{rw_port}\""),
            &format!("127.0.0.1:{}\"", rw_port + 2),
        )
        .replace(
            &format!("127.0.0.1:{ro_port}\""),
            &format!("127.0.0.1:{}\"", ro_port + 2),
        )
        .replace(
            &format!("127.0.0.1:{http_port}\""),
            &format!("127.0.0.1:{}\"", http_port + 1),
        )
        + &coordination("sy2");
    config_text += &coordination("sy1");
    let other_path = dir.join("switchyard-sy2.toml");
    std::fs::write(&other_path, &other)?;
    let log = dir.join("switchyard-sy2.log");
    children.push(Child(
        std::process::Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(&other_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    ));
    let second = format!(
        "\nA second Switchyard instance (sy2) agrees with this one (sy1) through etcd at {url}:\n  \
         rw 127.0.0.1:{}  ro 127.0.0.1:{}  status http://127.0.0.1:{}/  log {}\n  \
         One leader decides failovers and switchovers; both send writes only to the published primary.\n",
        rw_port + 2,
        ro_port + 2,
        http_port + 1,
        log.display()
    );
    Ok((config_text, children, second))
}

/// `switchyard demo --engine mariadb`: a MariaDB primary and two GTID replicas with
/// the proxy in front, the seed article's Django `DATABASES`, and how to fail over.
pub fn mariadb_demo(rw_port: u16, ro_port: u16, http_port: u16, automatic: bool, instances: u8) -> Result<()> {
    use crate::demo::mariadb::{
        MariaCluster, MY_APP_DB, MY_APP_PASSWORD, MY_APP_USER, MY_MANAGER_PASSWORD, MY_MANAGER_USER,
        MY_MONITOR_PASSWORD, MY_MONITOR_USER, REPL_PASSWORD, REPL_USER,
    };
    println!("Starting a local MariaDB cluster (1 primary, 2 semi-synchronous GTID replicas)...");
    let mut cluster = MariaCluster::start(2).context("could not start the local MariaDB cluster")?;
    cluster.enable_semi_sync()?;
    let config_text = format!(
        "[health]\nuser = \"{MY_MONITOR_USER}\"\npassword = \"{MY_MONITOR_PASSWORD}\"\n\n\
         [admin]\nhttp_listen = \"127.0.0.1:{http_port}\"\n\n\
         [[users]]\nname = \"{MY_APP_USER}\"\npassword = \"{MY_APP_PASSWORD}\"\n\n{}",
        cluster.config_toml(
            "main",
            rw_port,
            ro_port,
            &format!(
                "max_replica_lag_ms = 10000\nread_balance = \"round_robin\"\nfailover = \"{}\"\n\n\
                 [clusters.main.manager]\nuser = \"{MY_MANAGER_USER}\"\npassword = \"{MY_MANAGER_PASSWORD}\"\n\
                 replication_user = \"{REPL_USER}\"\nreplication_password = \"{REPL_PASSWORD}\"\n",
                if automatic { "automatic" } else { "follow" }
            )
        )
    );
    let (config_text, children, second) =
        with_instances(cluster.dir(), config_text, instances, (rw_port, ro_port, http_port))?;
    let config_path = cluster.dir().join("switchyard.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::parse(&config_text)?;
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("    {:<10} port {}  socket {}", n.name, n.port, n.socket.display()))
        .collect();
    let (s0, s1, s2) = (
        cluster.nodes[0].socket.display(),
        cluster.nodes[1].socket.display(),
        cluster.nodes[2].socket.display(),
    );
    let p1 = cluster.nodes[1].port;
    let pid0 = cluster.pid(0).unwrap_or(0);
    let failover_howto = match automatic {
        false => format!(
            "Or a failover in another terminal (failover = \"follow\": you promote; `--failover automatic` lets Switchyard do it):\n  \
             kill -9 {pid0}                                                     # the primary goes down\n  \
             mariadb -S {s1} -u root -e \"STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0\"   # failover1 takes over\n  \
             mariadb -S {s2} -u root -e \"STOP SLAVE; CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={p1}, MASTER_USER='repl', MASTER_PASSWORD='repl', MASTER_USE_GTID=slave_pos; START SLAVE\""
        ),
        true => format!(
            "Or a failover in another terminal (failover = \"automatic\"):\n  \
             kill -9 {pid0}     # the primary goes down; Switchyard promotes the replica that received the most\n  \
             (after it applied its relay log) within about interval x fall + 1 s, and repoints the other"
        ),
    };
    crate::app::runtime()?.block_on(async {
        let proxy = Proxy::start(config, Some(config_path.clone())).await?;
        println!(
            "\nSwitchyard is running (config: {cfg}).\n\nNodes:\n{nodes}\n\n\
             Connect (password: {MY_APP_PASSWORD}):\n  \
             mariadb -h 127.0.0.1 -P {rw_port} -u {MY_APP_USER} -p{MY_APP_PASSWORD} {MY_APP_DB}   # read-write: the primary\n  \
             mariadb -h 127.0.0.1 -P {ro_port} -u {MY_APP_USER} -p{MY_APP_PASSWORD} {MY_APP_DB}   # read-only: a replica\n\n\
             Status page: http://127.0.0.1:{http_port}/   (also /status, /metrics)\n\n\
             Django settings (the seed article's two aliases; no socket probe needed in the router):\n  \
             DATABASES = {{\n    'default': {{'ENGINE': 'django.db.backends.mysql', 'HOST': '127.0.0.1', 'PORT': '{rw_port}',\n                \
             'NAME': '{MY_APP_DB}', 'USER': '{MY_APP_USER}', 'PASSWORD': '{MY_APP_PASSWORD}'}},\n    \
             'follower': {{'ENGINE': 'django.db.backends.mysql', 'HOST': '127.0.0.1', 'PORT': '{ro_port}',\n                 \
             'NAME': '{MY_APP_DB}', 'USER': '{MY_APP_USER}', 'PASSWORD': '{MY_APP_PASSWORD}'}},\n  }}\n\n\
             Try a planned switchover (the old primary becomes a replica of the new one):\n  \
             switchyard switchover --url http://127.0.0.1:{http_port} --cluster main --to failover1\n\n\
             {failover_howto}\n\n\
             A replica whose replication stops gets no reads:  mariadb -S {s2} -u root -e \"STOP SLAVE\"\n\
             (root logs in through each node's socket, e.g. mariadb -S {s0} -u root)\n\
             {second}\n\
             Node states follow as they change. Ctrl-C stops everything and removes {dir}.\n",
            cfg = config_path.display(),
            nodes = nodes.join("\n"),
            dir = cluster.dir().display(),
        );
        show_states_until_signal(&proxy).await?;
        println!("\nStopping the proxy and the cluster...");
        proxy.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })?;
    drop(children);
    drop(cluster);
    println!("Done.");
    Ok(())
}

/// Print the cluster's node states as they change, until Ctrl-C / SIGTERM.
async fn show_states_until_signal(proxy: &Proxy) -> Result<()> {
    let state = proxy
        .shared
        .clusters()
        .values()
        .next()
        .expect("one cluster")
        .state
        .clone();
    let mut rx = state.subscribe();
    let show = async {
        loop {
            let snap = rx.borrow_and_update().clone();
            println!("[{}] {}", chrono_now(), summary(&snap));
            if rx.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        r = crate::app::wait_for_signal(proxy) => {
            r?;
        }
        _ = show => {}
    }
    Ok(())
}

fn summary(snap: &ClusterSnapshot) -> String {
    let parts: Vec<String> = snap
        .nodes
        .iter()
        .map(|n| match (n.health, n.role) {
            (Health::Up, Role::Standby) => match n.lag_ms {
                Some(lag) => format!("{} up standby (lag {lag} ms)", n.name),
                None => format!("{} up standby (not replicating: no reads)", n.name),
            },
            (Health::Up, r) => format!("{} up {r}", n.name),
            (Health::Down, _) => format!("{} DOWN ({})", n.name, n.last_error.as_deref().unwrap_or("?")),
            (Health::Unknown, _) => format!("{} checking", n.name),
        })
        .collect();
    format!("cluster {}: {}", snap.name, parts.join(" | "))
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}
