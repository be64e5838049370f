#!/usr/bin/env python3
"""LISTEN / NOTIFY in transaction pooling without pinning, for tests/pooling.rs.

Usage: listen_check.py --port P --direct-port D [--clients 100] [--channels 10]
                       [--notifications 1000]

CLIENTS psycopg clients (autocommit) LISTEN, client i on channel ch<i % CHANNELS>;
another client sends NOTIFICATIONS with pg_notify over the channels in turn, each with
its number as payload. Every subscriber must get exactly its channel's notifications,
in order, payloads intact. Meanwhile the user's server connections are counted on the
primary directly (D): at most pool_size + 1 (the shared listening connection). Then a
client that LISTENs and never reads is sent far more than Switchyard queues for it: it
must be ended (53400) when it reads again, and the others must go on receiving.
"""
import argparse
import threading
import time

import psycopg

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--direct-port", type=int, required=True)
p.add_argument("--clients", type=int, default=100)
p.add_argument("--channels", type=int, default=10)
p.add_argument("--notifications", type=int, default=1000)
a = p.parse_args()


def connect(port=a.port):
    return psycopg.connect(host="127.0.0.1", port=port, user="app", password="app", dbname="app",
                           autocommit=True)


per_channel = a.notifications // a.channels
ready = threading.Barrier(a.clients + 1)
got = {}
errors = []


def subscriber(i):
    try:
        with connect() as conn:
            conn.execute(f"LISTEN ch{i % a.channels}")
            ready.wait(timeout=120)
            payloads = [(n.channel, n.payload)
                        for n in conn.notifies(timeout=60, stop_after=per_channel)]
            got[i] = payloads
            # The connection still serves statements after all that.
            assert conn.execute("SELECT 1").fetchone() == (1,)
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(f"subscriber {i}: {type(e).__name__}: {e}")
        try:
            ready.abort()
        except Exception:
            pass


most = [0]
stop = threading.Event()


def count_server_connections():
    with connect(a.direct_port) as direct:
        while not stop.is_set():
            # (Not this connection, nor Switchyard's health checks.)
            n = direct.execute("SELECT count(*) - 1 FROM pg_stat_activity WHERE usename = 'app' "
                               "AND backend_type = 'client backend' "
                               "AND application_name <> 'switchyard-health'").fetchone()[0]
            most[0] = max(most[0], n)
            time.sleep(0.05)


counter = threading.Thread(target=count_server_connections)
counter.start()
threads = [threading.Thread(target=subscriber, args=(i,)) for i in range(a.clients)]
for t in threads:
    t.start()
ready.wait(timeout=120)
with connect() as sender:
    for j in range(a.notifications):
        sender.execute("SELECT pg_notify(%s, %s)", (f"ch{j % a.channels}", str(j)))
for t in threads:
    t.join()
stop.set()
counter.join()
if errors:
    raise SystemExit("\n".join(errors[:10]))
for i, payloads in sorted(got.items()):
    ch = f"ch{i % a.channels}"
    want = [(ch, str(j)) for j in range(a.notifications) if j % a.channels == i % a.channels]
    assert payloads == want, f"subscriber {i}: {payloads[:5]}... != {want[:5]}..."
print(f"ok: {a.clients} subscribers got their {per_channel} notifications each, in order; "
      f"at most {most[0]} server connections for the user")

# A subscriber that stops reading: ended, the others unaffected.
slow = connect()
slow.execute("LISTEN slow")
other = connect()
other.execute("LISTEN fine")
with connect() as sender:
    sender.execute("SELECT pg_notify('slow', g || repeat('x', 400)) FROM generate_series(1, 100000) g")
    sender.execute("SELECT pg_notify('fine', 'still here')")
n = next(iter(other.notifies(timeout=30, stop_after=1)), None)
assert n is not None and n.payload == "still here", n
try:
    for _ in slow.notifies(timeout=30):
        pass
    slow.execute("SELECT 1")
    raise SystemExit("FAIL: the subscriber that did not read was not ended")
except psycopg.OperationalError as e:
    # (libpq reports the proxy's FATAL 53400, which comes while no query runs, as the
    # connection closing; the proxy's log says why.)
    print(f"the slow subscriber: {str(e).splitlines()[0]}")
print("ok: a subscriber that stopped reading was ended, the others went on")
# UNLISTEN sent to the server (in a transaction block) and DISCARD ALL end the
# shared LISTENs too.
gone, kept = connect(), connect()
gone.execute("LISTEN gone")
gone.execute("DISCARD ALL")
kept.execute("LISTEN kept")
kept.execute("BEGIN; UNLISTEN kept; COMMIT")
with connect() as sender:
    sender.execute("NOTIFY gone, 'x'")
    sender.execute("NOTIFY kept, 'y'")
for conn in (gone, kept):
    late = list(conn.notifies(timeout=1))
    assert late == [], late
print("ok: DISCARD ALL and an UNLISTEN in a transaction end the LISTENs")
print(f"most={most[0]}")
print("ok: all LISTEN checks passed")
