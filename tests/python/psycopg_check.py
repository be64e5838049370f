#!/usr/bin/env python3
"""Prove that real PostgreSQL client drivers work through Switchyard.

Runs the same checks with psycopg 3 and psycopg2 against the read-write port
and the read-only port. Every check prints `ok: <driver> <endpoint> <check>`;
the first failure prints a traceback and `FAIL: ...` and exits with status 1.

The read-only port may land on a standby, so only checks that never write run
there (everything except the table round trip, executemany and COPY FROM).

With --transaction-mode it then runs, on the read-write port, the checks that
matter when the proxy pools in transaction mode (each client holds a server
connection only for one transaction or one statement): session state across
statements, protocol-level prepared statements, pipelines, COPY, notices,
server-side and WITH HOLD cursors, the features that pin a client to its
server connection (LISTEN, advisory locks, temp tables, SQL PREPARE), cancel,
and 50 concurrent clients. They print `ok: txn ...`.

Usage:
  python3 psycopg_check.py --rw-port P --ro-port Q [--host 127.0.0.1]
                           [--user app] [--password app] [--dbname app]
                           [--transaction-mode]
"""
import argparse
import datetime
import io
import logging
import random
import select
import sys
import threading
import time
import traceback
import uuid

import psycopg
import psycopg2
import psycopg2.errors

# A cancelled pg_sleep(10) must end long before 10 s; the cancel is sent after
# CANCEL_AFTER s and the query must be gone CANCEL_LIMIT s after it started.
CANCEL_AFTER = 0.5
CANCEL_LIMIT = 3.0


def step(name, fn, *args):
    """Run one check; print `ok: name` or stop the whole script on failure."""
    try:
        detail = fn(*args)
    except Exception as exc:  # any failure ends the run with a clear message
        traceback.print_exc()
        sys.exit(f"FAIL: {name}: {type(exc).__name__}: {exc}")
    print(f"ok: {name}" + (f" ({detail})" if detail is not None else ""), flush=True)


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def run_with_cancel(conn, execute_sleep, canceled_exc):
    """Run pg_sleep(10) and cancel it from another thread, as an app would."""
    timer = threading.Timer(CANCEL_AFTER, conn.cancel)
    start = time.monotonic()
    timer.start()
    try:
        execute_sleep()
    except canceled_exc:
        elapsed = time.monotonic() - start
        expect(elapsed < CANCEL_LIMIT, f"cancel took {elapsed:.2f}s")
        return f"canceled after {elapsed:.2f}s"
    finally:
        timer.cancel()
        conn.rollback()
    raise AssertionError("pg_sleep(10) finished without being canceled")


# --------------------------------------------------------------------------
# psycopg 3
# --------------------------------------------------------------------------

def psycopg3_checks(args, port, endpoint):
    label = f"psycopg3 {endpoint}"
    conn = None
    notices = []

    def connect():
        nonlocal conn
        conn = psycopg.connect(host=args.host, port=port, user=args.user,
                               password=args.password, dbname=args.dbname,
                               connect_timeout=10)
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        return f"server {conn.info.server_version}"

    def select_1():
        expect(conn.execute("SELECT 1").fetchone() == (1,), "SELECT 1 != 1")
        conn.rollback()

    def parameterized():
        row = conn.execute("SELECT %s::int + %s::int, %s::text", (40, 2, "héllo")).fetchone()
        expect(row == (42, "héllo"), f"got {row}")
        conn.rollback()

    def in_recovery():
        (recovery,) = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        conn.rollback()
        if endpoint == "rw":
            expect(recovery is False, "rw endpoint reached a server in recovery")
        return f"pg_is_in_recovery={recovery}"

    def crud_transaction():
        # One transaction covers create/insert/select/update/delete; the table
        # stays (committed) for the executemany and COPY checks below.
        with conn.transaction():
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL)")
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s), (%s, %s)", (1, "a", 2, "b"))
            conn.execute(f"UPDATE {table} SET name = %s WHERE id = %s", ("bb", 2))
            conn.execute(f"DELETE FROM {table} WHERE id = %s", (1,))
            rows = conn.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall()
        expect(rows == [(2, "bb")], f"got {rows}")

    def executemany():
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)",
                            [(i, f"row{i}") for i in range(10, 20)])
        (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        conn.rollback()
        expect(count == 11, f"count {count} != 11")

    def copy_from():
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                for i in range(100, 150):
                    copy.write_row((i, f"copied{i}"))
        (count,) = conn.execute(f"SELECT count(*) FROM {table} WHERE id >= 100").fetchone()
        conn.rollback()
        expect(count == 50, f"count {count} != 50")

    def copy_to():
        # COPY of a query works on standbys too, so this runs on both ports.
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT g, 'x' || g FROM generate_series(1, 1000) g) TO STDOUT") as copy:
                rows = list(copy.rows())
        conn.rollback()
        expect(len(rows) == 1000 and rows[-1] == ("1000", "x1000"), f"got {len(rows)} rows")
        return "1000 rows"

    def named_cursor():
        # A server-side cursor fetches in batches over several round trips.
        with conn.cursor(name="sy_named") as cur:
            cur.itersize = 100
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            total = sum(row[0] for row in cur)
        conn.rollback()
        expect(total == 500500, f"sum {total} != 500500")

    def notice():
        notices.clear()
        conn.execute("DO $$BEGIN RAISE NOTICE 'hello'; END$$")
        conn.rollback()
        expect(notices == ["hello"], f"notices {notices}")

    def error_then_recover():
        try:
            conn.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero as exc:
            expect(exc.sqlstate == "22012", f"sqlstate {exc.sqlstate}")
        else:
            raise AssertionError("division by zero did not raise")
        conn.rollback()
        expect(conn.execute("SELECT 2").fetchone() == (2,), "connection unusable after error")
        conn.rollback()
        return "22012"

    def cancel():
        return run_with_cancel(conn, lambda: conn.execute("SELECT pg_sleep(10)"),
                               psycopg.errors.QueryCanceled)

    def drop_table():
        with conn.transaction():
            conn.execute(f"DROP TABLE {table}")

    # Unique per run; only [a-z0-9_], so it is safe to format into SQL.
    table = f"sy_check_pg3_{uuid.uuid4().hex[:12]}"
    step(f"{label} connect", connect)
    try:
        step(f"{label} select 1", select_1)
        step(f"{label} parameterized", parameterized)
        step(f"{label} pg_is_in_recovery", in_recovery)
        if endpoint == "rw":
            step(f"{label} transaction", crud_transaction)
            step(f"{label} executemany", executemany)
            step(f"{label} copy from", copy_from)
        step(f"{label} copy to", copy_to)
        step(f"{label} named cursor", named_cursor)
        step(f"{label} notice", notice)
        step(f"{label} error", error_then_recover)
        step(f"{label} cancel", cancel)
        # The cancel must hit only the running query, never the session.
        step(f"{label} select after cancel", select_1)
        if endpoint == "rw":
            step(f"{label} drop table", drop_table)
    finally:
        conn.close()


