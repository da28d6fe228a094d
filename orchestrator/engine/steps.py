"""Thin steps: each maps one step of the procedure onto one kind of FabricClient call.

No branching on outcomes happens here; the runner and ``machine.decide`` do that.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.domain import Job, with_marker
from orchestrator.errors import ResourceFailedError, TerminalError
from orchestrator.fabric.client import FabricClient
from orchestrator.fabric.models import ENDPOINT_FAILED, INSTANCE_FAILED, RUNNING
from orchestrator.machine import StepName
from orchestrator.spec import JobSpec, Reuse


@dataclass(frozen=True)
class Found:
    """A resource as Fabric reports it."""

    id: str
    status: str | None = None
    description: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateStep:
    """How to look up and create the resource of one create step."""

    kind: str
    spec_key: str
    find: Callable[[FabricClient, Job, str, bool], Awaitable[list[Found]]]  # name, confirm
    create: Callable[[FabricClient, Job, dict[str, Any]], Awaitable[Found]]
    get: Callable[[FabricClient, Job, str], Awaitable[Found | None]]  # for reuse
    delete: Callable[[FabricClient, Job, str], Awaitable[None]]  # a duplicate; gone already is fine
    validate: Callable[[FabricClient, dict[str, Any]], Awaitable[None]] | None = None  # before create

    def body(self, job: Job, spec: JobSpec) -> dict[str, Any]:
        """The create body: the spec's fields, the job's ownership marker, earlier steps' IDs."""
        part = getattr(spec, self.spec_key)
        body = part.model_dump(mode="json", exclude_none=True)
        body["description"] = with_marker(body.get("description", ""), job.id)
        if self.kind == "service_instance":
            model = job.step(StepName.MODEL)
            source = {"id": model.resource_id}
            if model.extra.get("version_id"):
                source["version_id"] = model.extra["version_id"]
            body["source"] = source
            body["endpoint_id"] = job.resource_id(StepName.ENDPOINT)
        return body

    def reuse(self, spec: JobSpec) -> str | None:
        """The ID to reuse instead of creating, if the spec gives one."""
        part = getattr(spec, self.spec_key)
        return part.id if isinstance(part, Reuse) else None


def _ws(job: Job) -> str:
    workspace_id = job.resource_id(StepName.WORKSPACE)
    if workspace_id is None:  # the table orders workspace first; reaching here is a bug
        raise RuntimeError(f"job {job.id} has no workspace ID yet")
    return workspace_id


async def _find_workspaces(client: FabricClient, job: Job, name: str, confirm: bool) -> list[Found]:
    return [Found(w.id, None, w.description) for w in await client.find_workspaces(name, confirm=confirm)]


async def _create_workspace(client: FabricClient, job: Job, body: dict[str, Any]) -> Found:
    w = await client.create_workspace(body)
    return Found(w.id, None, w.description)


async def _get_workspace(client: FabricClient, job: Job, workspace_id: str) -> Found | None:
    w = await client.get_workspace(workspace_id)
    return Found(w.id, None, w.description) if w else None


async def _find_endpoints(client: FabricClient, job: Job, name: str, confirm: bool) -> list[Found]:
    return [Found(e.id, e.status, e.description)
            for e in await client.find_endpoints(_ws(job), name, confirm=confirm)]


async def _create_endpoint(client: FabricClient, job: Job, body: dict[str, Any]) -> Found:
    e = await client.create_endpoint(_ws(job), body)
    return Found(e.id, e.status, e.description)


async def _get_endpoint(client: FabricClient, job: Job, endpoint_id: str) -> Found | None:
    try:
        e = await client.show_endpoint(_ws(job), endpoint_id)
    except TerminalError as exc:
        if exc.status == 404:
            return None
        raise
    return Found(e.id, e.status, e.description)


async def _find_models(client: FabricClient, job: Job, name: str, confirm: bool) -> list[Found]:
    return [
        Found(m.id, None, m.description,
              {"version_id": m.current_version.id if m.current_version else None})
        for m in await client.find_models(_ws(job), name, confirm=confirm)
    ]


async def _create_model(client: FabricClient, job: Job, body: dict[str, Any]) -> Found:
    m = await client.create_model(_ws(job), body)
    return Found(m.id, None, None, {"version_id": m.version_id})


async def _get_model(client: FabricClient, job: Job, model_id: str) -> Found | None:
    m = await client.get_model(_ws(job), model_id)
    if m is None:
        return None
    return Found(m.id, None, m.description, {"version_id": m.current_version.id if m.current_version else None})


async def _find_instances(client: FabricClient, job: Job, name: str, confirm: bool) -> list[Found]:
    return [Found(i.id, i.status, i.description)
            for i in await client.find_service_instances(_ws(job), name, confirm=confirm)]


async def _gone_already(delete: Awaitable[None]) -> None:
    """Await a delete; a resource that is already gone (404) is what was wanted."""
    try:
        await delete
    except TerminalError as exc:
        if exc.status != 404:
            raise


