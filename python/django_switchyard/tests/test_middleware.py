"""The middleware's flow, with the proxy's three statements recorded instead of sent
(the `statements` fixture): which statements go where, and the cookie."""
import logging
import time
from unittest import mock

import pytest
from django.db import DataError, OperationalError, connections
from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from django.test import RequestFactory, override_settings

from django_switchyard.middleware import CausalReadsMiddleware
from django_switchyard.tokens import sign_token, unsign_token

TOKEN = "sy1.1111111111111111111.1.0-3000060"
NEWER = "sy1.1111111111111111111.1.0-3000F00"
SET = f"SET switchyard.causal_token = '{TOKEN}'"
SET_NEWER = f"SET switchyard.causal_token = '{NEWER}'"
SHOW = "SHOW switchyard.causal_token"
RESET = "RESET switchyard.causal_token"
COOKIE = "switchyard_causal"
OPT = f"-c switchyard.causal_token={TOKEN}"  # startup options with the token
OPT_NEWER = f"-c switchyard.causal_token={NEWER}"


def is_open(alias):
    return connections[alias].connection is not None


def query(alias):
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")


def view(*aliases):
    """A view that runs one statement on each of `aliases`."""
    def run(request):
        for alias in aliases:
            query(alias)
        return HttpResponse("ok")
    return run


def get(middleware, cookie=None):
    request = RequestFactory().get("/")
    if cookie is not None:
        request.COOKIES[COOKIE] = cookie
    return middleware(request)


def test_a_request_that_uses_no_database_sends_nothing(statements):
    response = get(CausalReadsMiddleware(view()), sign_token(TOKEN))
    assert statements.log == []
    assert COOKIE not in response.cookies
    assert connections["default"].connection is None
    assert connections["replica"].connection is None


def test_a_write_sets_a_signed_short_lived_cookie(statements):
    statements.token = TOKEN
    response = get(CausalReadsMiddleware(view("default")))
    assert statements.log == [("default", SHOW)]
    morsel = response.cookies[COOKIE]
    assert unsign_token(morsel.value, max_age=10) == TOKEN
    assert morsel["max-age"] == 10
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert not morsel["secure"]
    assert morsel["path"] == "/"


def test_cookie_settings(statements):
    statements.token = TOKEN
    with override_settings(SWITCHYARD_CAUSAL_COOKIE="fresh", SWITCHYARD_CAUSAL_MAX_AGE=3,
                           SESSION_COOKIE_SECURE=True, SESSION_COOKIE_DOMAIN=".example.com"):
        response = get(CausalReadsMiddleware(view("default")))
    morsel = response.cookies["fresh"]
    assert (morsel["max-age"], morsel["secure"], morsel["domain"]) == (3, True, ".example.com")


def test_no_token_no_cookie(statements):
    statements.token = ""  # the connection wrote nothing
    response = get(CausalReadsMiddleware(view("default")))
    assert statements.log == [("default", SHOW)]
    assert COOKIE not in response.cookies


def test_reads_alone_ask_for_no_token(statements):
    get(CausalReadsMiddleware(view("replica")))
    assert statements.log == []


def test_the_token_goes_to_a_read_alias_as_a_startup_option(statements):
    response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert statements.connects.log == [("replica", OPT)]
    assert statements.log == []  # no SET, no RESET
    assert COOKIE not in response.cookies  # nothing new to remember
    assert not is_open("default")  # not opened for the token's sake
    # Opened with the token, so closed at the end: a later request must not reuse it.
    assert not is_open("replica")
    get(CausalReadsMiddleware(view("replica")))  # another user, no cookie
    assert statements.connects.log == [("replica", OPT), ("replica", None)]


def test_without_startup_options_the_token_is_set_as_the_alias_connects(statements, set_only):
    response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert statements.log == [("replica", SET), ("replica", RESET)]
    assert statements.connects.log == [("replica", None)]
    assert COOKIE not in response.cookies
    assert not is_open("default")


def test_a_connection_kept_from_an_earlier_request_gets_the_token_at_the_start(statements):
    query("replica")  # as if CONN_MAX_AGE kept it open
    seen = []

    def check(request):
        seen.extend(statements.log)
        query("replica")
        return HttpResponse("ok")

    get(CausalReadsMiddleware(check), sign_token(TOKEN))
    assert seen == [("replica", SET)]  # before the view's first query
    assert statements.log == [("replica", SET), ("replica", RESET)]
    assert is_open("replica")  # kept for the next request, without the token
    assert statements.connects.log == [("replica", None)]


