"""What ``fabricflow status`` reads: the daemon registry, jobs by state, the oldest running jobs
and the latest failures, each as of the database's clock.

Plain SQL with ``:name`` parameters, run through whatever ``fetch`` the caller has: the stdlib
reader on a SQLite file (``ReadOnlyStore.fetch``), SQLAlchemy on anything else. Like the reader,
this module imports nothing heavy. Nothing here writes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from orchestrator.domain import Job, Step
from orchestrator.machine import Action, JobKind, JobState, ResourceKind, StepName, StepState, row_of
from orchestrator.process import is_dead
from orchestrator.store.readonly import as_utc, job_from_row

Fetch = Callable[[str, dict[str, Any]], Awaitable[Sequence[Mapping[str, Any]]]]

ALIVE, STALE, STOPPED = "alive", "stale", "stopped"

#: Stopped daemons are shown for this long after their stop (at most ``limit`` of them).
RECENTLY_STOPPED = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class DaemonRow:
    """One daemon of the registry, judged at ``now``: alive (a heartbeat within its lease time,
    and its process there if it is of this machine), stale (none since: crashed, hung or cut off
    from the database; or its process gone) or stopped (cleanly)."""

    owner: str
    host: str
    pid: int
    version: str
    lease_seconds: float
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    jobs_held: int  # the leases its last heartbeat renewed (its registry row)
    heartbeat_age: float  # seconds
    gone: bool = False  # its process no longer exists on this machine (killed, crashed)
    # RUNNING jobs under its lease as read now: a claim shows before the next heartbeat does,
    # and the jobs of a daemon killed before its first heartbeat show at all.
    jobs_held_now: int = 0

    @property
    def state(self) -> str:
        """alive, stale or stopped. A daemon of this machine whose process is gone is stale at
        once, as the next daemon's takeover judges it, not only when its lease is over."""
        if self.stopped_at is not None:
            return STOPPED
        return ALIVE if self.heartbeat_age <= self.lease_seconds and not self.gone else STALE

    @property
    def is_alive(self) -> bool:
        """True while it is alive: its jobs are being run."""
        return self.state == ALIVE

    @property
    def uptime(self) -> float:
        """Seconds it has been up: until now while alive, until its stop once stopped, and for a
        stale one until its last heartbeat (the last moment it is known to have been up), so the
        figure of a dead daemon does not go on growing."""
        if self.stopped_at is not None:
            end = self.stopped_at
        elif self.state == STALE:
            end = self.heartbeat_at
        else:
            end = self.heartbeat_at + timedelta(seconds=self.heartbeat_age)  # now
        return max(0.0, (end - self.started_at).total_seconds())

    def as_json(self) -> dict[str, Any]:
        """The daemon object of ``status --json``."""
        return {
            "owner": self.owner, "state": self.state, "host": self.host, "pid": self.pid,
            "version": self.version, "lease_seconds": self.lease_seconds,
            "started_at": self.started_at.isoformat(), "heartbeat_at": self.heartbeat_at.isoformat(),
            "heartbeat_age_seconds": round(self.heartbeat_age, 1),
            "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None, "jobs_held": self.jobs_held,
            "jobs_held_now": self.jobs_held_now, "uptime_seconds": round(self.uptime, 1),
        }


