"""The write operations of the hot path, one definition for both backends.

Each operation is a generator run by the store's ``Writer``: it yields ``Sql`` statements,
receives each one's ``Result`` and returns its value (or raises ``StaleTransition``, which
rolls back that operation alone). The SQL is plain enough for SQLite and PostgreSQL alike;
``{now}`` and ``{until}`` are the database's clock and a lease's end, ``{ids}`` a JSON list
parameter ``:ids`` seen as rows, and ``{skip_locked}`` PostgreSQL's row locking for claims.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime, timedelta
from typing import Any, TypeVar

from orchestrator.domain import Job, Step
from orchestrator.errors import StaleTransition
from orchestrator.machine import (
    STATE_TABLE_VERSION,
    JobKind,
    JobState,
    StepName,
    StepState,
    check_job_edge,
    check_step_edge,
    order_of,
)
from orchestrator.spec import SPEC_VERSION
from orchestrator.store.readonly import as_utc, job_from_row
from orchestrator.store.writer import Dialect, Op, Sql

# Yielded with defer=True everywhere: no operation reads its result, so the SQLite writer may
# insert a whole batch's events in one executemany before COMMIT (see SQLiteWriter._commit).
_EVENT = ("INSERT INTO events (job_id, at, step, from_state, to_state, detail) "
          "VALUES (:job_id, :at, :step, :src, :dst, :detail)")
_PENDING, _RUNNING = str(JobState.PENDING), str(JobState.RUNNING)


def _event(job_id: str, at: datetime, detail: str, step: str | None = None,
           src: str | None = None, dst: str | None = None) -> dict[str, Any]:
    """An ``events`` row's parameters. Pass states and step names as plain ``str`` where it is
    cheap to: the SQLite writer converts any other value it gets, which costs a little each."""
    return {"job_id": job_id, "at": at, "step": step, "src": src, "dst": dst, "detail": detail}


# --- submitting ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to insert: its steps are the kind's, all PENDING."""

    name: str
    kind: JobKind
    spec: dict[str, Any]
    detail: str
    parent_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


_INSERT_JOB = (
    "INSERT INTO jobs (id, name, kind, parent_id, state, spec, spec_version, state_version, recoveries,"
    " lease_owner, lease_expires_at, started_at, created_at, updated_at) VALUES (:id, :name, :kind,"
    " :parent_id, :state, :spec, :spec_version, :state_version, :recoveries, :owner, %s, :started_at,"
    " :at, :at)")
_INSERT_STEP = ("INSERT INTO steps (job_id, name, position, state, attempts, updated_at, extra) "
                "VALUES (:job_id, :name, :position, 'PENDING', 0, :at, '{{}}')")


def insert_jobs(new: Sequence[NewJob], *, at: datetime, owner: str | None = None,
                lease: float = 30.0, notify: str | None = None) -> Callable[[Dialect], Op[list[str]]]:
    """Insert jobs with their steps in one transaction; PENDING, or RUNNING under ``owner``
    (``fabricflow run``: no moment in which a daemon could claim it first)."""

    def op(d: Dialect) -> Op[list[str]]:
        state = JobState.RUNNING if owner else JobState.PENDING
        yield Sql(_INSERT_JOB % ("{until}" if owner else "NULL"), many=[{
            "id": j.id, "name": j.name, "kind": str(j.kind), "parent_id": j.parent_id, "state": str(state),
            "spec": j.spec, "spec_version": SPEC_VERSION, "state_version": STATE_TABLE_VERSION,
            "recoveries": 1 if owner else 0, "owner": owner, "lease": lease,
            "started_at": at if owner else None, "at": at} for j in new])
        yield Sql(_INSERT_STEP, many=[{"job_id": j.id, "name": str(s), "position": i, "at": at}
                                      for j in new for i, s in enumerate(order_of(j.kind))])
        events = [_event(j.id, at, j.detail, dst=_PENDING) for j in new]
        if owner:
            events += [_event(j.id, at, f"claimed by {owner}", src=_PENDING, dst=_RUNNING) for j in new]
        yield Sql(_EVENT, many=events, defer=True)
        if notify and d.name == "postgresql":
            yield Sql("SELECT pg_notify(:channel, :payload)", {"channel": notify, "payload": new[0].id})
        return [j.id for j in new]

    return op


