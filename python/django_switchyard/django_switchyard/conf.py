"""The package's settings and their defaults.

Read each time they are needed rather than once at import, so that
`override_settings` works in tests and nothing here touches settings before Django
is configured.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from collections.abc import Iterable


def write_aliases() -> list[str]:
    """Aliases whose statements count as writes (the middleware asks them for a token)."""
    return _aliases("SWITCHYARD_WRITE_ALIASES", ["default"])


def read_aliases() -> list[str]:
    """Aliases that get the token before their first query (default: every alias)."""
    return _aliases("SWITCHYARD_READ_ALIASES", list(settings.DATABASES))


def replica_alias() -> str:
    """Where PrimaryReplicaRouter sends reads: Switchyard's read-only endpoint."""
    return getattr(settings, "SWITCHYARD_REPLICA_ALIAS", "replica")


def cookie_name() -> str:
    return getattr(settings, "SWITCHYARD_CAUSAL_COOKIE", "switchyard_causal")


def cookie_max_age() -> int:
    """Seconds a token stays in force for the user's next requests.

    Short on purpose: replication normally catches up in well under a second, and
    after that the token costs a little and buys nothing.
    """
    return int(getattr(settings, "SWITCHYARD_CAUSAL_MAX_AGE", 10))


def _aliases(name: str, default: Iterable[str]) -> list[str]:
    value = getattr(settings, name, None)
    if value is None:
        return list(default)
    if isinstance(value, str):  # a lone "default" would otherwise become d, e, f, ...
        raise ImproperlyConfigured(f"{name} must be a list of database aliases, not a string")
    unknown = [alias for alias in value if alias not in settings.DATABASES]
    if unknown:
        raise ImproperlyConfigured(f"{name} names aliases not in DATABASES: {', '.join(unknown)}")
    return list(value)