def test_a_kept_connection_whose_node_is_behind_reconnects_with_the_token(statements):
    # Session pooling mode: the SET waits causal_wait_ms for the connection's standby,
    # which stays behind, and fails; the connection cannot move, a new one can.
    class DriverError(Exception):
        sqlstate = "55000"

    error = OperationalError("node has not replayed up to this causal token")
    error.__cause__ = DriverError()
    statements.fail_on, statements.error = "SET", error
    query("replica")  # as if CONN_MAX_AGE kept it open
    response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert response.status_code == 200
    assert statements.log == [("replica", SET)]
    assert statements.connects.log == [("replica", None), ("replica", OPT)]
    assert not is_open("replica")
    assert COOKIE not in response.cookies  # neither renewed nor deleted


def test_first_query_in_an_atomic_block_still_gets_the_token(statements):
    from django.db import transaction

    def in_transaction(request):
        with transaction.atomic(using="replica"):
            query("replica")
        return HttpResponse("ok")

    get(CausalReadsMiddleware(in_transaction), sign_token(TOKEN))
    assert statements.connects.log == [("replica", OPT)]
    assert statements.log == []
    assert not is_open("replica")


def test_a_write_after_a_token_gives_a_new_cookie(statements):
    statements.token = NEWER
    response = get(CausalReadsMiddleware(view("replica", "default")), sign_token(TOKEN))
    assert statements.connects.log == [
        ("replica", OPT),
        ("default", OPT),  # default is a read alias too (every alias by default)
    ]
    assert statements.log == [("default", SHOW)]  # before default is closed
    assert unsign_token(response.cookies[COOKIE].value, max_age=10) == NEWER
    assert not is_open("replica") and not is_open("default")


def test_a_write_after_a_token_on_kept_connections(statements):
    query("replica")
    query("default")
    statements.token = NEWER
    response = get(CausalReadsMiddleware(view("replica", "default")), sign_token(TOKEN))
    assert statements.log == [
        ("default", SET),
        ("replica", SET),
        ("default", SHOW),
        ("default", RESET),
        ("replica", RESET),
    ]
    assert unsign_token(response.cookies[COOKIE].value, max_age=10) == NEWER


def test_the_same_token_back_does_not_renew_the_cookie(statements):
    # One alias for both (read_write_split): SHOW includes the token SET on it.
    statements.token = TOKEN
    with override_settings(SWITCHYARD_READ_ALIASES=["default"]):
        response = get(CausalReadsMiddleware(view("default")), sign_token(TOKEN))
    assert statements.connects.log == [("default", OPT)]
    assert statements.log == [("default", SHOW)]
    assert COOKIE not in response.cookies


def test_read_and_write_alias_settings(statements):
    statements.token = TOKEN
    with override_settings(SWITCHYARD_READ_ALIASES=["replica"], SWITCHYARD_WRITE_ALIASES=["replica"]):
        response = get(CausalReadsMiddleware(view("default", "replica")), sign_token(NEWER))
    assert statements.connects.log == [("default", None), ("replica", OPT_NEWER)]
    assert statements.log == [("replica", SHOW)]
    assert unsign_token(response.cookies[COOKIE].value, max_age=10) == TOKEN


def test_misspelt_alias_is_a_configuration_error():
    from django.core.exceptions import ImproperlyConfigured

    with override_settings(SWITCHYARD_READ_ALIASES=["replcia"]):
        with pytest.raises(ImproperlyConfigured):
            CausalReadsMiddleware(view())
    with override_settings(SWITCHYARD_WRITE_ALIASES="default"):
        with pytest.raises(ImproperlyConfigured):
            CausalReadsMiddleware(view())


@pytest.mark.parametrize("cookie", ["", "garbage", TOKEN, sign_token(TOKEN) + "x"])
def test_a_bad_cookie_is_ignored(statements, cookie):
    response = get(CausalReadsMiddleware(view("replica")), cookie)
    assert response.status_code == 200
    assert statements.log == []


def test_an_expired_cookie_is_ignored(statements):
    now = time.time()
    with mock.patch("django.core.signing.time.time", return_value=now - 12):
        cookie = sign_token(TOKEN)  # 12 s ago; the default max age is 10
    response = get(CausalReadsMiddleware(view("replica")), cookie)
    assert response.status_code == 200
    assert statements.log == []