# --- a job's transitions ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StepMove:
    """One step's compare-and-set from ``expected`` to ``to``, with the columns it sets."""

    name: StepName
    expected: StepState
    to: StepState
    detail: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_step_edge(self.expected, self.to)


@dataclass(frozen=True, slots=True)
class JobEnd:
    """The job leaves RUNNING (ends, or goes back to PENDING) in the same transaction."""

    to: JobState
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_job_edge(JobState.RUNNING, self.to)


_STEP_COLUMNS = ("resource_id", "resource_status", "request_name", "extra", "attempts", "error",
                 "run_after", "started_at", "finished_at")
_JOB_COLUMNS = ("error", "result", "run_after")
_HELD = "EXISTS (SELECT 1 FROM jobs WHERE id = :job_id AND lease_owner = :owner AND state = 'RUNNING')"


# The statements of ``commit``, built once per combination of what they set: a transition
# would otherwise spend about a microsecond joining the same text again.
_STEP_SQL: dict[tuple[StepState, StepState, tuple[str, ...]], str] = {}
_JOB_SQL: dict[tuple[bool, JobState | None, tuple[str, ...], bool], str] = {}


def _step_sql(expected: StepState, to: StepState, fields: tuple[str, ...]) -> str:
    key = (expected, to, fields)
    text = _STEP_SQL.get(key)
    if text is None:
        unknown = set(fields) - set(_STEP_COLUMNS)
        if unknown:
            raise ValueError(f"unknown step columns {sorted(unknown)}")
        sets = ["state = :to", "updated_at = :at"]
        for column in _STEP_COLUMNS:
            if column in fields:
                sets.append(f"{column} = :{column}")
        if expected is StepState.PENDING and "started_at" not in fields:
            sets.append("started_at = COALESCE(started_at, :at)")
        if to in (StepState.SUCCEEDED, StepState.SKIPPED, StepState.FAILED) and "finished_at" not in fields:
            sets.append("finished_at = :at")
        text = _STEP_SQL[key] = (f"UPDATE steps SET {', '.join(sets)} WHERE job_id = :job_id AND name = :name "
                                 f"AND state = :expected AND {_HELD}")
    return text


def _job_sql(result: bool, end: JobState | None, values: tuple[str, ...], renew: bool) -> str:
    key = (result, end, values, renew)
    text = _JOB_SQL.get(key)
    if text is None:
        sets = ["updated_at = :at", "recoveries = 0"]
        if result:
            sets.append("result = :result")
        if end is not None:
            sets += ["state = :state", "lease_owner = NULL", "lease_expires_at = NULL"]
            if end.is_terminal:
                sets.append("finished_at = :at")
            sets += [f"{column} = :{column}" for column in _JOB_COLUMNS if column in values]
        elif renew:
            sets.append("lease_expires_at = {until}")
        text = _JOB_SQL[key] = (f"UPDATE jobs SET {', '.join(sets)} WHERE id = :job_id AND lease_owner = :owner "
                                "AND state = 'RUNNING'")
    return text


def commit(job_id: str, owner: str, *, at: datetime, moves: Sequence[StepMove] = (),
           end: JobEnd | None = None, result: dict[str, Any] | None = None,
           renew: float | None = None) -> Callable[[Dialect], Op[None]]:
    """Commit a job's step transitions (in order), its end, and a lease renewal, as one unit.

    Every move is a compare-and-set under the lease: if one misses, the whole unit is rolled
    back and ``StaleTransition`` raised to its caller. Any committed transition is progress,
    so the job's streak of interrupted runs (the poison count) is reset.
    """
    # A partial, not a closure as the other operations: the hottest operation of all, and a
    # closure over seven names is nine objects for the garbage collector (a function, its cells
    # and their tuple) that live until the batch commits; collecting them cost more CPU than
    # building them. The partial is two.
    return partial(_commit, job_id, owner, at, moves, end, result, renew)


