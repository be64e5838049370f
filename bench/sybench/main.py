"""bench/run: the whole suite in one command. See bench/README.md."""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from . import failover, idle, report
from .cluster import PG_BIN_DEFAULT, PgCluster
from .pgbench import (PROTOCOLS, WORKLOADS, connect_argvs, display_command, pgbench_argv, run_case,
                      run_parallel)
from .procs import (ForeignLoad, Registry, ResourceWatch, children_of, install_signal_handlers, log,
                    raise_nofile)
from .systems import (BENCH_PASSWORD, BENCH_USER, DB, IDLE_PASSWORD, IDLE_USER, System, make_tls_cert,
                      start_haproxy, start_pgbouncer, start_switchyard, wait_switchyard_ready)

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH_DIR)

ALL_SYSTEMS = ["direct", "pgbouncer", "haproxy", "sy-session", "sy-txn", "sy-split"]
# Run only when named in --systems: what a feature costs, beside sy-txn in one run.
EXTRA_SYSTEMS = ["sy-txn-nodigest", "sy-txn-traced", "sy-txn-traced-all", "sy-txn-otlp-down", "sy-txn-otlp-hung"]
SYSTEM_LABELS = {
    "direct": "direct",
    "pgbouncer": "PgBouncer (txn)",
    "haproxy": "HAProxy (TCP)",
    "sy-session": "Switchyard session",
    "sy-txn": "Switchyard txn",
    "sy-split": "Switchyard txn + split",
    "sy-split1": "Switchyard txn + split, 1 node",
    "sy-split-ryw-off": "Switchyard txn + split, read_your_writes off",
    "sy-txn-nodigest": "Switchyard txn, query digests off",
    "sy-txn-traced": "Switchyard txn, digests + traces (1 %)",
    "sy-txn-traced-all": "Switchyard txn, traces (100 %)",
    "sy-txn-otlp-down": "Switchyard txn, traces (100 %), receiver down",
    "sy-txn-otlp-hung": "Switchyard txn, traces (100 %), receiver hung",
    "pgbouncer-tls": "PgBouncer (txn), client TLS",
    "sy-txn-tls": "Switchyard txn, client TLS",
}
# TLS twins (--connect-tls) of these systems; they run the connect workload only.
TLS_TWINS = ["pgbouncer", "sy-txn"]
# Connection errors that mean "more clients than the server lets in".
TOO_MANY = re.compile(r"too many clients|remaining connection slots|sorry, too many|53300", re.I)


