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

Within one request it does the same between aliases: a read on a read alias after a
statement on a write alias gets the write alias's token first (a SET on the read
alias's connection, taken off at the end of the request), so a view that creates an
object on `default` and reads it back through `replica` finds it.

On MySQL / MariaDB the token goes onto every connection with a SET (there is no
startup option for it; see causal.py).
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connections
from django.db.backends.signals import connection_created
from django.http import FileResponse

from . import conf
from .causal import (
    TokenScope, between_transactions, covering_scope, forget_scopes, reset,
    run_own_statement, running_own_statement,
)
from .tokens import is_valid_token, set_sql, show_sql, sign_token, token_name, token_of_row, unsign_token

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.http import HttpRequest
    from django.http.response import HttpResponseBase

logger = logging.getLogger("django_switchyard")

# The request's _Statements while its view runs (for the connection_created receiver).
_watching: ContextVar[_Statements | None] = ContextVar("django_switchyard_statements", default=None)


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

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        # Validated once at startup: a misspelt alias is a configuration error, not
        # something to discover on every request.
        self.write_aliases = conf.write_aliases()
        self.read_aliases = conf.read_aliases()
        # Where a token of this request's writes is handed within the request: a
        # write alias's own connection already reads its own writes.
        self.handover_aliases = [a for a in self.read_aliases if a not in self.write_aliases]
        self.cookie_name = conf.cookie_name()
        self.max_age = conf.cookie_max_age()

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        forget_scopes()
        incoming = unsign_token(request.COOKIES.get(self.cookie_name), self.max_age)
        scope = TokenScope(incoming, self.read_aliases).open() if incoming else None
        scope_handed_over = False
        try:
            watch = _Statements(self.write_aliases, self.handover_aliases)
            try:
                with watch.watching():
                    response = self.get_response(request)
            finally:
                watch.undo_handovers()
            # Before Django closes the connections (request_finished, when the server
            # closes the response): the token lives on the client connection.
            token = self._token_of_writes(watch.used)
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

    def _token_of_writes(self, used: set[str]) -> str:
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
            found = _read_token(conn) or found
        return found

    def _set_cookie(self, response: HttpResponseBase, token: str) -> None:
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


def _read_token(conn: BaseDatabaseWrapper) -> str:
    """The token of `conn`'s writes (open, between transactions), "" if none; a
    failure or a malformed answer is logged."""
    try:
        row = run_own_statement(conn, show_sql(conn.vendor))
    except Exception as exc:
        logger.warning("%s failed on %r: %s", show_sql(conn.vendor), conn.alias, exc)
        return ""
    token = token_of_row(row)
    if token and not is_valid_token(token):
        logger.warning("ignoring a malformed causal token from %r: %r", conn.alias, token)
        return ""
    return token