def _commit(job_id: str, owner: str, at: datetime, moves: Sequence[StepMove], end: JobEnd | None,
            result: dict[str, Any] | None, renew: float | None, d: Dialect) -> Op[None]:
    events = []
    for move in moves:
        # Plain str, not the StrEnum members: cheaper to bind, and the same text.
        name, expected, to = str(move.name), str(move.expected), str(move.to)
        params = {**move.fields, "job_id": job_id, "owner": owner, "name": name,
                  "expected": expected, "to": to, "at": at}
        done = yield Sql(_step_sql(move.expected, move.to, tuple(move.fields)), params)
        if done.rowcount != 1:
            raise StaleTransition(f"step {move.name} of job {job_id} is not {move.expected} under {owner}")
        events.append(_event(job_id, at, move.detail, name, expected, to))
    params = {"job_id": job_id, "owner": owner, "at": at}
    if result is not None:
        params["result"] = result
    if end is not None:
        params["state"] = state = str(end.to)
        values = tuple(column for column in _JOB_COLUMNS if column in end.values)
        for column in values:
            params[column] = end.values[column]
        events.append(_event(job_id, at, end.detail, None, _RUNNING, state))
    else:
        values = ()
        if renew is not None:
            params["lease"] = renew
    done = yield Sql(_job_sql(result is not None, end.to if end is not None else None, values,
                              renew is not None), params)
    if done.rowcount != 1:
        raise StaleTransition(f"job {job_id} is no longer RUNNING under {owner}")
    if events:
        yield Sql(_EVENT, many=events, defer=True)


def note(job_id: str, detail: str, *, at: datetime, step: str | None = None) -> Callable[[Dialect], Op[None]]:
    """Log an event that changes no state."""

    def op(d: Dialect) -> Op[None]:
        yield Sql(_EVENT, _event(job_id, at, detail, step), defer=True)

    return op


# --- leases ----------------------------------------------------------------------------------

def renew(job_id: str, owner: str, *, lease: float) -> Callable[[Dialect], Op[None]]:
    """Extend one job's lease, or raise StaleTransition if ``owner`` no longer holds it."""

    def op(d: Dialect) -> Op[None]:
        done = yield Sql("UPDATE jobs SET lease_expires_at = {until} WHERE id = :job_id AND "
                         "lease_owner = :owner AND state = 'RUNNING'",
                         {"job_id": job_id, "owner": owner, "lease": lease})
        if done.rowcount != 1:
            raise StaleTransition(f"job {job_id} is no longer held by {owner}")

    return op


def heartbeat(owner: str, job_ids: Iterable[str], *, lease: float) -> Callable[[Dialect], Op[int]]:
    """Extend the leases of ``job_ids`` that ``owner`` holds, in one statement; how many."""
    ids = json.dumps(list(job_ids))

    def op(d: Dialect) -> Op[int]:
        done = yield Sql("UPDATE jobs SET lease_expires_at = {until} WHERE lease_owner = :owner AND "
                         "state = 'RUNNING' AND id IN ({ids})", {"owner": owner, "ids": ids, "lease": lease})
        return done.rowcount

    return op


def heartbeat_all(owner: str, *, lease: float) -> Callable[[Dialect], Op[int]]:
    """Extend every lease ``owner`` holds; how many."""

    def op(d: Dialect) -> Op[int]:
        done = yield Sql("UPDATE jobs SET lease_expires_at = {until} WHERE lease_owner = :owner AND "
                         "state = 'RUNNING'", {"owner": owner, "lease": lease})
        return done.rowcount

    return op


# --- the daemon registry (`fabricflow status`) ------------------------------------------------

