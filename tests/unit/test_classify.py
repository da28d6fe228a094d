"""classify(), parse_error_body() and parse_retry_after() as tables: no network, no loop."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict

from orchestrator.errors import (
    FabricError,
    NeedsReconcileError,
    OrchestratorError,
    RetryableError,
    TerminalError,
)
from orchestrator.fabric.classify import classify, parse_error_body, parse_retry_after

R, NR, T = RetryableError, NeedsReconcileError, TerminalError
KINDS = ("read", "create", "invoke", "delete")

#: status -> expected class per kind (read, create, invoke, delete).
EXPECTED: dict[int, tuple[type[FabricError], ...]] = {
    400: (T, T, T, T),
    401: (T, T, T, T),
    403: (T, T, T, T),
    404: (T, T, T, T),
    # The server may have acted before answering 408/500, and a gateway's 502/504 may come after
    # it passed the request on: a create must be reconciled.
    408: (R, NR, NR, R),
    409: (T, T, T, T),
    429: (R, R, R, R),
    500: (R, NR, NR, R),
    502: (R, NR, NR, R),
    503: (R, R, R, R),
    504: (R, NR, NR, R),
}
TABLE = [
    (status, kind, cls)
    for status, classes in EXPECTED.items()
    for kind, cls in zip(KINDS, classes, strict=True)
]


def _connector_error() -> aiohttp.ClientConnectorError:
    key = ConnectionKey(
        host="fabric.cn-north-4.myhuaweicloud.com",
        port=443,
        is_ssl=True,
        ssl=True,
        proxy=None,
        proxy_auth=None,
        proxy_headers_hash=None,
    )
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


def _body(status: int) -> bytes:
    return json.dumps({"error_code": f"DLM.{status:04d}", "error_msg": f"boom {status}"}).encode()


# --- statuses -------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind", "cls"), TABLE)
def test_status_table(status, kind, cls):
    err = classify(kind=kind, status=status, body=_body(status),
                   headers={"X-Request-Id": "req-1"}, what="create workspace")
    assert type(err) is cls
    assert isinstance(err, OrchestratorError)
    assert err.status == status
    assert err.code == f"DLM.{status:04d}"
    assert err.request_id == "req-1"
    assert f"HTTP {status}" in err.message
    assert f"boom {status}" in err.message
    assert err.message.startswith("create workspace: ")
    assert err.as_dict() == {"code": f"DLM.{status:04d}", "message": err.message, "request_id": "req-1"}


@pytest.mark.parametrize(("status", "kind", "cls"), TABLE)
def test_status_table_without_body_or_headers(status, kind, cls):
    err = classify(kind=kind, status=status)
    assert type(err) is cls
    assert err.code == str(status)
    assert err.request_id is None


def test_table_covers_every_kind_and_status():
    assert {k for _, k, _ in TABLE} == set(KINDS)
    assert len(TABLE) == 11 * 4


# --- error bodies ---------------------------------------------------------------------------


BODIES = [
    pytest.param({"error_code": "DLM.4001", "error_msg": "bad name"}, "DLM.4001", "bad name", id="snake"),
    pytest.param({"errorCode": "DLM.4002", "errorMsg": "bad type"}, "DLM.4002", "bad type", id="camel"),
    pytest.param({"code": "DLM.4003", "message": "bad size"}, "DLM.4003", "bad size", id="code-message"),
    pytest.param({"error": {"code": "DLM.4004", "message": "nested"}}, "DLM.4004", "nested", id="nested"),
    pytest.param(
        {"error_code": "APIGW.0301", "error_msg": "Incorrect IAM authentication information",
         "request_id": "gw-1"},
        "APIGW.0301", "Incorrect IAM authentication information", id="gateway",
    ),
    pytest.param({"code": 1234, "message": "numeric"}, "1234", "numeric", id="numeric-code"),
    pytest.param(
        {"error_code": "A.1", "error_msg": "first", "code": "B.2", "message": "second"},
        "A.1", "first", id="snake-wins",
    ),
    pytest.param(
        {"errorCode": "C.1", "errorMsg": "camel", "code": "D.2", "message": "plain"},
        "C.1", "camel", id="camel-beats-code",
    ),
]


@pytest.mark.parametrize(("data", "code", "message"), BODIES)
def test_parse_error_body_shapes(data, code, message):
    assert parse_error_body(json.dumps(data).encode()) == (code, message)


@pytest.mark.parametrize(("data", "code", "message"), BODIES)
@pytest.mark.parametrize("kind", KINDS)
def test_classify_reads_code_message_and_request_id(data, code, message, kind):
    headers = CIMultiDict({"x-request-id": "rid-42"})  # aiohttp's headers are case-insensitive
    err = classify(kind=kind, status=400, body=json.dumps(data).encode(), headers=headers,
                   what="create endpoint")
    assert isinstance(err, TerminalError)
    assert err.code == code
    assert message in err.message
    assert code in err.message
    assert err.request_id == "rid-42"


@pytest.mark.parametrize("name", ["X-Request-Id", "x-request-id"])
def test_request_id_from_plain_dict_headers(name):
    err = classify(kind="read", status=404, body=b"", headers={name: "abc"})
    assert err.request_id == "abc"


def test_non_json_body_keeps_text_as_message_and_status_as_code():
    body = b"<html><body>502 Bad Gateway</body></html>"
    assert parse_error_body(body) == (None, "<html><body>502 Bad Gateway</body></html>")
    err = classify(kind="read", status=502, body=body, headers={"X-Request-Id": "r"})
    assert isinstance(err, RetryableError)
    assert err.code == "502"
    assert "502 Bad Gateway" in err.message


def test_non_utf8_body_does_not_crash():
    code, message = parse_error_body(b"\xff\xfe oops")
    assert code is None and message is not None and "oops" in message
    assert classify(kind="create", status=400, body=b"\xff\xfe oops").code == "400"


def test_long_text_body_is_truncated():
    _, message = parse_error_body(b"x" * 5000)
    assert message is not None and len(message) == 500


@pytest.mark.parametrize("body", [b"", b"   ", b"\n"])
@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_empty_body_code_falls_back_to_status(body, status):
    assert parse_error_body(body) == (None, None)
    err = classify(kind="create", status=status, body=body)
    assert err.code == str(status)
    assert err.message == f"request: HTTP {status}"


@pytest.mark.parametrize("body", [b"{}", b"[]", b'"text"', b"42", b'{"foo": "bar"}', b"null"])
def test_json_without_known_keys_falls_back_to_status(body):
    # As the official SDK does: no usable keys -> the raw body is the message.
    assert parse_error_body(body) == (None, body.decode())
    assert classify(kind="read", status=403, body=body).code == "403"


def test_key_pair_must_be_complete():
    # error_code alone is not a match; the SDK moves on to the next pair.
    assert parse_error_body(b'{"error_code": "X", "code": "Y", "message": "m"}') == ("Y", "m")


# --- Retry-After ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503, 502, 504])
def test_retry_after_seconds(status):
    err = classify(kind="create", status=status, headers={"Retry-After": "7"})
    assert isinstance(err, NeedsReconcileError if status in (502, 504) else RetryableError)
    assert err.retry_after == 7.0


def test_retry_after_on_500_read_and_408_create():
    assert classify(kind="read", status=500, headers={"Retry-After": "3"}).retry_after == 3.0
    err = classify(kind="create", status=408, headers={"Retry-After": "4"})
    assert isinstance(err, NeedsReconcileError)
    assert err.retry_after == 4.0


def test_retry_after_http_date():
    when = datetime.now(UTC) + timedelta(seconds=120)
    err = classify(kind="read", status=429, headers={"Retry-After": format_datetime(when, usegmt=True)})
    assert err.retry_after is not None
    assert 100.0 <= err.retry_after <= 120.0


def test_retry_after_absent_or_terminal():
    assert classify(kind="read", status=429).retry_after is None
    assert classify(kind="read", status=400, headers={"Retry-After": "5"}).retry_after is None


def test_retry_after_case_insensitive_headers():
    err = classify(kind="read", status=503, headers=CIMultiDict({"retry-after": "9"}))
    assert err.retry_after == 9.0


NOW = datetime(2025, 3, 4, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("5", 5.0),
        (" 30 ", 30.0),
        ("1.5", None),  # delta-seconds are digits only (RFC 9110)
        ("-5", None),
        ("Tue, 04 Mar 2025 12:01:30 GMT", 90.0),
        ("Tue, 04 Mar 2025 11:59:00 GMT", 0.0),  # in the past: no wait
        ("soon", None),
        ("Tue, 99 Foo 2025", None),
    ],
)
def test_parse_retry_after(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_parse_retry_after_rejects_non_finite(value):
    result = parse_retry_after(value, now=NOW)
    assert result is None or math.isfinite(result)


def test_parse_retry_after_naive_date_does_not_crash():
    assert parse_retry_after("Tue, 04 Mar 2025 12:01:30 -0000", now=NOW) in (None, 90.0)


# --- exceptions -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_connector_error_is_retryable_even_for_creates(kind):
    err = classify(kind=kind, exc=_connector_error(), what="create model")
    assert type(err) is RetryableError
    assert err.message.startswith("create model: cannot connect")
    assert "Connection refused" in err.message
    assert err.status is None and err.retry_after is None


EXC_TABLE = [
    (aiohttp.ServerDisconnectedError(), {"read": R, "delete": R, "create": NR, "invoke": NR}),
    (TimeoutError(), {"read": R, "delete": R, "create": NR, "invoke": NR}),
    (aiohttp.ServerTimeoutError("Timeout on reading data from socket"),
     {"read": R, "delete": R, "create": NR, "invoke": NR}),
    (aiohttp.ClientOSError(104, "Connection reset by peer"),
     {"read": R, "delete": R, "create": NR, "invoke": NR}),
    (aiohttp.ClientPayloadError("Response payload is not completed"),
     {"read": R, "delete": R, "create": NR, "invoke": NR}),
]


@pytest.mark.parametrize(("exc", "by_kind"), EXC_TABLE, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("kind", KINDS)
def test_exception_table(exc, by_kind, kind):
    err = classify(kind=kind, exc=exc, what="show endpoint")
    assert type(err) is by_kind[kind]
    assert err.message.startswith("show endpoint: no complete response (")
    assert err.status is None


def test_timeout_message_names_the_exception():
    err = classify(kind="create", exc=TimeoutError(), what="create workspace")
    assert err.message == "create workspace: no complete response (TimeoutError)"


def test_disconnect_message_is_the_exception_text():
    err = classify(kind="read", exc=aiohttp.ServerDisconnectedError())
    assert err.message == "request: no complete response (Server disconnected)"
