"""The creating procedure's steps: create (exactly once), reuse, wait for RUNNING, invoke.

The exactly-once protocol for creates (DESIGN.md): commit the intent (IN_FLIGHT with the exact
name), look the resource up by exact name and ownership marker, adopt a single match or create
only if there is none, then commit the returned ID. A crash anywhere leaves a state this code
resumes from without a second create.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING


from orchestrator.domain import Job, carries_marker, ownership_marker
from orchestrator.engine.steps import CREATE_STEPS, POLL_STEPS, CreateStep, Found, PollStep, invocation_body
from orchestrator.errors import (
    FabricError,
    NeedsReconcileError,
    NotFoundError,
    ResourceFailedError,
    RetryableError,
    StaleTransition,
    TerminalError,
)
from orchestrator.fabric.client import FabricClient
from orchestrator.logs import get_logger
from orchestrator.fabric.models import RUNNING
from orchestrator.spec import JobSpec, Reuse
from orchestrator.machine import ROWS, Action, StepName, StepState, poll_delay, poll_interval, polls_made
from orchestrator.plan import check_first_create

if TYPE_CHECKING:
    from orchestrator.engine.runner import Context, Runner

log = get_logger(__name__)  # structlog if configured, else stdlib logging: never stdout


async def advance(rt: Runner, ctx: Context, name: StepName) -> None:
    """Drive one step of the creating procedure until it is done (or raise StepFailed)."""
    action = ROWS[name].action
    if action is Action.CREATE:
        await create(rt, ctx, name, CREATE_STEPS[name])
    elif action is Action.POLL:
        await wait(rt, ctx, name, POLL_STEPS[name])
    else:
        await invoke(rt, ctx, name)


async def create(rt: Runner, ctx: Context, name: StepName, ops: CreateStep) -> None:
    """Create the step's resource exactly once, or adopt the one this job already created."""
    assert ctx.spec is not None
    spec = ctx.spec
    step = ctx.job.step(name)
    reuse_id = ops.reuse(spec)
    if reuse_id is not None:
        await reuse(rt, ctx, name, ops, reuse_id)
        return
    request_name = getattr(spec, ops.spec_key).name
    state, attempts = step.state, step.attempts
    marker = ownership_marker(ctx.job.id)
    leased_at: float | None = None
    # A step found IN_FLIGHT was left so by an earlier run, whose create may have been sent and
    # may still be carried out: nothing is created again before a settle window of look-ups.
    settle = _Settle(rt.settings.settle_seconds, "an earlier run") if state is StepState.IN_FLIGHT else None
    if state is StepState.PENDING:
        # A PENDING step has never sent its create: the intent is durable before any create
        # leaves. A look-up can only find a same-named resource that this job did not make, and
        # none can exist inside a workspace this job created itself; elsewhere, look first.
        first = _first_create(ctx, name)
        if first or not _own_workspace(ctx.job):
            try:
                if first:
                    # Before the job's first create, what `fabricflow plan` checks: every catalogue
                    # value it will send (spec_code, base_model_type) and, in a workspace it reuses,
                    # the names its later creates would send. A bad spec leaves no resource behind.
                    await check_first_create(rt.client, spec, ctx.job, first=name)
                if await _look(rt, ctx, name, ops, state, request_name, marker):
                    return
            except (RetryableError, NeedsReconcileError) as exc:
                await rt.move(ctx, name, state, StepState.IN_FLIGHT,
                              f"intent: create {ops.kind} {request_name!r}", request_name=request_name)
                state = StepState.IN_FLIGHT
                attempts = await rt.retry(ctx, name, state, attempts, exc)
            except TerminalError as exc:
                await rt.fail(ctx, name, state, exc)
        if state is StepState.PENDING:
            # The intent's commit renews the lease too: the fence for the create that follows.
            await rt.move(ctx, name, state, StepState.IN_FLIGHT,
                          f"intent: create {ops.kind} {request_name!r}", request_name=request_name, renew=True)
            state, leased_at = StepState.IN_FLIGHT, time.monotonic()
    while True:
        try:
            if leased_at is None:
                # Resumed, or after a failed attempt: this job may have created it already. When a
                # create may still be carried out, only a confirmed listing counts.
                if await _look(rt, ctx, name, ops, state, request_name, marker, confirm=settle is not None):
                    return
                if settle is not None and await _settling(rt, ctx, name, ops, request_name, settle):
                    continue
            job = ctx.job
            body = ops.body(job, spec)
            if ops.validate is not None:
                await ops.validate(rt.client, body)
            rt.checkpoint(ctx, name)  # last safe point before the create request
            # Fencing: only a runner that still holds the lease may send a create. The intent's
            # commit just renewed it; any later attempt renews it again first.
            if leased_at is None or time.monotonic() - leased_at > rt.settings.lease_seconds / 4:
                await rt.store.renew(job.id, rt.owner, lease=rt.settings.lease_seconds)
            leased_at = None
            created = await ops.create(rt.client, job, body)
            try:
                await _done(rt, ctx, name, state, created, f"created {ops.kind} {created.id}")
            except StaleTransition:
                # Not ours to record any more; leave a trace (the new owner adopts it by marker).
                await rt.store.note(job.id, f"created {ops.kind} {created.id} after the lease was lost",
                                    step=name)
                raise
            if settle is not None:
                # More than one create of this step may have been carried out: remove any other.
                await rt.flush(ctx)
                await repair(rt, ctx, name, ops, request_name, keep=created.id)
            return
        except NeedsReconcileError as exc:
            # The create may still be carried out, however long after: settle before another.
            leased_at = None
            settle = _Settle(rt.settings.settle_seconds, "the last attempt")
            attempts = await rt.retry(ctx, name, state, attempts, exc, cancellable=False)
        except RetryableError as exc:
            leased_at = None  # while a create may still land, a cancel waits for the window
            attempts = await rt.retry(ctx, name, state, attempts, exc, cancellable=settle is None)
        except TerminalError as exc:
            await rt.fail(ctx, name, state, exc)