def register_daemon(owner: str, *, host: str, pid: int, version: str,
                    lease: float) -> Callable[[Dialect], Op[None]]:
    """Insert a starting daemon's row: it is alive from now until its heartbeats stop."""

    def op(d: Dialect) -> Op[None]:
        yield Sql("INSERT INTO daemons (owner, host, pid, version, lease_seconds, started_at, heartbeat_at,"
                  " jobs_held) VALUES (:owner, :host, :pid, :version, :lease_seconds, {now}, {now}, 0)",
                  {"owner": owner, "host": host, "pid": pid, "version": version, "lease_seconds": lease})

    return op


def daemon_heartbeat(owner: str, job_ids: Iterable[str], *, lease: float) -> Callable[[Dialect], Op[int]]:
    """``heartbeat`` and the daemon's own row in the same transaction: its heartbeat time on the
    database's clock and how many leases it renewed; how many."""
    renew_leases = heartbeat(owner, job_ids, lease=lease)

    def op(d: Dialect) -> Op[int]:
        held = yield from renew_leases(d)
        yield Sql("UPDATE daemons SET heartbeat_at = {now}, jobs_held = :held WHERE owner = :owner",
                  {"owner": owner, "held": held})
        return held

    return op


def daemon_stopped(owner: str) -> Callable[[Dialect], Op[None]]:
    """Mark a daemon stopped cleanly, with the jobs it still holds (those a drain abandoned)."""

    def op(d: Dialect) -> Op[None]:
        yield Sql("UPDATE daemons SET stopped_at = {now}, jobs_held = (SELECT COUNT(*) FROM jobs WHERE"
                  " lease_owner = :owner AND state = 'RUNNING') WHERE owner = :owner", {"owner": owner})

    return op


def mark_progress(job_id: str, owner: str) -> Callable[[Dialect], Op[None]]:
    """The run got a useful answer from Fabric: its streak of interrupted runs is over."""

    def op(d: Dialect) -> Op[None]:
        yield Sql("UPDATE jobs SET recoveries = 0 WHERE id = :job_id AND lease_owner = :owner "
                  "AND recoveries > 0", {"job_id": job_id, "owner": owner})

    return op


_RUNNABLE = (
    "SELECT id, state, lease_owner, recoveries FROM jobs WHERE ((state = 'PENDING' AND (run_after IS NULL"
    " OR run_after <= {now})) %s)"
    " AND spec_version <= :spec_version AND state_version <= :state_version"
    " ORDER BY created_at LIMIT :limit {skip_locked}")
_LAPSED = "OR (state = 'RUNNING' AND lease_expires_at < {now})"
_TAKE = (
    "UPDATE jobs SET state = 'RUNNING', lease_owner = :owner, started_at = COALESCE(started_at, :at),"
    " lease_expires_at = {until}, updated_at = :at, recoveries = recoveries + 1 WHERE id = :id"
    " AND state = :state AND (lease_owner = :previous OR (lease_owner IS NULL AND CAST(:previous AS VARCHAR)"
    " IS NULL))")
_POISON = (
    "UPDATE jobs SET state = 'FAILED', lease_owner = NULL, lease_expires_at = NULL, updated_at = :at,"
    " finished_at = :at, error = :error WHERE id = :id AND state = :state")


def claim(owner: str, *, limit: int, lease: float, max_runs: int, at: datetime,
          running: Iterable[str] = (), takeover: bool = True) -> Callable[[Dialect], Op[list[Job]]]:
    """Claim up to ``limit`` runnable jobs and count the run each starts; return their snapshots.

    Runnable: PENDING (and due), or (with ``takeover``) RUNNING with a lapsed lease. ``running``
    are the jobs the caller runs right now: never claimed again, even if their lease lapsed. A
    job whose runs keep being interrupted before any progress ends FAILED once it has run
    ``max_runs`` times.
    """
    skip = set(running)
    query = _RUNNABLE % (_LAPSED if takeover else "")

    def op(d: Dialect) -> Op[list[Job]]:
        found = yield Sql(query, {"spec_version": SPEC_VERSION, "state_version": STATE_TABLE_VERSION,
                                  "limit": limit + min(len(skip), 1000)})
        rows = [r for r in found.rows if r["id"] not in skip][:limit]
        return (yield from claim_rows(rows, owner, lease=lease, max_runs=max_runs, at=at))

    return op


