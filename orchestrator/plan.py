"""``fabricflow plan``: what ``run`` would create, reuse, adopt or refuse, checked against
Fabric, while nothing is written (no database, no create; only reads are sent).

The checks are the engine's own, made with its step functions (engine/steps.py): the
catalogue validators of each create step (``CreateStep.validate``: spec_code, base_model_type),
which the engine runs before a job's first create; the reads of reused resources
(``CreateStep.get``, and the pinned model version); and the exact-name look-up
(``CreateStep.find``) with the rule of ``on_existing``. Inside a workspace the job would create
itself nothing can exist yet, so no look-up is made there, as the engine makes none.

``check_first_create`` is the same checks for the engine to make before a job's first create,
so that a spec ``plan`` refuses leaves no resource behind when it is run anyway.

``plan`` has no step to come back to: each of its look-ups is retried on transient errors in
the call, with a step's backoff (``retries.persist``, given by ``make_plan``'s ``retry``);
the engine's own checks are retried by its steps and take no ``retry``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from orchestrator.domain import Job, Step
from orchestrator.engine.steps import CREATE_STEPS, POLL_STEPS, CreateStep, Found
from orchestrator.errors import TerminalError
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import STEPS, Action, JobState, StepName, StepState
from orchestrator.retries import RetryPolicy, persist
from orchestrator.spec import (JOB, RESOURCE_PARTS, JobSpec, has_job, parse_spec, read_spec_data, with_index,
                               with_job)

PlanAction = Literal["create", "reuse", "adopt", "refuse", "wait", "invoke"]


@dataclass(frozen=True)
class PlannedStep:
    """What ``run`` would do in one step; an object of ``plan --json``'s ``steps``."""

    step: StepName
    action: PlanAction
    name: str | None = None  # the name a create would send, {job} left as written
    id: str | None = None  # the resource reused or adopted
    reason: str | None = None  # a refusal's message; otherwise what was found (or not looked at)

    def describe(self) -> str:
        """The plan's line for this step, after the step's name."""
        if self.action == "create":
            return f"create {self.name}"
        if self.action in ("reuse", "adopt"):
            return f"{self.action} {self.id}"
        if self.action == "refuse":
            return f"refuse: {self.reason}"
        return self.reason or self.action

    def as_json(self) -> dict[str, Any]:
        """``{step, action, name, id, reason}``."""
        return {"step": str(self.step), "action": self.action, "name": self.name, "id": self.id,
                "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """Every step of the procedure, in order, as ``run`` would take it."""

    steps: tuple[PlannedStep, ...]

    @property
    def refused(self) -> list[PlannedStep]:
        """The steps ``run`` would refuse (the job would fail before its first create)."""
        return [s for s in self.steps if s.action == "refuse"]

    @property
    def proceeds(self) -> bool:
        """True when ``run`` would go ahead."""
        return not self.refused

    def count(self, action: PlanAction) -> int:
        """How many steps would take ``action``."""
        return sum(1 for s in self.steps if s.action == action)

    def lines(self) -> list[str]:
        """One line per step: its name, then what would happen."""
        return [f"{step.step:<17} {step.describe()}" for step in self.steps]


# --- reading the spec as run would --------------------------------------------------------------


def read_draft(path: str | Path) -> tuple[JobSpec, dict[str, str]]:
    """The spec file validated as ``run`` validates it, under a made-up job ID (``{job}``
    replaced as run replaces it), and the resource names that hold ``{job}``, as written, by
    spec part: those are new for every job, so they are shown as written and never looked up."""
    data = read_spec_data(path)
    spec = parse_spec(with_job(with_index(data, 0), uuid.uuid4().hex), str(path), template=data)  # as one job
    parts = data if isinstance(data, dict) else {}
    templated = {key: part["name"] for key in RESOURCE_PARTS
                 if isinstance(part := parts.get(key), dict) and has_job(part.get("name"))}
    return spec, templated


# --- the checks -------------------------------------------------------------------------------------


async def make_plan(client: FabricClient, spec: JobSpec, *, templated: Mapping[str, str] | None = None,
                    retry: RetryPolicy | None = None) -> Plan:
    """What ``run`` would do with ``spec`` against ``client``'s Fabric; reads only.

    ``templated``: names as written, for the parts whose name holds ``{job}`` (``read_draft``).
    ``retry``: how each look-up is retried on transient errors (none: only the client's in-call
    retries); one that still fails raises.
    """
    templated = templated or {}
    refusals = await catalogue_refusals(client, spec, retry=retry)
    workspace_id: str | None = None  # an existing workspace the job would use
    fresh = False  # the job would create its workspace: nothing exists inside it yet
    planned: list[PlannedStep] = []
    for row in STEPS:
        if row.action is Action.CREATE:
            ops = CREATE_STEPS[row.name]
            step = await _create_step(client, row.name, ops, spec, workspace_id=workspace_id, fresh=fresh,
                                      shown=templated.get(ops.spec_key), refusal=refusals.get(row.name),
                                      retry=retry)
            if row.name is StepName.WORKSPACE:
                fresh = step.action == "create"
                workspace_id = step.id if step.action in ("reuse", "adopt") else None
        elif row.action is Action.POLL:
            poll = POLL_STEPS[row.name]
            timeout = getattr(spec.timeouts, str(row.name))
            step = PlannedStep(row.name, "wait", reason=f"wait until the {poll.kind} is RUNNING "
                                                        f"(at most {_duration(timeout)})")
        else:
            count = len(spec.invocation.messages)
            step = PlannedStep(row.name, "invoke", reason=f"stream a chat completion ({count} message"
                                                          f"{'' if count == 1 else 's'})")
        planned.append(step)
    return Plan(tuple(planned))


async def catalogue_refusals(client: FabricClient, spec: JobSpec, *,
                             retry: RetryPolicy | None = None) -> dict[StepName, str]:
    """The check the engine makes before a job's first create (``procedure._check_catalogues``):
    each created part's catalogue values, by step, with the validator's message for a bad one.
    ``retry`` as in ``make_plan``."""
    refusals: dict[StepName, str] = {}
    for name, ops in CREATE_STEPS.items():
        validate = ops.validate
        if validate is None or ops.reuse(spec) is not None:
            continue
        body = getattr(spec, ops.spec_key).model_dump(mode="json", exclude_none=True)
        try:
            await persist(lambda: validate(client, body), retry)
        except TerminalError as exc:
            if exc.code != "fabricflow.invalid_spec":
                raise
            refusals[name] = exc.message.removeprefix(f"{ops.kind}: ")
    return refusals


async def check_first_create(client: FabricClient, spec: JobSpec, job: Job, *, first: StepName) -> None:
    """Raise TerminalError naming every step the job would refuse later, before its first
    create (``first``; the earlier create steps reused or adopted their resource): each part's
    catalogue values, and, inside a workspace the job reuses or adopted, the names its later
    creates would send, under the rule of ``on_existing``.

    ``first``'s own look-up is the caller's, which makes it next. Inside a workspace the job
    creates itself no look-up is needed, so then only the catalogues are read (cached per client).
    """
    refusals = await catalogue_refusals(client, spec)
    problems = [(name, f"{name}: {reason}", "fabricflow.invalid_spec") for name, reason in refusals.items()]
    workspace_id = job.resource_id(StepName.WORKSPACE)
    order = list(CREATE_STEPS)
    for name in order[order.index(first) + 1:] if workspace_id is not None else ():
        ops = CREATE_STEPS[name]
        if name in refusals or ops.reuse(spec) is not None:
            continue
        request_name = getattr(spec, ops.spec_key).name
        step = settle(name, ops.kind, request_name, spec.on_existing,
                      await ops.find(client, job, request_name, False))
        if step.action == "refuse":
            problems.append((name, f"{name}: {step.reason}", "fabricflow.conflict"))
    if problems:
        problems.sort(key=lambda problem: order.index(problem[0]))
        raise TerminalError("; ".join(message for _, message, _ in problems), code=problems[0][2])


async def _create_step(client: FabricClient, name: StepName, ops: CreateStep, spec: JobSpec, *,
                       workspace_id: str | None, fresh: bool, shown: str | None,
                       refusal: str | None, retry: RetryPolicy | None) -> PlannedStep:
    reuse_id = ops.reuse(spec)
    inside = name is not StepName.WORKSPACE
    if reuse_id is not None:
        if inside and workspace_id is None:
            return PlannedStep(name, "reuse", id=reuse_id, reason="not checked: the workspace is refused")
        return await _reused(client, name, ops, spec, workspace_id, reuse_id, retry)
    request_name = getattr(spec, ops.spec_key).name
    shown = shown or request_name
    if refusal is not None:
        return PlannedStep(name, "refuse", name=shown, reason=refusal)
    if inside and fresh:
        return PlannedStep(name, "create", name=shown,
                           reason="inside the workspace this job creates, nothing can exist yet")
    if JOB in shown:
        return PlannedStep(name, "create", name=shown, reason=f"{JOB} gives every job a name of its own")
    if inside and workspace_id is None:
        return PlannedStep(name, "create", name=shown, reason="not checked: the workspace is refused")
    matches = await persist(lambda: ops.find(client, _draft(workspace_id), request_name, False), retry)
    return settle(name, ops.kind, request_name, spec.on_existing, matches)


def settle(name: StepName, kind: str, request_name: str, on_existing: str, matches: list[Found]) -> PlannedStep:
    """The engine's rule before a create (``procedure._existing``), for same-named resources a new
    job cannot have made: none, create; exactly one with ``on_existing: adopt``, adopt it;
    otherwise refuse."""
    if not matches:
        return PlannedStep(name, "create", name=request_name, reason=f"no {kind} of that name exists")
    ids = ", ".join(m.id for m in matches)
    if on_existing == "adopt" and len(matches) == 1:
        return PlannedStep(name, "adopt", name=request_name, id=matches[0].id,
                           reason=f"a {kind} of that name exists and on_existing is adopt")
    if on_existing == "adopt":
        return PlannedStep(name, "refuse", name=request_name,
                           reason=f"{request_name} already exists {len(matches)} times ({ids}); "
                                  "on_existing: adopt needs exactly one")
    return PlannedStep(name, "refuse", name=request_name,
                       reason=f"{request_name} already exists ({ids}) and on_existing is fail")


async def _reused(client: FabricClient, name: StepName, ops: CreateStep, spec: JobSpec,
                  workspace_id: str | None, reuse_id: str, retry: RetryPolicy | None) -> PlannedStep:
    """The engine's check of a reused resource (``procedure.reuse``): it exists, and so does
    the model version the spec pins."""
    found = await persist(lambda: ops.get(client, _draft(workspace_id), reuse_id), retry)
    if found is None:
        return PlannedStep(name, "refuse", id=reuse_id, reason=f"reused {reuse_id} does not exist")
    pinned = getattr(getattr(spec, ops.spec_key), "version_id", None)
    if pinned is not None:
        assert workspace_id is not None  # a reused model needs a reused workspace (spec validation)
        versions = await persist(lambda: client.list_model_versions(workspace_id, reuse_id), retry)
        if pinned not in {v.id for v in versions}:
            return PlannedStep(name, "refuse", id=reuse_id, reason=f"model {reuse_id} has no version {pinned}")
    status = f" ({found.status})" if found.status else ""
    return PlannedStep(name, "reuse", id=reuse_id, reason=f"the {ops.kind} exists{status}")


def _draft(workspace_id: str | None) -> Job:
    """The job as the engine's step functions see it before it starts: of its steps they read
    only the workspace's ID (``steps._ws``), the one this job would use."""
    now = datetime.now(UTC)
    state = StepState.SKIPPED if workspace_id else StepState.PENDING
    return Job(id="0" * 32, name="plan", state=JobState.PENDING, spec={}, created_at=now, updated_at=now,
               steps={StepName.WORKSPACE: Step(StepName.WORKSPACE, state, resource_id=workspace_id)})


def _duration(seconds: float) -> str:
    """A timeout as a spec writes it: 30m, 1h, 90s (else as the engine's messages do)."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
