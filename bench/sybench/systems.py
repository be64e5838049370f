"""The systems under test: a direct connection, PgBouncer, HAProxy and Switchyard in
several configurations, each started on 127.0.0.1 with its own config file."""

import json
import os
import pwd
import subprocess
import time

from .procs import free_port, log, wait_port

BENCH_USER, BENCH_PASSWORD = "bench", "benchpw"
IDLE_USER, IDLE_PASSWORD = "idle", "idlepw"
DB = "bench"


class System:
    """One endpoint pgbench talks to. `pid` is the process whose CPU/RSS is measured
    (None for the direct connection); `log_path` a log scanned for warnings per case."""

    def __init__(self, key, label, port, pid=None, log_path=None, conn_per_client=False,
                 config_text=None, description=""):
        self.key = key
        self.label = label
        self.port = port
        self.pid = pid
        self.log_path = log_path
        # True when every client needs its own server connection (so clients beyond the
        # server's max_connections cannot all connect).
        self.conn_per_client = conn_per_client
        self.config_text = config_text
        self.description = description
        self.unable = None  # set once a case shows the system cannot run that many clients
        # Environment pgbench gets for this system (e.g. PGSSLMODE=require for a TLS twin).
        self.client_env = {}

    def log_offset(self):
        if not self.log_path:
            return 0
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_problems(self, since):
        """WARN/ERROR events in the log since byte offset `since`: (count, {message: n})."""
        if not self.log_path:
            return 0, {}
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read().decode(errors="replace")
        except OSError:
            return 0, {}
        n, msgs = 0, {}
        for line in data.splitlines():
            line = line.strip()
            if not line:
                continue
            level, text = None, line
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                    level = str(ev.get("level", "")).upper()
                    fields = ev.get("fields", ev)
                    text = fields.get("message", "")
                    for k in ("reason", "code", "error", "node"):
                        if k in fields:
                            text += f" {k}={fields[k]}"
                except ValueError:
                    pass
            else:
                for lv in ("ERROR", "WARN", "FATAL", "PANIC", "WARNING"):
                    if f" {lv} " in f" {line} " or f"{lv}:" in line:
                        level = lv
                        break
            if level in ("WARN", "WARNING", "ERROR", "FATAL", "PANIC"):
                n += 1
                key = f"{level} {text}"[:300]
                msgs[key] = msgs.get(key, 0) + 1
        return n, msgs


def _chown_postgres(path):
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


# ---- PgBouncer -----------------------------------------------------------------------

