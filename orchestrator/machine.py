"""The state machine: every step, step state, job state and allowed transition, in one place.

The engine, the store and the CLI read these tables; none re-declares them. Nothing here awaits
or performs I/O, so every row can be checked by plain unit tests.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

#: Bumped whenever a step, state or transition changes meaning; stored on every job so an
#: upgraded daemon knows which table a job was submitted under.
STATE_TABLE_VERSION = 1

#: The longest a Retry-After header may delay a step, in seconds.
MAX_RETRY_AFTER = 600.0


class StepName(enum.StrEnum):
    """The steps of the procedure, in execution order (see ``STEPS``)."""

    WORKSPACE = "workspace"
    ENDPOINT = "endpoint"
    ENDPOINT_READY = "endpoint_ready"
    MODEL = "model"
    SERVICE_INSTANCE = "service_instance"
    SERVICE_READY = "service_ready"
    INVOCATION = "invocation"


class StepState(enum.StrEnum):
    """Where one step stands."""

    PENDING = "PENDING"  # not started
    IN_FLIGHT = "IN_FLIGHT"  # intent recorded; the request may or may not have reached Fabric
    WAITING = "WAITING"  # resource exists, polling its status
    SUCCEEDED = "SUCCEEDED"  # ID and final status recorded
    SKIPPED = "SKIPPED"  # an existing resource was reused (never torn down)
    FAILED = "FAILED"  # terminal error recorded

    @property
    def is_done(self) -> bool:
        """True when the step needs no more work for the job to move on."""
        return self in (StepState.SUCCEEDED, StepState.SKIPPED)


class JobState(enum.StrEnum):
    """Where a whole job stands."""

    PENDING = "PENDING"  # submitted, no daemon holds it
    RUNNING = "RUNNING"  # held by a daemon under a lease
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """True for states a job never leaves on its own."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(enum.StrEnum):
    """What a job does: create the service, or tear down what another job created."""

    CREATE = "create"
    TEARDOWN = "teardown"


class Action(enum.StrEnum):
    """What a step does to the world."""

    CREATE = "create"  # one create call, guarded by intent + reconciliation
    POLL = "poll"  # read a status until it is final
    INVOKE = "invoke"  # a streamed chat completion
    DELETE = "delete"  # one delete call, then wait until the resource is gone


class ResourceKind(enum.StrEnum):
    """Fabric resource kinds the procedure creates (the emulator's stats use the same names)."""

    WORKSPACE = "workspace"
    ENDPOINT = "endpoint"
    MODEL = "model"
    SERVICE_INSTANCE = "service_instance"


@dataclass(frozen=True, slots=True)
class StepRow:
    """One row of the procedure table."""

    name: StepName
    action: Action
    kind: ResourceKind | None
    done_when: str


STEPS: tuple[StepRow, ...] = (
    StepRow(StepName.WORKSPACE, Action.CREATE, ResourceKind.WORKSPACE, "ID recorded"),
    StepRow(StepName.ENDPOINT, Action.CREATE, ResourceKind.ENDPOINT, "ID and status recorded"),
    StepRow(StepName.ENDPOINT_READY, Action.POLL, ResourceKind.ENDPOINT, "status RUNNING"),
    StepRow(StepName.MODEL, Action.CREATE, ResourceKind.MODEL, "ID and version ID recorded"),
    StepRow(StepName.SERVICE_INSTANCE, Action.CREATE, ResourceKind.SERVICE_INSTANCE, "ID recorded"),
    StepRow(StepName.SERVICE_READY, Action.POLL, ResourceKind.SERVICE_INSTANCE, "status RUNNING"),
    StepRow(StepName.INVOCATION, Action.INVOKE, None, "reply recorded"),
)

STEP_ORDER: tuple[StepName, ...] = tuple(row.name for row in STEPS)
ROWS: dict[StepName, StepRow] = {row.name: row for row in STEPS}

#: A teardown: the creating job's resources, deleted in reverse order, each waited until gone.
TEARDOWN_STEPS: tuple[StepRow, ...] = (
    StepRow(StepName.SERVICE_INSTANCE, Action.DELETE, ResourceKind.SERVICE_INSTANCE, "gone (404/DELETED)"),
    StepRow(StepName.MODEL, Action.DELETE, ResourceKind.MODEL, "gone"),
    StepRow(StepName.ENDPOINT, Action.DELETE, ResourceKind.ENDPOINT, "gone (404/DELETED)"),
    StepRow(StepName.WORKSPACE, Action.DELETE, ResourceKind.WORKSPACE, "gone"),
)
TEARDOWN_ROWS: dict[StepName, StepRow] = {row.name: row for row in TEARDOWN_STEPS}

