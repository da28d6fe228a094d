"""Small helpers shared by the route modules."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .errors import not_found
from .keys import FAULTS, LATE, STORE
from .resources import Resource, Store


def ok(doc: Any) -> web.Response:
    """A 200 JSON answer."""
    return web.json_response(doc)


def empty() -> web.Response:
    """A 200 with no body, for calls documented to answer nothing."""
    return web.Response(status=200)


def store_of(request: web.Request) -> Store:
    """The emulator state behind this request."""
    return request.app[STORE]


def create(request: web.Request, kind: str, name: str, workspace_id: str | None,
           fields: dict[str, Any], *, failure: tuple[str, str] | None = None) -> Resource:
    """Create what a validated create request asks for, now, or (the late-create fault) only
    ``late_by`` seconds from now, with the request marked so its answer is dropped."""
    store, faults = store_of(request), request.app[FAULTS]
    if faults.take_late():
        request[LATE] = True
        return store.add_later(kind, name, workspace_id, fields, failure=failure,
                               after=faults.seconds["late_by"])
    return store.add(kind, name, workspace_id, fields, failure=failure)


def workspace_of(request: web.Request) -> Resource:
    """The workspace named in the path, or a 404."""
    workspace_id = request.match_info["workspace_id"]
    res = store_of(request).get("workspace", workspace_id)
    if res is None:
        raise not_found("workspace", workspace_id)
    return res


def child_of(request: web.Request, kind: str, key: str) -> tuple[Store, Resource]:
    """The workspace's live ``kind`` whose id is path parameter ``key``, or a 404."""
    store, ws = store_of(request), workspace_of(request)
    resource_id = request.match_info[key]
    res = store.get(kind, resource_id, ws.id)
    if res is None:
        raise not_found(kind.replace("_", " "), resource_id)
    return store, res
