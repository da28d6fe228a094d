"""Request-body checks shared by the route modules; each failure is a FABRIC.0400."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from .errors import invalid

WORKSPACE_NAME = re.compile(r"[A-Za-z0-9_-]{4,32}")
# Chinese, letters, digits, "_", "-", "." and space (REFERENCE §7, §8, §10).
RESOURCE_NAME = re.compile(r"[A-Za-z0-9_\-. \u4e00-\u9fff]+")
FORBIDDEN_DESCRIPTION = set("!<>=&\"'")


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; malformed JSON or a non-object is a 400."""
    raw = await request.read()
    if not raw.strip():
        raise invalid("The request body is empty; a JSON object is required")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object")
    return body


def text(body: dict[str, Any], key: str, *, required: bool = False, max_len: int | None = None,
         where: str = "") -> str | None:
    """A string field: present when required, a string when present, not too long."""
    value = body.get(key)
    label = f"{where}{key}"
    if value is None:
        if required:
            raise invalid(f"{label} is required")
        return None
    if not isinstance(value, str):
        raise invalid(f"{label} must be a string")
    if max_len is not None and len(value) > max_len:
        raise invalid(f"{label} must be at most {max_len} characters")
    return value


def obj(body: dict[str, Any], key: str, *, required: bool = False,
        where: str = "") -> dict[str, Any] | None:
    """An object field."""
    value = body.get(key)
    if value is None:
        if required:
            raise invalid(f"{where}{key} is required")
        return None
    if not isinstance(value, dict):
        raise invalid(f"{where}{key} must be an object")
    return value


def integer(body: dict[str, Any], key: str, *, required: bool = False,
            where: str = "") -> int | None:
    """An integer field; JSON booleans are not integers here."""
    value = body.get(key)
    if value is None:
        if required:
            raise invalid(f"{where}{key} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{where}{key} must be an integer")
    return value


def workspace_name(value: str | None) -> str:
    """4–32 letters, digits, ``_`` or ``-``."""
    if value is None or not WORKSPACE_NAME.fullmatch(value):
        raise invalid(f"Invalid workspace name {value!r}: use 4-32 letters, digits, '_' or '-'")
    return value


def resource_name(value: str | None, kind: str, max_len: int) -> str:
    """1–max_len characters of Chinese, letters, digits, ``_``, ``-``, ``.`` or space."""
    if value is None or not RESOURCE_NAME.fullmatch(value) or len(value) > max_len:
        raise invalid(f"Invalid {kind} name {value!r}: use 1-{max_len} Chinese characters, "
                      "letters, digits, '_', '-', '.' or spaces")
    return value


def plain_description(value: str | None, max_len: int) -> str | None:
    """A description without any of ``! < > = & " '`` (service instances)."""
    if value is None:
        return None
    if len(value) > max_len:
        raise invalid(f"description must be at most {max_len} characters")
    bad = sorted(FORBIDDEN_DESCRIPTION.intersection(value))
    if bad:
        raise invalid(f"description must not contain any of ! < > = & \" ': found {''.join(bad)}")
    return value


def min_max(spec: dict[str, Any], where: str, *, upper: int | None = None) -> tuple[int, int]:
    """``min`` and ``max`` integers with 0 ≤ min ≤ max (≤ upper)."""
    low = integer(spec, "min", required=True, where=where)
    high = integer(spec, "max", required=True, where=where)
    assert low is not None and high is not None
    if low < 0:
        raise invalid(f"{where}min must be >= 0")
    if low > high:
        raise invalid(f"{where}min ({low}) must not exceed {where}max ({high})")
    if upper is not None and high > upper:
        raise invalid(f"{where}max ({high}) must not exceed {upper}")
    return low, high


def injected_failure(pattern: str | None, name: str, code: str, message: str) -> tuple[str, str] | None:
    """The ``(error_code, error_msg)`` a resource ends with when its name matches a failure regex."""
    if pattern is not None and re.search(pattern, name):
        return code, message
    return None
