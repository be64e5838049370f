"""Django configured for the unit tests: two SQLite aliases standing in for
Switchyard's endpoints. Nothing here needs a proxy; the tests that follow statements
replace `run_own_statement` with a recorder (see the `statements` fixture)."""
import sys
import tempfile
from pathlib import Path

import django
import pytest
from django.conf import settings

# Test the package in this tree, not a copy pip installed earlier.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_tmp = tempfile.mkdtemp(prefix="django_switchyard_tests_")


def pytest_configure():
    if settings.configured:
        return
    settings.configure(
        SECRET_KEY="django-switchyard-tests",
        # Files, not :memory:: Django never closes an in-memory SQLite connection, and
        # the tests need to start with none open.
        DATABASES={
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": f"{_tmp}/default.sqlite3"},
            "replica": {"ENGINE": "django.db.backends.sqlite3", "NAME": f"{_tmp}/replica.sqlite3"},
        },
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
        DATABASE_ROUTERS=["django_switchyard.routers.PrimaryReplicaRouter"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


@pytest.fixture(autouse=True)
def clean_slate():
    """No connection open and no token scope current (one test leaves a streaming
    response unclosed on purpose)."""
    from django.db import connections

    from django_switchyard.causal import forget_scopes

    forget_scopes()
    connections.close_all()
    yield
    connections.close_all()
    forget_scopes()


class Statements:
    """Stands in for Switchyard: records (alias, sql) of the package's own statements
    and answers SHOW with `self.token`, or raises `self.error` for statements that
    start with `self.fail_on`."""

    def __init__(self):
        self.log = []
        self.token = ""
        self.fail_on = None
        self.error = None

    def __call__(self, conn, sql):
        # The package must never open a connection for its own statements (except
        # current_token(), which the caller asked for).
        assert conn.connection is not None or sql.startswith("SHOW"), (conn.alias, sql)
        self.log.append((conn.alias, sql))
        # Go through Django's cursor like the real statement would, so that the
        # middleware's statement watcher sees it (and must tell it is ours).
        from django_switchyard import causal

        flag = causal._own_statement.set(True)
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            causal._own_statement.reset(flag)
        if self.fail_on and sql.startswith(self.fail_on):
            raise self.error
        if sql.startswith("SHOW"):
            return (self.token,)
        return None


@pytest.fixture
def statements(monkeypatch):
    from django_switchyard import causal, middleware

    fake = Statements()
    monkeypatch.setattr(causal, "run_own_statement", fake)
    monkeypatch.setattr(middleware, "run_own_statement", fake)
    return fake