def refused():
    """What Django raises for Switchyard's answer to another cluster's token."""
    class DriverError(Exception):
        sqlstate = "22023"

    error = DataError('causal token is from another cluster')
    error.__cause__ = DriverError()
    return error


def test_a_refused_token_is_logged_and_the_cookie_dropped(statements, caplog):
    statements.fail_on, statements.error = "SET", refused()
    query("replica")  # kept open: the token goes on with a SET
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert response.status_code == 200
    assert statements.log == [("replica", SET)]  # not applied, so nothing to RESET
    assert "SET switchyard.causal_token failed on 'replica'" in caplog.text
    assert response.cookies[COOKIE].value == ""  # deleted
    assert response.cookies[COOKIE]["max-age"] == 0


def test_a_token_refused_at_connect_is_logged_and_the_cookie_dropped(statements, caplog):
    statements.connects.refuse = {"replica"}
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert response.status_code == 200  # the connection was made without the token
    assert statements.connects.log == [("replica", OPT), ("replica", None)]
    assert statements.log == []
    assert "connecting 'replica' with the causal token failed" in caplog.text
    assert response.cookies[COOKIE].value == ""  # deleted
    assert response.cookies[COOKIE]["max-age"] == 0


def test_other_set_failures_keep_the_cookie(statements, caplog):
    statements.fail_on = "SET"
    statements.error = OperationalError("server closed the connection unexpectedly")
    query("replica")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert response.status_code == 200
    assert "SET switchyard.causal_token failed on 'replica'" in caplog.text
    assert COOKIE not in response.cookies  # neither renewed nor deleted


def test_a_token_accepted_on_one_alias_keeps_the_cookie(statements):
    # Say "default" leads to another Switchyard cluster than "replica".
    statements.connects.refuse = {"default"}
    response = get(CausalReadsMiddleware(view("replica", "default")), sign_token(TOKEN))
    assert response.status_code == 200
    assert COOKIE not in response.cookies


def test_a_token_set_on_one_alias_keeps_the_cookie(statements, monkeypatch):
    query("replica")
    query("default")

    def fake(conn, sql):
        if conn.alias == "default" and sql.startswith("SET"):
            statements.log.append((conn.alias, sql))
            raise refused()
        return statements(conn, sql)

    from django_switchyard import causal
    monkeypatch.setattr(causal, "run_own_statement", fake)
    response = get(CausalReadsMiddleware(view("replica", "default")), sign_token(TOKEN))
    assert response.status_code == 200
    assert COOKIE not in response.cookies


def test_a_failed_show_is_logged_and_the_request_goes_on(statements, caplog):
    statements.fail_on = "SHOW"
    statements.error = OperationalError("server closed the connection")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        response = get(CausalReadsMiddleware(view("default")))
    assert response.status_code == 200
    assert COOKIE not in response.cookies
    assert "SHOW switchyard.causal_token failed on 'default'" in caplog.text


def test_a_failed_reset_is_logged(statements, caplog):
    statements.fail_on = "RESET"
    statements.error = OperationalError("gone")
    query("replica")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert response.status_code == 200
    assert "RESET switchyard.causal_token failed on 'replica'" in caplog.text


def test_a_malformed_token_from_the_server_is_not_stored(statements, caplog):
    statements.token = "not-a-token"
    response = get(CausalReadsMiddleware(view("default")))
    assert COOKIE not in response.cookies


def test_a_connection_closed_during_the_request_is_not_reset(statements):
    def close_it(request):
        query("replica")
        connections["replica"].close()
        return HttpResponse("ok")

    query("replica")
    get(CausalReadsMiddleware(close_it), sign_token(TOKEN))
    assert statements.log == [("replica", SET)]


def test_a_connection_reopened_during_the_request_gets_the_token_again(statements):
    def reopen(request):
        query("replica")
        connections["replica"].close()
        query("replica")
        return HttpResponse("ok")

    query("replica")
    get(CausalReadsMiddleware(reopen), sign_token(TOKEN))
    assert statements.log == [("replica", SET)]  # the first one; gone with it
    assert statements.connects.log == [("replica", None), ("replica", OPT)]
    assert not is_open("replica")


