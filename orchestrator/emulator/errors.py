"""Error bodies of the emulator, shaped as Fabric and its API gateway shape them.

Fabric errors are ``{"error_code", "error_msg"}``; gateway errors (auth, unknown route,
throttling) add ``"request_id"`` (REFERENCE.md §5). The concrete Fabric codes are not
published, so the emulator uses one code per kind of failure:

- ``FABRIC.0400`` (400) invalid request: malformed JSON, a missing or bad field or query value
- ``FABRIC.0404`` (404) the workspace / endpoint / model / instance does not exist
- ``FABRIC.0409`` (400) the name is already used (Fabric answers duplicates with 400)
- ``FABRIC.0412`` (400) the resource is in the wrong state for the call (not RUNNING, in use)
- ``FABRIC.4001`` on an endpoint that ended CREATE_FAILED (in the resource, not as an answer)
- ``FABRIC.0500`` / ``APIGW.0502`` / ``APIGW.0503`` / ``APIGW.0504`` injected server faults
- ``APIGW.0301`` (401) authentication, ``APIGW.0101`` (404) unknown route,
  ``APIGW.0308`` (429) throttled
"""

from __future__ import annotations

import json
import uuid

from aiohttp import web

INVALID = "FABRIC.0400"
NOT_FOUND = "FABRIC.0404"
DUPLICATE = "FABRIC.0409"
WRONG_STATE = "FABRIC.0412"
CREATE_FAILED = "FABRIC.4001"
INSTANCE_FAILED = "FABRIC.4002"  # service instance deployment failed (error_code on the instance)
AUTH = "APIGW.0301"
NO_ROUTE = "APIGW.0101"
THROTTLED = "APIGW.0308"

# Injected transient faults: (code, message, is it a gateway error?). 500 comes from Fabric
# itself; 502/503/504 are what a gateway in front of a sick backend answers.
FAULTS: dict[int, tuple[str, str, bool]] = {
    429: (THROTTLED, "The throttling threshold has been reached: policy user over ratelimit,"
          "limit:20,time:1 second", True),
    500: ("FABRIC.0500", "Internal server error (injected by the emulator)", False),
    502: ("APIGW.0502", "Bad gateway: backend unavailable (injected by the emulator)", True),
    503: ("APIGW.0503", "Service unavailable (injected by the emulator)", True),
    504: ("APIGW.0504", "Gateway timeout: backend did not answer (injected by the emulator)", True),
}


def new_request_id() -> str:
    """A fresh request id: 32 hex characters, like the gateway's."""
    return uuid.uuid4().hex


class ApiError(Exception):
    """Raised by handlers and middlewares; turned into a JSON error response."""

    def __init__(self, status: int, code: str, msg: str, *, gateway: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.gateway = gateway
        self.headers = headers or {}

    def response(self, request_id: str) -> web.Response:
        """The HTTP answer for this error."""
        body: dict[str, str] = {"error_code": self.code, "error_msg": self.msg}
        if self.gateway:
            body["request_id"] = request_id
        return web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/json", headers=self.headers)


def invalid(msg: str) -> ApiError:
    """A 400 for a request that breaks a documented constraint."""
    return ApiError(400, INVALID, msg)


def not_found(kind: str, resource_id: str) -> ApiError:
    """A 404 for a resource that does not exist (or is already DELETED)."""
    return ApiError(404, NOT_FOUND, f"The {kind} {resource_id} does not exist")


def duplicate(kind: str, name: str) -> ApiError:
    """A 400 for a name that is already taken; Fabric answers duplicates with 400."""
    return ApiError(400, DUPLICATE, f"The {kind} name {name!r} already exists")


def wrong_state(msg: str) -> ApiError:
    """A 400 for a call the resource's current state does not allow."""
    return ApiError(400, WRONG_STATE, msg)


def fault(status: int) -> ApiError:
    """An injected transient error; a 429 carries Retry-After like a polite gateway."""
    code, msg, gateway = FAULTS.get(status, (f"FABRIC.0{status}", "Injected fault", False))
    headers = {"Retry-After": "1"} if status == 429 else None
    return ApiError(status, code, msg, gateway=gateway, headers=headers)
