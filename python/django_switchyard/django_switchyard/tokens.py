"""Causal tokens as text: validation, the statements that carry them, cookie signing.

Pure functions (no database); the rest of the package builds on these.

Switchyard's tokens are opaque ASCII strings that start with `sy1.` and use only
`[A-Za-z0-9./-]`. That alphabet has no quote and no backslash, so a token that passed
`is_valid_token` can be written into a SQL string literal as it is, and into libpq's
`options` startup parameter (words split on whitespace, `\\` escaping) as it is too. The
statements must be sent without parameters anyway: Switchyard answers them itself only
as a simple-protocol query sent alone, and psycopg 3 uses the simple protocol only for
a statement without parameters.
"""
import re

from django.core import signing

# Far longer than any token Switchyard mints; a bound keeps a forged cookie or task
# argument from carrying an arbitrarily large string into a statement.
MAX_TOKEN_LENGTH = 1024

_TOKEN = re.compile(r"sy1\.[A-Za-z0-9./-]*")

CAUSAL_SETTING = "switchyard.causal_token"
SHOW_SQL = f"SHOW {CAUSAL_SETTING}"
RESET_SQL = f"RESET {CAUSAL_SETTING}"

# Separates these signatures from every other use of SECRET_KEY in the project.
COOKIE_SALT = "django_switchyard.causal_cookie"


def is_valid_token(token):
    """True if `token` has the shape of a Switchyard causal token."""
    return (
        isinstance(token, str)
        and len(token) <= MAX_TOKEN_LENGTH
        # fullmatch, not match + "$": "$" would also accept a trailing newline.
        and _TOKEN.fullmatch(token) is not None
    )


def set_sql(token):
    """The statement that makes a connection's reads at least as fresh as `token`."""
    if not is_valid_token(token):
        raise ValueError(f"not a Switchyard causal token: {token!r}")
    return f"SET switchyard.causal_token = '{token}'"


def startup_option(token, existing=""):
    """libpq's `options` value that gives `token` to a new connection, after the
    options in `existing` (Switchyard takes the setting out before the server sees
    them; the last one given wins)."""
    if not is_valid_token(token):
        raise ValueError(f"not a Switchyard causal token: {token!r}")
    option = f"-c {CAUSAL_SETTING}={token}"
    return f"{existing} {option}" if existing and existing.strip() else option


def sign_token(token):
    """The cookie value for `token`: the token, a timestamp, and their signature."""
    return _signer().sign(token)


def unsign_token(value, max_age):
    """The token in a cookie value, or None if the value is missing, forged, altered,
    older than `max_age` seconds, or does not hold a well-formed token."""
    if not value:
        return None
    try:
        token = _signer().unsign(value, max_age=max_age)
    except signing.BadSignature:  # SignatureExpired is a BadSignature too
        return None
    return token if is_valid_token(token) else None


def _signer():
    # Created per call: the key comes from settings (SECRET_KEY, and
    # SECRET_KEY_FALLBACKS while a key is being rotated), which tests override.
    return signing.TimestampSigner(salt=COOKIE_SALT)
