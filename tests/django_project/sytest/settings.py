"""Settings for the Switchyard Django test project.

The database connections come from the environment so the Rust integration
tests can point them at the proxy: `default` uses the read-write endpoint and
`replica` the read-only endpoint, the classic Django primary/replica setup.

With SY_SINGLE=1 there is only `default` (SY_RW_PORT) and no router: the way
an application uses a proxy in transaction pooling mode that sends reads to
standbys by itself (read_write_split).

For tests/python/django_causal_check.py (which sets them itself):
SY_CAUSAL_MIDDLEWARE=1 adds django_switchyard's CausalReadsMiddleware, and
SY_PACKAGE_ROUTER=1 uses django_switchyard's PrimaryReplicaRouter instead of
shop.routers (two aliases only).
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
ALLOWED_HOSTS = ["testserver", "127.0.0.1"]  # django.test.Client's host; uvicorn (ASGI)
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
    # The postgresql backend uses psycopg 3 when it is installed, else psycopg2.
    return {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": env("SY_HOST", "127.0.0.1"),
        "PORT": env(port_variable),
        "USER": env("SY_USER", "app"),
        "PASSWORD": env("SY_PASSWORD", "app"),
        "NAME": env("SY_DB", "app"),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"connect_timeout": 10},
    }


SINGLE = os.environ.get("SY_SINGLE") == "1"

if SINGLE:
    DATABASES = {"default": database("SY_RW_PORT")}
    DATABASE_ROUTERS = []
else:
    DATABASES = {
        "default": database("SY_RW_PORT"),
        "replica": database("SY_RO_PORT"),
    }
    # Under `manage.py test` the replica is the test database itself, not a copy.
    DATABASES["replica"]["TEST"] = {"MIRROR": "default"}
    DATABASE_ROUTERS = ["shop.routers.PrimaryReplicaRouter"]

MIDDLEWARE = []
if os.environ.get("SY_CAUSAL_MIDDLEWARE") == "1":
    MIDDLEWARE.append("django_switchyard.middleware.CausalReadsMiddleware")
if not SINGLE and os.environ.get("SY_PACKAGE_ROUTER") == "1":
    DATABASE_ROUTERS = ["django_switchyard.routers.PrimaryReplicaRouter"]