def make_tls_cert(base, key_type="ec"):
    """A self-signed certificate for 127.0.0.1 / localhost, made with `openssl` in
    `base`/tls: (cert_path, key_path), both readable by the `postgres` user (PgBouncer runs
    as it). `key_type`: "ec" (P-256) or "rsa" (2048 bits)."""
    d = os.path.join(base, "tls")
    os.makedirs(d, exist_ok=True)
    _chown_postgres(d)
    cert, key = os.path.join(d, "server.crt"), os.path.join(d, "server.key")
    newkey = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if key_type == "ec"
              else ["-newkey", "rsa:2048"])
    p = subprocess.run(["openssl", "req", "-x509", "-nodes", *newkey, "-keyout", key, "-out", cert,
                        "-days", "3", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"openssl req failed: {p.stderr.strip()}")
    for path in (cert, key):
        os.chmod(path, 0o600)
        _chown_postgres(path)
    return cert, key


def start_pgbouncer(reg, base, pg_port, pool_size, scram_secret, key="pgbouncer", tls=None, argv_prefix=()):
    """PgBouncer in transaction mode. `tls`: (cert, key) for client TLS
    (client_tls_sslmode = allow); `argv_prefix`: e.g. ["taskset", "-c", "1"]."""
    d = os.path.join(base, key)
    os.makedirs(d, exist_ok=True)
    _chown_postgres(d)
    port = free_port()
    cfg = f"""[databases]
{DB} = host=127.0.0.1 port={pg_port} dbname={DB}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = hba
auth_hba_file = {d}/hba.conf
auth_file = {d}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 12000
max_db_connections = 0
log_connections = 0
log_disconnections = 0
logfile = {d}/pgbouncer.log
ignore_startup_parameters = extra_float_digits,options
"""
    if tls:
        cfg += f"client_tls_sslmode = allow\nclient_tls_cert_file = {tls[0]}\nclient_tls_key_file = {tls[1]}\n"
    files = {
        "pgbouncer.ini": cfg,
        # bench: the server's own SCRAM secret (PgBouncer then needs no plaintext and
        # logs in to the server with the client's proof); idle: trust to PgBouncer,
        # password to the server.
        "userlist.txt": f'"{BENCH_USER}" "{scram_secret}"\n"{IDLE_USER}" "{IDLE_PASSWORD}"\n',
        "hba.conf": f"host all {IDLE_USER} 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    }
    for name, text in files.items():
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        _chown_postgres(path)
    kw = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    # taskset (util-linux) execs PgBouncer in place: the pid is PgBouncer's.
    p = reg.spawn(key, list(argv_prefix) + ["pgbouncer", os.path.join(d, "pgbouncer.ini")],
                  os.path.join(d, "stdout.log"), **kw)
    wait_port(port, proc=p)
    s = System(key, "PgBouncer (transaction)", port, pid=p.pid,
                  log_path=os.path.join(d, "pgbouncer.log"), config_text=cfg,
                  description=f"PgBouncer, pool_mode = transaction, default_pool_size = {pool_size}, "
                              "auth_type = hba (scram-sha-256 for the bench user; SCRAM secret in userlist)"
                              + (", client TLS (client_tls_sslmode = allow; pgbench with PGSSLMODE=require)" if tls else "")
                              + (f", started as `{' '.join(argv_prefix)} pgbouncer ...`" if argv_prefix else ""))
    s.proc = p
    return s


# ---- HAProxy -------------------------------------------------------------------------

def start_haproxy(reg, base, pg_port):
    d = os.path.join(base, "haproxy")
    os.makedirs(d, exist_ok=True)
    port = free_port()
    cfg = f"""global
    maxconn 5000

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

listen postgres
    bind 127.0.0.1:{port}
    option pgsql-check user postgres
    server primary 127.0.0.1:{pg_port} check inter 1s rise 2 fall 2 maxconn 5000
"""
    path = os.path.join(d, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(cfg)
    p = reg.spawn("haproxy", ["haproxy", "-db", "-f", path], os.path.join(d, "haproxy.log"))
    wait_port(port, proc=p)
    s = System("haproxy", "HAProxy (TCP)", port, pid=p.pid, log_path=os.path.join(d, "haproxy.log"),
               conn_per_client=True, config_text=cfg,
               description="HAProxy, mode tcp, option pgsql-check, one server (the primary)")
    s.proc = p
    return s


# ---- Switchyard ----------------------------------------------------------------------

def switchyard_config(rw_port, ro_port, nodes, pool_mode, pool_size, split, health, admin_port=None, extra=""):
    users = f"""[[users]]
name = "{BENCH_USER}"
password = "{BENCH_PASSWORD}"
auth = "scram-sha-256"

[[users]]
name = "{IDLE_USER}"
password = "{IDLE_PASSWORD}"
auth = "trust"
"""
    h = health
    # As PgBouncer's log_connections = 0 above: no line per session. SYBENCH_LOG_CONNECTIONS=1
    # keeps them (and leaves the key out, for builds older than the setting).
    log_connections = "" if os.environ.get("SYBENCH_LOG_CONNECTIONS") == "1" else "log_connections = false\n"
    text = f"""[health]
interval_ms = {h['interval_ms']}
timeout_ms = {h['timeout_ms']}
rise = {h['rise']}
fall = {h['fall']}

{users}
[proxy]
max_clients = 12000
{log_connections}
[clusters.main]
listen_rw = "127.0.0.1:{rw_port}"
"""
    if ro_port:
        text += f'listen_ro = "127.0.0.1:{ro_port}"\n'
    text += f'pool_mode = "{pool_mode}"\n'
    if pool_mode == "transaction":
        text += f"pool_size = {pool_size}\n"
        text += f"read_write_split = {'true' if split else 'false'}\n"
    text += extra
    for name, port in nodes:
        text += f'\n[[clusters.main.nodes]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'
    if admin_port:
        text += f'\n[admin]\nhttp_listen = "127.0.0.1:{admin_port}"\n'
    return text


def start_switchyard(reg, base, binary, key, label, nodes, pool_mode, pool_size, split, health,
                     with_ro=False, description="", extra="", top="", argv_prefix=(), env_extra=None):
    """`top`: sections appended to the config (e.g. [tls]); `argv_prefix`: e.g.
    ["taskset", "-c", "1"]; `env_extra`: e.g. {"SWITCHYARD_THREADS": "1"}."""
    d = os.path.join(base, key)
    os.makedirs(d, exist_ok=True)
    rw = free_port()
    ro = free_port() if with_ro else None
    admin = free_port()
    cfg = switchyard_config(rw, ro, nodes, pool_mode, pool_size, split, health, admin, extra) + top
    path = os.path.join(d, "switchyard.toml")
    with open(path, "w") as f:
        f.write(cfg)
    chk = subprocess.run([binary, "check", "--config", path], capture_output=True, text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"switchyard check rejected {path}:\n{chk.stdout}{chk.stderr}\n{cfg}")
    logp = os.path.join(d, "switchyard.log")
    lvl = os.environ.get("SYBENCH_RUST_LOG", "info")
    env = dict(os.environ, RUST_LOG=lvl, SWITCHYARD_LOG=lvl)  # Switchyard reads SWITCHYARD_LOG
    env.update(env_extra or {})
    p = reg.spawn(f"switchyard {key}", list(argv_prefix) + [binary, "--log-format", "json", "--config", path], logp,
                  env=env)
    wait_port(rw, proc=p)
    if ro:
        wait_port(ro, proc=p)
    s = System(key, label, rw, pid=p.pid, log_path=logp, conn_per_client=(pool_mode == "session"),
               config_text=cfg, description=description)
    s.ro_port = ro
    s.admin_port = admin
    s.proc = p
    return s


def wait_switchyard_ready(system, user, password, want_ro=False, timeout=30):
    """Wait until the proxy routes: a query through rw (and ro) answers."""
    import asyncio

    from .pgwire import Conn

    async def probe(port):
        c = await Conn.connect("127.0.0.1", port, user, DB, password)
        try:
            return await c.query("SELECT inet_server_port(), pg_is_in_recovery()")
        finally:
            c.close()

    deadline = time.monotonic() + timeout
    last = None
    ports = [system.port] + ([system.ro_port] if want_ro and system.ro_port else [])
    for port in ports:
        while True:
            try:
                asyncio.run(asyncio.wait_for(probe(port), 10))
                break
            except Exception as e:
                last = e
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{system.key}: port {port} not serving after {timeout}s: {last}")
                time.sleep(0.2)
