#!/usr/bin/env python3
"""Prove read-your-writes across requests, and within one request, in a real Django
project on a MySQL / MariaDB cluster through Switchyard (mysqlclient).

Usage: python3 django_mysql_causal_check.py with-middleware|without-middleware

Configured like django_mysql_check.py, by SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER,
SY_PASSWORD, SY_DB (settings module sytest.settings_mysql, with django_switchyard's
router: `default` on the proxy's rw endpoint, `replica` on its ro endpoint). The tables
must exist (`django_mysql_check.py migrate`). Meant for a cluster whose replica applies
late (MASTER_DELAY = 2), so that a read on `replica` right after a write misses it
unless something makes it fresh.

Each phase runs requests in-process with django.test.Client, a new client (so no
cookie) per round, and closes the connections after each request as a WSGI server does
(CONN_MAX_AGE = 0):

- with-middleware (CausalReadsMiddleware first in MIDDLEWARE):
  - `new connection`, 20 rounds: POST /customers/ creates a customer on `default`
    and redirects; the POST must set the causal cookie; the GET of the redirect reads
    through `replica` and must answer 200 every time. There is no startup option on
    MySQL: the GET's new replica connection must get
    `SET @switchyard_causal_token = '<the cookie's token>'` and, at the end,
    `SET @switchyard_causal_token = ''`;
  - `kept connection`, 5 rounds: the same, with the replica connection already open
    when the GET starts (as with CONN_MAX_AGE > 0): it must get the SET at the start,
    stay the same connection, and no longer carry the token after the request;
  - `in-request`, 20 rounds: POST /customers/create-and-read/ creates a customer on
    `default` and reads it back through `replica` in the same request: 200 every
    time, the replica connection having been given the write's token before the read.
- without-middleware: the same POST/GET (5 rounds) and in-request view (5 rounds)
  must each answer 404 at least once: the replica really is behind, which is what
  makes the 200s above mean something.

Prints `ok: <phase> ...` lines and exits 0; a failure prints `FAIL: ...` and exits 1.
Customers it creates are deleted through `default` at the end.
"""
import os
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

PHASES = ("with-middleware", "without-middleware")
if len(sys.argv) != 2 or sys.argv[1] not in PHASES:
    sys.exit(f"usage: {sys.argv[0]} {'|'.join(PHASES)}")
PHASE = sys.argv[1]
WITH = PHASE == "with-middleware"

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests" / "django_project"))
# The package as it is in this tree.
sys.path.insert(0, str(REPO / "python" / "django_switchyard"))
os.environ["DJANGO_SETTINGS_MODULE"] = "sytest.settings_mysql"
# Read by sytest/settings_mysql.py.
os.environ["SY_CAUSAL_MIDDLEWARE"] = "1" if WITH else "0"
os.environ["SY_PACKAGE_ROUTER"] = "1"

import django  # noqa: E402

django.setup()

from django.db import connections  # noqa: E402
from django.db.backends.signals import connection_created  # noqa: E402
from django.test import Client  # noqa: E402

from django_switchyard import conf  # noqa: E402
from django_switchyard.tokens import (  # noqa: E402
    MYSQL_RESET_SQL, MYSQL_SHOW_SQL, MYSQL_VARIABLE, set_sql, unsign_token,
)
from shop.models import Customer  # noqa: E402

READ = "replica"
COOKIE = conf.cookie_name()
MAX_AGE = conf.cookie_max_age()
ROUNDS = {"new connection": 20, "kept connection": 5, "in-request": 20} if WITH else \
    {"new connection": 5, "in-request": 5}

NAMES = []  # customers created, for the cleanup
OPENED = []  # aliases of the connections Django opened during a request


def note_connection(sender, connection, **kwargs):
    OPENED.append(connection.alias)


connection_created.connect(note_connection)


def fail(message):
    sys.exit(f"FAIL: {PHASE}: {message}")


def finish_request():
    """What a WSGI server does after each response: request_finished closes the
    connections (CONN_MAX_AGE = 0). django.test.Client skips that on purpose."""
    connections.close_all()


@contextmanager
def token_statements():
    """Record (alias, sql) of every statement naming the causal token that runs on
    either alias in the block (the middleware's go through Django's cursors too)."""
    seen = []

    def spy(execute, sql, params, many, context):
        if MYSQL_VARIABLE in sql:
            seen.append((context["connection"].alias, sql))
        return execute(sql, params, many, context)

    with ExitStack() as stack:
        for alias in ("default", READ):
            stack.enter_context(connections[alias].execute_wrapper(spy))
        yield seen


def new_name():
    name = f"mycausal-{uuid.uuid4().hex[:12]}"
    NAMES.append(name)
    return name


def body(response):
    try:
        return response.json()
    except ValueError:
        return {}


def describe(response):
    """What the view reported about where it read."""
    b = body(response)
    if not b:
        return f"status {response.status_code}, body {response.content[:300]!r}"
    return (f"read on {b.get('alias')!r} (server port {b.get('server_port')}, "
            f"read_only={b.get('in_recovery')})")