def start_otlp_sink():
    """An OTLP/HTTP receiver that accepts and discards (what the traces cost the proxy,
    not the receiver): its port."""
    import http.server
    import threading

    class Sink(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def start_hung_receiver():
    """A receiver that accepts connections and never answers (a slow or stuck collector):
    its port. The sockets are kept open for the run."""
    import socket
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    held = []

    def accept():
        while True:
            conn, _ = lsock.accept()
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return lsock.getsockname()[1]


def closed_port():
    """A loopback port nothing listens on (a receiver that is down)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/run", description=(
        "Switchyard side by side with a direct connection, PgBouncer and HAProxy: pgbench "
        "throughput/latency, Switchyard CPU and RSS, memory per idle client, failover timings "
        "and the cost of read/write classification. Writes bench/results/<date>-<name>.md."))
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: one case (select-only, simple, 16 clients, 3 s) on direct and "
                        "Switchyard txn; no idle/failover/classification; output to a temp dir")
    p.add_argument("--workloads", default="select,tpcb,connect",
                   help="comma list of: select, tpcb, connect (pgbench -C -S: a new connection and SCRAM "
                        "login per transaction; its clients and protocols are --connect-clients and "
                        "--connect-protocols)")
    p.add_argument("--protocols", default="simple,extended,prepared", help="comma list of: simple, extended, prepared")
    p.add_argument("--clients", default="1,16,128,1000", help="comma list of client counts")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma list of: " + ", ".join(ALL_SYSTEMS))
    p.add_argument("--connect-clients", default="16", help="client counts of the connect workload")
    p.add_argument("--connect-protocols", default="simple", help="protocols of the connect workload")
    p.add_argument("--connect-procs", type=int, default=0,
                   help="pgbench processes of the connect workload, sharing its clients, each with one thread "
                        "per client (0: one process per client; 1: one process, -j = clients, whose threads "
                        "slow each other's SCRAM computations down)")
    p.add_argument("--connect-warmup", type=int, default=1,
                   help="seconds of the same -C run, not measured, before each connect run (warms the pools)")
    p.add_argument("--connect-tls", action="store_true",
                   help="also run the connect workload over TLS: TLS twins of pgbouncer and sy-txn (those in "
                        "--systems; keys pgbouncer-tls, sy-txn-tls) with a self-signed certificate made by openssl "
                        "in the run's temp dir, pgbench with PGSSLMODE=require")
    p.add_argument("--connect-tls-key", choices=["ec", "rsa"], default="ec",
                   help="key of that certificate: ec (P-256, default) or rsa (2048 bits); the proxy signs one "
                        "TLS handshake per connection with it")
    p.add_argument("--duration", type=int, default=4, help="seconds per pgbench case (-T)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the median-tps run is reported")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (threads), at most the client count")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    p.add_argument("--pool-size", type=int, default=20, help="server connections per pool (Switchyard and PgBouncer)")
    p.add_argument("--max-connections", type=int, default=300, help="max_connections of the PostgreSQL servers")
    p.add_argument("--idle-clients", type=int, default=10000, help="idle client connections for the memory figure (0: skip)")
    p.add_argument("--idle-systems", default="sy-txn,pgbouncer", help="where to measure idle memory")
    p.add_argument("--classify-clients", default="1,16", help="client counts for the read_write_split on/off comparison")
    p.add_argument("--classify-repeat", type=int, default=3, help="alternating runs per classification case (median)")
    p.add_argument("--freshness-repeat", type=int, default=7,
                   help="alternating runs per read_your_writes case (median): the mix's runs of one system "
                        "spread by about ±8 %%, more than its 5 %% target")
    p.add_argument("--skip-idle", action="store_true")
    p.add_argument("--skip-failover", action="store_true")
    p.add_argument("--skip-classify", action="store_true")
    p.add_argument("--skip-freshness", action="store_true", help="no read_your_writes on/off comparison")
    p.add_argument("--freshness-workloads", default="select,tpcb,mix", help="workloads of the read_your_writes comparison")
    p.add_argument("--freshness-clients", default="16", help="client counts of the read_your_writes comparison")
    p.add_argument("--split-extra", default="", help="extra [clusters.main] lines for sy-split, ';'-separated "
                   "(e.g. 'causal_wait_ms = 100')")
    p.add_argument("--freshness-wait-ms", default="0,100",
                   help="causal_wait_ms values of the read_your_writes comparison: sy-split's own value (0, or "
                        "what --split-extra sets) runs --freshness-workloads; each other value gets its own "
                        "process (sy-split-waitN, as sy-split with causal_wait_ms = N) and runs "
                        "--freshness-wait-workloads, each against the same read_your_writes = off process")
    p.add_argument("--freshness-wait-workloads", default="mix",
                   help="workloads of the read_your_writes comparison for the other --freshness-wait-ms values")
    p.add_argument("--pin", action="store_true",
                   help="pinned scaling phase: PostgreSQL + pgbench on one CPU set, the proxy on another "
                        "(taskset), Switchyard txn with SWITCHYARD_THREADS = 1, 2, 4, ... up to the proxy set's "
                        "CPUs, PgBouncer on one CPU of that set; reports tps per proxy core")
    p.add_argument("--pin-proxy-cpus", type=int, default=0,
                   help="CPUs for the proxy set (0: half of the CPUs this process may use, whole physical "
                        "cores where SMT siblings are known, at least 1 and at most all but one)")
    p.add_argument("--pin-threads", default="",
                   help="Switchyard worker counts of the pinned phase (default 1, 2, 4, ... up to the proxy set)")
    p.add_argument("--pin-clients", type=int, default=0,
                   help="pgbench clients of the pinned phase (0: max(16, 8 x proxy CPUs))")
    p.add_argument("--pin-workload", choices=["select", "tpcb"], default="select")
    p.add_argument("--pin-protocol", choices=PROTOCOLS, default="simple")
    p.add_argument("--pin-pool-size", type=int, default=0,
                   help="pool_size / default_pool_size of the pinned proxies (0: max(--pool-size, clients), so "
                        "the server connections do not limit the proxy)")
    p.add_argument("--skip-matrix", action="store_true", help="no pgbench matrix (only idle/failover/classification)")
    p.add_argument("--health-interval-ms", type=int, default=1000)
    p.add_argument("--health-timeout-ms", type=int, default=1000)
    p.add_argument("--health-rise", type=int, default=2)
    p.add_argument("--health-fall", type=int, default=2)
    p.add_argument("--binary", default=os.path.join(REPO, "target/release/switchyard"),
                   help="Switchyard binary (copied to the temp dir before the run)")
    p.add_argument("--pg-bin", default=PG_BIN_DEFAULT)
    p.add_argument("--name", default=None, help="short description for the results file name")
    p.add_argument("--out-dir", default=None, help="where results go (default bench/results; --quick: a temp dir)")
    p.add_argument("--foreign-limit", type=float, default=0.5,
                   help="CPU seconds other processes (not the bench's, not postgres') may use during a case "
                        "before it is re-run once they are quiet")
    p.add_argument("--quiet-wait", type=float, default=300,
                   help="total seconds the run may spend waiting for other processes to go quiet")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (data dirs, configs, logs)")
    p.add_argument("--no-latest", action="store_true", help="do not update bench/results/LATEST.md")
    a = p.parse_args(argv)
    if a.quick:
        a.workloads, a.protocols, a.clients = "select", "simple", "16"
        a.systems, a.duration = "direct,sy-txn", 3
        a.skip_idle = a.skip_failover = a.skip_classify = a.skip_freshness = True
        a.name = a.name or "quick"
    a.workloads = [w for w in a.workloads.split(",") if w]
    a.protocols = [x for x in a.protocols.split(",") if x]
    a.clients = [int(c) for c in a.clients.split(",") if c]
    a.connect_clients = [int(c) for c in a.connect_clients.split(",") if c]
    a.connect_protocols = [x for x in a.connect_protocols.split(",") if x]
    a.systems = [s for s in a.systems.split(",") if s]
    a.idle_systems = [s for s in a.idle_systems.split(",") if s]
    a.classify_clients = [int(c) for c in a.classify_clients.split(",") if c]
    a.freshness_workloads = [w for w in a.freshness_workloads.split(",") if w]
    a.freshness_clients = [int(c) for c in a.freshness_clients.split(",") if c]
    a.freshness_wait_ms = list(dict.fromkeys(int(x) for x in a.freshness_wait_ms.split(",") if x.strip()))
    a.freshness_wait_workloads = [w for w in a.freshness_wait_workloads.split(",") if w]
    a.pin_threads = [int(x) for x in a.pin_threads.split(",") if x.strip()]
    for w in a.freshness_workloads + a.freshness_wait_workloads:
        if w not in WORKLOADS or w == "connect":
            p.error(f"unknown freshness workload {w}")
    if any(x < 0 or x > 60000 for x in a.freshness_wait_ms):
        p.error("--freshness-wait-ms: causal_wait_ms is 0 to 60000")
    for w in a.workloads:
        if w not in WORKLOADS or w == "mix":
            p.error(f"unknown workload {w}")
    for x in a.protocols + a.connect_protocols:
        if x not in PROTOCOLS:
            p.error(f"unknown protocol {x}")
    for s in a.systems:
        if s not in ALL_SYSTEMS + EXTRA_SYSTEMS:
            p.error(f"unknown system {s}")
    if a.idle_clients <= 0:
        a.skip_idle = True
    return a


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"({e})"


def machine_info():
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "mem_gib": round(mem_kib / 1024 / 1024, 1), "cpu_model": model,
            "kernel": platform.release(), "os": sh(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"])}


def versions(args, binary_copy):
    git = lambda *a: sh(["git", "-C", REPO] + list(a))
    dirty = git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    with open(binary_copy, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    bin_mtime = os.path.getmtime(args.binary)
    mtime = datetime.datetime.fromtimestamp(bin_mtime, datetime.timezone.utc)
    head_time = int(git("log", "-1", "--format=%ct") or 0)
    before = git("log", "-1", f"--before={int(bin_mtime)}", "--format=%h %s") if head_time > bin_mtime else ""
    try:
        import matplotlib
        mpl = matplotlib.__version__
    except ImportError:
        mpl = "not installed"
    return {
        "postgresql": sh([os.path.join(args.pg_bin, "postgres"), "--version"]),
        "pgbench": sh(["pgbench", "--version"]),
        "pgbouncer": sh(["pgbouncer", "--version"]).splitlines()[0] if shutil.which("pgbouncer") else "not installed",
        "haproxy": sh(["haproxy", "-v"]).splitlines()[0] if shutil.which("haproxy") else "not installed",
        "switchyard": sh([binary_copy, "--version"]),
        "switchyard_commit": git("rev-parse", "HEAD"),
        "switchyard_commit_subject": git("log", "-1", "--format=%s"),
        "switchyard_commit_time": git("log", "-1", "--format=%ci"),
        "switchyard_binary_older_than_head": head_time > bin_mtime,
        "switchyard_newest_commit_before_binary": before,
        "switchyard_tree_dirty": bool(dirty),
        "switchyard_dirty_files": dirty.splitlines()[:20],
        "switchyard_binary_sha256_16": digest,
        "switchyard_binary_mtime": mtime.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "switchyard_threads": os.environ.get("SWITCHYARD_THREADS") or "unset (one worker thread per core)",
        "python": platform.python_version(),
        "matplotlib": mpl,
    }


# ---- the run -------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.reg = Registry()
        self.tmp = tempfile.mkdtemp(prefix="sybench-")
        self.results = {"cases": [], "classify": [], "freshness": [], "idle": [], "failover": {}, "notes": []}
        self.systems = {}
        self.case_no = 0
        try:
            import pwd
            pg_uid = pwd.getpwnam("postgres").pw_uid
        except KeyError:
            pg_uid = None
        self.foreign = ForeignLoad(pg_uid)
        self.waited = 0.0
        self.reruns = 0

    def health(self):
        a = self.args
        return {"interval_ms": a.health_interval_ms, "timeout_ms": a.health_timeout_ms,
                "rise": a.health_rise, "fall": a.health_fall}

    # -- setup --
    def setup_cluster(self):
        a = self.args
        log(f"temp dir {self.tmp}")
        c = self.cluster = PgCluster(self.tmp, self.reg, a.pg_bin, a.max_connections)
        c.init_primary("primary")
        c.psql(0, f"CREATE ROLE {BENCH_USER} LOGIN PASSWORD '{BENCH_PASSWORD}'")
        c.psql(0, f"CREATE ROLE {IDLE_USER} LOGIN PASSWORD '{IDLE_PASSWORD}'")
        c.psql(0, f"CREATE DATABASE {DB} OWNER {BENCH_USER}")
        c.psql(0, ["CREATE TABLE failover_probe (id bigserial PRIMARY KEY, worker int, at timestamptz DEFAULT now())",
                   f"ALTER TABLE failover_probe OWNER TO {BENCH_USER}"], db=DB)
        log(f"pgbench -i -s {a.scale}")
        t0 = time.monotonic()
        p = subprocess.run(["pgbench", "-i", "-q", "-s", str(a.scale), "-h", "127.0.0.1", "-p", str(c.nodes[0].port),
                            "-U", BENCH_USER, DB], capture_output=True, text=True,
                           env=dict(os.environ, PGPASSWORD=BENCH_PASSWORD))
        if p.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {p.stderr}")
        log(f"  done in {time.monotonic() - t0:.1f} s")
        c.psql(0, "VACUUM ANALYZE", db=DB)
        c.psql(0, "CHECKPOINT")
        c.add_standby("standby")
        c.wait_streaming(1)
        c.wait_replayed(1)
        self.scram_secret = c.psql(0, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{BENCH_USER}'")
        self.superuser_reserved = int(c.psql(0, "SHOW superuser_reserved_connections"))

    def start_systems(self):
        a, c = self.args, self.cluster
        prim, stby = ("primary", c.nodes[0].port), ("standby", c.nodes[1].port)
        need = set(a.systems)
        if not a.skip_classify:
            need |= {"sy-txn", "sy-split1"}
        if not a.skip_freshness:
            need |= {"sy-split-ryw-off"} | {self.wait_key(w) for w in a.freshness_wait_ms}
        if not a.skip_idle:
            need |= set(a.idle_systems)
        self.tls_twins = []
        if a.connect_tls:
            if "connect" in a.workloads and not a.skip_matrix:
                self.tls_twins = [k + "-tls" for k in TLS_TWINS if k in a.systems]
            if not self.tls_twins:
                log("--connect-tls: no connect workload on pgbouncer or sy-txn in this run; no TLS systems")
        need |= set(self.tls_twins)
        self.tls_cert = make_tls_cert(self.tmp, a.connect_tls_key) if self.tls_twins else None
        need_sy = any(s.startswith("sy-") for s in need) or not a.skip_failover or a.pin
        if need_sy:
            if not os.access(a.binary, os.X_OK):
                raise RuntimeError(f"Switchyard binary {a.binary} not found (build it with cargo build --release)")
            self.binary = os.path.join(self.tmp, "switchyard")
            shutil.copy2(a.binary, self.binary)
        else:
            self.binary = a.binary
        h = self.health()
        S = self.systems
        if "direct" in need:
            S["direct"] = System("direct", SYSTEM_LABELS["direct"], c.nodes[0].port, conn_per_client=True,
                                 description="pgbench straight to the primary")
        if "pgbouncer" in need:
            S["pgbouncer"] = start_pgbouncer(self.reg, self.tmp, c.nodes[0].port, a.pool_size, self.scram_secret)
        if "pgbouncer-tls" in need:
            S["pgbouncer-tls"] = start_pgbouncer(self.reg, self.tmp, c.nodes[0].port, a.pool_size, self.scram_secret,
                                                 key="pgbouncer-tls", tls=self.tls_cert)
        if "haproxy" in need:
            S["haproxy"] = start_haproxy(self.reg, self.tmp, c.nodes[0].port)
        sy = {
            "sy-session": ([prim], "session", False, "session mode, one node (the primary)"),
            "sy-txn": ([prim], "transaction", False, f"transaction mode, pool_size = {a.pool_size}, one node (the primary)"),
            "sy-split": ([prim, stby], "transaction", True,
                         f"transaction mode, pool_size = {a.pool_size}, read_write_split = true, primary + one streaming standby"),
            "sy-split1": ([prim], "transaction", True,
                          f"transaction mode, pool_size = {a.pool_size}, read_write_split = true, one node (the primary)"),
        }
        sy["sy-split-ryw-off"] = ([prim, stby], "transaction", True,
                                  f"as sy-split, with read_your_writes = \"off\"")
        sy["sy-txn-nodigest"] = ([prim], "transaction", False,
                                 "as sy-txn, with [telemetry] query_digests = false")
        sy["sy-txn-traced"] = ([prim], "transaction", False,
                               "as sy-txn, with traces: [telemetry] otlp_endpoint (a sink in the bench process), sample_ratio = 0.01")
        sy["sy-txn-traced-all"] = ([prim], "transaction", False,
                                   "as sy-txn, with traces: sample_ratio = 1.0, to the sink")
        sy["sy-txn-otlp-down"] = ([prim], "transaction", False,
                                  "as sy-txn, with traces: sample_ratio = 1.0, to a port nothing listens on (every span dropped)")
        sy["sy-txn-otlp-hung"] = ([prim], "transaction", False,
                                  "as sy-txn, with traces: sample_ratio = 1.0, to a receiver that accepts and never answers")
        sy["sy-txn-tls"] = ([prim], "transaction", False,
                            f"as sy-txn, with client TLS: [tls] cert_file / key_file (a self-signed {a.connect_tls_key.upper()} "
                            "certificate), client_tls = \"allow\"; pgbench with PGSSLMODE=require")
        base_extra = [l.strip() for l in a.split_extra.split(";") if l.strip()]
        for w in a.freshness_wait_ms:
            if self.wait_key(w) != "sy-split":
                sy[self.wait_key(w)] = ([prim, stby], "transaction", True, f"as sy-split, with causal_wait_ms = {w}")
        sink = start_otlp_sink() if {"sy-txn-traced", "sy-txn-traced-all"} & set(need) else None
        otlp = lambda port, ratio: f"\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nsample_ratio = {ratio}\n"
        for key, (nodes, mode, split, desc) in sy.items():
            if key in need:
                if key == "sy-split-ryw-off":
                    extra = 'read_your_writes = "off"\n'
                elif key.startswith("sy-split-wait"):
                    extra = "".join(l + "\n" for l in base_extra if not l.startswith("causal_wait_ms")) + \
                        f"causal_wait_ms = {key[len('sy-split-wait'):]}\n"
                else:
                    extra = "".join(l + "\n" for l in base_extra)
                if key == "sy-txn-tls":
                    extra += 'client_tls = "allow"\n'
                top = {
                    "sy-txn-nodigest": lambda: "\n[telemetry]\nquery_digests = false\n",
                    "sy-txn-traced": lambda: otlp(sink, 0.01),
                    "sy-txn-traced-all": lambda: otlp(sink, 1.0),
                    "sy-txn-otlp-down": lambda: otlp(closed_port(), 1.0),
                    "sy-txn-otlp-hung": lambda: otlp(start_hung_receiver(), 1.0),
                    "sy-txn-tls": lambda: (f'\n[tls]\ncert_file = "{self.tls_cert[0]}"\n'
                                           f'key_file = "{self.tls_cert[1]}"\n'),
                }.get(key, lambda: "")()
                S[key] = start_switchyard(self.reg, self.tmp, self.binary, key, self.label_of(key), nodes, mode,
                                          a.pool_size, split, h, description=desc, extra=extra, top=top)
        for key, s in S.items():
            if key.startswith("sy-"):
                wait_switchyard_ready(s, BENCH_USER, BENCH_PASSWORD)
            if key.endswith("-tls"):
                s.client_env = {"PGSSLMODE": "require"}
            s.label = self.label_of(key)
        log("systems up: " + ", ".join(f"{k} :{s.port}" for k, s in S.items()))

    def wait_key(self, wait_ms):
        """The system that measures read_your_writes with causal_wait_ms = `wait_ms`: sy-split
        itself for its own value (0, or what --split-extra sets), else sy-split-wait<N>."""
        return "sy-split" if wait_ms == report.configured_wait(self.args.split_extra) else f"sy-split-wait{wait_ms}"

    @staticmethod
    def label_of(key):
        if key.startswith("sy-split-wait"):
            return f"Switchyard txn + split, causal_wait_ms = {key[len('sy-split-wait'):]}"
        return SYSTEM_LABELS.get(key, key)

    # -- one pgbench run --
    def pgbench(self, system, workload, protocol, clients, duration=None, argv_prefix=(), jobs=None):
        """One pgbench run against `system`. `argv_prefix`: e.g. taskset for the pinned
        phase; `jobs`: pgbench -j instead of --jobs."""
        a, c = self.args, self.cluster
        duration = duration or a.duration
        env = system.client_env
        pre = list(argv_prefix)
        snap = self.foreign.snapshot()
        if workload in ("tpcb", "mix"):
            # What pgbench does before a run without -n, done here over the socket so it
            # never goes through a proxy. The mix updates the same tables: without it,
            # each run starts on the dead rows of the runs before (its tps drifted by
            # ±20 % between runs of the same system).
            c.psql(0, ["VACUUM pgbench_branches, pgbench_tellers", "TRUNCATE pgbench_history"], db=DB)
        connect = workload == "connect"
        warm = None
        if connect and a.connect_warmup > 0:
            # The same -C run, not measured: the pools (and whatever a proxy remembers from
            # its first logins) are warm when the measured run starts.
            wprefix = os.path.join(self.tmp, "pglog", f"w{self.case_no + 1}")
            os.makedirs(os.path.dirname(wprefix), exist_ok=True)
            wargvs = [pre + x for x in connect_argvs("127.0.0.1", system.port, BENCH_USER, DB, protocol, clients,
                                                     a.connect_warmup, a.connect_procs, wprefix)]
            s0 = self.server_sessions()
            w = run_parallel(wargvs, BENCH_PASSWORD, a.connect_warmup + 120, wprefix, env)
            time.sleep(0.3)
            warm = {"tps": w.get("tps"), "txns": w.get("txns"), "rc": w["rc"],
                    "client_logins": (w.get("txns") or 0) + (w.get("failed_txns") or 0) + len(wargvs),
                    "server_sessions": self.server_sessions() - s0, "errors": w.get("errors")}
        self.case_no += 1
        prefix = os.path.join(self.tmp, "pglog", f"c{self.case_no}")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        if connect:
            argvs = [pre + x for x in connect_argvs("127.0.0.1", system.port, BENCH_USER, DB, protocol, clients,
                                                    duration, a.connect_procs, prefix)]
            argv = argvs[0]
        else:
            argv = pre + pgbench_argv("127.0.0.1", system.port, BENCH_USER, DB, workload, protocol, clients,
                                      duration, jobs or a.jobs, prefix)
        off = system.log_offset()
        sessions0 = self.server_sessions() if connect else None
        watch = ResourceWatch(system.pid).start()
        ru0, cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu()
        if connect:
            res = run_parallel(argvs, BENCH_PASSWORD, duration + 180, prefix, env)
        else:
            res = run_case(argv, BENCH_PASSWORD, duration + 180, env)
        ru1, cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu()
        # pgbench's own CPU (the only child reaped during run_case) and how busy the
        # machine's cores were: what the client side and the server took.
        res["client_cpu_s"] = round(ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, 3)
        res["client_sys_s"] = round(ru1.ru_stime - ru0.ru_stime, 3)
        if cpu1[1] > cpu0[1]:
            res["machine_busy_pct"] = round(100.0 * (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1]), 1)
        t_arg = float(argv[argv.index("-T") + 1])
        if "conn_time_ms" in res:
            res["measured_s"] = round(t_arg - res["conn_time_ms"] / 1000.0, 2)
        res.update(watch.stop())
        if connect:
            # Backends count themselves in pg_stat_database.sessions when they start (the
            # count is flushed right after their login); each pgbench process's own first
            # connection (it reads the scale) is one client login more than its transactions.
            time.sleep(0.3)
            res["server_sessions"] = self.server_sessions() - sessions0
            res["client_logins"] = res.get("txns", 0) + res.get("failed_txns", 0) + len(argvs)
            res["server_logins_per_login"] = round(res["server_sessions"] / res["client_logins"], 4)
            if warm:
                res["warmup"] = warm
        res["foreign_cpu_s"], res["foreign_by"] = self.foreign.delta(snap, self.foreign.snapshot())
        n, msgs = system.log_problems(off)
        if n:
            res["log_problems"] = n
            res["log_messages"] = dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:6])
        res["command"] = display_command(argv, env_extra=env)
        if connect and len(argvs) > 1:
            res["command"] = f"{len(argvs)} processes at once, each: " + res["command"]
        time.sleep(0.5)
        return res

    def server_sessions(self):
        """Sessions ever started on the bench database of the primary (pg_stat_database,
        PostgreSQL 14+): server logins, by whomever. The harness's own psql connects to
        `postgres` and Switchyard's health checks keep one session on `postgres`, so
        neither counts here."""
        return int(self.cluster.psql(0, f"SELECT sessions FROM pg_stat_database WHERE datname = '{DB}'") or 0)

    def measure(self, system, workload, protocol, clients, **kw):
        """One pgbench run; re-run (up to twice) when other processes on the machine took
        more than --foreign-limit CPU seconds during it, after waiting for them to go quiet
        (within the --quiet-wait budget). Keeps the least disturbed run."""
        a = self.args
        runs = []
        for attempt in range(3):
            r = self.pgbench(system, workload, protocol, clients, **kw)
            r["case"] = self.case_no
            runs.append(r)
            if r.get("foreign_cpu_s", 0) <= a.foreign_limit:
                break
            left = a.quiet_wait - self.waited
            if attempt == 2 or left <= 0:
                break
            log(f"  other processes used {r['foreign_cpu_s']} CPU s during case {r['case']} "
                f"({r['foreign_by']}); waiting for quiet and re-running")
            self.waited += self.foreign.wait_quiet(min(60.0, left))
            self.reruns += 1
        best = min(runs, key=lambda x: x.get("foreign_cpu_s", 0))
        if len(runs) > 1:
            best["reruns"] = [{"case": x["case"], "tps": x.get("tps"), "foreign_cpu_s": x.get("foreign_cpu_s")}
                              for x in runs if x is not best]
        if best.get("foreign_cpu_s", 0) > a.foreign_limit:
            best["disturbed"] = True
        return best

    def matrix(self):
        a = self.args
        base = [s for s in ALL_SYSTEMS + EXTRA_SYSTEMS if s in a.systems]
        # The TLS twins (--connect-tls) run the connect workload only.
        systems_of = lambda w: base + (self.tls_twins if w == "connect" else [])
        grid = lambda w: ((a.connect_protocols, a.connect_clients) if w == "connect" else (a.protocols, a.clients))
        n_total = sum(len(grid(w)[0]) * len(grid(w)[1]) * len(systems_of(w)) for w in a.workloads)
        done = 0
        k = 0
        for workload in a.workloads:
            protocols, client_counts = grid(workload)
            order = systems_of(workload)
            for protocol in protocols:
                for clients in client_counts:
                    # Rotate the order of systems from case to case, so none is always
                    # first after a vacuum or last before one.
                    rot = order[k % len(order):] + order[:k % len(order)]
                    k += 1
                    if workload == "connect" and a.repeat > 1:
                        self.interleaved_case(rot, workload, protocol, clients, done, n_total)
                        done += len(rot)
                        continue
                    for key in rot:
                        done += 1
                        self.one_case(key, workload, protocol, clients, done, n_total)

    def interleaved_case(self, order, workload, protocol, clients, done, n_total):
        """--repeat rounds of one case over all systems, the order rotated each round (for
        the connect workload, whose figures drift with the machine's speed: the client's
        SCRAM work is most of the CPU, so a slower spell would hit one system's runs
        together if they ran back to back). Then one row per system, as one_case."""
        a = self.args
        runs = {key: [] for key in order}
        for i in range(a.repeat):
            for key in order[i % len(order):] + order[:i % len(order)]:
                s = self.systems[key]
                if s.conn_per_client and s.unable and clients >= s.unable["clients"]:
                    continue
                prev = runs[key][-1] if runs[key] else None
                if prev is not None and ("tps" not in prev or prev.get("aborted_clients") or prev["rc"] != 0):
                    continue
                r = self.measure(s, workload, protocol, clients)
                runs[key].append(r)
                n = r.get("txns") or 0
                extra = ""
                if n and r.get("client_cpu_s") is not None:
                    extra = f", pgbench {r['client_cpu_s'] / n * 1e6:.0f} us/conn"
                    if r.get("cpu_s") is not None:
                        extra += f", proxy {r['cpu_s'] / n * 1e6:.0f} us/conn"
                log(f"  round {i + 1}/{a.repeat} {key}: {r.get('tps', '-')}/s{extra}")
        for j, key in enumerate(order):
            self.one_case(key, workload, protocol, clients, done + j + 1, n_total, runs=runs[key] or None)

    def one_case(self, key, workload, protocol, clients, done, n_total, runs=None):
        a = self.args
        s = self.systems[key]
        row = {"system": key, "workload": workload, "protocol": protocol, "clients": clients}
        limit = a.max_connections - self.superuser_reserved
        if s.conn_per_client and s.unable and clients >= s.unable["clients"]:
            row.update({"status": "n/a", "reason": f"needs one server connection per client: "
                        f"{clients} > max_connections = {a.max_connections} (shown by case {s.unable['case']})"})
            self.results["cases"].append(row)
            log(f"[{done}/{n_total}] {workload} {protocol} c={clients} {key}: n/a (see case {s.unable['case']})")
            return
        if runs is None:
            runs = []
            for _ in range(max(1, a.repeat)):
                r = self.measure(s, workload, protocol, clients)
                runs.append(r)
                if "tps" not in r or r.get("aborted_clients") or r["rc"] != 0:
                    break
        ok_runs = [r for r in runs if "tps" in r]
        if len(ok_runs) > 1:
            ok_runs.sort(key=lambda r: r["tps"])
            r = ok_runs[len(ok_runs) // 2]
            r["repeats_tps"] = [x["tps"] for x in runs]
            if workload == "connect":
                # Per run: proxy and pgbench CPU µs per connection, server logins.
                r["repeats"] = [{"case": x.get("case"), "tps": x.get("tps"),
                                 "cpu_us_per_conn": round(x["cpu_s"] / x["txns"] * 1e6, 1)
                                 if x.get("cpu_s") is not None and x.get("txns") else None,
                                 "client_cpu_us_per_conn": round(x["client_cpu_s"] / x["txns"] * 1e6, 1)
                                 if x.get("client_cpu_s") is not None and x.get("txns") else None,
                                 "user_us_per_conn": round(x["user_s"] / x["txns"] * 1e6, 1)
                                 if x.get("user_s") is not None and x.get("txns") else None,
                                 "sys_us_per_conn": round(x["sys_s"] / x["txns"] * 1e6, 1)
                                 if x.get("sys_s") is not None and x.get("txns") else None,
                                 "server_sessions": x.get("server_sessions"), "client_logins": x.get("client_logins"),
                                 "client_sys_s": x.get("client_sys_s")}
                                for x in runs]
                for k, out in (("cpu_us_per_conn", "cpu_us_per_conn_median"), ("user_us_per_conn", "user_us_median"),
                               ("sys_us_per_conn", "sys_us_median")):
                    vals = [x[k] for x in r["repeats"] if x[k] is not None]
                    if vals:
                        r[out] = statistics.median(vals)
        else:
            r = runs[-1]
        if "tps" not in r and not r.get("errors"):
            r["errors"] = [f"pgbench printed no tps ({r.get('txns', 0)} transactions processed; rc {r['rc']})"]
        row.update(r)
        err = " ".join(r.get("errors", []))
        if s.conn_per_client and clients > limit and (r["rc"] != 0 or r.get("aborted_clients")) and TOO_MANY.search(err):
            s.unable = {"clients": clients, "case": r["case"], "error": _short_err(err)}
            row["status"] = "n/a"
            row["reason"] = (f"needs one server connection per client: {clients} > max_connections = "
                             f"{a.max_connections}; {_short_err(err)}")
        elif r["rc"] != 0 or r.get("aborted_clients") or r.get("failed_txns") or "tps" not in r:
            row["status"] = "error"
        else:
            row["status"] = "ok"
        self.results["cases"].append(row)
        extra = ""
        if s.pid:
            extra = f" cpu {r.get('cpu_s')} s rss {r.get('peak_rss_kib', 0) / 1024:.1f} MiB"
        errs = f" ERR {_short_err(err)}" if row["status"] != "ok" else ""
        p50, p99 = r.get("p50_ms"), r.get("p99_ms")
        lat = f" p50 {p50:.2f} p99 {p99:.2f} ms" if p50 is not None else ""
        if workload == "connect":
            c50, c99 = r.get("cycle_p50_ms"), r.get("cycle_p99_ms")
            lat = (f" (connections/s) cycle p50 {c50:.2f} p99 {c99:.2f} ms" if c50 is not None else "") + \
                  f" server logins/login {r.get('server_logins_per_login')}"
            if s.pid and r.get("cpu_s") is not None and r.get("txns"):
                lat += f" cpu {r['cpu_s'] / r['txns'] * 1e6:.0f} us/conn"
        log(f"[{done}/{n_total}] {workload} {protocol} c={clients} {key}: {row['status']} "
            f"tps {r.get('tps', '-')}{lat}{extra}{errs}")

    def alternating(self, pair, workload, protocol, clients, repeat=None):
        """Run the same case through both systems of `pair`, alternating which goes first,
        `repeat` (default --classify-repeat) times each; per system the median tps and that
        run's figures. Returns the row and (first's median, second's median)."""
        a = self.args
        runs = {s.key: [] for s in pair}
        for i in range(repeat or a.classify_repeat):
            for s in (pair if i % 2 == 0 else list(reversed(pair))):
                runs[s.key].append(self.measure(s, workload, protocol, clients))
        row = {"clients": clients}
        for key, rs in runs.items():
            med = sorted(rs, key=lambda x: x.get("tps", 0))[len(rs) // 2]
            row[key] = {"tps_median": statistics.median([x.get("tps", 0) for x in rs]),
                        "tps_all": [x.get("tps") for x in rs],
                        "p50_ms": med.get("p50_ms"), "p99_ms": med.get("p99_ms"),
                        "cpu_s": med.get("cpu_s"), "errors": sum(1 for x in rs if x["rc"] != 0 or x.get("aborted_clients")),
                        "commands": [x["command"] for x in rs], "cases": [x["case"] for x in rs],
                        "log_problems": sum(x.get("log_problems", 0) for x in rs),
                        "disturbed": sum(1 for x in rs if x.get("disturbed"))}
        off, on = row[pair[0].key]["tps_median"], row[pair[1].key]["tps_median"]
        row["slowdown_pct"] = round((1 - on / off) * 100, 1) if off else None
        return row, off, on

    # -- classification cost --
    def classify(self):
        a = self.args
        pair = [self.systems["sy-txn"], self.systems["sy-split1"]]
        for protocol in a.protocols:
            for clients in a.classify_clients:
                row, off, on = self.alternating(pair, "select", protocol, clients)
                row["protocol"] = protocol
                self.results["classify"].append(row)
                log(f"classification {protocol} c={clients}: split off {off:.0f} tps, on {on:.0f} tps, "
                    f"slowdown {row['slowdown_pct']} %")

    # -- read-your-writes cost --
    def freshness(self):
        """sy-split (read_your_writes = "session", the default) against the same setup with
        it off, alternating, median of --freshness-repeat runs: what fresh reads cost."""
        a = self.args
        off_sys = self.systems["sy-split-ryw-off"]
        used = [off_sys]
        for wait in a.freshness_wait_ms:
            on_sys = self.systems[self.wait_key(wait)]
            used.append(on_sys)
            # sy-split's own causal_wait_ms runs every freshness workload; the others the
            # --freshness-wait-workloads (the mix: reads after the same client's writes).
            workloads = a.freshness_workloads if on_sys.key == "sy-split" else a.freshness_wait_workloads
            for workload in workloads:
                for clients in a.freshness_clients:
                    row, off, on = self.alternating([off_sys, on_sys], workload, "simple", clients,
                                                    repeat=a.freshness_repeat)
                    if on_sys.key != "sy-split":
                        # The report reads the "on" side under sy-split whatever the wait.
                        row["sy-split"] = row.pop(on_sys.key)
                    row["workload"] = workload
                    row["causal_wait_ms"] = wait
                    row["on_system"] = on_sys.key
                    self.results["freshness"].append(row)
                    log(f"read_your_writes {workload} c={clients} causal_wait_ms={wait}: off {off:.0f} tps, "
                        f"on {on:.0f} tps, slowdown {row['slowdown_pct']} %")
        # Where the reads went, from the proxy's own counters (cumulative over the runs).
        import urllib.request
        for s in used:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/metrics", timeout=5).read().decode()
            except OSError as e:
                text = f"(no metrics: {e})"
            lines = [l for l in text.splitlines()
                     if l.startswith(("switchyard_reads_to", "switchyard_causal_wait_seconds_sum",
                                      "switchyard_causal_wait_seconds_count"))]
            self.results.setdefault("freshness_metrics", {})[s.key] = lines
            log(f"{s.key}: " + "; ".join(lines))

    # -- pinned scaling --
    def pin(self):
        """--pin: PostgreSQL (every process of both nodes; backends forked later inherit it)
        and pgbench on CPU set A, the proxy on set B (taskset). Switchyard txn, freshly
        started per worker count with SWITCHYARD_THREADS = t on the first t CPUs of B; PgBouncer
        (one thread) on the first CPU of B, before and after the Switchyard runs. tps per
        proxy core = tps / the CPUs the proxy may use."""
        from .procs import stop_process
        a, c = self.args, self.cluster
        sets = cpu_sets(a.pin_proxy_cpus)
        out = {"workload": a.pin_workload, "protocol": a.pin_protocol, "sy": [], "pgbouncer": [], "configs": {}}
        self.results["pin"] = out
        if sets is None:
            out["error"] = f"{len(os.sched_getaffinity(0))} CPU(s) usable: --pin needs at least 2"
            log(f"pinned phase skipped: {out['error']}")
            return
        A, B, note = sets
        clients = a.pin_clients or max(16, 8 * len(B))
        pool = a.pin_pool_size or max(a.pool_size, clients)
        jobs = min(clients, max(a.jobs, len(A) // 2))
        threads = a.pin_threads or pin_thread_counts(len(B))
        dropped = [t for t in threads if not 1 <= t <= len(B)]
        threads = [t for t in threads if 1 <= t <= len(B)]
        out.update({"cpus": sorted(os.sched_getaffinity(0)), "rest_cpus": A, "proxy_cpus": B, "note": note,
                    "clients": clients, "pool_size": pool, "jobs": jobs, "threads": threads,
                    "dropped_threads": dropped})
        pg_prefix = ["taskset", "-c", cpulist(A)]
        log(f"pinned phase: PostgreSQL + pgbench on CPUs {cpulist(A)}, proxy on {cpulist(B)} ({note}); "
            f"Switchyard threads {threads}, {clients} clients, pool {pool}, pgbench -j {jobs}")
        if dropped:
            log(f"  --pin-threads {dropped} left out: the proxy set has {len(B)} CPU(s)")
        out["pg_pinned"] = self.pin_postgres(A)
        try:
            def runs(system, cpus):
                rs = [self.measure(system, a.pin_workload, a.pin_protocol, clients, argv_prefix=pg_prefix, jobs=jobs)
                      for _ in range(max(1, a.repeat))]
                ok = sorted([r for r in rs if r.get("tps") is not None], key=lambda r: r["tps"])
                r = ok[len(ok) // 2] if ok else rs[-1]
                row = {k: r.get(k) for k in ("tps", "p50_ms", "p99_ms", "cpu_s", "user_s", "sys_s", "wall_s", "txns",
                                             "case", "command", "rc", "aborted_clients", "failed_txns", "errors",
                                             "disturbed", "foreign_cpu_s", "measured_s")}
                row["tps_runs"] = [x.get("tps") for x in rs]
                row["status"] = "ok" if (r.get("tps") is not None and r.get("rc") == 0 and not r.get("aborted_clients")
                                         and not r.get("failed_txns")) else "error"
                row["proxy_cpus"] = cpulist(cpus)
                row["cores"] = len(cpus)
                if row["tps"] is not None:
                    row["tps_per_core"] = round(row["tps"] / len(cpus), 1)
                # CPU over the whole pgbench run (connections included) / its wall time.
                if r.get("cpu_s") is not None and r.get("wall_s"):
                    row["proxy_busy_pct"] = round(100.0 * r["cpu_s"] / r["wall_s"] / len(cpus), 1)
                row["cpus_allowed"] = proc_status(system.pid, "Cpus_allowed_list")
                row["os_threads"] = proc_status(system.pid, "Threads")
                return row

            pgb = start_pgbouncer(self.reg, self.tmp, c.nodes[0].port, pool, self.scram_secret, key="pin-pgbouncer",
                                  argv_prefix=["taskset", "-c", str(B[0])])
            out["configs"]["pin-pgbouncer"] = pgb.config_text
            r = runs(pgb, B[:1])
            r["when"] = "before"
            out["pgbouncer"].append(r)
            log(f"  PgBouncer on CPU {B[0]}: {f_tps(r)} tps, proxy busy {r.get('proxy_busy_pct')} %")
            for t in threads:
                cpus = B[:t]
                s = start_switchyard(self.reg, self.tmp, self.binary, f"pin-sy-txn-{t}", f"Switchyard txn, {t} thread(s)",
                                     [("primary", c.nodes[0].port)], "transaction", pool, False, self.health(),
                                     description=f"transaction mode, pool_size = {pool}, SWITCHYARD_THREADS = {t}, "
                                                 f"taskset -c {cpulist(cpus)}",
                                     argv_prefix=["taskset", "-c", cpulist(cpus)],
                                     env_extra={"SWITCHYARD_THREADS": str(t)})
                try:
                    wait_switchyard_ready(s, BENCH_USER, BENCH_PASSWORD)
                    if t == threads[0]:
                        out["configs"]["pin-sy-txn"] = s.config_text
                    r = runs(s, cpus)
                    r["threads"] = t
                    out["sy"].append(r)
                    log(f"  Switchyard, {t} thread(s) on CPUs {cpulist(cpus)}: {f_tps(r)} tps, "
                        f"{r.get('tps_per_core')} per core, proxy busy {r.get('proxy_busy_pct')} %")
                finally:
                    stop_process(s.proc)
            r = runs(pgb, B[:1])
            r["when"] = "after"
            out["pgbouncer"].append(r)
            log(f"  PgBouncer on CPU {B[0]} again: {f_tps(r)} tps")
            stop_process(pgb.proc)
        finally:
            self.pin_postgres(sorted(os.sched_getaffinity(0)))

    def pin_postgres(self, cpus):
        """Every process of every PostgreSQL node on `cpus` (os.sched_setaffinity, as
        `taskset -p`); processes they fork later inherit it. Returns how many."""
        n = 0
        for i in range(len(self.cluster.nodes)):
            pm = self.cluster.postmaster_pid(i)
            if pm is None:
                continue
            for pid in [pm] + children_of(pm):
                try:
                    os.sched_setaffinity(pid, cpus)
                    n += 1
                except OSError:
                    pass
        return n

    # -- trace export --
    def trace_counters(self):
        """The exporter's own counters on the traced systems, after the matrix: with the
        receiver down or hung, spans must be dropped (and counted), not waited for."""
        import urllib.request
        for key, s in self.systems.items():
            if "traced" not in key and "otlp" not in key:
                continue
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/metrics", timeout=5).read().decode()
            except OSError as e:
                text = f"(no metrics: {e})"
            lines = [l for l in text.splitlines() if l.startswith("switchyard_trace_")]
            self.results.setdefault("trace_metrics", {})[key] = lines
            log(f"{key}: " + "; ".join(lines))

    # -- idle clients --
    def idle(self):
        """On fresh processes (started for this and stopped after), so memory freed by the
        earlier cases and kept by the allocator cannot absorb the new clients."""
        a, c = self.args, self.cluster
        from .procs import stop_process
        for key in a.idle_systems:
            try:
                if key == "sy-txn":
                    s = start_switchyard(self.reg, self.tmp, self.binary, "idle-sy-txn", SYSTEM_LABELS["sy-txn"],
                                         [("primary", c.nodes[0].port)], "transaction", a.pool_size, False,
                                         self.health(), description="fresh process, same config as sy-txn")
                    wait_switchyard_ready(s, BENCH_USER, BENCH_PASSWORD)
                elif key == "pgbouncer":
                    s = start_pgbouncer(self.reg, self.tmp, c.nodes[0].port, a.pool_size, self.scram_secret,
                                        key="idle-pgbouncer")
                else:
                    log(f"idle memory: no fresh instance for {key}; skipped")
                    continue
            except Exception as e:
                self.results["idle"].append({"system": key, "error": f"could not start: {e}"})
                continue
            time.sleep(1)
            off = s.log_offset()
            try:
                r = idle.measure_idle(s, a.idle_clients, IDLE_USER, DB, None)
            except Exception as e:
                r = {"clients": a.idle_clients, "error": f"{type(e).__name__}: {e}"}
                log(f"  idle measurement on {key} failed: {r['error']}")
            r["system"] = key
            n, msgs = s.log_problems(off)
            if n:
                r["log_problems"] = n
                r["log_messages"] = dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:6])
            self.results["idle"].append(r)
            stop_process(s.proc)
            time.sleep(1)

    # -- failover --
    def failover(self):
        a, c = self.args, self.cluster
        # Stop the throughput systems first: they are not part of this.
        from .procs import stop_process
        for s in self.systems.values():
            if getattr(s, "proc", None) is not None:
                stop_process(s.proc)
        c.wait_replayed(1)
        h = self.health()
        prim, stby = ("primary", c.nodes[0].port), ("standby", c.nodes[1].port)
        fo = []
        for key, mode in (("fo-txn", "transaction"), ("fo-session", "session")):
            s = start_switchyard(self.reg, self.tmp, self.binary, key, f"Switchyard {mode}", [prim, stby], mode,
                                 a.pool_size, False, h, with_ro=True,
                                 description=f"{mode} mode, primary + standby, rw and ro endpoints")
            fo.append(s)
        for s in fo:
            wait_switchyard_ready(s, BENCH_USER, BENCH_PASSWORD, want_ro=True)
            self._wait_ro_on(s, c.nodes[1].port)
        out = {"health": h, "systems": {s.key: s.description for s in fo},
               "configs": {s.key: s.config_text for s in fo}}
        offs = {s.key: s.log_offset() for s in fo}
        out["standby"] = failover.standby_failure(c, 1, fo, BENCH_USER, DB, BENCH_PASSWORD)
        for s in fo:
            n, msgs = s.log_problems(offs[s.key])
            out["standby"][s.key]["log_messages"] = dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:8])
        # Bring the standby back, wait until both proxies read from it again.
        log("restarting the standby")
        c.start(1)
        c.wait_streaming(1)
        c.wait_replayed(1)
        for s in fo:
            self._wait_ro_on(s, c.nodes[1].port, timeout=30)
        time.sleep(1)
        offs = {s.key: s.log_offset() for s in fo}
        out["primary"] = failover.primary_failure(c, 0, 1, fo, BENCH_USER, DB, BENCH_PASSWORD)
        for s in fo:
            n, msgs = s.log_problems(offs[s.key])
            out["primary"][s.key]["log_messages"] = dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:8])
        self.results["failover"] = out

    def _wait_ro_on(self, s, port, timeout=20):
        import asyncio

        from .pgwire import Conn

        async def probe():
            k = await Conn.connect("127.0.0.1", s.ro_port, BENCH_USER, DB, BENCH_PASSWORD)
            try:
                return (await k.query("SELECT inet_server_port()"))[0][0]
            finally:
                k.close()

        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            try:
                got = asyncio.run(asyncio.wait_for(probe(), 5))
                if str(got) == str(port):
                    return True
            except Exception as e:
                got = str(e)
            time.sleep(0.2)
        log(f"warning: {s.key} ro endpoint still answered from {got}, not the standby :{port}")
        return False


