"""A PostgreSQL primary + streaming standbys for the fault suite, one server per network
namespace (or all on loopback).

Like bench/sybench/cluster.py (initdb, pg_basebackup, pg_ctl; as root the servers run
as `postgres` through `runuser`), plus what an operator does during failures: promote,
repoint a standby, bring an old primary back as a standby (pg_rewind, or a new base
backup when rewinding fails), crash (SIGKILL) and freeze (SIGSTOP) a server.

The harness itself talks to every server over its Unix socket as superuser: Unix
sockets are not in any network namespace, so a partition never hides a server from
the harness (only from Switchyard and the other servers).

Per-node settings (address, port, socket directory) live in `chaos_node.conf`, and the
standby's `primary_conninfo` in `postgresql.auto.conf`; both are rewritten after every
base backup and rewind, because those copy the source's files.
"""

import os
import pwd
import shutil
import signal
import time

from .common import alive, children_of, free_port, log, lsn_int, run

PG_BIN_DEFAULT = "/usr/lib/postgresql/15/bin"
DB, USER, PASSWORD = "chaos", "chaos", "chaos-pw"
# The superuser's password: Switchyard's manager login (failover = "automatic") comes
# over TCP, where the servers ask for SCRAM.
SUPERUSER_PASSWORD = "chaos-super"

SHARED_CONF = """
# --- chaos suite (shared by every node; per-node settings in chaos_node.conf) ---
include_if_exists = 'chaos_node.conf'
max_connections = 250
shared_buffers = 64MB
# A throwaway cluster: no fsync. Safe for these faults, which kill processes and never
# the machine, so the page cache survives every crash.
fsync = off
# pg_rewind needs both.
full_page_writes = on
wal_log_hints = on
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 128MB
max_wal_size = 128MB
min_wal_size = 32MB
checkpoint_timeout = 60s
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 1s
# Notice a partitioned peer within seconds, not the default minute.
wal_receiver_timeout = 5s
wal_sender_timeout = 5s
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
log_connections = off
"""


class Node:
    def __init__(self, name, host, port, base, ns):
        self.name = name
        self.host = host          # address Switchyard and the other servers use
        self.port = port
        self.ns = ns              # network namespace or None
        self.data = os.path.join(base, name)
        self.sockdir = os.path.join(base, f"sock-{name}")
        self.log = os.path.join(base, f"{name}.log")
        self.waldir = None        # set when this node's WAL lives on a small tmpfs
        self.tmpfs = None

    @property
    def addr(self):
        return f"{self.host}:{self.port}"


