"""current_token() and use_token(), the Celery recipe's two halves."""
import logging
import sqlite3

import pytest
from django.db import OperationalError, connections, transaction
from django.db.transaction import TransactionManagementError

from django_switchyard.causal import current_token, use_token

A = "sy1.1111111111111111111.1.0-A"
B = "sy1.1111111111111111111.1.0-B"


def query(alias):
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")


def set_(token):
    return f"SET switchyard.causal_token = '{token}'"


def opt(token):
    """The startup options of a connection opened with `token`."""
    return f"-c switchyard.causal_token={token}"


RESET = "RESET switchyard.causal_token"


def is_open(alias):
    return connections[alias].connection is not None


def test_current_token(statements):
    statements.token = A
    assert current_token() == A
    assert statements.log == [("default", "SHOW switchyard.causal_token")]
    assert current_token("replica") == A


def test_current_token_without_writes_is_empty(statements):
    assert current_token() == ""


def test_current_token_inside_a_transaction_is_refused(statements):
    with transaction.atomic():
        with pytest.raises(TransactionManagementError):
            current_token()
    assert statements.log == []


def test_current_token_on_a_database_error_is_empty_and_logged(statements, caplog):
    statements.fail_on, statements.error = "SHOW", OperationalError("no such setting")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        assert current_token() == ""
    assert "SHOW switchyard.causal_token failed on 'default'" in caplog.text


def test_current_token_drops_a_malformed_answer(statements):
    statements.token = "sy1.a'b"
    assert current_token() == ""


def test_use_token_opens_nothing_and_gives_the_token_at_connect(statements):
    with use_token(A):
        assert statements.connects.log == []
        query("replica")
        assert is_open("replica")
    assert statements.connects.log == [("replica", opt(A))]
    assert statements.log == []  # no SET, no RESET
    # Opened with the token: closed, so that nothing reuses it with the token.
    assert not is_open("replica")
    assert not is_open("default")
    query("replica")  # after the block: no token
    assert statements.connects.log == [("replica", opt(A)), ("replica", None)]


def test_use_token_sets_it_on_an_open_connection_and_resets_it(statements):
    query("replica")  # as if CONN_MAX_AGE kept it open
    with use_token(A):
        assert statements.log == [("replica", set_(A))]
        query("replica")
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]
    assert is_open("replica")  # kept: the RESET took the token off
    assert statements.connects.log == [("replica", None)]


def test_use_token_without_startup_options_sets_it_as_it_connects(statements, set_only):
    # OPTIONS["pool"], or a backend other than PostgreSQL.
    with use_token(A):
        query("replica")
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]
    assert statements.connects.log == [("replica", None)]
    assert not is_open("default")


def test_a_set_the_node_cannot_honour_reconnects_with_the_token(statements, caplog):
    # Session pooling mode: the open connection's standby has not replayed the token.
    class DriverError(Exception):
        sqlstate = "55000"

    error = OperationalError("node has not replayed up to this causal token")
    error.__cause__ = DriverError()
    statements.fail_on, statements.error = "SET", error
    query("replica")
    with caplog.at_level(logging.INFO, logger="django_switchyard"):
        with use_token(A):
            assert not is_open("replica")  # closed at once
            query("replica")
    assert statements.log == [("replica", set_(A))]  # not applied: nothing to RESET
    assert statements.connects.log == [("replica", None), ("replica", opt(A))]
    assert not is_open("replica")  # opened with the token: closed
    assert "closing it, the next query connects with the token" in caplog.text
    assert "failed" not in caplog.text


def test_a_set_the_node_cannot_honour_without_startup_options_is_logged(statements, set_only, caplog):
    class DriverError(Exception):
        pgcode = "55000"  # psycopg2's spelling

    error = OperationalError("node has not replayed up to this causal token")
    error.__cause__ = DriverError()
    statements.fail_on, statements.error = "SET", error
    query("replica")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        with use_token(A):
            query("replica")
    assert is_open("replica")  # reconnecting would not help
    assert statements.connects.log == [("replica", None)]
    assert "SET switchyard.causal_token failed on 'replica'" in caplog.text


def test_a_token_refused_at_connect_is_logged_and_the_connection_made_without_it(statements, caplog):
    statements.connects.refuse = {"replica"}
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        with use_token(A):
            query("replica")
            assert is_open("replica")
    assert statements.connects.log == [("replica", opt(A)), ("replica", None)]
    assert statements.log == []  # no SET either: it would be refused the same way
    assert "connecting 'replica' with the causal token failed" in caplog.text
    assert is_open("replica")  # opened without the token: nothing to undo


def test_a_pooler_that_refuses_options_gets_a_connection_without_them(statements, monkeypatch, caplog):
    # An alias that goes through PgBouncer rather than Switchyard.
    from django.db.backends.sqlite3.base import DatabaseWrapper

    real = DatabaseWrapper.get_new_connection

    def pgbouncer(self, conn_params):
        if "options" in conn_params:
            raise sqlite3.OperationalError("FATAL:  unsupported startup parameter: options")
        return real(self, conn_params)

    monkeypatch.setattr(DatabaseWrapper, "get_new_connection", pgbouncer)
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        with use_token(A):
            query("replica")
    assert "connecting 'replica' with the causal token failed" in caplog.text
    assert statements.log == []


