"""The recorded workload: a child process started inside the proxy's namespace
(`chaos/run --workload-child SPEC`), asyncio, one connection per client, every
operation written to a JSON-lines file with its start and end time.

Clients use sybench's minimal protocol client (bench/sybench/pgwire.py) rather than a
driver, for two reasons: every wait is bounded by `asyncio.wait_for` (a frozen proxy or
server never hangs a client), and the client sees exactly what came back, which is what
the outcome of a write depends on:

  ack   rows and ReadyForQuery: the insert committed (autocommit, one statement);
  fail  ErrorResponse (severity ERROR) then ReadyForQuery: the statement did not commit;
  unk   the connection died, a FATAL arrived, or no answer within the timeout after the
        query was sent: it may or may not have committed.

Connection attempts that fail are recorded separately (kind "c"): nothing was sent.

Record kinds: w (insert of a unique id through rw), c (connect failure), raw_w (the
write of a read-after-write check), raw_own (reading it back on the same connection,
rw with splitting: read-your-writes), raw_tok (SHOW switchyard.causal_token),
raw_set (SET switchyard.causal_token on an ro connection), raw_causal (the read through
ro with that token), r (a read-only probe on ro), st (Switchyard's /status: primary and each node's health, role and
timeline; with [coordination] also its leader, published primary, epoch and whether
it is cut off from etcd), ev (Switchyard's node events, from /status).

With two Switchyard instances (`spec["instances"]`), every record names the instance
its connection went through (`sy`): insert client w goes through instance w mod 2;
read-after-write pair p writes (and reads back on the same connection) through
instance p mod 2 and makes its causal read on the ro endpoint of the other instance,
with the token the first one gave (a token names the cluster and timeline, not the
instance); one ro probe and one /status poller per instance.
"""

import asyncio
import json
import signal
import struct
import time

from sybench.pgwire import Conn, PgError, _fields

INSERT_SQL = ("INSERT INTO chaos_writes (id, worker) VALUES ({id}, {w}) RETURNING inet_server_addr()::text, "
              "inet_server_port(), pg_is_in_recovery(), pg_current_wal_insert_lsn()::text, "
              "substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8)")
RAW_INSERT_SQL = ("INSERT INTO chaos_raw (id) VALUES ({id}) RETURNING inet_server_addr()::text, "
                  "inet_server_port(), pg_is_in_recovery(), pg_current_wal_insert_lsn()::text, "
                  "substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8)")
READ_SQL = ("SELECT count(*), inet_server_addr()::text, inet_server_port(), pg_is_in_recovery() "
            "FROM chaos_raw WHERE id = {id}")
ID_BASE = 1_000_000_000


class Outcome(Exception):
    """A statement that did not return rows: how it ended."""

    def __init__(self, o, sqlstate=None, message="", severity=None):
        self.o, self.sqlstate, self.message, self.severity = o, sqlstate, message, severity
        super().__init__(f"{o} {sqlstate} {message}")


async def simple_query(conn, sql, timeout):
    """Send one simple query; return its rows. Raises Outcome('fail') for an
    ErrorResponse followed by ReadyForQuery, Outcome('unk') for anything after which
    the result is unknown (the connection is then unusable)."""

    async def exchange():
        conn._send(b"Q", sql.encode() + b"\0")
        await conn.w.drain()
        rows, err = [], None
        while True:
            typ, body = await conn._read()
            if typ == b"D":
                n = struct.unpack("!H", body[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    ln = struct.unpack("!i", body[pos:pos + 4])[0]
                    pos += 4
                    row.append(None if ln < 0 else body[pos:pos + ln].decode())
                    pos += max(ln, 0)
                rows.append(row)
            elif typ == b"E":
                err = _fields(body)
                if err.get("S") in ("FATAL", "PANIC"):
                    raise Outcome("unk", err.get("C"), err.get("M", ""), err.get("S"))
            elif typ == b"Z":
                if err:
                    raise Outcome("fail", err.get("C"), err.get("M", ""), err.get("S"))
                return rows

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except Outcome:
        raise
    except asyncio.TimeoutError:
        raise Outcome("unk", None, f"no answer within {timeout}s")
    except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
        raise Outcome("unk", None, f"connection lost: {type(e).__name__} {e}"[:200])
    except Exception as e:  # a garbled answer: the outcome is unknown as well
        raise Outcome("unk", None, f"client error: {type(e).__name__} {e}"[:200])


class Recorder:
    def __init__(self, path):
        self.path = path
        self.buf = []
        self.count = 0

    def add(self, rec):
        self.buf.append(rec)
        self.count += 1

    def flush(self):
        if self.buf:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.buf))
            self.buf = []