#: The step table of each kind of job, in execution order.
TABLES: dict[JobKind, tuple[StepRow, ...]] = {JobKind.CREATE: STEPS, JobKind.TEARDOWN: TEARDOWN_STEPS}


def row_of(kind: JobKind, name: StepName) -> StepRow:
    """The table row of a step of a kind of job."""
    return (ROWS if kind is JobKind.CREATE else TEARDOWN_ROWS)[name]


def order_of(kind: JobKind) -> tuple[StepName, ...]:
    """The step names of a kind of job, in execution order."""
    return tuple(row.name for row in TABLES[kind])

#: Legal step-state edges. A self-edge means "same state, new attempt or new status".
STEP_TRANSITIONS: frozenset[tuple[StepState, StepState]] = frozenset(
    {
        (StepState.PENDING, StepState.IN_FLIGHT),
        (StepState.PENDING, StepState.WAITING),
        (StepState.PENDING, StepState.SKIPPED),
        (StepState.PENDING, StepState.FAILED),
        (StepState.IN_FLIGHT, StepState.IN_FLIGHT),
        (StepState.IN_FLIGHT, StepState.SUCCEEDED),
        (StepState.IN_FLIGHT, StepState.SKIPPED),  # a same-named resource adopted by request
        (StepState.IN_FLIGHT, StepState.WAITING),  # a delete was accepted; wait until gone
        (StepState.IN_FLIGHT, StepState.FAILED),
        (StepState.WAITING, StepState.WAITING),
        (StepState.WAITING, StepState.SUCCEEDED),
        (StepState.WAITING, StepState.FAILED),
        (StepState.FAILED, StepState.PENDING),  # `fabricflow retry`
    }
)

#: Legal job-state edges.
JOB_TRANSITIONS: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (JobState.PENDING, JobState.RUNNING),
        (JobState.PENDING, JobState.CANCELLED),
        (JobState.RUNNING, JobState.RUNNING),  # reclaimed by another lease after a crash
        (JobState.RUNNING, JobState.PENDING),  # released by a draining daemon
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.FAILED),
        (JobState.RUNNING, JobState.CANCELLED),
        (JobState.FAILED, JobState.PENDING),  # `fabricflow retry`
        (JobState.CANCELLED, JobState.PENDING),  # `fabricflow retry` of a cancelled job
    }
)


class IllegalTransition(RuntimeError):
    """A bug: somebody asked for an edge the table does not have."""


def check_step_edge(src: StepState, dst: StepState) -> None:
    """Raise ``IllegalTransition`` unless ``src -> dst`` is in ``STEP_TRANSITIONS``."""
    if (src, dst) not in STEP_TRANSITIONS:
        raise IllegalTransition(f"step {src} -> {dst} is not a legal transition")


def check_job_edge(src: JobState, dst: JobState) -> None:
    """Raise ``IllegalTransition`` unless ``src -> dst`` is in ``JOB_TRANSITIONS``."""
    if (src, dst) not in JOB_TRANSITIONS:
        raise IllegalTransition(f"job {src} -> {dst} is not a legal transition")


def next_step(
    states: dict[StepName, StepState], order: tuple[StepName, ...] = STEP_ORDER
) -> StepName | None:
    """The first step, in table order, that is not done; None when all are."""
    for name in order:
        if not states[name].is_done:
            return name
    return None


# --- outcomes and decide() -----------------------------------------------------------------


