"""What ``fabricflow status`` reads: the daemon registry, jobs by state, the oldest running jobs
and the latest failures, each as of the database's clock.

Plain SQL with ``:name`` parameters, run through whatever ``fetch`` the caller has: the stdlib
reader on a SQLite file (``ReadOnlyStore.fetch``), SQLAlchemy on anything else. Like the reader,
this module imports nothing heavy. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from orchestrator.domain import Job, Step
from orchestrator.machine import JobState, ResourceKind, StepName, row_of
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
    jobs_held: int
    heartbeat_age: float  # seconds
    gone: bool = False  # its process no longer exists on this machine (killed, crashed)

    @property
    def state(self) -> str:
        """alive, stale or stopped. A daemon of this machine whose process is gone is stale at
        once, as the next daemon's takeover judges it, not only when its lease is over."""
        if self.stopped_at is not None:
            return STOPPED
        return ALIVE if self.heartbeat_age <= self.lease_seconds and not self.gone else STALE

    def as_json(self) -> dict[str, Any]:
        """The daemon object of ``status --json``."""
        return {
            "owner": self.owner, "state": self.state, "host": self.host, "pid": self.pid,
            "version": self.version, "lease_seconds": self.lease_seconds,
            "started_at": self.started_at.isoformat(), "heartbeat_at": self.heartbeat_at.isoformat(),
            "heartbeat_age_seconds": round(self.heartbeat_age, 1),
            "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None, "jobs_held": self.jobs_held,
        }


@dataclass(frozen=True, slots=True)
class Current:
    """Where a running job stands: its first step not yet done, and what that step is about."""

    step: StepName | None  # None: every step is done, the job is finishing
    resource_kind: ResourceKind | None
    resource_id: str | None
    retry_at: datetime | None  # a step waiting out a backoff before its next attempt


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
    if now is None:
        now = as_utc((await fetch("SELECT CURRENT_TIMESTAMP AS now", {}))[0]["now"])
        assert now is not None
    daemons = [*await fetch("SELECT * FROM daemons WHERE stopped_at IS NULL ORDER BY started_at DESC", {}),
               *await fetch("SELECT * FROM daemons WHERE stopped_at IS NOT NULL ORDER BY stopped_at DESC"
                            " LIMIT :limit", {"limit": limit})]
    registry = [_daemon(row, now) for row in daemons]
    registry = [d for d in registry if d.stopped_at is None or now - d.stopped_at <= RECENTLY_STOPPED]
    registry.sort(key=lambda d: (d.state != ALIVE, d.state != STALE))  # stable: newest first in each
    counts = {str(state): 0 for state in JobState}
    for row in await fetch("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state", {}):
        counts[row["state"]] = int(row["n"])
    running = await _with_steps(fetch, await fetch(
        "SELECT * FROM jobs WHERE state = 'RUNNING' ORDER BY COALESCE(started_at, created_at), id"
        " LIMIT :limit", {"limit": limit}))
    failures = await _with_steps(fetch, await fetch(
        "SELECT * FROM jobs WHERE state = 'FAILED' ORDER BY COALESCE(finished_at, updated_at) DESC, id"
        " LIMIT :limit", {"limit": limit}))
    return Overview(at=now, daemons=registry, jobs=counts,
                    running=[(job, current_of(job, run_after)) for job, run_after in running],
                    failures=[job for job, _ in failures])


def _daemon(row: Mapping[str, Any], now: datetime) -> DaemonRow:
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
