"""JobStore: every read and write of jobs, steps and events.

Each state change is a compare-and-set (update where the id, the expected state and the lease
owner match) in the same transaction as its ``events`` row, so the log and the tables never
disagree and a daemon that lost its lease cannot overwrite the new owner's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.domain import Event, Invocation, Job, Step
from orchestrator.errors import NotFoundError, StaleTransition, UserError
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
from orchestrator.spec import SPEC_VERSION, JobSpec
from orchestrator.store import db
from orchestrator.store.leases import NOTIFY_CHANNEL, LeaseMixin
from orchestrator.store.schema import events, invocations, jobs, steps


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class JobStore(LeaseMixin):
    """Reads and writes jobs; the engine and the CLI share it."""

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{db.WRITE: True})
        self.clock = clock
        # SQLite has one writer at a time; queueing this process's writers here is much faster
        # than letting them contend for the file lock, whose busy handler sleeps between tries.
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed when the block ends."""
        if self._write_lock is None:
            async with self._writer.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._writer.begin() as conn:
            yield conn

    @classmethod
    async def open(cls, url: str, *, auto_upgrade: bool | None = None) -> JobStore:
        """Open the database at ``url``, checking (and on SQLite applying) migrations."""
        engine = db.create_engine(url)
        try:
            upgrade = db.is_sqlite(url) if auto_upgrade is None else auto_upgrade
            await db.prepare(engine, url, auto_upgrade=upgrade)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    async def close(self) -> None:
        """Release every connection."""
        await self.engine.dispose()

    # --- submitting and reading -------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, owner: str | None = None, lease: float = 30.0) -> Job:
        """Insert a job with its steps, all PENDING; the job PENDING, or already RUNNING under
        ``owner`` (``fabricflow run``: no moment in which a daemon could claim it first)."""
        async with self._write() as conn:
            job_id = await self._insert(conn, name=spec.name, kind=JobKind.CREATE,
                                        spec=spec.model_dump(mode="json"), detail=f"submitted {spec.name!r}")
            if owner is not None:
                now = self.clock()
                await conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    state=JobState.RUNNING, lease_owner=owner, started_at=now,
                    lease_expires_at=now + timedelta(seconds=lease)))
                await self._event(conn, job_id, None, JobState.PENDING, JobState.RUNNING, f"claimed by {owner}")
        return await self.get(job_id)

    async def submit_teardown(self, parent_id: str) -> Job:
        """Insert a PENDING teardown job for ``parent_id`` (which must not be RUNNING)."""
        async with self._write() as conn:
            parent = (await conn.execute(select(jobs).where(jobs.c.id == parent_id))).mappings().one()
            if parent["kind"] != JobKind.CREATE:
                raise UserError(f"job {parent_id[:8]} is itself a teardown; there is nothing to tear down")
            job_id = await self._insert(
                conn, name=f"teardown of {parent['name']}", kind=JobKind.TEARDOWN, parent_id=parent_id,
                spec={"teardown_of": parent_id}, detail=f"teardown of job {parent_id} submitted")
            await self._event(conn, parent_id, None, None, None, f"teardown job {job_id} submitted")
        return await self.get(job_id)

    async def _insert(self, conn: AsyncConnection, *, name: str, kind: JobKind, spec: dict[str, Any],
                      detail: str, parent_id: str | None = None) -> str:
        now = self.clock()
        job_id = uuid.uuid4().hex
        await conn.execute(
            insert(jobs).values(
                id=job_id, name=name, kind=kind, parent_id=parent_id, state=JobState.PENDING, spec=spec,
                spec_version=SPEC_VERSION, state_version=STATE_TABLE_VERSION, recoveries=0,
                created_at=now, updated_at=now,
            )
        )
        await conn.execute(
            insert(steps),
            [
                dict(job_id=job_id, name=name, position=i, state=StepState.PENDING,
                     attempts=0, updated_at=now, extra={})
                for i, name in enumerate(order_of(kind))
            ],
        )
        await self._event(conn, job_id, None, None, JobState.PENDING, detail)
        await self._notify(conn, job_id)
        return job_id

    async def _notify(self, conn: AsyncConnection, job_id: str) -> None:
        """Wake listening daemons at commit (PostgreSQL); SQLite daemons poll instead."""
        if self.engine.dialect.name == "postgresql":
            await conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, job_id)))

    async def cancel(self, job_id: str) -> JobState:
        """Cancel a job: a PENDING one at once; a RUNNING one at its runner's next safe point.

        Returns the job's state afterwards (RUNNING means "cancellation requested").
        """
        now = self.clock()
        async with self._write() as conn:
            done = await conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.PENDING)
                .values(state=JobState.CANCELLED, updated_at=now, finished_at=now, cancel_requested_at=now)
            )
            if done.rowcount == 1:
                await self._event(conn, job_id, None, JobState.PENDING, JobState.CANCELLED, "cancelled before it ran")
                return JobState.CANCELLED
            asked = await conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING,
                                   jobs.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=now, updated_at=now)
            )
            if asked.rowcount == 1:
                await self._event(conn, job_id, None, None, None,
                                  "cancellation requested; the job stops at its next safe point")
            state = (await conn.execute(select(jobs.c.state).where(jobs.c.id == job_id))).scalar_one()
        return JobState(state)

    async def retry(self, job_id: str) -> Job:
        """Put a FAILED or CANCELLED job back to PENDING, its failed step too; IDs are kept."""
        now = self.clock()
        async with self._write() as conn:
            row = (await conn.execute(select(jobs.c.state).where(jobs.c.id == job_id))).scalar_one()
            src = JobState(row)
            if src not in (JobState.FAILED, JobState.CANCELLED):
                raise UserError(f"job {job_id[:8]} is {src}; only FAILED or CANCELLED jobs can be retried")
            teardowns = (await conn.execute(
                select(jobs.c.id, jobs.c.state).where(jobs.c.parent_id == job_id, jobs.c.kind == JobKind.TEARDOWN,
                                                      jobs.c.state != JobState.FAILED)
            )).all()
            if teardowns:
                tid, tstate = teardowns[0]
                raise UserError(f"job {job_id[:8]} has a teardown ({tid[:8]}, {tstate}) that deletes or has "
                                "deleted its resources; submit a new job instead of retrying this one")
            failed = (await conn.execute(
                select(steps.c.name).where(steps.c.job_id == job_id, steps.c.state == StepState.FAILED)
            )).scalars().all()
            for name in failed:
                await conn.execute(
                    update(steps).where(steps.c.job_id == job_id, steps.c.name == name,
                                        steps.c.state == StepState.FAILED)
                    .values(state=StepState.PENDING, attempts=0, error=None, finished_at=None,
                            run_after=None, updated_at=now)
                )
                await self._event(conn, job_id, name, StepState.FAILED, StepState.PENDING, "retry requested")
            result = await conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == src)
                .values(state=JobState.PENDING, error=None, recoveries=0, cancel_requested_at=None,
                        finished_at=None, run_after=None, started_at=None, updated_at=now)
            )
            if result.rowcount != 1:
                raise StaleTransition(f"job {job_id} changed state during retry")
            steps_note = f" from step {', '.join(failed)}" if failed else ""
            await self._event(conn, job_id, None, src, JobState.PENDING, f"retry requested{steps_note}")
            await self._notify(conn, job_id)
        return await self.get(job_id)

    async def record_invocation(self, job_id: str, **values: Any) -> Invocation:
        """Store one invocation made outside the procedure (``fabricflow invoke``/``chat``)."""
        async with self._write() as conn:
            result = await conn.execute(
                insert(invocations).values(job_id=job_id, at=self.clock(), **values)
                .returning(*invocations.c)
            )
            row = result.mappings().one()
        return Invocation(**row)

    async def invocations(self, job_id: str) -> list[Invocation]:
        """A job's stored invocations, oldest first."""
        query = select(invocations).where(invocations.c.job_id == job_id).order_by(invocations.c.id)
        async with self.engine.connect() as conn:
            return [Invocation(**row) for row in (await conn.execute(query)).mappings()]

    async def resolve(self, ref: str) -> str:
        """The full job ID for an ID or a unique prefix of one."""
        ref = ref.strip().lower()
        if not ref or not all(c in "0123456789abcdef" for c in ref):
            raise NotFoundError(f"no job {ref!r}: job IDs are hexadecimal")
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(jobs.c.id).where(jobs.c.id.startswith(ref)).limit(6))
            ).scalars().all()
        if not rows:
            raise NotFoundError(f"no job {ref!r}")
        if len(rows) > 1:
            listed = ", ".join(r[:12] for r in rows[:5])
            raise UserError(f"job ID prefix {ref!r} is ambiguous: it matches {listed}; type more of it")
        return rows[0]

    async def get(self, job_id: str) -> Job:
        """The job with its steps; NotFoundError if there is none."""
        async with self.engine.connect() as conn:
            job_row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).mappings().first()
            if job_row is None:
                raise NotFoundError(f"no job {job_id!r}")
            step_rows = (
                await conn.execute(select(steps).where(steps.c.job_id == job_id))
            ).mappings().all()
        return _job(job_row, step_rows)

    async def list(
        self, *, state: str | None = None, name: str | None = None, limit: int = 100
    ) -> list[Job]:
        """Jobs, newest first, without their steps."""
        query = select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
        if state:
            query = query.where(jobs.c.state == state.upper())
        if name:
            query = query.where(jobs.c.name.contains(name, autoescape=True))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_job(row, ()) for row in rows]

    async def events(self, job_id: str, *, after: int = 0) -> list[Event]:
        """The job's events with an id greater than ``after``, oldest first."""
        query = (
            select(events)
            .where(events.c.job_id == job_id, events.c.id > after)
            .order_by(events.c.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [Event(**row) for row in rows]

    async def release(self, job_id: str, owner: str, *, detail: str, crashed: bool = False) -> None:
        """Hand a RUNNING job back: PENDING, no owner.

        ``crashed`` (the run died of an unexpected error) delays the next claim a little, so a job
        that always crashes cannot spin; its runs count towards the poison-job limit.
        """
        values: dict[str, Any] = {}
        if crashed:
            values["run_after"] = self.clock() + timedelta(seconds=5)
        await self._move_job(job_id, owner, JobState.PENDING, detail=detail, **values)

    async def finish(
        self, job_id: str, owner: str, state: JobState, *, detail: str,
        error: dict[str, Any] | None = None, result: dict[str, Any] | None = None,
    ) -> None:
        """End a RUNNING job in a terminal state."""
        values: dict[str, Any] = {"error": error}
        if result is not None:
            values["result"] = result
        await self._move_job(job_id, owner, state, detail=detail, **values)

    async def _move_job(self, job_id: str, owner: str, to: JobState, *, detail: str, **values: Any) -> None:
        check_job_edge(JobState.RUNNING, to)
        now = self.clock()
        values.update(state=to, lease_owner=None, lease_expires_at=None, updated_at=now)
        if to.is_terminal:
            values["finished_at"] = now
        async with self._write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING, jobs.c.lease_owner == owner)
                .values(**values)
            )
            if result.rowcount != 1:
                raise StaleTransition(f"job {job_id} is no longer RUNNING under {owner}")
            await self._event(conn, job_id, None, JobState.RUNNING, to, detail)

    # --- steps ------------------------------------------------------------------------------

    async def move_step(
        self, job_id: str, owner: str, name: StepName, *, expected: StepState, to: StepState,
        detail: str, job_result: dict[str, Any] | None = None, fail_job: bool = False, **fields: Any,
    ) -> None:
        """Compare-and-set one step from ``expected`` to ``to`` and log it, under the lease.

        ``job_result`` is stored on the job in the same transaction (the invocation's reply);
        ``fail_job`` ends the job FAILED with the step's error in the same transaction too, so a
        crash can never leave a RUNNING job behind a FAILED step.
        """
        check_step_edge(expected, to)
        now = self.clock()
        fields.update(state=to, updated_at=now)
        if expected is StepState.PENDING:
            fields.setdefault("started_at", now)
        if to in (StepState.SUCCEEDED, StepState.SKIPPED, StepState.FAILED):
            fields.setdefault("finished_at", now)
        held = exists().where(jobs.c.id == job_id, jobs.c.lease_owner == owner,
                              jobs.c.state == JobState.RUNNING)
        async with self._write() as conn:
            result = await conn.execute(
                update(steps)
                .where(steps.c.job_id == job_id, steps.c.name == name, steps.c.state == expected, held)
                .values(**fields)
            )
            if result.rowcount != 1:
                raise StaleTransition(f"step {name} of job {job_id} is not {expected} under {owner}")
            # Any committed transition is progress: the streak of interrupted runs is over.
            job_values: dict[str, Any] = {"updated_at": now, "recoveries": 0}
            if job_result is not None:
                job_values["result"] = job_result
            if fail_job:
                check_job_edge(JobState.RUNNING, JobState.FAILED)
                job_values.update(state=JobState.FAILED, error=fields.get("error"), lease_owner=None,
                                  lease_expires_at=None, finished_at=now)
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(**job_values))
            await self._event(conn, job_id, name, expected, to, detail)
            if fail_job:
                await self._event(conn, job_id, None, JobState.RUNNING, JobState.FAILED,
                                  f"step {name} failed: {detail}")

    async def note(self, job_id: str, detail: str, *, step: StepName | None = None) -> None:
        """Log an event that changes no state (a retry, a poll result worth keeping)."""
        async with self._write() as conn:
            await self._event(conn, job_id, step, None, None, detail)

    async def _event(
        self, conn: AsyncConnection, job_id: str, step: str | None, src: str | None,
        dst: str | None, detail: str,
    ) -> None:
        await conn.execute(
            insert(events).values(job_id=job_id, at=self.clock(), step=step,
                                  from_state=src, to_state=dst, detail=detail)
        )

    async def count(self, *, state: JobState | None = None) -> int:
        """How many jobs there are (in a state)."""
        query = select(func.count()).select_from(jobs)
        if state is not None:
            query = query.where(jobs.c.state == state)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())


def _job(row: Any, step_rows: Iterable[Any]) -> Job:
    parsed = {
        StepName(s["name"]): Step(
            name=StepName(s["name"]),
            state=StepState(s["state"]),
            resource_id=s["resource_id"],
            resource_status=s["resource_status"],
            request_name=s["request_name"],
            extra=s["extra"] or {},
            attempts=s["attempts"],
            error=s["error"],
            started_at=s["started_at"],
            updated_at=s["updated_at"],
            finished_at=s["finished_at"],
        )
        for s in step_rows
    }
    return Job(
        id=row["id"], name=row["name"], state=JobState(row["state"]), spec=row["spec"],
        kind=JobKind(row["kind"]), parent_id=row["parent_id"],
        cancel_requested_at=row["cancel_requested_at"], started_at=row["started_at"],
        steps=parsed, created_at=row["created_at"], updated_at=row["updated_at"],
        spec_version=row["spec_version"], state_version=row["state_version"], error=row["error"],
        result=row["result"], lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"], recoveries=row["recoveries"],
        finished_at=row["finished_at"],
    )