class OutcomeKind(enum.StrEnum):
    """What a step attempt came back with."""

    SUCCEEDED = "succeeded"  # the step's goal is met
    STILL_WAITING = "still_waiting"  # polled, resource not final yet
    RETRYABLE = "retryable"  # transient failure, nothing changed remotely (or safe to resend)
    UNKNOWN = "unknown"  # outcome unknown: reconcile before resending
    TERMINAL = "terminal"  # give up: the step and the job fail


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``decide`` says happens next to a step."""

    state: StepState
    attempts: int
    run_after: datetime | None
    job_state: JobState | None = None  # set when the job leaves RUNNING because of this step


def decide(
    row: StepRow,
    current: StepState,
    outcome: OutcomeKind,
    *,
    attempts: int,
    now: datetime,
    max_attempts: int,
    retry_after: float | None = None,
    poll_delay: float = 0.0,
    backoff_base: float = 1.0,
    backoff_cap: float = 30.0,
    rng: random.Random | None = None,
) -> Decision:
    """Map a step outcome to the next step state, attempt count and earliest next run.

    The three failure edges are uniform for every row: a retryable (or unknown-outcome) error
    keeps the step where it is and bumps ``attempts`` until ``max_attempts``; a terminal error
    fails the step and the job.
    """
    decision = _decide(row, current, outcome, attempts=attempts, now=now, max_attempts=max_attempts,
                       retry_after=retry_after, poll_delay=poll_delay, backoff_base=backoff_base,
                       backoff_cap=backoff_cap, rng=rng)
    check_step_edge(current, decision.state)  # decide() only ever produces edges of the table
    return decision


def _decide(
    row: StepRow, current: StepState, outcome: OutcomeKind, *, attempts: int, now: datetime,
    max_attempts: int, retry_after: float | None, poll_delay: float, backoff_base: float,
    backoff_cap: float, rng: random.Random | None,
) -> Decision:
    if outcome is OutcomeKind.SUCCEEDED:
        return Decision(StepState.SUCCEEDED, attempts, None)
    if outcome is OutcomeKind.STILL_WAITING:
        if row.action is not Action.POLL:
            raise IllegalTransition(f"{row.name} does not poll")
        return Decision(StepState.WAITING, attempts, now + timedelta(seconds=poll_delay))
    if outcome is OutcomeKind.TERMINAL:
        return Decision(StepState.FAILED, attempts, None, JobState.FAILED)
    # Retryable and unknown outcomes: the step stays in its in-progress state.
    tries = attempts + 1
    if tries >= max_attempts:
        return Decision(StepState.FAILED, tries, None, JobState.FAILED)
    delay = backoff(tries, base=backoff_base, cap=backoff_cap, rng=rng)
    if retry_after is not None:
        # Honour the server's Retry-After, but never let one header park a step for hours.
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    stay = current if current is not StepState.PENDING else _in_progress_state(row)
    return Decision(stay, tries, now + timedelta(seconds=delay))


def _in_progress_state(row: StepRow) -> StepState:
    return StepState.WAITING if row.action is Action.POLL else StepState.IN_FLIGHT


def backoff(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """Capped exponential backoff with full jitter on the upper half: base * 2**(attempt-1)."""
    exponent = min(max(0, attempt - 1), 64)  # past 2**64 the cap wins anyway; avoids overflow
    ceiling = min(cap, base * (2.0**exponent))
    jitter = (rng or random).uniform(0.5, 1.0)
    return ceiling * jitter


def poll_interval(polls: int, *, initial: float, cap: float) -> float:
    """The interval before poll ``polls + 1``, without jitter: ``initial`` doubling to ``cap``."""
    exponent = min(max(0, polls - 1), 64)
    return min(cap, initial * (2.0**exponent))


def poll_delay(polls: int, *, initial: float, cap: float, rng: random.Random | None = None) -> float:
    """The wait before the next status poll: ``initial`` doubling to ``cap``, jitter only added.

    Unlike ``backoff``, jitter never shortens the wait (up to a quarter longer): the configured
    interval is a floor, so a resource is never read more often than configured.
    """
    return poll_interval(polls, initial=initial, cap=cap) * (rng or random).uniform(1.0, 1.25)


def polls_made(elapsed: float, *, initial: float, cap: float) -> int:
    """How many polls the schedule (without its jitter) has made ``elapsed`` seconds into a wait.

    A wait resumed after a restart goes on from there instead of starting its ramp again: after
    an hour of waiting, the next poll comes at the cap's pace, not after one second, two, four.
    """
    polls, spent = 0, 0.0
    while True:
        step = poll_interval(polls, initial=initial, cap=cap)  # the gap before poll polls + 1
        if spent + step > elapsed:
            return polls
        if step >= cap:  # at the cap from here on: the rest is arithmetic
            return polls + int((elapsed - spent) // cap)
        polls, spent = polls + 1, spent + step
