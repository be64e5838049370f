"""The first seed article's project, after: the same two aliases (`default` for
writes, `follower` for reads) and a router in its spirit, pointed at Switchyard's
read-write and read-only ports. The router no longer opens a socket to probe the
follower before every read: Switchyard checks the servers in the background, spreads
reads over the replicas that are up and caught up, and sends them to the primary when
none is."""
import os

SECRET_KEY = "example-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["notes"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def alias(port_env, default_port):
    return {
        "ENGINE": "django.db.backends.mysql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get(port_env, default_port),
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "app",
    }


DATABASES = {
    "default": alias("SY_RW_PORT", "6446"),  # Switchyard's read-write port: the primary
    "follower": alias("SY_RO_PORT", "6447"),  # its read-only port: a replica, else the primary
}
DATABASE_ROUTERS = ["seedapp.routers.FollowerRouter"]
READ_ALIAS = "follower"