def cpulist(cpus):
    return ",".join(str(x) for x in cpus)


def f_tps(r):
    return f"{r['tps']:.0f}" if r.get("tps") is not None else f"no tps ({r.get('status')})"


def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def pin_thread_counts(n):
    """1, 2, 4, ... up to n, and n itself."""
    out, t = [], 1
    while t <= n:
        out.append(t)
        t *= 2
    if out[-1] != n:
        out.append(n)
    return out


def cpu_sets(proxy_cpus=0):
    """(A, B, note) for the pinned phase from the CPUs this process may use
    (sched_getaffinity): B for the proxy, A for PostgreSQL and pgbench. B takes whole
    physical cores (SMT siblings together, from sysfs) from the end, up to `proxy_cpus`
    CPUs (0: half), leaving A at least one core; B is ordered one CPU per core first, then
    their siblings, so t worker threads on B[:t] use t cores while there are. None with
    fewer than 2 CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    n = len(cpus)
    if n < 2:
        return None
    want = max(1, min(proxy_cpus or n // 2, n - 1))
    groups = {}
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                sib = f.read().strip()
        except OSError:
            sib = str(cpu)
        groups.setdefault(sib, []).append(cpu)
    cores = sorted(groups.values(), key=lambda g: g[0])
    taken = []
    for core in reversed(cores):
        if sum(len(g) for g in taken) >= want or len(taken) >= len(cores) - 1:
            break
        taken.insert(0, core)
    if not taken:
        # One physical core: its hardware threads are all there is.
        return cpus[:n - want], cpus[n - want:], "one physical core: the sets share it (SMT siblings)"
    B = [g[i] for i in range(max(len(g) for g in taken)) for g in taken if i < len(g)]
    A = [x for x in cpus if x not in B]
    smt = any(len(g) > 1 for g in cores)
    note = (f"{len(cores)} physical cores, {n} CPUs: whole cores to each set, B ordered one CPU per core first"
            if smt else f"{n} CPUs, no SMT siblings")
    return A, B, note


def machine_cpu():
    """(busy, total) jiffies of all cores from /proc/stat (idle and iowait are not busy)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])  # guest time is already in user/nice
    return total - v[3] - v[4], total


