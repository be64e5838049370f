"""COM_CHANGE_USER through Switchyard (mysqlclient's change_user): the proxy checks the
new user's answer to its own challenge, then logs the server connection in as that
user with the server's challenge. argv: rw_port ro_port."""
import sys

import MySQLdb

rw, ro = int(sys.argv[1]), int(sys.argv[2])


def one(conn, sql):
    cur = conn.cursor()
    cur.execute(sql)
    row = cur.fetchone()
    cur.close()
    return row[0] if row else None


conn = MySQLdb.connect(host="127.0.0.1", port=rw, user="app", password="app", database="app")
assert one(conn, "SELECT CURRENT_USER()") == "app@%"
conn.change_user("app2", "app2", "app")
assert one(conn, "SELECT CURRENT_USER()") == "app2@%", one(conn, "SELECT CURRENT_USER()")
conn.cursor().execute("INSERT INTO t VALUES (7)")
conn.commit()
conn.change_user("app", "app", "app")
assert one(conn, "SELECT CURRENT_USER()") == "app@%"
# A wrong password: 1045, and the session ends (as MySQL does: no guessing passwords
# on an open session).
try:
    conn.change_user("app2", "wrong", "app")
    raise SystemExit("change_user with a wrong password succeeded")
except MySQLdb.OperationalError as e:
    assert e.args[0] == 1045, e
try:
    one(conn, "SELECT 1")
    raise SystemExit("the session went on after a failed change_user")
except MySQLdb.OperationalError:
    pass

# ro: after a change of user the session is still read-only, even on the primary.
r = MySQLdb.connect(host="127.0.0.1", port=ro, user="app", password="app", database="app")
r.change_user("app2", "app2", "app")
assert one(r, "SELECT CURRENT_USER()") == "app2@%"
try:
    r.cursor().execute("INSERT INTO t VALUES (8)")
    raise SystemExit("a write through ro succeeded after change_user")
except MySQLdb.OperationalError as e:
    assert e.args[0] == 1792, e
print("CHANGE-USER-OK")