@dataclass
class _Settle:
    """The settle window after a create whose outcome is unknown: no create before ``until``."""

    seconds: float
    source: str  # whose create may still land, for the events
    until: float = 0.0
    looks: int = 0

    def __post_init__(self) -> None:
        # From now: the request was sent before now, so it cannot land later than this.
        self.until = time.monotonic() + self.seconds


async def _settling(rt: Runner, ctx: Context, name: StepName, ops: CreateStep, request_name: str,
                    settle: _Settle) -> bool:
    """After a look that found nothing: True (having waited) while the settle window lasts, so
    that the caller looks again; False once it is over and a create may go ahead. Every look is
    an event, so ``fabricflow events`` shows why the job waits."""
    await rt.progressed(ctx)  # Fabric answered: this run is not one more interrupted one
    settle.looks += 1
    left = settle.until - time.monotonic()
    what = f"look {settle.looks}: no {ops.kind} named {request_name!r} carries this job's marker"
    if left <= 0:
        if settle.seconds > 0:
            await rt.store.note(ctx.job.id, f"{what}; the settle window ({settle.seconds:g}s) is over, "
                                "so it is created", step=name)
        return False
    wait = min(left, rt.settings.look_interval * 2 ** min(settle.looks - 1, 2))
    held = (" (the requested cancel waits for it: stopping now could leave a resource no job records)"
            if ctx.cancel.is_set() or ctx.job.cancel_requested_at is not None else "")
    await rt.store.note(ctx.job.id, f"{what} yet; a create sent by {settle.source} may still be carried out, "
                        f"so none is sent for {left:.0f}s more (settle window {settle.seconds:g}s); "
                        f"looking again in {wait:.1f}s{held}", step=name)
    await rt.sleep(ctx, wait, cancellable=False)
    return True


