//! The `switchyard` command line: run the proxy, check a config, or run the demo.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::app::Proxy;
use switchyard::cluster::topology::{ClusterSnapshot, Health, Role};
use switchyard::config::Config;
use switchyard::localcluster::{LocalCluster, APP_DB, APP_PASSWORD, APP_USER};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "High-availability proxy for replicated PostgreSQL",
    long_about = "High-availability proxy for replicated PostgreSQL.\n\n\
        Checks every server of a cluster in the background, sends writes (listen_rw) only to the \
        node that reports itself primary, spreads reads (listen_ro) over healthy standbys within \
        max_replica_lag_ms and falls back to the primary.\n\n\
        Examples:\n  switchyard --config switchyard.toml        run the proxy\n  \
        switchyard check --config switchyard.toml  validate a config\n  \
        switchyard demo                            local primary + 2 standbys + proxy"
)]
struct Cli {
    /// Config file (TOML); runs the proxy when no subcommand is given.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Run,
    /// Validate the config and exit: non-zero with a message naming the bad key.
    Check,
    /// Show every cluster and node, as the admin HTTP `/status` reports it.
    Status {
        /// Base URL of the admin HTTP endpoint (default: admin.http_listen of --config).
        #[arg(long)]
        url: Option<String>,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Move the primary role to a standby (planned switchover), through the admin HTTP
    /// endpoint; prints each step and how long new transactions were held.
    Switchover {
        /// Base URL of the admin HTTP endpoint (default: admin.http_listen of --config).
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        cluster: String,
        /// The standby to promote.
        #[arg(long)]
        to: String,
    },
    /// Start a local primary and two streaming standbys from this machine's PostgreSQL
    /// binaries in a temporary directory, with the proxy in front. Ctrl-C cleans up.
    Demo {
        /// Default 6432 (PostgreSQL) or 6446 (MariaDB).
        #[arg(long)]
        rw_port: Option<u16>,
        /// Default 6433 (PostgreSQL) or 6447 (MariaDB).
        #[arg(long)]
        ro_port: Option<u16>,
        #[arg(long, default_value_t = 9930)]
        http_port: u16,
        /// Who promotes a standby when the primary dies: `follow` (you do, as the printed
        /// instructions show) or `automatic` (Switchyard does).
        #[arg(long, value_enum, default_value_t = DemoFailover::Follow)]
        failover: DemoFailover,
        /// Switchyard instances: 2 starts a local etcd and a second instance (rw/ro on
        /// the next ports up, admin HTTP on http-port + 1), agreeing through etcd.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        instances: u8,
        /// `postgresql`, or `mariadb`: a MariaDB primary and two GTID replicas from
        /// Debian's mariadb-server, the first seed article's Django setup.
        #[arg(long, value_enum, default_value_t = DemoEngine::Postgresql)]
        engine: DemoEngine,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DemoEngine {
    Postgresql,
    Mariadb,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DemoFailover {
    Follow,
    Automatic,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.as_ref().unwrap_or(&Cmd::Run) {
        Cmd::Check => check(cli.config.as_ref()),
        Cmd::Run => {
            init_logging(cli.log_format);
            run(cli.config.as_ref())
        }
        Cmd::Status { url, watch } => status(cli.config.as_ref(), url.clone(), *watch),
        Cmd::Switchover { url, cluster, to } => switchover(cli.config.as_ref(), url.clone(), cluster, to),
        Cmd::Demo {
            rw_port,
            ro_port,
            http_port,
            failover,
            instances,
            engine,
        } => {
            init_logging(cli.log_format);
            match engine {
                DemoEngine::Postgresql => demo(
                    rw_port.unwrap_or(6432),
                    ro_port.unwrap_or(6433),
                    *http_port,
                    *failover,
                    *instances,
                ),
                DemoEngine::Mariadb if *failover == DemoFailover::Automatic || *instances > 1 => Err(anyhow::anyhow!(
                    "--engine mariadb runs one instance that follows promotions (Switchyard does not promote MySQL replicas)"
                )),
                DemoEngine::Mariadb => demo_mariadb(rw_port.unwrap_or(6446), ro_port.unwrap_or(6447), *http_port),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&PathBuf>) -> Result<Config> {
    let path = path.context("no config given: use --config FILE (or `switchyard demo` to try it out)")?;
    Ok(Config::load(path)?)
}

fn check(path: Option<&PathBuf>) -> Result<()> {
    let config = load(path)?;
    // Files named by the config are read as the proxy would read them.
    if let Some(tls) = &config.tls {
        switchyard::frontend::tls::acceptor(tls).map_err(|e| anyhow::anyhow!(e))?;
    }
    for (name, c) in &config.clusters {
        switchyard::tls::ServerTls::new(c.server_tls, c.server_ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("clusters.{name}: {e}"))?;
    }
    let nodes: usize = config.clusters.values().map(|c| c.nodes.len()).sum();
    println!(
        "config ok: {} cluster(s), {nodes} node(s), {} user(s)",
        config.clusters.len(),
        config.users.len()
    );
    for (name, c) in &config.clusters {
        if c.manager.is_none() {
            println!(
                "note: cluster {name} has no [clusters.{name}.manager]: switchover and automatic failover are unavailable (Switchyard follows promotions made by others)"
            );
        }
    }
    Ok(())
}

/// The control runtime: accepting clients, health checks, admin HTTP, signals. The
/// data path runs on the proxy's own worker threads (`app::Workers`).
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("switchyard-control")
        .enable_all()
        .build()?)
}

fn run(path: Option<&PathBuf>) -> Result<()> {
    let config = load(path)?;
    runtime()?.block_on(async {
        let proxy = Proxy::start(config, path.cloned()).await?;
        wait_for_signal(&proxy).await?;
        tracing::info!("shutting down: no new sessions; open transactions may finish");
        proxy.shutdown().await;
        Ok(())
    })
}

/// Wait for SIGTERM or SIGINT; reload the config on every SIGHUP meanwhile.
async fn wait_for_signal(proxy: &Proxy) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => return Ok(r?),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => {
                // reload() logs its own outcome, success or rejection.
                let _ = proxy.shared.reload();
            }
        }
    }
}

/// The admin HTTP base URL: `--url`, or `admin.http_listen` of the config.
fn admin_url(path: Option<&PathBuf>, url: Option<String>) -> Result<String> {
    Ok(match url {
        Some(u) => u,
        None => {
            let config = load(path).context("give --url or a --config with admin.http_listen")?;
            let addr = config
                .admin
                .http_listen
                .context("the config has no admin.http_listen; give --url")?;
            format!("http://{addr}")
        }
    })
}

/// The admin HTTP token: `SWITCHYARD_TOKEN`, else `admin.token` of the config.
fn admin_token(path: Option<&PathBuf>) -> Option<String> {
    std::env::var("SWITCHYARD_TOKEN")
        .ok()
        .or_else(|| path.and_then(|p| Config::load(p).ok()).and_then(|c| c.admin.token))
}

const TOKEN_HINT: &str =
    "the admin endpoint wants its token (admin.token): set SWITCHYARD_TOKEN or give the --config that has it";

fn switchover(path: Option<&PathBuf>, url: Option<String>, cluster: &str, to: &str) -> Result<()> {
    let base = admin_url(path, url)?;
    let url = format!("{}/clusters/{cluster}/switchover?to={to}", base.trim_end_matches('/'));
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut req = agent.post(&url);
    if let Some(t) = admin_token(path) {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.send_empty().with_context(|| format!("POST {url}"))?;
    let status = resp.status().as_u16();
    if status == 401 {
        anyhow::bail!("{TOKEN_HINT}");
    }
    let body: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string()?)
        .context("unexpected answer from the switchover endpoint")?;
    if status != 200 {
        anyhow::bail!("{}", body["error"].as_str().unwrap_or("switchover failed"));
    }
    for step in body["steps"].as_array().into_iter().flatten() {
        println!("{:<10} {:>6} ms", step[0].as_str().unwrap_or("?"), step[1]);
    }
    println!(
        "switchover of cluster {cluster}: {} -> {}; new transactions held {} ms",
        body["from"].as_str().unwrap_or("?"),
        body["to"].as_str().unwrap_or("?"),
        body["hold_ms"]
    );
    Ok(())
}

fn status(path: Option<&PathBuf>, url: Option<String>, watch: bool) -> Result<()> {
    let base = admin_url(path, url)?;
    let url = format!("{}/status", base.trim_end_matches('/'));
    let token = admin_token(path);
    loop {
        let mut req = ureq::get(&url);
        if let Some(t) = &token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let body = match req.call() {
            Ok(r) => r.into_body().read_to_string()?,
            Err(ureq::Error::StatusCode(401)) => anyhow::bail!("{TOKEN_HINT}"),
            Err(e) => return Err(e).with_context(|| format!("GET {url}")),
        };
        let doc: switchyard::admin::status::Status =
            serde_json::from_str(&body).context("unexpected /status document")?;
        let table = switchyard::admin::status::render_table(&doc);
        if !watch {
            print!("{table}");
            return Ok(());
        }
        // Clear the screen and home the cursor, like `watch`.
        print!("\x1b[2J\x1b[H{table}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

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
    let (client, peer) = (
        switchyard::localcluster::free_port(),
        switchyard::localcluster::free_port(),
    );
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

fn demo(rw_port: u16, ro_port: u16, http_port: u16, failover: DemoFailover, instances: u8) -> Result<()> {
    println!("Starting a local PostgreSQL cluster (1 primary, 2 streaming standbys)...");
    let cluster = LocalCluster::start(2).context("could not start the local cluster")?;
    let config_text = format!(
        "{}\n[admin]\nhttp_listen = \"127.0.0.1:{http_port}\"\n\n[[users]]\nname = \"admin\"\npassword = \"admin\"\nadmin = true\n",
        cluster.config_toml(
            rw_port,
            ro_port,
            &format!(
                "max_replica_lag_ms = 10000\nread_balance = \"round_robin\"\nfailover = \"{}\"\n\n[clusters.main.manager]\nuser = \"postgres\"\npassword = \"{}\"\n",
                if failover == DemoFailover::Automatic { "automatic" } else { "follow" },
                switchyard::localcluster::SUPERUSER_PASSWORD
            )
        )
    );
    // Two instances: a local etcd, and the second instance as a child process (one
    // coordinator per process) on the next ports up.
    let mut children = Vec::new();
    let mut config_text = config_text;
    let mut second = String::new();
    if instances == 2 {
        let (etcd, url) = demo_etcd(cluster.dir())?;
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
        let other_path = cluster.dir().join("switchyard-sy2.toml");
        std::fs::write(&other_path, &other)?;
        let log = cluster.dir().join("switchyard-sy2.log");
        children.push(Child(
            std::process::Command::new(std::env::current_exe()?)
                .arg("--config")
                .arg(&other_path)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()?,
        ));
        second = format!(
            "\nA second Switchyard instance (sy2) agrees with this one (sy1) through etcd at {url}:\n  \
             rw 127.0.0.1:{}  ro 127.0.0.1:{}  status http://127.0.0.1:{}/  log {}\n  \
             One leader decides failovers and switchovers; both send writes only to the published primary.\n",
            rw_port + 2,
            ro_port + 2,
            http_port + 1,
            log.display()
        );
    }
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
    let failover_howto = match failover {
        DemoFailover::Follow => format!(
            "Or a failover in another terminal (failover = \"follow\": you promote; `--failover automatic` lets Switchyard do it):\n  \
             {as_postgres}{bin}/pg_ctl -D {d0} -m immediate stop     # primary goes down\n  \
             {as_postgres}{bin}/pg_ctl -D {d1} promote               # failover1 takes over"
        ),
        DemoFailover::Automatic => format!(
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
    runtime()?.block_on(async {
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

/// `switchyard demo --engine mariadb`: a MariaDB primary and two GTID replicas with
/// the proxy in front, the seed article's Django `DATABASES`, and how to fail over.
fn demo_mariadb(rw_port: u16, ro_port: u16, http_port: u16) -> Result<()> {
    use switchyard::localmaria::{
        MariaCluster, MY_APP_DB, MY_APP_PASSWORD, MY_APP_USER, MY_MONITOR_PASSWORD, MY_MONITOR_USER,
    };
    println!("Starting a local MariaDB cluster (1 primary, 2 GTID replicas)...");
    let cluster = MariaCluster::start(2).context("could not start the local MariaDB cluster")?;
    let config_text = format!(
        "[health]\nuser = \"{MY_MONITOR_USER}\"\npassword = \"{MY_MONITOR_PASSWORD}\"\n\n\
         [admin]\nhttp_listen = \"127.0.0.1:{http_port}\"\n\n\
         [[users]]\nname = \"{MY_APP_USER}\"\npassword = \"{MY_APP_PASSWORD}\"\n\n{}",
        cluster.config_toml(
            "main",
            rw_port,
            ro_port,
            "max_replica_lag_ms = 10000\nread_balance = \"round_robin\"\n"
        )
    );
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
    runtime()?.block_on(async {
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
             Try a failover in another terminal (Switchyard follows; you promote):\n  \
             kill -9 {pid0}                                                     # the primary goes down\n  \
             mariadb -S {s1} -u root -e \"STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0\"   # failover1 takes over\n  \
             mariadb -S {s2} -u root -e \"STOP SLAVE; CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={p1}, MASTER_USER='repl', MASTER_PASSWORD='repl', MASTER_USE_GTID=slave_pos; START SLAVE\"\n\n\
             A replica whose replication stops gets no reads:  mariadb -S {s2} -u root -e \"STOP SLAVE\"\n\
             (root logs in through each node's socket, e.g. mariadb -S {s0} -u root)\n\n\
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
    drop(cluster);
    println!("Done.");
    Ok(())
}

/// Print the cluster's node states as they change, until Ctrl-C / SIGTERM.
async fn show_states_until_signal(proxy: &Proxy) -> Result<()> {
    let state = proxy
        .shared
        .clusters
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
        r = wait_for_signal(proxy) => r?,
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
