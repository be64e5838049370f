"""Memory per idle client: open N client connections through a proxy (startup + auth
complete, then idle) and divide the growth of the proxy's RSS by N."""

import asyncio
import random
import time

from .pgwire import Conn
from .procs import log, status_kib


async def _open_many(port, n, user, db, password, concurrency):
    conns, errors = [], {}
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            try:
                c = await asyncio.wait_for(Conn.connect("127.0.0.1", port, user, db, password), 60)
                conns.append(c)
            except Exception as e:  # counted, reported
                key = str(e)[:160] or type(e).__name__
                errors[key] = errors.get(key, 0) + 1

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, errors


async def _measure(pid, port, n, user, db, password, settle_s, concurrency):
    res = {"clients": n}
    warm, _ = await _open_many(port, 10, user, db, password, 10)
    for c in warm:
        c.close()
    await asyncio.sleep(1.0)
    res["rss_before_kib"] = status_kib(pid, "VmRSS")
    t0 = time.monotonic()
    conns, errors = await _open_many(port, n, user, db, password, concurrency)
    res["open_s"] = round(time.monotonic() - t0, 2)
    res["connected"] = len(conns)
    res["connect_errors"] = errors
    await asyncio.sleep(settle_s)
    res["rss_idle_kib"] = status_kib(pid, "VmRSS")
    res["hwm_kib"] = status_kib(pid, "VmHWM")
    # Are they really alive? A query on a sample of them.
    sample = random.sample(conns, min(100, len(conns)))
    ok, qerr = 0, {}
    for c in sample:
        try:
            await asyncio.wait_for(c.query("SELECT 1"), 10)
            ok += 1
        except Exception as e:
            key = str(e)[:160] or type(e).__name__
            qerr[key] = qerr.get(key, 0) + 1
    res["sample_queries"] = len(sample)
    res["sample_ok"] = ok
    res["sample_errors"] = qerr
    # Then every client runs one query and is left idle again: what a client that has
    # worked costs at rest (its buffers, whatever of its session grew), the usual case
    # of an application's pooled connections.
    sem = asyncio.Semaphore(concurrency)
    worked, werr = 0, {}

    async def one_query(c):
        nonlocal worked
        async with sem:
            try:
                await asyncio.wait_for(c.query("SELECT 1"), 30)
                worked += 1
            except Exception as e:
                key = str(e)[:160] or type(e).__name__
                werr[key] = werr.get(key, 0) + 1

    await asyncio.gather(*(one_query(c) for c in conns))
    await asyncio.sleep(settle_s)
    res["rss_after_query_kib"] = status_kib(pid, "VmRSS")
    res["queried_ok"] = worked
    res["query_errors"] = werr
    for c in conns:
        c.close()
    await asyncio.sleep(2.0)
    res["rss_after_close_kib"] = status_kib(pid, "VmRSS")
    # A second round on the same process: if RSS grows again by as much, the memory of
    # the first round's clients was not reused (kept per closed client: a leak).
    conns2, errors2 = await _open_many(port, n, user, db, password, concurrency)
    await asyncio.sleep(settle_s)
    res["round2_connected"] = len(conns2)
    res["round2_rss_idle_kib"] = status_kib(pid, "VmRSS")
    for c in conns2:
        c.close()
    await asyncio.sleep(2.0)
    res["round2_rss_after_close_kib"] = status_kib(pid, "VmRSS")
    if conns:
        delta = res["rss_idle_kib"] - res["rss_before_kib"]
        res["per_client_kib"] = round(delta / len(conns), 2)
        res["per_client_after_query_kib"] = round((res["rss_after_query_kib"] - res["rss_before_kib"]) / len(conns), 2)
    return res


def measure_idle(system, n, user, db, password, settle_s=3.0, concurrency=200):
    log(f"idle clients: {n} through {system.key} (port {system.port})")
    res = asyncio.run(_measure(system.pid, system.port, n, user, db, password, settle_s, concurrency))
    res["system"] = system.key
    log(f"  {system.key}: {res.get('connected')} connected in {res.get('open_s')} s, "
        f"RSS {res.get('rss_before_kib')} -> {res.get('rss_idle_kib')} KiB, "
        f"{res.get('per_client_kib')} KiB/client ({res.get('per_client_after_query_kib')} after a query each), "
        f"sample queries ok {res.get('sample_ok')}/{res.get('sample_queries')}")
    return res