def reclaim(owner: str, *, lease: float, max_runs: int, at: datetime, is_dead: Callable[[str], bool],
            limit: int, skip: Iterable[str] = ()) -> Callable[[Dialect], Op[tuple[list[Job], bool]]]:
    """Take up to ``limit`` RUNNING jobs whose holder is gone (its lease expired, or
    ``is_dead(owner)``), none of ``skip``; return their snapshots and whether more are left."""
    skipped = set(skip)

    def op(d: Dialect) -> Op[tuple[list[Job], bool]]:
        found = yield Sql("SELECT id, state, lease_owner, recoveries, (lease_expires_at IS NULL OR "
                          "lease_expires_at < {now}) AS lapsed FROM jobs WHERE state = 'RUNNING' ORDER BY id")
        # One past the limit is enough to know whether more are left: ``is_dead`` (a system
        # call) is asked of at most that many rows per batch, not of every RUNNING job each time.
        rows = list(itertools.islice((r for r in found.rows if r["id"] not in skipped and (
            r["lease_owner"] is None or r["lease_owner"] == owner or r["lapsed"] or is_dead(r["lease_owner"]))),
            limit + 1))
        taken = yield from claim_rows(rows[:limit], owner, lease=lease, max_runs=max_runs, at=at)
        return taken, len(rows) > limit

    return op


def claim_rows(rows: list[dict[str, Any]], owner: str, *, lease: float, max_runs: int,
               at: datetime) -> Op[list[Job]]:
    """Take the jobs of ``rows`` (id, state, lease_owner, recoveries as read) under ``owner``:
    a compare-and-set each, counting the run it starts, or failing it as a poison job."""
    taken, events = [], []
    for row in rows:
        src = JobState(row["state"])
        if row["recoveries"] >= max_runs:
            message = yield from _poison_message(row["id"], row["recoveries"])
            done = yield Sql(_POISON, {"id": row["id"], "state": str(src), "at": at, "error": {
                "code": "fabricflow.poison", "message": message, "request_id": None}})
            if done.rowcount == 1:
                events.append(_event(row["id"], at, message, None, str(src), str(JobState.FAILED)))
            continue
        done = yield Sql(_TAKE, {"id": row["id"], "state": str(src), "previous": row["lease_owner"],
                                 "owner": owner, "lease": lease, "at": at})
        if done.rowcount != 1:
            continue
        taken.append(row["id"])
        detail = (f"recovered by {owner} (previous owner {row['lease_owner']})"
                  if src is JobState.RUNNING else f"claimed by {owner}")
        events.append(_event(row["id"], at, detail, None, str(src), _RUNNING))
    if events:
        yield Sql(_EVENT, many=events, defer=True)
    return (yield from read_jobs(taken))


def _poison_message(job_id: str, runs: int) -> Op[str]:
    found = yield Sql("SELECT name FROM steps WHERE job_id = :job_id AND state = 'IN_FLIGHT' ORDER BY position",
                      {"job_id": job_id})
    open_steps = [r["name"] for r in found.rows]
    maybe = (f"; step {', '.join(open_steps)} was IN_FLIGHT, so its resource may exist: `fabricflow "
             f"retry {job_id[:8]}` adopts it, `fabricflow teardown {job_id[:8]}` deletes it"
             if open_steps else "")
    return (f"its run was interrupted {runs} times in a row without progress (crashes or lost "
            f"leases); giving up on this poison job{maybe}")


def read_jobs(job_ids: Sequence[str]) -> Op[list[Job]]:
    """Snapshots of the jobs with their steps, read inside the operation's transaction."""
    if not job_ids:
        return []
    ids = json.dumps(list(job_ids))
    jobs = yield Sql("SELECT * FROM jobs WHERE id IN ({ids})", {"ids": ids})
    steps = yield Sql("SELECT * FROM steps WHERE job_id IN ({ids})", {"ids": ids})
    by_job: dict[str, list[dict[str, Any]]] = {}
    for s in steps.rows:
        by_job.setdefault(s["job_id"], []).append(s)
    order = {job_id: i for i, job_id in enumerate(job_ids)}
    return sorted((job_from_row(r, by_job.get(r["id"], [])) for r in jobs.rows), key=lambda j: order[j.id])


