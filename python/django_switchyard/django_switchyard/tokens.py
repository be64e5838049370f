"""Causal tokens as text: validation, the statements that carry them, cookie signing.

Pure functions (no database); the rest of the package builds on these.

Switchyard's tokens are opaque ASCII strings that start with `sy1.` and use only
`[A-Za-z0-9./-]`. That alphabet has no quote and no backslash, so a token that passed
`is_valid_token` can be written into a SQL string literal as it is, and into libpq's
`options` startup parameter (words split on whitespace, `\\` escaping) as it is too. The
statements must be sent without parameters anyway: Switchyard answers them itself only
as a simple-protocol query sent alone, and psycopg 3 uses the simple protocol only for
a statement without parameters.

The statements depend on the connection's vendor (Django's `connection.vendor`):

    PostgreSQL                                  MySQL / MariaDB
    SHOW switchyard.causal_token                SELECT @switchyard_causal_token
    SET switchyard.causal_token = '<token>'     SET @switchyard_causal_token = '<token>'
    RESET switchyard.causal_token               SET @switchyard_causal_token = ''

Any vendor other than "mysql" gets PostgreSQL's (the unit tests use SQLite).
"""
from __future__ import annotations

import re
from typing import Any, TypeGuard, cast

from django.core import signing

# Far longer than any token Switchyard mints; a bound keeps a forged cookie or task
# argument from carrying an arbitrarily large string into a statement.
MAX_TOKEN_LENGTH = 1024

_TOKEN = re.compile(r"sy1\.[A-Za-z0-9./-]*")

CAUSAL_SETTING = "switchyard.causal_token"
SHOW_SQL = f"SHOW {CAUSAL_SETTING}"
RESET_SQL = f"RESET {CAUSAL_SETTING}"

# MySQL has no custom settings: Switchyard answers statements on this user variable
# itself (the server never sees them).
MYSQL_VARIABLE = "@switchyard_causal_token"
MYSQL_SHOW_SQL = f"SELECT {MYSQL_VARIABLE}"
MYSQL_RESET_SQL = f"SET {MYSQL_VARIABLE} = ''"

# Separates these signatures from every other use of SECRET_KEY in the project.
COOKIE_SALT = "django_switchyard.causal_cookie"


def is_valid_token(token: object) -> TypeGuard[str]:
    """True if `token` has the shape of a Switchyard causal token."""
    return (
        isinstance(token, str)
        and len(token) <= MAX_TOKEN_LENGTH
        # fullmatch, not match + "$": "$" would also accept a trailing newline.
        and _TOKEN.fullmatch(token) is not None
    )


def _mysql(vendor: str) -> bool:
    return vendor == "mysql"


def token_name(vendor: str = "postgresql") -> str:
    """How the token is named in statements (and log messages) for `vendor`."""
    return MYSQL_VARIABLE if _mysql(vendor) else CAUSAL_SETTING


def show_sql(vendor: str = "postgresql") -> str:
    """The statement that returns the token of a connection's newest write."""
    return MYSQL_SHOW_SQL if _mysql(vendor) else SHOW_SQL


def set_sql(token: str, vendor: str = "postgresql") -> str:
    """The statement that makes a connection's reads at least as fresh as `token`."""
    if not is_valid_token(token):
        raise ValueError(f"not a Switchyard causal token: {token!r}")
    return f"SET {token_name(vendor)} = '{token}'"


def reset_sql(vendor: str = "postgresql") -> str:
    """The statement that takes a token set with set_sql() off a connection."""
    return MYSQL_RESET_SQL if _mysql(vendor) else RESET_SQL


def token_of_row(row: Any) -> str:
    """The token in the first column of `row` (an answer to show_sql()), "" if none.
    Not validated here."""
    value = row[0] if row else None
    if isinstance(value, (bytes, bytearray)):  # a driver that returns the column raw
        value = bytes(value).decode("ascii", "replace")
    return value or ""


def startup_option(token: str, existing: str = "") -> str:
    """libpq's `options` value that gives `token` to a new connection, after the
    options in `existing` (Switchyard takes the setting out before the server sees
    them; the last one given wins)."""
    if not is_valid_token(token):
        raise ValueError(f"not a Switchyard causal token: {token!r}")
    option = f"-c {CAUSAL_SETTING}={token}"
    return f"{existing} {option}" if existing and existing.strip() else option


def sign_token(token: str) -> str:
    """The cookie value for `token`: the token, a timestamp, and their signature."""
    return cast(str, _signer().sign(token))


def unsign_token(value: str | None, max_age: int) -> str | None:
    """The token in a cookie value, or None if the value is missing, forged, altered,
    older than `max_age` seconds, or does not hold a well-formed token."""
    if not value:
        return None
    try:
        token = _signer().unsign(value, max_age=max_age)
    except signing.BadSignature:  # SignatureExpired is a BadSignature too
        return None
    return token if is_valid_token(token) else None


def _signer() -> signing.TimestampSigner:
    # Created per call: the key comes from settings (SECRET_KEY, and
    # SECRET_KEY_FALLBACKS while a key is being rotated), which tests override.
    return signing.TimestampSigner(salt=COOKIE_SALT)