def test_streaming_keeps_the_token_until_the_response_is_closed(statements):
    def stream(request):
        def rows():
            query("replica")
            yield b"row\n"
        return StreamingHttpResponse(rows())

    response = get(CausalReadsMiddleware(stream), sign_token(TOKEN))
    assert statements.connects.log == []  # the body has not run yet
    assert b"".join(response.streaming_content) == b"row\n"
    assert statements.connects.log == [("replica", OPT)]
    assert is_open("replica")
    response.close()
    assert not is_open("replica")
    assert statements.log == []


def test_streaming_response_closed_unread_still_resets(statements):
    query("replica")  # open: the token goes on at the start

    def stream(request):
        return StreamingHttpResponse(iter([b"a", b"b"]))

    response = get(CausalReadsMiddleware(stream), sign_token(TOKEN))
    response.close()
    assert statements.log == [("replica", SET), ("replica", RESET)]


def test_the_view_statements_are_not_confused_with_ours(statements):
    # Only "replica" is a write alias here; the middleware's own SET on it must not
    # count as the application using it.
    with override_settings(SWITCHYARD_WRITE_ALIASES=["replica"]):
        query("replica")
        get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
        assert ("replica", SHOW) in statements.log
        statements.log.clear()
        get(CausalReadsMiddleware(view("default")), sign_token(TOKEN))
        assert statements.log == [("replica", SET), ("replica", RESET)]


def test_a_file_response_is_left_alone(statements, tmp_path):
    path = tmp_path / "report.csv"
    path.write_bytes(b"a,b\n")
    query("replica")

    def download(request):
        return FileResponse(open(path, "rb"))

    response = get(CausalReadsMiddleware(download), sign_token(TOKEN))
    assert response.file_to_stream is not None  # wsgi.file_wrapper still usable
    assert statements.log == [("replica", SET), ("replica", RESET)]
    response.close()


def test_a_scope_left_by_an_unclosed_response_does_not_reach_the_next_request(statements):
    def stream(request):
        return StreamingHttpResponse(iter([b"a"]))

    get(CausalReadsMiddleware(stream), sign_token(TOKEN))  # never closed
    statements.log.clear()
    get(CausalReadsMiddleware(view("replica")))  # another user, no cookie
    assert statements.log == []
    assert statements.connects.log == [("replica", None)]


def test_a_scope_left_by_an_unclosed_response_is_ended_by_the_next_request(statements):
    def stream(request):
        def rows():
            query("replica")  # connects with the token
            query("default")
            yield b"row\n"
        return StreamingHttpResponse(rows())

    query("default")  # kept open: gets a SET
    response = get(CausalReadsMiddleware(stream), sign_token(TOKEN))
    assert b"".join(response.streaming_content) == b"row\n"
    # Never closed. The next request on this thread, another user's, takes the token
    # off: the connection opened with it is closed, the one that got the SET reset.
    get(CausalReadsMiddleware(view("replica", "default")))
    assert statements.connects.log == [("default", None), ("replica", OPT), ("replica", None)]
    assert statements.log == [("default", SET), ("default", RESET), ("default", SHOW)]


# MySQL / MariaDB: the same flow with MySQL's statements, and every connection gets the
# token with a SET.

M_SHOW = "SELECT @switchyard_causal_token"
M_SET = f"SET @switchyard_causal_token = '{TOKEN}'"
M_SET_NEWER = f"SET @switchyard_causal_token = '{NEWER}'"
M_RESET = "SET @switchyard_causal_token = ''"


def mysql_refused():
    """What Django raises for Switchyard's answer to another cluster's token on MySQL."""
    class MySQLdbOperationalError(Exception):
        pass

    message = "@switchyard_causal_token comes from another cluster"
    error = OperationalError(1231, message)
    error.__cause__ = MySQLdbOperationalError(1231, message)
    return error


def test_mysql_a_write_sets_the_cookie(statements, mysql):
    statements.token = TOKEN
    response = get(CausalReadsMiddleware(view("default")))
    assert statements.log == [("default", M_SHOW)]
    assert unsign_token(response.cookies[COOKIE].value, max_age=10) == TOKEN


def test_mysql_the_token_is_set_as_a_read_alias_connects(statements, mysql):
    response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert statements.connects.log == [("replica", None)]
    assert statements.log == [("replica", M_SET), ("replica", M_RESET)]
    assert COOKIE not in response.cookies
    assert not is_open("default")


def test_mysql_a_kept_connection_gets_the_token_and_loses_it(statements, mysql):
    query("replica")
    get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert statements.log == [("replica", M_SET), ("replica", M_RESET)]
    assert is_open("replica")


