"""What the harness watches while faults run: each server's own view of itself (over its
Unix socket, so partitions do not hide it), and Switchyard's memory and file
descriptors from /proc (each instance's, tagged with its name). One background thread, one asyncio loop, every query bounded
(a frozen server answers nothing).
"""

import asyncio
import threading
import time

from sybench.pgwire import Conn

from .common import lsn_int

SELF_SQL = ("SELECT pg_is_in_recovery(), "
            "CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli::text FROM pg_stat_wal_receiver) "
            "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, "
            "coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text")


class Observer:
    def __init__(self, cluster, proxies, interval=0.5):
        self.cluster, self.proxies, self.interval = cluster, proxies, interval
        self.truth = []      # {t, node, up, primary, tl, lsn} on change (and every 5 s)
        self.resources = []  # {t, sy, pid, rss_kib, fds}
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    async def _main(self):
        conns = {}
        last = {}
        n = 0
        while not self._stop.is_set():
            t = time.time()
            for name, node in self.cluster.nodes.items():
                row = await self._sample(conns, name, node)
                key = (row["up"], row["primary"], row["tl"])
                if last.get(name, (None,))[0] != key or t - last[name][1] > 5:
                    self.truth.append({"t": t, "node": name, **row})
                    last[name] = (key, t)
            if n % max(1, int(1 / self.interval)) == 0:
                for p in self.proxies:
                    self.resources.append(dict(p.resources(), sy=p.name))
            n += 1
            await asyncio.sleep(max(0.0, self.interval - (time.time() - t)))
        for c in conns.values():
            c.close()

    async def _sample(self, conns, name, node):
        try:
            c = conns.get(name)
            if c is None:
                path = f"{node.sockdir}/.s.PGSQL.{node.port}"
                r, w = await asyncio.wait_for(asyncio.open_unix_connection(path), 1.0)
                c = Conn(r, w)
                await asyncio.wait_for(c._startup("postgres", "postgres", None, {}), 1.0)
                conns[name] = c
            rows = await asyncio.wait_for(c.query(SELF_SQL), 1.0)
            rec, tl, lsn = rows[0]
            return {"up": True, "primary": rec == "f", "tl": int(tl, 16) if rec == "f" and tl else
                    (int(tl) if tl else None), "lsn": lsn_int(lsn)}
        except Exception as e:
            c = conns.pop(name, None)
            if c:
                c.close()
            return {"up": False, "primary": None, "tl": None, "lsn": None, "err": f"{type(e).__name__}"}


class MyObserver(Observer):
    """`--engine mariadb`: each server's own view over its Unix socket as root (one
    PyMySQL connection per node, every call bounded): writable or not, whom it
    replicates from and whether its threads run, its GTID position, whether semi-sync
    is on on its primary side. `primary` = writable and replicating from nobody."""

    def start(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        conns = {}
        last = {}
        n = 0
        while not self._stop.is_set():
            t = time.time()
            for name in self.cluster.nodes:
                row = self._my_sample(conns, name)
                key = (row["up"], row["primary"], row.get("ro"), row.get("src"), row.get("io"), row.get("sql"),
                       row.get("semi"))
                if last.get(name, (None,))[0] != key or t - last[name][1] > 5:
                    self.truth.append({"t": t, "node": name, **row})
                    last[name] = (key, t)
            if n % max(1, int(1 / self.interval)) == 0:
                for p in self.proxies:
                    self.resources.append(dict(p.resources(), sy=p.name))
            n += 1
            self._stop.wait(max(0.0, self.interval - (time.time() - t)))
        for c in conns.values():
            try:
                c.close()
            except Exception:
                pass

    def _my_sample(self, conns, name):
        import pymysql
        t0 = time.time()
        try:
            c = conns.get(name)
            if c is None:
                c = self.cluster.connect(name, timeout=1)
                conns[name] = c
            cur = c.cursor()
            cur.execute("SELECT @@read_only, @@gtid_current_pos, (SELECT VARIABLE_VALUE FROM "
                        "information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'RPL_SEMI_SYNC_MASTER_STATUS')")
            ro, pos, semi = cur.fetchone()
            d = pymysql.cursors.DictCursor(c)
            d.execute("SHOW SLAVE STATUS")
            ss = d.fetchone() or {}
            io, sq = ss.get("Slave_IO_Running"), ss.get("Slave_SQL_Running")
            replicating = bool(ss) and (io in ("Yes", "Connecting") or sq == "Yes")
            from .mariadb import gtid_seq
            return {"up": True, "primary": not int(ro) and not replicating, "tl": None,
                    "lsn": gtid_seq(pos), "ro": bool(int(ro)),
                    "src": f"{ss.get('Master_Host')}:{ss.get('Master_Port')}" if ss else None,
                    "io": io, "sql": sq, "semi": semi, "ts": t0}
        except Exception as e:
            c = conns.pop(name, None)
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
            return {"up": False, "primary": None, "tl": None, "lsn": None, "err": type(e).__name__, "ts": t0}
