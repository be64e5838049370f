#!/usr/bin/env python3
"""Prove that the Python MySQL drivers work through Switchyard's MySQL endpoints.

Usage: python3 mysql_clients_check.py --driver mysqldb|pymysql --rw-port N --ro-port N
           [--blob-mib 20]

mysqlclient (`MySQLdb`, MariaDB Connector/C underneath) or PyMySQL (pure Python),
as the app user (app/app, database app), against a proxy whose rw endpoint reaches
the primary and whose ro endpoint a read-only replica:

- `SELECT @@read_only` is 0 through rw and 1 through ro;
- parameterized statements (quotes, backslashes, non-ASCII, NUL bytes, NULL);
- a transaction rolled back leaves nothing, one committed is there;
- a server error (duplicate key, a write on ro, a database the user may not use)
  leaves the connection usable, on the same server connection;
- `ping()`, `select_db()` (COM_INIT_DB), several statements in one query (mysqlclient);
- LOAD DATA LOCAL INFILE (the server asks the client for the file mid-command), and
  an unbuffered (streaming) cursor abandoned mid-result;
- a 20 MiB LONGBLOB written through rw and read back through rw and (after
  replication) through ro, its sha256 the same everywhere (packets over 16 MiB are
  split into several protocol packets; max_allowed_packet is 64 MiB on the servers).

Each check prints an `ok: ...` line; the last line is `ok: all <driver> checks passed`.
A failure raises (a traceback and exit status 1).
"""
import argparse
import hashlib
import os
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("--driver", choices=["mysqldb", "pymysql"], required=True)
parser.add_argument("--rw-port", type=int, required=True)
parser.add_argument("--ro-port", type=int, required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--blob-mib", type=int, default=20)
args = parser.parse_args()

REPLICATION_TIMEOUT = 15.0
MAX_PACKET = 64 * 1024 * 1024

if args.driver == "mysqldb":
    import MySQLdb as driver

    def connect(port, database="app"):
        kw = {"database": database} if database else {}
        # MariaDB Connector/C's own max_allowed_packet is 1 GiB; the server's counts.
        return driver.connect(host=args.host, port=port, user="app", password="app",
                              connect_timeout=10, autocommit=True, charset="utf8mb4",
                              local_infile=1, **kw)

    def ping(conn):
        conn.ping()

    from MySQLdb.cursors import SSCursor as StreamingCursor
else:
    import pymysql as driver

    def connect(port, database="app"):
        return driver.connect(host=args.host, port=port, user="app", password="app",
                              database=database, connect_timeout=10, autocommit=True,
                              charset="utf8mb4", max_allowed_packet=MAX_PACKET,
                              local_infile=True)

    def ping(conn):
        conn.ping(reconnect=False)  # a dead connection raises instead of reconnecting

    from pymysql.cursors import SSCursor as StreamingCursor

D = args.driver
KV = f"kv_{D}"
BLOBS = f"blobs_{D}"


def one(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def rows(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def expect_error(what, codes, fn):
    try:
        fn()
    except driver.MySQLError as e:
        code = e.args[0] if e.args else None
        assert code in codes, f"{what}: error {e.args!r}, expected one of {codes}"
        return e
    raise AssertionError(f"{what}: no error, expected one of {codes}")


rw = connect(args.rw_port)
ro = connect(args.ro_port)

# Where each endpoint landed, and the read-only flags.
rw_info = one(rw, "SELECT @@read_only, @@tx_read_only, @@port, DATABASE(), CONNECTION_ID()")
ro_info = one(ro, "SELECT @@read_only, @@tx_read_only, @@port, DATABASE(), CONNECTION_ID()")
assert rw_info[:2] == (0, 0) and rw_info[3] == "app", f"rw: {rw_info}"
assert ro_info[:2] == (1, 1) and ro_info[3] == "app", f"ro: {ro_info}"
assert rw_info[2] != ro_info[2], f"rw and ro on the same server port {rw_info[2]}"
print(f"ok: {D} connected; rw on server port {rw_info[2]} (@@read_only=0), "
      f"ro on server port {ro_info[2]} (@@read_only=1, @@tx_read_only=1)")

# Parameterized statements: the driver escapes, the server sees the exact values.
tricky = "it's \"quoted\" \\ back\\slash; ü€😀 -- not a comment"
blob = bytes(range(256)) + b"\x00\x00'\\"
with rw.cursor() as cur:
    cur.execute(f"DROP TABLE IF EXISTS {KV}")
    cur.execute(f"CREATE TABLE {KV} (k INT PRIMARY KEY, v VARCHAR(200), b VARBINARY(300), n INT NULL) "
                "CHARACTER SET utf8mb4")
    cur.execute(f"INSERT INTO {KV} (k, v, b, n) VALUES (%s, %s, %s, %s)", (1, tricky, blob, None))
    cur.executemany(f"INSERT INTO {KV} (k, v, b, n) VALUES (%s, %s, %s, %s)",
                    [(k, f"row {k}", bytes([k]), k * 10) for k in range(2, 12)])
got = one(rw, f"SELECT v, b, n FROM {KV} WHERE k = %s", (1,))
assert (got[0], bytes(got[1]), got[2]) == (tricky, blob, None), f"round trip: {got!r}"
got = one(rw, "SELECT %s + %s, %s", (20, 22, "x'y"))
assert (int(got[0]), got[1]) == (42, "x'y"), f"SELECT with parameters: {got!r}"
total = one(rw, f"SELECT COUNT(*), SUM(n) FROM {KV} WHERE k BETWEEN %s AND %s", (2, 11))
assert tuple(int(x) for x in total) == (10, 650), f"aggregate: {total}"
print(f"ok: {D} parameterized insert/executemany/select round-trip exact values (quotes, UTF-8, NUL bytes, NULL)")

# A transaction rolled back, another committed; a second connection sees only the latter.
other = connect(args.rw_port)
rw.begin()
with rw.cursor() as cur:
    cur.execute(f"INSERT INTO {KV} (k, v) VALUES (%s, %s)", (100, "rolled back"))
    cur.execute(f"UPDATE {KV} SET v = %s WHERE k = %s", ("changed", 2))
    cur.execute(f"SELECT COUNT(*) FROM {KV} WHERE k = 100")
    assert cur.fetchone()[0] == 1, "own insert not visible inside the transaction"
    assert one(other, f"SELECT COUNT(*) FROM {KV} WHERE k = 100")[0] == 0, "uncommitted row visible elsewhere"
rw.rollback()
assert one(rw, f"SELECT COUNT(*) FROM {KV} WHERE k = 100")[0] == 0, "rolled-back insert is there"
assert one(rw, f"SELECT v FROM {KV} WHERE k = 2")[0] == "row 2", "rolled-back update is there"
rw.begin()
with rw.cursor() as cur:
    cur.execute(f"INSERT INTO {KV} (k, v) VALUES (%s, %s)", (101, "committed"))
rw.commit()
assert one(other, f"SELECT v FROM {KV} WHERE k = 101")[0] == "committed", "committed row not visible elsewhere"
other.close()
print(f"ok: {D} transaction rollback leaves nothing, commit is visible to another connection")

# Errors leave the connection usable, on the same server connection.
thread = one(rw, "SELECT CONNECTION_ID()")[0]
e = expect_error("duplicate key", {1062},
                 lambda: one(rw, f"INSERT INTO {KV} (k, v) VALUES (%s, %s)", (1, "dup")))
assert isinstance(e, driver.IntegrityError), f"duplicate key raised {type(e).__name__}"
assert one(rw, f"SELECT COUNT(*) FROM {KV}")[0] == 12
rw.begin()
with rw.cursor() as cur:
    cur.execute(f"INSERT INTO {KV} (k, v) VALUES (%s, %s)", (102, "in a failed transaction"))
expect_error("duplicate key in a transaction", {1062},
             lambda: one(rw, f"INSERT INTO {KV} (k, v) VALUES (%s, %s)", (2, "dup")))
rw.rollback()
assert one(rw, f"SELECT COUNT(*) FROM {KV} WHERE k = 102")[0] == 0
expect_error("syntax error", {1064}, lambda: one(rw, "SELEC 1"))
assert one(rw, "SELECT CONNECTION_ID()")[0] == thread, "the server connection changed after errors"
print(f"ok: {D} duplicate key (1062, {type(e).__name__}), an error inside a transaction and a syntax "
      f"error leave the connection usable (same server thread {thread})")

# ping() (COM_PING) on both endpoints, no reconnect.
for name, conn in (("rw", rw), ("ro", ro)):
    before = one(conn, "SELECT CONNECTION_ID()")[0]
    ping(conn)
    ping(conn)
    assert one(conn, "SELECT CONNECTION_ID()")[0] == before, f"{name}: ping reconnected"
print(f"ok: {D} ping() on rw and ro, same server connection afterwards")

# select_db() is COM_INIT_DB: switch databases on a connection opened without one.
nodb = connect(args.rw_port, database=None)
assert one(nodb, "SELECT DATABASE()")[0] is None, "a database without asking for one"
nodb.select_db("app")
assert one(nodb, "SELECT DATABASE()")[0] == "app"
assert one(nodb, f"SELECT COUNT(*) FROM {KV}")[0] == 12
nodb.select_db("information_schema")
assert one(nodb, "SELECT DATABASE()")[0] == "information_schema"
assert one(nodb, "SELECT COUNT(*) FROM TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s", ("app", KV))[0] == 1
e = expect_error("select_db of a forbidden database", {1044, 1049}, lambda: nodb.select_db("mysql"))
assert one(nodb, "SELECT DATABASE()")[0] == "information_schema", "a failed COM_INIT_DB changed the database"
nodb.select_db("app")
assert one(nodb, "SELECT DATABASE()")[0] == "app"
nodb.close()
ro.select_db("information_schema")
assert one(ro, "SELECT DATABASE()")[0] == "information_schema"
ro.select_db("app")
print(f"ok: {D} select_db() (COM_INIT_DB) app -> information_schema -> refused 'mysql' ({e.args[0]}) "
      "-> app, on rw and ro")

if D == "mysqldb":
    # mysqlclient connects with CLIENT_MULTI_STATEMENTS: several result sets in one query.
    with rw.cursor() as cur:
        cur.execute("SELECT 1; SELECT 2, 3; DO 0; SELECT 'last'")
        sets = [cur.fetchall()]
        while cur.nextset():
            sets.append(cur.fetchall())
    sets = [tuple(tuple(r) for r in s) for s in sets if s]
    assert sets == [((1,),), ((2, 3),), (("last",),)], f"multi-statement results: {sets}"
    print(f"ok: {D} several statements in one query, each result set received")

# LOAD DATA LOCAL INFILE: the server answers the query with a request for the file,
# the client sends it in packets and an empty one; then the OK.
with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
    f.write("".join(f"{i}\tline {i}\n" for i in range(1000, 51000)))
try:
    with rw.cursor() as cur:
        cur.execute(f"LOAD DATA LOCAL INFILE %s INTO TABLE {KV} (k, v)", (f.name,))
        loaded = cur.rowcount
finally:
    os.unlink(f.name)
assert loaded == 50000, f"LOAD DATA LOCAL INFILE loaded {loaded} rows"
assert one(rw, f"SELECT COUNT(*), MAX(v) FROM {KV} WHERE k >= 1000") == (50000, "line 9999")
# A streaming cursor: rows come as the client reads them; closing it halfway makes the
# driver read (and drop) the rest, and the connection goes on.
cur = rw.cursor(StreamingCursor)
cur.execute(f"SELECT k, REPEAT(v, 20) FROM {KV} WHERE k >= 1000 ORDER BY k")
first = [cur.fetchone() for _ in range(10)]
cur.close()
assert [r[0] for r in first] == list(range(1000, 1010)), f"streamed {first}"
assert one(rw, "SELECT CONNECTION_ID()")[0] == thread
with rw.cursor() as cur:
    cur.execute(f"DELETE FROM {KV} WHERE k >= 1000")
print(f"ok: {D} LOAD DATA LOCAL INFILE of 50000 rows, a streaming cursor abandoned after 10 rows")

# The ro endpoint: reads replicated rows, refuses writes, survives the refusal.
def sync_ro():
    """Wait until the ro endpoint's server has replayed everything committed through rw
    so far (MASTER_GTID_WAIT on the primary's GTID position); the seconds it took."""
    pos = one(rw, "SELECT @@gtid_binlog_pos")[0]
    started = time.monotonic()
    waited = one(ro, "SELECT MASTER_GTID_WAIT(%s, %s)", (pos, REPLICATION_TIMEOUT))[0]
    assert waited == 0, f"ro did not reach GTID {pos} within {REPLICATION_TIMEOUT}s ({waited})"
    return time.monotonic() - started


waited = sync_ro()
assert one(ro, f"SELECT COUNT(*), SUM(k = 1 OR k = 101) FROM {KV}") == (12, 2)
got = one(ro, f"SELECT v, b, n FROM {KV} WHERE k = %s", (1,))
assert (got[0], bytes(got[1]), got[2]) == (tricky, blob, None), f"ro round trip: {got!r}"
ro_thread = one(ro, "SELECT CONNECTION_ID()")[0]
e = expect_error("a write through ro", {1290, 1792},
                 lambda: one(ro, f"INSERT INTO {KV} (k, v) VALUES (%s, %s)", (200, "on ro")))
ro.begin()
assert one(ro, f"SELECT COUNT(*) FROM {KV}")[0] == 12
expect_error("a write in an ro transaction", {1290, 1792},
             lambda: one(ro, f"UPDATE {KV} SET v = 'x' WHERE k = %s", (3,)))
ro.rollback()
assert one(ro, "SELECT CONNECTION_ID(), @@tx_read_only") == (ro_thread, 1), "ro session changed"
print(f"ok: {D} ro reads the replicated rows after {waited:.2f}s, refuses writes ({e.args[0]}) "
      "and stays usable")

# A 20 MiB LONGBLOB: one COM_QUERY of more than 16 MiB (continuation packets) going in,
# one row of more than 16 MiB coming back, through rw and, once replicated, through ro.
size = args.blob_mib * 1024 * 1024
data = os.urandom(size)
digest = hashlib.sha256(data).hexdigest()
with rw.cursor() as cur:
    cur.execute(f"DROP TABLE IF EXISTS {BLOBS}")
    cur.execute(f"CREATE TABLE {BLOBS} (id INT PRIMARY KEY, v LONGBLOB)")
    started = time.monotonic()
    cur.execute(f"INSERT INTO {BLOBS} (id, v) VALUES (%s, %s)", (1, data))
    wrote = time.monotonic() - started
length, server_digest = one(rw, f"SELECT LENGTH(v), SHA2(v, 256) FROM {BLOBS} WHERE id = %s", (1,))
assert (length, server_digest) == (size, digest), f"server has {length} bytes, sha256 {server_digest}, want {digest}"
started = time.monotonic()
back = bytes(one(rw, f"SELECT v FROM {BLOBS} WHERE id = %s", (1,))[0])
read = time.monotonic() - started
assert len(back) == size and hashlib.sha256(back).hexdigest() == digest, \
    f"rw read back {len(back)} bytes, sha256 {hashlib.sha256(back).hexdigest()}"
assert one(rw, "SELECT CONNECTION_ID()")[0] == thread, "the big packets cost the session its connection"
print(f"ok: {D} {args.blob_mib} MiB LONGBLOB through rw: written in {wrote:.2f}s, read back in {read:.2f}s, "
      f"sha256 {digest[:16]}... identical on client and server")


waited = sync_ro()
back = bytes(one(ro, f"SELECT v FROM {BLOBS} WHERE id = %s", (1,))[0])
assert len(back) == size and hashlib.sha256(back).hexdigest() == digest, "ro read back a different blob"
print(f"ok: {D} {args.blob_mib} MiB LONGBLOB read back through ro (replicated after {waited:.2f}s), same sha256")

with rw.cursor() as cur:
    cur.execute(f"DROP TABLE {BLOBS}")
rw.close()
ro.close()
print(f"ok: all {D} checks passed")
