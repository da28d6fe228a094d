"""Teardown jobs: delete exactly what a job created, in reverse order, waiting until each is gone.

Reused resources and ones adopted by ``on_existing: adopt`` are never deleted. A create whose
outcome the parent never learnt (a step left IN_FLIGHT, e.g. by a cancel) is looked up by name
and the parent's ownership marker, so nothing the parent created is left behind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from orchestrator.domain import Job, carries_marker
from orchestrator.engine.steps import CREATE_STEPS
from orchestrator.errors import NeedsReconcileError, RetryableError, TerminalError
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import StepName, StepState, backoff, poll_delay

if TYPE_CHECKING:
    from orchestrator.engine.runner import Context, Runner

GONE_STATUSES = frozenset({"DELETED"})


@dataclass(frozen=True)
class DeleteStep:
    """How to delete one kind of resource and tell that it is gone."""

    kind: str
    delete: Callable[[FabricClient, str, str], Awaitable[None]]
    gone: Callable[[FabricClient, str, str], Awaitable[bool]]


async def _not_found(call: Awaitable[object]) -> bool:
    try:
        found = await call
    except TerminalError as exc:
        if exc.status == 404:
            return True
        raise
    return found is None or getattr(found, "status", None) in GONE_STATUSES


DELETE_STEPS: dict[StepName, DeleteStep] = {
    StepName.SERVICE_INSTANCE: DeleteStep(
        "service instance", lambda c, ws, i: c.delete_service_instance(ws, i),
        lambda c, ws, i: _not_found(c.show_service_instance(ws, i))),
    StepName.MODEL: DeleteStep(
        "model", lambda c, ws, i: c.delete_model(ws, i), lambda c, ws, i: _not_found(c.get_model(ws, i))),
    StepName.ENDPOINT: DeleteStep(
        "endpoint", lambda c, ws, i: c.delete_endpoint(ws, i),
        lambda c, ws, i: _not_found(c.show_endpoint(ws, i))),
    StepName.WORKSPACE: DeleteStep(
        "workspace", lambda c, ws, i: c.delete_workspace(i), lambda c, ws, i: _not_found(c.get_workspace(i))),
}


async def wait_for_parent(rt: Runner, ctx: Context) -> None:
    """A teardown starts once the job it tears down has stopped (e.g. after a cancel)."""
    assert ctx.job.parent_id is not None
    while not (await rt.store.get(ctx.job.parent_id)).state.is_terminal:
        await rt.sleep(ctx, 1.0)


async def advance(rt: Runner, ctx: Context, name: StepName) -> None:
    """Drive one teardown step until its resources are gone (or raise StepFailed)."""
    assert ctx.job.parent_id is not None
    parent = await rt.store.get(ctx.job.parent_id)
    ops = DELETE_STEPS[name]
    step = ctx.job.step(name)
    state, attempts = step.state, step.attempts
    workspace_id = parent.resource_id(StepName.WORKSPACE)
    targets: list[str] = list(step.extra.get("targets", []))
    while True:
        try:
            if state is StepState.PENDING:
                why, targets = await _targets(rt, parent, name)
                if not targets:
                    await rt.move(ctx, name, state, StepState.SKIPPED, why)
                    return
                rt.checkpoint(ctx, name)
                await rt.move(ctx, name, state, StepState.IN_FLIGHT,
                              f"intent: delete {ops.kind} {', '.join(targets)}", resource_id=targets[0],
                              extra={"targets": targets})
                state = StepState.IN_FLIGHT
            assert workspace_id is not None or name is StepName.WORKSPACE
            if state is StepState.IN_FLIGHT:
                for target in targets:
                    await _delete(rt.client, ops, workspace_id or "", target)
                await rt.move(ctx, name, state, StepState.WAITING,
                              f"delete of {ops.kind} {', '.join(targets)} accepted; waiting until gone")
                state = StepState.WAITING
            await _wait_gone(rt, ctx, ops, workspace_id or "", targets)
            await rt.move(ctx, name, state, StepState.SUCCEEDED, f"{ops.kind} {', '.join(targets)} gone",
                          resource_status="DELETED", error=None)
            return
        except (RetryableError, NeedsReconcileError) as exc:
            if state is StepState.PENDING:
                attempts = await _retry_pending(rt, ctx, name, attempts, exc)
            else:
                attempts = await rt.retry(ctx, name, state, attempts, exc)
        except TerminalError as exc:
            await rt.fail(ctx, name, state, exc)


async def _retry_pending(rt: Runner, ctx: Context, name: StepName, attempts: int,
                         exc: RetryableError | NeedsReconcileError) -> int:
    # Looking the targets up failed before any intent was recorded: nothing to commit but the
    # failure itself, once retries run out.
    attempts += 1
    if attempts >= rt.settings.max_attempts:
        exc.message = f"gave up after {attempts} attempts: {exc.message}"
        await rt.fail(ctx, name, StepState.PENDING, exc)
    await rt.sleep(ctx, backoff(attempts, base=rt.settings.backoff_base, cap=rt.settings.backoff_cap, rng=rt.rng))
    return attempts


async def _targets(rt: Runner, parent: Job, name: StepName) -> tuple[str, list[str]]:
    """What to delete for this step, and why there is nothing when there is nothing."""
    pstep = parent.step(name)
    if pstep.state is StepState.SKIPPED:
        how = "adopted by request" if pstep.extra.get("adopted") else "reused"
        return f"{name} {pstep.resource_id} was {how}, not created by the job: kept", []
    recorded = [pstep.resource_id] if pstep.resource_id else []
    if pstep.request_name is None:
        return f"the job never created a {name}: nothing to delete", recorded
    if name is not StepName.WORKSPACE and parent.resource_id(StepName.WORKSPACE) is None:
        return f"the job has no workspace: no {name} to delete", recorded
    # Also look by name and marker: a create whose answer was never recorded (a step left
    # IN_FLIGHT, a runner that lost its lease) still left a resource that is the job's.
    try:
        found = await CREATE_STEPS[name].find(rt.client, parent, pstep.request_name, True)  # confirmed
    except TerminalError as exc:
        if exc.status != 404:
            raise
        found = []  # the workspace itself is gone, and everything that was in it
    ours = [f.id for f in found if carries_marker(f.description, parent.id)]
    targets = list(dict.fromkeys(recorded + ours))
    return (f"no {name} named {pstep.request_name!r} carries the job's marker: nothing to delete", targets)


async def _delete(client: FabricClient, ops: DeleteStep, workspace_id: str, target: str) -> None:
    try:
        await ops.delete(client, workspace_id, target)
    except TerminalError as exc:
        # Already gone, or already being deleted (a resend after a crash): both are fine.
        if exc.status == 404 or await ops.gone(client, workspace_id, target):
            return
        if exc.status == 400 and "DELETING" in exc.message.upper():
            return
        raise


async def _wait_gone(rt: Runner, ctx: Context, ops: DeleteStep, workspace_id: str, targets: list[str]) -> None:
    deadline = rt.store.clock() + timedelta(seconds=rt.settings.teardown_timeout)
    polls = 0
    for target in targets:
        while not await ops.gone(rt.client, workspace_id, target):
            await rt.progressed(ctx)
            if rt.store.clock() >= deadline:
                raise TerminalError(f"{ops.kind} {target} was still not gone after "
                                    f"{rt.settings.teardown_timeout:.0f}s", code="fabricflow.timeout")
            polls += 1
            await rt.sleep(ctx, poll_delay(polls, initial=rt.settings.poll_initial, cap=rt.settings.poll_max,
                                        rng=rt.rng))
