"""Switchyard under test: its config, its process (started inside the proxy namespace,
killed, frozen, restarted, reloaded), what /proc says about it, and what its log says.

Every incarnation is recorded with how it ended, so the checker can tell a crash from
a kill the harness did on purpose.

With `--instances 2` there are two of these (`sy1` in namespace `px`, `sy2` in `px2`),
each with a `[coordination]` section naming the same etcd and its own instance name;
one copy of the binary serves both.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

from .cluster import PASSWORD, SUPERUSER_PASSWORD, USER
from .common import alive, call_in_netns, fd_count, free_port, log, run, status_kib

RW_PORT, RO_PORT, ADMIN_PORT = 6432, 6433, 9930


def config_text(cluster, listen_host, ports, health_interval_ms, max_lag_ms=5000, extra_cluster="",
                failover="operator", coordination=None):
    if getattr(cluster, "engine", "postgresql") == "mariadb":
        return my_config_text(cluster, listen_host, ports, health_interval_ms, max_lag_ms, extra_cluster, failover,
                              coordination)
    rw, ro, admin = ports
    coord = ""
    if coordination:
        urls = ", ".join(f'"{u}"' for u in coordination["etcd"])
        coord = (f'\n[coordination]\netcd = [{urls}]\ninstance = "{coordination["instance"]}"\n'
                 f'lease_s = {coordination["lease_s"]}\n')
    nodes = "".join(f'\n[[clusters.main.nodes]]\nname = "{n.name}"\nhost = "{n.host}"\nport = {n.port}\n'
                    for n in cluster.nodes.values())
    if failover == "automatic":
        # Switchyard promotes: a cooldown shorter than the gap between two primary
        # faults, so that each one is a failover of its own.
        extra_cluster += "failover = \"automatic\"\nfailover_cooldown_s = 8\n"
        nodes += f'\n[clusters.main.manager]\nuser = "postgres"\npassword = "{SUPERUSER_PASSWORD}"\n'
    return f"""# written by chaos/run
[health]
interval_ms = {health_interval_ms}
timeout_ms = 1000
rise = 2
fall = 2

[proxy]
shutdown_timeout_ms = 3000

[admin]
http_listen = "{listen_host}:{admin}"
{coord}
[[users]]
name = "{USER}"
password = "{PASSWORD}"
auth = "scram-sha-256"

[clusters.main]
listen_rw = "{listen_host}:{rw}"
listen_ro = "{listen_host}:{ro}"
pool_mode = "transaction"
read_write_split = true
pool_size = 40
max_replica_lag_ms = {max_lag_ms}
connect_timeout_ms = 5000
server_login_timeout_ms = 1000
checkout_timeout_ms = 5000
# Short, so that after the load stops the pools shrink back and the file descriptor
# count can be compared with the idle count at start.
server_idle_timeout_ms = 3000
{extra_cluster}{nodes}"""


def my_config_text(cluster, listen_host, ports, health_interval_ms, max_lag_ms=5000, extra_cluster="",
                   failover="operator", coordination=None):
    """`--engine mariadb`: engine = "mysql", session pooling (the only mode MySQL has: no
    splitting, no causal tokens), the monitor login for the health checks, the app user
    with its password; with automatic failover the manager login and the replication
    login a rejoined old primary gets."""
    from .mariadb import (MANAGER_PASSWORD, MANAGER_USER, MONITOR_PASSWORD, MONITOR_USER, PASSWORD as MY_PASSWORD,
                          REPL_PASSWORD, REPL_USER, USER as MY_USER)
    rw, ro, admin = ports
    coord = ""
    if coordination:
        urls = ", ".join(f'"{u}"' for u in coordination["etcd"])
        coord = (f'\n[coordination]\netcd = [{urls}]\ninstance = "{coordination["instance"]}"\n'
                 f'lease_s = {coordination["lease_s"]}\n')
    nodes = "".join(f'\n[[clusters.main.nodes]]\nname = "{n.name}"\nhost = "{n.host}"\nport = {n.port}\n'
                    for n in cluster.nodes.values())
    if failover == "automatic":
        extra_cluster += "failover = \"automatic\"\nfailover_cooldown_s = 8\n"
        nodes += (f'\n[clusters.main.manager]\nuser = "{MANAGER_USER}"\npassword = "{MANAGER_PASSWORD}"\n'
                  f'replication_user = "{REPL_USER}"\nreplication_password = "{REPL_PASSWORD}"\n')
    return f"""# written by chaos/run --engine mariadb