@dataclass(frozen=True, slots=True)
class Current:
    """Where a running job stands: its first step not yet done, and what that step is about."""

    step: StepName | None  # None: every step is done, the job is finishing
    resource_kind: ResourceKind | None
    resource_id: str | None
    retry_at: datetime | None  # a step waiting out a backoff before its next attempt
    # A create step in its settle window (after an unknown outcome it only looks, sends no
    # create): the number of its latest look, as its latest event says; None otherwise.
    settle_look: int | None = None


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything ``fabricflow status`` shows, read at ``at`` (the database's clock)."""

    at: datetime
    daemons: list[DaemonRow]
    jobs: dict[str, int]  # every JobState, zeros included
    running: list[tuple[Job, Current]]  # oldest first
    failures: list[Job]  # newest first


async def read_overview(fetch: Fetch, *, limit: int, now: datetime | None = None) -> Overview:
    """Read the overview; ``limit`` bounds the running jobs, failures and stopped daemons shown.

    ``now`` is the clock the daemons write with: on SQLite this machine's (pass it), on
    PostgreSQL the server's (leave it out: it is read from the database).
    """
    now = await _now(fetch, now)
    registry = await read_daemons(fetch, now=now, stopped=limit)
    counts = {str(state): 0 for state in JobState}
    for row in await fetch("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state", {}):
        counts[row["state"]] = int(row["n"])
    running = await _with_steps(fetch, await fetch(
        "SELECT * FROM jobs WHERE state = 'RUNNING' ORDER BY COALESCE(started_at, created_at), id"
        " LIMIT :limit", {"limit": limit}))
    failures = await _with_steps(fetch, await fetch(
        "SELECT * FROM jobs WHERE state = 'FAILED' ORDER BY COALESCE(finished_at, updated_at) DESC, id"
        " LIMIT :limit", {"limit": limit}))
    currents = [(job, current_of(job, run_after)) for job, run_after in running]
    looks = await _settle_looks(fetch, currents)
    return Overview(at=now, daemons=registry, jobs=counts,
                    running=[(job, replace(current, settle_look=looks.get(job.id))) for job, current in currents],
                    failures=[job for job, _ in failures])


async def read_daemons(fetch: Fetch, *, now: datetime | None = None, stopped: int = 0) -> list[DaemonRow]:
    """The registry judged at ``now`` (as ``read_overview`` takes it): every daemon not stopped,
    and the ``stopped`` latest of those stopped within RECENTLY_STOPPED; alive ones first, then
    stale, then stopped, newest first in each. Two queries."""
    now = await _now(fetch, now)
    rows = [*await fetch("SELECT * FROM daemons WHERE stopped_at IS NULL ORDER BY started_at DESC", {})]
    if stopped:
        rows += await fetch("SELECT * FROM daemons WHERE stopped_at IS NOT NULL ORDER BY stopped_at DESC"
                            " LIMIT :limit", {"limit": stopped})
    if not rows:
        return []
    # What each holds now, not at its last heartbeat (up to heartbeat_seconds ago): one pass
    # over the RUNNING jobs (ix_jobs_state_run_after), grouped by their lease's owner.
    held = {r["lease_owner"]: int(r["n"]) for r in await fetch(
        "SELECT lease_owner, COUNT(*) AS n FROM jobs WHERE state = 'RUNNING' AND lease_owner IS NOT NULL"
        " GROUP BY lease_owner", {})}
    registry = [_daemon(row, now, held.get(row["owner"], 0)) for row in rows]
    registry = [d for d in registry if d.stopped_at is None or now - d.stopped_at <= RECENTLY_STOPPED]
    registry.sort(key=lambda d: (d.state != ALIVE, d.state != STALE))  # stable: newest first in each
    return registry


async def _now(fetch: Fetch, now: datetime | None) -> datetime:
    if now is None:
        now = as_utc((await fetch("SELECT CURRENT_TIMESTAMP AS now", {}))[0]["now"])
        assert now is not None
    return now


def _daemon(row: Mapping[str, Any], now: datetime, held_now: int) -> DaemonRow:
    heartbeat_at = as_utc(row["heartbeat_at"])
    started_at = as_utc(row["started_at"])
    assert heartbeat_at is not None and started_at is not None
    stopped_at = as_utc(row["stopped_at"])
    return DaemonRow(
        owner=row["owner"], host=row["host"], pid=row["pid"], version=row["version"],
        lease_seconds=float(row["lease_seconds"]), started_at=started_at, heartbeat_at=heartbeat_at,
        stopped_at=stopped_at, jobs_held=row["jobs_held"],
        # Another machine's clock may run a little ahead of this one's.
        heartbeat_age=max(0.0, (now - heartbeat_at).total_seconds()),
        gone=stopped_at is None and is_dead(row["owner"]),
        jobs_held_now=held_now,
    )


async def _with_steps(fetch: Fetch, rows: Sequence[Mapping[str, Any]]
                      ) -> list[tuple[Job, dict[StepName, datetime | None]]]:
    """The jobs of ``rows`` with their steps, and each step's ``run_after`` (not in snapshots)."""
    if not rows:
        return []
    names = {f"id{i}": row["id"] for i, row in enumerate(rows)}
    steps: dict[str, list[Mapping[str, Any]]] = {}
    for s in await fetch(f"SELECT * FROM steps WHERE job_id IN ({', '.join(':' + n for n in names)})", names):
        steps.setdefault(s["job_id"], []).append(s)
    return [(job_from_row(row, steps.get(row["id"], [])),
             {StepName(s["name"]): as_utc(s["run_after"]) for s in steps.get(row["id"], [])}) for row in rows]


def current_of(job: Job, run_after: Mapping[StepName, datetime | None]) -> Current:
    """The job's first step not yet done and the resource it is about (for a poll step, the one
    its create step recorded)."""
    for name in job.order:
        step = job.steps[name]
        if step.state.is_done:
            continue
        kind = row_of(job.kind, name).kind
        return Current(step=name, resource_kind=kind, resource_id=_resource_id(job, step, kind),
                       retry_at=run_after.get(name) if step.attempts else None)
    return Current(step=None, resource_kind=None, resource_id=None, retry_at=None)


def _resource_id(job: Job, step: Step, kind: ResourceKind | None) -> str | None:
    if step.resource_id or kind is None:
        return step.resource_id
    known = [job.steps[n].resource_id for n in job.order
             if row_of(job.kind, n).kind is kind and job.steps[n].resource_id]
    return known[-1] if known else None


#: A look in a create step's settle window that found nothing, with more looks to come: the
#: note ``engine.procedure._settling`` writes ("look 3: no workspace named 'x' carries this
#: job's marker yet; ... (settle window 120s); looking again in 20.0s"). The note of the last
#: look ("...; the settle window (120s) is over, so it is created") does not match: a create follows.
SETTLE_LOOK = re.compile(r"look (\d+): no .* carries this job's marker yet; .*\(settle window ")


async def _settle_looks(fetch: Fetch, currents: Sequence[tuple[Job, Current]]) -> dict[str, int]:
    """For each job whose current step is a create IN_FLIGHT: the number of its settle window's
    latest look, when the step's latest look or transition event is such a look (a retry's note
    after a failed look is passed over: the window goes on). One query over the jobs' events
    (ix_events_job_id_id), for at most ``limit`` jobs."""
    creating = {job.id: str(current.step) for job, current in currents
                if current.step is not None and job.kind is JobKind.CREATE
                and job.steps[current.step].state is StepState.IN_FLIGHT
                and row_of(job.kind, current.step).action is Action.CREATE}
    if not creating:
        return {}
    names = {f"id{i}": job_id for i, job_id in enumerate(creating)}
    rows = await fetch(
        "SELECT job_id, step, detail FROM events WHERE id IN (SELECT MAX(id) FROM events"
        f" WHERE job_id IN ({', '.join(':' + n for n in names)}) AND step IS NOT NULL"
        " AND (to_state IS NOT NULL OR detail LIKE 'look %') GROUP BY job_id, step)", names)
    looks: dict[str, int] = {}
    for row in rows:
        match = SETTLE_LOOK.match(row["detail"] or "")
        if match is not None and creating.get(row["job_id"]) == row["step"]:
            looks[row["job_id"]] = int(match.group(1))
    return looks