class Cluster:
    def __init__(self, net, base, bin_dir=PG_BIN_DEFAULT, sync=False, names=("n1", "n2", "n3")):
        self.net = net
        self.base = base
        self.bin = bin_dir
        self.sync = sync
        self.as_root = os.geteuid() == 0
        self.nodes = {}
        for name in names:
            port = 5432 if net.kind == "netns" else free_port()
            self.nodes[name] = Node(name, net.ip_of(name), port, base, net.ns_of(name))
        self.primary = names[0]     # who the harness (the "operator") made primary
        self.sync_active = False
        self.history = []           # (time, event, node, detail): what the operator did
        if self.as_root:
            self.pw = pwd.getpwnam("postgres")
            os.chown(base, self.pw.pw_uid, self.pw.pw_gid)
        for n in self.nodes.values():
            os.makedirs(n.sockdir, exist_ok=True)
            self._chown(n.sockdir)

    # ---- commands ---------------------------------------------------------------------
    def _chown(self, path):
        if self.as_root:
            os.chown(path, self.pw.pw_uid, self.pw.pw_gid)

    def _tool(self, tool, *args, node=None, timeout=120, check=True):
        """A PostgreSQL program as `postgres`; inside `node`'s namespace if given (so a
        postmaster it starts, and its WAL receiver, live there)."""
        pre = self.net.prefix(node.name) if node is not None and node.ns else []
        if self.as_root:
            pre = pre + ["runuser", "-u", "postgres", "--"]
        return run(pre + [os.path.join(self.bin, tool), *args], timeout=timeout, check=check,
                   env=dict(os.environ, PGCONNECT_TIMEOUT="5"))

    def psql(self, name, sql, db="postgres", user="postgres", timeout=10):
        """Run `sql` on node `name` over its Unix socket; stdout (-At). Raises on error
        or when the server does not answer within `timeout` (a frozen node)."""
        n = self.nodes[name]
        p = run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", n.sockdir, "-p", str(n.port),
                 "-U", user, "-d", db, "-c", sql], timeout=timeout, check=False,
                env=dict(os.environ, PGCONNECT_TIMEOUT=str(max(1, int(timeout)))))
        if p.returncode != 0:
            raise RuntimeError(f"{name}: {sql[:60]!r}: {(p.stderr or '').strip()[:300]}")
        return p.stdout.strip()

    def try_psql(self, name, sql, **kw):
        try:
            return self.psql(name, sql, **kw)
        except Exception:
            return None

    def note(self, event, node, detail=""):
        self.history.append({"t": time.time(), "event": event, "node": node, "detail": detail})
        log(f"cluster: {event} {node} {detail}".rstrip())

    # ---- config files -----------------------------------------------------------------
    def _write(self, path, text):
        with open(path, "w") as f:
            f.write(text)
        self._chown(path)

    def write_node_conf(self, name):
        n = self.nodes[name]
        text = f"listen_addresses = '{n.host}'\nport = {n.port}\nunix_socket_directories = '{n.sockdir}'\n"
        if self.sync_active:
            # Any one standby must have flushed a commit before it is acknowledged. A
            # primary ignores its own name in the list.
            text += f"synchronous_standby_names = 'ANY 1 ({', '.join(self.nodes)})'\nsynchronous_commit = on\n"
        self._write(os.path.join(n.data, "chaos_node.conf"), text)

    def enable_sync(self):
        """Synchronous replication, once the standbys stream (before, every commit of
        the setup would wait for a standby that does not exist yet)."""
        self.sync_active = True
        for name in self.nodes:
            self.write_node_conf(name)
            self._tool("pg_ctl", "-D", self.nodes[name].data, "reload", timeout=20, check=False)
        self.note("synchronous replication", ",".join(self.nodes), "ANY 1")

    def conninfo(self, standby, primary):
        p = self.nodes[primary]
        # application_name = the standby's name, which synchronous_standby_names lists.
        return (f"host={p.host} port={p.port} user=postgres application_name={standby} "
                "connect_timeout=2 keepalives_idle=2 keepalives_interval=1 keepalives_count=2")

    def write_standby_conf(self, name, primary):
        n = self.nodes[name]
        self._write(os.path.join(n.data, "postgresql.auto.conf"),
                    f"primary_conninfo = '{self.conninfo(name, primary)}'\n")
        self._write(os.path.join(n.data, "standby.signal"), "")

    def write_primary_conf(self, name):
        n = self.nodes[name]
        self._write(os.path.join(n.data, "postgresql.auto.conf"), "")
        try:
            os.unlink(os.path.join(n.data, "standby.signal"))
        except FileNotFoundError:
            pass

    # ---- building -------------------------------------------------------------------------
    def init_primary(self, name, pgbench_scale=2):
        n = self.nodes[name]
        self._tool("initdb", "-D", n.data, "-U", "postgres", "--auth-local=trust", "--no-sync",
                   "-E", "UTF8", "--locale=C")
        with open(os.path.join(n.data, "postgresql.conf"), "a") as f:
            f.write(SHARED_CONF)
        subnet = self.net.subnet + ".0/24" if self.net.kind == "netns" else "127.0.0.1/32"
        self._write(os.path.join(n.data, "pg_hba.conf"),
                    "local all all trust\n"
                    "local replication all trust\n"
                    # Replication between the namespaces; the private subnet exists only there.
                    f"host replication postgres {subnet} trust\n"
                    f"host all all {subnet} scram-sha-256\n")
        self.write_node_conf(name)
        self.start(name)
        self.psql(name, f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(name, f"ALTER ROLE postgres PASSWORD '{SUPERUSER_PASSWORD}'")
        self.psql(name, f"GRANT pg_monitor TO {USER}")
        self.psql(name, f"CREATE DATABASE {DB} OWNER {USER}")
        self.psql(name, "CREATE TABLE chaos_writes (id bigint PRIMARY KEY, worker int NOT NULL, "
                        "at timestamptz NOT NULL DEFAULT clock_timestamp()); "
                        "CREATE TABLE chaos_raw (id bigint PRIMARY KEY)", db=DB, user=USER)
        self._tool("pgbench", "-i", "-q", "-s", str(pgbench_scale), "-h", n.sockdir, "-p", str(n.port),
                   "-U", USER, DB, timeout=300)
        self.primary = name
        self.note("initdb", name)

    def add_tmpfs_wal(self, name, size_mb):
        """Put `name`'s WAL on a tmpfs of `size_mb` (for the disk-full fault)."""
        n = self.nodes[name]
        n.tmpfs = os.path.join(self.base, f"{name}-waltmpfs")
        os.makedirs(n.tmpfs, exist_ok=True)
        # The source names this process, so a later run can unmount it if we die.
        run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", f"chaos-{os.getpid()}", n.tmpfs],
            timeout=10)
        self._chown(n.tmpfs)
        n.waldir = os.path.join(n.tmpfs, "pg_wal")

    def basebackup(self, name, source):
        """(Re)build `name` as a standby of `source` from a fresh base backup."""
        n, s = self.nodes[name], self.nodes[source]
        shutil.rmtree(n.data, ignore_errors=True)
        extra = []
        if n.waldir:
            shutil.rmtree(n.waldir, ignore_errors=True)
            extra = ["--waldir", n.waldir]
        self._tool("pg_basebackup", "-h", s.sockdir, "-p", str(s.port), "-U", "postgres", "-D", n.data,
                   "-X", "stream", "-c", "fast", "--no-sync", *extra, timeout=300)
        self.write_node_conf(name)
        self.write_standby_conf(name, source)

    def add_standby(self, name, source=None):
        self.basebackup(name, source or self.primary)
        self.start(name)
        self.note("standby", name, f"of {source or self.primary}")

    # ---- process control ------------------------------------------------------------------
    def start(self, name, timeout=60):
        n = self.nodes[name]
        self.wait_reaped(name)
        self._tool("pg_ctl", "-D", n.data, "-l", n.log, "-w", "-t", str(timeout), "start",
                   node=n, timeout=timeout + 10)

    def stop(self, name, mode="fast", timeout=20):
        n = self.nodes[name]
        p = self._tool("pg_ctl", "-D", n.data, "-m", mode, "-w", "-t", str(timeout), "stop",
                       timeout=timeout + 10, check=False)
        if self.running(name):
            self.kill9(name)
        return p.returncode

    def postmaster_pid(self, name):
        try:
            with open(os.path.join(self.nodes[name].data, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def running(self, name):
        pid = self.postmaster_pid(name)
        return pid is not None and alive(pid)

    def pids(self, name):
        pid = self.postmaster_pid(name)
        if pid is None or not alive(pid):
            return []
        return [pid] + children_of(pid)

    def kill9(self, name):
        """Crash: SIGKILL to the postmaster and every process it started."""
        pids = self.pids(name)
        for p in pids:
            _signal(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.02)
        return pids

    def wait_reaped(self, name, timeout=10):
        """Wait until the last postmaster's pid is gone from /proc. A killed postmaster
        is a zombie until init reaps it (here about a second later), and PostgreSQL
        (single-user mode for pg_rewind, a new postmaster) takes a zombie holding the
        pid of postmaster.pid for a running server."""
        pid = self.postmaster_pid(name)
        deadline = time.monotonic() + timeout
        while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)

    def freeze(self, name):
        """SIGSTOP the whole server (postmaster first, so it starts no new children)."""
        pm = self.postmaster_pid(name)
        if pm is None or not alive(pm):
            return []
        _signal(pm, signal.SIGSTOP)
        pids = [pm] + children_of(pm)
        for p in pids[1:]:
            _signal(p, signal.SIGSTOP)
        return pids

    def thaw(self, pids):
        for p in reversed(pids):
            _signal(p, signal.SIGCONT)

    # ---- roles ------------------------------------------------------------------------------
    def standbys(self):
        return [n for n in self.nodes if n != self.primary]

    def receive_lsn(self, name):
        v = self.try_psql(name, "SELECT coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())", timeout=5)
        return lsn_int(v) if v else None

    def most_caught_up(self, candidates):
        """The running standby that has received (and flushed) the most WAL."""
        best, best_lsn = None, -1
        for c in candidates:
            if not self.running(c):
                continue
            lsn = self.receive_lsn(c)
            if lsn is not None and lsn > best_lsn:
                best, best_lsn = c, lsn
        return best, best_lsn

    def promote(self, name):
        old = self.primary
        self._tool("pg_ctl", "-D", self.nodes[name].data, "-w", "-t", "30", "promote", timeout=40)
        self.primary = name
        self.write_primary_conf(name)  # so a later restart stays primary
        self.note("promote", name, f"(previous primary {old})")

    def adopt_primary(self, name, by):
        """`name` was promoted by someone else (Switchyard): the harness follows."""
        old = self.primary
        self.primary = name
        self.write_primary_conf(name)
        self.note("promote", name, f"by {by} (previous primary {old})")

    def primaries(self):
        """{name: timeline} of the running servers that are not in recovery."""
        out = {}
        for name in self.nodes:
            if not self.running(name):
                continue
            # No row on a standby (pg_walfile_name() is not allowed there).
            v = self.try_psql(name, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) "
                                    "WHERE NOT pg_is_in_recovery()", timeout=5)
            if v and v.strip():
                out[name] = int(v.strip(), 16)
        return out

    def repoint(self, name, primary):
        """Make standby `name` follow `primary`: new primary_conninfo and a reload (it is
        reloadable since PostgreSQL 13); a restart if the node is down."""
        self.write_standby_conf(name, primary)
        if self.running(name):
            self._tool("pg_ctl", "-D", self.nodes[name].data, "reload", timeout=20, check=False)
        else:
            self.start(name)
        self.note("repoint", name, f"to {primary}")

    def rejoin(self, name, primary):
        """Bring a former primary (crashed or still running) back as a standby of
        `primary`: pg_rewind, else a new base backup. Returns the method used."""
        if self.running(name):
            self.stop(name, "fast")
        self.wait_reaped(name)
        n, p = self.nodes[name], self.nodes[primary]
        # pg_rewind reads the source's timeline from its control file, which a promotion
        # updates only at the next checkpoint: without this it may find "the same
        # timeline" and rewind nothing.
        self.try_psql(primary, "CHECKPOINT", timeout=60)
        method = "pg_rewind"
        r = self._tool("pg_rewind", "-D", n.data, "--no-sync",
                       f"--source-server=host={p.sockdir} port={p.port} user=postgres dbname=postgres",
                       timeout=180, check=False)
        if r.returncode != 0:
            log(f"pg_rewind of {name} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}; "
                "taking a new base backup")
            method = "pg_basebackup"
            self.basebackup(name, primary)
        else:
            if "no rewind required" in (r.stdout + r.stderr):
                method = "pg_rewind (nothing to rewind)"
            # pg_rewind copied the source's configuration files.
            self.write_node_conf(name)
            self.write_standby_conf(name, primary)
        self.start(name)
        self.note("rejoin", name, f"as standby of {primary} by {method}")
        return method

    def wait_streaming(self, names, timeout=30):
        """Wait until every standby in `names` streams from the primary. Returns the
        ones that do not."""
        deadline = time.monotonic() + timeout
        missing = list(names)
        while time.monotonic() < deadline:
            out = self.try_psql(self.primary, "SELECT string_agg(application_name, ',') FROM pg_stat_replication "
                                              "WHERE state = 'streaming'", timeout=5) or ""
            missing = [n for n in names if n not in out.split(",")]
            if not missing:
                return []
            time.sleep(0.3)
        return missing

    def timeline_history(self, name, timeline):
        """{timeline: switch LSN (int)} from `name`'s history file of `timeline`: where
        each earlier timeline of its history ended (empty on timeline 1)."""
        path = os.path.join(self.nodes[name].data, "pg_wal", f"{timeline:08X}.history")
        out = {}
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[0].isdigit():
                        out[int(parts[0])] = lsn_int(parts[1])
        except OSError:
            pass
        return out

    def stop_all(self):
        for name in self.nodes:
            if self.running(name):
                self.stop(name, "immediate", timeout=10)
        for n in self.nodes.values():
            if n.tmpfs:
                run(["umount", "-l", n.tmpfs], check=False, timeout=10)


def cleanup_leftover_mounts():
    """Unmount WAL tmpfs mounts of earlier runs whose harness process is gone."""
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or parts[2] != "tmpfs" or not parts[0].startswith("chaos-"):
            continue
        pid = parts[0][len("chaos-"):]
        if pid.isdigit() and not alive(int(pid)):
            log(f"unmounting leftover tmpfs {parts[1]}")
            run(["umount", "-l", parts[1]], check=False, timeout=10)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

