#!/usr/bin/env python3
"""Read-your-writes into Celery tasks through Switchyard, with a real broker
(redis-server) and a real worker.

Usage: python3 celery_causal_check.py with-integration|without-integration [--tasks N]

Configured like django_causal_check.py (SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER,
SY_PASSWORD, SY_DB); the tables must exist. Meant for a cluster whose standbys apply
WAL late (recovery_min_apply_delay = '2s').

N times: create a customer on `default` (autocommit), send a task at once that reads
it through the router (on `replica`, Switchyard's read-only endpoint), wait for its
answer. with-integration (django_switchyard.celery installed in the app and the
worker): every task finds its customer. without-integration: the same code, and the
tasks read a standby that has not replayed the insert yet; most find nothing, which is
what makes the first phase mean something.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("phase", choices=["with-integration", "without-integration"])
p.add_argument("--tasks", type=int, default=20)
a = p.parse_args()

REPO = Path(__file__).resolve().parent.parent.parent
PROJECT = REPO / "tests" / "django_project"
PACKAGE = REPO / "python" / "django_switchyard"
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PACKAGE))
sys.path.insert(0, str(REPO / "bench"))
from sybench.procs import free_port  # noqa: E402  (ports below the ephemeral range)
os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT), str(PACKAGE), os.environ.get("PYTHONPATH", "")])
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sytest.settings")
os.environ["SY_PACKAGE_ROUTER"] = "1"
os.environ["SY_CELERY_INTEGRATION"] = "1" if a.phase == "with-integration" else "0"


tmp = Path(tempfile.mkdtemp(prefix="sy-celery-"))
port = free_port()
redis = subprocess.Popen(
    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
     "--dir", str(tmp)],
    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
os.environ["SY_BROKER"] = f"redis://127.0.0.1:{port}/0"
worker = None
status = 1
try:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("FAIL: redis-server did not start")
            time.sleep(0.1)
    log = open(tmp / "worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "sytest.celery_app", "worker", "--pool", "solo",
         "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT)

    import django  # noqa: E402

    django.setup()
    from shop.models import Customer  # noqa: E402
    from sytest.celery_app import app, customer_visible  # noqa: E402

    # The worker is up when it answers a ping.
    started = time.monotonic()
    deadline = time.monotonic() + 60
    while not app.control.ping(timeout=1.0):
        if worker.poll() is not None or time.monotonic() > deadline:
            print((tmp / "worker.log").read_text())
            sys.exit("FAIL: the Celery worker did not start")

    print(f"worker up in {time.monotonic() - started:.1f} s", flush=True)
    seen, created, took = [], [], []
    for i in range(a.tasks):
        c = Customer.objects.create(name=f"celery-{uuid.uuid4().hex[:12]}")
        created.append(c.pk)
        t0 = time.monotonic()
        seen.append(customer_visible.delay(c.pk).get(timeout=30))
        took.append(time.monotonic() - t0)
    print(f"task round trips: min {min(took):.3f} s, max {max(took):.3f} s", flush=True)
    fresh = sum(seen)
    Customer.objects.filter(pk__in=created).delete()
    print(f"{a.phase}: {fresh} of {a.tasks} tasks found the customer created just before")
    if a.phase == "with-integration" and fresh != a.tasks:
        print((tmp / "worker.log").read_text()[-4000:])
        sys.exit(f"FAIL: {a.tasks - fresh} tasks read a standby that had not replayed the write")
    if a.phase == "without-integration" and fresh > a.tasks // 4:
        sys.exit(f"FAIL: {fresh} of {a.tasks} tasks found the write without the integration: "
                 "is the standby late at all?")
    print(f"ok: {a.phase}")
    status = 0
except SystemExit as e:
    if e.code not in (None, 0):
        print(e.code)
finally:
    if worker is not None:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
    redis.terminate()
    redis.wait(10)
    shutil.rmtree(tmp, ignore_errors=True)
    # Without running the clean-ups of Celery's result objects at exit: with the broker
    # gone they would retry connecting to it for minutes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