# --------------------------------------------------------------------------
# psycopg2
# --------------------------------------------------------------------------

def psycopg2_checks(args, port, endpoint):
    label = f"psycopg2 {endpoint}"
    conn = None

    def query(sql, params=None):
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def query_no_result(sql):
        with conn.cursor() as cur:
            cur.execute(sql)

    def connect():
        nonlocal conn
        conn = psycopg2.connect(host=args.host, port=port, user=args.user,
                                password=args.password, dbname=args.dbname,
                                connect_timeout=10)
        return f"server {conn.server_version}"

    def select_1():
        expect(query("SELECT 1") == [(1,)], "SELECT 1 != 1")
        conn.rollback()

    def parameterized():
        rows = query("SELECT %s::int + %s::int, %s::text", (40, 2, "héllo"))
        expect(rows == [(42, "héllo")], f"got {rows}")
        conn.rollback()

    def in_recovery():
        [(recovery,)] = query("SELECT pg_is_in_recovery()")
        conn.rollback()
        if endpoint == "rw":
            expect(recovery is False, "rw endpoint reached a server in recovery")
        return f"pg_is_in_recovery={recovery}"

    def crud_transaction():
        with conn:  # commits on success, rolls back on error
            with conn.cursor() as cur:
                cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL)")
                cur.execute(f"INSERT INTO {table} VALUES (%s, %s), (%s, %s)", (1, "a", 2, "b"))
                cur.execute(f"UPDATE {table} SET name = %s WHERE id = %s", ("bb", 2))
                cur.execute(f"DELETE FROM {table} WHERE id = %s", (1,))
            rows = query(f"SELECT id, name FROM {table} ORDER BY id")
        expect(rows == [(2, "bb")], f"got {rows}")

    def executemany():
        with conn, conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)",
                            [(i, f"row{i}") for i in range(10, 20)])
        [(count,)] = query(f"SELECT count(*) FROM {table}")
        conn.rollback()
        expect(count == 11, f"count {count} != 11")

    def copy_from():
        data = io.StringIO("".join(f"{i}\tcopied{i}\n" for i in range(100, 150)))
        with conn, conn.cursor() as cur:
            cur.copy_expert(f"COPY {table} (id, name) FROM STDIN", data)
        [(count,)] = query(f"SELECT count(*) FROM {table} WHERE id >= 100")
        conn.rollback()
        expect(count == 50, f"count {count} != 50")

    def copy_to():
        out = io.StringIO()
        with conn.cursor() as cur:
            cur.copy_expert("COPY (SELECT g, 'x' || g FROM generate_series(1, 1000) g) TO STDOUT", out)
        conn.rollback()
        lines = out.getvalue().splitlines()
        expect(len(lines) == 1000 and lines[-1] == "1000\tx1000", f"got {len(lines)} lines")
        return "1000 rows"

    def named_cursor():
        with conn.cursor(name="sy_named") as cur:
            cur.itersize = 100
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            total = sum(row[0] for row in cur)
        conn.rollback()
        expect(total == 500500, f"sum {total} != 500500")

    def notice():
        del conn.notices[:]
        query_no_result("DO $$BEGIN RAISE NOTICE 'hello'; END$$")
        conn.rollback()
        expect(len(conn.notices) == 1 and "hello" in conn.notices[0], f"notices {conn.notices}")

    def error_then_recover():
        try:
            query("SELECT 1 / 0")
        except psycopg2.errors.DivisionByZero as exc:
            expect(exc.pgcode == "22012", f"pgcode {exc.pgcode}")
        else:
            raise AssertionError("division by zero did not raise")
        conn.rollback()
        expect(query("SELECT 2") == [(2,)], "connection unusable after error")
        conn.rollback()
        return "22012"

    def cancel():
        return run_with_cancel(conn, lambda: query_no_result("SELECT pg_sleep(10)"),
                               psycopg2.errors.QueryCanceled)

    def drop_table():
        with conn:
            query_no_result(f"DROP TABLE {table}")

    # Unique per run; only [a-z0-9_], so it is safe to format into SQL.
    table = f"sy_check_pg2_{uuid.uuid4().hex[:12]}"
    step(f"{label} connect", connect)
    try:
        step(f"{label} select 1", select_1)
        step(f"{label} parameterized", parameterized)
        step(f"{label} pg_is_in_recovery", in_recovery)
        if endpoint == "rw":
            step(f"{label} transaction", crud_transaction)
            step(f"{label} executemany", executemany)
            step(f"{label} copy from", copy_from)
        step(f"{label} copy to", copy_to)
        step(f"{label} named cursor", named_cursor)
        step(f"{label} notice", notice)
        step(f"{label} error", error_then_recover)
        step(f"{label} cancel", cancel)
        # The cancel must hit only the running query, never the session.
        step(f"{label} select after cancel", select_1)
        if endpoint == "rw":
            step(f"{label} drop table", drop_table)
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Transaction pooling (--transaction-mode)
# --------------------------------------------------------------------------
#
# In transaction mode a client holds a server connection only from the start of
# a transaction (or of a lone statement) to the ReadyForQuery that ends it, so
# two statements of one client in autocommit may run on two different server
# backends. Everything below is something an application takes for granted from
# a direct connection and that a pooler has to recreate or protect.
#
# Reads that verify a write run inside an explicit transaction: with
# read_write_split a lone reading statement may go to a standby that has not
# replayed the write yet, while a transaction always goes to the primary.