[health]
interval_ms = {health_interval_ms}
timeout_ms = 1000
rise = 2
fall = 2
user = "{MONITOR_USER}"
password = "{MONITOR_PASSWORD}"

[proxy]
shutdown_timeout_ms = 3000

[admin]
http_listen = "{listen_host}:{admin}"
{coord}
[[users]]
name = "{MY_USER}"
password = "{MY_PASSWORD}"

[clusters.main]
engine = "mysql"
listen_rw = "{listen_host}:{rw}"
listen_ro = "{listen_host}:{ro}"
pool_mode = "session"
max_replica_lag_ms = {max_lag_ms}
connect_timeout_ms = 5000
server_login_timeout_ms = 1000
{extra_cluster}{nodes}"""


class Proxy:
    def __init__(self, net, cluster, base, binary, health_interval_ms=400, failover="operator",
                 name="switchyard", member="px", coordination=None, copied_binary=None):
        """name: the instance (its directory under `base`, its label in the report);
        member: the network namespace it runs in; coordination: {etcd, instance,
        lease_s} or None; copied_binary: a copy another instance already made."""
        self.failover = failover
        self.net = net
        self.cluster = cluster
        self.name = name
        self.member = member
        self.coordination = coordination
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir, exist_ok=True)
        # A copy: the binary under test must not change under a running suite.
        if copied_binary:
            self.binary = copied_binary
        else:
            self.binary = os.path.join(self.dir, "switchyard")
            shutil.copy2(binary, self.binary)
        self.source_binary = binary
        self.ns = net.ns_of(member)
        self.host = net.ip_of(member)
        if net.kind == "netns":
            self.ports = (RW_PORT, RO_PORT, ADMIN_PORT)
        else:
            self.ports = (free_port(), free_port(), free_port())
        self.health_interval_ms = health_interval_ms
        self.max_lag_ms = 5000
        self.config = os.path.join(self.dir, "switchyard.toml")
        self.log_path = os.path.join(self.dir, "switchyard.log")
        self.proc = None
        self.incarnations = []     # {pid, start, end, ended_by, exit}
        self.write_config()

    @property
    def rw(self):
        return self.ports[0]

    @property
    def ro(self):
        return self.ports[1]

    @property
    def admin(self):
        return self.ports[2]

    def write_config(self, extra_cluster=""):
        text = config_text(self.cluster, self.host, self.ports, self.health_interval_ms, self.max_lag_ms, extra_cluster,
                           self.failover, self.coordination)
        with open(self.config, "w") as f:
            f.write(text)
        # MySQL: `check` logs in to each node as the manager to name missing grants, so it
        # runs where Switchyard runs (the nodes are not reachable from the host namespace).
        pre = self.net.prefix(self.member) if getattr(self.cluster, "engine", "") == "mariadb" else []
        chk = run(pre + [self.binary, "check", "--config", self.config], check=False, timeout=20)
        if chk.returncode != 0:
            raise RuntimeError(f"switchyard check rejected {self.config}:\n{chk.stdout}{chk.stderr}\n{text}")

    # ---- lifecycle -----------------------------------------------------------------
    def start(self, timeout=20):
        out = open(self.log_path, "ab")
        argv = self.net.prefix(self.member) + [self.binary, "--log-format", "json", "--config", self.config]
        # `ip netns exec` execs the program, so this pid is Switchyard's own.
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True,
                                     env=dict(os.environ, SWITCHYARD_LOG="info", NO_COLOR="1"))
        out.close()
        self.incarnations.append({"pid": self.proc.pid, "start": time.time(), "end": None,
                                  "ended_by": None, "exit": None})
        self.wait_ready(timeout)
        log(f"{self.name} pid {self.proc.pid} listening on {self.host}:{self.rw} (rw), :{self.ro} (ro), "
            f":{self.admin} (admin)")

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"switchyard exited with {self.proc.returncode} at start; see {self.log_path}")
            try:
                if self.status(timeout=1) is not None:
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"switchyard not serving /status after {timeout}s; see {self.log_path}")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def _end(self, how):
        inc = self.incarnations[-1]
        if inc["end"] is None:
            inc["end"] = time.time()
            inc["ended_by"] = how
            inc["exit"] = self.proc.returncode

    def kill(self, sig=signal.SIGKILL, wait=10):
        """Stop the running incarnation on purpose (SIGKILL or SIGTERM)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.incarnations[-1]["ended_by"] = f"harness {signal.Signals(sig).name}"
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._end(f"harness {signal.Signals(sig).name}")

    def freeze(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def reload(self):
        os.kill(self.proc.pid, signal.SIGHUP)

    def check_crashed(self):
        """If the current incarnation exited without the harness asking, record it as a
        crash and return its exit status (else None)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        inc = self.incarnations[-1]
        if inc["end"] is None:
            inc["end"] = time.time()
            inc["exit"] = self.proc.returncode
            inc["ended_by"] = inc["ended_by"] or "crash"
            if inc["ended_by"] == "crash":
                log(f"SWITCHYARD ({self.name}) EXITED BY ITSELF with status {self.proc.returncode}")
                return self.proc.returncode
        return None

    def shutdown(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.kill(signal.SIGTERM, wait=10)
            self.incarnations[-1]["ended_by"] = "harness end of run"

    # ---- observation ---------------------------------------------------------------
    def http_get(self, path, timeout=2):
        url = f"http://{self.host if self.host != '0.0.0.0' else '127.0.0.1'}:{self.admin}{path}"

        def get():
            # No proxy from the environment: the admin address is inside our namespace.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=timeout) as r:
                return r.read().decode()
        return call_in_netns(self.ns, get, timeout=timeout + 2)

    def status(self, timeout=2):
        return json.loads(self.http_get("/status", timeout))

    def coordination_view(self, timeout=2):
        """(leader, cut_off, published, epoch) from /status; None if it does not answer
        or runs without [coordination]."""
        try:
            st = self.status(timeout)
        except Exception:
            return None
        co = st.get("coordination")
        if not co:
            return None
        cl = st["clusters"][0]
        return co.get("leader"), co.get("cut_off"), cl.get("published"), cl.get("epoch")

    def resources(self):
        pid = self.pid
        if pid is None or not alive(pid):
            return {"pid": pid, "rss_kib": None, "fds": None}
        try:
            rss = status_kib(pid, "VmRSS")
        except OSError:
            rss = None
        return {"pid": pid, "rss_kib": rss, "fds": fd_count(pid), "t": time.time()}

    def can_connect(self, port, timeout=2):
        def probe():
            with socket.create_connection((self.host, port), timeout=timeout):
                return True
        try:
            return call_in_netns(self.ns, probe, timeout=timeout + 2)
        except Exception:
            return False


def scan_log(path):
    """Panics, errors and warnings in Switchyard's log: (panics, {level message: n},
    node state changes). JSON lines, except what the Rust runtime writes to stderr
    itself (a panic message is plain text)."""
    panics, counts, changes = [], {}, []
    try:
        with open(path, "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return panics, counts, changes
    for line in data.splitlines():
        s = line.strip()
        if not s:
            continue
        if "panicked at" in s or "RUST_BACKTRACE" in s:
            panics.append(s[:500])
            continue
        if not s.startswith("{"):
            continue
        try:
            ev = json.loads(s)
        except ValueError:
            continue
        level = str(ev.get("level", "")).upper()
        fields = ev.get("fields", ev)
        msg = str(fields.get("message", ""))
        if "panic" in msg.lower():
            panics.append(s[:500])
        if msg == "node state changed":
            changes.append({"t": ev.get("timestamp"), "node": fields.get("node"), "old": fields.get("old"),
                            "new": fields.get("new"), "reason": fields.get("reason")})
        if level in ("WARN", "ERROR"):
            key = f"{level} {msg}"[:160]
            counts[key] = counts.get(key, 0) + 1
    return panics, counts, changes
