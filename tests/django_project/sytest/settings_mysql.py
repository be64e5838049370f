"""Settings for the Switchyard Django test project on a MySQL / MariaDB cluster
(DJANGO_SETTINGS_MODULE=sytest.settings_mysql; tests/python/django_mysql_check.py).

The setup of the Django-on-MySQL article in ../shared/seeds: `default` (the master)
is Switchyard's read-write endpoint, `replica` (the article's follower) its read-only
endpoint, and shop.failover_router.FailoverRouter sends reads to `replica` and writes
to `default`. Connections come from the environment as in sytest.settings: SY_HOST,
SY_RW_PORT, SY_RO_PORT, SY_USER, SY_PASSWORD, SY_DB. The driver is mysqlclient.

For tests/python/django_mysql_causal_check.py (which sets them itself), as in
sytest.settings: SY_CAUSAL_MIDDLEWARE=1 puts django_switchyard's CausalReadsMiddleware
first in MIDDLEWARE, and SY_PACKAGE_ROUTER=1 uses django_switchyard's
PrimaryReplicaRouter (reads to `replica`) instead of the article's router.
"""
import os

from django.core.exceptions import ImproperlyConfigured


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None:
        raise ImproperlyConfigured(f"environment variable {name} must be set")
    return value


SECRET_KEY = "switchyard-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "shop.urls"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "shop",
]

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def database(port_variable):
    return {
        "ENGINE": "django.db.backends.mysql",
        # An IP address: "localhost" would make mysqlclient use the Unix socket.
        "HOST": env("SY_HOST", "127.0.0.1"),
        "PORT": env(port_variable),
        "USER": env("SY_USER", "app"),
        "PASSWORD": env("SY_PASSWORD", "app"),
        "NAME": env("SY_DB", "app"),
        # A new connection per request: after a failover the next request reconnects.
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"connect_timeout": 10, "charset": "utf8mb4"},
    }


DATABASES = {
    "default": database("SY_RW_PORT"),
    "replica": database("SY_RO_PORT"),
}
DATABASES["replica"]["TEST"] = {"MIRROR": "default"}
DATABASE_ROUTERS = ["shop.failover_router.FailoverRouter"]

MIDDLEWARE = []
if os.environ.get("SY_CAUSAL_MIDDLEWARE") == "1":
    # First: what other middleware writes happens inside it.
    MIDDLEWARE.insert(0, "django_switchyard.middleware.CausalReadsMiddleware")
if os.environ.get("SY_PACKAGE_ROUTER") == "1":
    DATABASE_ROUTERS = ["django_switchyard.routers.PrimaryReplicaRouter"]
    SWITCHYARD_REPLICA_ALIAS = "replica"
