"""A MariaDB primary + two GTID replicas for the fault suite (`chaos/run --engine
mariadb`), one server per network namespace (or all on loopback): the Python twin of
src/demo/mariadb.rs, plus what an operator does during failures.

Every node is `mariadb-install-db`'d, then a `mariadbd` child process started inside
its namespace with fixed options, as from a fixed `my.cnf` (`--read-only=1` on the
nodes the harness last knew as replicas, none on the primary: an old primary restarted
after a failover comes back writable, as with a real `my.cnf`, and Switchyard must
fence it). `--sync` adds semi-synchronous replication (`AFTER_SYNC`) on every node.

The harness talks to each server as root over its Unix socket (PyMySQL), which no
partition affects. Operator actions: promote (stop the IO thread, wait until the relay
log is applied, `STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0`), repoint a
replica (`CHANGE MASTER TO ... MASTER_USE_GTID = slave_pos`), rejoin an old primary
(`MASTER_USE_GTID = current_pos`; diverged when the new primary answers error 1236), and
rebuild a diverged node: wipe, `mariadb-install-db`, the users, then a copy of the
tables taken in a consistent snapshot under a brief `FLUSH TABLES WITH READ LOCK`
together with the source's exact `@@gtid_binlog_state` and `@@gtid_binlog_pos`, which
become the rebuilt node's binlog state and replication position (so every node's
`@@gtid_binlog_state` stays exact, which the checker's write-order rule relies on).
"""

import os
import shutil
import signal
import subprocess
import time

import pymysql
from pymysql.constants import CLIENT

from .common import alive, free_port, log, run

DB, USER, PASSWORD = "chaos", "chaos", "chaos-pw"
REPL_USER = REPL_PASSWORD = "repl"
MONITOR_USER = MONITOR_PASSWORD = "monitor"
MANAGER_USER = MANAGER_PASSWORD = "manager"
MANAGER_GRANTS = ("READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, CONNECTION ADMIN, RELOAD, PROCESS, SLAVE MONITOR, "
                  "REPLICATION CLIENT")
MARIADBD = "/usr/sbin/mariadbd"

USERS_SQL = [
    f"CREATE USER '{REPL_USER}'@'%' IDENTIFIED BY '{REPL_PASSWORD}'",
    f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'%'",
    f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
    f"GRANT ALL PRIVILEGES ON `{DB}`.* TO '{USER}'@'%'",
    f"CREATE USER '{MONITOR_USER}'@'%' IDENTIFIED BY '{MONITOR_PASSWORD}'",
    f"GRANT REPLICATION CLIENT, SLAVE MONITOR, PROCESS ON *.* TO '{MONITOR_USER}'@'%'",
    f"CREATE USER '{MANAGER_USER}'@'%' IDENTIFIED BY '{MANAGER_PASSWORD}'",
    f"GRANT {MANAGER_GRANTS} ON *.* TO '{MANAGER_USER}'@'%'",
]
TABLES_SQL = [
    "CREATE TABLE chaos_writes (id BIGINT PRIMARY KEY, worker INT NOT NULL, "
    "at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB",
    "CREATE TABLE chaos_raw (id BIGINT PRIMARY KEY) ENGINE=InnoDB",
    # The background load (myload.py): a fixed set of counters.
    "CREATE TABLE chaos_load (id INT PRIMARY KEY, v BIGINT NOT NULL DEFAULT 0) ENGINE=InnoDB",
]
LOAD_ROWS = 1000

SEMI_SYNC_ARGS = [
    "--rpl-semi-sync-master-enabled=1",
    "--rpl-semi-sync-slave-enabled=1",
    "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
    "--rpl-semi-sync-master-timeout=10000",
    "--rpl-semi-sync-slave-kill-conn-timeout=1",
]


class Diverged(Exception):
    """The node has transactions the primary lacks (error 1236 on START SLAVE)."""