async def _look(rt: Runner, ctx: Context, name: StepName, ops: CreateStep, state: StepState,
                request_name: str, marker: str, *, confirm: bool = False) -> bool:
    """Look the resource up by exact name and marker: adopt this job's own, settle a same-named
    one that is not (adopt or refuse); False when there is none and a create may go ahead."""
    # Whatever it finds, a commit follows (an intent, an adoption, a failure): that commit ends
    # the streak of interrupted runs, so the answer needs no write of its own.
    matches = await ops.find(rt.client, ctx.job, request_name, confirm)
    ours = [m for m in matches if carries_marker(m.description, ctx.job.id)]
    if ours:
        # Several carry this job's marker only when a create was carried out more than once:
        # keep one (not a failed one, the oldest where Fabric lists oldest first), delete the rest.
        keep = sorted(ours, key=lambda m: (m.status or "").endswith("FAILED"))[0]
        if state is StepState.PENDING:  # only a lost intent can lead here; record one first
            await rt.move(ctx, name, state, StepState.IN_FLIGHT, f"intent: create {ops.kind} {request_name!r}",
                          request_name=request_name)
            state = StepState.IN_FLIGHT
        await _done(rt, ctx, name, state, keep,
                    f"found {ops.kind} {keep.id} created earlier by this job; adopted")
        if len(ours) > 1:
            await rt.flush(ctx)
            await _delete_extras(rt, ctx, name, ops, request_name, [m for m in ours if m is not keep], keep.id)
        return True
    if matches:
        await _existing(rt, ctx, name, ops, state, request_name, matches)
        return True
    return False


async def repair(rt: Runner, ctx: Context, name: StepName, ops: CreateStep, request_name: str, *,
                 keep: str) -> None:
    """Delete every resource named ``request_name`` that carries this job's marker, except
    ``keep`` (the recorded one): duplicates a cloud carried out behind the engine's back."""
    try:
        matches = await ops.find(rt.client, ctx.job, request_name, False)
    except FabricError as exc:
        await rt.store.note(ctx.job.id, f"could not look for duplicates of {ops.kind} {keep}: {exc.message}; "
                            "`fabricflow orphans` finds any", step=name)
        return
    extras = [m for m in matches if _extra(m, keep, ctx.job.id)]
    if extras:
        await _delete_extras(rt, ctx, name, ops, request_name, extras, keep)


def _extra(found: Found, keep: str | None, job_id: str) -> bool:
    """An extra copy: this job's marker, not the recorded one, not already on its way out."""
    return (found.id != keep and carries_marker(found.description, job_id)
            and found.status not in ("DELETING", "DELETED"))


async def _delete_extras(rt: Runner, ctx: Context, name: StepName, ops: CreateStep, request_name: str,
                         extras: list[Found], keep: str) -> None:
    for extra in extras:
        try:
            await ops.delete(rt.client, ctx.job, extra.id)
            detail = (f"deleted duplicate {ops.kind} {extra.id}: named {request_name!r} with this job's "
                      f"marker, but {keep} is the one recorded")
        except FabricError as exc:
            detail = (f"could not delete duplicate {ops.kind} {extra.id} ({exc.message}); "
                      "`fabricflow orphans --delete` removes it")
        log.warning("duplicate_found", kind=ops.kind, resource_id=extra.id, kept=keep)
        await rt.store.note(ctx.job.id, detail, step=name)


