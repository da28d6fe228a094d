"""Leases: claiming jobs, heartbeats, start-up reclaim, poison-job counting, wake-ups.

A mixin of ``JobStore`` (it uses the store's engine, clock and event log), kept apart because
it is the part that differs between one SQLite daemon and many PostgreSQL ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from orchestrator.domain import Job
from orchestrator.machine import JobState
from orchestrator.store import ops
from orchestrator.store.schema import jobs
from orchestrator.store.writer import Dialect, Op, Sql

#: Most jobs taken over per transaction when a daemon starts on a SQLite file.
RECLAIM_BATCH = 500

if TYPE_CHECKING:
    from orchestrator.store.jobs import JobStore

#: The PostgreSQL channel a submit (or retry) notifies; daemons LISTEN on it.
NOTIFY_CHANNEL = "fabricflow_jobs"


class LeaseMixin:
    """Who runs which job, for how long, and how often it was interrupted."""

    async def claim(self: JobStore, job_id: str, owner: str, *, lease: float, max_runs: int = 10) -> Job | None:
        """Take one PENDING job and count the run it starts; None if it is not PENDING."""
        def op(d: Dialect) -> Op[Job | None]:
            found = yield Sql("SELECT id, state, lease_owner, recoveries FROM jobs WHERE id = :id AND "
                              "state = 'PENDING'", {"id": job_id})
            taken = yield from ops.claim_rows(found.rows, owner, lease=lease, max_runs=max_runs,
                                              at=self.clock())
            return taken[0] if taken else None

        return await self._writer.run(op, urgent=True)

    async def clock_skew(self: JobStore) -> float:
        """Seconds by which the database's clock is ahead of this process's (0 on SQLite, whose
        one daemon shares the machine's clock with every user of the file)."""
        if self.engine.dialect.name != "postgresql":
            return 0.0
        async with self.engine.connect() as conn:
            sent = self.clock()
            remote = (await conn.execute(select(func.clock_timestamp()))).scalar_one()
            back = self.clock()
        return (remote - (sent + (back - sent) / 2)).total_seconds()

    async def claim_next(
        self: JobStore, owner: str, *, limit: int, lease: float, running: Collection[str] = (),
        max_runs: int = 10, takeover: bool = True,
    ) -> list[Job]:
        """Claim up to ``limit`` runnable jobs: PENDING ones and RUNNING ones whose lease expired.

        Each claim counts a run of the job starting (the poison-job count) in the same
        transaction, and returns the job's snapshot, so the runner needs no read of its own.
        ``running`` are the jobs the caller is running right now: never claimed again, even if
        their lease lapsed (that would start a second runner on the same job). Its other lapsed
        jobs (a runner that died without handing its job back) are claimed like anyone's.
        """
        if limit <= 0:
            return []
        return await self._writer.run(ops.claim(owner, limit=limit, lease=lease, max_runs=max_runs,
                                                at=self.clock(), running=running, takeover=takeover),
                                      urgent=True)

    async def reclaim_all(
        self: JobStore, owner: str, *, lease: float, is_dead: Callable[[str], bool], max_runs: int = 10,
    ) -> list[Job]:
        """Take every RUNNING job whose holder is gone (``reclaim_batches``, all at once)."""
        return [job async for batch in self.reclaim_batches(owner, lease=lease, is_dead=is_dead,
                                                            max_runs=max_runs) for job in batch]

    async def reclaim_batches(
        self: JobStore, owner: str, *, lease: float, is_dead: Callable[[str], bool], max_runs: int = 10,
        size: int = RECLAIM_BATCH,
    ) -> AsyncIterator[list[Job]]:
        """Take every RUNNING job whose holder is gone: its lease expired, or ``is_dead(owner)``.

        SQLite start-up: the previous daemon's process is known dead at once (same machine), so
        recovery does not wait for its leases to expire; a live ``fabricflow run`` keeps its job.
        One transaction per ``size`` jobs, each batch yielded as soon as it is committed: the
        caller starts those jobs while the next batch is read, and ten thousand snapshots, each
        with its raw spec, are never all in memory at once.
        """
        taken: set[str] = set()
        more = True
        while more:
            batch, more = await self._writer.run(ops.reclaim(
                owner, lease=lease, max_runs=max_runs, at=self.clock(), is_dead=is_dead, limit=size,
                skip=taken), urgent=True)
            taken.update(job.id for job in batch)
            if batch:
                yield batch

    async def renew(self: JobStore, job_id: str, owner: str, *, lease: float) -> None:
        """Extend one job's lease, or raise StaleTransition if ``owner`` no longer holds it.

        Called right before a create request, so a runner that lost its lease never sends one.
        """
        await self._writer.run(ops.renew(job_id, owner, lease=lease), urgent=True)

    async def mark_progress(self: JobStore, job_id: str, owner: str) -> None:
        """The current run got a useful answer from Fabric: its streak of interrupted runs is over."""
        await self._writer.run(ops.mark_progress(job_id, owner))

    @contextlib.asynccontextmanager
    async def listen(self: JobStore, on_notify: Callable[[], None]) -> AsyncIterator[None]:
        """Call ``on_notify`` whenever a job is submitted (PostgreSQL LISTEN; no-op on SQLite)."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        async with self.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None

            def callback(*_: Any) -> None:
                on_notify()

            await raw.add_listener(NOTIFY_CHANNEL, callback)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    await raw.remove_listener(NOTIFY_CHANNEL, callback)

    async def heartbeat(self: JobStore, owner: str, *, lease: float, job_ids: Iterable[str] | None = None) -> int:
        """Extend the leases ``owner`` holds (only ``job_ids``, when given: the jobs it really runs),
        in one statement; returns how many.

        It goes to the front of the writer's queue: a heartbeat stuck behind thousands of step
        transitions would let the leases lapse.
        """
        if job_ids is None:
            return await self._writer.run(ops.heartbeat_all(owner, lease=lease), urgent=True)
        return await self._writer.run(ops.heartbeat(owner, job_ids, lease=lease), urgent=True)

    async def cancel_requested(self: JobStore, owner: str) -> list[str]:
        """IDs of the jobs ``owner`` holds whose cancellation was requested."""
        query = select(jobs.c.id).where(jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING,
                                        jobs.c.cancel_requested_at.is_not(None))
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())
