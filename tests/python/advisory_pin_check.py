#!/usr/bin/env python3
"""Session advisory locks, WITH HOLD cursors and temporary tables in transaction
pooling, for tests/pooling.rs: a client that holds one keeps its server connection
(with pool_size = 1, another client waits for it), and gives it back once it released
all of them.

Usage: advisory_pin_check.py --port P
"""
import argparse
import threading
import time

import psycopg

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
a = p.parse_args()


def connect():
    return psycopg.connect(host="127.0.0.1", port=a.port, user="app", password="app",
                           dbname="app", autocommit=True)


holder, other = connect(), connect()
holder.execute("SELECT pg_advisory_lock(42)")
holder.execute("SELECT pg_advisory_lock(43)")
pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
# Pinned: ten transactions in a row on the same backend.
for _ in range(10):
    with holder.transaction():
        assert holder.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
# The holder's session is where its locks are: the lock is its own, not another's.
assert holder.execute("SELECT pg_try_advisory_lock(42)").fetchone()[0] is True
holder.execute("SELECT pg_advisory_unlock(42)")  # the re-entrant count

done = threading.Event()
served = {}


def wait_for_a_connection():
    served["pid"] = other.execute("SELECT pg_backend_pid()").fetchone()[0]
    done.set()


t = threading.Thread(target=wait_for_a_connection)
t.start()
# One lock released, one still held: still pinned.
holder.execute("SELECT pg_advisory_unlock(42)")
time.sleep(1.0)
assert not done.is_set(), "the other client was served while the locks were held"
print("ok: pinned while a lock is held")
started = time.monotonic()
holder.execute("SELECT pg_advisory_unlock(43)")
assert done.wait(8), "the other client was not served after the last unlock"
t.join()
print(f"ok: the connection went back to the pool after the last unlock ({time.monotonic() - started:.3f} s)")
assert served["pid"] == pid, (served, pid)
# No lock leaked with the connection: the other client takes both at once.
assert other.execute("SELECT pg_try_advisory_lock(42) AND pg_try_advisory_lock(43)").fetchone()[0] is True
other.execute("SELECT pg_advisory_unlock_all()")
print("ok: no lock leaked to the next client")
# The holder goes on, on whichever connection is free.
assert holder.execute("SELECT 7").fetchone()[0] == 7
# unlock_all frees too.
holder.execute("SELECT pg_advisory_lock(44)")
holder.execute("SELECT pg_advisory_unlock_all()")
assert other.execute("SELECT 8").fetchone()[0] == 8


def pinned_until(setup, release, what):
    """`setup` pins the holder; the other client waits until `release` ran."""
    for sql in setup:
        holder.execute(sql)
    served = threading.Event()
    t = threading.Thread(target=lambda: (other.execute("SELECT 9"), served.set()))
    t.start()
    time.sleep(1.0)
    assert not served.is_set(), f"the other client was served while the holder had {what}"
    for sql in release:
        holder.execute(sql)
    assert served.wait(8), f"the other client was not served after {what} was released"
    t.join()
    print(f"ok: {what} pinned until released")


# A WITH HOLD cursor (what Django's iterator() declares in autocommit) pins until CLOSE;
# a temporary table until it is dropped.
pinned_until(["DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 3)"],
             ["FETCH 2 FROM c", "CLOSE c"], "a WITH HOLD cursor")
pinned_until(["CREATE TEMP TABLE scratch (x int)", "INSERT INTO scratch VALUES (1)"],
             ["DROP TABLE scratch"], "a temporary table")
holder.close()
other.close()
print("ok: all advisory lock checks passed")
