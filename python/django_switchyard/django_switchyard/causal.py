"""Causal tokens across connections: read at least as fresh as a given write.

Switchyard gives read-your-writes within one client connection by itself. Across
connections (the next HTTP request, a Celery worker) the freshness has to travel as a
token, and three statements, answered by the proxy without a server round trip, move
it in and out of a connection:

    SHOW switchyard.causal_token              -- the newest write of this connection
    SET switchyard.causal_token = '<token>'   -- later reads at least that fresh
    RESET switchyard.causal_token             -- forget it

Switchyard recognises them only outside a transaction block (inside one they would go
to the server, where PostgreSQL accepts any dotted setting name and does nothing with
it), so this module runs them only on connections in autocommit mode.

Public API: `current_token()` and `use_token()`. `TokenScope` is the machinery that the
middleware shares with `use_token()`.
"""
import logging
from contextlib import contextmanager
from contextvars import ContextVar

from django.db import DEFAULT_DB_ALIAS, Error, connections
from django.db.backends.signals import connection_created
from django.db.transaction import TransactionManagementError

from . import conf
from .tokens import RESET_SQL, SHOW_SQL, is_valid_token, set_sql

logger = logging.getLogger("django_switchyard")

# What Switchyard answers a SET with a token it will never accept: one from another
# cluster, or not a token at all.
INVALID_PARAMETER_VALUE = "22023"

# The innermost open TokenScope. Django's connections are per thread (per async
# context under ASGI), and so is a ContextVar, so a scope sees exactly the connections
# of the request or task that opened it.
_current_scope = ContextVar("django_switchyard_scope", default=None)

# Set while one of this package's own statements runs, so that the middleware does
# not take a SET it sent itself for a statement of the application.
_own_statement = ContextVar("django_switchyard_own_statement", default=False)


def running_own_statement():
    return _own_statement.get()


def forget_scopes():
    """Start a request with no token scope. Requests do not nest, so a scope still
    current here was left by an earlier request on this thread whose response was
    never closed; it must not hand its token to this one's connections."""
    _current_scope.set(None)


def current_token(alias=DEFAULT_DB_ALIAS):
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
        row = run_own_statement(conn, SHOW_SQL)
    except Error as exc:
        logger.warning("SHOW switchyard.causal_token failed on %r: %s", alias, exc)
        return ""
    token = row[0] if row else ""
    if token and not is_valid_token(token):
        logger.warning("ignoring a malformed causal token from %r: %r", alias, token)
        return ""
    return token or ""


@contextmanager
def use_token(token, aliases=None):
    """Make reads in the block at least as fresh as `token`.

    `aliases` defaults to SWITCHYARD_READ_ALIASES (every alias). No connection is
    opened for it: one already open gets the token on entry, one the block opens gets
    it as it connects. On exit the token is taken off again (or the enclosing
    use_token()'s is put back). An empty token ("" or None: nothing was written) does
    nothing; a malformed one raises ValueError. A database error while setting it is
    logged and the block runs anyway, with the reads as fresh as the proxy makes them
    without a token.

    Enter it outside `transaction.atomic()`: the token goes onto a connection only
    between transactions.
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

    A connection that is already open (kept across requests with CONN_MAX_AGE) gets
    the token in open(); one opened later gets it from the connection_created signal,
    which Django sends right after connecting, still in autocommit and before any query
    of the application, even when the first query is in an atomic() block. close()
    takes the token off every connection it is on, so that a connection kept for the
    next request does not carry one user's freshness floor to another.
    """

    def __init__(self, token, aliases):
        self.sql = set_sql(token)  # validates the token
        self.token = token
        self.aliases = frozenset(aliases)
        self.applied = set()  # aliases whose connection has this token now
        self.accepted = False  # a SET of it succeeded somewhere
        self.refused = False  # a SET of it was refused as invalid (another cluster's)
        self.parent = None
        self._open = False

    def open(self):
        self.parent = _current_scope.get()
        _current_scope.set(self)
        self._open = True
        for alias in sorted(self.aliases):
            conn = connections[alias]
            if conn.connection is not None:
                self.apply(conn)
        return self

    def close(self):
        if not self._open:
            return
        self._open = False
        # set() rather than reset(): a streaming response may be closed in another
        # context than the one that opened the scope (reset() would raise there).
        _current_scope.set(self.parent)
        for alias in sorted(self.applied):
            conn = connections[alias]
            if conn.connection is None:
                continue  # closed since: the token went with the client connection
            outer = _covering(self.parent, alias)
            if outer is not None:
                outer.apply(conn)  # an enclosing use_token(): put its token back
            elif not _between_transactions(conn):
                logger.warning(
                    "causal token left on %r: its connection is inside a transaction "
                    "when the scope ends", alias)
            else:
                try:
                    run_own_statement(conn, RESET_SQL)
                except Exception as exc:
                    logger.warning("RESET switchyard.causal_token failed on %r: %s", alias, exc)
        self.applied.clear()

    def apply(self, conn):
        """SET the token on `conn` (an open connection of one of our aliases)."""
        if not _between_transactions(conn):
            logger.warning(
                "causal token not applied on %r: its connection is inside a "
                "transaction (enter use_token() outside transaction.atomic())", conn.alias)
            return
        try:
            run_own_statement(conn, self.sql)
        except Exception as exc:
            # Reads still work, as fresh as the proxy makes them without a token.
            if _sqlstate(exc) == INVALID_PARAMETER_VALUE:
                self.refused = True
            logger.warning("SET switchyard.causal_token failed on %r: %s", conn.alias, exc)
        else:
            self.accepted = True
            self.applied.add(conn.alias)


def _sqlstate(exc):
    """The SQLSTATE of a database error, from Django's wrapper or the driver's own."""
    for error in (exc, getattr(exc, "__cause__", None)):
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)  # psycopg 3, 2
        if code:
            return code
    return None


def _covering(scope, alias):
    """The innermost scope from `scope` outwards that covers `alias`."""
    while scope is not None and alias not in scope.aliases:
        scope = scope.parent
    return scope


def _between_transactions(conn):
    # get_autocommit() connects if needed: only ask an open connection.
    return not conn.in_atomic_block and conn.get_autocommit()


def run_own_statement(conn, sql):
    """Run one of our statements, without parameters, and return its first row."""
    flag = _own_statement.set(True)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone() if cursor.description is not None else None
    finally:
        _own_statement.reset(flag)


def _on_connection_created(sender, connection, **kwargs):
    scope = _covering(_current_scope.get(), connection.alias)
    if scope is not None:
        scope.apply(connection)


connection_created.connect(_on_connection_created, dispatch_uid="django_switchyard.causal")
