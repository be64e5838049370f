"""A statement cancelled through Switchyard over TLS: psycopg (libpq) sends the
CancelRequest on a connection of its own; the statement must end with QueryCanceled."""
import os
import threading
import time

import psycopg

with psycopg.connect(os.environ["DSN"], autocommit=True) as conn:
    assert conn.pgconn.ssl_in_use, "the session is not encrypted"
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(10)")
        raise SystemExit("pg_sleep was not cancelled")
    except psycopg.errors.QueryCanceled:
        print(f"cancelled after {time.monotonic() - started:.2f} s")
    # The session goes on.
    assert conn.execute("SELECT 1").fetchone()[0] == 1

# Direct TLS (PostgreSQL 17+ clients: sslnegotiation=direct, ALPN "postgresql"), when
# this libpq supports it.
if psycopg.pq.version() >= 170000:
    with psycopg.connect(os.environ["DSN"] + " sslnegotiation=direct", autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        print("direct TLS ok")