def _short_err(text):
    """The first server/pgbench error message in `text`, without pgbench's prefixes."""
    lines = [l.strip() for l in re.split(r"(?=pgbench: error:)|\n", text) if l.strip()]
    for pat in (r"(FATAL|ERROR):\s*(.*)", r"pgbench: error:\s*(.*)"):
        for l in lines:
            m = re.search(pat, l)
            if m:
                return re.sub(r"\s+", " ", m.group(0)).strip()[:200]
    return re.sub(r"\s+", " ", text).strip()[:200]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    install_signal_handlers()
    nofile = raise_nofile(20000)
    t_start = time.time()
    started = datetime.datetime.now(datetime.timezone.utc)
    # Before any set-up: a missing tool is named with what installs it.
    tools = {"pgbench": "postgresql-client", "psql": "postgresql-client"}
    tools.update({k: k for k in ("pgbouncer", "haproxy") if k in args.systems or k in args.idle_systems})
    if args.pin:
        tools.update({"pgbouncer": "pgbouncer", "taskset": "util-linux"})
    if args.connect_tls:
        tools["openssl"] = "openssl"
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if missing:
        print(f"bench/run needs {', '.join(missing)}: apt-get install -y {' '.join(missing)} "
              f"(or leave the system out with --systems)", file=sys.stderr)
        return 2
    b = Bench(args)
    failed = None
    try:
        b.results["machine"] = machine_info()
        b.results["nofile"] = list(nofile)
        b.setup_cluster()
        b.start_systems()
        b.results["versions"] = versions(args, b.binary) if os.path.exists(b.binary) else {}
        b.results["systems"] = {k: {"label": s.label, "description": s.description, "config": s.config_text}
                                for k, s in b.systems.items()}
        w = b.foreign.wait_quiet(min(60.0, args.quiet_wait))
        b.waited += w
        if w > 2.5:
            log(f"waited {w:.0f} s for other processes to go quiet")
        if not args.skip_matrix:
            b.matrix()
            b.trace_counters()
        if args.pin:
            b.pin()
        if not args.skip_classify:
            b.classify()
        if not args.skip_freshness:
            b.freshness()
        if not args.skip_idle:
            b.idle()
        if not args.skip_failover:
            b.failover()
    except KeyboardInterrupt as e:
        failed = f"interrupted ({str(e) or 'Ctrl-C'})"
        log(failed)
    except Exception as e:
        import traceback

        failed = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        log("stopping everything")
        b.reg.cleanup()
        if args.keep_tmp or failed:
            log(f"temp dir kept: {b.tmp}")
        else:
            shutil.rmtree(b.tmp, ignore_errors=True)
    wall = time.time() - t_start
    b.results["wall_s"] = round(wall, 1)
    b.results["quiet_wait_s"] = round(b.waited, 1)
    b.results["reruns"] = b.reruns
    b.results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    b.results["started"] = started.strftime("%Y-%m-%d %H:%M UTC")
    b.results["args"] = {k: v for k, v in vars(args).items()}
    b.results["argv"] = "bench/run " + " ".join(sys.argv[1:] if argv is None else argv)
    if failed:
        b.results["failed"] = failed
    if not b.results["cases"] and not b.results["classify"] and not b.results["freshness"] and not b.results["idle"] \
            and not b.results["failover"] and not b.results.get("pin", {}).get("sy"):
        log("nothing measured; no results written")
        return 1
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="sybench-quick-") if args.quick
                               else os.path.join(BENCH_DIR, "results"))
    os.makedirs(out_dir, exist_ok=True)
    name = f"{started.strftime('%Y-%m-%d')}-{re.sub(r'[^A-Za-z0-9._-]+', '-', args.name or 'full-matrix')}"
    if failed:
        name += "-incomplete"
    md_path = report.write(b.results, out_dir, name)
    if not args.quick and not args.no_latest and not failed and os.path.abspath(out_dir) == os.path.join(BENCH_DIR, "results"):
        report.write_latest(b.results, out_dir, name)
    log(f"results: {md_path} (wall time {wall / 60:.1f} min)")
    if failed:
        return 1
    if args.quick:
        bad = [c for c in b.results["cases"] if c.get("status") != "ok"]
        for c in bad:
            log(f"smoke case failed: {c['system']} {c['workload']} -M {c['protocol']} c={c['clients']}: "
                f"{c.get('status')} {' '.join(c.get('errors', []))[:300]}")
        return 1 if bad or not b.results["cases"] else 0
    return 0
