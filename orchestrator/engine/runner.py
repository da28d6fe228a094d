"""Runner: drives jobs through their step tables, committing every step before and after it acts.

The step logic lives in ``procedure`` (create the service) and ``teardown`` (delete what a job
created); this module holds what they share: the loop over steps, the failure edges of
``machine.decide``, cancellation and draining at safe points, and the whole-job timeout.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from collections.abc import Callable
from typing import Any, Protocol

from orchestrator.config import Settings
from orchestrator.domain import Job
from orchestrator.engine.poller import SharedPoller
from orchestrator.errors import FabricError, NeedsReconcileError, StaleTransition
from orchestrator.fabric.client import FabricClient, last_request_id, retry_reason
from orchestrator.logs import bound, get_logger
from orchestrator.machine import (
    Action,
    JobKind,
    JobState,
    OutcomeKind,
    StepName,
    StepState,
    decide,
    next_step,
    row_of,
)
from orchestrator.spec import JobSpec
from orchestrator.store.jobs import JobStore
from orchestrator.store.ops import JobEnd, StepMove, applied

log = get_logger(__name__)  # structlog if configured, else stdlib logging: never stdout


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
    teardown_timeout: float = 30 * 60.0
    attempts_per_step: tuple[tuple[str, int], ...] = ()
    max_runs: int = 10  # runs in a row without progress before a job is failed as poison
    lease_seconds: float = 30.0
    settle_seconds: float = 120.0  # after an unknown outcome, look this long before creating again
    look_interval: float = 5.0  # between look-ups in the settle window (doubling, capped at 4x)
    final_sweep: bool = True  # at the job's end, delete extra resources carrying its marker

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineSettings:
        """Take the runner's knobs from Settings."""
        return cls(poll_initial=settings.poll.initial, poll_max=settings.poll.max,
                   max_attempts=settings.retry.max_attempts, backoff_base=settings.retry.backoff_base,
                   backoff_cap=settings.retry.backoff_cap,
                   attempts_per_step=tuple(sorted(settings.retry.per_step.items())),
                   max_runs=settings.daemon.max_recoveries, lease_seconds=settings.daemon.lease_seconds,
                   settle_seconds=settings.reconcile.settle_seconds,
                   look_interval=settings.reconcile.look_interval,
                   final_sweep=settings.reconcile.final_sweep)

    def attempts_for(self, step: StepName) -> int:
        """The retry limit of one step: its override, or ``max_attempts``."""
        return dict(self.attempts_per_step).get(str(step), self.max_attempts)


class StopSignal(asyncio.Event):
    """The runner's stop signal: an ``asyncio.Event`` that also wakes every sleeping job."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Callable[[], None]] = []

    def on_set(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` when the signal is set."""
        self._hooks.append(hook)

    def set(self) -> None:
        """Set the event and run the hooks."""
        super().set()
        for hook in self._hooks:
            hook()


class Released(Exception):
    """The runner stopped at a safe point because its daemon is draining."""


class Cancelled(Exception):
    """The job's cancellation was requested; it stopped at a safe point."""


class StepFailed(Exception):
    """A step failed for good; the job fails with ``error``."""

    def __init__(self, step: StepName | None, error: dict[str, Any], *, recorded: bool = False) -> None:
        super().__init__(error.get("message"))
        self.step = step
        self.error = error
        self.recorded = recorded  # the job is already FAILED in the database


