"""The second seed article's project, after: its `default` / `failover1` / `failover2`
aliases, the health-check file and the router that picked among them are gone. One
alias points at Switchyard's read-write port; Switchyard checks the servers, follows
the primary and moves the connections when it changes."""
import os

SECRET_KEY = "example-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["notes"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("SY_RW_PORT", "6432"),  # Switchyard's read-write port
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "app",
    },
}
