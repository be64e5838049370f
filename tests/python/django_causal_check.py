#!/usr/bin/env python3
"""Prove read-your-writes across requests in a real Django project through Switchyard.

Usage: python3 django_causal_check.py with-middleware|without-middleware

Configured like django_check.py, by SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER,
SY_PASSWORD, SY_DB (and SY_SINGLE=1 for one alias on the rw endpoint with
read_write_split, where SY_RO_PORT is not needed). The tables must exist
(`django_check.py migrate`). Meant for a cluster whose standbys apply WAL late
(recovery_min_apply_delay = '2s'), with the proxy in transaction or session pooling
mode: nothing here depends on which.

Each phase runs the classic pattern in-process with django.test.Client: POST
creates a customer on `default` and redirects to its page; the GET of the redirect
reads it through the router, i.e. on `replica` (Switchyard's read-only endpoint).
Every request gets new connections (CONN_MAX_AGE = 0), as under a WSGI server.

- with-middleware: django_switchyard's CausalReadsMiddleware and router. The POST
  must set the causal cookie and the GET must answer 200, twice:
  - `new connection`: the GET opens its read connection, which must carry the token
    as a startup option (`-c switchyard.causal_token=...`, so that the proxy places
    it on a node that has replayed it) and be closed at the end of the request;
  - `kept connection`: the read connection is already open when the GET starts, as
    with CONN_MAX_AGE > 0. The middleware SETs the token on it; in session pooling
    mode, where the connection cannot move off its late standby, the proxy refuses
    that (55000) and the middleware reconnects with the token as a startup option.
    Either way, at the end the connection is closed or no longer carries the token.
- without-middleware: the same project without it. The GET must answer 404: the
  standby has not replayed the insert yet. This is what makes the 200 above mean
  something.

Prints `ok: <phase> ...` lines and exits 0; a failure prints `FAIL: ...` and
exits 1. Each run creates customers with new names and deletes them at the end, so
it can run any number of times, and leaves what django_check.py `write` left.
"""
import os
import sys
import time
import uuid
from pathlib import Path

PHASES = ("with-middleware", "without-middleware")
if len(sys.argv) != 2 or sys.argv[1] not in PHASES:
    sys.exit(f"usage: {sys.argv[0]} {'|'.join(PHASES)}")
