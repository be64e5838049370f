"""The recorded workload for `--engine mariadb`: a child process started inside the
proxy's namespace (`chaos/run --workload-child SPEC`, spec["engine"] = "mariadb"), one
thread and one PyMySQL connection per client, every operation a JSON line with its
start and end time (the same records as workload.py, where they apply).

Outcomes of a write (autocommit, one INSERT):
  ack   the INSERT's OK packet arrived: committed;
  fail  a server error (ERR packet) that is not one of the ones below: not committed;
  unk   the connection broke or timed out after the statement was sent (PyMySQL errors
        2000+), or the ERR said the server connection was lost or killed (1158, 1053,
        1927) or carried an SQLSTATE of class 08: it may or may not have committed.

A write is an explicit transaction in three round trips:
  1. `BEGIN; INSERT ...; SELECT @@bind_address, @@port, @@server_id,
     @@gtid_binlog_state` (multi-statement): which server took it and the binlog state
     its commit will extend (which transactions its history holds: the checker's write
     order rule). Any error here is `fail`: no COMMIT was sent, so nothing committed.
  2. `COMMIT`: its OK is the acknowledgement; errors are classified as above.
  3. `SELECT @@last_gtid, <Rpl_semi_sync_master_status>`: the GTID the write got and
     whether semi-sync was on on that server right after. Lost only if the session
     dies right after the COMMIT's OK (the write stays acknowledged, without a GTID).

Record kinds: w (insert through rw), raw_w + raw_own (a write through rw, read back on
the same session: read-your-writes), r (a read-only probe on ro), c (connect failure),
st / ev (Switchyard's /status, as in workload.py, plus each node's `remark`).
With two instances every record names its instance (`sy`), as in workload.py.
"""

import json
import signal
import struct
import threading
import time
import urllib.request

import pymysql
from pymysql import err as pymysql_err
from pymysql.constants import CLIENT

ID_BASE = 1_000_000_000
FACTS_SQL = "SELECT @@bind_address, @@port, @@server_id, @@gtid_binlog_state"
AFTER_SQL = ("SELECT @@last_gtid, (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
             "WHERE VARIABLE_NAME = 'RPL_SEMI_SYNC_MASTER_STATUS')")
UNKNOWN_ERRNOS = {1053, 1158, 1159, 1160, 1161, 1927}


def _raise_with_sqlstate(data):
    """pymysql.err.raise_mysql_exception, keeping the SQLSTATE (PyMySQL drops it)."""
    errno = struct.unpack("<h", data[1:3])[0]
    sqlstate = None
    if data[3] == 0x23:
        sqlstate = data[4:9].decode(errors="replace")
        errval = data[9:].decode("utf-8", "replace")
    else:
        errval = data[3:].decode("utf-8", "replace")
    cls = pymysql_err.error_map.get(errno)
    if cls is None:
        cls = pymysql_err.InternalError if errno < 1000 else pymysql_err.OperationalError
    e = cls(errno, errval)
    e.sqlstate = sqlstate
    raise e


pymysql_err.raise_mysql_exception = _raise_with_sqlstate


def classify(e):
    """(outcome, key, message) of an exception raised by a statement that was sent."""
    errno = e.args[0] if getattr(e, "args", None) and isinstance(e.args[0], int) else None
    msg = str(e.args[1] if getattr(e, "args", None) and len(e.args) > 1 else e)
    ss = getattr(e, "sqlstate", None)
    key = f"{errno}" + (f" {ss}" if ss else "") if errno is not None else type(e).__name__
    if errno is None or errno >= 2000 or errno in UNKNOWN_ERRNOS or (ss or "").startswith("08"):
        return "unk", key, msg
    return "fail", key, msg


class Recorder:
    def __init__(self, path):
        self.path = path
        self.buf = []
        self.lock = threading.Lock()

    def add(self, rec):
        with self.lock:
            self.buf.append(rec)

    def flush(self):
        with self.lock:
            buf, self.buf = self.buf, []
        if buf:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in buf))