STATEMENTS = 40       # separate autocommit statements per session-state check
BUSY_CLIENTS = 6      # background clients; stays below the pool size (10) of the test proxy
THREADS = 50          # concurrent clients in the concurrency check...
TRANSACTIONS = 20     # ...each running this many short transactions
NOTIFY_TIMEOUT = 5.0
# Time zones only this script sets; no other client may ever see them.
TEST_ZONES = {"Asia/Tokyo", "America/Sao_Paulo", "Europe/Paris", "Pacific/Auckland"}
TOKYO = datetime.timedelta(hours=9)


def connect3(args, **kwargs):
    """A psycopg 3 connection to the rw port, autocommit unless told otherwise."""
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(host=args.host, port=args.rw_port, user=args.user,
                           password=args.password, dbname=args.dbname,
                           connect_timeout=10, **kwargs)


def connect2(args, autocommit=True):
    conn = psycopg2.connect(host=args.host, port=args.rw_port, user=args.user,
                            password=args.password, dbname=args.dbname,
                            connect_timeout=10)
    conn.autocommit = autocommit
    return conn


class Client:
    """An autocommit connection of either driver, with the two calls the checks
    shared by psycopg 3 and psycopg2 need. Each call is one statement, which a
    transaction pooler may run on any server connection."""

    def __init__(self, driver, args, **psycopg3_options):
        self.driver = driver
        self.conn = connect3(args, **psycopg3_options) if driver == "psycopg3" else connect2(args)

    def one(self, sql, params=None):
        """Run one statement; its first row, or None when it returns no rows."""
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone() if cur.description else None

    def value(self, sql, params=None):
        return self.one(sql, params)[0]

    def close(self):
        self.conn.close()


class Busy:
    """Other clients keep the pool busy while a check runs, so consecutive
    statements of the client under test land on different server connections,
    as they do in production. They also guard the other direction: none of them
    may ever see session state the client under test set (a test time zone, or
    an application_name or search_path containing `sy_tx`), nor fail; a cancel
    routed to the wrong backend would show up here as QueryCanceled. They use
    protocol-level prepared statements (prepare_threshold=0), so they also
    notice a server connection that lost prepared statements the pooler
    believes it has.

        with Busy(args):
            ...  # the check
    """

    QUERY = ("SELECT current_setting('TimeZone'), current_setting('application_name'),"
             " current_setting('search_path'), %s::int, pg_sleep(0.002)::text")

    def __init__(self, args, clients=BUSY_CLIENTS):
        self.args = args
        self.clients = clients
        self.stop = threading.Event()
        self.errors = []
        self.statements = 0
        self.lock = threading.Lock()
        self.threads = []
        # The check starts once every background client has run a statement.
        self.running = threading.Barrier(clients + 1, timeout=20)

    def _run(self):
        try:
            with connect3(self.args, prepare_threshold=0) as conn:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    tz, app, path, echo, _ = conn.execute(self.QUERY, (i,)).fetchone()
                    if tz in TEST_ZONES or "sy_tx" in app or "sy_tx" in path or echo != i:
                        raise AssertionError(f"another client's session state leaked: TimeZone={tz!r} "
                                             f"application_name={app!r} search_path={path!r} echo={echo}")
                    with self.lock:
                        self.statements += 1
                    if i == 1:
                        self.running.wait()
        except Exception as exc:  # reported by __enter__ or __exit__
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.running.abort()

    def __enter__(self):
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        try:
            self.running.wait()
        except threading.BrokenBarrierError:
            self._stop()
            raise AssertionError(f"background clients did not start: {self.errors}") from None
        return self

    def _stop(self):
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def __exit__(self, exc_type, exc, tb):
        self._stop()
        if exc_type is None:
            expect(not self.errors, f"background clients failed: {self.errors}")
        return False


def cleanup(args, *statements):
    """DROP what a check created, on a connection of its own: psycopg 3 answers a
    DROP on a connection with prepared statements with `DEALLOCATE ALL`, which
    only the check that is about it should send."""
    conn = connect2(args)
    try:
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


def in_transaction(client, sql, params=None):
    """One statement inside BEGIN/COMMIT: always on the primary (see above)."""
    client.one("BEGIN")
    try:
        row = client.one(sql, params)
    except Exception:
        client.one("ROLLBACK")
        raise
    client.one("COMMIT")
    return row


def spread(backends):
    """How many server backends served a client; 1 without a pooler."""
    return f"{len(backends)} server backend(s)"