class MyNode:
    def __init__(self, name, host, port, base, ns, server_id):
        self.name = name
        self.host = host
        self.port = port
        self.ns = ns
        self.server_id = server_id
        self.data = os.path.join(base, name)
        self.socket = os.path.join(base, f"sock-{name}", "mysqld.sock")
        self.sockdir = os.path.dirname(self.socket)
        self.log = os.path.join(base, f"{name}.log")          # the error log
        self.out = os.path.join(base, f"{name}.out")          # stdout/stderr of mariadbd
        self.pidfile = os.path.join(base, f"{name}.pid")
        # Its own temporary directory: /tmp is shared with whatever else runs here.
        self.tmpdir = os.path.join(base, f"tmp-{name}")
        self.tmpfs = None         # the relay log's tmpfs (disk-full fault)
        self.relay_dir = None
        self.read_only_at_start = True   # as its my.cnf says
        self.skip_slave_start = False    # next start only
        self.proc = None

    @property
    def addr(self):
        return f"{self.host}:{self.port}"


class MariaCluster:
    engine = "mariadb"

    def __init__(self, net, base, sync=False, names=("n1", "n2", "n3")):
        self.net = net
        self.base = base
        self.sync = sync
        self.as_root = os.geteuid() == 0
        self.nodes = {}
        for i, name in enumerate(names):
            port = 3306 if net.kind == "netns" else free_port()
            self.nodes[name] = MyNode(name, net.ip_of(name), port, base, net.ns_of(name), i + 1)
        self.primary = names[0]
        self.history = []     # {t, event, node, detail}: what the operator did
        self.rebuilds = []    # {t, node, source, why, seconds, rows}
        for n in self.nodes.values():
            os.makedirs(n.sockdir, exist_ok=True)

    # ---- SQL as root over the Unix socket ------------------------------------------------
    def connect(self, name, timeout=5):
        n = self.nodes[name]
        return pymysql.connect(unix_socket=n.socket, user="root", password="", autocommit=True,
                               connect_timeout=max(1, int(timeout)), read_timeout=timeout, write_timeout=timeout,
                               client_flag=CLIENT.MULTI_STATEMENTS)

    def sql(self, name, stmts, timeout=10, db=None):
        """Run one statement or a list on `name`; the rows of the last one (tuples).
        Raises on error or when the server does not answer within `timeout`."""
        if isinstance(stmts, str):
            stmts = [stmts]
        try:
            c = self.connect(name, timeout)
        except Exception as e:
            raise RuntimeError(f"{name}: cannot connect: {e}") from e
        try:
            cur = c.cursor()
            if db:
                cur.execute(f"USE `{db}`")
            rows = ()
            for s in stmts:
                try:
                    cur.execute(s)
                except Exception as e:
                    raise RuntimeError(f"{name}: {s[:80]!r}: {e}") from e
                rows = cur.fetchall()
            return rows
        finally:
            c.close()

    def try_sql(self, name, stmts, **kw):
        try:
            return self.sql(name, stmts, **kw)
        except Exception:
            return None

    def value(self, name, expr, timeout=5):
        rows = self.sql(name, f"SELECT {expr}", timeout=timeout)
        return rows[0][0] if rows else None

    def slave_status(self, name, timeout=5):
        """SHOW SLAVE STATUS as a dict ({} when it replicates from nobody)."""
        c = self.connect(name, timeout)
        try:
            cur = c.cursor(pymysql.cursors.DictCursor)
            cur.execute("SHOW SLAVE STATUS")
            row = cur.fetchone()
            return dict(row) if row else {}
        finally:
            c.close()

    def note(self, event, node, detail=""):
        self.history.append({"t": time.time(), "event": event, "node": node, "detail": detail})
        log(f"cluster: {event} {node} {detail}".rstrip())

    # ---- building ------------------------------------------------------------------------------
    def install(self, name):
        n = self.nodes[name]
        shutil.rmtree(n.data, ignore_errors=True)
        if n.relay_dir:
            shutil.rmtree(n.relay_dir, ignore_errors=True)
            os.makedirs(n.relay_dir, exist_ok=True)
        os.makedirs(n.tmpdir, exist_ok=True)
        argv = ["mariadb-install-db", "--no-defaults", f"--datadir={n.data}", f"--tmpdir={n.tmpdir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db", "--innodb-log-file-size=16M", "--innodb-buffer-pool-size=32M"]
        if self.as_root:
            argv.append("--user=root")
        run(argv, timeout=120)

    def add_tmpfs_relay(self, name, size_mb):
        """Put `name`'s relay log on a tmpfs of `size_mb` (for the disk-full fault)."""
        n = self.nodes[name]
        n.tmpfs = os.path.join(self.base, f"{name}-relaytmpfs")
        os.makedirs(n.tmpfs, exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", f"chaos-{os.getpid()}", n.tmpfs],
            timeout=10)
        n.relay_dir = os.path.join(n.tmpfs, "relay")
        os.makedirs(n.relay_dir, exist_ok=True)

    def setup(self):
        """Install and start every node, users and tables on the primary (first), the
        others as replicas; semi-sync switched on once they replicate."""
        names = list(self.nodes)
        for name in names:
            self.install(name)
            self.nodes[name].read_only_at_start = name != self.primary
        for name in names:
            self.spawn(name)
        for name in names:
            self.wait_accepting(name)
        p = self.primary
        # No replica acknowledges yet: without this every statement would wait out the
        # semi-sync timeout.
        if self.sync:
            self.sql(p, "SET GLOBAL rpl_semi_sync_master_enabled = 0")
        self.sql(p, [f"CREATE DATABASE `{DB}`"] + USERS_SQL)
        self.sql(p, TABLES_SQL + [
            "INSERT INTO chaos_load (id) SELECT seq FROM seq_1_to_%d" % LOAD_ROWS], db=DB)
        for name in names:
            if name != p:
                self.follow(name, p, "slave_pos")
        self.note("install", ",".join(names), f"primary {p}")
        missing = self.wait_streaming([n for n in names if n != p], timeout=60)
        if missing:
            raise RuntimeError(f"replicas not replicating: {missing}")
        if not self.wait_caught_up(p, timeout=60):
            raise RuntimeError("replicas did not catch up at setup")
        if self.sync:
            for name in names:
                self.sql(name, "SET GLOBAL rpl_semi_sync_master_enabled = 1")
            # The replicas' IO threads announce themselves as semi-sync when they connect.
            for name in names:
                if name != p:
                    self.sql(name, ["STOP SLAVE IO_THREAD", "START SLAVE IO_THREAD"])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.semi_sync_clients(p) > 0:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("no replica connected as semi-synchronous within 20 s")
            self.note("semi-synchronous replication", ",".join(names), "AFTER_SYNC, timeout 10 s")

    def semi_sync_clients(self, name):
        rows = self.try_sql(name, "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_clients'") or ()
        return int(rows[0][1]) if rows else 0

    # ---- processes -------------------------------------------------------------------------------
    def argv(self, name):
        n = self.nodes[name]
        a = [MARIADBD, "--no-defaults", f"--datadir={n.data}", f"--port={n.port}", f"--bind-address={n.host}",
             f"--socket={n.socket}", f"--pid-file={n.pidfile}", f"--log-error={n.log}", f"--tmpdir={n.tmpdir}",
             f"--server-id={n.server_id}", "--log-bin=mysql-bin", "--log-slave-updates", "--binlog-format=ROW",
             "--gtid-strict-mode=1", "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
             "--innodb-log-file-size=16M", "--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0",
             "--performance-schema=0", "--max-connections=300", "--slave-net-timeout=4",
             # Small files, so the relay log tmpfs never fills by itself and old binlogs
             # go (after ten minutes: nodes that come back need only what is recent).
             "--max-binlog-size=64M", "--max-relay-log-size=16M", "--binlog-expire-logs-seconds=900"]
        if n.relay_dir:
            a += [f"--relay-log={n.relay_dir}/{name}-relay-bin", f"--relay-log-index={n.relay_dir}/{name}-relay-bin.index",
                  "--relay-log-space-limit=96M"]
        if n.read_only_at_start:
            a.append("--read-only=1")
        if n.skip_slave_start:
            a.append("--skip-slave-start")
        if self.sync:
            a += SEMI_SYNC_ARGS
        if self.as_root:
            a.append("--user=root")
        return a

    def spawn(self, name):
        n = self.nodes[name]
        self.reap(name)
        argv = (self.net.prefix(name) if n.ns else []) + self.argv(name)
        out = open(n.out, "ab")
        # `ip netns exec` execs mariadbd: this pid is the server's (one process).
        n.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        out.close()
        n.skip_slave_start = False

    def wait_accepting(self, name, timeout=60):
        n = self.nodes[name]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if n.proc is None or n.proc.poll() is not None:
                raise RuntimeError(f"mariadbd {name} exited while starting; see {n.log}:\n{_tail(n.log)}")
            try:
                self.sql(name, "SELECT 1", timeout=2)
                return
            except Exception as e:
                last = e
            time.sleep(0.1)
        raise RuntimeError(f"{name} does not accept connections after {timeout}s: {last}\n{_tail(n.log)}")

    def start(self, name, timeout=60, skip_slave_start=False):
        if self.running(name):
            return
        self.nodes[name].skip_slave_start = skip_slave_start
        self.spawn(name)
        self.wait_accepting(name, timeout)

    def pid(self, name):
        p = self.nodes[name].proc
        return p.pid if p is not None and p.poll() is None else None

    def running(self, name):
        return self.pid(name) is not None

    def pids(self, name):
        pid = self.pid(name)
        return [pid] if pid else []

    def reap(self, name):
        p = self.nodes[name].proc
        if p is not None:
            try:
                p.wait(0.01)
            except subprocess.TimeoutExpired:
                pass

    def kill9(self, name):
        n = self.nodes[name]
        pid = self.pid(name)
        if pid is None:
            return []
        _signal(pid, signal.SIGKILL)
        try:
            n.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return [pid]

    def stop(self, name, mode="fast", timeout=30):
        """Clean shutdown (SIGTERM, as `mariadb-admin shutdown`), SIGKILL if it has not
        stopped within `timeout` (or at once with mode 'immediate')."""
        n = self.nodes[name]
        pid = self.pid(name)
        if pid is None:
            return 0
        if mode == "immediate":
            self.kill9(name)
            return 0
        _signal(pid, signal.SIGCONT)  # a frozen server cannot shut down
        _signal(pid, signal.SIGTERM)
        try:
            n.proc.wait(timeout)
            return 0
        except subprocess.TimeoutExpired:
            self.kill9(name)
            return 1

    def freeze(self, name):
        pid = self.pid(name)
        if pid is None:
            return []
        _signal(pid, signal.SIGSTOP)
        return [pid]

    def thaw(self, pids):
        for p in pids:
            _signal(p, signal.SIGCONT)

    def wait_reaped(self, name, timeout=10):
        self.reap(name)

    # ---- roles -------------------------------------------------------------------------------------
    def standbys(self):
        return [n for n in self.nodes if n != self.primary]

    def state(self, name, timeout=3):
        """The node's own view: {read_only, replicating (a source configured and a
        thread running), source 'host:port', io, sql, io_errno, gtid_binlog_pos,
        gtid_current_pos, received}; None if it does not answer."""
        try:
            c = self.connect(name, timeout)
        except Exception:
            return None
        try:
            cur = c.cursor()
            cur.execute("SELECT @@read_only, @@gtid_binlog_pos, @@gtid_current_pos, @@gtid_slave_pos, "
                        "@@gtid_binlog_state")
            ro, bpos, cpos, spos, bstate = cur.fetchone()
            d = pymysql.cursors.DictCursor(c)
            d.execute("SHOW SLAVE STATUS")
            ss = d.fetchone() or {}
        except Exception:
            return None
        finally:
            c.close()
        io, sq = ss.get("Slave_IO_Running"), ss.get("Slave_SQL_Running")
        src = f"{ss.get('Master_Host')}:{ss.get('Master_Port')}" if ss else None
        return {"read_only": bool(int(ro)), "source": src, "io": io, "sql": sq,
                "replicating": bool(ss) and (io in ("Yes", "Connecting") or sq == "Yes"),
                "io_errno": int(ss.get("Last_IO_Errno") or 0), "io_error": ss.get("Last_IO_Error") or "",
                "sql_errno": int(ss.get("Last_SQL_Errno") or 0), "sql_error": ss.get("Last_SQL_Error") or "",
                "gtid_binlog_pos": bpos, "gtid_current_pos": cpos, "gtid_slave_pos": spos,
                "gtid_binlog_state": bstate, "received": ss.get("Gtid_IO_Pos") or ""}

    def primaries(self):
        """{name: seqno of @@gtid_current_pos} of the running servers that are writable and
        replicate from nobody."""
        out = {}
        for name in self.nodes:
            if not self.running(name):
                continue
            st = self.state(name)
            if st and not st["read_only"] and not st["replicating"]:
                out[name] = gtid_seq(st["gtid_current_pos"])
        return out

    def most_caught_up(self, candidates):
        """The running replica that has received the most (`Gtid_IO_Pos`, else its
        current position)."""
        best, best_seq = None, -1
        for c in candidates:
            if not self.running(c):
                continue
            st = self.state(c)
            if not st:
                continue
            seq = max(gtid_seq(st["received"]), gtid_seq(st["gtid_current_pos"]))
            if seq > best_seq:
                best, best_seq = c, seq
        return best, best_seq

    def promote(self, name):
        """Operator failover: stop receiving, apply the relay log, then make it a writable
        primary that replicates from nobody."""
        old = self.primary
        st = self.state(name) or {}
        target = st.get("received") or ""
        self.sql(name, "STOP SLAVE IO_THREAD", timeout=20)
        if target:
            self.try_sql(name, f"SELECT MASTER_GTID_WAIT('{target}', 30)", timeout=35)
        self.sql(name, ["STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only = 0"], timeout=20)
        self.primary = name
        self.nodes[name].read_only_at_start = False
        self.note("promote", name, f"(previous primary {old})")

    def adopt_primary(self, name, by):
        """`name` was promoted by someone else (Switchyard): the harness follows (its my.cnf
        now says writable). The old primary's stays as it was until it is a replica."""
        old = self.primary
        self.primary = name
        self.nodes[name].read_only_at_start = False
        self.note("promote", name, f"by {by} (previous primary {old})")

    def follow(self, name, primary, use_gtid="slave_pos"):
        p = self.nodes[primary]
        self.sql(name, ["SET GLOBAL read_only = 1", "STOP SLAVE",
                        f"CHANGE MASTER TO MASTER_HOST = '{p.host}', MASTER_PORT = {p.port}, "
                        f"MASTER_USER = '{REPL_USER}', MASTER_PASSWORD = '{REPL_PASSWORD}', "
                        f"MASTER_USE_GTID = {use_gtid}, MASTER_CONNECT_RETRY = 1, MASTER_HEARTBEAT_PERIOD = 0.5",
                        "START SLAVE"], timeout=20)
        self.nodes[name].read_only_at_start = True

    def repoint(self, name, primary):
        """Make replica `name` follow `primary` from its own position; a restart first if
        it is down."""
        if not self.running(name):
            self.start(name)
        self.follow(name, primary, "slave_pos")
        self.note("repoint", name, f"to {primary}")

    def check_replicating(self, name, primary, timeout=15):
        """After START SLAVE: wait until `name` has caught up with what `primary` had
        (True), or raise Diverged on error 1236, or return False (neither in time)."""
        target = (self.state(primary) or {}).get("gtid_binlog_pos")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state(name)
            if st:
                if st["io_errno"] == 1236:
                    raise Diverged(st["io_error"][:300])
                if st["io"] == "Yes" and st["sql"] == "Yes" and target and \
                        covers(st["gtid_current_pos"], target):
                    return True
            time.sleep(0.2)
        return False

    def rejoin(self, name, primary, why="old primary"):
        """Bring a former primary (crashed or running) back as a replica of `primary`:
        stopped (its sessions end), started read-only without replication, then
        `MASTER_USE_GTID = current_pos`; rebuilt if it has diverged (or does not start).
        Returns the method used."""
        if self.running(name):
            self.stop(name)
        n = self.nodes[name]
        n.read_only_at_start = True
        try:
            self.start(name, skip_slave_start=True)
        except Exception as e:
            log(f"{name} does not start ({str(e)[-200:]}); rebuilding it")
            self.rebuild(name, primary, why=f"does not start: {str(e)[:100]}")
            return "rebuilt (did not start)"
        self.follow(name, primary, "current_pos")
        try:
            ok = self.check_replicating(name, primary)
        except Diverged as d:
            log(f"{name} has diverged from {primary}: {d}; rebuilding it")
            self.rebuild(name, primary, why=f"diverged ({why}): {str(d)[:200]}")
            self.note("rejoin", name, f"as replica of {primary} by rebuild (diverged)")
            return "rebuilt (diverged)"
        self.note("rejoin", name, f"as replica of {primary} by GTID (current_pos)"
                  + ("" if ok else "; not caught up within 15 s"))
        return "gtid rejoin"

    def rebuild(self, name, source, why=""):
        """A new replica of `source` from scratch (see the module docstring)."""
        t0 = time.time()
        if self.running(name):
            self.stop(name, "immediate")
        n = self.nodes[name]
        n.read_only_at_start = True
        self.install(name)
        self.start(name, skip_slave_start=True)
        self.sql(name, ["SET SESSION sql_log_bin = 0", f"CREATE DATABASE `{DB}`"] + USERS_SQL)
        rows = self.copy_tables(source, name)
        self.follow(name, source, "slave_pos")
        secs = round(time.time() - t0, 2)
        self.rebuilds.append({"t": t0, "node": name, "source": source, "why": why, "seconds": secs, "rows": rows})
        self.note("rebuild", name, f"from {source} in {secs}s ({rows} rows): {why}")

    def copy_tables(self, source, dest):
        """Copy the chaos tables from `source` in one consistent snapshot, with its exact
        GTID state, into `dest` (not binlogged there); set `dest`'s binlog state and
        replication position to that snapshot's."""
        lock = self.connect(source, 30)
        snap = self.connect(source, 120)
        dst = self.connect(dest, 120)
        total = 0
        try:
            lc = lock.cursor()
            sc = snap.cursor()
            lc.execute("FLUSH TABLES WITH READ LOCK")
            try:
                lc.execute("SELECT @@gtid_binlog_state, @@gtid_binlog_pos")
                state, pos = lc.fetchone()
                sc.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                sc.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            finally:
                lc.execute("UNLOCK TABLES")
            dc = dst.cursor()
            dc.execute("SET SESSION sql_log_bin = 0")
            dc.execute(f"USE `{DB}`")
            sc.execute(f"USE `{DB}`")
            for t in ("chaos_writes", "chaos_raw", "chaos_load"):
                sc.execute(f"SHOW CREATE TABLE {t}")
                dc.execute(sc.fetchone()[1])
                sc.execute(f"SELECT * FROM {t}")
                while True:
                    batch = sc.fetchmany(5000)
                    if not batch:
                        break
                    marks = "(" + ",".join(["%s"] * len(batch[0])) + ")"
                    dc.executemany(f"INSERT INTO {t} VALUES {marks}", batch)
                    total += len(batch)
            sc.execute("COMMIT")
            dc.execute("RESET MASTER")
            dc.execute("SET GLOBAL gtid_binlog_state = %s", (state,))
            dc.execute("SET GLOBAL gtid_slave_pos = %s", (pos,))
        finally:
            for c in (lock, snap, dst):
                try:
                    c.close()
                except Exception:
                    pass
        return total

    def wait_streaming(self, names, timeout=30):
        """Wait until every node in `names` replicates from the primary with both threads
        running. Returns the ones that do not."""
        p = self.nodes[self.primary]
        deadline = time.monotonic() + timeout
        missing = list(names)
        while True:
            missing = []
            for name in names:
                st = self.state(name) if self.running(name) else None
                if not (st and st["io"] == "Yes" and st["sql"] == "Yes" and st["source"] == p.addr):
                    missing.append(name)
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.3)

    def wait_caught_up(self, primary, timeout=30):
        target = (self.state(primary) or {}).get("gtid_binlog_pos")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(covers((self.state(n) or {}).get("gtid_current_pos", ""), target)
                   for n in self.nodes if n != primary and self.running(n)):
                return True
            time.sleep(0.2)
        return False

    def stop_all(self):
        for name in self.nodes:
            if self.running(name):
                self.stop(name, "immediate")
        for n in self.nodes.values():
            if n.tmpfs:
                run(["umount", "-l", n.tmpfs], check=False, timeout=10)


# ---- GTIDs -----------------------------------------------------------------------------------------
def parse_gtids(text):
    """'0-1-100,0-2-120' -> {(domain, server_id): seqno}."""
    out = {}
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        d, s, n = part.split("-")
        out[(int(d), int(s))] = int(n)
    return out


def gtid_seq(text, domain=0):
    """The highest seqno of `domain` in a GTID list (-1 if none)."""
    return max((n for (d, _), n in parse_gtids(text).items() if d == domain), default=-1)


def covers(pos, target):
    """Does position `pos` (one GTID per domain) reach `target`'s seqno in every domain?"""
    if not target:
        return True
    have = {}
    for (d, _), n in parse_gtids(pos).items():
        have[d] = max(have.get(d, -1), n)
    return all(have.get(d, -1) >= n for (d, _), n in parse_gtids(target).items())


def _tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass



def alive_pid(pid):
    return pid is not None and alive(pid)
