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
