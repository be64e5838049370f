"""Django configured for the unit tests: two SQLite aliases standing in for
Switchyard's endpoints. Nothing here needs a proxy; the tests that follow statements
replace `run_own_statement` with a recorder (see the `statements` fixture), and record
the startup options connections are opened with (the `connects` fixture)."""
import shutil
import sqlite3
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


def pytest_unconfigure():
    shutil.rmtree(_tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_slate():
    """No connection open, no token scope current (one test leaves a streaming
    response unclosed on purpose), and no connect hook installed."""
    from django.db import connections

    from django_switchyard.causal import _current_scope

    def clean():
        _current_scope.set(None)  # dropped, not closed: the tests assert on logs
        connections.close_all()
        for alias in connections:
            vars(connections[alias]).pop("get_new_connection", None)

    clean()
    yield
    clean()


class Connects:
    """Stands in for libpq and Switchyard at connect time: records (alias, options) for
    each connection opened, `options` being the startup options (None if none given),
    and refuses, as Switchyard does a token from another cluster, a connection with a
    causal token on an alias in `refuse`."""

    def __init__(self):
        self.log = []
        self.refuse = set()


@pytest.fixture
def connects(monkeypatch):
    from django.db.backends.sqlite3.base import DatabaseWrapper

    from django_switchyard import causal

    real = DatabaseWrapper.get_new_connection
    recorder = Connects()

    def get_new_connection(self, conn_params):
        params = dict(conn_params)
        options = params.pop("options", None)  # SQLite takes none
        recorder.log.append((self.alias, options))
        if options and "switchyard.causal_token" in options and self.alias in recorder.refuse:
            raise sqlite3.OperationalError(
                "connection failed: FATAL:  switchyard.causal_token comes from another cluster")
        return real(self, params)

    monkeypatch.setattr(DatabaseWrapper, "get_new_connection", get_new_connection)
    # SQLite stands in for Django's PostgreSQL backend, which passes `options` to libpq.
    monkeypatch.setattr(causal, "_takes_startup_token", lambda conn: True)
    return recorder


@pytest.fixture
def set_only(monkeypatch, connects):
    """Connections that cannot take the token as a startup option (OPTIONS["pool"], a
    backend other than PostgreSQL): it goes on with a SET once connected."""
    from django_switchyard import causal

    monkeypatch.setattr(causal, "_takes_startup_token", lambda conn: False)


@pytest.fixture
def mysql(monkeypatch, connects):
    """Both aliases stand in for Django's MySQL backend (mysqlclient): the vendor says
    "mysql", and no connection takes the token as a startup option (what
    `_takes_startup_token` says for that vendor, tested on its own)."""
    from django.db import connections

    from django_switchyard import causal

    for alias in connections:
        monkeypatch.setattr(connections[alias], "vendor", "mysql")
    monkeypatch.setattr(causal, "_takes_startup_token", lambda conn: False)


def _is_show(sql):
    return sql.startswith("SHOW") or sql == "SELECT @switchyard_causal_token"


class Statements:
    """Stands in for Switchyard: records (alias, sql) of the package's own statements
    and answers SHOW (SELECT @switchyard_causal_token on MySQL) with `self.token`, or
    raises `self.error` for statements that start with `self.fail_on`.
    `self.connects` records the connections opened."""

    def __init__(self, connects):
        self.connects = connects
        self.log = []
        self.token = ""
        self.fail_on = None
        self.error = None

    def __call__(self, conn, sql):
        # The package must never open a connection for its own statements (except
        # current_token(), which the caller asked for).
        assert conn.connection is not None or _is_show(sql), (conn.alias, sql)
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
        if _is_show(sql):
            return (self.token,)
        return None


@pytest.fixture
def statements(monkeypatch, connects):
    from django_switchyard import causal, middleware

    fake = Statements(connects)
    monkeypatch.setattr(causal, "run_own_statement", fake)
    monkeypatch.setattr(middleware, "run_own_statement", fake)
    return fake
