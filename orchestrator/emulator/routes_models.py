"""Models and model versions (REFERENCE.md §8) and the catalogues (§9) on the ``fabric`` host."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from . import views
from .common import child_of, create, empty, ok, store_of, workspace_of
from .deletes import refusal
from .errors import duplicate, invalid, wrong_state
from .listing import field_matches, name_matches, page, paginate
from .resources import iso
from .validation import json_body, obj, resource_name, text

SORT_KEYS = {"CREATE_TIME": "create_time", "UPDATE_TIME": "update_time", "NAME": "name"}


def _version_input(body: dict[str, Any]) -> dict[str, Any]:
    version = obj(body, "version", required=True)
    assert version is not None
    name = resource_name(text(version, "name", required=True, where="version."),
                         "model version", 64)
    description = text(version, "description", max_len=1024, where="version.") or ""
    config = obj(version, "config", where="version.")
    if config is not None:
        llm = obj(config, "llm_model_config", where="version.config.")
        if llm is not None:
            where = "version.config.llm_model_config."
            # Required, but empty strings are accepted: the official example sends them empty.
            base = text(llm, "base_model_type", required=True, where=where)
            text(llm, "model_path", required=True, where=where)
            if base and base not in views.BASE_MODEL_TYPES:
                raise invalid(f"Unknown base_model_type {base!r}; see GET /v1/base-models")
    return {"name": name, "description": description, "config": config}


async def create_model(request: web.Request) -> web.Response:
    store, ws = store_of(request), workspace_of(request)
    body = await json_body(request)
    name = resource_name(text(body, "name", required=True), "model", 64)
    description = text(body, "description", max_len=1024) or ""
    kind = text(body, "type", required=True)
    if kind != "LLM_MODEL":
        raise invalid(f"Invalid model type {kind!r}; only LLM_MODEL is supported")
    version = _version_input(body)
    if any(m.name == name for m in store.items("model", ws.id)):
        raise duplicate("model", name)
    version.update(id=str(uuid.uuid4()), create_time=iso(store.wall_clock()))
    fields = {"description": description, "type": kind, "versions": [version],
              "current_version_id": version["id"]}
    res = create(request, "model", name, ws.id, fields)
    return ok({"id": res.id, "version_id": version["id"]})


async def list_models(request: web.Request) -> web.Response:
    store, ws, query = store_of(request), workspace_of(request), request.query
    sort_by = query.get("sort_by") or "CREATE_TIME"
    order_by = query.get("order_by") or "DESC"
    if sort_by not in SORT_KEYS:
        raise invalid("sort_by must be CREATE_TIME, UPDATE_TIME or NAME")
    if order_by not in ("ASC", "DESC"):
        raise invalid("order_by must be ASC or DESC")
    if query.get("visibility") not in (None, "", "PRIVATE", "PUBLIC", "ALL"):
        raise invalid("visibility must be PRIVATE, PUBLIC or ALL")
    found = [m for m in store.items("model", ws.id)
             if name_matches(m, query) and field_matches(m.id, query, "id")
             and field_matches(m.fields["type"], query, "type")
             and query.get("visibility") != "PUBLIC"]
    docs = {m.id: views.model(store, m) for m in found}
    # Stable sorts: ties keep creation order, so pages never shuffle between calls.
    found.sort(key=lambda m: docs[m.id][SORT_KEYS[sort_by]], reverse=order_by == "DESC")
    total, shown = page(request, found)
    return ok({"total": total, "models": [docs[m.id] for m in shown]})


async def delete_model(request: web.Request) -> web.Response:
    store, res = child_of(request, "model", "model_id")
    reason = refusal(store, res)
    if reason is not None:
        raise wrong_state(reason)
    store.delete(res)
    return empty()


async def list_versions(request: web.Request) -> web.Response:
    _, res = child_of(request, "model", "model_id")
    query = request.query
    found = [views.version(res, v) for v in res.fields["versions"]
             if field_matches(v["id"], query, "version_id")
             and (not query.get("name") or query["name"] in v["name"])]
    total, shown = paginate(found, query)
    return ok({"total": total, "versions": shown})


async def list_base_models(request: web.Request) -> web.Response:
    total, shown = paginate(views.BASE_MODELS, request.query)
    return ok({"total": total, "models": shown})


async def list_specs(request: web.Request) -> web.Response:
    query = request.query
    scenario = query.get("scenario")
    if scenario not in (None, "", "COMPUTE", "ENDPOINT"):
        raise invalid("scenario must be COMPUTE or ENDPOINT")
    types = query.getall("spec_types", [])
    found = [spec for spec in views.SPECS
             if field_matches(spec["spec_code"], query, "spec_code")
             and (not scenario or spec["resource_type"] == scenario)
             and (not types or spec["spec_type"] in types)]
    total, shown = paginate(found, query)
    return ok({"total": total, "spec_codes": shown})


def add_routes(app: web.Application) -> None:
    """Register the model, version and catalogue routes."""
    models = "/v1/workspaces/{workspace_id}/models"
    app.router.add_post(models, create_model, name="create_model")
    app.router.add_get(models, list_models)
    app.router.add_delete(f"{models}/{{model_id}}", delete_model)
    app.router.add_get(f"{models}/{{model_id}}/versions", list_versions)
    app.router.add_get("/v1/base-models", list_base_models)
    app.router.add_get("/v1/specs", list_specs)
