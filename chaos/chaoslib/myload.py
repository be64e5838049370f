"""Background load for `--engine mariadb` (no pgbench): a child process in the proxy's
namespace (`chaos/run --load-child SPEC`), PyMySQL threads, rate-limited:

  update-rw   `UPDATE chaos_load SET v = v + 1 WHERE id = ?` then `SELECT v` (rw),
  select-ro   `SELECT v FROM chaos_load WHERE id = ?` (ro),

half the clients and half the rate each (and through each instance, with two). A client
whose statement fails reconnects. Its counts (transactions, errors by error number)
are written to SPEC["out"] at the end; they are reported, not judged.
"""

import json
import random
import signal
import threading
import time

import pymysql

from .myworkload import classify  # noqa: F401  (installs the SQLSTATE-keeping error hook)
from .mariadb import LOAD_ROWS

STREAMS = ("update-rw", "select-ro")


class MyLoad:
    def __init__(self, spec):
        self.spec = spec
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.stats = {}

    def count(self, stream, key):
        with self.lock:
            s = self.stats.setdefault(stream, {"runs": 0, "txns": 0, "failed": 0, "aborted_clients": 0,
                                               "error_lines": 0, "nonzero_exit": 0, "sample_errors": [],
                                               "errors": {}})
            if key is None:
                s["txns"] += 1
            else:
                s["failed"] += 1
                s["errors"][key] = s["errors"].get(key, 0) + 1

    def client(self, stream, inst, rate):
        s = self.spec
        rnd = random.Random()
        conn = None
        interval = 1.0 / rate if rate else 0.0
        nxt = time.time()
        port = inst["rw"] if stream == "update-rw" else inst["ro"]
        while not self.stop.is_set() and time.time() < s["end_time"]:
            if conn is None:
                try:
                    conn = pymysql.connect(host=inst["host"], port=port, user=s["user"], password=s["password"],
                                           database=s["db"], autocommit=True, connect_timeout=5,
                                           read_timeout=10, write_timeout=10)
                except Exception as e:
                    self.count(stream, "connect " + classify(e)[1])
                    self.stop.wait(0.3)
                    continue
            i = rnd.randint(1, LOAD_ROWS)
            try:
                cur = conn.cursor()
                if stream == "update-rw":
                    cur.execute(f"UPDATE chaos_load SET v = v + 1 WHERE id = {i}")
                cur.execute(f"SELECT v FROM chaos_load WHERE id = {i}")
                cur.fetchall()
                self.count(stream, None)
            except Exception as e:
                o, key, msg = classify(e)
                self.count(stream, key)
                with self.lock:
                    se = self.stats[stream]["sample_errors"]
                    if len(se) < 4 and f"{key} {msg[:100]}" not in se:
                        se.append(f"{key} {msg[:100]}")
                try:
                    conn.close()
                except Exception:
                    pass
                conn = None
                self.stop.wait(0.2)
                continue
            if interval:
                nxt += interval * rnd.uniform(0.5, 1.5)
                delay = nxt - time.time()
                if delay > 0:
                    self.stop.wait(delay)
                else:
                    nxt = time.time()
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def main(self):
        s = self.spec
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        insts = s["instances"]
        parts = len(STREAMS) * len(insts)
        per = max(1, s["clients"] // parts)
        rate_each = (s["rate"] / (parts * per)) if s["rate"] else 0
        threads = []
        for stream in STREAMS:
            for inst in insts:
                for _ in range(per):
                    threads.append(threading.Thread(target=self.client, args=(stream, inst, rate_each), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, s["end_time"] - time.time() + 30))
        with self.lock:
            for v in self.stats.values():
                v["runs"] = per * len(insts)
            with open(s["out"], "w") as f:
                json.dump(self.stats, f)


def child_main(spec):
    return MyLoad(spec).main() or 0


class LoadChild:
    """The harness's side: start the load child in the proxy's namespace, stop it, read
    its counts (the same shape as load.Load.summary(), plus errors by number)."""

    def __init__(self, net, proxies, clients, rate, end_time, workdir, user, password, db):
        import os
        self.net, self.proxies = net, proxies
        self.clients, self.rate, self.end_time = clients, rate, end_time
        self.spec_path = os.path.join(workdir, "load.json")
        self.out = os.path.join(workdir, "load-summary.json")
        self.log = os.path.join(workdir, "load.log")
        self.user, self.password, self.db = user, password, db
        self.child = None

    def start(self):
        import os
        import subprocess
        import sys
        from .common import log
        if self.clients <= 0:
            return
        spec = {"instances": [{"name": p.name, "host": p.host, "rw": p.rw, "ro": p.ro} for p in self.proxies],
                "clients": self.clients, "rate": self.rate, "end_time": self.end_time, "out": self.out,
                "user": self.user, "password": self.password, "db": self.db}
        with open(self.spec_path, "w") as f:
            json.dump(spec, f)
        chaos_run = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run")
        argv = self.net.prefix("px") + [sys.executable, chaos_run, "--load-child", self.spec_path]
        out = open(self.log, "ab")
        self.child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        out.close()
        per = max(1, self.clients // (len(STREAMS) * len(self.proxies)))
        log(f"load: PyMySQL {', '.join(STREAMS)} with {per} clients each"
            + (f" through each of {', '.join(p.name for p in self.proxies)}" if len(self.proxies) > 1 else "")
            + (f", {self.rate} tps in all" if self.rate else ", unthrottled") + f" (pid {self.child.pid})")

    def stop(self):
        import subprocess
        if self.child is None or self.child.poll() is not None:
            return
        try:
            self.child.wait(max(5.0, self.end_time - time.time() + 40))
        except subprocess.TimeoutExpired:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(15)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(5)

    def kill(self):
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait(5)

    def summary(self):
        try:
            with open(self.out) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
