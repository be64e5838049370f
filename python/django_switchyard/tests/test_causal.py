"""current_token() and use_token(), the Celery recipe's two halves."""
import logging

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


RESET = "RESET switchyard.causal_token"


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


def test_use_token_opens_nothing_and_resets_what_it_set(statements):
    with use_token(A):
        assert statements.log == []
        query("replica")
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]
    assert connections["default"].connection is None


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
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]


def test_use_token_when_the_body_raises(statements):
    with pytest.raises(KeyError):
        with use_token(A):
            query("replica")
            raise KeyError("task failed")
    assert statements.log == [("replica", set_(A)), ("replica", RESET)]


def test_current_token_from_on_commit(statements):
    # The Celery recipe: enqueue from on_commit, when the write is committed.
    statements.token = A
    got = []
    with transaction.atomic():
        query("default")
        transaction.on_commit(lambda: got.append(current_token()))
        assert got == []
    assert got == [A]
