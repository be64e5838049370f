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
    with victim.cursor() as c:
        c.execute("SELECT SLEEP(20)")
        result["value"] = c.fetchone()[0]
    result["took"] = time.monotonic() - started


t = threading.Thread(target=sleep)
t.start()
time.sleep(1.0)
killer = connect()
with killer.cursor() as c:
    c.execute("KILL QUERY %d" % victim.thread_id())
t.join(timeout=15)
assert not t.is_alive(), "the query was not interrupted"
# SLEEP() returns 1 when interrupted.
assert result.get("value") == 1 and result["took"] < 10, result
# The victim's connection still works.
with victim.cursor() as c:
    c.execute("SELECT 2")
    assert c.fetchone()[0] == 2
# An id nobody has: the server's own error text, from the proxy.
try:
    with killer.cursor() as c:
        c.execute("KILL QUERY 999999")
    raise SystemExit("KILL of an unknown id succeeded")
except pymysql.err.InternalError as e:
    assert e.args[0] == 1094, e
except pymysql.err.OperationalError as e:
    assert e.args[0] == 1094, e
print("KILLED-OK")
