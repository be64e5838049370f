"""bench/overload: Switchyard under abuse and under a connection storm. See bench/README.md.

1. Overload. A PostgreSQL primary (pgbench -i) behind Switchyard in transaction pooling.
   Well-behaved clients run `pgbench -S` at a fixed rate, first alone (baseline), then
   with abusive clients beside them (one run per `--bad-pool`):
     idle_txn    BEGIN, one statement, then idle inside the transaction (reconnect when ended)
     big_query   a query with a ~50 MB answer, never read
     no_startup  a TCP connection that never finishes the startup handshake (reconnect when closed)
     login_loop  connect + authenticate + disconnect, in a tight loop
   With `--bad-pool own` each abusive kind logs in as its own user (so it has its own
   pool); with `shared` they all log in as the good clients' user (one pool for all).
   Per run: tps, p50/p99 latency and errors of the good clients, the proxy's RSS and open
   file descriptors every second, server connections in pg_stat_activity, the proxy's
   refusal/timeout counters from /metrics.
2. Storm. A freshly started proxy (nothing pooled); `--storm` clients connect within
   `--storm-spread` seconds, each runs `SELECT 1` and keeps its connection. Then the
   primary is restarted (`pg_ctl restart -m fast`) while they are connected, all of them
   query again at once (reconnecting if their connection was lost), and finally all
   disconnect and the storm is repeated against the now-warm proxy.
3. File-descriptor limit. A proxy started with RLIMIT_NOFILE `--fd-limit` (soft and hard);
   `--fd-clients` clients connect at once, each logs in and runs `SELECT 1`: each is
   served, refused with 53300, fails otherwise or hangs (no answer within `--fd-timeout`).
   The served ones stay `--fd-hold` s, then all leave and a new client must be served.
   The proxy's FDs and RSS every 100 ms; its log lines about refusals per interval.

The abusive clients, the storm clients and the fdlimit clients run in child processes
(`bench/overload _abuse CFG` / `_storm CFG` / `_fdlimit CFG`, asyncio, sybench/pgwire.py)
so that their CPU is measured apart and the samplers of this process keep their pace.
"""

import argparse
import asyncio
import datetime
import glob
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from .cluster import PG_BIN_DEFAULT, PgCluster
from .pgbench import connect_allowance, percentile
from .pgwire import Conn, PgError, _fields
from .procs import (CLK_TCK, Registry, cpu_times, free_port, install_signal_handlers, log,
                    status_kib, stop_process, wait_port)
from .systems import BENCH_PASSWORD, BENCH_USER, DB, IDLE_PASSWORD, IDLE_USER, System

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH_DIR)
SCRIPT = os.path.join(BENCH_DIR, "overload")

KINDS = ["idle_txn", "big_query", "no_startup", "login_loop"]
# Not abusive: the same transactions as idle_txn, committed by the client just before the
# timeout would fire (so the server connection goes back to the pool instead of being
# closed). Run alone it tells the cost of a long transaction from the cost of ending one.
CONTROL = "idle_txn_commit"
ALL_KINDS = KINDS + [CONTROL]
# All four kinds on their own pools, then each kind alone (which one costs the good
# clients what) with the control next to idle_txn, then all four on the good clients'
# pool, and that without big_query.
DEFAULT_ABUSE_RUNS = ("own,own:idle_txn,own:idle_txn_commit,own:big_query,own:no_startup,own:login_loop,"
                      "shared,shared:idle_txn+no_startup+login_loop")
KIND_LABELS = {
    "idle_txn": "(a) BEGIN + one statement, then idle in the transaction; reconnect when ended",
    "big_query": "(b) big query, answer never read",
    "no_startup": "(c) TCP connection, startup never finished; reconnect when closed",
    "login_loop": "(d) connect + SCRAM login + disconnect, tight loop",
    CONTROL: "(control) as (a), but COMMIT just before the timeout, then disconnect; reconnect",
}
ABUSE_PASSWORD = "abusepw"
# own pools: one login per kind that needs one (no_startup never sends a user)
OWN_USERS = {"idle_txn": "abuse_txn", "big_query": "abuse_big", "login_loop": "abuse_login", CONTROL: "abuse_txn"}
ABUSE_ROLES = ["abuse_txn", "abuse_big", "abuse_login"]
IDLE_TXN_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = 1"
BIG_QUERY_SQL = "SELECT repeat('x', 1000000) FROM generate_series(1, 50)"


# ======================================================================================
# small helpers
# ======================================================================================

def pct(vals, q):
    """Nearest-rank percentile of an unsorted list (None when empty)."""
    if not vals:
        return None
    return percentile(sorted(vals), q)


def summary(vals, scale=1.0, nd=3):
    """n / min / p50 / p99 / max of a list of seconds, scaled (1000: ms)."""
    if not vals:
        return {"n": 0}
    s = sorted(vals)
    f = lambda v: round(v * scale, nd)
    return {"n": len(s), "min": f(s[0]), "p50": f(percentile(s, 50)), "p99": f(percentile(s, 99)),
            "max": f(s[-1]), "avg": f(sum(s) / len(s))}


def exc_key(e):
    """(key, sample message) for an exception a client saw."""
    if isinstance(e, PgError):
        return e.sqlstate, e.message[:200]
    if isinstance(e, asyncio.IncompleteReadError):
        return "EOF", "connection closed by the proxy without an error message"
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timeout", "no answer within the client's timeout"
    if isinstance(e, ConnectionRefusedError):
        return "ECONNREFUSED", str(e)[:200]
    if isinstance(e, ConnectionResetError):
        return "ECONNRESET", str(e)[:200]
    if isinstance(e, BrokenPipeError):
        return "EPIPE", str(e)[:200]
    if isinstance(e, OSError):
        return f"OSError {e.errno}", str(e)[:200]
    return type(e).__name__, str(e)[:200]


def raise_nofile_to_hard():
    """Soft RLIMIT_NOFILE up to the hard limit (bounded by fs.nr_open when unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(open("/proc/sys/fs/nr_open").read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def sh(cmd, timeout=30):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as e:
        return f"({e})"


# ======================================================================================
# Prometheus text
# ======================================================================================

_METRIC = re.compile(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")


def norm_messages(msgs):
    """Group log messages that differ only in a duration ("within 5001 ms")."""
    out = {}
    for k, n in msgs.items():
        k = re.sub(r"\b\d+ ms\b", "N ms", k)
        out[k] = out.get(k, 0) + n
    return out


# The proxy's log lines about refused clients and failed accepts (the fdlimit phase).
FD_LOG_WORDS = ("refused", "too many", "accept failed", "file descriptors")
_TS = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?")


def log_time(text):
    """Epoch seconds of the first ISO 8601 timestamp in `text` (UTC unless it says
    otherwise), or None."""
    m = _TS.search(text or "")
    if not m:
        return None
    y, mo, d, h, mi, se = (int(m.group(i)) for i in range(1, 7))
    t = datetime.datetime(y, mo, d, h, mi, se, tzinfo=datetime.timezone.utc).timestamp()
    t += float(m.group(7)) if m.group(7) else 0.0
    tz = m.group(8)
    if tz and tz != "Z":
        t -= (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[-2:]) * 60)
    return t


def _log_events(path, since=0):
    """(raw line, parsed JSON event or None) for each line of a log from byte `since`."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    out = []
    for raw in data.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        ev = None
        if raw.startswith("{"):
            try:
                ev = json.loads(raw)
                ev = dict(ev.get("fields") or {}, **{k: v for k, v in ev.items() if k != "fields"})
            except ValueError:
                ev = None
        out.append((raw, ev))
    return out


def fd_log_lines(path, since):
    """The log lines since byte `since` that mention refusals, too many clients, failed
    accepts or file descriptors: time, level, kind (the message with its numbers as N),
    the count the line carries (refused=, failures=), the reason, the line itself."""
    out, seen = [], {}
    for raw, ev in _log_events(path, since):
        if not any(w in raw.lower() for w in FD_LOG_WORDS):
            continue
        ev = ev or {}
        msg = str(ev.get("message") or raw)
        kind = re.sub(r"\d+", "N", msg)[:200]
        count = next((ev[k] for k in ("refused", "failures") if isinstance(ev.get(k), (int, float))), None)
        line = {"t": log_time(str(ev.get("timestamp") or raw)), "level": str(ev.get("level", "")).upper(),
                "kind": kind, "count": count, "reason": ev.get("reason")}
        # The line itself for the first few of each kind (a line per client would be
        # thousands of them).
        seen[kind] = seen.get(kind, 0) + 1
        if seen[kind] <= 5:
            line["text"] = raw[:700]
        out.append(line)
    return out


def fd_startup_line(path):
    """The proxy's warning at start that the descriptor limit is below what its config may
    need (its fields: fd_limit, needed, max_clients, clients = the client budget)."""
    for raw, ev in _log_events(path):
        if "file-descriptor limit is below" in raw:
            ev = ev or {}
            return {k: ev.get(k) for k in ("fd_limit", "needed", "max_clients", "clients", "level")} | {"text": raw[:700]}
    return None