def applied(job: Job, moves: Sequence[StepMove], *, at: datetime) -> Job:
    """The snapshot after ``moves`` were committed: the runner knows what it wrote."""
    steps = dict(job.steps)
    for move in moves:
        old = steps[move.name]
        values: dict[str, Any] = {k: v for k, v in move.fields.items() if k in Step.__slots__}
        values.update(state=move.to, updated_at=at)
        if move.expected is StepState.PENDING and old.started_at is None:
            values.setdefault("started_at", at)
        if move.to in (StepState.SUCCEEDED, StepState.SKIPPED, StepState.FAILED):
            values.setdefault("finished_at", at)
        if values.get("extra") is None and "extra" in values:
            values["extra"] = {}
        steps[move.name] = _replaced(old, values)
    return _replaced(job, {"steps": steps, "updated_at": at, "recoveries": 0})


_set = object.__setattr__
_Snapshot = TypeVar("_Snapshot", Job, Step)


def _replaced(snapshot: _Snapshot, changes: dict[str, Any]) -> _Snapshot:
    """``dataclasses.replace`` for the frozen, slotted snapshots (fields only, no __post_init__),
    without its walk over the fields' definitions: a runner applies two per transition."""
    cls = type(snapshot)
    new = object.__new__(cls)
    for name in cls.__slots__:
        _set(new, name, changes[name] if name in changes else getattr(snapshot, name))
    return new


# --- pruning (`fabricflow db prune`) ----------------------------------------------------------

_FINISHED = ", ".join(f"'{state}'" for state in JobState if state.is_terminal)


def _old(alias: str) -> str:
    return f"{alias}.state IN ({_FINISHED}) AND COALESCE({alias}.finished_at, {alias}.updated_at) < :before"


# A teardown that stays (unfinished, or finished since :before) keeps its job: it reads the job's
# steps to know what to delete, and shows what it tore down.
_HELD_BY_TEARDOWN = f"EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id AND NOT ({_old('c')}))"
# A create job that recorded a resource (or may have made one: a step IN_FLIGHT) and was never torn
# down: its row is the only record of what it made (for `teardown`, `invoke`), and without it
# `fabricflow orphans` would take a service still in use for an orphan.
_OWNS_RESOURCES = (
    "j.kind = 'create' AND EXISTS (SELECT 1 FROM steps s WHERE s.job_id = j.id AND (s.state = 'IN_FLIGHT'"
    " OR (s.resource_id IS NOT NULL AND s.state <> 'SKIPPED'))) AND NOT EXISTS (SELECT 1 FROM jobs t"
    " WHERE t.parent_id = j.id AND t.state = 'SUCCEEDED')")
_JOB_TABLES = ("events", "invocations", "steps")


def _prunable(with_resources: bool) -> str:
    return f"{_old('j')} AND NOT {_HELD_BY_TEARDOWN}" + ("" if with_resources else f" AND NOT ({_OWNS_RESOURCES})")


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """The jobs a prune removes (teardowns first), the old finished ones it keeps (for a
    teardown's sake, or for the resources they own), and the rows of each table that go."""

    job_ids: list[str]
    kept_for_teardown: list[str]
    kept_with_resources: list[str]
    rows: dict[str, int]
    daemons: list[str]


