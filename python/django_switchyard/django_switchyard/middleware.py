"""Read-your-writes across a user's requests.

Switchyard keeps reads of one client connection at least as fresh as that
connection's writes. A web user's requests use other connections (another alias,
another worker, a new connection per request), so after a request that wrote, the
middleware asks the write alias for its causal token, hands it to the browser in a
short-lived signed cookie, and on the user's next requests gives it to the read aliases
before their first query: as a startup option to a connection the request opens (so
Switchyard places it on a node that has replayed the token, in session as in
transaction pooling mode), with a SET to one already open (see causal.TokenScope).
The classic bug it prevents: POST creates an object, the redirect's GET reads a
standby that has not replayed it yet, and answers 404.
"""
import logging
from contextlib import ExitStack, contextmanager

from django.conf import settings
from django.db import connections
from django.http import FileResponse

from . import conf
from .causal import TokenScope, forget_scopes, run_own_statement, running_own_statement
from .tokens import SHOW_SQL, is_valid_token, sign_token, unsign_token

logger = logging.getLogger("django_switchyard")


class CausalReadsMiddleware:
    """Carry a causal token from a request that wrote to the same user's next requests.

    Put it first in MIDDLEWARE, so that what other middleware writes (a session saved
    in SessionMiddleware's response phase, for one) happens inside it and counts.

    The token never fails a request: a missing, forged or expired cookie is ignored,
    a token Switchyard refuses at connect time is logged and the connection made
    without it, and a database error on SET or SHOW is logged (logger
    "django_switchyard"); the request goes on, with reads as fresh as the proxy makes
    them without a token. No connection is opened for the token's sake.
    """

    def __init__(self, get_response):
        self.get_response = get_response
        # Validated once at startup: a misspelt alias is a configuration error, not
        # something to discover on every request.
        self.write_aliases = conf.write_aliases()
        self.read_aliases = conf.read_aliases()
        self.cookie_name = conf.cookie_name()
        self.max_age = conf.cookie_max_age()

    def __call__(self, request):
        forget_scopes()
        incoming = unsign_token(request.COOKIES.get(self.cookie_name), self.max_age)
        scope = TokenScope(incoming, self.read_aliases).open() if incoming else None
        scope_handed_over = False
        try:
            with _statements_on(self.write_aliases) as used:
                response = self.get_response(request)
            # Before Django closes the connections (request_finished, when the server
            # closes the response): the token lives on the client connection.
            token = self._token_of_writes(used)
            if token and token != incoming:
                self._set_cookie(response, token)
            elif scope is not None and scope.refused and not scope.accepted and not token:
                # Switchyard will never take it (another cluster's): stop sending it.
                # Any other failure may pass, so the cookie stays until it expires.
                response.delete_cookie(self.cookie_name, path=settings.SESSION_COOKIE_PATH,
                                       domain=settings.SESSION_COOKIE_DOMAIN, samesite="Lax")
            if scope is not None and _body_may_query(response):
                # The body is produced after this returns, and its reads are part of
                # the request: keep the token on until the server closes the response.
                response.streaming_content = _OnClose(response.streaming_content, scope.close)
                scope_handed_over = True
            return response
        finally:
            if scope is not None and not scope_handed_over:
                scope.close()

    def _token_of_writes(self, used):
        """SHOW the token on each write alias the request ran a statement on.

        With several write aliases the last non-empty token wins: list several only if
        they are names for the same Switchyard cluster (a cookie carries one token).
        """
        found = ""
        for alias in self.write_aliases:
            if alias not in used:
                continue
            conn = connections[alias]
            if conn.connection is None:
                # Closed during the request: its token went with it.
                logger.debug("connection %r closed before its causal token was read", alias)
                continue
            if conn.in_atomic_block or not conn.get_autocommit():
                logger.warning("causal token of %r not read: its connection is still "
                               "inside a transaction at the end of the request", alias)
                continue
            try:
                row = run_own_statement(conn, SHOW_SQL)
            except Exception as exc:
                logger.warning("SHOW switchyard.causal_token failed on %r: %s", alias, exc)
                continue
            token = row[0] if row else ""
            if token and not is_valid_token(token):
                logger.warning("ignoring a malformed causal token from %r: %r", alias, token)
            elif token:
                found = token
        return found

    def _set_cookie(self, response, token):
        response.set_cookie(
            self.cookie_name,
            sign_token(token),
            max_age=self.max_age,
            path=settings.SESSION_COOKIE_PATH,
            domain=settings.SESSION_COOKIE_DOMAIN,
            secure=settings.SESSION_COOKIE_SECURE,
            httponly=True,
            samesite="Lax",
        )


@contextmanager
def _statements_on(aliases):
    """Collect the aliases, among `aliases`, on which the block runs a statement.

    Why an execute wrapper: it sees every statement Django's cursors send (ORM, raw
    SQL, executemany) on a connection reused across requests (CONN_MAX_AGE) as on a new
    one, for one Python call per statement. The connection_created signal fires only
    when a connection is opened, which neither happens on a reused connection nor means
    a statement ran; `connection.queries` is recorded only with DEBUG.

    Any statement counts, not just writes: telling them apart is the proxy's job, and
    SHOW returns "" (no cookie) for a connection that has not written. Statements
    run on the driver's own connection object (connection.connection), bypassing
    Django's cursors, are not seen.
    """
    used = set()

    def note(execute, sql, params, many, context):
        if not running_own_statement():
            used.add(context["connection"].alias)
        return execute(sql, params, many, context)

    with ExitStack() as stack:
        for alias in aliases:
            # connections[alias] creates the connection object, not a connection.
            stack.enter_context(connections[alias].execute_wrapper(note))
        yield used


def _body_may_query(response):
    """A streaming body our cleanup can wait for: a sync iterator (an async one runs
    outside this thread's connections), and not a file (nothing to read from the
    database, and replacing a FileResponse's body would cost it sendfile)."""
    return response.streaming and not response.is_async and not isinstance(response, FileResponse)


class _OnClose:
    """A streaming body that calls `on_close` when the server closes the response.

    An iterator object rather than a generator: a generator's `finally` does not run
    when it is closed before its first item, and a server may close an unread body.
    """

    def __init__(self, content, on_close):
        self._content = iter(content)
        self._on_close = on_close

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._content)

    def close(self):
        self._on_close()
