"""Classifying failed Fabric calls into the error tree: the single place that knows statuses.

Also reads Fabric's error bodies (as the official SDK does) and Retry-After headers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp

from orchestrator.errors import FabricError, NeedsReconcileError, RetryableError, TerminalError

CallKind = Literal["read", "create", "delete", "invoke"]
"""What a call does; decides how ``classify`` treats a lost answer."""

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def parse_error_body(body: bytes) -> tuple[str | None, str | None]:
    """Fabric's ``(error_code, error_msg)`` from an error body, as the official SDK reads it."""
    text = body.decode("utf-8", "replace").strip()[:500] or None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, text
    code, message = _find_error(data)
    return (code, message) if (code, message) != (None, None) else (None, text)


def _body_request_id(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    value = data.get("request_id") if isinstance(data, dict) else None
    return str(value) if value else None


def _find_error(data: Any) -> tuple[str | None, str | None]:
    if not isinstance(data, dict):
        return None, None
    for code_key, msg_key in (("error_code", "error_msg"), ("errorCode", "errorMsg"), ("code", "message")):
        if code_key in data and msg_key in data:
            return str(data[code_key]), str(data[msg_key])
    for value in data.values():
        if isinstance(value, dict):
            found = _find_error(value)
            if found != (None, None):
                return found
    return None, None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():  # RFC 9110 delta-seconds: digits only (no "inf", no "1e400")
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with unknown origin; treat it as UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify(
    *,
    kind: CallKind,
    status: int | None = None,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    exc: BaseException | None = None,
    what: str = "request",
) -> FabricError:
    """Map one failed call to the error tree: the single place that knows statuses."""
    sent_create = kind in ("create", "invoke")
    if exc is not None:
        if isinstance(exc, aiohttp.ClientConnectorError):
            # The connection was never made, so the request never reached Fabric.
            return RetryableError(f"{what}: cannot connect: {exc.os_error or exc}")
        reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        cls = NeedsReconcileError if sent_create else RetryableError
        return cls(f"{what}: no complete response ({reason})")
    assert status is not None
    headers = headers or {}
    code, message = parse_error_body(body)
    request_id = headers.get("X-Request-Id") or headers.get("x-request-id") or _body_request_id(body)
    text = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    common = dict(status=status, code=code or str(status), request_id=request_id)
    if status in (429, 503):
        return RetryableError(text, retry_after=parse_retry_after(headers.get("Retry-After")), **common)
    if status in (500, 502, 504, 408):
        # The server may have acted before failing (a gateway's 502/504 may come after it passed
        # the request on): a create must be reconciled, a read retried.
        cls = NeedsReconcileError if sent_create else RetryableError
        return cls(text, retry_after=parse_retry_after(headers.get("Retry-After")), **common)
    return TerminalError(text, **common)