async def _delete_workspace(client: FabricClient, job: Job, workspace_id: str) -> None:
    await _gone_already(client.delete_workspace(workspace_id))


async def _delete_endpoint(client: FabricClient, job: Job, endpoint_id: str) -> None:
    await _gone_already(client.delete_endpoint(_ws(job), endpoint_id))


async def _delete_model(client: FabricClient, job: Job, model_id: str) -> None:
    await _gone_already(client.delete_model(_ws(job), model_id))


async def _delete_instance(client: FabricClient, job: Job, instance_id: str) -> None:
    await _gone_already(client.delete_service_instance(_ws(job), instance_id))


async def _create_instance(client: FabricClient, job: Job, body: dict[str, Any]) -> Found:
    created = await client.create_service_instance(_ws(job), body)
    return Found(created.id, None, None)


async def _validate_endpoint(client: FabricClient, body: dict[str, Any]) -> None:
    """Every reserved spec_code must be one Fabric lists for endpoints (ListSpecs)."""
    wanted = {r["spec_code"] for r in (body.get("reserved_resource") or {}).values() if r.get("spec_code")}
    if not wanted:
        return
    specs = await client.cached("specs:ENDPOINT", lambda: client.list_specs(scenario="ENDPOINT"))
    known = {s.spec_code for s in specs}
    unknown = sorted(wanted - known)
    if unknown:
        raise TerminalError(f"endpoint: unknown spec_code {', '.join(unknown)}; Fabric offers "
                            f"{', '.join(sorted(known)) or 'none'}", code="fabricflow.invalid_spec")


async def _validate_model(client: FabricClient, body: dict[str, Any]) -> None:
    """A non-empty base_model_type must be one Fabric lists (ListBaseModels)."""
    config = ((body.get("version") or {}).get("config") or {}).get("llm_model_config") or {}
    wanted = config.get("base_model_type")
    if not wanted:
        return
    known = {m.base_model_type for m in await client.cached("base_models", client.list_base_models)}
    if wanted not in known:
        raise TerminalError(f"model: unknown base_model_type {wanted}; Fabric offers "
                            f"{', '.join(sorted(known)) or 'none'}", code="fabricflow.invalid_spec")


async def _get_instance(client: FabricClient, job: Job, instance_id: str) -> Found | None:
    try:
        i = await client.show_service_instance(_ws(job), instance_id)
    except TerminalError as exc:
        if exc.status == 404:
            return None
        raise
    return Found(i.id, i.status, i.description)


CREATE_STEPS: dict[StepName, CreateStep] = {
    StepName.WORKSPACE: CreateStep("workspace", "workspace", _find_workspaces, _create_workspace,
                                   _get_workspace, _delete_workspace),
    StepName.ENDPOINT: CreateStep("endpoint", "endpoint", _find_endpoints, _create_endpoint,
                                  _get_endpoint, _delete_endpoint, _validate_endpoint),
    StepName.MODEL: CreateStep("model", "model", _find_models, _create_model, _get_model, _delete_model,
                               _validate_model),
    StepName.SERVICE_INSTANCE: CreateStep("service_instance", "service_instance", _find_instances,
                                          _create_instance, _get_instance, _delete_instance),
}


@dataclass(frozen=True)
class PollStep:
    """How to read the status a wait step waits on."""

    kind: str
    source: StepName
    failed: frozenset[str]
    fetch: Callable[[FabricClient, Job, str], Awaitable[Found]]

    def check(self, found: Found, *, resource: str) -> bool:
        """True when RUNNING; raises ResourceFailedError on a failed status."""
        if found.status == RUNNING:
            return True
        if found.status in self.failed:
            code = found.extra.get("error_code") or found.status
            message = found.extra.get("error_msg") or f"{resource} is {found.status}"
            raise ResourceFailedError(f"{resource} {found.id} is {found.status}: {message}", code=code,
                                      resource_status=found.status)
        return False


async def _poll_endpoint(client: FabricClient, job: Job, endpoint_id: str) -> Found:
    e = await client.show_endpoint(_ws(job), endpoint_id)
    return Found(e.id, e.status, e.description, {"error_code": e.error_code, "error_msg": e.error_msg})


async def _poll_instance(client: FabricClient, job: Job, instance_id: str) -> Found:
    i = await client.show_service_instance(_ws(job), instance_id)
    return Found(i.id, i.status, i.description, {"error_code": i.error_code, "error_msg": i.error_msg})


POLL_STEPS: dict[StepName, PollStep] = {
    StepName.ENDPOINT_READY: PollStep("endpoint", StepName.ENDPOINT, ENDPOINT_FAILED, _poll_endpoint),
    StepName.SERVICE_READY: PollStep("service instance", StepName.SERVICE_INSTANCE, INSTANCE_FAILED,
                                     _poll_instance),
}


def invocation_body(spec: JobSpec) -> dict[str, Any]:
    """The chat completion request of the invocation step."""
    return spec.invocation.model_dump(mode="json", exclude_none=True)
