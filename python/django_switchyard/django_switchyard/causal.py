"""Causal tokens across connections: read at least as fresh as a given write.

Switchyard gives read-your-writes within one client connection by itself. Across
connections (the next HTTP request, a Celery worker) the freshness has to travel as a
token. It goes into a connection in one of two ways:

- at connect time, as a startup option (`options = '-c switchyard.causal_token=<token>'`):
  the proxy places the new connection on a node that has replayed the token (waiting up
  to causal_wait_ms for a standby, else the primary). This works in session and
  transaction pooling mode, and is what a connection opened while a token is in force
  gets;
- on a connection that is already open (kept across requests with CONN_MAX_AGE), with
  statements the proxy answers itself, without a server round trip:

    SHOW switchyard.causal_token              -- the newest write of this connection
    SET switchyard.causal_token = '<token>'   -- later reads at least that fresh
    RESET switchyard.causal_token             -- forget it

  In session pooling mode a connection cannot move to another server, so the SET fails
  (SQLSTATE 55000) when the connection's node has not replayed the token within
  causal_wait_ms; the connection is then closed, and the next query reconnects with
  the token as a startup option.

Switchyard recognises the statements only outside a transaction block (inside one they
would go to the server, where PostgreSQL accepts any dotted setting name and does
nothing with it), so this module runs them only on connections in autocommit mode.

MySQL / MariaDB (Django's mysql backend, mysqlclient): there is no startup option
(mysqlclient cannot send connection attributes), so every connection gets the token
with a SET, as it connects (the connection_created signal) or, already open, when the
scope starts; the statements are `SELECT @switchyard_causal_token`,
`SET @switchyard_causal_token = '<token>'` and `SET @switchyard_causal_token = ''`
(see tokens.py). Such a SET never fails for freshness: Switchyard makes the
connection's next read wait for its replica or move to the primary by itself. A token
it will never accept gets MySQL error 1231.

Public API: `current_token()` and `use_token()`. `TokenScope` is the machinery that the
middleware shares with `use_token()`.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, Error, connections
from django.db.backends.signals import connection_created
from django.db.transaction import TransactionManagementError

from . import conf
from .tokens import (
    CAUSAL_SETTING, is_valid_token, reset_sql, set_sql, show_sql, startup_option, token_name,
    token_of_row,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_switchyard")

# What Switchyard answers a SET with a token it will never accept: one from another
# cluster, or not a token at all.
INVALID_PARAMETER_VALUE = "22023"

# The same refusal on MySQL (ER_WRONG_VALUE_FOR_VAR, SQLSTATE 42000): drivers there give
# the error number, not the SQLSTATE.
MYSQL_WRONG_VALUE_FOR_VAR = 1231

# What Switchyard answers, in session pooling mode, a SET with a token that the node the
# connection is on has not replayed within causal_wait_ms: the connection cannot move
# to another node, a new connection with the token as a startup option can.
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"

# The innermost open TokenScope. Django's connections are per thread (per async
# context under ASGI), and so is a ContextVar, so a scope sees exactly the connections
# of the request or task that opened it.
_current_scope: ContextVar[TokenScope | None] = ContextVar("django_switchyard_scope", default=None)

# Set while one of this package's own statements runs, so that the middleware does
# not take a SET it sent itself for a statement of the application.
_own_statement: ContextVar[bool] = ContextVar("django_switchyard_own_statement", default=False)


def running_own_statement() -> bool:
    return _own_statement.get()


def forget_scopes() -> None:
    """Start a request with no token scope.

    Requests do not nest, so a scope still current here was left by an earlier request
    on this thread whose response was never closed. It is ended now, innermost first:
    its token comes off this thread's connections (RESET, or the connection closed if
    it was opened with the token), and it hands nothing to this request's.
    """
    scope = _current_scope.get()
    while scope is not None:
        parent = scope.parent
        scope.close()  # does nothing if it was closed already (in another context)
        scope = parent
    _current_scope.set(None)


def current_token(alias: str = DEFAULT_DB_ALIAS) -> str:
    """The causal token of the newest write made on `alias`'s connection ("" if none).

    Call it after the write has committed: in autocommit mode right after the write,
    or from `transaction.on_commit()`. Inside a transaction it raises
    TransactionManagementError, because the write is not committed yet (and the proxy
    answers SHOW only outside a transaction). A database error (the alias does not go
    through Switchyard, the server is gone) is logged and gives "": a missing token
    costs freshness, never the caller's work.
    """
    conn = connections[alias]
    if conn.in_atomic_block:
        raise TransactionManagementError(
            "current_token() inside a transaction: the write is not committed yet; "
            "call it from transaction.on_commit() instead"
        )
    try:
        row = run_own_statement(conn, show_sql(conn.vendor))
    except Error as exc:
        logger.warning("%s failed on %r: %s", show_sql(conn.vendor), alias, exc)
        return ""
    token = token_of_row(row)
    if token and not is_valid_token(token):
        logger.warning("ignoring a malformed causal token from %r: %r", alias, token)
        return ""
    return token


@contextmanager
def use_token(token: str | None, aliases: str | Iterable[str] | None = None) -> Iterator[None]:
    """Make reads in the block at least as fresh as `token`.

    `aliases` defaults to SWITCHYARD_READ_ALIASES (every alias). No connection is
    opened for it: one the block opens gets the token as a startup option when it
    connects (with a SET as it connects on MySQL), one already open gets it with a SET
    on entry. On exit the token is taken
    off again (or the enclosing use_token()'s is put back): RESET on a connection that
    got the SET, and a connection opened with the token is closed. An empty token (""
    or None: nothing was written) does nothing; a malformed one raises ValueError. A
    database error while setting it is logged and the block runs anyway, with the
    reads as fresh as the proxy makes them without a token.

    Enter it outside `transaction.atomic()`: the token goes onto an open connection
    only between transactions.
    """
    if not token:
        yield
        return
    if isinstance(aliases, str):
        aliases = [aliases]
    scope = TokenScope(token, conf.read_aliases() if aliases is None else aliases)
    scope.open()
    try:
        yield
    finally:
        scope.close()


class TokenScope:
    """One token applied to some aliases from open() to close(), never opening a
    connection for it.

    - A connection opened while the scope is current carries the token as a startup
      option (`-c switchyard.causal_token=...` in libpq's `options`, added to the
      connection parameters at connect time, see `_connect`): Switchyard places it on
      a node that has replayed the token, in session as in transaction pooling mode.
      That needs Django's PostgreSQL backend without OPTIONS["pool"]; other
      connections get a SET from the connection_created signal instead, which Django
      sends right after connecting, still in autocommit and before any query of the
      application, even when the first query is in an atomic() block. That is always
      the way on MySQL, which has no startup option for it.
    - A connection already open in open() (kept across requests with CONN_MAX_AGE) gets
      a SET. In session pooling mode the proxy refuses it with SQLSTATE 55000 when the
      connection's node has not replayed the token in time: the connection is closed
      then, and the next query opens a new one with the token as a startup option.

    close() takes the token off every connection it is on, so that a connection kept
    for the next request does not carry one user's freshness floor to another: RESET
    where a SET put it, and a connection opened with the token is closed. Why close
    it: its startup options hold the token for as long as it lives, and in session
    pooling mode it was placed on a node for that token (maybe the primary) and stays
    there; closing is the one thing that is right in both modes. It costs a new
    connection only with CONN_MAX_AGE > 0 (with 0 Django closes it anyway), and only
    on requests within the token's short lifetime.
    """

    def __init__(self, token: str, aliases: Iterable[str]) -> None:
        set_sql(token)  # validates the token
        self.token = token
        self.aliases = frozenset(aliases)
        self.startup: set[str] = set()  # aliases whose new connections get the token at connect
        self.opened: dict[str, Any] = {}  # alias -> the DB-API connection opened with the token
        self.given_up: set[str] = set()  # aliases where Switchyard refused the token at connect
        self.applied: set[str] = set()  # aliases whose connection has this token by a SET now
        self.accepted = False  # the token went onto a connection somewhere
        self.refused = False  # the token was refused as invalid (another cluster's)
        self.parent: TokenScope | None = None
        self._open = False

    def open(self) -> TokenScope:
        self.parent = _current_scope.get()
        _current_scope.set(self)
        self._open = True
        for alias in sorted(self.aliases):
            conn = connections[alias]
            if _takes_startup_token(conn):
                _install_connect_hook(conn)
                self.startup.add(alias)
            if conn.connection is not None:
                self.apply(conn, may_reconnect=True)
        return self

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        # set() rather than reset(): a streaming response may be closed in another
        # context than the one that opened the scope (reset() would raise there).
        # From here on, a connection that opens gets the enclosing scope's token, if
        # any, not this one's.
        _current_scope.set(self.parent)
        for alias in sorted(self.applied | set(self.opened)):
            conn = connections[alias]
            if conn.connection is None:
                continue  # closed since: the token went with the client connection
            if not _between_transactions(conn):
                logger.warning(
                    "causal token left on %r: its connection is inside a transaction "
                    "when the scope ends", alias)
            elif self.opened.get(alias) is conn.connection:
                # Opened with this token as a startup option: see the class docstring.
                # (An enclosing scope's token goes onto the next connection at connect.)
                _close(conn)
            elif (outer := _covering(self.parent, alias)) is not None:
                outer.apply(conn, may_reconnect=True)  # an enclosing use_token(): its token back
            else:
                reset(conn)
        self.applied.clear()
        self.opened.clear()

    def apply(self, conn: BaseDatabaseWrapper, may_reconnect: bool = False) -> None:
        """SET the token on `conn` (an open connection of one of our aliases).

        With `may_reconnect`, a SET that session pooling mode cannot honour (55000)
        closes the connection, so that the next query reconnects with the token as a
        startup option. Not from the connection_created signal: Django is still
        connecting then.
        """
        if not _between_transactions(conn):
            logger.warning(
                "causal token not applied on %r: its connection is inside a "
                "transaction (enter use_token() outside transaction.atomic())", conn.alias)
            return
        try:
            run_own_statement(conn, set_sql(self.token, conn.vendor))
        except Exception as exc:
            # Reads still work, as fresh as the proxy makes them without a token.
            code = _sqlstate(exc)
            if refused_as_invalid(exc):
                self.refused = True
            elif (code == OBJECT_NOT_IN_PREREQUISITE_STATE and may_reconnect
                    and conn.alias in self.startup):
                logger.info(
                    "SET switchyard.causal_token on %r: its node has not replayed the "
                    "token and the connection cannot move (session pooling mode); "
                    "closing it, the next query connects with the token", conn.alias)
                self.applied.discard(conn.alias)
                _close(conn)
                return
            logger.warning("SET %s failed on %r: %s", token_name(conn.vendor), conn.alias, exc)
        else:
            self.accepted = True
            self.applied.add(conn.alias)


def _takes_startup_token(conn: BaseDatabaseWrapper) -> bool:
    """Whether a connection `conn` opens can carry the token as a startup option.

    Django's PostgreSQL backend (psycopg 3 or 2, and backends built on it, such as
    PostGIS) hands its connection parameters to libpq, `options` included. Not with
    OPTIONS["pool"]: psycopg's pool opens its connections with the parameters it was
    created with and hands any of them to any request. Not on MySQL: Switchyard takes
    the token there as a connection attribute, which mysqlclient cannot send.
    """
    return conn.vendor == "postgresql" and not conn.settings_dict.get("OPTIONS", {}).get("pool")


def _install_connect_hook(conn: BaseDatabaseWrapper) -> None:
    """Make `conn` (one thread's connection object for an alias) connect through
    `_connect`, once; it does nothing unless a scope covering the alias is current.

    Why not put the token into `conn.settings_dict["OPTIONS"]`: that dict is the very
    one in settings.DATABASES, shared by every thread's connection object for the
    alias, so another thread would connect with this request's token; and an OPTIONS
    left behind by a request whose response is never closed would outlive it. Adding it
    to the parameters of one connect() call leaves nothing to restore.
    """
    prior = vars(conn).get("get_new_connection")  # someone else's hook, if any
    if getattr(prior, "_django_switchyard", False):
        return

    def get_new_connection(conn_params: dict[str, Any]) -> Any:
        return _connect(conn, prior, conn_params)

    # setattr: a type checker allows no new attributes on a function (getattr reads it above).
    setattr(get_new_connection, "_django_switchyard", True)
    conn.get_new_connection = get_new_connection


def _connect(conn: BaseDatabaseWrapper, prior: Callable[[dict[str, Any]], Any] | None,
             conn_params: dict[str, Any]) -> Any:
    """Django's get_new_connection(conn_params) for `conn`, with the token of the
    scope covering its alias, if any, added to the startup options."""
    def connect(params: dict[str, Any]) -> Any:
        if prior is not None:
            return prior(params)
        return type(conn).get_new_connection(conn, params)

    scope = _covering(_current_scope.get(), conn.alias)
    if scope is None or conn.alias not in scope.startup:
        return connect(conn_params)
    params = dict(conn_params)
    # An `options` not given falls back to PGOPTIONS in libpq: keep what it says.
    # (Options that come from a service file are replaced, as by any `options` given.)
    existing = params["options"] if "options" in params else os.environ.get("PGOPTIONS", "")
    params["options"] = startup_option(scope.token, existing)
    try:
        raw = connect(params)
    except Exception as exc:
        # Switchyard names the setting when it refuses the token at startup (another
        # cluster's, or not one of its tokens); PgBouncer, in front of an alias that
        # does not go through Switchyard, refuses "options" as an unsupported startup
        # parameter. Anything else (the server is down) is not ours to handle.
        text = str(exc)
        if CAUSAL_SETTING not in text and "startup parameter" not in text:
            raise
        logger.warning(
            "connecting %r with the causal token failed: %s; connecting without it",
            conn.alias, text.strip())
        scope.refused = True
        scope.startup.discard(conn.alias)
        scope.given_up.add(conn.alias)  # a SET of it would be refused too
        return connect(conn_params)
    scope.accepted = True
    scope.opened[conn.alias] = raw
    return raw


def _close(conn: BaseDatabaseWrapper) -> None:
    try:
        conn.close()
    except Exception as exc:
        logger.warning("closing the connection of %r failed: %s", conn.alias, exc)


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, from Django's wrapper or the driver's own."""
    for error in (exc, getattr(exc, "__cause__", None)):
        code: str | None = (getattr(error, "sqlstate", None)  # psycopg 3
                            or getattr(error, "pgcode", None))  # psycopg 2
        if code:
            return code
    return None


def _mysql_errno(exc: BaseException) -> int | None:
    """The MySQL error number of a database error (mysqlclient puts it first in
    `args`, and Django's wrapper copies the args), or None."""
    for error in (exc, getattr(exc, "__cause__", None)):
        args = getattr(error, "args", None) or ()
        # bool is an int too, and no driver's error number.
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            return args[0]
    return None


def refused_as_invalid(exc: BaseException) -> bool:
    """Whether Switchyard refused a token as one it will never accept (another
    cluster's, or not a token): SQLSTATE 22023 on PostgreSQL, error 1231 on MySQL."""
    return (_sqlstate(exc) == INVALID_PARAMETER_VALUE
            or _mysql_errno(exc) == MYSQL_WRONG_VALUE_FOR_VAR)


def _covering(scope: TokenScope | None, alias: str) -> TokenScope | None:
    """The innermost scope from `scope` outwards that covers `alias`."""
    while scope is not None and alias not in scope.aliases:
        scope = scope.parent
    return scope


def _between_transactions(conn: BaseDatabaseWrapper) -> bool:
    # get_autocommit() connects if needed: only ask an open connection.
    return not conn.in_atomic_block and conn.get_autocommit()


def between_transactions(conn: BaseDatabaseWrapper) -> bool:
    """Whether `conn` is open and outside any transaction (where Switchyard answers the
    token statements). Does no I/O."""
    return conn.connection is not None and _between_transactions(conn)


def reset(conn: BaseDatabaseWrapper) -> None:
    """Take a token set with a SET off `conn` (open, between transactions); a failure
    is logged."""
    try:
        run_own_statement(conn, reset_sql(conn.vendor))
    except Exception as exc:
        logger.warning("%s failed on %r: %s", reset_sql(conn.vendor), conn.alias, exc)


def current_scope_token() -> str:
    """The token of the innermost current TokenScope ("" if none): what is in force
    here (a request's cookie, an enclosing use_token(), a task's header)."""
    scope = _current_scope.get()
    return scope.token if scope is not None else ""


def covering_scope(alias: str) -> TokenScope | None:
    """The innermost current TokenScope that covers `alias`, or None."""
    return _covering(_current_scope.get(), alias)


def run_own_statement(conn: BaseDatabaseWrapper, sql: str) -> Any:
    """Run one of our statements, without parameters, and return its first row."""
    flag = _own_statement.set(True)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone() if cursor.description is not None else None
    finally:
        _own_statement.reset(flag)


def _on_connection_created(sender: type[BaseDatabaseWrapper], connection: BaseDatabaseWrapper,
                           **kwargs: Any) -> None:
    scope = _covering(_current_scope.get(), connection.alias)
    if scope is None:
        return
    if scope.opened.get(connection.alias) is connection.connection:
        return  # the token went with the startup options
    if connection.alias not in scope.given_up:
        scope.apply(connection)


connection_created.connect(_on_connection_created, dispatch_uid="django_switchyard.causal")