def prune_plan(*, before: datetime, at: datetime, with_resources: bool = False) -> Callable[[Dialect], Op[PrunePlan]]:
    """What ``prune_jobs`` would remove: jobs that finished (SUCCEEDED, FAILED, CANCELLED) before
    ``before``; never one a teardown that stays refers to, nor (unless ``with_resources``) a
    create job whose resources were never torn down. And the registry rows of daemons stopped
    before then, or silent since then and past their lease at ``at``."""

    def op(d: Dialect) -> Op[PrunePlan]:
        found = yield Sql(f"SELECT j.id FROM jobs j WHERE {_prunable(with_resources)} ORDER BY CASE WHEN"
                          " j.kind = 'teardown' THEN 0 ELSE 1 END, COALESCE(j.finished_at, j.updated_at), j.id",
                          {"before": before})
        job_ids = [r["id"] for r in found.rows]
        held = yield Sql(f"SELECT j.id FROM jobs j WHERE {_old('j')} AND {_HELD_BY_TEARDOWN} ORDER BY j.id",
                         {"before": before})
        owning = [] if with_resources else (yield Sql(
            f"SELECT j.id FROM jobs j WHERE {_old('j')} AND NOT {_HELD_BY_TEARDOWN} AND {_OWNS_RESOURCES}"
            " ORDER BY j.id", {"before": before})).rows
        ids = json.dumps(job_ids)
        rows = {"jobs": len(job_ids)}
        for table in _JOB_TABLES:
            counted = yield Sql(f"SELECT COUNT(*) AS n FROM {table} WHERE job_id IN ({{ids}})", {"ids": ids})
            rows[table] = int(counted.rows[0]["n"])
        daemons = yield from _old_daemons(before, at)
        return PrunePlan(job_ids=job_ids, kept_for_teardown=[r["id"] for r in held.rows],
                         kept_with_resources=[r["id"] for r in owning], rows=rows, daemons=daemons)

    return op


def _old_daemons(before: datetime, at: datetime) -> Op[list[str]]:
    found = yield Sql("SELECT owner, lease_seconds, heartbeat_at, stopped_at FROM daemons WHERE"
                      " COALESCE(stopped_at, heartbeat_at) < :before", {"before": before})
    owners = []
    for r in found.rows:
        # One not stopped goes only once its lease is over: a short --older-than never forgets a live one.
        silent_since = as_utc(r["heartbeat_at"]) or at
        if r["stopped_at"] is not None or silent_since + timedelta(seconds=float(r["lease_seconds"])) < at:
            owners.append(r["owner"])
    return owners


def prune_jobs(job_ids: Sequence[str], *, before: datetime,
               with_resources: bool = False) -> Callable[[Dialect], Op[tuple[list[str], dict[str, int]]]]:
    """Delete those of ``job_ids`` that are still prunable (checked again, rows locked on
    PostgreSQL: a job retried meanwhile stays) with their events, invocations and steps,
    explicitly rather than by cascade, which counts them; the IDs removed and the rows per table."""
    ids = json.dumps(list(job_ids))

    def op(d: Dialect) -> Op[tuple[list[str], dict[str, int]]]:
        found = yield Sql(f"SELECT j.id FROM jobs j WHERE j.id IN ({{ids}}) AND {_prunable(with_resources)}"
                          " {skip_locked}",
                          {"ids": ids, "before": before})
        removed = [r["id"] for r in found.rows]
        rows = dict.fromkeys(("jobs", *_JOB_TABLES), 0)
        if not removed:
            return removed, rows
        still = json.dumps(removed)
        for table in _JOB_TABLES:
            done = yield Sql(f"DELETE FROM {table} WHERE job_id IN ({{ids}})", {"ids": still})
            rows[table] = done.rowcount
        done = yield Sql("DELETE FROM jobs WHERE id IN ({ids})", {"ids": still})
        rows["jobs"] = done.rowcount
        return removed, rows

    return op


def prune_daemons(owners: Sequence[str], *, before: datetime) -> Callable[[Dialect], Op[int]]:
    """Delete these daemons' registry rows, unless one has sent a heartbeat since ``before``
    (it was hung, not dead); how many."""
    ids = json.dumps(list(owners))

    def op(d: Dialect) -> Op[int]:
        if not owners:
            return 0
        done = yield Sql("DELETE FROM daemons WHERE owner IN ({ids}) AND (stopped_at IS NOT NULL OR"
                         " heartbeat_at < :before)", {"ids": ids, "before": before})
        return done.rowcount

    return op
