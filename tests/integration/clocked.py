"""A JobStore whose clock a test sets: jobs finished 40 days ago, daemons silent for hours, on a
real database without waiting for any of it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.machine import JobState, StepName, StepState
from orchestrator.spec import JobSpec
from orchestrator.store import db, ops
from orchestrator.store.jobs import JobStore


class Clock:
    """Now, or any moment a test moves it to; ``ago(...)`` sets it that far in the past."""

    def __init__(self) -> None:
        self.at: datetime | None = None

    def __call__(self) -> datetime:
        return self.at or datetime.now(UTC)

    def ago(self, **delta: float) -> Clock:
        self.at = datetime.now(UTC) - timedelta(**delta)
        return self

    def now(self) -> Clock:
        self.at = None
        return self


@asynccontextmanager
async def clocked_store(url: str, clock: Clock) -> AsyncIterator[JobStore]:
    """The store of ``url`` (migrated) writing with ``clock``: on SQLite every timestamp, {now}
    included; on PostgreSQL the ``:at`` ones ({now} stays the server's)."""
    engine = db.create_engine(url)
    await db.prepare(engine, url, auto_upgrade=True)
    store = JobStore(engine, clock=clock)
    try:
        yield store
    finally:
        await store.close()


async def finished(store: JobStore, spec: JobSpec, state: JobState, *, owner: str = "runner",
                   error: dict[str, Any] | None = None) -> str:
    """A job that ran and ended in ``state`` at the store's clock; its ID."""
    job = await store.submit(spec)
    await store.claim(job.id, owner, lease=30)
    moves = [ops.StepMove(StepName.WORKSPACE, StepState.PENDING, StepState.IN_FLIGHT, "creating",
                          {"request_name": spec.name})]
    if state is JobState.FAILED:
        moves.append(ops.StepMove(StepName.WORKSPACE, StepState.IN_FLIGHT, StepState.FAILED, "refused",
                                  {"error": error}))
    else:
        moves.append(ops.StepMove(StepName.WORKSPACE, StepState.IN_FLIGHT, StepState.SUCCEEDED, "created",
                                  {"resource_id": f"ws-{job.id[:6]}"}))
    await store.finish(job.id, owner, state, detail="ended", error=error, moves=moves)
    return job.id


async def register(store: JobStore, owner: str, *, lease: float = 30.0, pid: int = 4242) -> None:
    """A daemon's row, as ``fabricflow daemon`` inserts it at start."""
    await store.writer.run(ops.register_daemon(owner, host=socket.gethostname(), pid=pid, version="0.1.0",
                                               lease=lease), urgent=True)
