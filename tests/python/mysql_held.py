"""A session held through a failure (PyMySQL): connect, say CONNECTED, wait for a line
on stdin (the test kills the node meanwhile), run a query, print what happened.
argv: port."""
import sys

import pymysql

conn = pymysql.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app", password="app", database="app")
print("CONNECTED", flush=True)
sys.stdin.readline()
try:
    with conn.cursor() as c:
        c.execute("SELECT 1")
        print("ANSWERED", c.fetchone()[0])
except pymysql.err.MySQLError as e:
    print("ERROR", e.args[0], e.args[1] if len(e.args) > 1 else "")
