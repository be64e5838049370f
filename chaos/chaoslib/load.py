"""Background load: pgbench through the proxy (TPC-B-like on rw, select-only on rw with
splitting and on ro), run in short chunks inside the proxy's namespace.

PostgreSQL 15's pgbench aborts a client on any connection error and does not
reconnect, so a fault would leave a run with fewer and fewer clients; running in
chunks of `chunk_s` restarts the full set after each one. Each chunk is bounded by -T
and by a subprocess timeout. Rate-limited (-R) so that on a small machine the load
stresses the proxy without starving the health checks and the recorded workload of
CPU (0: unthrottled).

With two Switchyard instances every stream runs through each of them, with half the
clients and half the rate each (results are per stream, both instances together).
"""

import os
import re
import threading
import time

from .cluster import DB, PASSWORD, USER
from .common import log, run

STREAMS = {
    "tpcb": {"args": [], "endpoint": "rw"},
    "select-split": {"args": ["-S"], "endpoint": "rw"},
    "select-ro": {"args": ["-S"], "endpoint": "ro"},
}


class Load:
    def __init__(self, net, proxies, clients, rate, end_time, chunk_s=15):
        self.net, self.proxies = net, proxies
        self.clients, self.rate, self.end_time, self.chunk_s = clients, rate, end_time, chunk_s
        self.results = []
        self.threads = []
        self._stop = threading.Event()

    def start(self):
        if self.clients <= 0:
            return
        # Split the clients over the streams and the instances (at least one each).
        parts = len(STREAMS) * len(self.proxies)
        per = max(1, self.clients // parts)
        self.part_rate = max(1, self.rate // parts) if self.rate else 0
        for name in STREAMS:
            for proxy in self.proxies:
                t = threading.Thread(target=self._loop, args=(name, per, proxy), daemon=True)
                t.start()
                self.threads.append(t)
        log(f"load: pgbench {', '.join(STREAMS)} with {per} clients each"
            + (f" through each of {', '.join(p.name for p in self.proxies)}" if len(self.proxies) > 1 else "")
            + (f", {self.part_rate} tps each" if self.rate else ", unthrottled"))

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(60)

    def _loop(self, name, clients, proxy):
        st = STREAMS[name]
        port = proxy.rw if st["endpoint"] == "rw" else proxy.ro
        while not self._stop.is_set():
            left = self.end_time - time.time()
            if left < 3:
                return
            dur = int(min(self.chunk_s, left))
            argv = self.net.prefix("px") + [
                "pgbench", "-h", proxy.host, "-p", str(port), "-U", USER, "-n", "-M", "simple",
                "-c", str(clients), "-j", str(min(2, clients)), "-T", str(dur), *st["args"]]
            if self.rate:
                argv += ["-R", str(self.part_rate)]
            argv.append(DB)
            t0 = time.time()
            p = run(argv, timeout=dur + 30, check=False,
                    env=dict(os.environ, PGPASSWORD=PASSWORD, PGCONNECT_TIMEOUT="5", PGAPPNAME=f"chaos-{name}"))
            self.results.append(self._parse(name, t0, time.time(), p))
            if self._stop.wait(0.5):
                return

    @staticmethod
    def _parse(name, t0, t1, p):
        out = {"stream": name, "s": t0, "e": t1, "rc": p.returncode}
        m = re.search(r"number of transactions actually processed: (\d+)", p.stdout or "")
        out["txns"] = int(m.group(1)) if m else 0
        m = re.search(r"number of failed transactions: (\d+)", p.stdout or "")
        out["failed"] = int(m.group(1)) if m else 0
        m = re.search(r"^tps = ([\d.]+)", p.stdout or "", re.M)
        out["tps"] = float(m.group(1)) if m else None
        err = p.stderr or ""
        out["aborted_clients"] = len(re.findall(r"client \d+ aborted", err))
        states = re.findall(r"(?:SQLSTATE|sqlstate)[ :]+([0-9A-Z]{5})", err)
        out["errors"] = [l.strip()[:200] for l in err.splitlines()
                         if "error" in l.lower() or "fatal" in l.lower()][:5]
        out["error_lines"] = sum(1 for l in err.splitlines() if "error" in l.lower() or "fatal" in l.lower())
        out["sqlstates"] = sorted(set(states))
        return out

    def summary(self):
        by = {}
        for r in self.results:
            s = by.setdefault(r["stream"], {"runs": 0, "txns": 0, "failed": 0, "aborted_clients": 0,
                                            "error_lines": 0, "nonzero_exit": 0, "sample_errors": []})
            s["runs"] += 1
            s["txns"] += r["txns"]
            s["failed"] += r["failed"]
            s["aborted_clients"] += r["aborted_clients"]
            s["error_lines"] += r["error_lines"]
            s["nonzero_exit"] += 1 if r["rc"] not in (0,) else 0
            for e in r["errors"]:
                if len(s["sample_errors"]) < 4 and e not in s["sample_errors"]:
                    s["sample_errors"].append(e)
        return by