def cookie_token(response, what):
    morsel = response.cookies.get(COOKIE)
    if not WITH:
        if morsel is not None:
            fail(f"{what} set {COOKIE!r} without the middleware")
        return None
    if morsel is None or not morsel.value:
        # Django's create() on MariaDB >= 10.5 is an INSERT ... RETURNING, answered with
        # rows rather than an OK: say so, it matters to whether the proxy saw a write.
        returning = connections["default"].features.can_return_columns_from_insert
        fail(f"{what} wrote but set no {COOKIE!r} cookie (cookies: {list(response.cookies)}); "
             f"did {MYSQL_SHOW_SQL} return a token? (see warnings above; Django's INSERTs "
             f"here use RETURNING: {returning})")
    attrs = {"httponly": morsel["httponly"], "samesite": morsel["samesite"], "max-age": morsel["max-age"]}
    if attrs != {"httponly": True, "samesite": "Lax", "max-age": MAX_AGE}:
        fail(f"cookie attributes {attrs}, expected HttpOnly, SameSite=Lax, Max-Age={MAX_AGE}")
    token = unsign_token(morsel.value, MAX_AGE)
    if token is None or not token.startswith("sy1.m"):
        fail(f"the cookie {morsel.value!r} does not hold a MySQL cluster's causal token")
    return token


def expect_statements(label, seen, expected):
    if seen != expected:
        fail(f"{label}: token statements {seen}, expected {expected}")


def post_then_get(label, keep):
    """One round: POST creates, GET of the redirect reads on `replica`. Returns the
    GET's response."""
    client = Client()
    name = new_name()
    post = client.post("/customers/", {"name": name})
    finish_request()
    if post.status_code != 302:
        fail(f"{label}: POST /customers/ answered {post.status_code}: {post.content[:300]!r}")
    token = cookie_token(post, f"{label}: the POST")
    kept = None
    if keep:
        with connections[READ].cursor() as cursor:
            cursor.execute("SELECT 1")
        kept = connections[READ].connection
    OPENED.clear()
    with token_statements() as seen:
        get = client.get(post["Location"])  # the test client sends the cookie back
    if get.status_code == 200 and body(get).get("name") != name:
        fail(f"{label}: GET {post['Location']} returned {body(get)}, expected the customer {name!r}")
    if WITH and get.status_code == 200:
        if COOKIE in get.cookies:
            fail(f"{label}: the GET, which wrote nothing, set the cookie again")
        expect_statements(label, seen, [(READ, set_sql(token, "mysql")), (READ, MYSQL_RESET_SQL)])
        if keep:
            if OPENED or connections[READ].connection is not kept:
                fail(f"{label}: the kept connection of {READ!r} was replaced (opened: {OPENED})")
            with connections[READ].cursor() as cursor:
                cursor.execute(MYSQL_SHOW_SQL)
                left = cursor.fetchone()[0]
            if left:
                fail(f"{label}: the token was still set on {READ!r} after the request: {left!r}")
        elif OPENED != [READ]:
            fail(f"{label}: the GET opened {OPENED}, expected one connection of {READ!r}")
    finish_request()
    return get


def create_and_read(label):
    """One round of the in-request view: create on `default`, read on `replica`."""
    client = Client()
    name = new_name()
    with token_statements() as seen:
        response = client.post("/customers/create-and-read/", {"name": name})
    if response.status_code == 200 and body(response).get("name") != name:
        fail(f"{label}: the view returned {body(response)}, expected the customer {name!r}")
    token = cookie_token(response, f"{label}: the view")
    if WITH and response.status_code == 200:
        # The hand-over (the write's token read on default, SET on replica before the
        # read), then what the request's end does.
        expect_statements(label, seen, [
            ("default", MYSQL_SHOW_SQL), (READ, set_sql(token, "mysql")),
            (READ, MYSQL_RESET_SQL), ("default", MYSQL_SHOW_SQL),
        ])
    elif not WITH and seen:
        fail(f"{label}: token statements without the middleware: {seen}")
    finish_request()
    return response


def run(label, one_round):
    rounds = ROUNDS[label]
    statuses = Counter()
    where = Counter()
    first = {}
    started = time.monotonic()
    for _ in range(rounds):
        response = one_round()
        if response.status_code not in (200, 404):
            fail(f"{label}: answered {response.status_code}: {describe(response)}")
        statuses[response.status_code] += 1
        first.setdefault(response.status_code, describe(response))
        b = body(response)
        where[f"port {b.get('server_port')} read_only={b.get('in_recovery')}"] += 1
    elapsed = time.monotonic() - started
    ok, missed = statuses[200], statuses[404]
    served = ", ".join(f"{k}: {v}" for k, v in sorted(where.items()))
    if WITH:
        if missed:
            fail(f"{label}: {missed} of {rounds} reads answered 404 despite the causal token "
                 f"(first: {first[404]}); served by {served}")
        print(f"ok: {PHASE} {label}: {ok} of {rounds} reads answered 200 ({elapsed:.1f}s; "
              f"served by {served})")
    else:
        if not missed:
            fail(f"{label}: all {rounds} reads answered 200 without a causal token ({first[200]}): "
                 "the replica was not behind, so the 200s with the middleware prove nothing "
                 "(does the replica apply late?)")
        print(f"ok: {PHASE} {label}: {missed} of {rounds} reads answered 404 without the "
              f"middleware, {ok} answered 200 (the replica is behind; first 404: {first[404]})")


def cleanup():
    # Never hide the failure being reported behind one of the cleanup.
    try:
        finish_request()
        deleted, _ = Customer.objects.using("default").filter(name__in=NAMES).delete()
    except Exception as exc:
        print(f"warning: {PHASE}: could not delete customers {NAMES}: {exc}", file=sys.stderr)
        return
    print(f"ok: {PHASE} cleaned up {deleted} customers")


def main():
    try:
        run("new connection", lambda: post_then_get("new connection", keep=False))
        if WITH:
            run("kept connection", lambda: post_then_get("kept connection", keep=True))
        run("in-request", lambda: create_and_read("in-request"))
    finally:
        cleanup()


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as exc:  # turn any error into one clear FAIL line
        import traceback

        traceback.print_exc()
        fail(f"{type(exc).__name__}: {exc}")
