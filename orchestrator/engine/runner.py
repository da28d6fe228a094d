"""Runner: drives one job through the procedure, committing every step before and after it acts.

The exactly-once protocol for creates (DESIGN.md): commit the intent (IN_FLIGHT with the exact
name), look the resource up by exact name and ownership marker, adopt a single match or create
only if there is none, then commit the returned ID. A crash anywhere leaves a state this loop
resumes from without a second create.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import structlog

from orchestrator.config import Settings
from orchestrator.domain import Job, ownership_marker
from orchestrator.engine.poller import SharedPoller
from orchestrator.engine.steps import CREATE_STEPS, POLL_STEPS, CreateStep, Found, PollStep, invocation_body
from orchestrator.errors import FabricError, NeedsReconcileError, RetryableError, TerminalError
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import ROWS, Action, JobState, OutcomeKind, StepName, StepState, backoff, decide, next_step
from orchestrator.spec import JobSpec
from orchestrator.store.jobs import JobStore

log = structlog.get_logger(__name__)


class Observer(Protocol):
    """Receives progress as it happens (``fabricflow run`` prints it)."""

    def on_step(self, job: Job, step: StepName, state: StepState, detail: str) -> None: ...

    def on_text(self, job_id: str, text: str) -> None: ...


class NullObserver:
    """Progress goes to the logs only."""

    def on_step(self, job: Job, step: StepName, state: StepState, detail: str) -> None:
        pass

    def on_text(self, job_id: str, text: str) -> None:
        pass


@dataclass(frozen=True)
class EngineSettings:
    """The knobs of the runner's loops."""

    poll_initial: float = 1.0
    poll_max: float = 30.0
    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_cap: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineSettings:
        """Take the runner's knobs from Settings."""
        return cls(poll_initial=settings.poll.initial, poll_max=settings.poll.max,
                   max_attempts=settings.retry.max_attempts, backoff_base=settings.retry.backoff_base,
                   backoff_cap=settings.retry.backoff_cap)


class Released(Exception):
    """The runner stopped at a safe point because its daemon is draining."""