def test_other_connect_errors_are_not_hidden(statements, monkeypatch):
    from django.db.backends.sqlite3.base import DatabaseWrapper

    def down(self, conn_params):
        raise sqlite3.OperationalError("connection refused")

    monkeypatch.setattr(DatabaseWrapper, "get_new_connection", down)
    with use_token(A):
        with pytest.raises(OperationalError, match="connection refused"):
            query("replica")


def test_the_token_is_added_after_the_options_given(statements, monkeypatch):
    from django.db.backends.sqlite3.base import DatabaseWrapper

    real = DatabaseWrapper.get_connection_params

    def with_options(self):
        params = real(self)
        if self.alias == "replica":
            params["options"] = "-c search_path=app"
        return params

    monkeypatch.setattr(DatabaseWrapper, "get_connection_params", with_options)
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=64MB")
    with use_token(A):
        query("replica")
        query("default")
    assert statements.connects.log == [
        ("replica", "-c search_path=app " + opt(A)),
        ("default", "-c work_mem=64MB " + opt(A)),  # none given: libpq would use PGOPTIONS
    ]
    # Nothing was written into the settings: other threads' connections share them.
    from django.conf import settings

    assert "options" not in connections["replica"].settings_dict["OPTIONS"]
    assert "options" not in settings.DATABASES["replica"].get("OPTIONS", {})


def test_which_connections_take_startup_options():
    from types import SimpleNamespace

    from django_switchyard.causal import _takes_startup_token

    def conn(vendor, **options):
        return SimpleNamespace(vendor=vendor, settings_dict={"OPTIONS": options})

    assert _takes_startup_token(conn("postgresql"))
    assert _takes_startup_token(conn("postgresql", options="-c geqo=off", pool=False))
    assert not _takes_startup_token(conn("postgresql", pool=True))
    assert not _takes_startup_token(conn("postgresql", pool={"min_size": 2}))
    assert not _takes_startup_token(conn("sqlite"))


def test_the_hook_is_installed_once_and_keeps_another(statements):
    conn = connections["replica"]
    calls = []

    def theirs(conn_params):
        calls.append(conn_params.get("options"))
        return type(conn).get_new_connection(conn, conn_params)

    conn.get_new_connection = theirs
    with use_token(A):
        with use_token(B):
            query("replica")
    assert calls == [opt(B)]
    query("replica")
    assert calls == [opt(B), None]


def test_use_token_with_aliases(statements):
    query("default")
    query("replica")
    with use_token(A, aliases="replica"):  # a lone alias is one alias
        pass
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]


def test_use_token_with_no_token_does_nothing(statements):
    for token in ("", None):
        with use_token(token):
            query("replica")
    assert statements.log == []


def test_use_token_refuses_a_malformed_token(statements):
    with pytest.raises(ValueError):
        with use_token("sy1.x'; DROP TABLE t; --"):
            pass


def test_nested_use_token_puts_the_outer_token_back(statements):
    with use_token(A):
        query("replica")  # connects with A
        with use_token(B, aliases=["replica", "default"]):  # replica open: SET B
            query("default")  # connects with B
        # Exit: default was opened with B, so it is closed; replica gets A back.
        assert not is_open("default")
        query("replica")
        query("default")  # connects with A
    assert statements.connects.log == [
        ("replica", opt(A)), ("default", opt(B)), ("default", opt(A)),
    ]
    assert statements.log == [("replica", set_(B)), ("replica", set_(A))]
    assert not is_open("replica") and not is_open("default")


def test_nested_use_token_with_set_only(statements, set_only):
    with use_token(A):
        query("replica")
        with use_token(B, aliases=["replica", "default"]):
            query("default")
        query("replica")
    assert statements.log == [
        ("replica", set_(A)),
        ("replica", set_(B)),  # inner entry: replica already open
        ("default", set_(B)),  # inner: default connects
        ("default", set_(A)),  # inner exit: default is covered by the outer scope too
        ("replica", set_(A)),
        ("default", RESET),
        ("replica", RESET),
    ]


def test_use_token_inside_a_transaction_is_not_applied(statements, caplog):
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        with transaction.atomic(using="replica"):
            query("replica")
            with use_token(A):
                query("replica")
    assert statements.log == []
    assert "inside a transaction" in caplog.text


def test_use_token_before_atomic_covers_the_transaction(statements):
    with use_token(A):
        with transaction.atomic(using="replica"):
            query("replica")
    assert statements.connects.log == [("replica", opt(A))]
    assert not is_open("replica")


def test_use_token_before_atomic_covers_the_transaction_with_set_only(statements, set_only):
    with use_token(A):
        with transaction.atomic(using="replica"):
            query("replica")
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]


