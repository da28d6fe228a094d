"""Wire shapes of the emulator's resources (REFERENCE.md §6–§10) and its fixed catalogues."""

from __future__ import annotations

from typing import Any

from .resources import Resource, Store, iso

OWNER = {"domain_name": "emulator", "domain_id": "0" * 32, "user_name": "emulator",
         "user_id": "1" * 32}
USER = {"domain_name": "emulator", "user_name": "emulator"}

BASE_MODELS: list[dict[str, Any]] = [
    {"base_model_type": "LLAMA_3_8B", "max_tokens": 8192, "num_of_mu": 1},
    {"base_model_type": "GLM_4_9B", "max_tokens": 32000, "num_of_mu": 2},
    {"base_model_type": "QWEN_2_5_7B", "max_tokens": 32000, "num_of_mu": 1},
    {"base_model_type": "QWEN_2_72B", "max_tokens": 16000, "num_of_mu": 8},
]

SPECS: list[dict[str, Any]] = [
    {"spec_code": "mu.llama3.8b", "spec_type": "MU", "resource_type": "ENDPOINT", "stride": 1,
     "unit": "MU", "min_stride_num": 0, "max_stride_num": 10, "usage_measure_id": 1,
     "usage_factor": "1", "stride_num_whitelist": []},
    {"spec_code": "mu.glm4.9b", "spec_type": "MU", "resource_type": "ENDPOINT", "stride": 2,
     "unit": "MU", "min_stride_num": 0, "max_stride_num": 10, "usage_measure_id": 1,
     "usage_factor": "2", "stride_num_whitelist": []},
    {"spec_code": "mu.qwen2.72b", "spec_type": "MU", "resource_type": "ENDPOINT", "stride": 8,
     "unit": "MU", "min_stride_num": 0, "max_stride_num": 4, "usage_measure_id": 1,
     "usage_factor": "8", "stride_num_whitelist": []},
    {"spec_code": "apu.standard", "spec_type": "APU", "resource_type": "ENDPOINT", "stride": 1,
     "unit": "APU", "min_stride_num": 1, "max_stride_num": 64, "usage_measure_id": 2,
     "usage_factor": "1", "stride_num_whitelist": []},
    {"spec_code": "dpu.standard", "spec_type": "DPU", "resource_type": "ENDPOINT", "stride": 1,
     "unit": "DPU", "min_stride_num": 1, "max_stride_num": 64, "usage_measure_id": 3,
     "usage_factor": "1", "stride_num_whitelist": []},
    {"spec_code": "compute.8u32g", "spec_type": "APU", "resource_type": "COMPUTE", "stride": 1,
     "unit": "NODE", "min_stride_num": 1, "max_stride_num": 16, "usage_measure_id": 4,
     "usage_factor": "1", "stride_num_whitelist": []},
]
SPEC_CODES = {spec["spec_code"] for spec in SPECS}
BASE_MODEL_TYPES = {model["base_model_type"] for model in BASE_MODELS}


def _without_none(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if value is not None}


def workspace(store: Store, res: Resource) -> dict[str, Any]:
    """Workspace (§6)."""
    f = res.fields
    return _without_none({
        "id": res.id, "name": res.name, "description": f.get("description", ""),
        "create_time": iso(res.create_time), "create_domain_name": OWNER["domain_name"],
        "create_user_name": OWNER["user_name"], "metastore_id": f.get("metastore_id"),
        "access_url": f"https://{res.id}.fabric.emulator/",
        "enterprise_project_id": f.get("enterprise_project_id", "0"),
    })


def endpoint(store: Store, res: Resource, *, brief: bool = False) -> dict[str, Any]:
    """Endpoint (§7); the brief form stops at error_msg, as EndpointBrief does."""
    f = res.fields
    status = store.status(res)
    doc: dict[str, Any] = {
        "visibility": "PRIVATE", "id": res.id, "name": res.name, "type": f["type"],
        "status": status, "description": f.get("description", ""),
        "create_time": iso(res.create_time), "update_time": iso(store.updated(res)),
        "owner": OWNER, "cap": f.get("cap"), "custom_image_id": f.get("custom_image_id"),
        "reserved_resource": f.get("reserved_resource"),
    }
    if status == "CREATE_FAILED" and res.failure is not None:
        doc["error_code"], doc["error_msg"] = res.failure
    if not brief:
        doc["business_engine_instance_ids"] = []
        doc["runtime_env_type"] = "RELEASE"
        doc["config"] = f.get("config")
    return _without_none(doc)


def version(res: Resource, ver: dict[str, Any]) -> dict[str, Any]:
    """ModelVersionInfo (§8)."""
    return _without_none({
        "id": ver["id"], "name": ver["name"], "cap_white_list": [],
        "description": ver.get("description", ""), "config": ver.get("config"),
        "create_time": ver["create_time"], "create_user": USER,
    })


def model(store: Store, res: Resource) -> dict[str, Any]:
    """ModelInfo (§8), with the current (only) version."""
    f = res.fields
    current = next(v for v in f["versions"] if v["id"] == f["current_version_id"])
    return _without_none({
        "visibility": "PRIVATE", "id": res.id, "name": res.name,
        "description": f.get("description", ""), "type": f["type"],
        "create_time": iso(res.create_time), "update_time": iso(store.updated(res)),
        "current_version": version(res, current), "create_user": USER, "update_user": USER,
    })


def instance(store: Store, res: Resource, *, base_url: str | None = None,
             brief: bool = False) -> dict[str, Any]:
    """Service instance (§10); the brief form stops at ``type`` as InstanceBrief does."""
    f = res.fields
    status = store.status(res)
    running_for = store.clock() - res.created_at - store.config.instance_ready_after
    doc: dict[str, Any] = {
        "visibility": "PRIVATE", "source": f["source"], "id": res.id, "name": res.name,
        "description": f.get("description", ""), "endpoint_id": f["endpoint_id"],
        "status": status, "create_time": iso(res.create_time),
        "update_time": iso(store.updated(res)),
        "duration": int(running_for) if status == "RUNNING" else 0,
        "create_user": USER, "type": "LLM_MODEL",
    }
    if not brief:
        doc["update_user"] = USER
        doc["config"] = f.get("config")
        if base_url is not None:
            path = f"/v1/workspaces/{res.workspace_id}/services/instances/{res.id}/invocations"
            doc["url"] = {"name": "ApiInvoke", "address": base_url + path, "type": "PRIVATE"}
        if status == "FAILED" and res.failure is not None:
            doc["error_code"], doc["error_msg"] = res.failure
    return _without_none(doc)
