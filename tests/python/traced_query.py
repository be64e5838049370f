#!/usr/bin/env python3
"""One statement through psycopg 3 (extended protocol: the unnamed statement) carrying a
sqlcommenter traceparent comment, for tests/traces.rs.

Usage: traced_query.py --port P --traceparent 00-TRACE-SPAN-01
"""
import argparse

import psycopg

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--traceparent", required=True)
a = p.parse_args()
with psycopg.connect(host="127.0.0.1", port=a.port, user="app", password="app",
                     dbname="app", autocommit=True) as conn:
    row = conn.execute(f"SELECT %s::int AS traced /*traceparent='{a.traceparent}'*/", (44,)).fetchone()
    assert row == (44,), row
print("ok")