def test_a_connection_opened_with_the_token_is_not_closed_inside_a_transaction(statements, caplog):
    # Misuse: the block ends inside a transaction it started. Closing the connection
    # would break the transaction; the token stays on it, with a warning.
    atomic = transaction.atomic(using="replica")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        with use_token(A):
            atomic.__enter__()
            query("replica")
    assert is_open("replica")
    assert "causal token left on 'replica'" in caplog.text
    atomic.__exit__(None, None, None)
    assert statements.connects.log == [("replica", opt(A))]


def test_use_token_when_the_body_raises(statements):
    query("replica")
    with pytest.raises(KeyError):
        with use_token(A):
            query("default")
            raise KeyError("task failed")
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]
    assert statements.connects.log == [("replica", None), ("default", opt(A))]
    assert not is_open("default")


def test_current_token_from_on_commit(statements):
    # The Celery recipe: enqueue from on_commit, when the write is committed.
    statements.token = A
    got = []
    with transaction.atomic():
        query("default")
        transaction.on_commit(lambda: got.append(current_token()))
        assert got == []
    assert got == [A]


# MySQL / MariaDB (Django's mysql backend, mysqlclient): no startup option, the token
# always goes on with a SET, and comes off with SET ... = ''.

M_SHOW = "SELECT @switchyard_causal_token"
M_RESET = "SET @switchyard_causal_token = ''"


def m_set(token):
    return f"SET @switchyard_causal_token = '{token}'"


def mysql_error(number, message):
    """What Django raises for a mysqlclient error: its wrapper, with the driver's
    exception (error number first in args) as the cause."""
    class MySQLdbOperationalError(Exception):
        pass

    error = OperationalError(number, message)
    error.__cause__ = MySQLdbOperationalError(number, message)
    return error


def test_mysql_connections_take_no_startup_option():
    from types import SimpleNamespace

    from django_switchyard.causal import _takes_startup_token

    assert not _takes_startup_token(SimpleNamespace(vendor="mysql", settings_dict={"OPTIONS": {}}))


def test_current_token_on_mysql(statements, mysql):
    statements.token = A
    assert current_token() == A
    assert statements.log == [("default", M_SHOW)]


def test_current_token_on_mysql_failing_is_logged(statements, mysql, caplog):
    statements.fail_on, statements.error = M_SHOW, mysql_error(2013, "Lost connection")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        assert current_token() == ""
    assert "SELECT @switchyard_causal_token failed on 'default'" in caplog.text


def test_use_token_on_mysql_sets_it_as_a_connection_opens(statements, mysql):
    with use_token(A):
        assert statements.log == []  # nothing open, nothing opened
        query("replica")
    assert statements.connects.log == [("replica", None)]  # no startup options
    assert statements.log == [("replica", m_set(A)), ("replica", M_RESET)]
    assert is_open("replica")  # not opened with a token: kept, reset
    assert not is_open("default")


def test_use_token_on_mysql_on_an_open_connection(statements, mysql):
    query("replica")
    with use_token(A):
        assert statements.log == [("replica", m_set(A))]
        query("replica")
    assert statements.log == [("replica", m_set(A)), ("replica", M_RESET)]
    assert statements.connects.log == [("replica", None)]


def test_nested_use_token_on_mysql(statements, mysql):
    with use_token(A):
        query("replica")
        with use_token(B, aliases="replica"):
            query("replica")
        query("replica")
    assert statements.log == [
        ("replica", m_set(A)), ("replica", m_set(B)), ("replica", m_set(A)), ("replica", M_RESET),
    ]


def test_a_token_mysql_refuses_is_logged_and_the_block_runs(statements, mysql, caplog):
    from django_switchyard.causal import TokenScope

    statements.fail_on = m_set(A)
    statements.error = mysql_error(
        1231, "@switchyard_causal_token comes from another cluster; use a token from "
              "this cluster's connections")
    query("replica")
    scope = TokenScope(A, ["replica"])
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        scope.open()
        query("replica")
        scope.close()
    assert scope.refused and not scope.accepted
    assert is_open("replica")  # never closed for a MySQL refusal
    assert statements.log == [("replica", m_set(A))]  # not applied: nothing to reset
    assert "SET @switchyard_causal_token failed on 'replica'" in caplog.text


@pytest.mark.parametrize("error, refused", [
    (mysql_error(1231, "invalid value for @switchyard_causal_token: not a token"), True),
    (OperationalError(1231, "comes from another cluster"), True),  # Django's wrapper alone
    (mysql_error(1064, "each sent alone"), False),
    (mysql_error(2013, "Lost connection to server during query"), False),
    (OperationalError("1231"), False),  # SQLite's errors: a message, not a number
    (OperationalError(True, "x"), False),
])
def test_which_mysql_errors_are_refusals(error, refused):
    from django_switchyard.causal import refused_as_invalid

    assert refused_as_invalid(error) is refused


def test_postgresql_refusals_still_count():
    from django_switchyard.causal import refused_as_invalid

    class DriverError(Exception):
        sqlstate = "22023"

    class NotInState(Exception):
        sqlstate = "55000"

    error = OperationalError("from another cluster")
    error.__cause__ = DriverError()
    assert refused_as_invalid(error)
    error.__cause__ = NotInState()
    assert not refused_as_invalid(error)
