"""A throwaway replicated PostgreSQL cluster on 127.0.0.1 for the bench.

`initdb` a primary, `pg_basebackup -R` streaming standbys, `pg_ctl` to start, stop,
promote; SIGKILL to crash. As root, server binaries run as `postgres` via
`runuser -u postgres --` (PostgreSQL refuses to run as root). The harness itself talks
to the servers as superuser over their Unix socket, never through a proxy.
"""

import os
import pwd
import signal
import subprocess
import time

from .procs import alive, children_of, free_port, log

PG_BIN_DEFAULT = "/usr/lib/postgresql/15/bin"

SERVER_CONF = """
# --- sybench ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sockdir}'
max_connections = {max_connections}
shared_buffers = 256MB
fsync = off
full_page_writes = off
wal_keep_size = 512MB
max_wal_senders = 10
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 1s
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
"""


class Node:
    def __init__(self, name, port, data):
        self.name = name
        self.port = port
        self.data = data

    @property
    def log(self):
        return self.data + ".log"


class PgCluster:
    def __init__(self, base_dir, registry, bin_dir=PG_BIN_DEFAULT, max_connections=300):
        self.base = base_dir
        self.bin = bin_dir
        self.registry = registry
        self.max_connections = max_connections
        self.nodes = []
        self.sockdir = os.path.join(base_dir, "sock")
        self.as_root = os.geteuid() == 0
        os.makedirs(self.sockdir, exist_ok=True)
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            for d in (base_dir, self.sockdir):
                os.chown(d, pw.pw_uid, pw.pw_gid)
        registry.add("PostgreSQL cluster", self.stop_all)

    # --- commands -----------------------------------------------------------------
    def _argv(self, tool, args):
        exe = os.path.join(self.bin, tool)
        pre = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        return pre + [exe] + list(args)

    def run(self, tool, *args, check=True, timeout=300):
        argv = self._argv(tool, args)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PGCONNECT_TIMEOUT="5"))
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        return p

    def psql(self, i, sql, db="postgres"):
        """Run `sql` (a string, or a list of statements each sent on its own, e.g. VACUUM)."""
        cmds = []
        for stmt in ([sql] if isinstance(sql, str) else sql):
            cmds += ["-c", stmt]
        p = self.run("psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.sockdir,
                     "-p", str(self.nodes[i].port), "-U", "postgres", "-d", db, *cmds)
        return p.stdout.strip()

    # --- lifecycle ----------------------------------------------------------------
    def init_primary(self, name="primary"):
        node = Node(name, free_port(), os.path.join(self.base, name))
        self.run("initdb", "-D", node.data, "-U", "postgres", "--auth-local=trust",
                 "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")
        with open(os.path.join(node.data, "postgresql.conf"), "a") as f:
            f.write(SERVER_CONF.format(sockdir=self.sockdir, max_connections=self.max_connections))
        self.nodes.append(node)
        self.start(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def add_standby(self, name, primary=0):
        node = Node(name, free_port(), os.path.join(self.base, name))
        self.run("pg_basebackup", "-h", self.sockdir, "-p", str(self.nodes[primary].port),
                 "-U", "postgres", "-D", node.data, "-R", "-X", "stream", "-c", "fast", "--no-sync")
        # The copied postgresql.conf carries the primary's port via the command line only,
        # so the standby's own port is given at start.
        self.nodes.append(node)
        self.start(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def start(self, i):
        n = self.nodes[i]
        self.run("pg_ctl", "-D", n.data, "-l", n.log, "-w", "-t", "60",
                 "-o", f"-p {n.port}", "start")

    def stop(self, i, mode="fast"):
        n = self.nodes[i]
        self.run("pg_ctl", "-D", n.data, "-m", mode, "-w", "-t", "30", "stop", check=False)

    def promote(self, i):
        self.run("pg_ctl", "-D", self.nodes[i].data, "-w", "-t", "60", "promote")

    def postmaster_pid(self, i):
        try:
            with open(os.path.join(self.nodes[i].data, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def kill9(self, i):
        """Crash node i: SIGKILL to the postmaster and every process it started."""
        pid = self.postmaster_pid(i)
        if pid is None:
            raise RuntimeError(f"{self.nodes[i].name}: no postmaster.pid")
        kids = children_of(pid)
        for p in [pid] + kids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in [pid] + kids):
            time.sleep(0.01)

    def running(self, i):
        pid = self.postmaster_pid(i)
        return pid is not None and alive(pid)

    def stop_all(self):
        for i in range(len(self.nodes)):
            if self.running(i):
                self.stop(i, "immediate")
            pid = self.postmaster_pid(i)
            if pid is not None and alive(pid):
                self.kill9(i)

    # --- replication --------------------------------------------------------------
    def wait_streaming(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.psql(0, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
            if int(n or 0) >= count:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{count} standby(s) not streaming after {timeout}s")

    def wait_replayed(self, standby, primary=0, timeout=120):
        """Wait until `standby` has replayed everything the primary had written at call time."""
        lsn = self.psql(primary, "SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = self.psql(standby, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")
            if ok == "t":
                return
            time.sleep(0.2)
        log(f"warning: {self.nodes[standby].name} had not replayed {lsn} after {timeout}s")
