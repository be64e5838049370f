#!/usr/bin/env python3
"""SQL-level PREPARE / EXECUTE / DEALLOCATE in transaction pooling, for tests/pooling.rs:
CLIENTS clients, each with its own statement under the same name (`q`, multiplying by
the client's own factor, so a client that ran another's statement gets a wrong answer),
execute it ROUNDS times each, over a pool far smaller than the clients; DEALLOCATE and
DEALLOCATE ALL then make the name unknown again, as on a direct connection.

Usage: sql_prepare_check.py --port P [--clients 50] [--rounds 20]
"""
import argparse
import threading

import psycopg
import psycopg.errors

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--clients", type=int, default=50)
p.add_argument("--rounds", type=int, default=20)
a = p.parse_args()


def connect():
    # prepare_threshold=None: psycopg's own protocol-level statements stay out of this.
    return psycopg.connect(host="127.0.0.1", port=a.port, user="app", password="app",
                           dbname="app", autocommit=True, prepare_threshold=None)


errors = []
backends = set()
lock = threading.Lock()
start = threading.Barrier(a.clients)


def client(k):
    try:
        with connect() as conn:
            start.wait(timeout=60)
            conn.execute(f"PREPARE q (int) AS SELECT $1 * {k}, pg_backend_pid()")
            for i in range(a.rounds):
                if i % 5 == 4:
                    # Inside a transaction too.
                    with conn.transaction():
                        v, pid = conn.execute(f"EXECUTE q({i})").fetchone()
                else:
                    v, pid = conn.execute(f"EXECUTE q({i})").fetchone()
                assert v == i * k, f"client {k} round {i}: {v} (another client's statement?)"
                with lock:
                    backends.add(pid)
            conn.execute("DEALLOCATE q")
            try:
                conn.execute("EXECUTE q(1)")
                raise AssertionError("EXECUTE after DEALLOCATE succeeded")
            except psycopg.errors.InvalidSqlStatementName:
                pass
            conn.execute(f"PREPARE q AS SELECT {k}")
            conn.execute("PREPARE r AS SELECT 2")
            assert conn.execute("EXECUTE q").fetchone()[0] == k
            conn.execute("DEALLOCATE ALL")
            for name in ("q", "r"):
                try:
                    conn.execute(f"EXECUTE {name}")
                    raise AssertionError("EXECUTE after DEALLOCATE ALL succeeded")
                except psycopg.errors.InvalidSqlStatementName:
                    pass
    except Exception as e:  # noqa: BLE001 - reported below
        with lock:
            errors.append(f"client {k}: {type(e).__name__}: {e}")


threads = [threading.Thread(target=client, args=(k,)) for k in range(1, a.clients + 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print("\n".join(errors[:10]))
    raise SystemExit(f"{len(errors)} of {a.clients} clients failed")
print(f"ok: {a.clients} clients × {a.rounds} EXECUTEs of their own statement over {len(backends)} server backends")
print("ok: all SQL PREPARE checks passed")