def transaction_mode_checks(args):
    run = uuid.uuid4().hex[:12]  # unique names per run; only [a-z0-9_]
    started = time.monotonic()

    # ---- session state --------------------------------------------------
    # The pooler must replay the client's SETs on whatever server connection the
    # client gets next, and RESET must undo them there too. psycopg 3 also
    # converts timestamptz with the TimeZone the server reported
    # (ParameterStatus), so the value the application sees depends on it.

    def time_zone(driver):
        c = Client(driver, args)
        try:
            with Busy(args):
                default = c.value("SHOW TimeZone")
                expect(default not in TEST_ZONES, f"a fresh session starts with TimeZone {default}")
                c.one("SET TIME ZONE 'Asia/Tokyo'")
                backends = set()
                for i in range(STATEMENTS):
                    tz, ts, pid = c.one("SELECT current_setting('TimeZone'),"
                                        " '2024-01-01 00:00:00+00'::timestamptz, pg_backend_pid()")
                    expect(tz == "Asia/Tokyo", f"statement {i}: TimeZone {tz!r} after SET TIME ZONE")
                    expect(ts.utcoffset() == TOKYO, f"statement {i}: timestamptz came back as {ts}")
                    backends.add(pid)
                if driver == "psycopg3":
                    reported = c.conn.info.parameter_status("TimeZone")
                    expect(reported == "Asia/Tokyo", f"ParameterStatus TimeZone {reported!r}")
                c.one("RESET TIME ZONE")
                for i in range(STATEMENTS):
                    tz = c.value("SELECT current_setting('TimeZone')")
                    expect(tz == default, f"statement {i}: TimeZone {tz!r} after RESET, expected {default!r}")
                if driver == "psycopg3":
                    reported = c.conn.info.parameter_status("TimeZone")
                    expect(reported == default, f"ParameterStatus TimeZone {reported!r} after RESET")
            return f"{STATEMENTS} statements on {spread(backends)}, default {default}"
        finally:
            c.close()

    def search_path(driver):
        schema = f"sy_tx_{run}_{driver}"
        c = Client(driver, args)
        try:
            default = c.value("SHOW search_path")
            c.one(f"CREATE SCHEMA {schema}")
            c.one(f"CREATE TABLE {schema}.marker (v text)")
            c.one(f"INSERT INTO {schema}.marker VALUES ('found')")
            with Busy(args):
                c.one(f"SET search_path TO {schema}, public")
                for i in range(STATEMENTS):
                    path = c.value("SELECT current_setting('search_path')")
                    expect(path == f"{schema}, public", f"statement {i}: search_path {path!r}")
                # Unqualified names resolve through it (in transactions: see above).
                for i in range(5):
                    (v,) = in_transaction(c, "SELECT v FROM marker")
                    expect(v == "found", f"marker {v!r}")
                c.one("RESET search_path")
                for i in range(STATEMENTS):
                    path = c.value("SELECT current_setting('search_path')")
                    expect(path == default, f"statement {i}: search_path {path!r} after RESET")
                (found,) = in_transaction(c, "SELECT to_regclass('marker')")
                expect(found is None, f"'marker' still resolves to {found} after RESET")
            cleanup(args, f"DROP SCHEMA {schema} CASCADE")
        finally:
            c.close()

    def application_name(driver):
        name = f"sy_tx_{run}_app"
        c = Client(driver, args)
        try:
            default = c.value("SHOW application_name")
            with Busy(args):
                c.one(f"SET application_name = '{name}'")
                for i in range(STATEMENTS):
                    # pg_stat_activity is what monitoring sees for the backend
                    # that runs the statement.
                    setting, seen = c.one("SELECT current_setting('application_name'), application_name"
                                          " FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                    expect(setting == seen == name, f"statement {i}: {setting!r} / {seen!r}")
                if driver == "psycopg3":
                    reported = c.conn.info.parameter_status("application_name")
                    expect(reported == name, f"ParameterStatus application_name {reported!r}")
                c.one("RESET application_name")
                for i in range(STATEMENTS):
                    setting = c.value("SELECT current_setting('application_name')")
                    expect(setting == default, f"statement {i}: {setting!r} after RESET, expected {default!r}")
        finally:
            c.close()

    # ---- protocol-level prepared statements -------------------------------
    # psycopg 3 prepares a statement once (Parse with a name like _pg3_0) and
    # afterwards only sends Bind/Execute naming it. The next statement may run
    # on a server connection where that name was never prepared: the pooler
    # has to prepare it there.

    def prepared_autocommit():
        query = "SELECT %s::int * 2, %s::text || '!'"
        with Busy(args), connect3(args, prepare_threshold=0) as conn:
            backends = set()
            for i in range(50):
                row = conn.execute(query, (i, f"v{i}")).fetchone()
                expect(row == (2 * i, f"v{i}!"), f"execution {i}: got {row}")
                backends.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
            return f"50 executions on {spread(backends)}"

    def prepared_transaction():
        query = "SELECT %s::int * 3, %s::text || '?'"
        with Busy(args), connect3(args, prepare_threshold=0) as conn:
            for _ in range(2):
                with conn.transaction():
                    for i in range(50):
                        row = conn.execute(query, (i, f"v{i}")).fetchone()
                        expect(row == (3 * i, f"v{i}?"), f"execution {i}: got {row}")
            # The statement prepared inside a transaction is used outside one.
            for i in range(10):
                row = conn.execute(query, (i, "x")).fetchone()
                expect(row == (3 * i, "x?"), f"after the transaction: got {row}")

    def prepare_true():
        # Default threshold, but the application asks for preparation.
        with Busy(args), connect3(args) as conn, conn.cursor() as cur:
            for i in range(20):
                cur.execute("SELECT %s::int + 1, %s::text", (i, "p"), prepare=True)
                expect(cur.fetchone() == (i + 1, "p"), f"execution {i}")

    def prepared_eviction():
        # A small cache makes psycopg close evicted statements (protocol Close
        # with libpq >= 17, else SQL DEALLOCATE) while others stay in use.
        with Busy(args), connect3(args, prepare_threshold=0) as conn:
            conn.prepared_max = 3
            for round_ in range(3):
                for k in range(8):
                    row = conn.execute(f"SELECT {k} + %s::int", (round_,)).fetchone()
                    expect(row == (k + round_,), f"round {round_} query {k}: got {row}")
        return "Close" if psycopg.pq.version() >= 170000 else "DEALLOCATE"

    # ---- pipelines ----------------------------------------------------------
    # A pipeline sends many statements before reading any result; the pooler
    # must keep the server connection until the last Sync is answered and keep
    # the answers in order.

    def pipeline_executemany():
        table = f"sy_tx_{run}_pipeline"
        with Busy(args), connect3(args) as conn:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            with conn.pipeline(), conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)",
                                [(i, f"r{i}") for i in range(500)])
            with conn.transaction():
                row = conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone()
            expect(row == (500, sum(range(500))), f"got {row}")
        cleanup(args, f"DROP TABLE {table}")
        return "500 rows"

    def pipeline_error():
        table = f"sy_tx_{run}_pipeline_err"
        # When the error has already arrived while the block still queues
        # statements, psycopg raises it there and logs the PipelineAborted of
        # the block's exit as a warning: expected here, so kept out of the output.
        psycopg_log = logging.getLogger("psycopg")
        level = psycopg_log.level
        psycopg_log.setLevel(logging.ERROR)
        try:
            pipeline_error_checks(table)
        finally:
            psycopg_log.setLevel(level)

    def pipeline_error_checks(table):
        with Busy(args), connect3(args) as conn:
            conn.execute(f"CREATE TABLE {table} (id int)")
            statements = [f"INSERT INTO {table} VALUES (1)", f"INSERT INTO {table} VALUES (2)",
                          "SELECT 1 / 0", f"INSERT INTO {table} VALUES (4)", "SELECT 5"]
            try:
                with conn.pipeline():
                    for sql in statements:
                        conn.execute(sql)
            except psycopg.errors.DivisionByZero:
                pass
            else:
                raise AssertionError("the failing pipeline did not raise DivisionByZero")
            status = conn.info.transaction_status
            expect(status == psycopg.pq.TransactionStatus.IDLE, f"transaction status {status.name}")
            # Without a Sync in between the five statements form one implicit
            # transaction, so the two inserts before the error are gone too.
            with conn.transaction():
                rows = conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
            expect(rows == [], f"rows {rows} survived the failed pipeline")
            # With a Sync after each statement, the ones before the error commit.
            try:
                with conn.pipeline() as p:
                    for sql in statements:
                        conn.execute(sql)
                        p.sync()
            except psycopg.errors.DivisionByZero:
                pass
            else:
                raise AssertionError("the failing pipeline with syncs did not raise DivisionByZero")
            with conn.transaction():
                rows = conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
            expect(rows == [(1,), (2,)], f"rows {rows}, expected [(1,), (2,)]")
            expect(conn.execute("SELECT 42").fetchone() == (42,), "connection unusable after the error")
        cleanup(args, f"DROP TABLE {table}")

    def pipeline_notices():
        # Notices arrive between the results of a pipeline; none may be lost or
        # delivered to another client.
        notices = []
        with Busy(args), connect3(args) as conn:
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
            with conn.pipeline() as p:
                c1 = conn.execute("SELECT 1")
                conn.execute("DO $$BEGIN RAISE NOTICE 'sy notice one'; END$$")
                c3 = conn.execute("SELECT 3")
                p.sync()
                conn.execute("DO $$BEGIN RAISE NOTICE 'sy notice two'; END$$")
                c5 = conn.execute("SELECT 5")
            results = [c.fetchone() for c in (c1, c3, c5)]
        expect(results == [(1,), (3,), (5,)], f"results {results}")
        expect(notices == ["sy notice one", "sy notice two"], f"notices {notices}")

    # ---- COPY ---------------------------------------------------------------
    # COPY switches the connection into a sub-protocol (CopyIn/CopyOut) that the
    # pooler must follow to find where the statement really ends.

    def copy3():
        table = f"sy_tx_{run}_copy3"
        with Busy(args), connect3(args) as conn:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
            with conn.cursor() as cur:
                # Outside a transaction.
                with cur.copy(f"COPY {table} FROM STDIN") as copy:
                    for i in range(100):
                        copy.write_row((i, f"out{i}"))
                with cur.copy("COPY (SELECT g, 'x' || g FROM generate_series(1, 500) g) TO STDOUT") as copy:
                    rows = list(copy.rows())
                expect(len(rows) == 500 and rows[-1] == ("500", "x500"), f"COPY TO got {len(rows)} rows")
                # Inside a transaction: both directions, and the rows are
                # visible to the same transaction.
                with conn.transaction():
                    with cur.copy(f"COPY {table} FROM STDIN") as copy:
                        for i in range(100, 200):
                            copy.write_row((i, f"in{i}"))
                    with cur.copy(f"COPY (SELECT id FROM {table} ORDER BY id) TO STDOUT") as copy:
                        ids = [int(r[0]) for r in copy.rows()]
                    expect(ids == list(range(200)), f"COPY TO in the transaction saw {len(ids)} rows")
                # A rolled-back COPY leaves nothing behind.
                with conn.transaction(force_rollback=True):
                    with cur.copy(f"COPY {table} FROM STDIN") as copy:
                        copy.write_row((999, "rolled back"))
                with conn.transaction():
                    (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                expect(count == 200, f"count {count} != 200")
        cleanup(args, f"DROP TABLE {table}")
        return "200 rows in, 500 + 200 rows out"

    def copy3_error():
        # The server rejects a row in the middle of COPY FROM: the client gets
        # the error and the connection stays usable.
        table = f"sy_tx_{run}_copy3err"
        with connect3(args) as conn:
            conn.execute(f"CREATE TABLE {table} (id int)")
            try:
                with conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as copy:
                    copy.write(b"1\n2\nnot-a-number\n4\n")
            except psycopg.errors.InvalidTextRepresentation:
                pass
            else:
                raise AssertionError("bad COPY data did not raise InvalidTextRepresentation")
            with conn.transaction():
                (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            expect(count == 0, f"count {count} after the failed COPY")
        cleanup(args, f"DROP TABLE {table}")
        return "22P02"

    def copy2():
        table = f"sy_tx_{run}_copy2"
        c = Client("psycopg2", args)
        try:
            with Busy(args):
                c.one(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
                with c.conn.cursor() as cur:
                    data = io.StringIO("".join(f"{i}\tout{i}\n" for i in range(100)))
                    cur.copy_expert(f"COPY {table} FROM STDIN", data)
                    out = io.StringIO()
                    cur.copy_expert("COPY (SELECT g FROM generate_series(1, 500) g) TO STDOUT", out)
                    expect(len(out.getvalue().splitlines()) == 500, "COPY TO outside a transaction")
                    cur.execute("BEGIN")
                    data = io.StringIO("".join(f"{i}\tin{i}\n" for i in range(100, 200)))
                    cur.copy_expert(f"COPY {table} FROM STDIN", data)
                    out = io.StringIO()
                    cur.copy_expert(f"COPY (SELECT id FROM {table} ORDER BY id) TO STDOUT", out)
                    cur.execute("COMMIT")
                    ids = [int(line) for line in out.getvalue().splitlines()]
                    expect(ids == list(range(200)), f"COPY TO in the transaction saw {len(ids)} rows")
                (count,) = in_transaction(c, f"SELECT count(*) FROM {table}")
                expect(count == 200, f"count {count} != 200")
            cleanup(args, f"DROP TABLE {table}")
        finally:
            c.close()

    # ---- cursors --------------------------------------------------------------
    # A server-side cursor lives on one backend. Inside a transaction the whole
    # transaction holds the connection; a WITH HOLD cursor in autocommit outlives
    # its transaction, so the client must stay pinned to that backend until it
    # is closed (Django's QuerySet.iterator() does exactly this).

    def cursor_in_transaction3():
        with Busy(args), connect3(args) as conn:
            with conn.transaction(), conn.cursor(name=f"sy_tx_{run}_c3") as cur:
                cur.execute("SELECT g FROM generate_series(1, 1000) g")
                total, batches = 0, 0
                while rows := cur.fetchmany(100):
                    total += sum(r[0] for r in rows)
                    batches += 1
                    # Other statements of the same transaction in between.
                    expect(conn.execute("SELECT 1").fetchone() == (1,), "statement between fetches")
            expect(total == 500500 and batches == 10, f"sum {total} in {batches} batches")
        return f"{batches} batches"

    def cursor_with_hold3():
        with Busy(args), connect3(args) as conn:
            cur = conn.cursor(name=f"sy_tx_{run}_h3", withhold=True)
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            total, batches = 0, 0
            while rows := cur.fetchmany(150):
                total += sum(r[0] for r in rows)
                batches += 1
                expect(conn.execute("SELECT 1").fetchone() == (1,), "statement between fetches")
            cur.close()
            expect(total == 500500 and batches == 7, f"sum {total} in {batches} batches")
            expect(conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "left in a transaction")
        return f"{batches} batches"

    def cursor_in_transaction2():
        conn = connect2(args, autocommit=False)
        try:
            with conn, conn.cursor(f"sy_tx_{run}_c2") as cur:
                cur.execute("SELECT g FROM generate_series(1, 1000) g")
                total, batches = 0, 0
                while rows := cur.fetchmany(100):
                    total += sum(r[0] for r in rows)
                    batches += 1
            expect(total == 500500 and batches == 10, f"sum {total} in {batches} batches")
        finally:
            conn.close()
        return f"{batches} batches"

    def cursor_with_hold2():
        c = Client("psycopg2", args)
        try:
            with Busy(args):
                cur = c.conn.cursor(f"sy_tx_{run}_h2", withhold=True)
                cur.execute("SELECT g FROM generate_series(1, 1000) g")
                total, batches = 0, 0
                while rows := cur.fetchmany(150):
                    total += sum(r[0] for r in rows)
                    batches += 1
                    expect(c.value("SELECT 1") == 1, "statement between fetches")
                cur.close()
            expect(total == 500500 and batches == 7, f"sum {total} in {batches} batches")
        finally:
            c.close()
        return f"{batches} batches"

    # ---- features that pin the client to its server connection -------------
    # What they create lives on the backend. While the client is connected it
    # must keep that backend; once it disconnects, nothing it left there may
    # reach the next client: the pooler has to reset the backend (DISCARD ALL)
    # or close it before handing it on.

    def expect_gone(driver, sql, params, what):
        """From a new client (in a pooler likely to get the disconnected
        client's backend next), `sql` must keep returning something falsy."""
        fresh = Client(driver, args)
        try:
            for _ in range(20):
                found = fresh.value(sql, params)
                expect(not found, f"a new client sees {what} of a client that disconnected ({found})")
        finally:
            fresh.close()

    def listen_notify(driver):
        # LISTEN registers the backend, not the client: the notification must
        # reach this client even though it runs statements in between.
        channel = f"sy_tx_{run}_chan"
        listener, notifier = Client(driver, args), Client(driver, args)
        try:
            with Busy(args):
                listener.one(f"LISTEN {channel}")
                for _ in range(5):
                    expect(listener.value("SELECT 1") == 1, "statement after LISTEN")
                # 1. Delivered while the listener sits idle.
                notifier.one(f"NOTIFY {channel}, 'x'")
                got = wait_notify(listener, NOTIFY_TIMEOUT)
                expect(got == (channel, "x"), f"idle listener got {got}")
                # 2. Delivered while the listener runs a statement: it arrives
                # among that statement's results.
                timer = threading.Timer(0.1, notifier.one, (f"NOTIFY {channel}, 'y'",))
                timer.start()
                listener.one("SELECT pg_sleep(0.5)")
                timer.join()
                got = wait_notify(listener, NOTIFY_TIMEOUT)
                expect(got == (channel, "y"), f"busy listener got {got}")
                listener.close()  # still listening
                expect_gone(driver, "SELECT count(*) FROM pg_listening_channels() c WHERE c = %s",
                            (channel,), "the LISTEN")
        finally:
            listener.close()
            notifier.close()

    def wait_notify(client, timeout):
        """(channel, payload) of the next notification, waiting at most timeout s."""
        if client.driver == "psycopg3":
            for n in client.conn.notifies(timeout=timeout, stop_after=1):
                return n.channel, n.payload
            raise AssertionError(f"no notification within {timeout}s")
        conn = client.conn
        deadline = time.monotonic() + timeout
        while True:
            conn.poll()
            if conn.notifies:
                n = conn.notifies.pop(0)
                return n.channel, n.payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no notification within {timeout}s")
            select.select([conn], [], [], remaining)

    def advisory_lock(driver):
        # A session advisory lock belongs to the backend that took it: the
        # unlock must run there, and the lock must really be held meanwhile.
        # The key is random so parallel runs on one database cannot collide.
        key = random.randrange(1, 2**62)
        holder, other = Client(driver, args), Client(driver, args)
        try:
            with Busy(args):
                holder.one("SELECT pg_advisory_lock(%s)", (key,))
                for _ in range(5):
                    expect(holder.value("SELECT 1") == 1, "statement while holding the lock")
                expect(other.value("SELECT pg_try_advisory_lock(%s)", (key,)) is False,
                       "another client got the lock while it was held")
                expect(holder.value("SELECT pg_advisory_unlock(%s)", (key,)) is True,
                       "pg_advisory_unlock returned false: the unlock ran on another backend")
                expect(other.value("SELECT pg_try_advisory_lock(%s)", (key,)) is True,
                       "the lock is still held after the unlock")
                expect(other.value("SELECT pg_advisory_unlock(%s)", (key,)) is True, "other's unlock")
                # A client that disconnects holding the lock releases it: the
                # pooler must not hand its backend on with the lock still held.
                holder.one("SELECT pg_advisory_lock(%s)", (key,))
                holder.close()
                deadline = time.monotonic() + 5
                while not other.value("SELECT pg_try_advisory_lock(%s)", (key,)):
                    expect(time.monotonic() < deadline, "the lock outlived its client by 5 s")
                    time.sleep(0.05)
                other.one("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            holder.close()
            other.close()

    def temp_table(driver):
        name = f"sy_tx_{run}_tmp"
        c = Client(driver, args)
        try:
            with Busy(args):
                c.one(f"CREATE TEMP TABLE {name} (v int)")
                for i in range(1, 6):
                    c.one(f"INSERT INTO {name} VALUES (%s)", (i,))
                for _ in range(5):
                    expect(c.value(f"SELECT sum(v) FROM {name}") == 15, "temp table contents")
                c.close()
                expect_gone(driver, "SELECT to_regclass(%s)", (f"pg_temp.{name}",), "the temp table")
        finally:
            c.close()

    def sql_prepare(driver):
        name = f"sy_tx_{run}_p"
        c = Client(driver, args)
        try:
            with Busy(args):
                c.one(f"PREPARE {name} AS SELECT $1::int")
                for i in range(10):
                    expect(c.value(f"EXECUTE {name}({i})") == i, f"EXECUTE {name}({i})")
                c.one(f"DEALLOCATE {name}")
                try:
                    c.one(f"EXECUTE {name}(5)")
                except (psycopg.errors.InvalidSqlStatementName, psycopg2.errors.InvalidSqlStatementName):
                    pass
                else:
                    raise AssertionError("EXECUTE after DEALLOCATE worked")
                expect(c.value("SELECT 7") == 7, "connection unusable after the error")
                c.one(f"PREPARE {name} AS SELECT $1::int")
                c.close()  # without DEALLOCATE
                expect_gone(driver, "SELECT count(*) FROM pg_prepared_statements WHERE name = %s",
                            (name,), "the prepared statement")
        finally:
            c.close()

    # ---- cancel ---------------------------------------------------------------
    # The client's cancel key must reach the backend running its statement now,
    # and only that one (Busy fails if one of its statements is canceled).

    def cancel_autocommit():
        with Busy(args), connect3(args) as conn:
            for _ in range(5):
                conn.execute("SELECT 1")
            detail = run_with_cancel(conn, lambda: conn.execute("SELECT pg_sleep(10)"),
                                     psycopg.errors.QueryCanceled)
            expect(conn.execute("SELECT 3").fetchone() == (3,), "connection unusable after the cancel")
        return detail

    # ---- concurrency ----------------------------------------------------------
    # Many more clients than server connections (the test proxy has 10), each
    # in short transactions: they must wait for a connection, never fail, and
    # keep each transaction on one backend (the SELECT sees the INSERT of the
    # same, uncommitted transaction, and txid_current() does not change).

    def concurrency():
        table = f"sy_tx_{run}_conc"
        setup = Client("psycopg3", args)
        setup.one(f"CREATE TABLE {table} (client int, n int, PRIMARY KEY (client, n))")
        barrier = threading.Barrier(THREADS, timeout=60)
        errors, backends, lock = [], set(), threading.Lock()

        def worker(k):
            # Half of the clients use psycopg 3 (extended protocol), half
            # psycopg2 (simple protocol).
            c = None
            try:
                c = Client("psycopg3" if k % 2 == 0 else "psycopg2", args)
                barrier.wait()
                seen = set()
                for n in range(TRANSACTIONS):
                    c.one("BEGIN")
                    (xid,) = c.one(f"INSERT INTO {table} VALUES (%s, %s) RETURNING txid_current()", (k, n))
                    count, xid2, pid = c.one(f"SELECT count(*), txid_current(), pg_backend_pid()"
                                             f" FROM {table} WHERE client = %s", (k,))
                    c.one("COMMIT")
                    if count != n + 1 or xid2 != xid:
                        raise AssertionError(f"transaction {n}: count {count}, txid {xid} then {xid2}")
                    seen.add(pid)
                with lock:
                    backends.update(seen)
            except Exception as exc:
                with lock:
                    errors.append(f"client {k}: {type(exc).__name__}: {exc}")
                barrier.abort()
            finally:
                if c is not None:
                    c.close()

        start = time.monotonic()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        try:
            real = [e for e in errors if "BrokenBarrierError" not in e] or errors
            expect(not errors, f"{len(errors)} client(s) failed, first: {real[0] if real else ''}")
            (count,) = in_transaction(setup, f"SELECT count(*) FROM {table}")
            expect(count == THREADS * TRANSACTIONS, f"{count} rows, expected {THREADS * TRANSACTIONS}")
            cleanup(args, f"DROP TABLE {table}")
        finally:
            setup.close()
        return (f"{THREADS * TRANSACTIONS} transactions by {THREADS} clients on "
                f"{spread(backends)} in {elapsed:.2f}s")

    # ---- session state edge cases -----------------------------------------------
    # What PostgreSQL does with SETs that do not simply succeed in autocommit: a
    # pooler that records every SET it forwards gets these wrong. No prepared
    # statements here (prepare_threshold=None): psycopg would answer the
    # ROLLBACK with DEALLOCATE ALL, which has a check of its own below.

    def set_in_transactions():
        c = Client("psycopg3", args, prepare_threshold=None)
        try:
            with Busy(args):
                c.one("SET TIME ZONE 'Asia/Tokyo'")
                # A SET in a committed transaction stays.
                c.one("BEGIN")
                c.one("SET TIME ZONE 'America/Sao_Paulo'")
                c.one("COMMIT")
                for i in range(STATEMENTS // 4):
                    tz = c.value("SHOW TimeZone")
                    expect(tz == "America/Sao_Paulo", f"statement {i}: {tz!r} after a committed SET")
                # A SET in a rolled-back transaction is undone.
                c.one("BEGIN")
                c.one("SET TIME ZONE 'Europe/Paris'")
                c.one("ROLLBACK")
                for i in range(STATEMENTS // 4):
                    tz = c.value("SHOW TimeZone")
                    expect(tz == "America/Sao_Paulo", f"statement {i}: {tz!r} after a rolled-back SET")
                # SET LOCAL lasts until the end of its transaction.
                c.one("BEGIN")
                c.one("SET LOCAL TIME ZONE 'Pacific/Auckland'")
                expect(c.value("SHOW TimeZone") == "Pacific/Auckland", "SET LOCAL inside its transaction")
                c.one("COMMIT")
                for i in range(STATEMENTS // 4):
                    tz = c.value("SHOW TimeZone")
                    expect(tz == "America/Sao_Paulo", f"statement {i}: {tz!r} after SET LOCAL")
        finally:
            c.close()

    def failed_set():
        c = Client("psycopg3", args, prepare_threshold=None)
        try:
            with Busy(args):
                c.one("SET TIME ZONE 'Asia/Tokyo'")
                try:
                    c.one("SET TIME ZONE 'No/Such_Zone'")
                except psycopg.errors.InvalidParameterValue:
                    pass
                else:
                    raise AssertionError("SET TIME ZONE 'No/Such_Zone' worked")
                # Names after "timezone" in the alphabet too.
                c.one("SET work_mem = '7MB'")
                for i in range(STATEMENTS // 2):
                    tz, mem = c.one("SELECT current_setting('TimeZone'), current_setting('work_mem')")
                    expect((tz, mem) == ("Asia/Tokyo", "7MB"), f"statement {i}: {tz!r}, {mem!r} after a failed SET")
        finally:
            c.close()

    def set_config():
        # set_config(..., false) is a session-wide SET; Django sets the
        # connection's TimeZone this way.
        c = Client("psycopg3", args, prepare_threshold=None)
        try:
            with Busy(args):
                c.one("SELECT set_config('TimeZone', 'Asia/Tokyo', false)")
                for i in range(STATEMENTS // 2):
                    tz = c.value("SELECT current_setting('TimeZone')")
                    expect(tz == "Asia/Tokyo", f"statement {i}: TimeZone {tz!r} after set_config")
        finally:
            c.close()

    def prepared_after_rollback():
        # After a ROLLBACK (or DROP/ALTER) psycopg 3 sends `DEALLOCATE ALL`,
        # which drops every prepared statement of the backend it runs on,
        # including the ones the pooler prepared there for other clients.
        query = "SELECT %s::int * 5"
        with Busy(args) as busy, connect3(args, prepare_threshold=0) as conn:
            for round_ in range(10):
                for i in range(5):
                    expect(conn.execute(query, (i,)).fetchone() == (5 * i,), f"round {round_}")
                with conn.transaction(force_rollback=True):
                    conn.execute(query, (1,))
            for i in range(50):
                expect(conn.execute(query, (i,)).fetchone() == (5 * i,), f"execution {i} after the rollbacks")
            # Let the background clients go round the pool once more.
            before = busy.statements
            deadline = time.monotonic() + 2
            while busy.statements < before + 100 and time.monotonic() < deadline:
                time.sleep(0.05)

    label = "txn"
    for driver in ("psycopg3", "psycopg2"):
        step(f"{label} {driver} session state TimeZone", time_zone, driver)
        step(f"{label} {driver} session state search_path", search_path, driver)
        step(f"{label} {driver} session state application_name", application_name, driver)
    step(f"{label} psycopg3 prepared statements in autocommit", prepared_autocommit)
    step(f"{label} psycopg3 prepared statements in a transaction", prepared_transaction)
    step(f"{label} psycopg3 execute(prepare=True)", prepare_true)
    step(f"{label} psycopg3 prepared statements evicted from the cache", prepared_eviction)
    step(f"{label} psycopg3 pipeline executemany", pipeline_executemany)
    step(f"{label} psycopg3 pipeline error", pipeline_error)
    step(f"{label} psycopg3 pipeline notices", pipeline_notices)
    step(f"{label} psycopg3 copy", copy3)
    step(f"{label} psycopg3 copy error", copy3_error)
    step(f"{label} psycopg2 copy", copy2)
    step(f"{label} psycopg3 server-side cursor in a transaction", cursor_in_transaction3)
    step(f"{label} psycopg3 WITH HOLD cursor in autocommit", cursor_with_hold3)
    step(f"{label} psycopg2 server-side cursor in a transaction", cursor_in_transaction2)
    step(f"{label} psycopg2 WITH HOLD cursor in autocommit", cursor_with_hold2)
    for driver in ("psycopg3", "psycopg2"):
        step(f"{label} {driver} LISTEN/NOTIFY", listen_notify, driver)
        step(f"{label} {driver} advisory lock", advisory_lock, driver)
        step(f"{label} {driver} temp table", temp_table, driver)
        step(f"{label} {driver} SQL PREPARE", sql_prepare, driver)
    step(f"{label} psycopg3 cancel in autocommit", cancel_autocommit)
    step(f"{label} concurrency", concurrency)
    step(f"{label} psycopg3 SET in transactions and SET LOCAL", set_in_transactions)
    step(f"{label} psycopg3 failed SET", failed_set)
    step(f"{label} psycopg3 set_config", set_config)
    step(f"{label} psycopg3 prepared statements after ROLLBACK (DEALLOCATE ALL)", prepared_after_rollback)
    print(f"ok: transaction mode checks passed in {time.monotonic() - started:.1f}s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rw-port", type=int, required=True)
    parser.add_argument("--ro-port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--user", default="app")
    parser.add_argument("--password", default="app")
    parser.add_argument("--dbname", default="app")
    parser.add_argument("--transaction-mode", action="store_true",
                        help="also run the transaction pooling checks on the rw port")
    args = parser.parse_args()

    print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}), "
          f"psycopg2 {psycopg2.__version__.split()[0]} (libpq {psycopg2.__libpq_version__})",
          flush=True)
    for checks in (psycopg3_checks, psycopg2_checks):
        checks(args, args.rw_port, "rw")
        checks(args, args.ro_port, "ro")
    if args.transaction_mode:
        transaction_mode_checks(args)
    print("ok: all psycopg checks passed")


if __name__ == "__main__":
    main()
