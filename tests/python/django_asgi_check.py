#!/usr/bin/env python3
"""Read-your-writes across requests under ASGI: the test project served by uvicorn,
with django_switchyard's middleware and router, through Switchyard.

Usage: python3 django_asgi_check.py with-middleware|without-middleware

Configured like django_causal_check.py (SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER,
SY_PASSWORD, SY_DB); the tables must exist. Meant for a cluster whose standbys apply
WAL late (recovery_min_apply_delay = '2s').

Over real HTTP, as a browser would: POST /customers/ creates a customer (on `default`)
and redirects; the GET of the redirect reads it on `replica`, once through a sync view
and once through an async view (the ORM's async API). with-middleware: the POST sets
the causal cookie and both GETs, sent with it, answer 200. without-middleware: the
GETs answer 404 (the standby has not replayed the insert), which is what makes the 200s
mean something.
"""
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

PHASES = ("with-middleware", "without-middleware")
if len(sys.argv) != 2 or sys.argv[1] not in PHASES:
    sys.exit(f"usage: {sys.argv[0]} {'|'.join(PHASES)}")
PHASE = sys.argv[1]
REPO = Path(__file__).resolve().parent.parent.parent
PROJECT = REPO / "tests" / "django_project"
PACKAGE = REPO / "python" / "django_switchyard"
env = dict(os.environ)
env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), str(PACKAGE), env.get("PYTHONPATH", "")])
env["DJANGO_SETTINGS_MODULE"] = "sytest.settings"
env["SY_CAUSAL_MIDDLEWARE"] = "1" if PHASE == "with-middleware" else "0"
env["SY_PACKAGE_ROUTER"] = "1"

sys.path.insert(0, str(REPO / "bench"))
from sybench.procs import free_port  # noqa: E402  (ports below the ephemeral range)

port = free_port()
server = subprocess.Popen(
    [sys.executable, "-m", "uvicorn", "sytest.asgi:application", "--host", "127.0.0.1", "--port", str(port),
     "--workers", "1", "--log-level", "warning", "--lifespan", "off"],
    cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def request(method, path, body=None, cookie=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if cookie:
        headers["Cookie"] = cookie
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    conn.close()
    return r


try:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("FAIL: uvicorn did not start:\n" + (server.stdout.read() if server.stdout else ""))
            time.sleep(0.1)
    got = []
    for view in ("", "async/"):
        name = f"asgi-{uuid.uuid4().hex[:12]}"
        r = request("POST", "/customers/", urllib.parse.urlencode({"name": name}))
        if r.status != 302:
            sys.exit(f"FAIL: POST answered {r.status}")
        cookies = [c.split(";", 1)[0] for c in r.headers.get_all("Set-Cookie") or []]
        causal = [c for c in cookies if c.startswith("switchyard_causal")]
        if PHASE == "with-middleware" and not causal:
            sys.exit(f"FAIL: the POST set no causal cookie: {cookies}")
        location = r.headers["Location"]
        r = request("GET", location + view, cookie="; ".join(cookies))
        got.append(r.status)
        print(f"{PHASE}: GET {location}{view} -> {r.status}")
    want = 200 if PHASE == "with-middleware" else 404
    if got != [want, want]:
        sys.exit(f"FAIL: {PHASE}: the GETs answered {got}, not {want}")
    print(f"ok: {PHASE} (sync and async views under uvicorn)")
finally:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