def test_mysql_a_refused_token_drops_the_cookie(statements, mysql, caplog):
    statements.fail_on, statements.error = M_SET, mysql_refused()
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert response.status_code == 200
    assert statements.log == [("replica", M_SET)]
    assert "SET @switchyard_causal_token failed on 'replica'" in caplog.text
    assert response.cookies[COOKIE].value == ""  # deleted
    assert response.cookies[COOKIE]["max-age"] == 0


def test_mysql_other_errors_keep_the_cookie(statements, mysql):
    class MySQLdbOperationalError(Exception):
        pass

    error = OperationalError(2013, "Lost connection to server during query")
    error.__cause__ = MySQLdbOperationalError(2013, "Lost connection to server during query")
    statements.fail_on, statements.error = M_SET, error
    response = get(CausalReadsMiddleware(view("replica")), sign_token(TOKEN))
    assert response.status_code == 200
    assert COOKIE not in response.cookies


# Within one request: a read on a read alias after a write on a write alias.

def test_a_read_after_a_write_in_the_same_request_gets_the_token(statements):
    statements.token = TOKEN
    seen = []

    def create_and_read(request):
        query("default")
        query("replica")
        seen.extend(statements.log)
        return HttpResponse("ok")

    response = get(CausalReadsMiddleware(create_and_read))
    assert seen == [("default", SHOW), ("replica", SET)]  # before the read ran
    assert statements.log == [
        ("default", SHOW), ("replica", SET),
        ("replica", RESET),  # at the end of the request
        ("default", SHOW),  # for the cookie
    ]
    assert unsign_token(response.cookies[COOKIE].value, max_age=10) == TOKEN
    assert statements.connects.log == [("default", None), ("replica", None)]


def test_mysql_a_read_after_a_write_in_the_same_request_gets_the_token(statements, mysql):
    statements.token = TOKEN
    get(CausalReadsMiddleware(view("default", "replica")))
    assert statements.log == [
        ("default", M_SHOW), ("replica", M_SET), ("replica", M_RESET), ("default", M_SHOW),
    ]
    assert is_open("replica")  # kept: the token is off again


def test_a_read_before_the_write_gets_nothing(statements):
    statements.token = TOKEN
    get(CausalReadsMiddleware(view("replica", "default")))
    assert statements.log == [("default", SHOW)]  # the cookie's only


def test_reads_without_writes_cost_no_statement(statements):
    def reads(request):
        for _ in range(3):
            query("replica")
        return HttpResponse("ok")

    get(CausalReadsMiddleware(reads))
    assert statements.log == []


def test_one_hand_over_per_write(statements):
    statements.token = TOKEN

    def several(request):
        query("default")
        query("replica")
        query("replica")  # nothing written since: nothing to hand over
        query("default")
        statements.token = NEWER
        query("replica")
        return HttpResponse("ok")

    get(CausalReadsMiddleware(several))
    assert statements.log == [
        ("default", SHOW), ("replica", SET),
        ("default", SHOW), ("replica", SET_NEWER),
        ("replica", RESET),
        ("default", SHOW),
    ]


def test_a_write_that_wrote_nothing_hands_nothing_over(statements):
    statements.token = ""  # the proxy saw no write
    get(CausalReadsMiddleware(view("default", "replica", "replica")))
    assert statements.log == [("default", SHOW), ("default", SHOW)]


def test_no_hand_over_while_the_write_is_uncommitted(statements):
    from django.db import transaction

    statements.token = TOKEN
    seen = []

    def in_transaction(request):
        with transaction.atomic(using="default"):
            query("default")
            query("replica")  # cannot see the write anyway
            seen.extend(statements.log)
        query("replica")  # committed now
        return HttpResponse("ok")

    get(CausalReadsMiddleware(in_transaction))
    assert seen == []
    assert statements.log[:2] == [("default", SHOW), ("replica", SET)]


def test_no_hand_over_onto_a_read_alias_inside_a_transaction(statements):
    from django.db import transaction

    statements.token = TOKEN

    def read_in_transaction(request):
        query("default")
        with transaction.atomic(using="replica"):
            query("replica")  # the proxy would not answer a SET here
        query("replica")  # between transactions again: now
        return HttpResponse("ok")

    get(CausalReadsMiddleware(read_in_transaction))
    assert statements.log == [("default", SHOW), ("replica", SET), ("replica", RESET), ("default", SHOW)]


