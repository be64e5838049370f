#!/usr/bin/env python3
"""LISTEN across a failover, for tests/pooling.rs: LISTEN through Switchyard (transaction
pooling), print `listening`, wait for a line on stdin (the test kills the primary,
promotes the standby and sends a NOTIFY through the proxy meanwhile), then expect the
notification and Switchyard's WARNING that its listening connection moved.

Usage: listen_failover_check.py --port P
"""
import argparse
import sys

import psycopg

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
a = p.parse_args()

notices = []
conn = psycopg.connect(host="127.0.0.1", port=a.port, user="app", password="app", dbname="app",
                       autocommit=True)
conn.add_notice_handler(lambda d: notices.append(d.message_primary))
conn.execute("LISTEN moved")
print("listening", flush=True)
sys.stdin.readline()
got = [n.payload for n in conn.notifies(timeout=30, stop_after=1)]
assert got == ["after the failover"], got
assert any("listening connection was lost" in n for n in notices), notices
assert conn.execute("SELECT 1").fetchone() == (1,)
print("ok: the notification after the failover arrived, with the warning before it")
