"""Workspaces (REFERENCE.md §6) and endpoints (§7) on the ``fabric`` host."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import views
from .common import child_of, create, empty, ok, store_of, workspace_of
from .deletes import refusal
from .errors import CREATE_FAILED, duplicate, invalid, wrong_state
from .keys import CONFIG
from .listing import field_matches, name_matches, page
from .resources import Resource, Store
from .validation import (injected_failure, integer, json_body, min_max, obj, resource_name, text,
                         workspace_name)

ENDPOINT_TYPES = ("service", "ray", "inference", "job", "ray_service", "sql",
                  "container_job", "notebook")


# -- workspaces --------------------------------------------------------------------------

async def create_workspace(request: web.Request) -> web.Response:
    store = store_of(request)
    body = await json_body(request)
    name = workspace_name(text(body, "name", required=True))
    fields = {"description": text(body, "description", max_len=255) or "",
              "metastore_id": text(body, "metastore_id"),
              "enterprise_project_id": text(body, "enterprise_project_id") or "0"}
    if any(ws.name == name for ws in store.items("workspace", name=name)):
        raise duplicate("workspace", name)
    return ok(views.workspace(store, create(request, "workspace", name, None, fields)))


async def list_workspaces(request: web.Request) -> web.Response:
    store, query = store_of(request), request.query
    project = query.get("enterprise_project_id")
    found = [ws for ws in store.items("workspace", name=query.get("name"))
             if name_matches(ws, query) and field_matches(ws.id, query, "id")
             and (project in (None, "", "all_granted_eps")
                  or ws.fields.get("enterprise_project_id") == project)]
    total, shown = page(request, found)
    return ok({"total": total, "workspaces": [views.workspace(store, ws) for ws in shown]})


async def update_workspace(request: web.Request) -> web.Response:
    store, ws = store_of(request), workspace_of(request)
    body = await json_body(request)
    if body.get("name") is not None:
        name = workspace_name(text(body, "name"))
        if any(o.name == name and o.id != ws.id for o in store.items("workspace", name=name)):
            raise duplicate("workspace", name)
        store.rename(ws, name)
    if body.get("description") is not None:
        ws.fields["description"] = text(body, "description", max_len=255)
    if body.get("metastore_id") is not None:
        ws.fields["metastore_id"] = text(body, "metastore_id")
    store.touch(ws)
    return ok(views.workspace(store, ws))


async def delete_workspace(request: web.Request) -> web.Response:
    store, ws = store_of(request), workspace_of(request)
    reason = refusal(store, ws)
    if reason is not None:
        raise wrong_state(reason)
    store.delete(ws)
    return empty()


# -- endpoints ---------------------------------------------------------------------------

def _reserved_resource(body: dict[str, Any]) -> dict[str, Any] | None:
    reserved = obj(body, "reserved_resource")
    if reserved is None:
        return None
    unknown = set(reserved) - {"mu", "apu", "dpu"}
    if unknown:
        raise invalid(f"reserved_resource has unknown keys: {', '.join(sorted(unknown))}")
    mu = obj(reserved, "mu", where="reserved_resource.")
    if mu is not None:
        code = text(mu, "spec_code", required=True, where="reserved_resource.mu.")
        if code not in views.SPEC_CODES:
            raise invalid(f"Unknown spec_code {code!r}; see GET /v1/specs")
        min_max(mu, "reserved_resource.mu.")
    for key in ("apu", "dpu"):
        spec = obj(reserved, key, where="reserved_resource.")
        if spec is not None:
            where = f"reserved_resource.{key}."
            text(spec, "spec_code", required=True, where=where)
            warm = integer(spec, "warm_up_num", required=True, where=where)
            top = integer(spec, "max_num", where=where)
            assert warm is not None  # required=True
            if warm < 0 or (top is not None and top < warm):
                raise invalid(f"{where}warm_up_num must be >= 0 and <= max_num")
    return reserved


async def create_endpoint(request: web.Request) -> web.Response:
    store, ws = store_of(request), workspace_of(request)
    body = await json_body(request)
    name = resource_name(text(body, "name", required=True), "endpoint", 128)
    kind = text(body, "type", required=True)
    if kind not in ENDPOINT_TYPES:
        raise invalid(f"Invalid endpoint type {kind!r}; "
                      f"expected one of {', '.join(ENDPOINT_TYPES)}")
    public = body.get("public_access")
    if public is not None and not isinstance(public, bool):
        raise invalid("public_access must be a boolean")
    fields = {"description": text(body, "description") or "", "type": kind,
              "reserved_resource": _reserved_resource(body),
              "ray_resource": obj(body, "ray_resource"),
              "cap": obj(body, "cap"), "config": obj(body, "config"),
              "custom_image_id": text(body, "custom_image_id"), "public_access": bool(public)}
    failure = injected_failure(request.app[CONFIG].create_fail, name, CREATE_FAILED,
                               f"Failed to create endpoint {name}: insufficient MU resources "
                               "in the resource pool (injected by the emulator's create_fail)")
    res = create(request, "endpoint", name, ws.id, fields, failure=failure)
    return ok(views.endpoint(store, res))


async def list_endpoints(request: web.Request) -> web.Response:
    store, ws, query = store_of(request), workspace_of(request), request.query
    if query.get("visibility") not in (None, "", "PRIVATE", "PUBLIC", "ALL"):
        raise invalid("visibility must be PRIVATE, PUBLIC or ALL")
    model_id = query.get("model_id")
    serving = {i.fields["endpoint_id"] for i in store.items("service_instance", ws.id)
               if i.fields["source"]["id"] == model_id}
    # Every emulated endpoint is the caller's own and private, so PUBLIC finds none.
    found = [ep for ep in store.items("endpoint", ws.id)
             if name_matches(ep, query) and field_matches(ep.id, query, "endpoint_id")
             and field_matches(ep.fields["type"], query, "type")
             and query.get("visibility") != "PUBLIC" and (not model_id or ep.id in serving)]
    total, shown = page(request, found)
    return ok({"total": total,
               "endpoints": [views.endpoint(store, ep, brief=True) for ep in shown]})


def _endpoint_of(request: web.Request) -> tuple[Store, Resource]:
    return child_of(request, "endpoint", "endpoint_id")


async def show_endpoint(request: web.Request) -> web.Response:
    store, res = _endpoint_of(request)
    if request.query.get("version") not in (None, "", "CURRENT", "PREVIOUS"):
        raise invalid("version must be CURRENT or PREVIOUS")
    return ok(views.endpoint(store, res))


async def delete_endpoint(request: web.Request) -> web.Response:
    store, res = _endpoint_of(request)
    reason = refusal(store, res)
    if reason is not None:
        raise wrong_state(reason)
    store.delete(res)
    return ok({"id": res.id})


def add_routes(app: web.Application) -> None:
    """Register the workspace and endpoint routes."""
    ws = "/v1/workspaces/{workspace_id}"
    app.router.add_post("/v1/workspaces", create_workspace, name="create_workspace")
    app.router.add_get("/v1/workspaces", list_workspaces)
    app.router.add_put(ws, update_workspace)
    app.router.add_delete(ws, delete_workspace)
    app.router.add_post(f"{ws}/endpoints", create_endpoint, name="create_endpoint")
    app.router.add_get(f"{ws}/endpoints", list_endpoints)
    app.router.add_get(f"{ws}/endpoints/{{endpoint_id}}", show_endpoint)
    app.router.add_delete(f"{ws}/endpoints/{{endpoint_id}}", delete_endpoint)
