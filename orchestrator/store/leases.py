"""Leases: claiming jobs, heartbeats, start-up reclaim, poison-job counting, wake-ups.

A mixin of ``JobStore`` (it uses the store's engine, clock and event log), kept apart because
it is the part that differs between one SQLite daemon and many PostgreSQL ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.domain import Job
from orchestrator.errors import StaleTransition
from orchestrator.machine import STATE_TABLE_VERSION, JobState, StepState
from orchestrator.spec import SPEC_VERSION
from orchestrator.store.schema import jobs, steps

if TYPE_CHECKING:
    from orchestrator.store.jobs import JobStore

#: The PostgreSQL channel a submit (or retry) notifies; daemons LISTEN on it.
NOTIFY_CHANNEL = "fabricflow_jobs"


class LeaseMixin:
    """Who runs which job, for how long, and how often it was interrupted."""

    async def claim(self: JobStore, job_id: str, owner: str, *, lease: float) -> Job | None:
        """Take one PENDING job (``fabricflow run``); None if it is not PENDING."""
        now = self.clock()
        async with self._write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.PENDING)
                .values(state=JobState.RUNNING, lease_owner=owner, started_at=func.coalesce(jobs.c.started_at, now),
                        lease_expires_at=now + timedelta(seconds=lease), updated_at=now)
            )
            if result.rowcount != 1:
                return None
            await self._event(conn, job_id, None, JobState.PENDING, JobState.RUNNING, f"claimed by {owner}")
        return await self.get(job_id)

    async def claim_next(
        self: JobStore, owner: str, *, limit: int, lease: float, running: Collection[str] = ()
    ) -> list[str]:
        """Claim up to ``limit`` runnable jobs: PENDING ones and RUNNING ones whose lease expired.

        ``running`` are the jobs the caller is running right now: never claimed again, even if
        their lease lapsed (that would start a second runner on the same job). Its other lapsed
        jobs (a runner that died without handing its job back) are claimed like anyone's.
        """
        if limit <= 0:
            return []
        now = self.clock()
        runnable = or_(
            and_(jobs.c.state == JobState.PENDING,
                 or_(jobs.c.run_after.is_(None), jobs.c.run_after <= now)),
            and_(jobs.c.state == JobState.RUNNING, jobs.c.lease_expires_at < now),
        )
        # A job submitted under a newer spec format or state table waits for a daemon that knows it.
        known = and_(jobs.c.spec_version <= SPEC_VERSION, jobs.c.state_version <= STATE_TABLE_VERSION)
        query = select(jobs.c.id, jobs.c.state, jobs.c.lease_owner).where(runnable, known)
        query = query.order_by(jobs.c.created_at).limit(limit + min(len(running), 1000))
        if self.engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        claimed: list[str] = []
        async with self._write() as conn:
            for row in (await conn.execute(query)).all():
                if len(claimed) >= limit:
                    break
                if row.id not in running and await self._take(conn, row, owner, now, lease):
                    claimed.append(row.id)
        return claimed

    async def reclaim_all(
        self: JobStore, owner: str, *, lease: float, is_dead: Callable[[str], bool]
    ) -> list[str]:
        """Take every RUNNING job whose holder is gone: its lease expired, or ``is_dead(owner)``.

        SQLite start-up: the previous daemon's process is known dead at once (same machine), so
        recovery does not wait for its leases to expire; a live ``fabricflow run`` keeps its job.
        """
        now = self.clock()
        query = select(jobs.c.id, jobs.c.state, jobs.c.lease_owner, jobs.c.lease_expires_at).where(
            jobs.c.state == JobState.RUNNING)
        async with self._write() as conn:
            return [row.id for row in (await conn.execute(query)).all()
                    if (row.lease_owner is None or row.lease_owner == owner or is_dead(row.lease_owner)
                        or row.lease_expires_at is None or row.lease_expires_at < now)
                    and await self._take(conn, row, owner, now, lease)]

    async def _take(self: JobStore, conn: AsyncConnection, row: Any, owner: str, now: datetime, lease: float) -> bool:
        src = JobState(row.state)
        guard = and_(jobs.c.id == row.id, jobs.c.state == src, _eq_or_null(jobs.c.lease_owner, row.lease_owner))
        result = await conn.execute(
            update(jobs).where(guard).values(
                state=JobState.RUNNING, lease_owner=owner, started_at=func.coalesce(jobs.c.started_at, now),
                lease_expires_at=now + timedelta(seconds=lease), updated_at=now)
        )
        if result.rowcount != 1:
            return False
        detail = (f"recovered by {owner} (previous owner {row.lease_owner})"
                  if src is JobState.RUNNING else f"claimed by {owner}")
        await self._event(conn, row.id, None, src, JobState.RUNNING, detail)
        return True

    async def renew(self: JobStore, job_id: str, owner: str, *, lease: float) -> None:
        """Extend one job's lease, or raise StaleTransition if ``owner`` no longer holds it.

        Called right before a create request, so a runner that lost its lease never sends one.
        """
        now = self.clock()
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner,
                                   jobs.c.state == JobState.RUNNING)
                .values(lease_expires_at=now + timedelta(seconds=lease)))
        if result.rowcount != 1:
            raise StaleTransition(f"job {job_id} is no longer held by {owner}")

    async def begin_run(self: JobStore, job_id: str, owner: str, *, max_runs: int) -> bool:
        """Count a run of the job starting; False (the job is not to be run) if it is a poison job.

        ``recoveries`` counts runs started since the job last committed a step transition. A job
        whose runs keep ending (crashes, lost leases) before any progress ends FAILED once it
        exceeds ``max_runs``, instead of taking every daemon down with it.
        """
        now = self.clock()
        mine = and_(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING)
        async with self._write() as conn:
            runs = (await conn.execute(select(jobs.c.recoveries).where(mine))).scalar_one_or_none()
            if runs is None:
                return False  # the lease was lost meanwhile
            if runs < max_runs:
                await conn.execute(update(jobs).where(mine).values(recoveries=runs + 1))
                return True
            open_steps = (await conn.execute(
                select(steps.c.name).where(steps.c.job_id == job_id, steps.c.state == StepState.IN_FLIGHT)
            )).scalars().all()
            maybe = (f"; step {', '.join(open_steps)} was IN_FLIGHT, so its resource may exist: `fabricflow "
                     f"retry {job_id[:8]}` adopts it, `fabricflow teardown {job_id[:8]}` deletes it"
                     if open_steps else "")
            message = (f"its run was interrupted {runs} times in a row without progress (crashes or lost "
                       f"leases); giving up on this poison job{maybe}")
            await conn.execute(update(jobs).where(mine).values(
                state=JobState.FAILED, lease_owner=None, lease_expires_at=None, updated_at=now, finished_at=now,
                error={"code": "fabricflow.poison", "message": message, "request_id": None}))
            await self._event(conn, job_id, None, JobState.RUNNING, JobState.FAILED, message)
        return False

    async def mark_progress(self: JobStore, job_id: str, owner: str) -> None:
        """The current run got a useful answer from Fabric: its streak of interrupted runs is over."""
        async with self._write() as conn:
            await conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner,
                                                  jobs.c.recoveries > 0).values(recoveries=0))

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
        in one statement per 500 jobs; returns how many.

        It skips the queue of this process's writers: a heartbeat stuck behind thousands of step
        transitions would let the leases lapse.
        """
        now = self.clock()
        if job_ids is not None:
            ids = list(job_ids)
            renewed = 0
            for start in range(0, len(ids), 500):
                async with self._writer.begin() as conn:
                    result = await conn.execute(
                        update(jobs).where(jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING,
                                           jobs.c.id.in_(ids[start:start + 500]))
                        .values(lease_expires_at=now + timedelta(seconds=lease)))
                renewed += result.rowcount
            return renewed
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING)
                .values(lease_expires_at=now + timedelta(seconds=lease))
            )
        return result.rowcount

    async def cancel_requested(self: JobStore, owner: str) -> list[str]:
        """IDs of the jobs ``owner`` holds whose cancellation was requested."""
        query = select(jobs.c.id).where(jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING,
                                        jobs.c.cancel_requested_at.is_not(None))
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())


def _eq_or_null(column: Any, value: Any) -> Any:
    return column.is_(None) if value is None else column == value
