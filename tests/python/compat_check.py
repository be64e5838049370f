#!/usr/bin/env python3
"""What client test suites found through Switchyard (issue 14), one check per cause,
with psycopg 3 against a running proxy.

  python3 compat_check.py --port P --mode session|transaction [--split]

--port is the endpoint to test (rw, with read/write splitting on when --split). Prints
one line per check (every check runs) and `ok: all compat checks passed` at the end, or
exits 1 naming what failed and what was seen.
"""

import argparse
import os
import sys
import threading
import time

import psycopg
import psycopg.errors

ARGS = None


def connect(dbname=None, **kw):
    return psycopg.connect(host="127.0.0.1", port=ARGS.port, user="app", password="app",
                           dbname=dbname or "app", connect_timeout=10, **kw)


FAILED = []


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def wait_until_replayed(conn, query, timeout=15.0):
    """Run `query` (a read, so split to a standby) until it returns a non-zero count."""
    deadline = time.monotonic() + timeout
    while True:
        (n,) = conn.execute(query).fetchone()
        if n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"a standby did not replay the change in {timeout} s: {query}")
        time.sleep(0.05)


def check(name):
    """Run a check at once; every check runs, each failure is reported."""
    def wrap(fn):
        try:
            fn()
            print(f"ok: {name}")
        except Exception as e:  # noqa: BLE001 - report any failure, go on with the next
            print(f"FAILED: {name}: {type(e).__name__}: {e}")
            FAILED.append(name)
        return fn
    return wrap