async def sweep(rt: Runner, ctx: Context) -> None:
    """At the job's end: for each resource this job created, list its name once more and delete
    any extra one carrying the job's marker (a late create, a duplicate the cloud made), newest
    step first. Reads only, unless something is found; never fails the job."""
    created = [(n, ops, ctx.job.step(n)) for n, ops in CREATE_STEPS.items()
               if ctx.job.step(n).state is StepState.SUCCEEDED and ctx.job.step(n).resource_id
               and ctx.job.step(n).request_name and not ctx.job.step(n).extra.get("adopted")]
    found = await asyncio.gather(*(ops.find(rt.client, ctx.job, step.request_name or "", False)
                                   for _, ops, step in created), return_exceptions=True)
    flushed = False
    for (n, ops, step), matches in reversed(list(zip(created, found, strict=True))):
        if isinstance(matches, BaseException):
            if not isinstance(matches, FabricError):
                raise matches
            await rt.store.note(ctx.job.id, f"final sweep: could not list {ops.kind}s named {step.request_name!r}: "
                                f"{matches.message}; `fabricflow orphans` finds any duplicate", step=n)
            continue
        extras = [m for m in matches if _extra(m, step.resource_id, ctx.job.id)]
        if extras:
            if not flushed:
                await rt.flush(ctx)
                flushed = True
            assert step.resource_id is not None
            await _delete_extras(rt, ctx, n, ops, step.request_name or "", extras, step.resource_id)


async def _done(rt: Runner, ctx: Context, name: StepName, src: StepState, found: Found, detail: str) -> None:
    await rt.move(ctx, name, src, StepState.SUCCEEDED, detail, resource_id=found.id,
                  resource_status=found.status, extra=_clean(found.extra), error=None)


async def _existing(rt: Runner, ctx: Context, name: StepName, ops: CreateStep, state: StepState,
                    request_name: str, matches: list[Found]) -> None:
    assert ctx.spec is not None
    ids = ", ".join(m.id for m in matches)
    if ctx.spec.on_existing == "adopt" and len(matches) == 1:
        found = matches[0]
        await rt.move(ctx, name, state, StepState.SKIPPED,
                      f"adopted existing {ops.kind} {found.id} (on_existing: adopt); it will never be "
                      "torn down", resource_id=found.id, resource_status=found.status,
                      extra={**_clean(found.extra), "adopted": True})
        return
    hint = "" if len(matches) == 1 else " (several; adopt needs exactly one)"
    raise TerminalError(
        f"{_a(ops.kind)} named {request_name!r} already exists ({ids}) and was not created by "
        f"this job{hint}; rename it in the spec, or set on_existing: adopt to use it",
        code="fabricflow.conflict")


async def reuse(rt: Runner, ctx: Context, name: StepName, ops: CreateStep, resource_id: str) -> None:
    """Check that a resource the spec reuses exists; record it as SKIPPED (never torn down)."""
    state, attempts = ctx.job.step(name).state, ctx.job.step(name).attempts
    while True:
        try:
            found = await ops.get(rt.client, ctx.job, resource_id)
            break
        except (RetryableError, NeedsReconcileError) as exc:
            if state is StepState.PENDING:  # retries need an in-progress state to stay in
                await rt.move(ctx, name, state, StepState.IN_FLIGHT, f"checking {ops.kind} {resource_id}")
                state = StepState.IN_FLIGHT
            attempts = await rt.retry(ctx, name, state, attempts, exc)
        except TerminalError as exc:
            await rt.fail(ctx, name, state, exc)
    if found is None:
        await rt.fail(ctx, name, state, TerminalError(
            f"{ops.kind} {resource_id} (reused by the spec) does not exist", code="fabricflow.not_found"))
        return
    pinned = getattr(getattr(ctx.spec, ops.spec_key), "version_id", None)
    if pinned is not None:
        assert ctx.job.resource_id(StepName.WORKSPACE) is not None
        versions = await rt.client.list_model_versions(ctx.job.resource_id(StepName.WORKSPACE), resource_id)
        if pinned not in {v.id for v in versions}:
            await rt.fail(ctx, name, state, TerminalError(
                f"model {resource_id} has no version {pinned}", code="fabricflow.not_found"))
        found = Found(found.id, found.status, found.description, {**found.extra, "version_id": pinned})
    await rt.move(ctx, name, state, StepState.SKIPPED, f"reusing {ops.kind} {resource_id}",
                  resource_id=resource_id, resource_status=found.status, extra={**_clean(found.extra), "reused": True})


