"""Failover timings: client loops run against proxy endpoints while a server is killed
(and a standby promoted); the loops' per-request records give the time until requests
succeed again and the number of errors clients saw."""

import asyncio
import time

from .pgwire import Conn
from .procs import log


class Probe:
    """`workers` clients, each with its own connection, running `sql` in a loop. A failed
    request counts as one error; the client then reconnects (as an application would)."""

    def __init__(self, name, port, user, db, password, sql, workers=4, pause_s=0.01, timeout_s=10.0):
        self.name, self.port, self.user, self.db, self.password = name, port, user, db, password
        self.sql, self.workers, self.pause_s, self.timeout_s = sql, workers, pause_s, timeout_s
        self.events = []  # (start, end, ok, port-or-error)
        self._stop = False
        self._tasks = []

    async def _worker(self, wid):
        conn = None
        while not self._stop:
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(
                        Conn.connect("127.0.0.1", self.port, self.user, self.db, self.password), self.timeout_s)
                rows = await asyncio.wait_for(conn.query(self.sql.format(worker=wid)), self.timeout_s)
                self.events.append((t0, time.monotonic(), True, rows[0][0] if rows else None))
                await asyncio.sleep(self.pause_s)
            except Exception as e:
                msg = str(e) or type(e).__name__
                if isinstance(e, asyncio.TimeoutError):
                    msg = f"no answer within {self.timeout_s}s"
                self.events.append((t0, time.monotonic(), False, msg[:200]))
                if conn is not None:
                    conn.close()
                    conn = None
                await asyncio.sleep(0.02)
        if conn is not None:
            conn.close()

    def start(self):
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def stop(self):
        self._stop = True
        await asyncio.gather(*self._tasks, return_exceptions=True)


def analyze(events, t_event, good_port=None, window_s=None):
    """Figures for the requests around `t_event` (monotonic seconds)."""
    before = [e for e in events if e[1] < t_event]
    after = [e for e in events if e[1] >= t_event and (window_s is None or e[0] <= t_event + window_s)]
    errors = [e for e in after if not e[2]]

    def good(e):
        return e[2] and (good_port is None or str(e[3]) == str(good_port))

    first_ok = min((e[1] for e in after if good(e) and e[0] >= t_event), default=None)
    last_err = max((e[1] for e in errors), default=None)
    # Back for good: the first success of a request started after the last error.
    base = t_event if last_err is None else last_err
    back = min((e[1] for e in after if good(e) and e[0] >= base), default=None)
    # Longest stretch without any successful completion, from the event on.
    oks = sorted(e[1] for e in after if e[2])
    gaps, prev = [], t_event
    for t in oks:
        gaps.append(t - prev)
        prev = t
    msgs = {}
    for e in errors:
        msgs[e[3]] = msgs.get(e[3], 0) + 1
    served = {}
    for e in after:
        if e[2]:
            served[str(e[3])] = served.get(str(e[3]), 0) + 1
    served_before = {}
    for e in before:
        if e[2]:
            served_before[str(e[3])] = served_before.get(str(e[3]), 0) + 1
    return {
        "requests_before": len(before),
        "requests_after": len(after),
        "errors": len(errors),
        "error_messages": msgs,
        "first_success_s": None if first_ok is None else round(first_ok - t_event, 3),
        "back_s": None if back is None else round(back - t_event, 3),
        "last_error_s": None if last_err is None else round(last_err - t_event, 3),
        "longest_gap_s": round(max(gaps), 3) if gaps else None,
        "longest_request_s": round(max((e[1] - e[0] for e in after), default=0), 3),
        "served_by_port_after": served,
        "served_by_port_before": served_before,
    }


async def _run_event(probes, action, settle_s, after_s):
    for p in probes:
        p.start()
    await asyncio.sleep(settle_s)
    t_event = time.monotonic()
    marks = await action()
    await asyncio.sleep(max(0.0, t_event + after_s - time.monotonic()))
    for p in probes:
        await p.stop()
    return t_event, marks


def standby_failure(cluster, standby_idx, systems, user, db, password, settle_s=2.0, after_s=6.0):
    """kill -9 of the standby; reads on every system's ro endpoint."""
    probes = [Probe(s.key, s.ro_port, user, db, password,
                    "SELECT inet_server_port(), pg_is_in_recovery()") for s in systems]

    async def action():
        await asyncio.to_thread(cluster.kill9, standby_idx)
        return {"killed_after_s": None}

    async def main():
        return await _run_event(probes, action, settle_s, after_s)

    log(f"failover: kill -9 of standby {cluster.nodes[standby_idx].name}; reads through "
        + ", ".join(f"{s.key} ro :{s.ro_port}" for s in systems))
    t_event, marks = asyncio.run(main())
    out = {}
    for s, p in zip(systems, probes):
        r = analyze(p.events, t_event)
        r["standby_port"] = cluster.nodes[standby_idx].port
        r["primary_port"] = cluster.nodes[0].port
        out[s.key] = r
        log(f"  {s.key}: reads back after {r['back_s']} s (first success {r['first_success_s']} s), "
            f"{r['errors']} errors, served after: {r['served_by_port_after']}")
    return out


def primary_failure(cluster, primary_idx, standby_idx, systems, user, db, password, settle_s=2.0, after_s=10.0):
    """kill -9 of the primary, then at once `pg_ctl promote` of the standby; writes on
    every system's rw endpoint."""
    sql = "INSERT INTO failover_probe(worker) VALUES ({worker}) RETURNING inet_server_port()"
    probes = [Probe(s.key, s.port, user, db, password, sql) for s in systems]
    marks = {}

    async def action():
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.kill9, primary_idx)
        t1 = time.monotonic()
        await asyncio.to_thread(cluster.promote, standby_idx)
        t2 = time.monotonic()
        marks.update({"kill_s": round(t1 - t0, 3), "promote_done_s": round(t2 - t0, 3)})
        return marks

    async def main():
        return await _run_event(probes, action, settle_s, after_s)

    log(f"failover: kill -9 of primary {cluster.nodes[primary_idx].name} + pg_ctl promote "
        f"{cluster.nodes[standby_idx].name}; writes through " + ", ".join(f"{s.key} rw :{s.port}" for s in systems))
    t_event, _ = asyncio.run(main())
    new_primary = cluster.nodes[standby_idx].port
    out = {"marks": marks}
    for s, p in zip(systems, probes):
        r = analyze(p.events, t_event, good_port=new_primary)
        r["new_primary_port"] = new_primary
        r["old_primary_port"] = cluster.nodes[primary_idx].port
        out[s.key] = r
        log(f"  {s.key}: writes back after {r['back_s']} s (first success {r['first_success_s']} s), "
            f"{r['errors']} errors; promote done at {marks.get('promote_done_s')} s")
    return out