PHASE = sys.argv[1]

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests" / "django_project"))
# The package as it is in this tree (scripts/install-deps.sh installs it too).
sys.path.insert(0, str(REPO / "python" / "django_switchyard"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sytest.settings")
# Read by sytest/settings.py.
os.environ["SY_CAUSAL_MIDDLEWARE"] = "1" if PHASE == "with-middleware" else "0"
os.environ["SY_PACKAGE_ROUTER"] = "1"

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402
from django.db.backends.signals import connection_created  # noqa: E402
from django.test import Client  # noqa: E402

from django_switchyard import conf  # noqa: E402
from django_switchyard.tokens import unsign_token  # noqa: E402
from shop.models import Customer  # noqa: E402

READ_ALIAS = "replica" if "replica" in settings.DATABASES else "default"
COOKIE = conf.cookie_name()
MAX_AGE = conf.cookie_max_age()

# (alias, startup options) of every connection Django opens, for the checks of how the
# token reached the read alias.
OPENED = []


def note_connection(sender, connection, **kwargs):
    # libpq's `options` as the connection was made with (psycopg 3 and 2 both say).
    OPENED.append((connection.alias, connection.connection.info.options or ""))


connection_created.connect(note_connection)


def fail(message):
    sys.exit(f"FAIL: {PHASE}: {message}")


def finish_request():
    """What a WSGI server does after each response: request_finished closes the
    connections (CONN_MAX_AGE = 0). django.test.Client skips that on purpose."""
    connections.close_all()


def show_token(alias):
    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW switchyard.causal_token")
        return cursor.fetchone()[0]


def describe(response):
    """What the detail view reported about where it read."""
    try:
        body = response.json()
    except ValueError:
        return f"status {response.status_code}, body {response.content[:300]!r}"
    return (f"read on {body.get('alias')!r} (server port {body.get('server_port')}, "
            f"pg_is_in_recovery={body.get('in_recovery')})")


def check_cookie(post):
    morsel = post.cookies.get(COOKIE)
    if morsel is None or not morsel.value:
        fail(f"the POST wrote but set no {COOKIE!r} cookie (cookies: {list(post.cookies)}); "
             "did SHOW switchyard.causal_token return a token? (see warnings above)")
    attrs = {"httponly": morsel["httponly"], "samesite": morsel["samesite"], "max-age": morsel["max-age"]}
    if attrs != {"httponly": True, "samesite": "Lax", "max-age": MAX_AGE}:
        fail(f"cookie attributes {attrs}, expected HttpOnly, SameSite=Lax, Max-Age={MAX_AGE}")
    token = unsign_token(morsel.value, MAX_AGE)
    if token is None:
        fail(f"the cookie {morsel.value!r} is not a signed causal token")
    print(f"ok: {PHASE} POST set the signed cookie {COOKIE} (HttpOnly, SameSite=Lax, "
          f"Max-Age={MAX_AGE}) with token {token}")
    return token


def check_no_new_cookie(get):
    """The GET wrote nothing, so it must not hand out a token again."""
    if READ_ALIAS in conf.write_aliases():
        # One alias: the GET ran statements on the write alias, so the middleware asked
        # it for a token, and a Switchyard connection that ran Django's
        # `SELECT set_config('TimeZone', ...)` may answer with a newer one.
        print(f"note: {PHASE} cookie renewal not checked: {READ_ALIAS!r} is also a write alias")
        return
    if COOKIE in get.cookies:
        fail(f"the GET, which wrote nothing, set the cookie again: {get.cookies[COOKIE]}")
    print(f"ok: {PHASE} GET wrote nothing and left the cookie alone")


def carries(options, token):
    return f"switchyard.causal_token={token}" in options


def check_new_connection(token, opened):
    """The GET opened its read connection with the token as a startup option, and the
    middleware closed it at the end of the request, so that nothing reuses it with the
    token (the test client leaves connections open otherwise)."""
    mine = [options for alias, options in opened if alias == READ_ALIAS]
    if len(mine) != 1 or not carries(mine[0], token):
        fail(f"the GET opened {READ_ALIAS!r} with startup options {mine}, expected one "
             f"connection with -c switchyard.causal_token={token}")
    if connections[READ_ALIAS].connection is not None:
        fail(f"the connection of {READ_ALIAS!r} opened with the token was left open "
             "after the request")
    print(f"ok: {PHASE} new connection: {READ_ALIAS!r} was opened with the token as a "
          "startup option and closed at the end of the request")


def check_kept_connection(token, kept, opened):
    """The read connection was open before the GET. Either it took the token with a
    SET (transaction pooling mode; or session mode when its node had replayed the
    token in time) and got RESET at the end; or the proxy refused the SET (session
    mode, its standby behind) and the middleware reconnected with the token as a
    startup option, and closed that connection at the end."""
    mine = [options for alias, options in opened if alias == READ_ALIAS]
    conn = connections[READ_ALIAS]
    if mine:
        if len(mine) != 1 or not carries(mine[0], token):
            fail(f"the GET reopened {READ_ALIAS!r} with startup options {mine}, expected "
                 f"one connection with -c switchyard.causal_token={token}")
        if conn.connection is not None:
            fail(f"the connection of {READ_ALIAS!r} reopened with the token was left "
                 "open after the request")
        print(f"ok: {PHASE} kept connection: the proxy refused the SET on it (its node "
              "was behind and a session cannot move), the middleware reconnected "
              f"{READ_ALIAS!r} with the token as a startup option and closed it at the end")
        return
    if conn.connection is not kept:
        fail(f"the kept connection of {READ_ALIAS!r} was replaced without a new "
             "connection being opened")
    if READ_ALIAS in conf.write_aliases():
        # One alias (SY_SINGLE=1): SHOW also reports what this connection wrote (for
        # Switchyard, Django's `SELECT set_config('TimeZone', ...)` may count), so an
        # answer would not tell a leftover token from the connection's own floor.
        print(f"ok: {PHASE} kept connection: {READ_ALIAS!r} took the token with a SET "
              "(reset not checked: it is also a write alias)")
        return
    left = show_token(READ_ALIAS)
    if left:
        fail(f"the token was still set on {READ_ALIAS!r} after the request: {left!r}")
    print(f"ok: {PHASE} kept connection: {READ_ALIAS!r} took the token with a SET and "
          "it was reset at the end of the request")


def run(name, keep_read_connection=False):
    """POST then GET; with `keep_read_connection`, the read alias's connection is
    opened before the GET, as CONN_MAX_AGE > 0 would have kept it."""
    label = "kept connection" if keep_read_connection else "new connection"
    client = Client()
    started = time.monotonic()
    post = client.post("/customers/", {"name": name})
    finish_request()
    if post.status_code != 302:
        fail(f"POST /customers/ answered {post.status_code}: {post.content[:300]!r}")
    location = post["Location"]
    print(f"ok: {PHASE} {label}: POST /customers/ created {name!r} on default and "
          f"redirected to {location}")

    token = None
    if PHASE == "with-middleware":
        token = check_cookie(post)
    elif COOKIE in post.cookies:
        fail(f"the POST set {COOKIE!r} without the middleware")

    kept = None
    if keep_read_connection:
        with connections[READ_ALIAS].cursor() as cursor:
            cursor.execute("SELECT 1")
        kept = connections[READ_ALIAS].connection
    OPENED.clear()
    # The test client sends back the cookies it was given, like a browser.
    get = client.get(location)
    elapsed = time.monotonic() - started
    what = describe(get)

    if PHASE == "with-middleware":
        if get.status_code != 200:
            fail(f"{label}: GET {location} answered {get.status_code} {elapsed:.2f}s after "
                 f"the POST despite the causal token: {what}")
        if get.json().get("name") != name:
            fail(f"GET {location} returned {get.json()}, expected the customer {name!r}")
        print(f"ok: {PHASE} {label}: GET {location} answered 200 {elapsed:.2f}s after the "
              f"POST: the customer was visible through {READ_ALIAS!r}; {what}")
        check_no_new_cookie(get)
        if keep_read_connection:
            check_kept_connection(token, kept, list(OPENED))
        else:
            check_new_connection(token, list(OPENED))
    else:
        if get.status_code == 200:
            fail(f"GET {location} answered 200 {elapsed:.2f}s after the POST without a causal "
                 f"token ({what}): the standby was not behind, so the 200 with the middleware "
                 "proves nothing (are the standbys applying WAL late?)")
        if get.status_code != 404:
            fail(f"GET {location} answered {get.status_code}, expected 404: {what}")
        print(f"ok: {PHASE} GET {location} answered 404 {elapsed:.2f}s after the POST: "
              f"the insert was not replayed yet where {READ_ALIAS!r} read; {what}")
    finish_request()


def cleanup(names):
    # Never hide the failure being reported behind one of the cleanup.
    try:
        finish_request()
        Customer.objects.using("default").filter(name__in=names).delete()
    except Exception as exc:
        print(f"warning: {PHASE}: could not delete customers {names}: {exc}", file=sys.stderr)
        return False
    return True


def main():
    names = [f"causal-{uuid.uuid4().hex[:12]}"]
    try:
        run(names[0])
        if PHASE == "with-middleware":
            names.append(f"causal-{uuid.uuid4().hex[:12]}")
            run(names[1], keep_read_connection=True)
    finally:
        cleaned = cleanup(names)
    if cleaned:
        print(f"ok: {PHASE} cleaned up {', '.join(map(repr, names))}")


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as exc:  # turn any error into one clear FAIL line
        import traceback

        traceback.print_exc()
        fail(f"{type(exc).__name__}: {exc}")