class StepFailed(Exception):
    """A step failed for good; the job fails with ``error``."""

    def __init__(self, step: StepName, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.step = step
        self.error = error


class Runner:
    """Runs jobs this process holds the lease of."""

    def __init__(
        self,
        store: JobStore,
        client: FabricClient,
        *,
        owner: str,
        settings: EngineSettings = EngineSettings(),
        poller: SharedPoller | None = None,
        observer: Observer | None = None,
        stop: asyncio.Event | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.owner = owner
        self.settings = settings
        self.poller = poller or SharedPoller(min_interval=min(settings.poll_initial, 1.0))
        self.observer: Observer = observer or NullObserver()
        self.stop = stop or asyncio.Event()
        self.rng = rng or random.Random()

    async def run(self, job_id: str) -> JobState:
        """Advance the job until it ends or the runner is asked to stop; returns its state."""
        job = await self.store.get(job_id)
        if job.state is not JobState.RUNNING or job.lease_owner != self.owner:
            return job.state
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                spec = JobSpec.model_validate(job.spec)
                while (name := next_step({n: s.state for n, s in job.steps.items()})) is not None:
                    if self.stop.is_set():
                        raise Released
                    with structlog.contextvars.bound_contextvars(step=str(name)):
                        await self._advance(job, spec, name)
                    job = await self.store.get(job_id)
            except StepFailed as failed:
                await self.store.finish(job_id, self.owner, JobState.FAILED, error=failed.error,
                                        detail=f"step {failed.step} failed: {failed.error['message']}")
                log.info("job_transitioned", to="FAILED", step=str(failed.step))
                return JobState.FAILED
            except Released:
                await self.store.release(job_id, self.owner, detail=f"released by {self.owner} (shutting down)")
                log.info("job_released")
                return JobState.PENDING
            await self.store.finish(job_id, self.owner, JobState.SUCCEEDED, detail="all steps succeeded")
            log.info("job_transitioned", to="SUCCEEDED")
            return JobState.SUCCEEDED

    # --- one step ---------------------------------------------------------------------------

    async def _advance(self, job: Job, spec: JobSpec, name: StepName) -> None:
        action = ROWS[name].action
        if action is Action.CREATE:
            await self._create(job, spec, name, CREATE_STEPS[name])
        elif action is Action.POLL:
            await self._wait(job, spec, name, POLL_STEPS[name])
        else:
            await self._invoke(job, spec, name)

    async def _move(self, job: Job, name: StepName, src: StepState, dst: StepState, detail: str,
                    **fields: Any) -> None:
        await self.store.move_step(job.id, self.owner, name, expected=src, to=dst, detail=detail, **fields)
        log.info("step_transitioned", **{"from": str(src), "to": str(dst)}, detail=detail)
        self.observer.on_step(job, name, dst, detail)

    async def _create(self, job: Job, spec: JobSpec, name: StepName, ops: CreateStep) -> None:
        step = job.step(name)
        reuse_id = ops.reuse(spec)
        if reuse_id is not None:
            await self._reuse(job, name, ops, reuse_id)
            return
        request_name = getattr(spec, ops.spec_key).name
        state, attempts = step.state, step.attempts
        if state is StepState.PENDING:
            await self._move(job, name, state, StepState.IN_FLIGHT,
                             f"intent: create {ops.kind} {request_name!r}", request_name=request_name)
            state = StepState.IN_FLIGHT
        marker = ownership_marker(job.id)
        while True:
            try:
                matches = await ops.find(self.client, job, request_name)
                ours = [m for m in matches if marker in (m.description or "")]
                if len(ours) > 1:
                    ids = ", ".join(m.id for m in ours)
                    raise TerminalError(f"several {ops.kind}s named {request_name!r} carry this job's "
                                        f"marker {marker}: {ids}; delete the extra ones and retry the job",
                                        code="fabricflow.duplicates")
                if ours:
                    await self._done(job, name, state, ours[0],
                                     f"found {ops.kind} {ours[0].id} created earlier by this job; adopted")
                    return
                if matches:
                    await self._existing(job, spec, name, ops, request_name, matches)
                    return
                created = await ops.create(self.client, job, ops.body(job, spec))
                await self._done(job, name, state, created, f"created {ops.kind} {created.id}")
                return
            except (RetryableError, NeedsReconcileError) as exc:
                attempts = await self._retry(job, name, state, attempts, exc)
            except TerminalError as exc:
                await self._fail(job, name, state, exc)

    async def _done(self, job: Job, name: StepName, src: StepState, found: Found, detail: str) -> None:
        await self._move(job, name, src, StepState.SUCCEEDED, detail, resource_id=found.id,
                         resource_status=found.status, extra=_clean(found.extra), error=None)

    async def _existing(self, job: Job, spec: JobSpec, name: StepName, ops: CreateStep,
                        request_name: str, matches: list[Found]) -> None:
        ids = ", ".join(m.id for m in matches)
        if spec.on_existing == "adopt" and len(matches) == 1:
            found = matches[0]
            await self._move(job, name, StepState.IN_FLIGHT, StepState.SKIPPED,
                             f"adopted existing {ops.kind} {found.id} (on_existing: adopt); it will "
                             "never be torn down", resource_id=found.id, resource_status=found.status,
                             extra={**_clean(found.extra), "adopted": True})
            return
        hint = "" if len(matches) == 1 else " (several; adopt needs exactly one)"
        raise TerminalError(
            f"a {ops.kind} named {request_name!r} already exists ({ids}) and was not created by "
            f"this job{hint}; rename it in the spec, or set on_existing: adopt to use it",
            code="fabricflow.conflict")

    async def _reuse(self, job: Job, name: StepName, ops: CreateStep, resource_id: str) -> None:
        state = job.step(name).state
        found: Found | None = Found(resource_id)
        if ops.get is not None:
            try:
                found = await ops.get(self.client, job, resource_id)
            except FabricError as exc:
                raise StepFailed(name, exc.as_dict()) from None
        if found is None:
            message = f"{ops.kind} {resource_id} (reused by the spec) does not exist"
            await self._move(job, name, state, StepState.FAILED, message,
                             error={"code": "fabricflow.not_found", "message": message, "request_id": None})
            raise StepFailed(name, {"code": "fabricflow.not_found", "message": message, "request_id": None})
        await self._move(job, name, state, StepState.SKIPPED, f"reusing {ops.kind} {resource_id}",
                         resource_id=resource_id, resource_status=found.status, extra={"reused": True})

    async def _wait(self, job: Job, spec: JobSpec, name: StepName, ops: PollStep) -> None:
        source = job.step(ops.source)
        resource_id = source.resource_id
        assert resource_id is not None
        step = job.step(name)
        state, attempts, last = step.state, step.attempts, step.resource_status or source.resource_status
        timeout = spec.timeouts.endpoint_ready if name is StepName.ENDPOINT_READY else spec.timeouts.service_ready
        if state is StepState.PENDING:
            await self._move(job, name, state, StepState.WAITING, f"waiting for {ops.kind} {resource_id} "
                             f"to be RUNNING (up to {_human(timeout)})", resource_id=resource_id,
                             resource_status=last)
            state = StepState.WAITING
            started = self.store.clock()
        else:
            started = step.started_at or self.store.clock()
        deadline = started + timedelta(seconds=timeout)
        polls = 0
        key = (ops.kind, resource_id)
        while True:
            try:
                found = await self.poller.read(key, lambda: ops.fetch(self.client, job, resource_id))
                if ops.check(found, resource=ops.kind):
                    self.poller.forget(key)
                    await self._move(job, name, state, StepState.SUCCEEDED, f"{ops.kind} {resource_id} "
                                     "is RUNNING", resource_status=found.status, error=None)
                    return
                if found.status != last:
                    await self._move(job, name, state, StepState.WAITING,
                                     f"{ops.kind} {resource_id} is {found.status}", resource_status=found.status)
                    last = found.status
            except (RetryableError, NeedsReconcileError) as exc:
                attempts = await self._retry(job, name, state, attempts, exc, sleep=False)
            except TerminalError as exc:
                await self._fail(job, name, state, exc, resource_status=_status_of(exc, last))
            now = self.store.clock()
            if now >= deadline:
                waited = _human((now - started).total_seconds())
                message = (f"timed out after {waited} waiting for {ops.kind} {resource_id} to be RUNNING; "
                           f"last status {last or 'unknown'}")
                await self._fail(job, name, state, TerminalError(message, code="fabricflow.timeout"))
            polls += 1
            delay = backoff(polls, base=self.settings.poll_initial, cap=self.settings.poll_max, rng=self.rng)
            await self._sleep(min(delay, max(0.0, (deadline - now).total_seconds()) + 0.01))

    async def _invoke(self, job: Job, spec: JobSpec, name: StepName) -> None:
        step = job.step(name)
        state, attempts = step.state, step.attempts
        instance_id = job.resource_id(StepName.SERVICE_INSTANCE)
        workspace_id = job.resource_id(StepName.WORKSPACE)
        assert instance_id is not None and workspace_id is not None
        if state is StepState.PENDING:
            await self._move(job, name, state, StepState.IN_FLIGHT, f"invoking service instance {instance_id}",
                             resource_id=instance_id)
            state = StepState.IN_FLIGHT
        while True:
            try:
                result = await self.client.invoke(workspace_id, instance_id, invocation_body(spec),
                                                  on_text=lambda text: self.observer.on_text(job.id, text))
            except (RetryableError, NeedsReconcileError) as exc:
                attempts = await self._retry(job, name, state, attempts, exc)
                continue
            except TerminalError as exc:
                await self._fail(job, name, state, exc)
            reply = {"reply": result.reply, "finish_reason": result.finish_reason, "usage": result.usage}
            await self._move(job, name, state, StepState.SUCCEEDED,
                             f"reply of {len(result.reply)} characters, finish_reason {result.finish_reason}",
                             resource_status=result.finish_reason, error=None, job_result=reply)
            return

    # --- failure edges ----------------------------------------------------------------------

    async def _retry(self, job: Job, name: StepName, state: StepState, attempts: int,
                     exc: FabricError, *, sleep: bool = True) -> int:
        kind = OutcomeKind.UNKNOWN if isinstance(exc, NeedsReconcileError) else OutcomeKind.RETRYABLE
        now = self.store.clock()
        decision = decide(ROWS[name], state, kind, attempts=attempts, now=now,
                          max_attempts=self.settings.max_attempts, retry_after=exc.retry_after,
                          backoff_base=self.settings.backoff_base, backoff_cap=self.settings.backoff_cap,
                          rng=self.rng)
        if decision.state is StepState.FAILED:
            exc.message = f"gave up after {decision.attempts} attempts: {exc.message}"
            await self._fail(job, name, state, exc, attempts=decision.attempts)
        delay = ((decision.run_after or now) - now).total_seconds()
        what = "outcome unknown, will reconcile" if kind is OutcomeKind.UNKNOWN else "transient"
        await self._move(job, name, state, decision.state,
                         f"attempt {decision.attempts} failed ({what}): {exc.message}; retrying in {delay:.1f}s",
                         attempts=decision.attempts, run_after=decision.run_after, error=exc.as_dict())
        if sleep:
            await self._sleep(delay)
        return decision.attempts

    async def _fail(self, job: Job, name: StepName, state: StepState, exc: FabricError, **fields: Any) -> None:
        error = exc.as_dict()
        await self._move(job, name, state, StepState.FAILED, exc.message, error=error, **fields)
        raise StepFailed(name, error)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early (and stopping at this safe point) if the daemon drains."""
        if seconds <= 0:
            if self.stop.is_set():
                raise Released
            return
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise Released


def _clean(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if v is not None}


def _status_of(exc: FabricError, last: str | None) -> str | None:
    message = exc.message
    for status in ("CREATE_FAILED", "FAILED", "FROZEN", "INACTIVE", "DELETED", "DELETING", "STOPPED"):
        if f" is {status}" in message:
            return status
    return last


def _human(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


