#!/usr/bin/env python3
"""Transaction pooling of a MySQL / MariaDB cluster through Switchyard, with mysqlclient.

Usage: python3 mysql_multiplex_check.py many CLIENTS ROUNDS
       python3 mysql_multiplex_check.py pin

- many: CLIENTS connections to the rw port, all open at once. Each sets its own
  session time zone, then ROUNDS times: INSERT a row, SELECT it back, and read its time
  zone (which must be its own: the proxy hands it connections brought in line with its
  session). Then, with every client still connected and idle, the app user's
  connections on the primary are counted directly (SY_PRIMARY_PORT): the server
  connections the proxy holds.
- pin: a session with a user variable and a temporary table keeps its connection
  while other clients come and go: both are still there afterwards.

Configured by SY_HOST, SY_RW_PORT, SY_PRIMARY_PORT, SY_USER, SY_PASSWORD, SY_DB; table
`fresh (id BIGINT PRIMARY KEY)` must exist. Prints one JSON line.
"""
import json
import os
import random
import sys
import threading

import MySQLdb


def connect(port):
    return MySQLdb.connect(
        host=os.environ.get("SY_HOST", "127.0.0.1"),
        port=int(port),
        user=os.environ["SY_USER"],
        password=os.environ["SY_PASSWORD"],
        database=os.environ["SY_DB"],
        connect_timeout=20,
        autocommit=True,
    )


def one(conn, sql, args=None):
    with conn.cursor() as cursor:
        cursor.execute(sql, args)
        row = cursor.fetchone()
        return row[0] if row else None


def server_connections():
    """The app user's connections on the primary, but this one."""
    direct = connect(os.environ["SY_PRIMARY_PORT"])
    try:
        n = one(direct, "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s",
                (os.environ["SY_USER"],))
        return int(n) - 1
    finally:
        direct.close()


def many(clients, rounds):
    base = random.randrange(1, 1 << 30) * 100_000
    ready = threading.Barrier(clients + 1, timeout=300)
    done = threading.Barrier(clients + 1, timeout=300)
    lock = threading.Lock()
    result = {"ok": 0, "errors": [], "wrong_state": 0, "server_connections": None}

    def client(i):
        zone = f"+{i % 12:02d}:00"
        conn = None
        try:
            conn = connect(os.environ["SY_RW_PORT"])
            one(conn, f"SET time_zone = '{zone}'")
            ready.wait()
            for r in range(rounds):
                row = base + i * rounds + r
                one(conn, "INSERT INTO fresh (id) VALUES (%s)", (row,))
                found = one(conn, "SELECT COUNT(*) FROM fresh WHERE id = %s", (row,))
                seen = one(conn, "SELECT @@session.time_zone")
                with lock:
                    if found == 1:
                        result["ok"] += 1
                    if seen != zone:
                        result["wrong_state"] += 1
        except Exception as e:  # every failure is reported, none hidden
            with lock:
                result["errors"].append(f"client {i}: {e!r}")
            if ready.n_waiting and not ready.broken:
                pass
        finally:
            try:
                done.wait()
            except threading.BrokenBarrierError:
                pass
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        result["errors"].append("not every client connected")
    # Wait until every client finished its rounds (they then wait, connected, at `done`).
    while done.n_waiting < clients and any(t.is_alive() for t in threads):
        threading.Event().wait(0.05)
    result["server_connections"] = server_connections()
    done.wait()
    for t in threads:
        t.join()
    return result


def pin():
    result = {}
    conn = connect(os.environ["SY_RW_PORT"])
    one(conn, "SET @kept = 5")
    one(conn, "CREATE TEMPORARY TABLE scratch (a INT)")
    one(conn, "INSERT INTO scratch VALUES (1), (2), (3)")
    # Others use the pool meanwhile.
    for _ in range(20):
        other = connect(os.environ["SY_RW_PORT"])
        one(other, "SELECT 1")
        other.close()
    result["kept"] = str(one(conn, "SELECT @kept"))
    result["scratch"] = int(one(conn, "SELECT COUNT(*) FROM scratch"))
    other = connect(os.environ["SY_RW_PORT"])
    result["other_sees_kept"] = one(other, "SELECT @kept")
    other.close()
    conn.close()
    return result


def main():
    mode = sys.argv[1]
    if mode == "many":
        out = many(int(sys.argv[2]), int(sys.argv[3]))
    elif mode == "pin":
        out = pin()
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
