"""The servers the suites run against: a primary + 2 streaming standbys on loopback
(bench/sybench's PgCluster), and Switchyard in front of them in one of the targets'
configurations."""

import os
import shutil
import subprocess
import time

from sybench.cluster import PgCluster
from sybench.procs import free_port, log, wait_port

USER = "app"
PASSWORD = "app"

# What each target is: None for the primary itself, else the [clusters.main] lines.
TARGETS = {
    "direct": None,
    "session": 'pool_mode = "session"\n',
    "transaction": 'pool_mode = "transaction"\npool_size = 20\ncheckout_timeout_ms = 20000\n',
    "transaction+split": (
        'pool_mode = "transaction"\npool_size = 20\ncheckout_timeout_ms = 20000\n'
        "read_write_split = true\n"
    ),
}


class Servers:
    """The PostgreSQL cluster, started once per compat run."""

    def __init__(self, base, registry, standbys=2):
        self.base = base
        self.pg = PgCluster(os.path.join(base, "pg"), registry)
        log("starting PostgreSQL 15: a primary and %d streaming standbys" % standbys)
        self.pg.init_primary("default")
        # Two-phase commit tests (psycopg's tpc, SQLAlchemy's TwoPhaseCommitTest) need
        # prepared transactions; standbys copy the setting with the base backup.
        self.pg.psql(0, [
            "ALTER SYSTEM SET max_prepared_transactions = 20",
            "ALTER SYSTEM SET log_min_messages = 'warning'",
        ])
        self.pg.stop(0)
        self.pg.start(0)
        self.pg.psql(0, f"CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'")
        for i in range(standbys):
            self.pg.add_standby(f"failover{i + 1}")
        self.pg.wait_streaming(standbys)
        # A read on a standby right after a commit must see it (read/write split sends
        # the next read there), as in tests/pooling.rs: commits wait for every standby.
        if standbys:
            self.pg.psql(0, [
                f"ALTER SYSTEM SET synchronous_standby_names = 'ANY {standbys} (*)'",
                "ALTER SYSTEM SET synchronous_commit = 'remote_apply'",
                "SELECT pg_reload_conf()",
            ])

    @property
    def primary_port(self):
        return self.pg.nodes[0].port

    def sql(self, statements, db="postgres"):
        return self.pg.psql(0, statements, db=db)

    def fresh_database(self, name, setup=()):
        """Drop and create database `name` owned by the app user, then run `setup`
        (superuser statements) in it."""
        self.sql([f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                  f'CREATE DATABASE "{name}" OWNER {USER}'])
        if setup:
            self.sql(list(setup), db=name)

    def leftover_prepared_xacts(self):
        """Prepared transactions left behind hold locks forever: roll them back."""
        rows = self.sql("SELECT gid || '|' || database FROM pg_prepared_xacts")
        for row in filter(None, rows.splitlines()):
            gid, db = row.rsplit("|", 1)
            log(f"rolling back leftover prepared transaction {gid!r} in {db}")
            self.pg.psql(0, "ROLLBACK PREPARED '%s'" % gid.replace("'", "''"), db=db)


def proxy_config(servers, cluster_lines, rw, ro):
    text = (
        "[health]\ninterval_ms = 500\ntimeout_ms = 1000\nrise = 2\nfall = 2\n\n"
        f'[[users]]\nname = "{USER}"\npassword = "{PASSWORD}"\nauth = "scram-sha-256"\n\n'
        f'[clusters.main]\nlisten_rw = "127.0.0.1:{rw}"\nlisten_ro = "127.0.0.1:{ro}"\n'
        + cluster_lines
    )
    for n in servers.pg.nodes:
        text += f'\n[[clusters.main.nodes]]\nname = "{n.name}"\nhost = "127.0.0.1"\nport = {n.port}\n'
    return text


def psql_through(port, sql, db="postgres"):
    p = subprocess.run(
        ["psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", db,
         "-c", sql],
        capture_output=True, text=True, timeout=20,
        env=dict(os.environ, PGPASSWORD=PASSWORD, PGCONNECT_TIMEOUT="5"),
    )
    return p.stdout.strip() if p.returncode == 0 else None


class Proxy:
    """One switchyard process for one target; stop() ends it."""

    def __init__(self, binary, servers, target, workdir, registry):
        self.target = target
        self.rw, self.ro = free_port(), free_port()
        self.config = os.path.join(workdir, f"switchyard-{safe(target)}.toml")
        self.log = os.path.join(workdir, f"switchyard-{safe(target)}.log")
        with open(self.config, "w") as f:
            f.write(proxy_config(servers, TARGETS[target], self.rw, self.ro))
        env = dict(os.environ, NO_COLOR="1",
                   SWITCHYARD_LOG=os.environ.get("SWITCHYARD_COMPAT_LOG", "info"))
        self.proc = registry.spawn(f"switchyard ({target})", [binary, "--config", self.config],
                                   self.log, env=env)
        wait_port(self.rw, timeout=20, proc=self.proc)
        # Ready when writes reach the primary and reads reach a standby.
        deadline = time.monotonic() + 30
        while True:
            # (With read_write_split the rw endpoint sends a plain read to a standby.)
            w = psql_through(self.rw, "/* switchyard:primary */ SELECT pg_is_in_recovery()")
            r = psql_through(self.ro, "SELECT pg_is_in_recovery()")
            if w == "f" and r == "t":
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"switchyard ({target}) not ready (rw: {w}, ro: {r}); see {self.log}")
            time.sleep(0.2)
        log(f"switchyard ({target}) ready: rw 127.0.0.1:{self.rw}, ro 127.0.0.1:{self.ro}")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        from sybench.procs import stop_process

        stop_process(self.proc)


def safe(target):
    return target.replace("+", "-")


def snapshot_binary(path, workdir):
    """Run a copy of the binary, so a rebuild during the run changes nothing."""
    dst = os.path.join(workdir, "switchyard")
    shutil.copy2(path, dst)
    return dst