class MyWorkload:
    def __init__(self, spec):
        self.spec = spec
        self.rec = Recorder(spec["out"])
        self.stop = threading.Event()
        self.ops = 0
        self.ops_lock = threading.Lock()
        self.instances = spec.get("instances") or [
            {"name": "switchyard", "host": spec["host"], "rw": spec["rw"], "ro": spec["ro"], "admin": spec["admin"]}]
        self.tagged = len(self.instances) > 1

    def inst(self, i):
        return self.instances[i % len(self.instances)]

    def tag(self, rec, inst):
        if self.tagged:
            rec["sy"] = inst["name"]
        return rec

    def done(self):
        return self.stop.is_set() or time.time() >= self.spec["end_time"] or self.ops >= self.spec["max_ops"]

    def connect(self, inst, who, endpoint):
        s = self.spec
        t0 = time.time()
        try:
            return pymysql.connect(host=inst["host"], port=inst[endpoint], user=s["user"], password=s["password"],
                                   database=s["db"], autocommit=True, connect_timeout=s["connect_timeout"],
                                   read_timeout=s["op_timeout"], write_timeout=s["op_timeout"],
                                   client_flag=CLIENT.MULTI_STATEMENTS)
        except Exception as e:
            _, key, msg = classify(e)
            self.rec.add(self.tag({"k": "c", "wk": who, "ep": endpoint, "s": t0, "e": time.time(), "o": "fail",
                                   "st": key, "err": msg[:200]}, inst))
            time.sleep(0.1)
            return None

    def _count(self):
        with self.ops_lock:
            self.ops += 1

    def write(self, conn, sql, rec):
        """One write in three round trips (module docstring). Fills `rec`; returns
        whether the connection is still usable."""
        cur = conn.cursor()
        rec["s"] = time.time()
        usable = True
        try:
            try:
                cur.execute("BEGIN; " + sql + "; " + FACTS_SQL)
                cur.nextset()
                cur.nextset()
                host, port, sid, bstate = cur.fetchone()
                facts = {"node": f"{host}:{port}", "sid": int(sid), "bst": bstate}
            except Exception as e:
                # No COMMIT was sent: not committed, whatever broke.
                _, key, msg = classify(e)
                rec.update({"o": "fail", "st": key, "err": msg[:200], "e": time.time(), "phase": 1})
                try:
                    cur.execute("ROLLBACK")
                except Exception:
                    usable = False
                return usable
            try:
                cur.execute("COMMIT")
            except Exception as e:
                o, key, msg = classify(e)
                rec.update({"o": o, "st": key, "err": msg[:200], "e": time.time(), "phase": 2})
                rec.update(facts)  # where it went, had it committed
                return o != "unk"
            rec["o"] = "ack"
            rec["e"] = time.time()
            rec.update(facts)
            try:
                cur.execute(AFTER_SQL)
                gtid, semi = cur.fetchone()
                if gtid:
                    rec["gtid"] = gtid
                if semi is not None:
                    rec["semi"] = semi
            except Exception as e:  # acknowledged; only its GTID is unknown
                rec["after_err"] = f"{type(e).__name__} {e}"[:120]
                usable = False
        finally:
            self._count()
            self.rec.add(rec)
        return usable

    def query(self, conn, sql, rec):
        cur = conn.cursor()
        rec["s"] = time.time()
        try:
            cur.execute(sql)
            rows = cur.fetchall()
            rec["o"] = "ack"
            return rows, True
        except Exception as e:
            o, key, msg = classify(e)
            rec.update({"o": o, "st": key, "err": msg[:200]})
            return None, o != "unk"
        finally:
            rec["e"] = time.time()
            self._count()
            self.rec.add(rec)

    @staticmethod
    def close(conn):
        try:
            conn.close()
        except Exception:
            pass

    # ---- (a) inserts of unique ids -------------------------------------------------------------
    def inserter(self, w):
        conn, seq = None, 0
        pause = self.spec["pause_ms"] / 1000
        inst = self.inst(w)
        while not self.done():
            if conn is None:
                conn = self.connect(inst, f"w{w}", "rw")
                if conn is None:
                    continue
            seq += 1
            rid = (w + 1) * ID_BASE + seq
            rec = self.tag({"k": "w", "id": rid, "wk": w}, inst)
            if not self.write(conn, f"INSERT INTO chaos_writes (id, worker) VALUES ({rid}, {w})", rec):
                self.close(conn)
                conn = None
            time.sleep(pause)
        if conn:
            self.close(conn)

    # ---- (b) read-your-writes on one rw session ----------------------------------------------------
    def raw_pair(self, p):
        conn, seq = None, 0
        pause = self.spec["pause_ms"] / 1000
        inst = self.inst(p)
        while not self.done():
            time.sleep(pause)
            if conn is None:
                conn = self.connect(inst, f"raw{p}w", "rw")
                if conn is None:
                    continue
            seq += 1
            rid = (p + 1) * ID_BASE + seq
            rec = self.tag({"k": "raw_w", "id": rid, "wk": p}, inst)
            usable = self.write(conn, f"INSERT INTO chaos_raw (id) VALUES ({rid})", rec)
            if rec["o"] != "ack" or not usable:
                if not usable:
                    self.close(conn)
                    conn = None
                continue
            rec = self.tag({"k": "raw_own", "id": rid, "wk": p}, inst)
            rows, usable = self.query(conn, f"SELECT count(*), @@bind_address, @@port FROM chaos_raw WHERE id = {rid}",
                                      rec)
            if rows:
                rec["n"] = int(rows[0][0])
                rec["node"] = f"{rows[0][1]}:{rows[0][2]}"
            if not usable:
                self.close(conn)
                conn = None
        if conn:
            self.close(conn)

    # ---- read availability -----------------------------------------------------------------------------
    def ro_probe(self, p):
        conn = None
        pause = self.spec["pause_ms"] / 1000
        inst = self.inst(p)
        while not self.done():
            if conn is None:
                conn = self.connect(inst, f"r{p}", "ro")
                if conn is None:
                    continue
            rec = self.tag({"k": "r", "wk": p}, inst)
            rows, usable = self.query(conn, "SELECT @@bind_address, @@port, @@read_only", rec)
            if rows:
                rec["node"] = f"{rows[0][0]}:{rows[0][1]}"
                rec["rec"] = False  # a read-only server answering is what ro is for
            if not usable:
                self.close(conn)
                conn = None
            time.sleep(pause * 2)
        if conn:
            self.close(conn)

    # ---- Switchyard's own view --------------------------------------------------------------------------
    def status_poller(self, inst):
        s = self.spec
        last_key, last_t, prev_t, seen_events = None, 0, None, set()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://{inst['host']}:{inst['admin']}/status"
        while not self.stop.is_set() and time.time() < s["end_time"] + 2:
            t = time.time()
            try:
                with opener.open(url, timeout=1.5) as r:
                    doc = json.loads(r.read())
                cl = doc["clusters"][0]
                nodes = [[n["name"], n["health"], n["role"], n.get("timeline")] for n in cl["nodes"]]
                remarks = {n["name"]: n["remark"] for n in cl["nodes"] if n.get("remark")}
                co = doc.get("coordination")
                coord = None
                if co is not None:
                    coord = {"leader": co.get("leader"), "cut": co.get("cut_off"), "pub": cl.get("published"),
                             "ep": cl.get("epoch")}
                key = (cl.get("primary"), json.dumps(nodes), json.dumps(remarks, sort_keys=True),
                       None if coord is None else (coord["leader"], bool(coord["cut"]), coord["pub"], coord["ep"]))
                if key != last_key or t - last_t > 5:
                    rec = {"k": "st", "t": t, "te": time.time(), "tp": prev_t, "primary": cl.get("primary"),
                           "nodes": nodes, "route_error": cl.get("route_error")}
                    if remarks:
                        rec["remarks"] = remarks
                    if cl.get("last_promotion"):
                        rec["last_promotion"] = cl.get("last_promotion")
                    if coord is not None:
                        rec["co"] = coord
                    self.rec.add(self.tag(rec, inst))
                    last_key, last_t = key, t
                for ev in cl.get("events", []):
                    k = (ev["at_unix_ms"], ev["node"], ev["new"])
                    if k not in seen_events:
                        seen_events.add(k)
                        self.rec.add(self.tag({"k": "ev", "t": ev["at_unix_ms"] / 1000, "node": ev["node"],
                                               "old": ev["old"], "new": ev["new"], "reason": ev["reason"]}, inst))
            except Exception as e:
                if last_key != "unreachable":
                    self.rec.add(self.tag({"k": "st", "t": t, "te": time.time(), "tp": prev_t,
                                           "err": f"{type(e).__name__} {e}"[:200]}, inst))
                    last_key, last_t = "unreachable", t
            prev_t = t
            self.stop.wait(s["status_interval_ms"] / 1000)

    def main(self):
        s = self.spec
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        pollers = [threading.Thread(target=self.status_poller, args=(i,), daemon=True) for i in self.instances]
        clients = [threading.Thread(target=self.inserter, args=(w,), daemon=True) for w in range(s["insert_workers"])]
        clients += [threading.Thread(target=self.raw_pair, args=(p,), daemon=True) for p in range(s["raw_pairs"])]
        probes = s.get("ro_probes", len(self.instances))
        clients += [threading.Thread(target=self.ro_probe, args=(p,), daemon=True) for p in range(probes)]
        for t in pollers + clients:
            t.start()
        # Bounded: every client's wait is bounded by its socket timeouts.
        while any(t.is_alive() for t in clients):
            time.sleep(0.5)
            self.rec.flush()
            if time.time() > s["end_time"] + s["op_timeout"] + s["connect_timeout"] + 10:
                break
        self.stop.set()
        for t in pollers:
            t.join(5)
        self.rec.flush()


def child_main(spec):
    w = MyWorkload(spec)
    try:
        w.main()
    finally:
        w.rec.flush()
    return 0