class _Statements:
    """One request's statements on our aliases: which write aliases ran one (for the
    cookie), and handing their token to the read aliases within the request.

    Why execute wrappers: they see every statement Django's cursors send (ORM, raw
    SQL, executemany) on a connection reused across requests (CONN_MAX_AGE) as on a new
    one, for one Python call per statement. The connection_created signal fires only
    when a connection is opened, which neither happens on a reused connection nor means
    a statement ran; `connection.queries` is recorded only with DEBUG.

    Any statement counts, not just writes: telling them apart is the proxy's job, and
    it answers "" for a connection that has not written. Statements run on the
    driver's own connection object (connection.connection), bypassing Django's
    cursors, are not seen.

    The hand-over: before the first statement on a read alias's connection after
    statements on a write alias, the write aliases' token is read and SET on that
    connection. Only between transactions on both sides: an uncommitted write cannot
    be seen elsewhere, and on PostgreSQL Switchyard answers the token statements only
    outside a transaction. Requests that write nothing pay one Python call per read
    statement and no statement.
    """

    def __init__(self, write_aliases: list[str], read_aliases: list[str]) -> None:
        self.write_aliases = write_aliases
        self.read_aliases = read_aliases
        self.used: set[str] = set()  # write aliases the request ran a statement on
        self.wrote: set[str] = set()  # write aliases with statements since their token was read
        self.token = ""  # the newest token read from them
        # read alias -> the DB-API connection that has had the newest token (or for
        # which the attempt failed): one SET per connection and token.
        self.given: dict[str, Any] = {}
        self.handed: dict[str, Any] = {}  # read alias -> the DB-API connection our SET is on

    @contextmanager
    def watching(self) -> Iterator[None]:
        flag = _watching.set(self)
        try:
            with ExitStack() as stack:
                # connections[alias] creates the connection object, not a connection.
                for alias in self.write_aliases:
                    stack.enter_context(connections[alias].execute_wrapper(self._on_write))
                for alias in self.read_aliases:
                    stack.enter_context(connections[alias].execute_wrapper(self._on_read))
                yield
        finally:
            _watching.reset(flag)

    def connected(self, conn: BaseDatabaseWrapper) -> None:
        """`conn` has just connected (connection_created). Django's MySQL backend runs
        statements while connecting, before that signal, so a hand-over may have come
        first and a token scope's SET at connect replaced it since: hand over again
        before the next statement."""
        if self.given.get(conn.alias) is conn.connection and covering_scope(conn.alias) is not None:
            del self.given[conn.alias]

    def _on_write(self, execute: Callable[[str, Any, bool, dict[str, Any]], Any], sql: str, params: Any,
                  many: bool, context: dict[str, Any]) -> Any:
        if not running_own_statement():
            alias = context["connection"].alias
            self.used.add(alias)
            self.wrote.add(alias)
            self.given.clear()
        return execute(sql, params, many, context)

    def _on_read(self, execute: Callable[[str, Any, bool, dict[str, Any]], Any], sql: str, params: Any,
                 many: bool, context: dict[str, Any]) -> Any:
        if self.used and not running_own_statement():
            conn = context["connection"]
            if self.given.get(conn.alias) is not conn.connection:
                self._hand_over(conn)
        return execute(sql, params, many, context)

    def _hand_over(self, conn: BaseDatabaseWrapper) -> None:
        if not between_transactions(conn):
            return  # a SET would not be answered by the proxy; try before the next one
        writers = [connections[alias] for alias in sorted(self.wrote)]
        if any(w.connection is not None and not between_transactions(w) for w in writers):
            return  # not committed yet, so invisible elsewhere anyway
        for writer in writers:
            if writer.connection is not None:  # else closed: its token went with it
                self.token = _read_token(writer) or self.token
        self.wrote.clear()
        self.given[conn.alias] = conn.connection
        if not self.token:
            return
        try:
            run_own_statement(conn, set_sql(self.token, conn.vendor))
        except Exception as exc:
            # Not retried (and no reconnecting in the middle of a statement): the read
            # goes on as fresh as the proxy makes it without the token.
            logger.warning("SET %s (this request's writes) failed on %r: %s",
                           token_name(conn.vendor), conn.alias, exc)
        else:
            self.handed[conn.alias] = conn.connection

    def undo_handovers(self) -> None:
        """Take the hand-over tokens off again, so that a connection kept for the next
        request does not carry them. Where a token scope (the cookie's) put its own
        token on the connection, the scope takes it off when it ends."""
        for alias, raw in sorted(self.handed.items()):
            conn = connections[alias]
            if conn.connection is not raw:
                continue  # closed since: the token went with it
            if not between_transactions(conn):
                logger.warning("causal token of this request's writes left on %r: its "
                               "connection is inside a transaction at the end of the "
                               "request", alias)
                continue
            scope = covering_scope(alias)
            if scope is not None and (alias in scope.applied or scope.opened.get(alias) is raw):
                continue
            reset(conn)
        self.handed.clear()


def _on_connection_created(sender: type[BaseDatabaseWrapper], connection: BaseDatabaseWrapper,
                           **kwargs: Any) -> None:
    statements = _watching.get()
    if statements is not None and connection.alias in statements.read_aliases:
        statements.connected(connection)


connection_created.connect(_on_connection_created, dispatch_uid="django_switchyard.middleware")


def _body_may_query(response: HttpResponseBase) -> bool:
    """A streaming body our cleanup can wait for: a sync iterator (an async one runs
    outside this thread's connections), and not a file (nothing to read from the
    database, and replacing a FileResponse's body would cost it sendfile)."""
    return response.streaming and not response.is_async and not isinstance(response, FileResponse)


class _OnClose:
    """A streaming body that calls `on_close` when the server closes the response.

    An iterator object rather than a generator: a generator's `finally` does not run
    when it is closed before its first item, and a server may close an unread body.
    """

    def __init__(self, content: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._content = iter(content)
        self._on_close = on_close

    def __iter__(self) -> _OnClose:
        return self

    def __next__(self) -> bytes:
        return next(self._content)

    def close(self) -> None:
        self._on_close()
