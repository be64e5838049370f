#!/usr/bin/env python3
"""A known workload for the query-digest test (tests/query_digests.rs), with psycopg 3
(extended protocol: Parse/Bind/Execute with parameters) in autocommit, so each
statement is its own unit of work:

- INSERTS inserts into digest_t, each with other values;
- SELECTS selects of one shape by id, some carrying a sqlcommenter comment with a
  W3C traceparent (as Django's OpenTelemetry instrumentation adds), which must not
  split the digest.

Usage: digest_workload.py --port P --inserts N --selects M [--first-id ID]
"""
import argparse
import random

import psycopg

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--inserts", type=int, required=True)
p.add_argument("--selects", type=int, required=True)
p.add_argument("--first-id", type=int, default=1000)
a = p.parse_args()

with psycopg.connect(host="127.0.0.1", port=a.port, user="app", password="app",
                     dbname="app", autocommit=True) as conn:
    for i in range(a.inserts):
        conn.execute("INSERT INTO digest_t (id, name) VALUES (%s, %s)", (a.first_id + i, f"name {i}"))
    for i in range(a.selects):
        sql = "SELECT name FROM digest_t WHERE id = %s"
        if i % 2:
            trace = "%032x" % random.getrandbits(128)
            span = "%016x" % random.getrandbits(64)
            sql += f" /*traceparent='00-{trace}-{span}-01'*/"
        conn.execute(sql, (i,)).fetchall()
print("ok")