def checks():
    # 1. The pid a session-mode client is shown is its server backend's.
    if ARGS.mode == "session":
        @check("backend pid is the server's (pg_backend_pid, NOTIFY, pg_terminate_backend)")
        def _():
            with connect(autocommit=True) as conn:
                (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
                expect(conn.info.backend_pid == pid, f"info.backend_pid {conn.info.backend_pid} != pg_backend_pid() {pid}")
                conn.execute("LISTEN compat")
                conn.execute("NOTIFY compat, 'hi'")
                n = next(conn.notifies(timeout=5))
                expect(n.pid == pid, f"NOTIFY pid {n.pid} != {pid}")
                with connect(autocommit=True) as killer:
                    killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
                try:
                    conn.execute("SELECT 1")
                    expect(False, "the terminated connection still answers")
                except psycopg.errors.AdminShutdown:
                    pass
                except psycopg.OperationalError as e:
                    expect(getattr(e, "sqlstate", None) in ("57P01", None), f"unexpected error {e!r}")
    else:
        @check("own NOTIFY carries the pid the client was given (LISTEN through the shared listener)")
        def _():
            with connect(autocommit=True) as conn:
                conn.execute("LISTEN compat")
                conn.execute("NOTIFY compat, 'hi'")
                n = next(conn.notifies(timeout=5))
                expect(n.pid == conn.info.backend_pid, f"NOTIFY pid {n.pid} != backend_pid {conn.info.backend_pid}")

    # 2. Protocol strings in the client's encoding, not UTF-8.
    @check("LATIN9 column names and query text")
    def _():
        with connect(autocommit=True) as conn:
            conn.execute("SET client_encoding TO latin9")
            cur = conn.cursor()
            (res,) = cur.execute("""select 'x' as "\u20ac" """).fetchone()
            expect(res == "x" and cur.description[0].name == "\u20ac", f"got {res!r} {cur.description[0].name!r}")
            (res,) = cur.execute("select %s::text", ["\u20ac"]).fetchone()
            expect(res == "\u20ac", f"got {res!r}")
            # Named prepared statement with a non-UTF-8 query, executed twice.
            for _ in range(2):
                (res,) = cur.execute("select '\u20ac' || %s::text", ["x"], prepare=True).fetchone()
                expect(res == "\u20acx", f"got {res!r}")

    # 5. ParameterStatus in the server's spelling.
    @check("client_encoding reported as the server spells it")
    def _():
        with connect(client_encoding="utf8") as conn:
            enc = conn.info.parameter_status("client_encoding")
            expect(enc == "UTF8", f"client_encoding reported as {enc!r}")
            expect(conn.info.encoding == "utf-8", f"encoding {conn.info.encoding}")

    # 3. SERIALIZABLE, read-only or not, is refused by a standby.
    @check("SERIALIZABLE read-only transactions run")
    def _():
        with connect() as conn:
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            conn.read_only = True
            for _ in range(3):
                (v,) = conn.execute("SELECT 1").fetchone()
                expect(v == 1, "select in a serializable read-only transaction")
                conn.commit()
        with connect(autocommit=True) as conn:
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            for _ in range(3):
                with conn.transaction():
                    (iso,) = conn.execute("SHOW transaction_isolation").fetchone()
                    expect(iso == "serializable", f"isolation {iso}")
                    conn.execute("SELECT 1")

    # 4 and 6. State only the primary has, or per node.
    @check("prepared transactions are seen in pg_prepared_xacts")
    def _():
        with connect() as conn:
            conn.tpc_begin(conn.xid(42, "compat-gtrid", "bq"))
            conn.execute("CREATE TABLE IF NOT EXISTS compat_tpc (v int)")
            conn.tpc_prepare()
            conn.close()
        with connect(autocommit=True) as conn:
            rows = conn.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()").fetchall()
            expect(any(r[0].startswith("42_") for r in rows), f"pg_prepared_xacts shows {rows}")
            for (gid,) in rows:
                conn.execute(f"ROLLBACK PREPARED '{gid}'")

    @check("another session's open transaction is seen in pg_stat_activity")
    def _():
        with connect(application_name="compat-probe") as busy:
            busy.execute("SELECT txid_current()")  # a write: on the primary, held open
            with connect(autocommit=True) as conn:
                (n,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'compat-probe'"
                    " AND state = 'idle in transaction'").fetchone()
                expect(n == 1, f"pg_stat_activity shows {n} sessions of the open transaction")
            busy.rollback()

    @check("transaction_read_only as a direct connection reports it")
    def _():
        with connect(autocommit=True) as conn:
            for _ in range(3):
                row = conn.execute("SELECT current_setting('transaction_read_only'),"
                                   " current_setting('default_transaction_read_only')").fetchone()
                expect(row == ("off", "off"), f"got {row} (a standby reports every transaction read-only)")
                (v,) = conn.execute("SHOW transaction_read_only").fetchone()
                expect(v == "off", f"SHOW transaction_read_only: {v}")

    @check("reads of an unlogged table")
    def _():
        with connect(autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS compat_unlogged")
            conn.execute("CREATE UNLOGGED TABLE compat_unlogged (v int)")
            conn.execute("INSERT INTO compat_unlogged VALUES (1), (2)")
            if ARGS.split:
                # Read-your-writes is off here, so a read may reach a standby that has
                # not replayed the CREATE yet (42P01, which a client must see as is).
                # Wait, through the same endpoint, until the standby knows the table:
                # the check is about its refusal to read the table, not about lag.
                wait_until_replayed(conn, "SELECT count(*) FROM pg_class WHERE relname = 'compat_unlogged'")
            for _ in range(3):
                (n,) = conn.execute("SELECT count(*) FROM compat_unlogged").fetchone()
                expect(n == 2, f"count {n}")
            with conn.cursor() as cur:
                cur.execute("SELECT v FROM compat_unlogged ORDER BY v", prepare=True)
                expect(cur.fetchall() == [(1,), (2,)], "prepared read of an unlogged table")
            conn.execute("DROP TABLE compat_unlogged")

    # 7. Statements that need a database free of other sessions.
    @check("CREATE DATABASE ... TEMPLATE a database the pool has connections to")
    def _():
        with connect(autocommit=True) as admin:
            for db in ("compat_copy", "compat_tpl"):
                admin.execute(f"DROP DATABASE IF EXISTS {db}")
            admin.execute("CREATE DATABASE compat_tpl")
        # Use the template database, so a pool holds (idle) connections to it.
        for _ in range(2):
            with connect("compat_tpl", autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS t (v int)")
                conn.execute("SELECT count(*) FROM t")
        with connect(autocommit=True) as admin:
            admin.execute("CREATE DATABASE compat_copy TEMPLATE compat_tpl")
            admin.execute("DROP DATABASE compat_copy")
            # Used again, then dropped: DROP needs it free as well.
            with connect("compat_tpl", autocommit=True) as conn:
                conn.execute("SELECT 1")
            admin.execute("DROP DATABASE compat_tpl")


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["session", "transaction"], required=True)
    p.add_argument("--split", action="store_true")
    ARGS = p.parse_args()
    checks()
    if FAILED:
        print(f"{len(FAILED)} compat check(s) failed")
        sys.exit(1)
    print("ok: all compat checks passed")


if __name__ == "__main__":
    main()