def fd_log_analysis(lines, interval):
    """Lines per kind and in all: how many, the most within one interval (any window of
    `interval` s; lines at least 99 % of an interval apart count as apart), the smallest
    gap between two lines of a kind, the counts they carry; and the lines per fixed
    interval from the first one."""
    tol = 0.99 * interval

    def most_within(times):
        times, best, j = sorted(times), 0, 0
        for i in range(len(times)):
            while times[i] - times[j] >= tol:
                j += 1
            best = max(best, i - j + 1)
        return best

    timed = [x for x in lines if x.get("t") is not None]
    kinds = {}
    for x in lines:
        k = kinds.setdefault(x["kind"], {"lines": 0, "times": [], "counts_sum": 0, "levels": {}})
        k["lines"] += 1
        k["levels"][x.get("level") or "?"] = k["levels"].get(x.get("level") or "?", 0) + 1
        if x.get("t") is not None:
            k["times"].append(x["t"])
        if isinstance(x.get("count"), (int, float)):
            k["counts_sum"] += x["count"]
    per_kind = {}
    for name, k in kinds.items():
        ts = sorted(k["times"])
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        per_kind[name] = {"lines": k["lines"], "max_in_interval": most_within(ts), "levels": k["levels"],
                          "min_gap_s": round(min(gaps), 3) if gaps else None, "counts_sum": k["counts_sum"]}
    out = {"interval_s": interval, "lines": len(lines), "untimed": len(lines) - len(timed),
           "max_in_interval": most_within([x["t"] for x in timed]), "per_kind": per_kind,
           "max_in_interval_per_kind": max((v["max_in_interval"] for v in per_kind.values()), default=0)}
    if timed:
        t0 = min(x["t"] for x in timed)
        nb = int((max(x["t"] for x in timed) - t0) // interval) + 1
        buckets = [0] * nb
        for x in timed:
            buckets[int((x["t"] - t0) // interval)] += 1
        out["per_interval"] = buckets
        out["span_s"] = round(max(x["t"] for x in timed) - t0, 3)
    return out


def proc_nofile(pid):
    """(soft, hard) RLIMIT_NOFILE of a process from /proc/PID/limits, or None."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    p = line.split()
                    return [int(p[3]) if p[3].isdigit() else p[3], int(p[4]) if p[4].isdigit() else p[4]]
    except OSError:
        pass
    return None


def fetch_metrics(admin_port, timeout=5):
    """{'name{labels}': value} from /metrics, or {} when the proxy does not answer."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=timeout).read().decode()
    except Exception:
        return {}
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def metric_sum(m, name):
    """Sum of every series of `name` (all label sets)."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def metrics_delta(m0, m1, prefixes=("switchyard_clients_refused_total", "switchyard_client_timeouts_total",
                                     "switchyard_errors_total", "switchyard_pool_wait_seconds_count",
                                     "switchyard_pool_wait_seconds_sum")):
    out = {}
    for k, v in m1.items():
        if k.startswith(prefixes):
            d = v - m0.get(k, 0.0)
            if d:
                out[k] = round(d, 6)
    return out


def pool_wait_hist(m0, m1):
    """Growth of the switchyard_pool_wait_seconds histogram: count, mean and the bucket
    bounds under which 50 / 99 % of the waits fell (all clusters summed)."""
    buckets = {}
    for k, v in m1.items():
        if k.startswith("switchyard_pool_wait_seconds_bucket"):
            le = re.search(r'le="([^"]+)"', k)
            if le:
                b = float("inf") if le.group(1) in ("+Inf", "inf") else float(le.group(1))
                buckets[b] = buckets.get(b, 0.0) + v - m0.get(k, 0.0)
    count = metric_sum(m1, "switchyard_pool_wait_seconds_count") - metric_sum(m0, "switchyard_pool_wait_seconds_count")
    total = metric_sum(m1, "switchyard_pool_wait_seconds_sum") - metric_sum(m0, "switchyard_pool_wait_seconds_sum")
    out = {"count": int(count), "mean_ms": round(total / count * 1000, 3) if count else None}
    if count and buckets:
        for q in (50, 99):
            need = count * q / 100
            for b in sorted(buckets):
                if buckets[b] >= need:
                    out[f"p{q}_le_s"] = b
                    break
        over = [(b, count - buckets[b]) for b in sorted(buckets) if b >= 0.1 and b != float("inf")]
        out["over_s"] = {str(b): int(n) for b, n in over[:6]}
    return out


# ======================================================================================
# pg_stat_activity through a direct Unix-socket connection (trust, superuser)
# ======================================================================================

class PgSync:
    """A blocking PostgreSQL client over the server's Unix socket (trust auth)."""

    def __init__(self, sockdir, port, user="postgres", db="postgres", timeout=5.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(os.path.join(sockdir, f".s.PGSQL.{port}"))
        body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0" \
            + b"application_name\0sybench-monitor\0\0"
        self.s.sendall(struct.pack("!I", len(body) + 4) + body)
        while True:
            typ, body = self._read()
            if typ == b"E":
                raise PgError(_fields(body))
            if typ == b"R" and struct.unpack("!I", body[:4])[0] != 0:
                raise PgError({"C": "28000", "M": "monitor connection needs trust on the Unix socket"})
            if typ == b"Z":
                return

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the monitor connection")
            buf += chunk
        return buf

    def _read(self):
        head = self._exact(5)
        ln = struct.unpack("!I", head[1:])[0]
        return head[:1], (self._exact(ln - 4) if ln > 4 else b"")

    def query(self, sql):
        q = sql.encode() + b"\0"
        self.s.sendall(b"Q" + struct.pack("!I", len(q) + 4) + q)
        rows, err = [], None
        while True:
            typ, body = self._read()
            if typ == b"D":
                n = struct.unpack("!H", body[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    ln = struct.unpack("!i", body[pos:pos + 4])[0]
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(body[pos:pos + ln].decode())
                        pos += ln
                rows.append(row)
            elif typ == b"E":
                err = PgError(_fields(body))
            elif typ == b"Z":
                if err:
                    raise err
                return rows

    def close(self):
        try:
            self.s.sendall(b"X\0\0\0\4")
        except OSError:
            pass
        self.s.close()


ACTIVITY_SQL = """SELECT coalesce(usename, ''), coalesce(datname, ''), coalesce(application_name, ''),
 coalesce(state, ''), coalesce(wait_event, ''), count(*)
FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1, 2, 3, 4, 5"""


class ActivitySampler:
    """Samples the server's client backends every `interval` seconds, classified as the
    proxy's health checks (application_name switchyard-*) or pooled connections (the rest:
    nothing else connects during a run), per user; reconnects after a server restart."""

    def __init__(self, sockdir, port, interval):
        self.sockdir, self.port, self.interval = sockdir, port, interval
        self.samples = []
        self.gaps = 0
        self._stop = threading.Event()

    def start(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        conn = None
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = PgSync(self.sockdir, self.port, timeout=2.0)
                rows = conn.query(ACTIVITY_SQL)
                self.samples.append(self._classify(time.time(), rows))
            except Exception:
                self.gaps += 1
                if conn is not None:
                    try:
                        conn.s.close()
                    except OSError:
                        pass
                conn = None
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        if conn is not None:
            conn.close()

    @staticmethod
    def _classify(t, rows):
        s = {"t": t, "health": 0, "pool": 0, "by_user": {}, "idle_in_txn": 0, "client_write": 0, "active": 0}
        for user, db, app, state, wait, n in rows:
            n = int(n)
            if app.startswith("switchyard-"):
                s["health"] += n
                continue
            s["pool"] += n
            s["by_user"][user] = s["by_user"].get(user, 0) + n
            if state.startswith("idle in transaction"):
                s["idle_in_txn"] += n
            if wait == "ClientWrite":
                s["client_write"] += n
            if state == "active":
                s["active"] += n
        return s

    def stop(self):
        self._stop.set()
        self._t.join(10)
        return self.samples

    @staticmethod
    def window(samples, t0=None, t1=None):
        """Maxima over the samples taken between wall times t0 and t1."""
        ss = [s for s in samples if (t0 is None or s["t"] >= t0) and (t1 is None or s["t"] <= t1)]
        if not ss:
            return {"samples": 0}
        users = {}
        for s in ss:
            for u, n in s["by_user"].items():
                users[u] = max(users.get(u, 0), n)
        return {"samples": len(ss), "pool_max": max(s["pool"] for s in ss),
                "health_max": max(s["health"] for s in ss),
                "total_max": max(s["pool"] + s["health"] for s in ss),
                "by_user_max": users,
                "idle_in_txn_max": max(s["idle_in_txn"] for s in ss),
                "client_write_max": max(s["client_write"] for s in ss),
                "pool_last": ss[-1]["pool"]}


# ======================================================================================
# the proxy's RSS, file descriptors, CPU and connection gauges
# ======================================================================================

class ProcSampler:
    def __init__(self, pid, admin_port, interval):
        self.pid, self.admin_port, self.interval = pid, admin_port, interval
        self.samples = []
        self._stop = threading.Event()

    def one(self):
        t = time.time()
        try:
            rss = status_kib(self.pid, "VmRSS")
            thr = status_kib(self.pid, "Threads")
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            u, s = cpu_times(self.pid)
        except (OSError, ValueError):
            return {"t": t, "dead": True}
        m = fetch_metrics(self.admin_port, timeout=max(0.5, self.interval)) if self.admin_port else {}
        return {"t": t, "rss_kib": rss, "fds": fds, "threads": thr, "cpu_s": round(u + s, 2),
                "clients": int(metric_sum(m, "switchyard_client_connections")) if m else None,
                "servers": int(metric_sum(m, "switchyard_server_connections")) if m else None}

    def start(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.samples.append(self.one())
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def stop(self):
        self._stop.set()
        self._t.join(10)
        return self.samples

    @staticmethod
    def window(samples, t0=None, t1=None):
        ss = [s for s in samples if not s.get("dead") and (t0 is None or s["t"] >= t0) and (t1 is None or s["t"] <= t1)]
        out = {"samples": len(ss), "died": any(s.get("dead") for s in samples)}
        if not ss:
            return out
        for k in ("rss_kib", "fds", "clients", "servers", "threads"):
            vals = [s[k] for s in ss if s.get(k) is not None]
            if vals:
                out[k] = {"min": min(vals), "max": max(vals), "last": vals[-1]}
        return out


# ======================================================================================
# CPU of the machine's other processes, and of our PostgreSQL
# ======================================================================================

class CpuAccount:
    """Where the machine's CPU went: the busy time of all cores (/proc/stat), our
    PostgreSQL (the postmaster's tree; reaped backends count through its cutime), this
    process with its reaped children (pgbench, the client drivers), the proxy (measured
    by the caller); what is left is other processes on the machine ("foreign")."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.me = os.getpid()

    @staticmethod
    def _busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / CLK_TCK

    @staticmethod
    def _procs():
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    data = f.read()
            except OSError:
                continue
            fields = data[data.rindex(")") + 2:].split()
            if int(fields[6]) & 0x00200000:  # kernel thread
                continue
            out[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK,
                           (int(fields[13]) + int(fields[14])) / CLK_TCK, data[data.index("(") + 1:data.rindex(")")])
        return out

    def snapshot(self):
        t = self._procs()
        pm = self.cluster.postmaster_pid(0)
        kids = {}
        for pid, (ppid, _, _, _) in t.items():
            kids.setdefault(ppid, []).append(pid)

        def tree(root):
            out, todo = set(), [root]
            while todo:
                p = todo.pop()
                if p in out or p not in t:
                    continue
                out.add(p)
                todo.extend(kids.get(p, []))
            return out

        pg = tree(pm) if pm else set()
        ours = tree(self.me) | pg
        ru_s = resource.getrusage(resource.RUSAGE_SELF)
        ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"busy": self._busy(), "pm": pm,
                "pg": sum(t[p][1] for p in pg) + (t[pm][2] if pm in t else 0.0),
                "mine": ru_s.ru_utime + ru_s.ru_stime + ru_c.ru_utime + ru_c.ru_stime,
                "foreign": {p: (t[p][1], t[p][3]) for p in t if p not in ours}}

    @staticmethod
    def delta(a, b, proxy_cpu=0.0):
        busy = b["busy"] - a["busy"]
        restarted = a["pm"] != b["pm"]
        pg = b["pg"] if restarted else b["pg"] - a["pg"]
        mine = b["mine"] - a["mine"]
        by = {}
        for pid, (cpu, name) in b["foreign"].items():
            d = cpu - a["foreign"][pid][0] if pid in a["foreign"] else 0.0
            if d > 0.01:
                by[name] = by.get(name, 0.0) + d
        top = {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:4]}
        return {"busy_cpu_s": round(busy, 2), "postgres_cpu_s": round(max(0.0, pg), 2),
                "postgres_restarted": restarted, "bench_cpu_s": round(mine, 2),
                "foreign_cpu_s": round(max(0.0, busy - pg - mine - proxy_cpu), 2), "foreign_top": top}

    def wait_quiet(self, max_wait_s, window_s=2.0, limit_share=0.15):
        """Wait until the rest of the machine uses under `limit_share` of one core, at most max_wait_s."""
        t0 = time.monotonic()
        while True:
            a = self.snapshot()
            time.sleep(window_s)
            d = self.delta(a, self.snapshot())
            if d["foreign_cpu_s"] / window_s < limit_share or time.monotonic() - t0 >= max_wait_s:
                return time.monotonic() - t0, d


# ======================================================================================
# child process: the abusive clients
# ======================================================================================

class Tally:
    def __init__(self):
        self.counts, self.errors, self.samples, self.durs = {}, {}, {}, {}

    def inc(self, k, n=1):
        self.counts[k] = self.counts.get(k, 0) + n

    def err(self, where, e):
        key, msg = exc_key(e)
        k = f"{where}: {key}"
        self.errors[k] = self.errors.get(k, 0) + 1
        self.samples.setdefault(k, msg)

    def dur(self, k, v):
        lst = self.durs.setdefault(k, [])
        if len(lst) < 200000:
            lst.append(v)

    def to_json(self):
        return {"counts": self.counts, "errors": self.errors, "error_messages": self.samples,
                "durations_ms": {k: summary(v, 1000) for k, v in self.durs.items()}}


async def _pg_connect(host, port, user, password, rcvbuf=None, limit=2 ** 16, timeout=30.0):
    loop = asyncio.get_running_loop()
    if rcvbuf:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, (host, port)), timeout)
            r, w = await asyncio.open_connection(sock=s, limit=limit)
        except BaseException:
            s.close()
            raise
    else:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=limit), timeout)
    c = Conn(r, w)
    try:
        await asyncio.wait_for(c._startup(user, DB, password, {}), timeout)
    except BaseException:
        w.close()  # no Terminate in the middle of a login
        raise
    return c


async def _abuse(cfg):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = "127.0.0.1", cfg["port"]
    cap = cfg["idle_cap_s"]
    tallies = {k: Tally() for k in ALL_KINDS}
    big_conns = []

    async def idle_txn(i, user, pw):
        t = tallies["idle_txn"]
        while not stop.is_set():
            c = None
            where = "connect"
            try:
                c = await _pg_connect(host, port, user, pw)
                t.inc("logged_in")
                where = "BEGIN"
                await asyncio.wait_for(c.query("BEGIN"), 30)
                where = "statement"
                await asyncio.wait_for(c.query(IDLE_TXN_SQL), 30)
                t.inc("idle_in_transaction")
                t0 = time.monotonic()
                where = "idle"
                try:
                    typ, body = await asyncio.wait_for(c._read(), cap)
                    dt = time.monotonic() - t0
                    if typ == b"E":
                        f = _fields(body)
                        t.inc(f"ended by the proxy: {f.get('C')}")
                        t.samples.setdefault(f"ended by the proxy: {f.get('C')}", f.get("M", "")[:200])
                        t.dur("idle until ended", dt)
                    else:
                        t.inc(f"unexpected message {typ!r} while idle")
                except asyncio.IncompleteReadError:
                    t.inc("ended by the proxy: EOF without an error")
                    t.dur("idle until ended", time.monotonic() - t0)
                except asyncio.TimeoutError:
                    t.inc(f"still open after {cap:.0f} s idle in transaction")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                t.err(where, e)
                await asyncio.sleep(0.1)
            finally:
                if c is not None:
                    c.close()

    async def idle_txn_commit(i, user, pw):
        t = tallies[CONTROL]
        while not stop.is_set():
            c = None
            where = "connect"
            try:
                c = await _pg_connect(host, port, user, pw)
                t.inc("logged_in")
                where = "BEGIN"
                await asyncio.wait_for(c.query("BEGIN"), 30)
                where = "statement"
                await asyncio.wait_for(c.query(IDLE_TXN_SQL), 30)
                await asyncio.sleep(cfg["commit_after_s"])
                where = "COMMIT"
                await asyncio.wait_for(c.query("COMMIT"), 30)
                t.inc("committed")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                t.err(where, e)
                await asyncio.sleep(0.1)
            finally:
                if c is not None:
                    c.close()

    async def big_query(i, user, pw):
        t = tallies["big_query"]
        while not stop.is_set():
            try:
                c = await _pg_connect(host, port, user, pw, rcvbuf=4096, limit=4096)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                t.err("connect", e)
                await asyncio.sleep(0.5)
                continue
            t.inc("logged_in")
            q = BIG_QUERY_SQL.encode() + b"\0"
            c.w.write(b"Q" + struct.pack("!I", len(q) + 4) + q)
            t.inc("query_sent")
            big_conns.append(c)
            return  # hold it, unread, until the end

    async def no_startup(i):
        t = tallies["no_startup"]
        partial = i % 2 == 1
        variant = "partial startup packet" if partial else "nothing sent"
        while not stop.is_set():
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                t.inc(f"opened ({variant})")
                t0 = time.monotonic()
                if partial:
                    # a startup packet announcing 64 bytes, of which 8 come
                    w.write(struct.pack("!II", 64, 196608))
                    await w.drain()
                try:
                    data = await asyncio.wait_for(r.read(65536), cap)
                    dt = time.monotonic() - t0
                    if data[:1] == b"E" and len(data) >= 5:
                        ln = struct.unpack("!I", data[1:5])[0]
                        f = _fields(data[5:5 + ln - 4])
                        key = f"closed by the proxy: {f.get('C')} ({variant})"
                        t.samples.setdefault(key, f.get("M", "")[:200])
                    elif data:
                        key = f"closed by the proxy: other bytes {data[:1]!r} ({variant})"
                    else:
                        key = f"closed by the proxy: EOF ({variant})"
                    t.inc(key)
                    t.dur(f"open until closed ({variant})", dt)
                except asyncio.TimeoutError:
                    t.inc(f"still open after {cap:.0f} s ({variant})")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                t.err("connect", e)
                await asyncio.sleep(0.1)
            finally:
                if w is not None:
                    w.close()

    async def login_loop(i, user, pw):
        t = tallies["login_loop"]
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                c = await _pg_connect(host, port, user, pw)
                t.dur("login", time.monotonic() - t0)
                t.inc("logins")
                c.close()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                t.err("login", e)
                await asyncio.sleep(0.05)

    tasks = []
    users = cfg["users"]
    for i in range(cfg["counts"].get("idle_txn", 0)):
        tasks.append(asyncio.ensure_future(idle_txn(i, *users["idle_txn"])))
    for i in range(cfg["counts"].get(CONTROL, 0)):
        tasks.append(asyncio.ensure_future(idle_txn_commit(i, *users[CONTROL])))
    for i in range(cfg["counts"].get("big_query", 0)):
        tasks.append(asyncio.ensure_future(big_query(i, *users["big_query"])))
    for i in range(cfg["counts"].get("no_startup", 0)):
        tasks.append(asyncio.ensure_future(no_startup(i)))
    for i in range(cfg["counts"].get("login_loop", 0)):
        tasks.append(asyncio.ensure_future(login_loop(i, *users["login_loop"])))
    t_start = time.time()
    try:
        await asyncio.wait_for(stop.wait(), cfg["max_s"])
    except asyncio.TimeoutError:
        pass
    t_stop = time.time()
    for tk in tasks:
        tk.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    # What the non-reading clients had been sent: the first message waiting for them.
    async def peek(c):
        try:
            typ, body = await asyncio.wait_for(c._read(), 2.0)
            if typ == b"E":
                f = _fields(body)
                msg = re.sub(r"\d+ ms", "N ms", f.get("M", ""))
                return f"an error: {f.get('C')} {msg[:160]}"
            if typ in (b"T", b"D"):
                return "rows of the answer (being streamed)"
            return f"message {typ!r}"
        except asyncio.IncompleteReadError:
            return "nothing: the connection was closed"
        except asyncio.TimeoutError:
            return "nothing yet"
        except Exception as e:
            return f"{exc_key(e)[0]}"

    peeks = await asyncio.gather(*(peek(c) for c in big_conns))
    bt = tallies["big_query"]
    for p in peeks:
        bt.inc(f"at the end, waiting for the client: {p}")
    for c in big_conns:
        c.close()
    await asyncio.sleep(0.2)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {"started": t_start, "stopped": t_stop, "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
           "kinds": {k: v.to_json() for k, v in tallies.items()}}
    with open(cfg["out"], "w") as f:
        json.dump(out, f)


# ======================================================================================
# child process: the storm
# ======================================================================================

class StormRec:
    def __init__(self, n):
        self.n = n
        self.ok = 0
        self.first = []     # storm start -> this client's first result (s)
        self.ttfr = []      # this client's own start -> first result (s)
        self.connect = []   # own start -> ReadyForQuery of the login (s)
        self.errors, self.messages = {}, {}

    def fail(self, where, e):
        key, msg = exc_key(e)
        k = f"{where}: {key}"
        self.errors[k] = self.errors.get(k, 0) + 1
        self.messages.setdefault(k, msg)

    def to_json(self, **extra):
        out = {"clients": self.n, "served": self.ok, "errors": self.errors, "error_messages": self.messages,
               "last_first_result_s": round(max(self.first), 3) if self.first else None,
               "time_to_first_result_ms": summary(self.ttfr, 1000, 1),
               "login_ms": summary(self.connect, 1000, 1)}
        out.update(extra)
        return out


async def _storm(cfg):
    loop = asyncio.get_running_loop()
    host, port, n = "127.0.0.1", cfg["port"], cfg["clients"]
    user, pw, timeout, spread = cfg["user"], cfg["password"], cfg["timeout_s"], cfg["spread_s"]
    conns = [None] * n
    out = {"phases": {}}

    async def storm(name):
        rec = StormRec(n)
        t0 = loop.time() + 0.05
        wall0 = time.time() + 0.05

        async def one(i):
            await asyncio.sleep(max(0.0, t0 + spread * i / n - loop.time()))
            ts = loop.time()
            c, where = None, "login"
            try:
                c = await _pg_connect(host, port, user, pw, timeout=timeout)
                tc = loop.time()
                where = "SELECT 1"
                await asyncio.wait_for(c.query("SELECT 1"), max(0.5, timeout - (tc - ts)))
                te = loop.time()
                rec.ok += 1
                rec.first.append(te - t0)
                rec.ttfr.append(te - ts)
                rec.connect.append(tc - ts)
                conns[i] = c
            except Exception as e:
                rec.fail(where, e)
                if c is not None:
                    c.close()

        await asyncio.gather(*(one(i) for i in range(n)))
        wall1 = time.time()
        out["phases"][name] = rec.to_json(wall_start=wall0, wall_end=wall1,
                                          connected_after=sum(1 for c in conns if c is not None))

    await storm("storm")
    with open(cfg["dir"] + "/ready1", "w") as f:
        f.write("1")
    if cfg["restart"]:
        # The parent restarts the primary and then writes go2.
        deadline = time.monotonic() + cfg["restart_wait_s"]
        while not os.path.exists(cfg["dir"] + "/go2") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if os.path.exists(cfg["dir"] + "/go2"):
            rec = StormRec(sum(1 for c in conns if c is not None))
            retried, retry_ok, retry_first = 0, 0, []
            retry_errors, retry_msgs = {}, {}
            t0 = loop.time()
            wall0 = time.time()

            async def again(i):
                nonlocal retried, retry_ok
                c = conns[i]
                if c is None:
                    return
                ts = loop.time()
                try:
                    await asyncio.wait_for(c.query("SELECT 1"), timeout)
                    te = loop.time()
                    rec.ok += 1
                    rec.first.append(te - t0)
                    rec.ttfr.append(te - ts)
                    return
                except Exception as e:
                    rec.fail("SELECT 1 on the existing connection", e)
                    lost = not isinstance(e, PgError) or e.fields.get("S") in ("FATAL", "PANIC")
                retried += 1
                # Like an application: retry (on a new connection if this one is gone),
                # every 100 ms, until `timeout`.
                deadline = ts + timeout
                while loop.time() < deadline:
                    try:
                        if lost:
                            c.close()
                            c = conns[i] = None
                            c = await _pg_connect(host, port, user, pw, timeout=max(0.5, deadline - loop.time()))
                            conns[i] = c
                            lost = False
                        await asyncio.wait_for(c.query("SELECT 1"), max(0.5, deadline - loop.time()))
                        retry_ok += 1
                        retry_first.append(loop.time() - t0)
                        return
                    except Exception as e:
                        k, msg = exc_key(e)
                        retry_errors[k] = retry_errors.get(k, 0) + 1
                        retry_msgs.setdefault(k, msg)
                        lost = lost or not isinstance(e, PgError) or e.fields.get("S") in ("FATAL", "PANIC")
                        await asyncio.sleep(0.1)

            await asyncio.gather(*(again(i) for i in range(n)))
            everyone = rec.first + retry_first
            out["phases"]["after_restart"] = rec.to_json(
                wall_start=wall0, wall_end=time.time(), retried=retried, retry_ok=retry_ok,
                retry_errors=retry_errors, retry_error_messages=retry_msgs,
                last_success_s=round(max(everyone), 3) if everyone else None,
                connected_after=sum(1 for c in conns if c is not None))
        else:
            out["restart_not_signalled"] = True
    # Everybody disconnects, then the same storm against the now-warm proxy.
    for i, c in enumerate(conns):
        if c is not None:
            c.close()
            conns[i] = None
    await asyncio.sleep(cfg["pause_s"])
    await storm("storm_again")
    for c in conns:
        if c is not None:
            c.close()
    await asyncio.sleep(0.2)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    with open(cfg["out"], "w") as f:
        json.dump(out, f)


# ======================================================================================
# child process: many clients against a proxy under a file-descriptor limit
# ======================================================================================

async def _fd_client(host, port, user, pw, timeout):
    """One client: TCP connect, login, `SELECT 1`, all within `timeout`. Returns
    (outcome, detail, conn, seconds, tcp seconds): outcome served / refused (53300) / other / hung;
    detail the stage (connect, login, SELECT 1) and for errors (key, message). `st["tcp"]`
    is the seconds the TCP connect took (None if it did not complete)."""
    loop = asyncio.get_running_loop()
    st = {"where": "connect", "c": None, "w": None, "tcp": None}
    ts = loop.time()

    async def go():
        r, w = await asyncio.open_connection(host, port)
        st["tcp"] = loop.time() - ts
        st["w"] = w
        c = Conn(r, w)
        st["where"] = "login"
        await c._startup(user, DB, pw, {})
        st["c"] = c
        st["where"] = "SELECT 1"
        await c.query("SELECT 1")
        return c

    try:
        c = await asyncio.wait_for(go(), timeout)
        return "served", None, c, loop.time() - ts, st["tcp"]
    except asyncio.CancelledError:
        raise
    except Exception as e:
        dt = loop.time() - ts
        if st["w"] is not None:
            try:
                st["w"].close()
            except Exception:
                pass
        if isinstance(e, (asyncio.TimeoutError, TimeoutError)) and dt >= 0.99 * timeout:
            return "hung", (st["where"], None, None), None, dt, st["tcp"]
        key, msg = exc_key(e)
        if isinstance(e, PgError) and e.sqlstate == "53300":
            return "refused", (st["where"], key, msg), None, dt, st["tcp"]
        return "other", (st["where"], key, msg), None, dt, st["tcp"]


async def _fdlimit(cfg):
    loop = asyncio.get_running_loop()
    host, port, n = "127.0.0.1", cfg["port"], cfg["clients"]
    user, pw, timeout = cfg["user"], cfg["password"], cfg["timeout_s"]
    out = {"clients": n, "served": 0, "refused": 0, "other": 0, "hung": 0,
           "first_refusal": None, "refused_messages": {}, "refused_where": {},
           "other_errors": {}, "other_messages": {}, "hung_where": {}}
    conns, t_served, t_refused, t_other = [], [], [], []
    tcp = {"served": [], "refused": [], "other": [], "hung": []}
    answers = []  # start -> answer (served, refused or other error), s

    def bump(d, k):
        d[k] = d.get(k, 0) + 1

    t0 = loop.time()
    out["wall_start"] = time.time()

    async def one(i):
        if cfg["spread_s"]:
            await asyncio.sleep(cfg["spread_s"] * i / n)
        outcome, detail, c, dt, tc = await _fd_client(host, port, user, pw, timeout)
        out[outcome] += 1
        if tc is not None:
            tcp[outcome].append(tc)
        if outcome == "served":
            conns.append(c)
            t_served.append(dt)
            answers.append(loop.time() - t0)
        elif outcome == "refused":
            where, key, msg = detail
            if out["first_refusal"] is None:
                out["first_refusal"] = {"where": where, "message": msg, "after_s": round(loop.time() - t0, 3)}
            bump(out["refused_messages"], re.sub(r"\d+", "N", msg))
            bump(out["refused_where"], where)
            t_refused.append(dt)
            answers.append(loop.time() - t0)
        elif outcome == "other":
            where, key, msg = detail
            k = f"{where}: {key}"
            bump(out["other_errors"], k)
            out["other_messages"].setdefault(k, msg)
            t_other.append(dt)
            answers.append(loop.time() - t0)
        else:
            bump(out["hung_where"], detail[0])

    await asyncio.gather(*(one(i) for i in range(n)))
    out["wall_answered"] = time.time()
    out["last_answer_s"] = round(max(answers), 3) if answers else None
    out["served_ms"] = summary(t_served, 1000, 1)
    out["refused_ms"] = summary(t_refused, 1000, 1)
    out["other_ms"] = summary(t_other, 1000, 1)
    # TCP connect alone: a client whose SYN found the listen backlog full waits for the
    # kernel's retransmission (1 s, then 3 s, ...) before the proxy even sees it.
    out["tcp_connect_ms"] = {k: summary(v, 1000, 1) for k, v in tcp.items() if v}
    # The admitted clients stay connected for hold_s; then one more client comes while
    # they are still there (over the limit: 53300 expected; at least one log interval
    # after the burst, so a refusal line with the burst's count is due).
    await asyncio.sleep(cfg["hold_s"])
    out["still_open_after_hold"] = sum(1 for c in conns if not c.r.at_eof() and c.r.exception() is None)
    outcome, detail, c, dt, _ = await _fd_client(host, port, user, pw, timeout)
    out["late_probe"] = {"outcome": outcome, "ms": round(dt * 1000, 1),
                         "where": detail[0] if detail else None, "error": detail[1] if detail else None,
                         "message": detail[2] if detail else None, "wall": time.time()}
    if c is not None:
        conns.append(c)
    out["wall_hold_end"] = time.time()
    for c in conns:
        c.close()
    conns.clear()
    out["wall_closed"] = time.time()
    # After the others left: is a new client served? (Retried every 0.5 s up to 10 s.)
    await asyncio.sleep(cfg["pause_s"])
    attempts, first = [], None
    ta = loop.time()
    while True:
        outcome, detail, c, dt, _ = await _fd_client(host, port, user, pw, timeout)
        attempts.append({"outcome": outcome, "ms": round(dt * 1000, 1),
                         "where": detail[0] if detail else None, "error": detail[1] if detail else None,
                         "message": detail[2] if detail else None})
        if c is not None:
            c.close()
        if outcome == "served" or loop.time() - ta > cfg["after_retry_s"]:
            break
        await asyncio.sleep(0.5)
    out["after"] = {"served": attempts[-1]["outcome"] == "served", "attempts": attempts,
                    "seconds_after_close": round(time.time() - out["wall_closed"], 3)}
    await asyncio.sleep(0.2)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    with open(cfg["out"], "w") as f:
        json.dump(out, f)


def worker_main(kind, cfg_path):
    raise_nofile_to_hard()
    with open(cfg_path) as f:
        cfg = json.load(f)
    if kind == "_abuse":
        asyncio.run(_abuse(cfg))
    elif kind == "_fdlimit":
        asyncio.run(_fdlimit(cfg))
    else:
        asyncio.run(_storm(cfg))
    return 0


# ======================================================================================
# pgbench: the well-behaved clients
# ======================================================================================

def parse_pgbench_logs(prefix):
    """(completion epoch s, latency s, schedule lag s) per transaction from `-l` logs
    (`client_id transaction_no time script_no time_epoch time_us [schedule_lag]`, where
    with --rate `time` runs from the scheduled start, so it includes the lag), plus the
    count of transactions logged as failed/skipped."""
    rows, bad = [], 0
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) < 6:
                    continue
                try:
                    lat = int(p[2])
                except ValueError:
                    bad += 1
                    continue
                lag = int(p[6]) if len(p) > 6 and p[6].isdigit() else 0
                rows.append((int(p[4]) + int(p[5]) / 1e6, lat / 1e6, lag / 1e6))
        os.unlink(path)
    rows.sort()
    return rows, bad


def parse_pgbench_output(stdout, stderr):
    out = {}
    for key, pat in [("tps", r"^tps = ([\d.]+) \(without initial connection time\)"),
                     ("txns", r"number of transactions actually processed: (\d+)"),
                     ("failed_txns", r"number of failed transactions: (\d+)"),
                     ("pgbench_lat_avg_ms", r"latency average = ([\d.]+) ms"),
                     ("pgbench_lat_stddev_ms", r"latency stddev = ([\d.]+) ms"),
                     ("pgbench_lag_avg_ms", r"rate limit schedule lag: avg ([\d.]+)"),
                     ("conn_time_ms", r"initial connection time = ([\d.]+) ms")]:
        m = re.search(pat, stdout, re.M)
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    aborted = re.findall(r"client (\d+) aborted", stderr)
    out["aborted_clients"] = len(set(aborted))
    msgs = {}
    for line in stderr.splitlines():
        if "error" not in line.lower() and "fatal" not in line.lower() and "aborted" not in line:
            continue
        m = re.search(r"(ERROR|FATAL):\s*(.*)", line)
        text = m.group(0) if m else line
        text = re.sub(r"client \d+", "client N", text)
        text = re.sub(r"\d+ ms", "N ms", text)[:220]
        msgs[text] = msgs.get(text, 0) + 1
    if msgs:
        out["error_messages"] = dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:8])
        out["error_lines"] = sum(msgs.values())
    return out


# ======================================================================================
# the run
# ======================================================================================

def parse_args(argv):
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="bench/overload", description=(
        "Switchyard under abuse: pgbench -S at a fixed rate alone and beside abusive clients "
        "(idle in transaction, an unread big answer, unfinished startups, login loops), then a "
        "connection storm on a cold proxy and again after a restart of the primary, then more "
        "clients at once than a proxy's file-descriptor limit leaves room for. Writes "
        "bench/results/<date>-<name>.md and .json."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--good", type=int, default=200, help="well-behaved pgbench clients (the issue's target: 10000)")
    p.add_argument("--bad", type=int, default=100,
                   help="abusive clients, split evenly among --bad-kinds (the issue's target: 1000)")
    p.add_argument("--bad-kinds", default=",".join(KINDS), help="comma list of: " + ", ".join(KINDS))
    p.add_argument("--abuse-runs", default=DEFAULT_ABUSE_RUNS,
                   help="the runs with abusive clients, comma list of POOL or POOL:KIND+KIND (only those kinds, "
                        "each with its share of --bad); POOL is own (each abusive kind logs in as its own user, so it "
                        "has its own pool) or shared (all log in as the good clients' user: one pool for all)")
    p.add_argument("--no-closing-baseline", action="store_true",
                   help="no second baseline after the abuse runs (it shows how much the baseline itself moves)")
    p.add_argument("--rate", type=float, default=2000, help="pgbench --rate: transactions per second, all good clients together")
    p.add_argument("--duration", type=int, default=10, help="pgbench -T seconds per run (plus connection time)")
    p.add_argument("--jobs", type=int, default=max(1, min(8, cores)), help="pgbench -j")
    p.add_argument("--protocol", default="simple", choices=["simple", "extended", "prepared"], help="pgbench -M")
    p.add_argument("--ramp", type=float, default=3.0, help="seconds the abusive clients run before pgbench starts")
    p.add_argument("--storm", type=int, default=2000, help="storm clients (the issue's target: 5000)")
    p.add_argument("--storm-spread", type=float, default=1.0, help="seconds over which the storm clients start")
    p.add_argument("--storm-timeout", type=float, default=60.0, help="per storm client: login + SELECT 1 within this")
    p.add_argument("--storm-auth", default="scram", choices=["scram", "trust"],
                   help="storm clients log in as the SCRAM bench user or the trust user idle")
    p.add_argument("--no-storm-restart", action="store_true",
                   help="no pg_ctl restart between the storms (the second storm is then only against a warm proxy)")
    p.add_argument("--storm-sample-ms", type=int, default=50, help="pg_stat_activity sampling during the storm")
    p.add_argument("--fd-limit", type=int, default=1024,
                   help="fdlimit phase: RLIMIT_NOFILE (soft and hard) of its proxy, like `ulimit -n` (the issue: 1024)")
    p.add_argument("--fd-clients", type=int, default=1500,
                   help="fdlimit phase: clients that connect at once (the issue: 1500)")
    p.add_argument("--fd-hold", type=float, default=10.0,
                   help="fdlimit phase: seconds the admitted clients stay connected after all have been answered")
    p.add_argument("--fd-spread", type=float, default=0.0,
                   help="fdlimit phase: seconds over which the clients start (0: all at once)")
    p.add_argument("--fd-timeout", type=float, default=15.0,
                   help="fdlimit phase: per client, connect + login + SELECT 1 within this, else it counts as hung")
    p.add_argument("--fd-log-interval", type=float, default=10.0,
                   help="fdlimit phase: the proxy's interval for repeated log lines (refusals, accept failures), "
                        "against which the log is checked")
    p.add_argument("--pool-size", type=int, default=20)
    p.add_argument("--idle-transaction-timeout-ms", type=int, default=2000)
    p.add_argument("--client-login-timeout-ms", type=int, default=5000)
    p.add_argument("--checkout-timeout-ms", type=int, default=5000)
    p.add_argument("--query-timeout-ms", type=int, default=0, help="0: off (the key is not written)")
    p.add_argument("--client-idle-timeout-ms", type=int, default=0, help="0: off (the key is not written)")
    p.add_argument("--max-clients", type=int, default=0,
                   help="proxy.max_clients; 0: good + bad + 200 for the overload proxy, 2 x storm + 200 for the storm's")
    p.add_argument("--threads", type=int, default=0, help="proxy.threads (0: not written, one per core)")
    p.add_argument("--proxy-secret", default="password", choices=["password", "verifier"],
                   help="what the proxy's config holds for the SCRAM users: the plaintext password, or the SCRAM "
                        "verifier copied from pg_authid (then the proxy logs in to the server with the keys a "
                        "client's login gave it, and never computes the salted password)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s")
    p.add_argument("--max-connections", type=int, default=200, help="PostgreSQL max_connections")
    p.add_argument("--binary", default=os.path.join(REPO, "target/release/switchyard"))
    p.add_argument("--pg-bin", default=PG_BIN_DEFAULT)
    p.add_argument("--skip-overload", action="store_true")
    p.add_argument("--skip-storm", action="store_true")
    p.add_argument("--skip-fdlimit", action="store_true", help="no fdlimit phase (a proxy under --fd-limit)")
    p.add_argument("--quiet-wait", type=float, default=45.0,
                   help="total seconds the run may wait for other processes on the machine to go quiet")
    p.add_argument("--foreign-limit", type=float, default=2.0,
                   help="CPU seconds other processes may use during an overload run before it is run again")
    p.add_argument("--max-reruns", type=int, default=2, help="re-runs of disturbed overload runs, in all")
    p.add_argument("--name", default="overload")
    p.add_argument("--out-dir", default=os.path.join(BENCH_DIR, "results"))
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--report-from", metavar="JSON", default=None,
                   help="run nothing: write the report again from a results .json (next to it)")
    a = p.parse_args(argv)
    a.bad_kinds = [k for k in a.bad_kinds.split(",") if k]
    for k in a.bad_kinds:
        if k not in KINDS:
            p.error(f"unknown kind {k}")
    runs = []
    for item in [x for x in a.abuse_runs.split(",") if x]:
        pool, _, kinds = item.partition(":")
        kinds = [k for k in kinds.split("+") if k] or list(a.bad_kinds)
        if pool not in ("own", "shared"):
            p.error(f"--abuse-runs: pool own or shared, not {pool}")
        for k in kinds:
            if k not in a.bad_kinds and k != CONTROL:
                p.error(f"--abuse-runs: kind {k} is neither in --bad-kinds nor {CONTROL}")
        missing = [k for k in a.bad_kinds if k not in kinds]
        name = f"abuse-{pool}"
        if len(kinds) == 1 and len(a.bad_kinds) > 1:
            name += f"-only-{kinds[0]}"
        elif missing:
            name += "-without-" + "-".join(missing)
        runs.append({"name": name, "pool": pool, "kinds": kinds})
    a.runs = runs if a.bad > 0 else []
    return a


class Overload:
    def __init__(self, args):
        self.a = args
        self.reg = Registry()
        self.tmp = tempfile.mkdtemp(prefix="sybench-overload-")
        self.results = {"runs": [], "storm": None, "fdlimit": None, "notes": []}
        self.quiet_budget = args.quiet_wait

    # ---------------------------------------------------------------- setup
    def setup_cluster(self):
        a = self.a
        log(f"temp dir {self.tmp}")
        c = self.cluster = PgCluster(self.tmp, self.reg, a.pg_bin, a.max_connections)
        c.init_primary("primary")
        roles = [(BENCH_USER, BENCH_PASSWORD), (IDLE_USER, IDLE_PASSWORD)] + [(u, ABUSE_PASSWORD) for u in ABUSE_ROLES]
        c.psql(0, [f"CREATE ROLE {u} LOGIN PASSWORD '{pw}'" for u, pw in roles])
        c.psql(0, f"CREATE DATABASE {DB} OWNER {BENCH_USER}")
        log(f"pgbench -i -s {a.scale}")
        p = subprocess.run(["pgbench", "-i", "-q", "-s", str(a.scale), "-h", "127.0.0.1", "-p", str(c.nodes[0].port),
                            "-U", BENCH_USER, DB], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PGPASSWORD=BENCH_PASSWORD))
        if p.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {p.stderr}")
        c.psql(0, ["VACUUM ANALYZE", f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {', '.join(ABUSE_ROLES)}"], db=DB)
        c.psql(0, "CHECKPOINT")
        self.verifiers = {u: c.psql(0, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{u}'")
                          for u in [BENCH_USER] + ABUSE_ROLES}
        self.cpu = CpuAccount(c)

    def proxy_config(self, port, admin_port, max_clients):
        a = self.a
        users = [(BENCH_USER, BENCH_PASSWORD, "scram-sha-256")] + \
                [(u, ABUSE_PASSWORD, "scram-sha-256") for u in ABUSE_ROLES] + [(IDLE_USER, IDLE_PASSWORD, "trust")]
        text = "[health]\ninterval_ms = 1000\ntimeout_ms = 1000\nrise = 2\nfall = 2\n"
        if a.proxy_secret == "verifier":
            # the monitor needs a real password
            text += f'user = "{BENCH_USER}"\npassword = "{BENCH_PASSWORD}"\n'
        text += "\n"
        for u, pw, auth in users:
            if a.proxy_secret == "verifier" and u in self.verifiers:
                pw = self.verifiers[u]
            text += f'[[users]]\nname = "{u}"\npassword = "{pw}"\nauth = "{auth}"\n\n'
        text += f"[proxy]\nmax_clients = {max_clients}\nclient_login_timeout_ms = {a.client_login_timeout_ms}\n"
        if a.threads:
            text += f"threads = {a.threads}\n"
        text += f'\n[clusters.main]\nlisten_rw = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        text += f"pool_size = {a.pool_size}\ncheckout_timeout_ms = {a.checkout_timeout_ms}\n"
        text += f"idle_transaction_timeout_ms = {a.idle_transaction_timeout_ms}\n"
        if a.query_timeout_ms:
            text += f"query_timeout_ms = {a.query_timeout_ms}\n"
        if a.client_idle_timeout_ms:
            text += f"client_idle_timeout_ms = {a.client_idle_timeout_ms}\n"
        text += f'\n[[clusters.main.nodes]]\nname = "primary"\nhost = "127.0.0.1"\nport = {self.cluster.nodes[0].port}\n'
        text += f'\n[admin]\nhttp_listen = "127.0.0.1:{admin_port}"\n'
        return text

    def start_proxy(self, key, max_clients, preexec_fn=None):
        """A proxy with this run's config; `preexec_fn` runs in the child before the exec
        (the fdlimit phase sets RLIMIT_NOFILE there, for `switchyard check` too)."""
        d = os.path.join(self.tmp, key)
        os.makedirs(d, exist_ok=True)
        port, admin = free_port(), free_port()
        cfg = self.proxy_config(port, admin, max_clients)
        path = os.path.join(d, "switchyard.toml")
        with open(path, "w") as f:
            f.write(cfg)
        chk = subprocess.run([self.binary, "check", "--config", path], capture_output=True, text=True, timeout=30,
                             preexec_fn=preexec_fn)
        if chk.returncode != 0:
            raise RuntimeError(f"switchyard check rejected {path}:\n{chk.stdout}{chk.stderr}\n{cfg}")
        logp = os.path.join(d, "switchyard.log")
        lvl = os.environ.get("SYBENCH_RUST_LOG", "info")
        p = self.reg.spawn(f"switchyard {key}", [self.binary, "--log-format", "json", "--config", path], logp,
                           env=dict(os.environ, RUST_LOG=lvl, SWITCHYARD_LOG=lvl), preexec_fn=preexec_fn)
        wait_port(port, proc=p)
        s = System(key, key, port, pid=p.pid, log_path=logp, config_text=cfg)
        s.admin_port, s.proc, s.check_output = admin, p, (chk.stdout + chk.stderr).strip()
        # Ready = the node is up and primary in routing (asked of /metrics, so that no
        # client and no pooled connection is involved: the storm's proxy stays cold).
        deadline = time.monotonic() + 30
        while True:
            m = fetch_metrics(admin, timeout=2)
            if metric_sum(m, "switchyard_node_up") >= 1 and metric_sum(m, "switchyard_node_primary") >= 1:
                break
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{key}: not ready after 30 s (node_up/node_primary); log {logp}")
            time.sleep(0.1)
        return s

    def server_sessions(self):
        """pg_stat_database's session counters of the bench database (sessions started,
        abandoned, fatal, killed), counted when each backend flushes its statistics."""
        try:
            c = PgSync(self.cluster.sockdir, self.cluster.nodes[0].port, timeout=5)
            try:
                rows = c.query("SELECT sessions, sessions_abandoned, sessions_fatal, sessions_killed "
                               f"FROM pg_stat_database WHERE datname = '{DB}'")
            finally:
                c.close()
            return [int(x) for x in rows[0]]
        except Exception:
            return None

    def quiet(self, label):
        """Wait (within the run's budget) until other processes are quiet; note how long."""
        if self.quiet_budget <= 0:
            return 0.0
        waited, d = self.cpu.wait_quiet(min(30.0, self.quiet_budget), window_s=1.5)
        self.quiet_budget -= waited
        if waited > 2.0:
            log(f"  waited {waited:.0f} s for other processes to go quiet before {label} "
                f"(last window: {d['foreign_cpu_s']} CPU s, {d['foreign_top']})")
        return round(waited, 1)

    # ---------------------------------------------------------------- pgbench
    def pgbench(self, port, name, clients, duration, rate):
        a = self.a
        prefix = os.path.join(self.tmp, f"pgbench-{name}")
        T = duration + connect_allowance(clients)
        argv = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", BENCH_USER, "-n", "-S", "-M", a.protocol,
                "-c", str(clients), "-j", str(max(1, min(a.jobs, clients))), "-T", str(T), "-R", str(rate),
                "-l", f"--log-prefix={prefix}", DB]
        env = dict(os.environ, PGPASSWORD=BENCH_PASSWORD, PGCONNECT_TIMEOUT="15")
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.time()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=T + 120)
            rc, so, se = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            so = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            se = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
                f"\npgbench did not finish within {T + 120} s (killed)"
        wall1 = time.time()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = parse_pgbench_output(so, se)
        rows, bad = parse_pgbench_logs(prefix)
        shown = [re.sub(r"^--log-prefix=.*/", "--log-prefix=", x) for x in argv]
        res.update({"rc": rc, "wall_start": wall0, "wall_end": wall1, "wall_s": round(wall1 - wall0, 1),
                    "command": "PGPASSWORD=*** " + " ".join(shlex.quote(x) for x in shown),
                    "pgbench_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
                    "log_txns": len(rows), "log_failed_or_skipped": bad})
        if rows:
            lats = [r[1] for r in rows]
            lags = [r[2] for r in rows]
            res["latency_ms"] = summary(lats, 1000)
            res["lag_ms"] = summary(lags, 1000)
            res["service_ms"] = summary([r[1] - r[2] for r in rows], 1000)
            res["first_txn"], res["last_txn"] = rows[0][0], rows[-1][0]
        res["stderr_tail"] = se.strip().splitlines()[-5:]
        res["stdout_tail"] = so.strip().splitlines()[-14:]
        errors = res.get("aborted_clients", 0) + (res.get("failed_txns") or 0) + bad
        if rc not in (0,) and not errors:
            errors = 1
        res["errors"] = errors
        res["_rows"] = rows
        return res

    @staticmethod
    def timeline(pgb, procs, acts, t0, t1, rows_max=12):
        """Per window: good tps, p50/p99, the proxy's RSS/FDs/clients, server connections."""
        span = max(1.0, t1 - t0)
        w = max(1, math.ceil(span / rows_max))
        out = []
        rows = pgb.get("_rows", [])
        t = t0
        while t < t1 - 0.01:
            e = min(t + w, t1)
            lat = [r[1] for r in rows if t <= r[0] < e]
            ps = [s for s in procs if not s.get("dead") and t <= s["t"] < e]
            ac = [s for s in acts if t <= s["t"] < e]
            out.append({"from_s": round(t - t0, 1), "to_s": round(e - t0, 1),
                        "tps": round(len(lat) / (e - t), 1) if e > t else None,
                        "p50_ms": round(pct(lat, 50) * 1000, 2) if lat else None,
                        "p99_ms": round(pct(lat, 99) * 1000, 2) if lat else None,
                        "rss_mib": round(max(s["rss_kib"] for s in ps) / 1024, 1) if ps else None,
                        "fds": max(s["fds"] for s in ps) if ps else None,
                        "clients": max((s["clients"] or 0) for s in ps) if ps else None,
                        "server_pool": max(s["pool"] for s in ac) if ac else None,
                        "idle_in_txn": max(s["idle_in_txn"] for s in ac) if ac else None,
                        "client_write": max(s["client_write"] for s in ac) if ac else None})
            t = e
        return out

    # ---------------------------------------------------------------- overload
    def bad_counts(self):
        a = self.a
        kinds = a.bad_kinds
        base, extra = divmod(a.bad, len(kinds))
        out = {k: base + (1 if i < extra else 0) for i, k in enumerate(kinds)}
        out[CONTROL] = out.get("idle_txn", base)
        return out

    def start_abuse(self, port, name, pool, counts, max_s):
        d = os.path.join(self.tmp, name)
        os.makedirs(d, exist_ok=True)
        users = {k: ([BENCH_USER, BENCH_PASSWORD] if pool == "shared" else [OWN_USERS[k], ABUSE_PASSWORD])
                 for k in OWN_USERS}
        cfg = {"port": port, "counts": counts, "users": users, "max_s": max_s,
               "commit_after_s": 0.95 * self.a.idle_transaction_timeout_ms / 1000,
               "idle_cap_s": max(10.0, 3 * self.a.idle_transaction_timeout_ms / 1000, 3 * self.a.client_login_timeout_ms / 1000),
               "out": os.path.join(d, "result.json")}
        cp = os.path.join(d, "config.json")
        with open(cp, "w") as f:
            json.dump(cfg, f)
        proc = self.reg.spawn(f"abusive clients ({pool})", [sys.executable, SCRIPT, "_abuse", cp],
                              os.path.join(d, "worker.log"))
        return proc, cfg

    def stop_worker(self, proc, out_path, grace=20.0):
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        try:
            with open(out_path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            log_path = os.path.join(os.path.dirname(out_path), "worker.log")
            tail = ""
            try:
                tail = open(log_path).read()[-1500:]
            except OSError:
                pass
            return {"error": f"no result from the worker ({e}); rc {proc.returncode}; log tail: {tail}"}

    def overload(self):
        """Each run on a freshly started proxy (warmed up by a short pgbench), so that no
        run inherits another's pools, memory or descriptors."""
        a = self.a
        all_counts = self.bad_counts() if a.bad > 0 else {}
        maxc = a.max_clients or (a.good + a.bad + 200)
        plan = [{"name": "baseline", "pool": None, "kinds": []}] + a.runs
        if a.runs and not a.no_closing_baseline:
            plan.append({"name": "baseline-again", "pool": None, "kinds": []})
        self.reruns = 0
        for i, item in enumerate(plan):
            tries = []
            while True:
                run = self.one_run(i, len(plan), item, all_counts, maxc, attempt=len(tries))
                tries.append(run)
                f = run["cpu"]["foreign_cpu_s"]
                if f <= a.foreign_limit:
                    break
                if self.reruns >= a.max_reruns or self.quiet_budget <= 0:
                    log(f"  {item['name']}: other processes used {f} CPU s during the run (> --foreign-limit "
                        f"{a.foreign_limit}); no re-run left: marked disturbed")
                    break
                self.reruns += 1
                log(f"  {item['name']}: other processes used {f} CPU s during the run (> --foreign-limit "
                    f"{a.foreign_limit}): running it again")
            best = min(tries, key=lambda r: r["cpu"]["foreign_cpu_s"])
            best["disturbed"] = best["cpu"]["foreign_cpu_s"] > a.foreign_limit
            best["attempts"] = [{"foreign_cpu_s": r["cpu"]["foreign_cpu_s"], "tps": r["pgbench"].get("tps"),
                                 "p99_ms": r["pgbench"].get("latency_ms", {}).get("p99"),
                                 "errors": r["pgbench"]["errors"]} for r in tries]
            self.results["runs"].append(best)

    def one_run(self, i, n_runs, item, all_counts, maxc, attempt=0):
        a = self.a
        name, pool = item["name"], item["pool"]
        counts = {k: n for k, n in all_counts.items() if k in item["kinds"]}
        s = self.start_proxy(f"sy-{name}-{attempt}", maxc)
        if i == 0:
            self.results["overload_config"] = s.config_text
            self.results["overload_check"] = s.check_output
        warm = self.pgbench(s.port, f"warmup-{name}", min(a.good, 2 * a.pool_size), 2, min(a.rate, 1000))
        warm.pop("_rows", None)
        waited = self.quiet(name)
        log(f"run {i + 1}/{n_runs} {name}{f' (again, {attempt + 1})' if attempt else ''}: {a.good} good clients "
            f"at {a.rate:g} tps for {a.duration} s"
            + (f", {sum(counts.values())} abusive clients ({pool} pool): {counts}" if pool else ""))
        off = s.log_offset()
        m0 = fetch_metrics(s.admin_port)
        ss0 = self.server_sessions()
        c0 = self.cpu.snapshot()
        p0 = cpu_times(s.pid)
        procs = ProcSampler(s.pid, s.admin_port, 1.0).start()
        acts = ActivitySampler(self.cluster.sockdir, self.cluster.nodes[0].port, 1.0).start()
        t_begin = time.time()
        worker, wcfg = None, None
        if pool:
            max_s = a.ramp + a.duration + connect_allowance(a.good) + 240
            worker, wcfg = self.start_abuse(s.port, name, pool, counts, max_s)
            time.sleep(a.ramp)
        pgb = self.pgbench(s.port, name, a.good, a.duration, a.rate)
        abuse = None
        if worker is not None:
            abuse = self.stop_worker(worker, wcfg["out"])
        t_end = time.time()
        # After the abusive clients are gone: does everything come back down?
        time.sleep(3.0)
        t_after = time.time()
        after_proc = procs.one()
        procs.stop()
        act_samples = acts.stop()
        p1 = cpu_times(s.pid)
        c1 = self.cpu.snapshot()
        m1 = fetch_metrics(s.admin_port)
        ss1 = self.server_sessions()
        n, msgs = s.log_problems(off)
        msgs = norm_messages(msgs)
        run = {
            "server_sessions": (dict(zip(("started", "abandoned", "fatal", "killed"),
                                         (y - x for x, y in zip(ss0, ss1)))) if ss0 and ss1 else None),
            "name": name, "bad_pool": pool, "bad_counts": counts, "kinds": item["kinds"],
            "proxy_pid": s.pid, "warmup": {k: warm.get(k) for k in ("tps", "errors", "rc", "error_messages")},
            "quiet_wait_s": waited, "pgbench": pgb, "abuse": abuse,
            "proxy": ProcSampler.window(procs.samples, t_begin, t_end),
            "proxy_during_pgbench": ProcSampler.window(procs.samples, pgb["wall_start"], pgb["wall_end"]),
            "proxy_after": after_proc,
            "proxy_cpu_s": round(sum(p1) - sum(p0), 2),
            "server": ActivitySampler.window(act_samples, t_begin, t_end),
            "server_after": ActivitySampler.window(act_samples, t_end + 2.0, t_after + 1.0),
            "activity_gaps": acts.gaps,
            "metrics_delta": metrics_delta(m0, m1),
            "pool_wait": pool_wait_hist(m0, m1),
            "cpu": CpuAccount.delta(c0, c1, proxy_cpu=sum(p1) - sum(p0)),
            "log_problems": n,
            "log_messages": dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:10]),
            "loadavg": open("/proc/loadavg").read().split()[:3],
        }
        run["timeline"] = self.timeline(pgb, procs.samples, act_samples, pgb.get("first_txn", pgb["wall_start"]),
                                        pgb.get("last_txn", pgb["wall_end"]) + 0.001)
        run["proxy_samples"] = procs.samples
        run["activity_samples"] = act_samples
        pgb.pop("_rows", None)
        lat = pgb.get("latency_ms", {})
        log(f"  {name}: tps {pgb.get('tps')}, p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
            f"errors {pgb['errors']} (aborted clients {pgb.get('aborted_clients')}), "
            f"server conns max {run['server'].get('pool_max')} {run['server'].get('by_user_max')} "
            f"(+{run['server'].get('health_max')} health), proxy RSS max {run['proxy'].get('rss_kib', {}).get('max')} KiB, "
            f"FDs max {run['proxy'].get('fds', {}).get('max')}; other processes {run['cpu']['foreign_cpu_s']} CPU s")
        if pgb.get("error_messages"):
            for k, v in list(pgb["error_messages"].items())[:3]:
                log(f"    {v}x {k}")
        stop_process(s.proc)
        return run

    # ---------------------------------------------------------------- storm
    def storm(self):
        a = self.a
        maxc = a.max_clients or (2 * a.storm + 200)
        s = self.storm_proxy = self.start_proxy("sy-storm", maxc)
        self.results["storm_config"] = s.config_text
        waited = self.quiet("storm")
        d = os.path.join(self.tmp, "storm")
        os.makedirs(d, exist_ok=True)
        user, pw = (BENCH_USER, BENCH_PASSWORD) if a.storm_auth == "scram" else (IDLE_USER, None)
        cfg = {"port": s.port, "clients": a.storm, "user": user, "password": pw, "timeout_s": a.storm_timeout,
               "spread_s": a.storm_spread, "restart": not a.no_storm_restart, "restart_wait_s": a.storm_timeout + 120,
               "pause_s": 1.0, "dir": d, "out": os.path.join(d, "result.json")}
        cp = os.path.join(d, "config.json")
        with open(cp, "w") as f:
            json.dump(cfg, f)
        m0 = fetch_metrics(s.admin_port)
        base_proc = ProcSampler(s.pid, s.admin_port, 0.1).one()
        c0 = self.cpu.snapshot()
        p0 = cpu_times(s.pid)
        off = s.log_offset()
        procs = ProcSampler(s.pid, s.admin_port, 0.1).start()
        acts = ActivitySampler(self.cluster.sockdir, self.cluster.nodes[0].port, a.storm_sample_ms / 1000).start()
        log(f"storm: {a.storm} clients ({a.storm_auth}) within {a.storm_spread:g} s on a cold proxy (:{s.port})")
        worker = self.reg.spawn("storm clients", [sys.executable, SCRIPT, "_storm", cp], os.path.join(d, "worker.log"))
        t_begin = time.time()
        restart = None
        deadline = time.monotonic() + a.storm_timeout + 60
        while not os.path.exists(os.path.join(d, "ready1")) and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        ready1 = os.path.exists(os.path.join(d, "ready1"))
        if cfg["restart"] and ready1:
            time.sleep(1.0)  # everyone connected and idle
            log("  pg_ctl restart -m fast of the primary while the storm's clients are connected")
            n = self.cluster.nodes[0]
            t0 = time.time()
            r = self.cluster.run("pg_ctl", "-D", n.data, "-l", n.log, "-m", "fast", "-w", "-t", "60",
                                 "-o", f"-p {n.port}", "restart", check=False, timeout=120)
            t1 = time.time()
            restart = {"wall_start": t0, "wall_end": t1, "seconds": round(t1 - t0, 2), "rc": r.returncode,
                       "output": (r.stdout + r.stderr).strip()[-400:]}
            with open(os.path.join(d, "go2"), "w") as f:
                f.write("1")
        try:
            worker.wait(4 * a.storm_timeout + 180)
        except subprocess.TimeoutExpired:
            pass
        res = self.stop_worker(worker, cfg["out"])
        t_end = time.time()
        time.sleep(2.0)
        after_proc = procs.one()
        procs.stop()
        act_samples = acts.stop()
        p1 = cpu_times(s.pid)
        c1 = self.cpu.snapshot()
        m1 = fetch_metrics(s.admin_port)
        n, msgs = s.log_problems(off)
        msgs = norm_messages(msgs)
        out = {"clients": a.storm, "auth": a.storm_auth, "spread_s": a.storm_spread, "quiet_wait_s": waited,
               "ready1": ready1, "restart": restart, "result": res, "proxy_before": base_proc,
               "proxy_after": after_proc, "proxy_cpu_s": round(sum(p1) - sum(p0), 2),
               "cpu": CpuAccount.delta(c0, c1, proxy_cpu=sum(p1) - sum(p0)), "metrics_delta": metrics_delta(m0, m1),
               "pool_wait": pool_wait_hist(m0, m1), "activity_gaps": acts.gaps,
               "log_problems": n, "log_messages": dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:10]),
               "loadavg": open("/proc/loadavg").read().split()[:3], "phases": {}}
        for ph, pr in (res.get("phases") or {}).items():
            w0, w1 = pr["wall_start"] - 0.1, pr["wall_end"] + 0.1
            out["phases"][ph] = {"server": ActivitySampler.window(act_samples, w0, w1),
                                 "proxy": ProcSampler.window(procs.samples, w0, w1)}
        out["server_all"] = ActivitySampler.window(act_samples, t_begin, t_end)
        out["proxy_all"] = ProcSampler.window(procs.samples, t_begin, t_end)
        if restart:
            out["server_during_restart"] = ActivitySampler.window(act_samples, restart["wall_start"], restart["wall_end"])
        self.results["storm"] = out
        for ph, pr in (res.get("phases") or {}).items():
            log(f"  {ph}: served {pr.get('served')}/{pr.get('clients')}, errors {sum(pr.get('errors', {}).values())} "
                f"{pr.get('errors') or ''}, last first result {pr.get('last_first_result_s')} s, "
                f"server conns max {out['phases'][ph]['server'].get('pool_max')}")
        stop_process(s.proc)


    # ---------------------------------------------------------------- fd limit
    def fdlimit(self):
        """A proxy whose RLIMIT_NOFILE is --fd-limit (soft and hard: it raises its soft
        limit to the hard one at start), --fd-clients clients at once: every one should be
        served or refused with 53300 at once, none left hanging; the refusals logged once
        per interval with a count; and a client served again once the others have left."""
        a = self.a
        lim = a.fd_limit
        maxc = a.max_clients or (a.fd_clients + 200)

        def limit_nofile():
            resource.setrlimit(resource.RLIMIT_NOFILE, (lim, lim))

        s = self.start_proxy("sy-fdlimit", maxc, preexec_fn=limit_nofile)
        nofile = proc_nofile(s.pid)
        startup = fd_startup_line(s.log_path)
        waited = self.quiet("fdlimit")
        d = os.path.join(self.tmp, "fdlimit")
        os.makedirs(d, exist_ok=True)
        cfg = {"port": s.port, "clients": a.fd_clients, "user": BENCH_USER, "password": BENCH_PASSWORD,
               "timeout_s": a.fd_timeout, "hold_s": a.fd_hold, "spread_s": a.fd_spread, "pause_s": 1.0,
               "after_retry_s": 10.0,
               "out": os.path.join(d, "result.json")}
        cp = os.path.join(d, "config.json")
        with open(cp, "w") as f:
            json.dump(cfg, f)
        m0 = fetch_metrics(s.admin_port)
        off = s.log_offset()
        base_proc = ProcSampler(s.pid, None, 0.1).one()
        c0 = self.cpu.snapshot()
        p0 = cpu_times(s.pid)
        # /proc only: /metrics is asked before and after (an HTTP request takes one of the
        # proxy's descriptors too).
        procs = ProcSampler(s.pid, None, 0.1).start()
        log(f"fdlimit: {a.fd_clients} clients " + (f"within {a.fd_spread:g} s" if a.fd_spread else "at once")
            + f" against a proxy with RLIMIT_NOFILE {nofile} (:{s.port}); "
            f"budget from its start-up warning: {(startup or {}).get('clients', '?')} clients")
        worker = self.reg.spawn("fdlimit clients", [sys.executable, SCRIPT, "_fdlimit", cp],
                                os.path.join(d, "worker.log"))
        try:
            worker.wait(3 * a.fd_timeout + a.fd_hold + 60)
        except subprocess.TimeoutExpired:
            pass
        res = self.stop_worker(worker, cfg["out"])
        time.sleep(2.0)
        after_proc = procs.one()
        samples = procs.stop()
        p1 = cpu_times(s.pid) if s.proc.poll() is None else p0
        c1 = self.cpu.snapshot()
        m1 = fetch_metrics(s.admin_port)
        n, msgs = s.log_problems(off)
        msgs = norm_messages(msgs)
        lines = fd_log_lines(s.log_path, off)
        w0 = res.get("wall_start", samples[0]["t"] if samples else 0)
        w1 = res.get("wall_hold_end", time.time())
        timeline = []
        for sec in range(int(max(0.0, (samples[-1]["t"] if samples else w0) - w0)) + 1):
            ss = [x for x in samples if not x.get("dead") and w0 + sec <= x["t"] < w0 + sec + 1]
            if ss:
                timeline.append([sec, max(x["fds"] for x in ss), round(max(x["rss_kib"] for x in ss) / 1024, 1)])
        out = {"limit": lim, "clients": a.fd_clients, "hold_s": a.fd_hold, "timeout_s": a.fd_timeout,
               "spread_s": a.fd_spread,
               "max_clients": maxc, "pool_mode": "transaction", "auth": "scram", "proxy_nofile": nofile,
               "startup_warning": startup, "config": s.config_text, "check_output": s.check_output,
               "quiet_wait_s": waited, "result": res, "proxy_before": base_proc, "proxy_after": after_proc,
               "proxy_during": ProcSampler.window(samples, w0, w1),
               "proxy_answering": ProcSampler.window(samples, w0, res.get("wall_answered", w1)),
               "proxy_alive_at_end": s.proc.poll() is None, "fds_timeline": timeline,
               "proxy_cpu_s": round(sum(p1) - sum(p0), 2),
               "cpu": CpuAccount.delta(c0, c1, proxy_cpu=sum(p1) - sum(p0)), "metrics_delta": metrics_delta(m0, m1),
               "log_lines": lines, "log_analysis": fd_log_analysis(lines, a.fd_log_interval),
               "log_problems": n, "log_messages": dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:10]),
               "loadavg": open("/proc/loadavg").read().split()[:3]}
        self.results["fdlimit"] = out
        la = out["log_analysis"]
        log(f"  served {res.get('served')}, refused (53300) {res.get('refused')}, other {res.get('other')} "
            f"{res.get('other_errors') or ''}, hung {res.get('hung')} {res.get('hung_where') or ''}; last answer at "
            f"{res.get('last_answer_s')} s; proxy FDs max {out['proxy_during'].get('fds', {}).get('max')}, RSS max "
            f"{out['proxy_during'].get('rss_kib', {}).get('max')} KiB; log: {la['lines']} lines, at most "
            f"{la['max_in_interval']} within {a.fd_log_interval:g} s; after: "
            f"{'served' if (res.get('after') or {}).get('served') else 'NOT served'}")
        stop_process(s.proc)


# ======================================================================================
# report
# ======================================================================================

def run_label(r, a):
    """What a run's abusive clients were, in words."""
    if not r["bad_pool"]:
        return "no abusive clients"
    kinds = r["kinds"]
    what = "all four kinds" if set(kinds) == set(KINDS) else (
        "only " + kinds[0] if len(kinds) == 1 else "without " + ", ".join(k for k in KINDS if k not in kinds))
    return f"{sum(r['bad_counts'].values())} abusive clients ({what}, {r['bad_pool']} pool)"


def good_errors_text(pg):
    if "tps" not in pg and pg.get("rc") not in (0, None):
        first = next(iter(pg.get("error_messages", {})), "no message")
        return f"pgbench could not run: {first} (rc {pg.get('rc')})"
    if "tps" not in pg:
        return (f"no error, but no transaction either: pgbench ran {pg.get('wall_s')} s, its -T ran out while its "
                f"clients were still logging in ({pg.get('txns', 0)} transactions, rc {pg.get('rc')})")
    return (f"{pg['errors']} (aborted clients {pg.get('aborted_clients', 0)}, failed {pg.get('failed_txns') or 0}, "
            f"logged failed/skipped {pg.get('log_failed_or_skipped', 0)}, rc {pg.get('rc')})")


def verdicts(R, a):
    """[(target, figure, verdict, headline)]: headline rows are the targets of the issue;
    the others (each abusive kind alone, a shared pool without one kind) say which kind
    costs what."""
    out = []
    runs = {r["name"]: r for r in R.get("runs", [])}
    # The reference: the lower p99 of the two baselines (the stricter); a disturbed
    # reference makes a "met" inconclusive, a disturbed run a "not met".
    bases = [runs[n] for n in ("baseline", "baseline-again")
             if n in runs and runs[n]["pgbench"].get("latency_ms", {}).get("p99")]
    ref = min(bases, key=lambda r: r["pgbench"]["latency_ms"]["p99"]) if bases else None
    bp99 = ref["pgbench"]["latency_ms"]["p99"] if ref else None
    ref_d = bool(ref and ref.get("disturbed"))
    for r in R.get("runs", []):
        if not r["bad_pool"]:
            continue
        headline = set(r["kinds"]) == set(a.bad_kinds)
        pg = r["pgbench"]
        p99 = pg.get("latency_ms", {}).get("p99")
        tag = f"{a.good} good clients + {run_label(r, a)}"
        err_ok = pg["errors"] == 0 and "tps" in pg
        ratio = p99 / bp99 if (p99 is not None and bp99) else None
        out.append((f"{tag}: 0 errors among the good clients", good_errors_text(pg),
                    "met" if err_ok else "not met", headline))
        fig, vd = "no latency figure", "not met"
        if ratio is not None:
            fig = f"{ratio:.2f}× ({p99:.2f} vs {bp99:.2f} ms, {ref['name']})"
            if r.get("disturbed"):
                fig += f" ⚠ other processes used {r['cpu']['foreign_cpu_s']} CPU s during the run"
            if ref_d:
                fig += f" ⚠ the {ref['name']} was disturbed ({ref['cpu']['foreign_cpu_s']} CPU s of other processes)"
            if ratio <= 2.0:
                vd = "inconclusive (disturbed baseline)" if ref_d else "met"
            else:
                vd = "inconclusive (disturbed run)" if r.get("disturbed") else "not met"
        out.append((f"{tag}: p99 within 2× of the baseline", fig, vd, headline))
    if len(bases) == 2:
        p0, p1 = (x["pgbench"]["latency_ms"]["p99"] for x in bases)
        out.append(("the baseline at the start and again at the end (how much it moves by itself; the lower p99 "
                    "is the reference)", f"p99 {p0:.2f} and {p1:.2f} ms"
                    + "".join(f"; {x['name']} ⚠ disturbed" for x in bases if x.get("disturbed")), "info", True))
    per_run, over_any = [], {}
    for r in R.get("runs", []):
        sv = r["server"]
        if not sv.get("samples"):
            continue
        over = {u: n for u, n in sv.get("by_user_max", {}).items() if n > a.pool_size}
        if over:
            over_any[r["name"]] = over
        per_run.append(f"{r['name']} {max(sv.get('by_user_max', {0: 0}).values() or [0])}")
    if per_run:
        health = max(r["server"].get("health_max", 0) for r in R["runs"] if r["server"].get("samples"))
        out.append((f"overload runs: server connections ≤ pool_size ({a.pool_size}) per pool (user) + health checks",
                    "largest pool per run: " + ", ".join(per_run) + f"; health checks ≤ {health}",
                    "met" if not over_any else f"not met: {over_any}", True))
    st = R.get("storm")
    if st and st.get("result") and st["result"].get("phases"):
        for ph, pr in st["result"]["phases"].items():
            label = {"storm": f"storm of {st['clients']} on a cold proxy",
                     "after_restart": "after pg_ctl restart: queries on the existing connections",
                     "storm_again": f"storm of {st['clients']} again (warm proxy, restarted primary)"}.get(ph, ph)
            ne = sum(pr.get("errors", {}).values())
            if ph == "after_restart":
                out.append((f"{label}: 0 errors", f"{pr['served']}/{pr['clients']} first queries ok, {ne} errors "
                            f"{pr.get('errors') or ''}; after retries {pr['served'] + pr.get('retry_ok', 0)} ok",
                            "met" if ne == 0 else "not met", True))
            else:
                out.append((f"{label}: all served, 0 errors",
                            f"{pr['served']}/{pr['clients']} served, {ne} errors {pr.get('errors') or ''}; "
                            f"last first result at {pr.get('last_first_result_s')} s",
                            "met" if pr["served"] == pr["clients"] and ne == 0 else "not met", True))
            sv = st["phases"].get(ph, {}).get("server", {})
            if sv.get("samples"):
                mx = sv["pool_max"]
                out.append((f"{label}: server connections ≤ pool_size ({a.pool_size}) + health",
                            f"max {mx} pooled + {sv['health_max']} health ({sv['samples']} samples)",
                            "met" if mx <= a.pool_size else "not met", True))
    out.extend(fd_verdicts(R.get("fdlimit")))
    return out


def fd_verdicts(fd):
    """The fdlimit phase's targets: every client answered (served or 53300), none hung;
    refusals logged once per interval, not once per client; a client served after."""
    if not fd:
        return []
    res = fd.get("result") or {}
    lim, n = fd["limit"], fd["clients"]
    nofile = fd.get("proxy_nofile")
    applied = bool(nofile) and nofile[0] == lim and nofile[1] == lim
    tag = f"fd limit {lim}, {n} clients"
    if res.get("error"):
        return [(f"{tag}: every client answered (served or 53300), none hung", f"no result: {res['error'][:300]}",
                 "not met", True)]
    served, refused, other, hung = (res.get(k, 0) for k in ("served", "refused", "other", "hung"))
    fig = (f"{served} served, {refused} refused with 53300, {other} other errors"
           + (f" {res.get('other_errors')}" if other else "") + f", {hung} hung"
           + (f" {res.get('hung_where')}" if hung else "")
           + f"; last answer {res.get('last_answer_s')} s after the start; proxy RLIMIT_NOFILE {nofile}")
    if not fd.get("proxy_alive_at_end", True):
        fig += "; the proxy died"
    if not applied:
        vd = "not met (the limit was not applied to the proxy)"
    elif served + refused + other + hung != n:
        vd = f"not met ({n - served - refused - other - hung} clients unaccounted for)"
    elif hung or other or not fd.get("proxy_alive_at_end", True):
        vd = "not met"
    elif not refused:
        vd = "inconclusive (no client was refused: the limit was not reached)"
    else:
        vd = "met"
    out = [(f"{tag}: every client answered (served or 53300), none hung", fig, vd, True)]
    la = fd.get("log_analysis") or {}
    iv = la.get("interval_s", 10)
    kinds = "; ".join(f"{v['lines']} × “{k[:90]}” (at most {v['max_in_interval']} within {iv:g} s"
                      + (f", closest two {v['min_gap_s']} s apart" if v.get("min_gap_s") is not None else "")
                      + f", counts in them {v['counts_sum']:g})" for k, v in (la.get("per_kind") or {}).items())
    lp = res.get("late_probe") or {}
    fig = (f"{la.get('lines', 0)} lines for {refused + (lp.get('outcome') == 'refused')} refused clients"
           + (f" (per {iv:g}-s interval from the first: {la.get('per_interval')})" if la.get("per_interval") else "")
           + f"; at most {la.get('max_in_interval', 0)} within one interval in all"
           + (f": {kinds}" if kinds else "")
           + (f"; {la['untimed']} lines without a timestamp" if la.get("untimed") else ""))
    if not refused:
        vd = "inconclusive (no client was refused)"
    elif not la.get("lines"):
        vd = "not met (no line logged)"
    elif la.get("untimed"):
        vd = "inconclusive (lines without a timestamp)"
    elif la.get("max_in_interval_per_kind", 0) <= 1 and la["lines"] < refused:
        vd = "met"
    else:
        vd = "not met"
    out.append(("refusals logged once per interval (not once per client)", fig, vd, True))
    af = res.get("after") or {}
    att = af.get("attempts") or []
    if att:
        last = att[-1]
        fig = (f"{'served' if af.get('served') else 'not served'} at attempt {len(att)}, "
               f"{af.get('seconds_after_close')} s after the others closed ({last['ms']} ms for the last attempt)")
        if len(att) > 1 or not af.get("served"):
            fig += "; first attempt: " + (f"{att[0]['outcome']} at {att[0]['where']}: {att[0]['error']} "
                                          f"{att[0]['message'] or ''}".strip())
    else:
        fig = "not tried"
    out.append(("a client is served after the others leave", fig, "met" if af.get("served") else "not met", True))
    return out


def observations(R, a):
    """Sentences drawn from the figures (each with its evidence)."""
    out = []
    big = []
    runs0 = {r["name"]: r for r in R.get("runs", [])}
    for r in R.get("runs", []):
        if "big_query" in r.get("kinds", []):
            cw = r["server"].get("client_write_max", 0)
            ab = (r.get("abuse") or {}).get("kinds", {}).get("big_query", {}).get("counts", {})
            streaming = sum(n for k, n in ab.items() if "being streamed" in k)
            refused = sum(n for k, n in ab.items() if "53300" in k)
            samples = [x for x in r.get("activity_samples", [])
                       if r["pgbench"]["wall_start"] <= x["t"] <= r["pgbench"]["wall_end"]]
            held_all = bool(samples) and min(x["client_write"] for x in samples) == cw
            rss = r["proxy"].get("rss_kib", {}).get("max", 0) / 1024
            big.append(f"{r['name']}: {cw} in `ClientWrite`{' in every sample' if held_all else ' at most'}, "
                       f"{streaming} clients still being sent rows at the end, {refused} answered 53300, "
                       f"proxy RSS at most {rss:.1f} MiB")
    qt = sum(d for r in R.get("runs", []) if "big_query" in r.get("kinds", [])
             for k, d in r["metrics_delta"].items() if 'reason="query"' in k)
    if big:
        out.append("**Clients that stop reading** hold their pooled server connection until they disconnect: the "
                   "backend blocks sending the answer (pg_stat_activity `wait_event = ClientWrite`) and the proxy "
                   "does not buffer it (its RSS stays flat). Such a client is not idle in a transaction, and "
                   + (f"query_timeout_ms = {a.query_timeout_ms} is set, yet "
                      f"`switchyard_client_timeouts_total{{reason=\"query\"}}` grew by {qt:g} in these runs"
                      if a.query_timeout_ms else "query_timeout_ms is off in this config")
                   + f"; the big-query clients past the pool's {a.pool_size} connections waited for one and got 53300 "
                   "after checkout_timeout_ms. " + "; ".join(big)
                   + (f" (baseline: {runs0['baseline']['proxy'].get('rss_kib', {}).get('max', 0) / 1024:.1f} MiB)."
                      if "baseline" in runs0 else "."))
    for r in R.get("runs", []):
        if len(r.get("attempts", [])) > 1:
            out.append(f"**{r['name']}** was run {len(r['attempts'])} times because other processes on the machine "
                       "used CPU during it: " + "; ".join(
                           f"attempt {i + 1}: other processes {x['foreign_cpu_s']} CPU s, p99 {x['p99_ms']} ms"
                           for i, x in enumerate(r["attempts"])) + " (the least disturbed one is reported).")
        if r.get("kinds") == ["login_loop"]:
            ab = (r.get("abuse") or {}).get("kinds", {}).get("login_loop", {}).get("counts", {})
            logins = ab.get("logins", 0)
            waits = r["pool_wait"].get("count", 0)
            txns = r["pgbench"].get("log_txns", 0)
            if logins and waits > txns + logins / 2:
                out.append(f"**{r['name']}**: `switchyard_pool_wait_seconds_count` grew by {waits:,} for {txns:,} "
                           f"transactions of the good clients and {logins:,} logins of the login loop: in transaction "
                           f"pooling a login takes a pooled server connection (for the greeting's ParameterStatus), so "
                           f"a login storm competes for the pool with the transactions.")
            elif logins:
                base = runs0.get("baseline", {}).get("proxy_cpu_s")
                out.append(f"**{r['name']}**: `switchyard_pool_wait_seconds_count` grew by {waits:,} for {txns:,} "
                           f"transactions of the good clients and {logins:,} logins of the login loop: the logins "
                           f"took no pooled connection (greeted with the greeting remembered for their login), so "
                           f"what the loop costs the good clients is CPU: the proxy used "
                           f"{r.get('proxy_cpu_s', '?')} CPU s"
                           + (f" (baseline {base})" if base is not None else "")
                           + ", beside the loop's own SCRAM work and PostgreSQL on the same cores.")
        pg = r["pgbench"]
        if r["bad_pool"] and "tps" not in pg and pg.get("rc") == 0:
            pw = r["pool_wait"]
            cl = [x.get("clients") for x in r.get("proxy_samples", []) if x.get("clients") is not None
                  and pg["wall_start"] <= x["t"] <= pg["wall_end"]]
            out.append(f"**{r['name']}**: the good clients never got going: pgbench ran {pg.get('wall_s')} s and "
                       f"processed {pg.get('txns', 0)} transactions, its -T having run out while it was still logging "
                       f"in its {a.good} clients one after the other (the proxy's client gauge went from "
                       f"{cl[0] if cl else '?'} to {max(cl) if cl else '?'} while pgbench ran, abusive clients "
                       f"included). In transaction "
                       f"pooling a login waits for a pooled server connection, and the pool was held by clients idle "
                       f"in a transaction: {pw.get('count')} pool waits, mean {pw.get('mean_ms')} ms, "
                       f"{pw.get('over_s', {}).get('1.024', '?')} of them over 1 s.")
        for msg in pg.get("error_messages", {}):
            m = re.search(r"pool_size = (\d+)", msg)
            if m and int(m.group(1)) != a.pool_size:
                out.append(f"**{r['name']}**: the 53300 message says `pool_size = {m.group(1)}` while the config "
                           f"says {a.pool_size}: each of the proxy's worker threads has its own share of the pool "
                           f"(documented under proxy.threads), and a client waits for its own worker's share.")
                break
    runs = {r["name"]: r for r in R.get("runs", [])}
    t_, c_, b_ = runs.get("abuse-own-only-idle_txn"), runs.get(f"abuse-own-only-{CONTROL}"), runs.get("baseline")
    if t_ and c_ and b_:
        f = lambda r: r["pgbench"].get("latency_ms", {}).get("p99")
        g = lambda r: (r.get("server_sessions") or {}).get("started")
        to = (t_.get("abuse") or {}).get("kinds", {}).get("idle_txn", {}).get("counts", {}).get("ended by the proxy: 25P03", 0)
        out.append(f"**idle in transaction**: with the idle_transaction_timeout_ms ending {to} transactions, the good "
                   f"clients' p99 was {f(t_)} ms and the server saw {g(t_)} logins; with the same transactions "
                   f"committed by the clients just before the timeout ({CONTROL}) p99 was {f(c_)} ms with {g(c_)} "
                   f"server logins (baseline: {f(b_)} ms, {g(b_)} logins).")
    st = R.get("storm")
    if st and st.get("result", {}).get("phases"):
        pw = st["pool_wait"]
        out.append(f"**storm**: {pw.get('count', 0):,} pool checkouts for the storm phases (logins and "
                   f"`SELECT 1`s), mean wait {pw.get('mean_ms')} ms.")
    return out


def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_report(R, a, path_md):
    L = []
    add = L.append
    add(f"# Overload and connection storm — {R['started']}\n")
    add(f"`{R['argv']}` — wall time {R.get('wall_s', 0) / 60:.1f} min on {R['machine']['cores']} cores "
        f"({R['machine']['cpu_model']}, {R['machine']['mem_gib']} GiB), {R['machine']['os']}, kernel {R['machine']['kernel']}.")
    if R.get("failed"):
        add(f"\n**The run did not complete: {R['failed']}.** The figures below are what was measured before that.\n")
    if R.get("report_rewritten"):
        add(f"\n(This report was written again from the run's .json on {R['report_rewritten']} by "
            "`bench/overload --report-from`; the figures are those measured in the run.)")
    v = R.get("versions", {})
    if v.get("binary_older_than_head"):
        built = (f"binary {R['args']['binary']}, modified {v.get('binary_mtime')}, sha256 {v.get('binary_sha256_16')}…: "
                 f"older than the checked-out HEAD {v.get('commit', '')[:10]}; the newest commit before it is "
                 f"{v.get('newest_commit_before_binary', '')[:120]}")
    else:
        built = (f"commit {v.get('commit', '')[:10]} “{v.get('commit_subject', '')[:90]}”; binary {R['args']['binary']}, "
                 f"modified {v.get('binary_mtime')}, sha256 {v.get('binary_sha256_16')}…"
                 + ("; src/ has uncommitted changes" if v.get("tree_dirty_src") else ""))
    add(f"\nSwitchyard `{v.get('switchyard')}` ({built}), "
        f"{v.get('postgresql')}, {v.get('pgbench')}, Python {v.get('python')}. "
        f"RLIMIT_NOFILE of the bench (soft, hard): {R.get('nofile')}.\n")
    add("## Targets\n")
    add("The issue's targets: good clients see 0 errors and a p99 within 2× of the baseline while abusive "
        "clients run; server connections stay within the pool; a connection storm is served; under a "
        "file-descriptor limit the clients over it get 53300 (not a hang) and the log has one line per interval.\n")
    add("| target | figure | verdict |\n|---|---|---|")
    for t, f, vd, head in R.get("verdicts", []):
        if head:
            add(f"| {t} | {f} | **{vd}** |")
    diag = [x for x in R.get("verdicts", []) if not x[3]]
    if diag:
        add("\nThe same targets with one kind of abusive client at a time, and on the shared pool without the "
            "big queries (which kind costs what):\n")
        add("| run | figure | verdict |\n|---|---|---|")
        for t, f, vd, head in diag:
            add(f"| {t} | {f} | {vd} |")
    add("")
    if R.get("observations"):
        add("## Observations\n")
        add("Drawn from the figures below by the script.\n")
        for o in R["observations"]:
            add(f"- {o}")
        add("")
    if R.get("notes"):
        add("## Notes\n")
        add("Added to the run's .json by hand after reading the figures (and kept by `--report-from`); the "
            "separate runs they cite are not part of this report's figures.\n")
        for note in R["notes"]:
            add(f"- {note}")
        add("")

    # ---------------- overload
    if R.get("runs"):
        add("## 1. Overload: good clients beside abusive ones\n")
        add(f"pgbench -S at `--rate {a.rate:g}` (all {a.good} clients together), `-T {a.duration}` "
            f"(+{connect_allowance(a.good)} s for connecting), `-j {max(1, min(a.jobs, a.good))}`, `-M {a.protocol}`, SCRAM login; "
            f"latency from pgbench's per-transaction log: with `--rate` it runs from the transaction's *scheduled* "
            f"start, so it includes the schedule lag (time a client waited before it could start). "
            f"Abusive clients start {a.ramp:g} s before pgbench and run until it ends. "
            "Server connections: pg_stat_activity every second through a direct Unix-socket connection; "
            "*pooled* = every client backend but the proxy's health checks (`application_name` switchyard-*).\n")
        add("| run | abusive clients | tps | p50 ms | p99 ms | max ms | p99 lag ms | good-client errors | "
            "proxy RSS min/max/last MiB | proxy FDs min/max/last | server conns pooled max (per user) | health max | "
            "server logins | proxy CPU s |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in R["runs"]:
            pg = r["pgbench"]
            lat = pg.get("latency_ms", {})
            px = r["proxy"]
            rss = px.get("rss_kib", {})
            fds = px.get("fds", {})
            sv = r["server"]
            users = ", ".join(f"{u} {n}" for u, n in sorted(sv.get("by_user_max", {}).items()))
            bad = run_label(r, a) if r["bad_pool"] else "none"
            errs = pg["errors"] if "tps" in pg else (
                "pgbench could not run" if pg.get("rc") not in (0, None) else f"0 transactions in {pg.get('wall_s')} s")
            if r.get("disturbed"):
                errs = f"{errs} ⚠"
            add(f"| {r['name']} | {bad} | {_fmt(pg.get('tps'), 1)} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p99'))} | "
                f"{_fmt(lat.get('max'))} | {_fmt(pg.get('lag_ms', {}).get('p99'))} | {errs} | "
                f"{rss.get('min', 0) / 1024:.1f} / {rss.get('max', 0) / 1024:.1f} / {rss.get('last', 0) / 1024:.1f} | "
                f"{fds.get('min')} / {fds.get('max')} / {fds.get('last')} | {sv.get('pool_max')} ({users}) | "
                f"{sv.get('health_max')} | {(r.get('server_sessions') or {}).get('started', '–')} | {r['proxy_cpu_s']} |")
        add("")
        bases = [r for r in R["runs"] if not r["bad_pool"] and r["pgbench"].get("latency_ms", {}).get("p99")]
        if bases:
            ref = min(bases, key=lambda r: r["pgbench"]["latency_ms"]["p99"])
            bp = ref["pgbench"]["latency_ms"]["p99"]
            add(f"p99 against the lower of the baselines ({ref['name']}, {bp:.2f} ms); target ≤ 2× and 0 errors. "
                "⚠ marks a run during which other processes used more than --foreign-limit CPU s (after re-runs).\n")
            for r in R["runs"]:
                if r["bad_pool"]:
                    p = r["pgbench"].get("latency_ms", {}).get("p99")
                    if p:
                        add(f"- {r['name']}: **{p / bp:.2f}×**" + (" ⚠" if r.get("disturbed") else ""))
            add("")
        add("Service time (latency minus schedule lag, i.e. from the moment pgbench sent the transaction) "
            "and pgbench's own figures:\n")
        add("| run | service p50 ms | service p99 ms | pgbench latency avg ms | lag avg ms | transactions | "
            "initial connection time ms | machine busy CPU s | proxy CPU s | postgres CPU s | pgbench CPU s | "
            "abusive clients' CPU s | other processes' CPU s |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in R["runs"]:
            pg = r["pgbench"]
            sv = pg.get("service_ms", {})
            add(f"| {r['name']} | {_fmt(sv.get('p50'))} | {_fmt(sv.get('p99'))} | {_fmt(pg.get('pgbench_lat_avg_ms'))} | "
                f"{_fmt(pg.get('pgbench_lag_avg_ms'))} | {_fmt(pg.get('txns'))} | {_fmt(pg.get('conn_time_ms'))} | "
                f"{r['cpu']['busy_cpu_s']} | {r['proxy_cpu_s']} | {r['cpu']['postgres_cpu_s']} | {pg.get('pgbench_cpu_s')} | "
                f"{(r.get('abuse') or {}).get('cpu_s', '–')} | {r['cpu']['foreign_cpu_s']} {r['cpu']['foreign_top'] or ''} |")
        add("")
        for r in R["runs"]:
            pg = r["pgbench"]
            if pg.get("error_messages"):
                add(f"Errors of the good clients in **{r['name']}** (pgbench stderr, grouped):\n")
                add("```")
                for k, n in pg["error_messages"].items():
                    add(f"{n:6d} × {k}")
                add("```\n")
        for r in R["runs"]:
            ab = r.get("abuse")
            if not r["bad_pool"]:
                continue
            add(f"### {r['name']}: what the abusive clients saw\n")
            if not ab or ab.get("error"):
                add(f"No result from the abusive clients: {(ab or {}).get('error')}\n")
                continue
            add(f"{sum(r['bad_counts'].values())} clients: " + ", ".join(f"{n} × {k}" for k, n in r["bad_counts"].items())
                + (f"; logins as {', '.join(sorted(set(OWN_USERS[k] for k in r['kinds'] if k in OWN_USERS))) or 'nobody (no startup is ever finished)'} (own pools)"
                   if r["bad_pool"] == "own"
                   else f"; all logins as {BENCH_USER} (the good clients' pool)")
                + f". Driver CPU {ab.get('cpu_s')} s over {ab['stopped'] - ab['started']:.0f} s.\n")
            add("| kind | events | errors (where: SQLSTATE) | durations ms |")
            add("|---|---|---|---|")
            for k in ALL_KINDS:
                if k not in r["bad_counts"]:
                    continue
                kd = ab["kinds"][k]
                ev = "; ".join(f"{n} × {e}" for e, n in sorted(norm_messages(kd["counts"]).items(), key=lambda kv: -kv[1]))
                er = "; ".join(f"{n} × {e}" for e, n in sorted(norm_messages(kd["errors"]).items(),
                                                                key=lambda kv: -kv[1])) or "–"
                du = "; ".join(f"{e}: n {d['n']}, p50 {d.get('p50')}, p99 {d.get('p99')}, max {d.get('max')}"
                               for e, d in kd["durations_ms"].items() if d.get("n"))
                add(f"| {KIND_LABELS[k]} | {ev} | {er} | {du or '–'} |")
            add("")
            msgs = {}
            for k in ALL_KINDS:
                if k in ab["kinds"]:
                    msgs.update(ab["kinds"][k]["error_messages"])
            if msgs:
                add("Messages (one per error kind):\n")
                add("```")
                for k, m in list(msgs.items())[:12]:
                    add(f"{k}: {m}")
                add("```\n")
        add("### Over time\n")
        add("Windows from the first transaction of pgbench (the abusive clients were already running); "
            "maxima per window. *idle in txn* and *ClientWrite* are pooled server connections idle inside a "
            "transaction and blocked writing to the proxy.\n")
        for r in R["runs"]:
            add(f"**{r['name']}**\n")
            add("| s | tps | p50 ms | p99 ms | proxy RSS MiB | proxy FDs | clients (gauge) | server pooled | idle in txn | ClientWrite |")
            add("|---|---|---|---|---|---|---|---|---|---|")
            for w in r["timeline"]:
                add(f"| {w['from_s']:g}–{w['to_s']:g} | {_fmt(w['tps'], 0)} | {_fmt(w['p50_ms'])} | {_fmt(w['p99_ms'])} | "
                    f"{_fmt(w['rss_mib'], 1)} | {_fmt(w['fds'])} | {_fmt(w['clients'])} | {_fmt(w['server_pool'])} | "
                    f"{_fmt(w['idle_in_txn'])} | {_fmt(w['client_write'])} |")
            pa = r.get("proxy_after") or {}
            sa = r.get("server_after") or {}
            add(f"\n3 s after the run: proxy RSS {pa.get('rss_kib', 0) / 1024:.1f} MiB, {pa.get('fds')} FDs, "
                f"{pa.get('clients')} clients, {pa.get('servers')} server connections (gauges); "
                f"pg_stat_activity: {sa.get('pool_last', '–')} pooled.\n")
        add("### Counters from /metrics (growth over each run)\n")
        add("| run | counter | growth |")
        add("|---|---|---|")
        for r in R["runs"]:
            for k, d in sorted(r["metrics_delta"].items()):
                add(f"| {r['name']} | `{k}` | {d:g} |")
            pw = r["pool_wait"]
            add(f"| {r['name']} | pool waits (`switchyard_pool_wait_seconds`) | {pw.get('count')} waits, mean "
                f"{pw.get('mean_ms')} ms, p50 ≤ {pw.get('p50_le_s', '–')} s, p99 ≤ {pw.get('p99_le_s', '–')} s, "
                f"over: {pw.get('over_s', {})} |")
        add("")
        add("### Proxy log (warnings and errors, grouped)\n")
        for r in R["runs"]:
            add(f"**{r['name']}**: {r['log_problems']} lines" + (":" if r["log_problems"] else ".") + "\n")
            if r["log_messages"]:
                add("```")
                for k, n in r["log_messages"].items():
                    add(f"{n:6d} × {k[:260]}")
                add("```\n")

    # ---------------- storm
    st = R.get("storm")
    if st:
        add("## 2. Connection storm\n")
        res = st.get("result") or {}
        if res.get("error"):
            add(f"No result from the storm clients: {res['error']}\n")
        add(f"A freshly started proxy (same config, `max_clients` {2 * a.storm + 200 if not a.max_clients else a.max_clients}); "
            f"{st['clients']} asyncio clients ({'SCRAM, user ' + BENCH_USER if st['auth'] == 'scram' else 'trust, user ' + IDLE_USER}) "
            f"start within {st['spread_s']:g} s, each logs in, runs `SELECT 1` and keeps its connection until all "
            f"are done. pg_stat_activity every {a.storm_sample_ms} ms through a direct Unix-socket connection. "
            f"Client timeout {a.storm_timeout:g} s. Then"
            + (f" the primary is restarted (`pg_ctl restart -m fast -w`, {st['restart']['seconds']} s) while they are "
               "connected; as soon as it is back every client sends `SELECT 1` on its existing connection (on an "
               "error it retries every 100 ms, reconnecting if the connection is gone); then" if st.get("restart") else "")
            + " all disconnect, and after 1 s the same storm runs again against the now-warm proxy.\n")
        add("| phase | served | errors | time to last first result s | time to first result p50 / p99 / max ms | "
            "login p50 / p99 ms | server conns pooled max | health max | proxy FDs max | proxy RSS max MiB |")
        add("|---|---|---|---|---|---|---|---|---|---|")
        for ph, pr in (res.get("phases") or {}).items():
            sv = st["phases"].get(ph, {}).get("server", {})
            px = st["phases"].get(ph, {}).get("proxy", {})
            t = pr.get("time_to_first_result_ms", {})
            lg = pr.get("login_ms", {})
            ne = sum(pr.get("errors", {}).values())
            add(f"| {ph} | {pr['served']}/{pr['clients']} | {ne} | {_fmt(pr.get('last_first_result_s'), 3)} | "
                f"{_fmt(t.get('p50'), 1)} / {_fmt(t.get('p99'), 1)} / {_fmt(t.get('max'), 1)} | "
                f"{_fmt(lg.get('p50'), 1)} / {_fmt(lg.get('p99'), 1)} | {sv.get('pool_max')} | {sv.get('health_max')} | "
                f"{px.get('fds', {}).get('max')} | {px.get('rss_kib', {}).get('max', 0) / 1024:.1f} |")
        add("")
        ar = (res.get("phases") or {}).get("after_restart")
        if ar:
            add(f"After the restart: {ar['served']} of {ar['clients']} first queries succeeded on the existing "
                f"connection; {ar.get('retried')} clients retried, {ar.get('retry_ok')} of them then succeeded; "
                f"the last success came {ar.get('last_success_s')} s after the restart returned. "
                f"Retry errors: {ar.get('retry_errors') or 'none'}.\n")
        errs = {}
        for ph, pr in (res.get("phases") or {}).items():
            for k, n in pr.get("errors", {}).items():
                errs[f"{ph} — {k}"] = (n, pr.get("error_messages", {}).get(k, ""))
            for k, n in (pr.get("retry_errors") or {}).items():
                errs[f"{ph} (retries) — {k}"] = (n, pr.get("retry_error_messages", {}).get(k, ""))
        if errs:
            add("Errors by SQLSTATE (or socket error):\n")
            add("| phase — where: code | count | message |")
            add("|---|---|---|")
            for k, (n, m) in errs.items():
                add(f"| {k} | {n} | {m} |")
            add("")
        pb, pa = st.get("proxy_before") or {}, st.get("proxy_after") or {}
        add(f"Proxy before the storm: RSS {pb.get('rss_kib', 0) / 1024:.1f} MiB, {pb.get('fds')} FDs; "
            f"peak during: RSS {st['proxy_all'].get('rss_kib', {}).get('max', 0) / 1024:.1f} MiB, "
            f"{st['proxy_all'].get('fds', {}).get('max')} FDs; 2 s after the last client left: "
            f"RSS {pa.get('rss_kib', 0) / 1024:.1f} MiB, {pa.get('fds')} FDs. Proxy CPU {st['proxy_cpu_s']} s, "
            f"storm driver CPU {res.get('cpu_s')} s, postgres CPU {st['cpu']['postgres_cpu_s']} s"
            + (" (the restarted server only)" if st["cpu"].get("postgres_restarted") else "")
            + f"; the machine was busy {st['cpu']['busy_cpu_s']} CPU s in all, of which other processes "
            f"{st['cpu']['foreign_cpu_s']} s {st['cpu']['foreign_top'] or ''}.\n")
        if st.get("server_during_restart"):
            add(f"pg_stat_activity samples lost while the server restarted: {st['activity_gaps']}.\n")
        add("Counters from /metrics (growth over the storm phases):\n")
        for k, d in sorted(st["metrics_delta"].items()):
            add(f"- `{k}`: {d:g}")
        pw = st["pool_wait"]
        add(f"- pool waits: {pw.get('count')}, mean {pw.get('mean_ms')} ms, p50 ≤ {pw.get('p50_le_s', '–')} s, "
            f"p99 ≤ {pw.get('p99_le_s', '–')} s, over: {pw.get('over_s', {})}\n")
        add(f"Proxy log: {st['log_problems']} warning/error lines" + (":" if st["log_messages"] else ".") + "\n")
        if st["log_messages"]:
            add("```")
            for k, n in st["log_messages"].items():
                add(f"{n:6d} × {k[:260]}")
            add("```\n")

    # ---------------- fd limit
    fd = R.get("fdlimit")
    if fd:
        write_fd_section(add, fd)

    # ---------------- setup
    add("## Setup\n")
    add(f"- PostgreSQL primary: `initdb` in a temp dir, `max_connections = {a.max_connections}`, `fsync = off`, "
        f"`pgbench -i -s {a.scale}`; as root the servers run as `postgres`.")
    add(f"- Machine load: load average at the start {R.get('loadavg_start')}, at the end {R.get('loadavg_end')}; "
        f"waited {R.get('quiet_wait_total_s', 0)} s in all for other processes to go quiet (each run waits "
        "until they use under 15 % of a core, within the `--quiet-wait` budget, and a run during which they used more "
        f"than `--foreign-limit` ({a.foreign_limit}) CPU s is run again, up to `--max-reruns` ({a.max_reruns}) times in "
        "all); the CPU they used during each run is in the tables above. Everything (PostgreSQL, the proxy, pgbench, the abusive clients' driver) shares the "
        f"{R['machine']['cores']} cores.")
    add("- Abusive clients' SQL: (a) `BEGIN`, then `" + IDLE_TXN_SQL + "`; (b) `" + BIG_QUERY_SQL +
        "` (≈ 50 MB) on a socket with `SO_RCVBUF` 4 KiB, never read; (c) half send nothing, half send 8 bytes of "
        "a startup packet that announces 64; (d) SCRAM-SHA-256 login, Terminate, close.")
    if R.get("overload_config"):
        add("\nConfig of the overload proxy (`switchyard check` passed"
            + (f": {R['overload_check']}" if R.get("overload_check") else "") + "):\n")
        add("```toml\n" + R["overload_config"].strip() + "\n```\n")
    if R.get("storm_config") and R.get("storm_config") != R.get("overload_config"):
        add("The storm's proxy: the same, with `max_clients` as above (ports differ).\n")
    if R.get("runs"):
        add("Command lines of the good clients:\n")
        add("```")
        for r in R.get("runs", []):
            add(r["pgbench"]["command"])
        add("```\n")
    with open(path_md, "w") as f:
        f.write("\n".join(L) + "\n")


def write_fd_section(add, fd):
    res = fd.get("result") or {}
    lim, n = fd["limit"], fd["clients"]
    add("## 3. File-descriptor limit\n")
    st = fd.get("startup_warning") or {}
    add(f"A freshly started proxy (same config, `max_clients` {fd['max_clients']}, {fd['pool_mode']} pooling) with "
        f"RLIMIT_NOFILE {lim} soft and hard (set for it alone before its exec; it raises its soft limit to the hard "
        f"one at start, so both are needed); /proc/PID/limits said {fd.get('proxy_nofile')}. "
        + (f"Its start-up warning: fd_limit {st.get('fd_limit')}, needed {st.get('needed')}, room for "
           f"{st.get('clients')} clients. " if st else "No start-up warning about the descriptor limit in its log. ")
        + f"{n} asyncio clients (`bench/overload _fdlimit`, SCRAM as {BENCH_USER}) connect "
        + (f"within {fd['spread_s']:g} s" if fd.get("spread_s") else "at once") + ", each logs in "
        f"and runs `SELECT 1` within {fd['timeout_s']:g} s (else it counts as hung); the ones served keep their "
        f"connection {fd['hold_s']:g} s after the last answer, then one more client comes while they are still "
        "there (the late probe), then all close and after 1 s a new client must be served (retried every 0.5 s up "
        "to 10 s). The proxy's open FDs (`/proc/PID/fd`) and RSS every 100 ms.\n")
    if res.get("error"):
        add(f"No result from the clients: {res['error']}\n")
        return
    px = fd.get("proxy_during") or {}
    pa, pb = fd.get("proxy_answering") or {}, fd.get("proxy_before") or {}
    aft = fd.get("proxy_after") or {}
    add("| served | refused 53300 | other errors | hung | time to the last answer s | served: time to result "
        "p50 / max ms | refused: time to 53300 p50 / max ms | open after the hold | proxy FDs before / max / after "
        "| proxy RSS before / max / after MiB |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    sv, rf = res.get("served_ms") or {}, res.get("refused_ms") or {}
    add(f"| {res.get('served')} | {res.get('refused')} | {res.get('other')} | {res.get('hung')} | "
        f"{_fmt(res.get('last_answer_s'), 3)} | {_fmt(sv.get('p50'), 1)} / {_fmt(sv.get('max'), 1)} | "
        f"{_fmt(rf.get('p50'), 1)} / {_fmt(rf.get('max'), 1)} | {res.get('still_open_after_hold')} of "
        f"{res.get('served')} | {pb.get('fds')} / {px.get('fds', {}).get('max')} / {aft.get('fds')} | "
        f"{(pb.get('rss_kib') or 0) / 1024:.1f} / {(px.get('rss_kib') or {}).get('max', 0) / 1024:.1f} / "
        f"{(aft.get('rss_kib') or 0) / 1024:.1f} |")
    add("")
    tc = res.get("tcp_connect_ms") or {}
    if tc:
        add("TCP connect alone (a SYN that finds the listen backlog full is retransmitted by the client's kernel "
            "after 1 s, then 3 s, ...), p50 / p99 / max ms: "
            + "; ".join(f"{k} {_fmt(v.get('p50'), 1)} / {_fmt(v.get('p99'), 1)} / {_fmt(v.get('max'), 1)}"
                        for k, v in tc.items() if v.get("n")) + ".\n")
    fr = res.get("first_refusal")
    if fr:
        add(f"The first refusal ({fr['after_s']} s after the start, at {fr['where']}): “{fr['message']}”.\n")
    rm = res.get("refused_messages") or {}
    if len(rm) > 1 or res.get("refused_where"):
        add("53300 by message (numbers as N): " + "; ".join(f"{c} × “{m}”" for m, c in rm.items())
            + f"; by stage: {res.get('refused_where')}.\n")
    if res.get("other"):
        add("Other errors: " + "; ".join(f"{c} × {k} ({(res.get('other_messages') or {}).get(k, '')})"
                                         for k, c in res["other_errors"].items()) + ".\n")
    if res.get("hung"):
        add(f"Hung clients by the stage they were in at {fd['timeout_s']:g} s: {res.get('hung_where')}.\n")
    lp = res.get("late_probe")
    if lp:
        add(f"Late probe (while the served clients were still connected): {lp['outcome']} in {lp['ms']} ms"
            + (f" ({lp['where']}: {lp['error']} {lp.get('message') or ''})" if lp.get("error") else "") + ".\n")
    if fd.get("fds_timeline"):
        add("Proxy FDs / RSS MiB per second from the start (max in each second): "
            + ", ".join(f"{s_}: {f_} / {r_:g}" for s_, f_, r_ in fd["fds_timeline"]) + ".\n")
    la = fd.get("log_analysis") or {}
    add(f"Proxy log lines that mention {', '.join(repr(w) for w in FD_LOG_WORDS)} from the start of the clients "
        f"on: {la.get('lines', 0)}; at most {la.get('max_in_interval', 0)} within one {la.get('interval_s', 10):g}-s "
        f"interval (all kinds together), at most {la.get('max_in_interval_per_kind', 0)} of one kind"
        + (f"; per interval from the first line: {la.get('per_interval')}" if la.get("per_interval") else "")
        + ". Sum of the counts the lines carry, per kind: "
        + ("; ".join(f"“{k[:100]}” {v['counts_sum']:g} in {v['lines']} lines" for k, v in la.get("per_kind", {}).items())
           or "–") + ".\n")
    lines = fd.get("log_lines") or []
    if lines:
        add("The first lines of each kind:\n")
        add("```")
        shown = {}
        for x in lines:
            k = x["kind"]
            shown[k] = shown.get(k, 0) + 1
            if shown[k] <= 3 and x.get("text"):
                add(x["text"][:600])
        for k, c in shown.items():
            if c > 3:
                add(f"... and {c - 3} more lines “{k[:100]}”")
        add("```\n")
    if st.get("text"):
        add("The start-up warning:\n")
        add("```\n" + st["text"][:700] + "\n```\n")
    add("Counters from /metrics (growth over the phase):\n")
    for k, d in sorted((fd.get("metrics_delta") or {}).items()):
        add(f"- `{k}`: {d:g}")
    add("")
    add(f"Proxy log: {fd.get('log_problems', 0)} warning/error lines in all" + (":" if fd.get("log_messages") else ".") + "\n")
    if fd.get("log_messages"):
        add("```")
        for k, c in fd["log_messages"].items():
            add(f"{c:6d} × {k[:260]}")
        add("```\n")
    cpu = fd.get("cpu") or {}
    add(f"Proxy CPU {fd.get('proxy_cpu_s')} s, client driver CPU {res.get('cpu_s')} s, postgres CPU "
        f"{cpu.get('postgres_cpu_s')} s, other processes {cpu.get('foreign_cpu_s')} s {cpu.get('foreign_top') or ''}.\n")
    if fd.get("check_output"):
        add("`switchyard check` under the same limit:\n")
        add("```\n" + fd["check_output"][:1200] + "\n```\n")


def binary_versions(a, binary):
    import hashlib

    git = lambda *x: sh(["git", "-C", REPO] + list(x))
    with open(binary, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    mtime = os.path.getmtime(a.binary)
    mt = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    head_time = int(git("log", "-1", "--format=%ct") or 0)
    return {"switchyard": sh([binary, "--version"]), "commit": git("rev-parse", "HEAD"),
            "commit_subject": git("log", "-1", "--format=%s"),
            "binary_older_than_head": head_time > mtime,
            "newest_commit_before_binary": git("log", "-1", f"--before={int(mtime)}", "--format=%h %ci %s"),
            "tree_dirty_src": bool(git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")),
            "binary_sha256_16": digest, "binary_mtime": mt.strftime("%Y-%m-%d %H:%M UTC"),
            "postgresql": sh([os.path.join(a.pg_bin, "postgres"), "--version"]),
            "pgbench": sh(["pgbench", "--version"]), "python": sys.version.split()[0]}


def report_from(path):
    """Verdicts, observations and the markdown again from a saved .json (the figures as
    they were measured; the options of that run)."""
    with open(path) as f:
        R = json.load(f)
    a = parse_args([])
    for k, v in R.get("args", {}).items():
        setattr(a, k, v)
    for r in R.get("runs", []):
        r["log_messages"] = norm_messages(r.get("log_messages", {}))
    if R.get("storm"):
        R["storm"]["log_messages"] = norm_messages(R["storm"].get("log_messages", {}))
    if R.get("fdlimit"):
        R["fdlimit"]["log_messages"] = norm_messages(R["fdlimit"].get("log_messages", {}))
        R["fdlimit"]["log_analysis"] = fd_log_analysis(R["fdlimit"].get("log_lines", []), a.fd_log_interval)
    R["verdicts"] = verdicts(R, a)
    R["observations"] = observations(R, a)
    R["report_rewritten"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = os.path.splitext(path)[0] + ".md"
    write_report(R, a, md)
    with open(path, "w") as f:
        json.dump(R, f, indent=1, default=str)
    for t, fig, vd, head in R["verdicts"]:
        print(f"  [{vd.upper()}]{'' if head else ' (diagnostic)'} {t}: {fig}")
    log(f"report written again: {md}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_abuse", "_storm", "_fdlimit"):
        return worker_main(argv[0], argv[1])
    a = parse_args(argv)
    if a.report_from:
        return report_from(a.report_from)
    install_signal_handlers()
    nofile = raise_nofile_to_hard()
    missing = [t for t in ("pgbench", "psql") if not shutil.which(t)]
    if missing:
        print(f"bench/overload needs {', '.join(missing)}: apt-get install -y postgresql-client", file=sys.stderr)
        return 2
    if not os.access(a.binary, os.X_OK):
        print(f"Switchyard binary {a.binary} not found (cargo build --release, or --binary)", file=sys.stderr)
        return 2
    from .main import machine_info

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.time()
    b = Overload(a)
    R = b.results
    R.update({"machine": machine_info(), "nofile": list(nofile), "started": started.strftime("%Y-%m-%d %H:%M UTC"),
              "argv": "bench/overload " + " ".join(shlex.quote(x) for x in argv),
              "loadavg_start": open("/proc/loadavg").read().split()[:3]})
    failed = None
    try:
        b.binary = os.path.join(b.tmp, "switchyard")
        shutil.copy2(a.binary, b.binary)
        R["versions"] = binary_versions(a, b.binary)
        b.setup_cluster()
        if not a.skip_overload:
            b.overload()
        if not a.skip_storm:
            b.storm()
        if not a.skip_fdlimit:
            b.fdlimit()
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
        if a.keep_tmp or failed:
            log(f"temp dir kept: {b.tmp}")
        else:
            shutil.rmtree(b.tmp, ignore_errors=True)
    R["wall_s"] = round(time.time() - t0, 1)
    R["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    R["quiet_wait_total_s"] = round(a.quiet_wait - b.quiet_budget, 1)
    R["args"] = vars(a)
    if failed:
        R["failed"] = failed
    R["verdicts"] = verdicts(R, a)
    R["observations"] = observations(R, a)
    if not R["runs"] and not R["storm"] and not R["fdlimit"]:
        log("nothing measured; no results written")
        return 1
    os.makedirs(a.out_dir, exist_ok=True)
    name = f"{started.strftime('%Y-%m-%d')}-{re.sub(r'[^A-Za-z0-9._-]+', '-', a.name)}" + ("-incomplete" if failed else "")
    md = os.path.join(a.out_dir, name + ".md")
    write_report(R, a, md)
    with open(os.path.join(a.out_dir, name + ".json"), "w") as f:
        json.dump(R, f, indent=1, default=str)
    print()
    for t, fig, vd, head in R["verdicts"]:
        print(f"  [{vd.upper()}]{'' if head else ' (diagnostic)'} {t}: {fig}")
    log(f"results: {md} (wall time {R['wall_s'] / 60:.1f} min)")
    return 1 if failed else 0
