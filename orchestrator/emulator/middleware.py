"""The request pipeline: request id, counting, auth, injected faults, then the handler.

Order per API request (DESIGN.md, "The emulator"): authenticate; maybe fail with a transient
error having done nothing; maybe sleep; run the handler; maybe drop the connection after a
successful create. A create the handler accepted as a late create (``late_create``: carried
out only ``late_by`` seconds later) is always answered by a dropped connection, and draws no
drop decision. ``/_emulator/*`` control routes skip all of it.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import authenticate
from .errors import NO_ROUTE, ApiError, fault, new_request_id
from .keys import CONFIG, FAULTS, LATE, REQUEST_ID, STORE

CONTROL_PREFIX = "/_emulator/"
log = logging.getLogger(__name__)


def is_control(request: web.Request) -> bool:
    """Whether the request targets the emulator's own control routes."""
    return request.path.startswith(CONTROL_PREFIX)


def is_create(request: web.Request) -> bool:
    """Whether the matched route creates a resource (route names start with ``create_``)."""
    route = request.match_info.route
    return request.method == "POST" and (route.name or "").startswith("create_")


@web.middleware
async def pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run one request through auth, faults and the handler; errors become JSON bodies."""
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    app = request.app
    try:
        if is_control(request):
            return await handler(request)
        app[STORE].stats.requests += 1
        handler_name = getattr(request.match_info.route.handler, "__name__", "unmatched")
        app[STORE].stats.operations[handler_name] += 1
        await authenticate(request, app[CONFIG])
        status = app[FAULTS].take_failure()
        if status is not None:
            raise fault(status)
        if app[FAULTS].take_slow():
            await asyncio.sleep(app[CONFIG].slow_seconds)
        response = await handler(request)
        if request.get(LATE):
            # Nothing exists yet: the client gives up on a create the server carries out later.
            log.info("dropping the response to %s %s; creating it late", request.method,
                     request.path)
            if request.transport is not None:
                request.transport.close()
        elif is_create(request) and response.status < 400 and app[FAULTS].take_drop():
            # The resource exists now; closing the transport before a byte of the answer
            # is written makes the client see a disconnect (an unknown outcome), which is
            # exactly what a lost response looks like. aiohttp then discards the response.
            log.info("dropping the response to %s %s", request.method, request.path)
            if request.transport is not None:
                request.transport.close()
        return response
    except ApiError as exc:
        return exc.response(request_id)
    except web.HTTPException as exc:
        if exc.status in (404, 405):
            # The gateway answers any unpublished method/path pair the same way.
            err = ApiError(404, NO_ROUTE, "The API does not exist or has not been published "
                           f"in the environment: {request.method} {request.path}", gateway=True)
            return err.response(request_id)
        if exc.status >= 400:
            return ApiError(exc.status, f"APIGW.0{exc.status}", exc.reason,
                            gateway=True).response(request_id)
        raise


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: every response, streamed ones too, gets X-Request-Id."""
    request_id = request.get(REQUEST_ID) or new_request_id()
    response.headers.setdefault("X-Request-Id", request_id)
