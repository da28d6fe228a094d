"""Service instances (REFERENCE.md §10) on the ``fabric-ep`` host."""

from __future__ import annotations


from typing import Any

from aiohttp import web

from . import views
from .common import child_of, create, empty, ok, store_of, workspace_of
from .errors import INSTANCE_FAILED, invalid, not_found, wrong_state
from .keys import CONFIG
from .listing import field_matches, name_matches, page
from .resources import Resource, Store
from .validation import injected_failure, json_body, min_max, obj, plain_description, resource_name, text


def _source(store: Store, ws: Resource, body: dict[str, Any]) -> dict[str, str]:
    source = obj(body, "source", required=True)
    assert source is not None
    model_id = text(source, "id", required=True, where="source.")
    assert model_id is not None
    model = store.get("model", model_id, ws.id)
    if model is None:
        raise not_found("model", model_id)
    version_id = text(source, "version_id", where="source.")
    versions = {v["id"] for v in model.fields["versions"]}
    if version_id and version_id not in versions:
        raise not_found("model version", version_id)
    return {"id": model_id, "version_id": version_id or model.fields["current_version_id"]}


def _endpoint(store: Store, ws: Resource, body: dict[str, Any]) -> Resource:
    endpoint_id = text(body, "endpoint_id", required=True)
    assert endpoint_id is not None
    endpoint = store.get("endpoint", endpoint_id, ws.id)
    if endpoint is None:
        raise invalid(f"The endpoint {endpoint_id} does not exist in workspace {ws.id}")
    status = store.status(endpoint)
    if status != "RUNNING":
        raise wrong_state(f"The endpoint {endpoint_id} is {status}; a service instance can "
                          "only be deployed on a RUNNING endpoint")
    return endpoint


def _config(body: dict[str, Any], endpoint: Resource) -> dict[str, Any] | None:
    config = obj(body, "config")
    if config is None:
        return None
    model_config = obj(config, "model_instance_config", where="config.")
    if model_config is not None:
        where = "config.model_instance_config.resource."
        resource = obj(model_config, "resource", required=True,
                       where="config.model_instance_config.")
        assert resource is not None
        mu = (endpoint.fields.get("reserved_resource") or {}).get("mu") or {}
        _, high = min_max(resource, where, upper=1000)
        if high < 1:
            raise invalid(f"{where}max must be between 1 and 1000")
        if "max" in mu and high > mu["max"]:
            raise invalid(f"{where}max ({high}) exceeds the endpoint's maximum ({mu['max']})")
    return config


async def create_instance(request: web.Request) -> web.Response:
    store, ws = store_of(request), workspace_of(request)
    body = await json_body(request)
    name = resource_name(text(body, "name", required=True), "service instance", 64)
    description = plain_description(text(body, "description"), 1024) or ""
    source = _source(store, ws, body)
    endpoint = _endpoint(store, ws, body)
    fields = {"description": description, "source": source, "endpoint_id": endpoint.id,
              "config": _config(body, endpoint)}
    failure = injected_failure(request.app[CONFIG].instance_fail, name, INSTANCE_FAILED,
                               f"Failed to deploy service instance {name}: model load error "
                               "(injected by the emulator's instance_fail)")
    res = create(request, "service_instance", name, ws.id, fields, failure=failure)
    return ok({"id": res.id})


async def list_instances(request: web.Request) -> web.Response:
    store, ws, query = store_of(request), workspace_of(request), request.query
    if query.get("type") not in (None, "", "LLM_MODEL", "PGSQL_SERVICE"):
        raise invalid("type must be LLM_MODEL or PGSQL_SERVICE")
    found = [i for i in store.items("service_instance", ws.id)
             if name_matches(i, query) and field_matches(i.id, query, "id")
             and field_matches(i.fields["endpoint_id"], query, "endpoint_id")
             and field_matches(i.fields["source"]["id"], query, "source_id")
             and field_matches(i.fields["source"]["version_id"], query, "version_id")
             and field_matches("LLM_MODEL", query, "type")
             and query.get("visibility") != "PUBLIC"]
    if query.get("order_by") == "DESC":
        found.reverse()
    total, shown = page(request, found)
    return ok({"total": total,
               "service_instances": [views.instance(store, i, brief=True) for i in shown]})


async def show_instance(request: web.Request) -> web.Response:
    store, res = child_of(request, "service_instance", "instance_id")
    return ok(views.instance(store, res, base_url=str(request.url.origin())))


async def delete_instance(request: web.Request) -> web.Response:
    store, res = child_of(request, "service_instance", "instance_id")
    store.delete(res)
    return empty()


def add_routes(app: web.Application) -> None:
    """Register the service instance routes (invocations live in ``invoke``)."""
    instances = "/v1/workspaces/{workspace_id}/services/instances"
    app.router.add_post(instances, create_instance, name="create_service_instance")
    app.router.add_get(instances, list_instances)
    app.router.add_get(f"{instances}/{{instance_id}}", show_instance)
    app.router.add_delete(f"{instances}/{{instance_id}}", delete_instance)
