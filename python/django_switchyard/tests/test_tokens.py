import time
from unittest import mock

import pytest
from django.test import override_settings

from django_switchyard.tokens import (
    MAX_TOKEN_LENGTH, RESET_SQL, SHOW_SQL, is_valid_token, reset_sql, set_sql, show_sql,
    sign_token, token_name, token_of_row, unsign_token,
)

TOKEN = "sy1.7349012345678901234.2.0-16B3A28/aB9"


@pytest.mark.parametrize("token", [
    TOKEN,
    "sy1.x",
    "sy1.",
    "sy1." + "a" * (MAX_TOKEN_LENGTH - 4),
])
def test_well_formed_tokens(token):
    assert is_valid_token(token)


@pytest.mark.parametrize("token", [
    "",
    None,
    b"sy1.abc",
    "sy2.abc",
    "SY1.abc",
    "xsy1.abc",
    "sy1abc",
    "sy1.abc'; DROP TABLE x; --",
    "sy1.a'b",
    "sy1.a\\b",
    "sy1.a b",
    "sy1.abc\n",  # "$" would let this one through
    "sy1.a_b",
    "sy1.a:b",
    "sy1.\u0661\u0662",  # Arabic-Indic digits: \d would match them
    "sy1.é",
    "sy1." + "a" * (MAX_TOKEN_LENGTH - 3),
])
def test_malformed_tokens(token):
    assert not is_valid_token(token)


def test_set_sql_embeds_a_valid_token_as_a_literal():
    assert set_sql(TOKEN) == f"SET switchyard.causal_token = '{TOKEN}'"


def test_set_sql_refuses_anything_else():
    with pytest.raises(ValueError):
        set_sql("sy1.a'; RESET ALL; --")
    with pytest.raises(ValueError):
        set_sql("sy1.a'; DROP TABLE x; --", "mysql")


MYSQL_TOKEN = "sy1.m1f5962a2ce9803c8.0-1-11"


def test_statements_for_postgresql():
    # The default, and what any vendor but MySQL gets (the unit tests' SQLite).
    for args in [(), ("postgresql",), ("sqlite",)]:
        assert show_sql(*args) == SHOW_SQL == "SHOW switchyard.causal_token"
        assert reset_sql(*args) == RESET_SQL == "RESET switchyard.causal_token"
        assert set_sql(TOKEN, *args) == f"SET switchyard.causal_token = '{TOKEN}'"
        assert token_name(*args) == "switchyard.causal_token"


def test_statements_for_mysql():
    assert show_sql("mysql") == "SELECT @switchyard_causal_token"
    assert set_sql(MYSQL_TOKEN, "mysql") == f"SET @switchyard_causal_token = '{MYSQL_TOKEN}'"
    assert set_sql(MYSQL_TOKEN, vendor="mysql") == set_sql(MYSQL_TOKEN, "mysql")
    assert reset_sql("mysql") == "SET @switchyard_causal_token = ''"
    assert token_name("mysql") == "@switchyard_causal_token"


def test_a_mysql_token_is_well_formed():
    assert is_valid_token(MYSQL_TOKEN)


@pytest.mark.parametrize("row, token", [
    ((TOKEN,), TOKEN),
    ((TOKEN.encode(),), TOKEN),  # a driver that hands the column over as bytes
    ((bytearray(b"sy1.x"),), "sy1.x"),
    (("",), ""),
    ((None,), ""),  # NULL
    (None, ""),
    ((), ""),
])
def test_token_of_row(row, token):
    assert token_of_row(row) == token


def test_cookie_round_trip():
    value = sign_token(TOKEN)
    assert value.startswith(TOKEN + ":")
    assert unsign_token(value, max_age=10) == TOKEN


@pytest.mark.parametrize("value", [None, "", "garbage", TOKEN, TOKEN + ":abc:def"])
def test_unsigned_or_garbage_cookies_are_ignored(value):
    assert unsign_token(value, max_age=10) is None


def test_altered_cookie_is_ignored():
    value = sign_token(TOKEN)
    forged = value.replace(TOKEN, "sy1.ffffffffffffffff", 1)
    assert unsign_token(forged, max_age=10) is None


def test_cookie_signed_with_another_key_is_ignored():
    with override_settings(SECRET_KEY="another-key"):
        value = sign_token(TOKEN)
    assert unsign_token(value, max_age=10) is None


def test_cookie_signed_with_a_fallback_key_still_counts():
    with override_settings(SECRET_KEY="old-key"):
        value = sign_token(TOKEN)
    with override_settings(SECRET_KEY="new-key", SECRET_KEY_FALLBACKS=["old-key"]):
        assert unsign_token(value, max_age=10) == TOKEN


def test_cookie_signature_is_not_valid_for_other_salts():
    from django.core import signing

    value = signing.TimestampSigner(salt="something.else").sign(TOKEN)
    assert unsign_token(value, max_age=10) is None


def test_cookie_expires_after_max_age():
    now = time.time()
    with mock.patch("django.core.signing.time.time", return_value=now):
        value = sign_token(TOKEN)
    with mock.patch("django.core.signing.time.time", return_value=now + 9):
        assert unsign_token(value, max_age=10) == TOKEN
    with mock.patch("django.core.signing.time.time", return_value=now + 12):
        assert unsign_token(value, max_age=10) is None


def test_signed_but_malformed_token_is_ignored():
    # Signed by us, yet not a token: never let it near a SET statement.
    assert unsign_token(sign_token("sy1.a'b"), max_age=10) is None