class CancelFlag:
    """A job's cancel request, read at its safe points.

    Nothing awaits it (a sleeping job is woken through its sleeper), so it is a bare flag: an
    ``asyncio.Event`` would cost each of thousands of waiting jobs a deque it never uses.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(slots=True)
class Context:
    """One job's run: its snapshot, parsed spec, deadline and cancellation signal.

    ``staged`` holds a finished step's transition until the job's next write, which commits it
    in the same transaction: a step's end and the next step's start (its intent, before any
    create request) cost one commit, not two, and the last step's end is the job's end.

    ``spec`` is parsed on first use. A job about to wait a long time ``shelve``s it: only the
    spec's JSON stays (0.9 KB for the quick start's, against 8 KB parsed), parsed again (about
    20 us) when a later step reads it, so ten thousand jobs waiting on their endpoints do not
    hold ten thousand models.
    """

    job: Job
    cancel: CancelFlag
    deadline: datetime | None = None
    unproven: bool = True  # this run has not yet had a useful answer from Fabric
    staged: list[StepMove] = field(default_factory=list)
    staged_result: dict[str, Any] | None = None
    request_ids: dict[int, str] = field(default_factory=dict)  # id(move): Fabric's X-Request-Id, for the log
    spec_json: str | None = None  # the spec as submitted (compact JSON), for parsing again
    parsed: JobSpec | None = None

    @property
    def spec(self) -> JobSpec | None:
        if self.parsed is None and self.spec_json is not None:
            self.parsed = JobSpec.model_validate(json.loads(self.spec_json))  # as first parsed: from a dict
        return self.parsed

    def shelve(self) -> None:
        """Drop the parsed spec until a step reads it again."""
        if self.spec_json is not None:
            self.parsed = None


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
        stop: StopSignal | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.owner = owner
        self.settings = settings
        self.poller = poller or SharedPoller(min_interval=min(settings.poll_initial, 1.0))
        self.observer: Observer = observer or NullObserver()
        self.stop = stop or StopSignal()
        self.rng = rng or random.Random()
        self._cancels: dict[str, asyncio.Event] = {}
        self._sleepers: dict[str, asyncio.Future[None]] = {}  # a sleeping job's wake-up
        self.stop.on_set(self._wake_all)

    def active(self) -> list[str]:
        """IDs of the jobs this runner is running right now."""
        return list(self._cancels)

    def request_cancel(self, job_id: str) -> None:
        """Wake the job's runner: it ends CANCELLED at its next safe point."""
        event = self._cancels.get(job_id)
        if event is not None:
            event.set()
            self._wake(job_id)

    def _wake(self, job_id: str) -> None:
        sleeper = self._sleepers.get(job_id)
        if sleeper is not None and not sleeper.done():
            sleeper.set_result(None)

    def _wake_all(self) -> None:
        for job_id in list(self._sleepers):
            self._wake(job_id)

    async def run(self, job: Job | str) -> JobState:
        """Advance a job this runner's owner has claimed until it ends or the runner is asked
        to stop; returns its state. Pass the snapshot the claim returned (or an ID to read)."""
        if isinstance(job, str):
            job = await self.store.get(job)
        job_id = job.id
        if job.state is not JobState.RUNNING or job.lease_owner != self.owner:
            return job.state
        cancel = self._cancels.setdefault(job_id, CancelFlag())
        try:
            with bound(job_id=job_id):
                return await self._run(job, cancel)
        except StaleTransition:
            current = await self.store.get(job_id)
            if current.state is JobState.RUNNING and current.lease_owner == self.owner:
                # A compare-and-set lost a race although the lease is still ours: hand the job back
                # so that a runner starts afresh, rather than hold it with nobody running it.
                await self.store.release(job_id, self.owner, detail="released after a conflicting write")
                return JobState.PENDING
            # Another daemon took the job over (our lease lapsed): it is theirs now; stop quietly.
            log.warning("job_lease_lost", job_id=job_id)
            return current.state
        finally:
            self._cancels.pop(job_id, None)

    async def _run(self, job: Job, cancel: CancelFlag) -> JobState:
        from orchestrator.engine import procedure, teardown

        try:
            ctx = Context(job, cancel)
            if job.kind is JobKind.CREATE:
                ctx.parsed = JobSpec.model_validate(job.spec)  # no local name: shelving must free it
                # The parsed spec is what the steps read; its compact JSON is kept to parse again
                # after a shelved wait. The snapshot is this run's own (from its claim), so its
                # raw dict goes: kept, it would double a waiting job's memory.
                ctx.spec_json = json.dumps(job.spec, separators=(",", ":"), ensure_ascii=False)
                job.spec.clear()
                if (limit := ctx.parsed.timeouts.job) is not None:
                    ctx.deadline = (job.started_at or self.store.clock()) + timedelta(seconds=limit)
            else:
                await teardown.wait_for_parent(self, ctx)
            order = job.order
            while (name := next_step({n: s.state for n, s in ctx.job.steps.items()}, order)) is not None:
                # A create left IN_FLIGHT by an earlier run may still land: its step settles first
                # (and stops at its own safe point before any create), however soon a cancel came.
                unsettled = job.kind is JobKind.CREATE and ctx.job.steps[name].state is StepState.IN_FLIGHT \
                    and row_of(job.kind, name).action is Action.CREATE
                self.checkpoint(ctx, name, cancellable=not unsettled)
                failed_step = ctx.job.steps[name]
                if failed_step.state is StepState.FAILED:  # written by an older fabricflow, or by hand
                    raise StepFailed(name, failed_step.error or {"code": "fabricflow.failed", "message":
                                     f"step {name} is FAILED", "request_id": None})
                with bound(step=str(name)):
                    if job.kind is JobKind.CREATE:
                        await procedure.advance(self, ctx, name)
                    else:
                        await teardown.advance(self, ctx, name)
        except StepFailed as failed:
            if not failed.recorded:
                await self._sweep(ctx)
                where = f"step {failed.step} failed: " if failed.step else ""
                await self.end(ctx, JobEnd(JobState.FAILED, f"{where}{failed.error['message']}",
                                           {"error": failed.error}))
            else:
                await self._sweep(ctx)  # the job is FAILED already; its duplicates go all the same
            log.info("job_transitioned", to="FAILED", step=str(failed.step))
            return JobState.FAILED
        except Cancelled:
            step = next_step({n: s.state for n, s in ctx.job.steps.items()}, ctx.job.order)
            await self._sweep(ctx)
            await self.end(ctx, JobEnd(JobState.CANCELLED, f"cancelled at a safe point (at step {step})",
                                       {"error": None}))
            log.info("job_transitioned", to="CANCELLED", step=str(step) if step else None)
            return JobState.CANCELLED
        except Released:
            await self.end(ctx, JobEnd(JobState.PENDING, f"released by {self.owner} (shutting down)"))
            log.info("job_released")
            return JobState.PENDING
        await self._sweep(ctx)
        await self.end(ctx, JobEnd(JobState.SUCCEEDED, "all steps succeeded", {"error": None}))
        log.info("job_transitioned", to="SUCCEEDED", step=str(order[-1]) if order else None)
        return JobState.SUCCEEDED

    async def _sweep(self, ctx: Context) -> None:
        """The final sweep of a creating job (``procedure.sweep``), when configured; the ending
        job's outcome never depends on it."""
        if ctx.job.kind is not JobKind.CREATE or not self.settings.final_sweep or ctx.spec is None:
            return
        from orchestrator.engine import procedure

        try:
            await procedure.sweep(self, ctx)
        except FabricError as exc:
            log.warning("final_sweep_failed", error=exc.message)

    async def end(self, ctx: Context, end: JobEnd) -> None:
        """The job leaves RUNNING, in one transaction with its staged step transitions."""
        staged, result = ctx.staged, ctx.staged_result
        await self.store.commit(ctx.job.id, self.owner, staged, end=end, result=result)
        ctx.staged, ctx.staged_result = [], None
        self._report(ctx, staged)

    def checkpoint(self, ctx: Context, name: StepName | None, *, cancellable: bool = True) -> None:
        """A safe point: stop here if asked to drain, cancel (unless not ``cancellable``), or out
        of time."""
        if self.stop.is_set():
            raise Released
        if cancellable and (ctx.cancel.is_set() or ctx.job.cancel_requested_at is not None):
            raise Cancelled
        if ctx.deadline is not None and self.store.clock() >= ctx.deadline:
            assert ctx.spec is not None
            message = (f"job timed out: timeouts.job ({ctx.spec.timeouts.job:.0f}s) elapsed"
                       + (f" at step {name}" if name else ""))
            raise StepFailed(None, {"code": "fabricflow.job_timeout", "message": message, "request_id": None})

    # --- shared step plumbing ----------------------------------------------------------------

    async def progressed(self, ctx: Context) -> None:
        """Fabric answered usefully: this run is not one more interrupted run (poison count)."""
        if ctx.unproven:
            await self.store.mark_progress(ctx.job.id, self.owner)
            ctx.unproven = False

    async def move(self, ctx: Context, name: StepName, src: StepState, dst: StepState, detail: str, *,
                   job_result: dict[str, Any] | None = None, renew: bool = False, fail_job: bool = False,
                   **fields: Any) -> None:
        """A step transition (compare-and-set under the lease), reported once committed.

        A step's end (SUCCEEDED, SKIPPED) is staged: it commits with the job's next write, which
        always comes before any further request that could create something. Every other
        transition commits now, with whatever is staged. ``renew`` extends the lease in the
        same transaction (an intent right before a create); ``fail_job`` ends the job FAILED.
        """
        move = StepMove(name, src, dst, detail, fields)
        ctx.staged.append(move)
        request_id = (fields.get("error") or {}).get("request_id") or last_request_id.get()
        if request_id and dst is not StepState.IN_FLIGHT:  # the answer this transition records
            ctx.request_ids[id(move)] = request_id
            last_request_id.set(None)
        if job_result is not None:
            ctx.staged_result = job_result
        if dst in (StepState.SUCCEEDED, StepState.SKIPPED) and not fail_job:
            ctx.job = applied(ctx.job, [move], at=self.store.clock())
            return
        staged, result = ctx.staged, ctx.staged_result
        end = (JobEnd(JobState.FAILED, f"step {name} failed: {detail}", {"error": fields.get("error")})
               if fail_job else None)
        await self.store.commit(ctx.job.id, self.owner, staged, end=end, result=result,
                                renew=self.settings.lease_seconds if renew else None)
        ctx.staged, ctx.staged_result = [], None
        ctx.job = applied(ctx.job, [move], at=self.store.clock())  # the staged ones already were
        ctx.unproven = False  # a committed transition resets the poison count too
        self._report(ctx, staged)

    async def flush(self, ctx: Context) -> None:
        """Commit the staged step ends now (before an action that must come after them)."""
        if ctx.staged:
            staged, result = ctx.staged, ctx.staged_result
            await self.store.commit(ctx.job.id, self.owner, staged, result=result)
            ctx.staged, ctx.staged_result = [], None
            self._report(ctx, staged)

    def _report(self, ctx: Context, committed: list[StepMove]) -> None:
        for move in committed:
            log.info("step_transitioned", step=str(move.name), **{"from": str(move.expected), "to": str(move.to)},
                     detail=move.detail, request_id=ctx.request_ids.pop(id(move), None))
            self.observer.on_step(ctx.job, move.name, move.to, move.detail)

    async def retry(self, ctx: Context, name: StepName, state: StepState, attempts: int,
                    exc: FabricError, *, cancellable: bool = True) -> int:
        """The retryable/unknown-outcome edge: bump attempts, record why, back off (a requested
        cancel cuts the back-off short unless ``cancellable`` is False: see ``sleep``)."""
        kind = OutcomeKind.UNKNOWN if isinstance(exc, NeedsReconcileError) else OutcomeKind.RETRYABLE
        on_retry = getattr(self.observer, "on_retry", None)  # a daemon's metrics
        if on_retry is not None:
            on_retry("step", retry_reason(exc))
        now = self.store.clock()
        decision = decide(row_of(ctx.job.kind, name), state, kind, attempts=attempts, now=now,
                          max_attempts=self.settings.attempts_for(name),
                          retry_after=exc.retry_after, backoff_base=self.settings.backoff_base,
                          backoff_cap=self.settings.backoff_cap, rng=self.rng)
        if decision.state is StepState.FAILED:
            exc.message = f"gave up after {decision.attempts} attempts: {exc.message}"
            await self.fail(ctx, name, state, exc, attempts=decision.attempts)
        delay = ((decision.run_after or now) - now).total_seconds()
        what = "outcome unknown, will reconcile" if kind is OutcomeKind.UNKNOWN else "transient"
        await self.move(ctx, name, state, decision.state,
                        f"attempt {decision.attempts} failed ({what}): {exc.message}; retrying in {delay:.1f}s",
                        attempts=decision.attempts, run_after=decision.run_after, error=exc.as_dict())
        await self.sleep(ctx, delay, cancellable=cancellable)
        return decision.attempts

    async def fail(self, ctx: Context, name: StepName, state: StepState, exc: FabricError, **fields: Any) -> None:
        """The terminal edge: the step fails, and with it the job."""
        error = exc.as_dict()
        await self.move(ctx, name, state, StepState.FAILED, exc.message, error=error, fail_job=True, **fields)
        log.info("job_transitioned", to="FAILED", step=str(name))
        raise StepFailed(name, error, recorded=True)

    async def sleep(self, ctx: Context, seconds: float, *, cancellable: bool = True) -> None:
        """Sleep; wake early at this safe point to drain, cancel, or end a timed-out job.

        ``cancellable=False``: a requested cancel does not end this sleep (a settle window,
        which must run its course before the job may stop); draining and the timeout still do.
        """
        if ctx.deadline is not None:
            seconds = min(seconds, max(0.0, (ctx.deadline - self.store.clock()).total_seconds()))
        cancelled = ctx.cancel.is_set() and cancellable
        if seconds > 0 and not (self.stop.is_set() or cancelled):
            # One future and one timer per sleep, woken by a cancel or the stop signal: a daemon
            # with thousands of jobs waiting keeps no helper tasks per sleep.
            loop = asyncio.get_running_loop()
            sleeper: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(seconds, lambda: sleeper.done() or sleeper.set_result(None))
            self._sleepers[ctx.job.id] = sleeper
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleepers.pop(ctx.job.id, None)
        if cancellable:
            self.checkpoint(ctx, None)
        elif self.stop.is_set():
            raise Released
