"""A client that sends a query with a large answer and stops reading it (PyMySQL's
unbuffered cursor, never fetched): with query_timeout_ms the proxy ends the session,
and its server connection goes (counted from another connection)."""
import sys
import time

import pymysql
import pymysql.cursors

port = int(sys.argv[1])


def connect(**kw):
    return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app", **kw)


stuck = connect(cursorclass=pymysql.cursors.SSCursor)
cur = stuck.cursor()
# About 500 MB of answer: far more than the socket buffers hold.
cur.execute("SELECT REPEAT('x', 1000000) FROM seq_1_to_500")
watcher = connect()
query = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT REPEAT%'"
with watcher.cursor() as c:
    c.execute(query)
    print("running:", c.fetchone()[0])
# Not read for longer than the timeout (700 ms) plus the proxy's 1 s settle.
deadline = time.monotonic() + 10
gone = False
while time.monotonic() < deadline:
    time.sleep(0.5)
    with watcher.cursor() as c:
        c.execute(query)
        if c.fetchone()[0] == 0:
            gone = True
            break
print("server query gone:", gone)
assert gone, "the unread query still runs on the server"
try:
    while cur.fetchone() is not None:
        pass
    print("read to the end (unexpected)")
    sys.exit(1)
except (pymysql.err.OperationalError, pymysql.err.InternalError, pymysql.err.InterfaceError) as e:
    print("stuck client ended:", e)
