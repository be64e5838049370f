#!/usr/bin/env python3
"""Fresh reads on MySQL / MariaDB through Switchyard, with mysqlclient (which asks for
session tracking, so the proxy learns each commit's GTID from its OK packet).

Usage: python3 mysql_fresh_check.py user|token|bad-tokens|split N

- user: one rw and one ro connection, both kept open; N times: INSERT a new row on rw,
  then SELECT it on ro.
- token: N times: INSERT on rw, `SELECT @switchyard_causal_token` on rw, a new ro
  connection, `SET @switchyard_causal_token = '<token>'` on it, SELECT the row.
- split: one rw connection (read_write_split): N times INSERT a row, then SELECT it;
  then a new connection that only reads says which server answers it (`reader`), and
  its settings (`SET time_zone`, `USE information_schema`) must hold for its reads
  (`state`).
- bad-tokens: SET with a malformed token, with another cluster's, with a PostgreSQL
  one, and a statement that names the token in a form the proxy does not answer; each
  must fail with an error and leave the connection usable.

Configured by SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER, SY_PASSWORD, SY_DB; the table
`fresh (id BIGINT PRIMARY KEY)` must exist. Prints one JSON line: how many reads found
their row (`fresh`) and how many did not (`stale`), which server (@@server_id) served
each read (`servers`), the tokens seen, and for bad-tokens the errors.
"""
import json
import os
import random
import sys

import MySQLdb


def connect(port_variable):
    return MySQLdb.connect(
        host=os.environ.get("SY_HOST", "127.0.0.1"),
        port=int(os.environ[port_variable]),
        user=os.environ["SY_USER"],
        password=os.environ["SY_PASSWORD"],
        database=os.environ["SY_DB"],
        connect_timeout=10,
        autocommit=True,
    )


def one(conn, sql, args=None):
    with conn.cursor() as cursor:
        cursor.execute(sql, args)
        row = cursor.fetchone()
        return row[0] if row else None


def read(conn, row_id, result):
    found = one(conn, "SELECT COUNT(*) FROM fresh WHERE id = %s", (row_id,))
    server = str(one(conn, "SELECT @@server_id"))
    result["fresh" if found == 1 else "stale"] += 1
    result["servers"][server] = result["servers"].get(server, 0) + 1


def main():
    mode, n = sys.argv[1], int(sys.argv[2])
    base = random.randrange(1, 1 << 40) * 1000
    result = {"fresh": 0, "stale": 0, "servers": {}, "tokens": [], "errors": []}
    rw = connect("SY_RW_PORT")
    if mode == "user":
        ro = connect("SY_RO_PORT")
        for i in range(n):
            one(rw, "INSERT INTO fresh (id) VALUES (%s)", (base + i,))
            read(ro, base + i, result)
    elif mode == "token":
        for i in range(n):
            one(rw, "INSERT INTO fresh (id) VALUES (%s)", (base + i,))
            token = one(rw, "SELECT @switchyard_causal_token")
            result["tokens"].append(token)
            ro = connect("SY_RO_PORT")
            one(ro, f"SET @switchyard_causal_token = '{token}'")
            read(ro, base + i, result)
            ro.close()
    elif mode == "split":
        for i in range(n):
            one(rw, "INSERT INTO fresh (id) VALUES (%s)", (base + i,))
            read(rw, base + i, result)
        reader = connect("SY_RW_PORT")
        result["reader"] = [str(one(reader, "SELECT @@server_id")) for _ in range(3)]
        # Settings made on the primary connection hold for reads on the replica one.
        one(reader, "SET time_zone = '+03:00'")
        one(reader, "USE information_schema")
        state = reader.cursor()
        state.execute("SELECT @@session.time_zone, DATABASE(), @@server_id")
        result["state"] = [str(v) for v in state.fetchone()]
    elif mode == "bad-tokens":
        ro = connect("SY_RO_PORT")
        for sql in [
            "SET @switchyard_causal_token = 'not-a-token'",
            "SET @switchyard_causal_token = 'sy1.m1.0-1-1'",
            "SET @switchyard_causal_token = 'sy1.1b2f.1.3000148'",
            "SELECT @switchyard_causal_token, 1",
        ]:
            try:
                one(ro, sql)
                result["errors"].append([sql, None, "no error"])
            except MySQLdb.Error as e:
                result["errors"].append([sql, e.args[0], e.args[1]])
            # The connection goes on.
            assert one(ro, "SELECT 1") == 1
        one(ro, "SET @switchyard_causal_token = ''")
        result["tokens"].append(one(ro, "SELECT @switchyard_causal_token"))
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
