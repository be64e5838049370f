//! The `switchyard` command line: run the proxy, check a config, or run the demo.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::app::Proxy;
use switchyard::config::Config;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SWITCHYARD_COMMIT"), ")"),
    about = "High-availability proxy for replicated PostgreSQL and MySQL/MariaDB",
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
    /// Where logs go (stdout suits containers that collect it).
    #[arg(long, value_enum, default_value_t = LogTo::Stderr, global = true)]
    log_to: LogTo,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogTo {
    Stderr,
    Stdout,
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
    /// The heaviest statements (query digests) as a table refreshed every second, with
    /// calls per second, mean and p99 latency, rows, node and route.
    Top {
        /// Base URL of the admin HTTP endpoint (default: admin.http_listen of --config).
        #[arg(long)]
        url: Option<String>,
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// total_time, calls, errors, rows, mean_time, max_time or p99.
        #[arg(long, default_value = "total_time")]
        order: String,
        /// Rows shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print one table and exit (for scripts).
        #[arg(long)]
        once: bool,
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
    /// Upgrade the running proxy to the binary now at its executable's path, through the
    /// admin HTTP endpoint (as `kill -USR2`): the new process takes the listeners and
    /// the transaction-pooling clients at their next transaction boundary.
    Upgrade {
        /// Base URL of the admin HTTP endpoint (default: admin.http_listen of --config).
        #[arg(long)]
        url: Option<String>,
    },
    /// Print a switchyard.toml equivalent to another pooler's config (settings with no
    /// equivalent are listed as comments).
    Import {
        #[command(subcommand)]
        from: ImportFrom,
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

#[derive(Subcommand)]
enum ImportFrom {
    /// PgBouncer: `pgbouncer.ini` and its `auth_file` (userlist.txt).
    Pgbouncer {
        #[arg(long)]
        ini: PathBuf,
        /// The userlist (PgBouncer's auth_file): its users become [[users]].
        #[arg(long)]
        userlist: Option<PathBuf>,
    },
    /// HAProxy in front of Patroni: `haproxy.cfg` (tcp listeners whose checks ask
    /// Patroni's REST API for /primary, /replica, ...).
    Haproxy {
        #[arg(long)]
        cfg: PathBuf,
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

fn init_logging(format: LogFormat, to: LogTo) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| "info".into());
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
        match to {
            LogTo::Stderr => Box::new(std::io::stderr()),
            LogTo::Stdout => Box::new(std::io::stdout()),
        }
    });
    // Colour only for a terminal: a journal or a log file gets plain text.
    let ansi = {
        use std::io::IsTerminal;
        match to {
            LogTo::Stderr => std::io::stderr().is_terminal(),
            LogTo::Stdout => std::io::stdout().is_terminal(),
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
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
            init_logging(cli.log_format, cli.log_to);
            run(cli.config.as_ref())
        }
        Cmd::Status { url, watch } => status(cli.config.as_ref(), url.clone(), *watch),
        Cmd::Top {
            url,
            cluster,
            order,
            limit,
            once,
        } => top(
            cli.config.as_ref(),
            url.clone(),
            cluster.as_deref(),
            order,
            *limit,
            *once,
        ),
        Cmd::Switchover { url, cluster, to } => switchover(cli.config.as_ref(), url.clone(), cluster, to),
        Cmd::Upgrade { url } => upgrade(cli.config.as_ref(), url.clone()),
        Cmd::Import {
            from: ImportFrom::Pgbouncer { ini, userlist },
        } => import_pgbouncer(ini, userlist.as_ref()),
        Cmd::Import {
            from: ImportFrom::Haproxy { cfg },
        } => import_haproxy(cfg),
        Cmd::Demo {
            rw_port,
            ro_port,
            http_port,
            failover,
            instances,
            engine,
        } => {
            init_logging(cli.log_format, cli.log_to);
            match engine {
                DemoEngine::Postgresql => switchyard::demo::postgres_demo(
                    rw_port.unwrap_or(6432),
                    ro_port.unwrap_or(6433),
                    *http_port,
                    *failover == DemoFailover::Automatic,
                    *instances,
                ),
                DemoEngine::Mariadb => switchyard::demo::mariadb_demo(
                    rw_port.unwrap_or(6446),
                    ro_port.unwrap_or(6447),
                    *http_port,
                    *failover == DemoFailover::Automatic,
                    *instances,
                ),
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

fn import_pgbouncer(ini: &PathBuf, userlist: Option<&PathBuf>) -> Result<()> {
    let text = std::fs::read_to_string(ini).with_context(|| format!("cannot read {}", ini.display()))?;
    let users = userlist
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    let out = switchyard::import::pgbouncer::convert(&switchyard::import::pgbouncer::Input {
        ini: &text,
        ini_name: &ini.display().to_string(),
        userlist: users.as_deref(),
    })?;
    print!("{out}");
    Ok(())
}

fn import_haproxy(cfg: &PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(cfg).with_context(|| format!("cannot read {}", cfg.display()))?;
    let out = switchyard::import::haproxy::convert(&switchyard::import::haproxy::Input {
        cfg: &text,
        cfg_name: &cfg.display().to_string(),
    })?;
    print!("{out}");
    Ok(())
}

fn load(path: Option<&PathBuf>) -> Result<Config> {
    let path = path.context("no config given: use --config FILE (or `switchyard demo` to try it out)")?;
    Ok(Config::load(path)?)
}

fn check(path: Option<&PathBuf>) -> Result<()> {
    let config = load(path)?;
    // Files named by the config are read as the proxy would read them.
    if let Some(tls) = &config.tls {
        switchyard::proxy::stream::acceptor(tls).map_err(|e| anyhow::anyhow!(e))?;
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
    let fds = switchyard::proxy::limits::raise_fd_limit();
    let needed = switchyard::proxy::limits::descriptors_needed(&config);
    if needed > fds {
        println!(
            "note: proxy.max_clients = {} with these pools may need {needed} file descriptors, and this process may open {fds} (RLIMIT_NOFILE's hard limit): clients past {} are refused with 53300; raise the limit (LimitNOFILE=, ulimit -n) or lower proxy.max_clients",
            config.proxy.max_clients,
            switchyard::proxy::limits::descriptor_budget(&config, fds)
        );
    }
    for (name, c) in &config.clusters {
        if c.manager.is_none() {
            println!(
                "note: cluster {name} has no [clusters.{name}.manager]: switchover and automatic failover are unavailable (Switchyard follows promotions made by others)"
            );
        }
    }
    check_mysql_managers(&config)
}

/// For MySQL clusters with a manager: log in to each node as it and name the privileges
/// it lacks there. A node that cannot be reached is noted, not an error (it may be down
/// now); missing privileges are an error.
fn check_mysql_managers(config: &Config) -> Result<()> {
    use switchyard::cluster::topology::NodeState;
    use switchyard::config::Engine;
    use switchyard::mysql::manager::MyControl;
    let mut missing = Vec::new();
    let clusters: Vec<_> = config
        .clusters
        .iter()
        .filter(|(_, c)| c.engine == Engine::Mysql && c.manager.is_some())
        .collect();
    if clusters.is_empty() {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for (name, c) in clusters {
        let login = c.manager.clone().expect("filtered");
        let control = MyControl::new(login.clone(), c, Default::default());
        for n in &c.nodes {
            let node = NodeState::new(&n.name, &format!("{}:{}", n.host, n.port));
            match rt.block_on(control.missing_privileges(&node, std::time::Duration::from_secs(3))) {
                Ok(m) if m.is_empty() => println!(
                    "cluster {name}, node {}: the manager has the privileges it needs",
                    n.name
                ),
                Ok(m) => missing.push(format!(
                    "cluster {name}, node {}: the manager ({}) lacks {} (GRANT {} ON *.* TO ...)",
                    n.name,
                    login.user,
                    m.join(", "),
                    m.join(", ")
                )),
                Err(e) => println!(
                    "note: cluster {name}, node {}: could not check the manager's privileges: {e}",
                    n.name
                ),
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!("{}", missing.join("\n"))
}

fn run(path: Option<&PathBuf>) -> Result<()> {
    let config = load(path)?;
    let fds = switchyard::proxy::limits::raise_fd_limit();
    let needed = switchyard::proxy::limits::descriptors_needed(&config);
    let budget = switchyard::proxy::limits::descriptor_budget(&config, fds);
    if needed > fds {
        tracing::warn!(
            fd_limit = fds,
            needed,
            max_clients = config.proxy.max_clients,
            clients = budget,
            "the file-descriptor limit is below what proxy.max_clients and the pools may need: clients past `clients` are refused with 53300 (raise LimitNOFILE / ulimit -n, or lower proxy.max_clients)"
        );
    }
    // Started by a running Switchyard as its successor (binary upgrade): its listeners.
    let inherited = switchyard::upgrade::inherit()?;
    switchyard::app::runtime()?.block_on(async {
        let health = config.health.interval() + 2 * config.health.timeout();
        let (listeners, predecessor) = match inherited {
            Some(i) => (i.listeners, Some(i.channel)),
            None => Default::default(),
        };
        let proxy = Proxy::start_inheriting(config, path.cloned(), listeners).await?;
        proxy.shared.admissions.set_descriptor_cap(budget);
        // systemd's Type=notify: ready once the listeners are bound and every node has
        // answered (or failed) its first health check; signals are handled meanwhile.
        // A successor tells its predecessor instead, which tells systemd and hands over
        // its clients.
        let ready = tokio::spawn({
            let shared = proxy.shared.clone();
            let adopter = proxy.adopter();
            async move {
                let unchecked = switchyard::app::first_health_round(&shared, health).await;
                if let Some(channel) = predecessor {
                    match switchyard::upgrade::say_ready(&channel) {
                        Ok(()) => adopter.adopt(channel),
                        Err(e) => tracing::error!(reason = %e, "could not tell the old process this one is ready"),
                    }
                    return;
                }
                let status = match unchecked {
                    0 => format!("serving {} clusters", shared.clusters().len()),
                    n => format!("serving; {n} nodes not checked yet"),
                };
                switchyard::app::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
            }
        });
        let signalled = switchyard::app::wait_for_signal(&proxy).await?;
        if signalled == switchyard::app::Stop::Upgraded {
            // The adopting thread of a successor runs on (it is detached).
            tracing::info!("upgraded: draining the clients that stay here, then exiting");
            proxy.drain().await;
            tracing::info!("upgraded: this process is done");
            return Ok(());
        }
        ready.abort();
        switchyard::app::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down: no new sessions; open transactions may finish");
        proxy.shutdown().await;
        Ok(())
    })
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
    let body = post_admin(
        path,
        url,
        &format!("/clusters/{cluster}/switchover?to={to}"),
        "switchover",
    )?;
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

/// POST to the admin HTTP endpoint (with the token, if any): its JSON answer, or its
/// `error` as the failure.
fn post_admin(path: Option<&PathBuf>, url: Option<String>, at: &str, what: &str) -> Result<serde_json::Value> {
    let base = admin_url(path, url)?;
    let url = format!("{}{at}", base.trim_end_matches('/'));
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
        .with_context(|| format!("unexpected answer from the {what} endpoint"))?;
    if status != 200 {
        anyhow::bail!("{}", body["error"].as_str().unwrap_or(&format!("{what} failed")));
    }
    Ok(body)
}

fn upgrade(path: Option<&PathBuf>, url: Option<String>) -> Result<()> {
    let body = post_admin(path, url, "/upgrade", "upgrade")?;
    println!(
        "upgraded: the new process (pid {}) serves; the old one drains and exits",
        body["pid"]
    );
    Ok(())
}

fn top(
    path: Option<&PathBuf>,
    url: Option<String>,
    cluster: Option<&str>,
    order: &str,
    limit: usize,
    once: bool,
) -> Result<()> {
    let base = admin_url(path, url)?;
    let mut url = format!("{}/queries?order={order}&limit={limit}", base.trim_end_matches('/'));
    if let Some(c) = cluster {
        url.push_str(&format!("&cluster={c}"));
    }
    let token = admin_token(path);
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut view = switchyard::admin::top::Top::default();
    loop {
        let mut req = agent.get(&url);
        if let Some(t) = &token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call().with_context(|| format!("GET {url}"))?;
        let body = resp.body_mut().read_to_string()?;
        match resp.status().as_u16() {
            200 => {}
            401 => anyhow::bail!("{TOKEN_HINT}"),
            _ => anyhow::bail!("{}", body.trim()),
        }
        let rows: Vec<switchyard::admin::top::Digest> =
            serde_json::from_str(&body).context("unexpected /queries document")?;
        let width = terminal_width();
        let frame = view.frame(&rows, std::time::Instant::now(), width);
        if once {
            print!("{frame}");
            return Ok(());
        }
        print!("\x1b[2J\x1b[H{frame}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// The terminal's width (`COLUMNS`, else the tty's, else 160).
fn terminal_width() -> usize {
    if let Some(c) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return c;
    }
    // SAFETY: TIOCGWINSZ fills a winsize; on failure (not a terminal) it is left zeroed.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        160
    }
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
