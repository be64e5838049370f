#!/usr/bin/env python3
"""One statement through psycopg 3 (extended protocol: the unnamed statement) carrying a
sqlcommenter traceparent comment, for tests/traces.rs.

Usage: traced_query.py --port P --traceparent 00-TRACE-SPAN-01 [--transaction]
"""
import argparse

import psycopg

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--traceparent", required=True)
p.add_argument("--transaction", action="store_true",
               help="two statements in one transaction (psycopg's BEGIN, then COMMIT)")
a = p.parse_args()
sql = f"SELECT %s::int AS traced /*traceparent='{a.traceparent}'*/"
with psycopg.connect(host="127.0.0.1", port=a.port, user="app", password="app",
                     dbname="app", autocommit=not a.transaction) as conn:
    for n in ([45, 46] if a.transaction else [44]):
        row = conn.execute(sql, (n,)).fetchone()
        assert row == (n,), row
    if a.transaction:
        conn.commit()
print("ok")