class Workload:
    def __init__(self, spec):
        self.spec = spec
        self.rec = Recorder(spec["out"])
        self.stop = False
        self.ops = 0
        # One instance: today's records, without the `sy` tag.
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
        return self.stop or time.time() >= self.spec["end_time"] or self.ops >= self.spec["max_ops"]

    async def connect(self, inst, who, endpoint):
        s = self.spec
        t0 = time.time()
        try:
            return await asyncio.wait_for(Conn.connect(inst["host"], inst[endpoint], s["user"], s["db"], s["password"]),
                                          s["connect_timeout"])
        except Exception as e:
            st = e.sqlstate if isinstance(e, PgError) else None
            msg = str(e) if not isinstance(e, asyncio.TimeoutError) else f"connect timeout {s['connect_timeout']}s"
            self.rec.add(self.tag({"k": "c", "wk": who, "ep": endpoint, "s": t0, "e": time.time(), "o": "fail",
                                   "st": st, "err": msg[:200]}, inst))
            await asyncio.sleep(0.1)
            return None

    async def op(self, conn, sql, rec):
        """Run `sql`, filling `rec` (start, end, outcome, error); rows or None."""
        rec["s"] = time.time()
        try:
            rows = await simple_query(conn, sql, self.spec["op_timeout"])
            rec["o"] = "ack"
            return rows
        except Outcome as o:
            rec.update({"o": o.o, "st": o.sqlstate, "err": o.message[:200], "sev": o.severity})
            return None
        finally:
            rec["e"] = time.time()
            self.ops += 1
            self.rec.add(rec)

    @staticmethod
    def write_fields(rec, row):
        rec["node"] = f"{row[0].split('/')[0]}:{row[1]}"
        rec["rec"] = row[2] == "t"
        rec["lsn"] = row[3]
        rec["tl"] = int(row[4], 16) if row[4] else None

    # ---- (a) inserts of unique ids ---------------------------------------------------------
    async def inserter(self, w):
        conn, seq = None, 0
        pause = self.spec["pause_ms"] / 1000
        inst = self.inst(w)
        while not self.done():
            if conn is None:
                conn = await self.connect(inst, f"w{w}", "rw")
                if conn is None:
                    continue
            seq += 1
            rid = (w + 1) * ID_BASE + seq
            rec = self.tag({"k": "w", "id": rid, "wk": w}, inst)
            rows = await self.op(conn, INSERT_SQL.format(id=rid, w=w), rec)
            if rows:
                self.write_fields(rec, rows[0])
            elif rec["o"] == "unk":
                conn.close()
                conn = None
            await asyncio.sleep(pause)
        if conn:
            conn.close()

    # ---- (b) read-after-write ---------------------------------------------------------------
    async def raw_pair(self, p):
        s = self.spec
        w_conn = r_conn = None
        seq = 0
        pause = s["pause_ms"] / 1000
        # The causal read goes through the other instance, when there is one.
        w_inst, r_inst = self.inst(p), self.inst(p + 1)
        while not self.done():
            await asyncio.sleep(pause)
            if w_conn is None:
                w_conn = await self.connect(w_inst, f"raw{p}w", "rw")
                if w_conn is None:
                    continue
            if r_conn is None:
                r_conn = await self.connect(r_inst, f"raw{p}r", "ro")
                if r_conn is None:
                    continue
            seq += 1
            rid = (p + 1) * ID_BASE + seq
            rec = self.tag({"k": "raw_w", "id": rid, "wk": p}, w_inst)
            rows = await self.op(w_conn, RAW_INSERT_SQL.format(id=rid), rec)
            if not rows:
                if rec["o"] == "unk":
                    w_conn.close()
                    w_conn = None
                continue
            self.write_fields(rec, rows[0])
            # Read it back on the same connection (rw, split: may go to a standby).
            rec = self.tag({"k": "raw_own", "id": rid, "wk": p}, w_inst)
            rows = await self.op(w_conn, READ_SQL.format(id=rid), rec)
            if not rows:
                if rec["o"] == "unk":
                    w_conn.close()
                    w_conn = None
                continue
            self.read_fields(rec, rows[0])
            # Carry the write to another connection with a causal token.
            rec = self.tag({"k": "raw_tok", "id": rid, "wk": p}, w_inst)
            rows = await self.op(w_conn, "SHOW switchyard.causal_token", rec)
            if not rows:
                if rec["o"] == "unk":
                    w_conn.close()
                    w_conn = None
                continue
            token = rows[0][0] or ""
            rec["tok"] = token
            rec = self.tag({"k": "raw_set", "id": rid, "wk": p}, r_inst)
            await self.op(r_conn, f"SET switchyard.causal_token = '{token}'", rec)
            if rec["o"] != "ack":
                if rec["o"] == "unk":
                    r_conn.close()
                    r_conn = None
                continue
            rec = self.tag({"k": "raw_causal", "id": rid, "wk": p}, r_inst)
            rows = await self.op(r_conn, READ_SQL.format(id=rid), rec)
            if rows:
                self.read_fields(rec, rows[0])
            elif rec["o"] == "unk":
                r_conn.close()
                r_conn = None
        for c in (w_conn, r_conn):
            if c:
                c.close()

    # ---- read availability ---------------------------------------------------------------
    async def ro_probe(self, p):
        """A reader on ro alone, so read outages are measured apart from writes."""
        conn = None
        pause = self.spec["pause_ms"] / 1000
        inst = self.inst(p)
        while not self.done():
            if conn is None:
                conn = await self.connect(inst, f"r{p}", "ro")
                if conn is None:
                    continue
            rec = self.tag({"k": "r", "wk": p}, inst)
            rows = await self.op(conn, "SELECT inet_server_addr()::text, inet_server_port(), pg_is_in_recovery()", rec)
            if rows:
                rec["node"] = f"{(rows[0][0] or '').split('/')[0]}:{rows[0][1]}"
                rec["rec"] = rows[0][2] == "t"
            elif rec["o"] == "unk":
                conn.close()
                conn = None
            await asyncio.sleep(pause * 2)
        if conn:
            conn.close()

    @staticmethod
    def read_fields(rec, row):
        rec["n"] = int(row[0])
        rec["node"] = f"{(row[1] or '').split('/')[0]}:{row[2]}"
        rec["rec"] = row[3] == "t"

    # ---- Switchyard's own view -------------------------------------------------------------
    async def status_poller(self, inst):
        """Polls one instance's /status; records a sample when what it shows changes (and
        every 5 s). `tp` is the time of the poll before, so a state can be bracketed:
        it held at least from the first sample showing it until the `tp` of the first
        sample showing something else."""
        s = self.spec
        last_key, last_t, prev_t, seen_events = None, 0, None, set()
        while not self.stop and time.time() < s["end_time"] + 2:
            t = time.time()
            try:
                doc = await asyncio.wait_for(self.http_get(inst["host"], inst["admin"], "/status"), 1.5)
                cl = doc["clusters"][0]
                nodes = [[n["name"], n["health"], n["role"], n.get("timeline")] for n in cl["nodes"]]
                co = doc.get("coordination")
                coord = None
                if co is not None:
                    coord = {"leader": co.get("leader"), "cut": co.get("cut_off"), "pub": cl.get("published"),
                             "ep": cl.get("epoch")}
                key = (cl.get("primary"), json.dumps(nodes),
                       None if coord is None else (coord["leader"], bool(coord["cut"]), coord["pub"], coord["ep"]))
                if key != last_key or t - last_t > 5:
                    rec = {"k": "st", "t": t, "te": time.time(), "tp": prev_t, "primary": cl.get("primary"),
                           "nodes": nodes, "route_error": cl.get("route_error")}
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
            await asyncio.sleep(s["status_interval_ms"] / 1000)

    @staticmethod
    async def http_get(host, port, path):
        r, w = await asyncio.open_connection(host, port)
        try:
            w.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await w.drain()
            data = await r.read()
        finally:
            w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        return json.loads(body)

    async def flusher(self):
        while not self.stop:
            await asyncio.sleep(0.5)
            self.rec.flush()

    async def main(self):
        s = self.spec
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        flusher = asyncio.create_task(self.flusher())
        pollers = [asyncio.create_task(self.status_poller(i)) for i in self.instances]
        clients = [asyncio.create_task(self.inserter(w)) for w in range(s["insert_workers"])]
        clients += [asyncio.create_task(self.raw_pair(p)) for p in range(s["raw_pairs"])]
        probes = s.get("ro_probes", len(self.instances))
        clients += [asyncio.create_task(self.ro_probe(p)) for p in range(probes)]
        await asyncio.gather(*clients, return_exceptions=True)
        self.stop = True
        await asyncio.gather(*pollers, flusher, return_exceptions=True)
        self.rec.flush()

    def request_stop(self):
        self.stop = True


def child_main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    w = Workload(spec)
    try:
        asyncio.run(w.main())
    finally:
        w.rec.flush()
    return 0