def test_our_own_statements_trigger_no_hand_over(statements):
    from django_switchyard.causal import current_token

    statements.token = TOKEN

    def asks(request):
        assert current_token() == TOKEN  # our own SHOW on default
        query("replica")
        return HttpResponse("ok")

    response = get(CausalReadsMiddleware(asks))
    assert statements.log == [("default", SHOW)]
    assert COOKIE not in response.cookies  # the view wrote nothing


def test_a_hand_over_on_a_connection_with_the_cookies_token_is_left_to_its_scope(statements):
    # The cookie's token was SET on the kept connection; the scope's RESET at the end
    # takes the newer one off too.
    query("replica")
    query("default")
    statements.token = NEWER
    response = get(CausalReadsMiddleware(view("default", "replica")), sign_token(TOKEN))
    assert statements.log == [
        ("default", SET), ("replica", SET),  # the cookie's, at the start
        ("default", SHOW), ("replica", SET_NEWER),  # the hand-over
        ("default", SHOW),  # the cookie
        ("default", RESET), ("replica", RESET),  # the scope's end
    ]
    assert unsign_token(response.cookies[COOKIE].value, max_age=10) == NEWER


def test_a_hand_over_on_a_connection_opened_with_the_cookies_token(statements):
    statements.token = NEWER
    get(CausalReadsMiddleware(view("default", "replica")), sign_token(TOKEN))
    assert statements.connects.log == [("default", OPT), ("replica", OPT)]
    assert statements.log == [("default", SHOW), ("replica", SET_NEWER), ("default", SHOW)]
    # Both opened with the cookie's token: closed, which takes the newer one too.
    assert not is_open("replica") and not is_open("default")


def test_a_failed_hand_over_is_logged_and_the_read_goes_on(statements, caplog):
    statements.token = TOKEN
    statements.fail_on, statements.error = SET, OperationalError("gone")
    with caplog.at_level(logging.WARNING, logger="django_switchyard"):
        response = get(CausalReadsMiddleware(view("default", "replica", "replica")))
    assert response.status_code == 200
    assert statements.log == [("default", SHOW), ("replica", SET), ("default", SHOW)]  # tried once
    assert "failed on 'replica'" in caplog.text


def test_a_reopened_read_connection_gets_the_token_again(statements):
    statements.token = TOKEN

    def reopen(request):
        query("default")
        query("replica")
        connections["replica"].close()
        query("replica")
        return HttpResponse("ok")

    get(CausalReadsMiddleware(reopen))
    assert statements.log == [
        ("default", SHOW), ("replica", SET),
        ("replica", SET),  # the new connection: the token read before
        ("replica", RESET), ("default", SHOW),
    ]


def test_no_hand_over_when_the_read_alias_is_a_write_alias(statements):
    statements.token = TOKEN
    with override_settings(SWITCHYARD_READ_ALIASES=["default"]):
        get(CausalReadsMiddleware(view("default", "default")))
    assert statements.log == [("default", SHOW)]


def test_mysql_a_hand_over_while_connecting_ends_on_top(statements, mysql, monkeypatch):
    # Django's MySQL backend runs statements through the connection's cursor while
    # connecting (SET SQL_AUTO_IS_NULL ...), before connection_created, where the
    # cookie's token goes on: the hand-over must end up on top of it.
    from django.db.backends.sqlite3.base import DatabaseWrapper

    real = DatabaseWrapper.init_connection_state

    def init_connection_state(self):
        real(self)
        with self.cursor() as cursor:
            cursor.execute("SELECT 1")

    monkeypatch.setattr(DatabaseWrapper, "init_connection_state", init_connection_state)
    statements.token = NEWER
    response = get(CausalReadsMiddleware(view("default", "replica")), sign_token(TOKEN))
    assert statements.log == [
        ("default", M_SET),  # the cookie's, as default connects
        ("default", M_SHOW), ("replica", M_SET_NEWER),  # hand-over, while replica connects
        ("replica", M_SET),  # the cookie's, from connection_created
        ("replica", M_SET_NEWER),  # hand-over again, before the view's read
        ("default", M_SHOW),  # the cookie
        ("default", M_RESET), ("replica", M_RESET),  # the scope's end
    ]
    assert unsign_token(response.cookies[COOKIE].value, max_age=10) == NEWER