async def wait(rt: Runner, ctx: Context, name: StepName, ops: PollStep) -> None:
    """Poll the resource until RUNNING; fail on a failed status or at the step's timeout."""
    job = ctx.job
    source = job.step(ops.source)
    resource_id = source.resource_id
    assert resource_id is not None
    step = job.step(name)
    state, attempts, last = step.state, step.attempts, step.resource_status or source.resource_status
    timeout, initial, cap = _wait_settings(rt, ctx, name)
    fresh = state is StepState.PENDING
    if fresh:
        await rt.move(ctx, name, state, StepState.WAITING, f"waiting for {ops.kind} {resource_id} "
                      f"to be RUNNING (up to {human(timeout)})", resource_id=resource_id, resource_status=last)
        state = StepState.WAITING
        started = rt.store.clock()
    else:
        started = step.started_at or rt.store.clock()
    deadline = started + timedelta(seconds=timeout)
    key = (ops.kind, resource_id)
    ctx.shelve()  # the wait reads no more of the spec, and may last for minutes
    try:
        now = rt.store.clock()
        left = max(0.0, (deadline - now).total_seconds())
        polls = 0
        if fresh and last != RUNNING:
            # Just created and reported not yet RUNNING: asking again at once would only say so again.
            await rt.sleep(ctx, min(initial, left))
        elif not fresh:
            # Resumed (a restart takes over every waiting job at once): the schedule goes on where
            # it was, and the first poll is spread over the interval it had reached, rather than
            # thousands of GETs in the same instant, or a fresh ramp of 1 s, 2 s, 4 s for each.
            polls = polls_made(max(0.0, (now - started).total_seconds()), initial=initial, cap=cap)
            spread = poll_interval(polls, initial=initial, cap=cap)
            await rt.sleep(ctx, min(rt.rng.uniform(0.0, spread), left))
        await _poll_until_running(rt, ctx, name, ops, key, state=state, attempts=attempts, last=last,
                                  started=started, deadline=deadline, initial=initial, cap=cap, polls=polls)
    finally:
        rt.poller.forget(key)  # the wait is over, whatever its outcome


def _wait_settings(rt: Runner, ctx: Context, name: StepName) -> tuple[float, float, float]:
    """The wait's timeout and poll interval (initial, cap) from the spec, as plain numbers: the
    wait holds no part of the spec, which it shelves."""
    assert ctx.spec is not None
    timeouts, poll = ctx.spec.timeouts, ctx.spec.polling
    timeout = timeouts.endpoint_ready if name is StepName.ENDPOINT_READY else timeouts.service_ready
    initial = poll.initial if poll and poll.initial else rt.settings.poll_initial
    cap = poll.max if poll and poll.max else rt.settings.poll_max
    return timeout, initial, cap


async def _poll_until_running(rt: Runner, ctx: Context, name: StepName, ops: PollStep, key: tuple[str, str], *,
                              state: StepState, attempts: int, last: str | None, started: datetime,
                              deadline: datetime, initial: float, cap: float, polls: int) -> None:
    job = ctx.job
    resource_id = key[1]
    while True:
        slept = False
        try:
            found = await rt.poller.read(key, lambda: ops.fetch(rt.client, job, resource_id))
            await rt.progressed(ctx)
            attempts = 0  # the retry limit counts consecutive failed polls
            if ops.check(found, resource=ops.kind):
                await rt.move(ctx, name, state, StepState.SUCCEEDED, f"{ops.kind} {resource_id} is RUNNING",
                              resource_status=found.status, error=None)
                return
            if found.status != last:
                await rt.move(ctx, name, state, StepState.WAITING, f"{ops.kind} {resource_id} is {found.status}",
                              resource_status=found.status)
                last = found.status
        except (RetryableError, NeedsReconcileError) as exc:
            attempts = await rt.retry(ctx, name, state, attempts, exc)  # waits out Retry-After too
            slept = True
        except TerminalError as exc:
            status = exc.resource_status if isinstance(exc, ResourceFailedError) else last
            await rt.fail(ctx, name, state, exc, resource_status=status)
        now = rt.store.clock()
        if now >= deadline:
            waited = human((now - started).total_seconds())
            message = (f"timed out after {waited} waiting for {ops.kind} {resource_id} to be RUNNING; "
                       f"last status {last or 'unknown'}")
            await rt.fail(ctx, name, state, TerminalError(message, code="fabricflow.timeout"))
        if slept:
            continue
        polls += 1
        delay = poll_delay(polls, initial=initial, cap=cap, rng=rt.rng)
        await rt.sleep(ctx, min(delay, max(0.0, (deadline - now).total_seconds()) + 0.01))


