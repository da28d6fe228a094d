"""Snapshots of jobs, steps and events as the store returns them. No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.machine import JobKind, JobState, StepName, StepState, order_of

MARKER_PREFIX = "fabricflow"


#: A marker's job ID part: 64 bits of it (16 hex digits), or the 32 of fabricflow 0.1.
_MARKER = re.compile(rf"\[{MARKER_PREFIX}:([0-9a-f]{{8}}|[0-9a-f]{{16}})\]")


def ownership_marker(job_id: str) -> str:
    """The tag appended to every description fabricflow sends, e.g. ``[fabricflow:3f9c2a1e5b7d4c11]``:
    64 bits of the job ID, so two jobs' markers never collide in practice."""
    return f"[{MARKER_PREFIX}:{job_id[:16]}]"


def markers_in(description: str | None) -> list[str]:
    """The job ID parts of every ownership marker in a description, as whole tokens."""
    return _MARKER.findall(description or "")


def carries_marker(description: str | None, job_id: str) -> bool:
    """True when the description holds this job's marker as a whole token (not a substring of
    another job's). Markers written by fabricflow 0.1 (32 bits) still count for their jobs."""
    return any(part == job_id[:len(part)] for part in markers_in(description))


def with_marker(description: str, job_id: str) -> str:
    """A description carrying the job's ownership marker exactly once."""
    if carries_marker(description, job_id):
        return description
    return f"{description} {ownership_marker(job_id)}".strip()


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a job, as last committed."""

    name: StepName
    state: StepState
    resource_id: str | None = None
    resource_status: str | None = None
    request_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """The step object of the ``--json`` contract."""
        return {
            "name": str(self.name),
            "state": str(self.state),
            "resource_id": self.resource_id,
            "resource_status": self.resource_status,
            "attempts": self.attempts,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Job:
    """A job and its steps, as last committed."""

    id: str
    name: str
    state: JobState
    spec: dict[str, Any]
    steps: dict[StepName, Step]
    created_at: datetime
    updated_at: datetime
    kind: JobKind = JobKind.CREATE
    parent_id: str | None = None
    cancel_requested_at: datetime | None = None
    started_at: datetime | None = None
    spec_version: int = 1
    state_version: int = 1
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    recoveries: int = 0
    finished_at: datetime | None = None

    @property
    def order(self) -> tuple[StepName, ...]:
        """This job's step names in execution order."""
        return order_of(self.kind)

    def step(self, name: StepName) -> Step:
        """The named step."""
        return self.steps[name]

    def resource_id(self, name: StepName) -> str | None:
        """The resource ID recorded by a step, if any."""
        return self.steps[name].resource_id

    def summary_json(self) -> dict[str, Any]:
        """The object of ``list --json``."""
        return {
            "id": self.id,
            "name": self.name,
            "state": str(self.state),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }

    def as_json(self) -> dict[str, Any]:
        """The object of ``show --json`` and ``run --json``."""
        result = self.result or {}
        model = self.steps[StepName.MODEL]
        return {
            "id": self.id,
            "name": self.name,
            "kind": str(self.kind),
            "parent_id": self.parent_id,
            "state": str(self.state),
            "error": self.error,
            "steps": [self.steps[n].as_json() for n in self.order],
            "result": {
                "workspace_id": self.resource_id(StepName.WORKSPACE),
                "endpoint_id": self.resource_id(StepName.ENDPOINT),
                "model_id": model.resource_id,
                "model_version_id": model.extra.get("version_id"),
                "service_instance_id": self.resource_id(StepName.SERVICE_INSTANCE),
                "reply": result.get("reply"),
                "finish_reason": result.get("finish_reason"),
                "usage": result.get("usage"),
            },
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the append-only event log."""

    id: int
    job_id: str
    at: datetime
    step: str | None
    from_state: str | None
    to_state: str | None
    detail: str | None

    def as_json(self) -> dict[str, Any]:
        """The object of ``events --json``."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "at": self.at.isoformat(),
            "step": self.step,
            "from": self.from_state,
            "to": self.to_state,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Invocation:
    """One stored chat completion made on a job's service instance."""

    id: int
    job_id: str
    at: datetime
    service_instance_id: str
    request: dict[str, Any]
    reply: str | None
    finish_reason: str | None
    usage: dict[str, Any] | None
    ttft_ms: int | None
    duration_ms: int | None
    error: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        """The object of ``invoke --json``."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "at": self.at.isoformat(),
            "service_instance_id": self.service_instance_id,
            "request": self.request,
            "reply": self.reply,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "ttft_ms": self.ttft_ms,
            "duration_ms": self.duration_ms,
            "error": self.error,
        }
