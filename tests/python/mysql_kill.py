"""KILL QUERY through Switchyard: the id a client gets in the greeting is the proxy's,
and killing it must interrupt that session's query on its server (PyMySQL)."""
import sys
import threading
import time

import pymysql

port = int(sys.argv[1])


def connect():
    return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app")


victim = connect()
result = {}


def sleep():
    started = time.monotonic()
    try:
        with victim.cursor() as c:
            c.execute("SELECT SLEEP(20)")
            result["value"] = c.fetchone()[0]
    except pymysql.err.OperationalError as e:
        result["error"] = e.args[0]
    result["took"] = time.monotonic() - started


t = threading.Thread(target=sleep)
t.start()
killer = connect()
# Kill only once the query runs (a KILL QUERY before it would find nothing to stop).
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    with killer.cursor() as c:
        c.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = 'SELECT SLEEP(20)'")
        if c.fetchone()[0] == 1:
            break
    time.sleep(0.05)
else:
    raise SystemExit("the victim's query never showed up in the process list")
with killer.cursor() as c:
    c.execute("KILL QUERY %d" % victim.thread_id())
t.join(timeout=15)
assert not t.is_alive(), "the query was not interrupted"
# Interrupted: MySQL's SLEEP() returns 1, MariaDB fails the query with 1317
# (ER_QUERY_INTERRUPTED).
assert (result.get("value") == 1 or result.get("error") == 1317) and result["took"] < 10, result
# The victim's connection still works.
with victim.cursor() as c:
    c.execute("SELECT 2")
    assert c.fetchone()[0] == 2
# An id that is not one of the proxy's goes to the server, which knows no such thread.
try:
    with killer.cursor() as c:
        c.execute("KILL QUERY 999999")
    raise SystemExit("KILL of an unknown id succeeded")
except pymysql.err.InternalError as e:
    assert e.args[0] == 1094, e
except pymysql.err.OperationalError as e:
    assert e.args[0] == 1094, e
# The proxy's ids are not the server's: KILL of the server's own thread id (what
# CONNECTION_ID() shows) reaches the server too, and kills that connection.
with victim.cursor() as c:
    c.execute("SELECT CONNECTION_ID()")
    server_id = c.fetchone()[0]
assert server_id != victim.thread_id(), (server_id, victim.thread_id())
with killer.cursor() as c:
    c.execute("KILL %d" % server_id)
try:
    with victim.cursor() as c:
        c.execute("SELECT 3")
    raise SystemExit("the victim survived KILL of its server thread")
except pymysql.err.OperationalError:
    pass
print("KILLED-OK")