async def invoke(rt: Runner, ctx: Context, name: StepName) -> None:
    """Stream the spec's chat completion from the service instance and record the reply."""
    assert ctx.spec is not None
    job = ctx.job
    step = job.step(name)
    state, attempts = step.state, step.attempts
    instance_id = job.resource_id(StepName.SERVICE_INSTANCE)
    workspace_id = job.resource_id(StepName.WORKSPACE)
    assert instance_id is not None and workspace_id is not None
    if state is StepState.PENDING:
        await rt.move(ctx, name, state, StepState.IN_FLIGHT, f"invoking service instance {instance_id}",
                      resource_id=instance_id)
        state = StepState.IN_FLIGHT
    while True:
        try:
            result = await rt.client.invoke(workspace_id, instance_id, invocation_body(ctx.spec),
                                             on_text=lambda text: rt.observer.on_text(job.id, text))
        except (RetryableError, NeedsReconcileError) as exc:
            attempts = await rt.retry(ctx, name, state, attempts, exc)
            continue
        except TerminalError as exc:
            await rt.fail(ctx, name, state, exc)
        reply = {"reply": result.reply, "finish_reason": result.finish_reason, "usage": result.usage}
        await rt.move(ctx, name, state, StepState.SUCCEEDED,
                      f"reply of {len(result.reply)} characters, finish_reason {result.finish_reason}",
                      resource_status=result.finish_reason, error=None, job_result=reply)
        return


async def check_reused(client: FabricClient, spec: JobSpec) -> None:
    """Raise NotFoundError naming each resource the spec reuses that does not exist."""
    missing = []
    workspace_id = spec.workspace.id if isinstance(spec.workspace, Reuse) else None
    if workspace_id and await client.get_workspace(workspace_id) is None:
        missing.append(f"workspace {workspace_id}")
    elif workspace_id:
        if isinstance(spec.endpoint, Reuse):
            try:
                await client.show_endpoint(workspace_id, spec.endpoint.id)
            except TerminalError as exc:
                if exc.status != 404:
                    raise
                missing.append(f"endpoint {spec.endpoint.id}")
        if isinstance(spec.model, Reuse) and await client.get_model(workspace_id, spec.model.id) is None:
            missing.append(f"model {spec.model.id}")
    if missing:
        raise NotFoundError("; ".join(f"{m} (reused by the spec) does not exist" for m in missing))


def _first_create(ctx: Context, name: StepName) -> bool:
    """True when ``name`` is the job's first create: every create step before it reused."""
    for step in CREATE_STEPS:
        if step is name:
            return True
        if ctx.job.step(step).state is not StepState.SKIPPED:
            return False
    return False


def _own_workspace(job: Job) -> bool:
    """True when this job created its workspace itself (not reused, not adopted)."""
    ws = job.step(StepName.WORKSPACE)
    return ws.state is StepState.SUCCEEDED and not ws.extra.get("adopted") and not ws.extra.get("reused")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _clean(extra: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in extra.items() if v is not None}


def human(seconds: float) -> str:
    """A duration as people write it: 45s, 12m05s, 2h10m."""
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
