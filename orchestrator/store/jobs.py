"""JobStore: every read and write of jobs, steps and events.

Each state change is a compare-and-set (update where the id, the expected state and the lease
owner match) in the same transaction as its ``events`` row, so the log and the tables never
disagree and a daemon that lost its lease cannot overwrite the new owner's work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.domain import Event, Invocation, Job
from orchestrator.errors import NotFoundError, StaleTransition, UserError
from orchestrator.machine import (
    JobKind,
    JobState,
    StepName,
    StepState,
)
from orchestrator.spec import JobSpec
from orchestrator.store import db, ops
from orchestrator.store.leases import NOTIFY_CHANNEL, LeaseMixin
from orchestrator.store.readonly import LIVE_TEARDOWN, job_from_row, job_ref, the_one
from orchestrator.store.schema import events, invocations, jobs, steps
from orchestrator.store.writer import Dialect, Op, PostgresWriter, SQLiteWriter, Sql, Writer


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class JobStore(LeaseMixin):
    """Reads and writes jobs; the engine and the CLI share it.

    The hot path's writes (submits, claims, leases, step transitions, job ends) go through one
    ``Writer`` per process, which commits them in batches (group commit); reads go through
    SQLAlchemy's async engine, as do the CLI's rare writes (cancel, retry, teardown, invoke).
    """

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = utcnow,
                 writer: Writer | None = None) -> None:
        self.engine = engine
        self._sa_writer = engine.execution_options(**{db.WRITE: True})
        self.clock = clock
        self._writer: Writer = writer or _writer_for(engine, clock)
        # SQLite has one writer at a time; queueing this process's writers here is much faster
        # than letting them contend for the file lock, whose busy handler sleeps between tries.
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed when the block ends."""
        if self._write_lock is None:
            async with self._sa_writer.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._sa_writer.begin() as conn:
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
        """Finish the queued writes and release every connection."""
        await self._writer.close()
        await self.engine.dispose()

    @property
    def writer(self) -> Writer:
        """The group-commit writer (its ``stats()`` count batches, operations, statements)."""
        return self._writer

    # --- submitting and reading -------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, owner: str | None = None, lease: float = 30.0,
                     job_id: str | None = None) -> Job:
        """Insert a job with its steps, all PENDING; the job PENDING, or already RUNNING under
        ``owner`` (``fabricflow run``: no moment in which a daemon could claim it first)."""
        (job_id,) = await self.submit_many([spec], owner=owner, lease=lease,
                                           ids=None if job_id is None else [job_id])
        return await self.get(job_id)

    async def submit_many(self, specs: Iterable[JobSpec], *, owner: str | None = None,
                          lease: float = 30.0, ids: Sequence[str] | None = None) -> list[str]:
        """Insert many jobs in one transaction, durable when this returns; their IDs in order.

        ``ids`` gives the jobs IDs chosen beforehand (``{job}`` in a spec is replaced by its job's
        ID before the spec is validated); by default each gets a new one.
        """
        batch = list(specs)
        if ids is not None and len(ids) != len(batch):
            raise ValueError(f"{len(batch)} specs but {len(ids)} job IDs")
        new = [ops.NewJob(name=spec.name, kind=JobKind.CREATE, spec=spec.model_dump(mode="json"),
                          detail=f"submitted {spec.name!r}", **({} if ids is None else {"id": ids[n]}))
               for n, spec in enumerate(batch)]
        if not new:
            return []
        return await self._writer.run(ops.insert_jobs(new, at=self.clock(), owner=owner, lease=lease,
                                                      notify=NOTIFY_CHANNEL))

    async def submit_teardown(self, parent_id: str) -> Job:
        """Insert a PENDING teardown job for ``parent_id`` (which must not be RUNNING)."""
        at = self.clock()

        def op(d: Dialect) -> Op[str]:
            found = yield Sql("SELECT name, kind FROM jobs WHERE id = :id", {"id": parent_id})
            if not found.rows:
                raise NotFoundError(f"no job {parent_id!r}")
            parent = found.rows[0]
            if parent["kind"] != JobKind.CREATE:
                raise UserError(f"job {parent_id[:8]} is itself a teardown; there is nothing to tear down")
            # One teardown at a time, and none after one that succeeded: its resources are gone.
            # After a FAILED or CANCELLED teardown a new one deletes what is left.
            earlier = yield Sql("SELECT id, state FROM jobs WHERE parent_id = :id AND kind = 'teardown' AND state"
                                " IN ('PENDING', 'RUNNING', 'SUCCEEDED') ORDER BY created_at DESC, id LIMIT 1",
                                {"id": parent_id})
            if earlier.rows:
                tid, tstate = earlier.rows[0]["id"], earlier.rows[0]["state"]
                done = "tore it down" if tstate == JobState.SUCCEEDED else "is to tear it down"
                raise UserError(f"job {parent_id[:8]} already has a teardown: {tid[:8]} ({tstate}) {done}; "
                                f"fabricflow show {tid[:8]} tells what it deleted and kept")
            new = ops.NewJob(name=f"teardown of {parent['name']}", kind=JobKind.TEARDOWN, parent_id=parent_id,
                             spec={"teardown_of": parent_id}, detail=f"teardown of job {parent_id} submitted")
            yield from ops.insert_jobs([new], at=at, notify=NOTIFY_CHANNEL)(d)
            yield from ops.note(parent_id, f"teardown job {new.id} submitted", at=at)(d)
            return new.id

        return await self.get(await self._writer.run(op))

    async def _notify(self, conn: AsyncConnection, job_id: str) -> None:
        """Wake listening daemons at commit (PostgreSQL); SQLite daemons poll instead."""
        if self.engine.dialect.name == "postgresql":
            await conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, job_id)))

    async def cancel(self, job_id: str, *, detail: str = "cancelled before it ran") -> JobState:
        """Cancel a job: a PENDING one at once (``detail`` is its event's); a RUNNING one at its
        runner's next safe point.

        Returns the job's state afterwards (RUNNING means "cancellation requested").
        """
        now = self.clock()
        async with self._write() as conn:
            done = await conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.PENDING)
                .values(state=JobState.CANCELLED, updated_at=now, finished_at=now, cancel_requested_at=now)
            )
            if done.rowcount == 1:
                await self._event(conn, job_id, None, JobState.PENDING, JobState.CANCELLED, detail)
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
            teardown = (await conn.execute(text(LIVE_TEARDOWN), {"id": job_id})).first()
            if teardown is not None:
                tid, tstate = teardown
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
        ref = job_ref(ref)
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(jobs.c.id).where(jobs.c.id.startswith(ref)).limit(6))
            ).scalars().all()
        return the_one(ref, list(rows))

    async def live_teardown(self, job_id: str) -> tuple[str, str] | None:
        """The job's teardown that deletes or has deleted some of it (``readonly.LIVE_TEARDOWN``), as
        (ID, state), or None."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(LIVE_TEARDOWN), {"id": job_id})).first()
        return (row[0], row[1]) if row is not None else None

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

    async def release(self, job_id: str, owner: str, *, detail: str, crashed: bool = False,
                      moves: Sequence[ops.StepMove] = ()) -> None:
        """Hand a RUNNING job back: PENDING, no owner (after ``moves``, in the same transaction).

        ``crashed`` (the run died of an unexpected error) delays the next claim a little, so a job
        that always crashes cannot spin; its runs count towards the poison-job limit.
        """
        values: dict[str, Any] = {}
        if crashed:
            values["run_after"] = self.clock() + timedelta(seconds=5)
        await self.commit(job_id, owner, moves, end=ops.JobEnd(JobState.PENDING, detail, values))

    async def finish(
        self, job_id: str, owner: str, state: JobState, *, detail: str,
        error: dict[str, Any] | None = None, result: dict[str, Any] | None = None,
        moves: Sequence[ops.StepMove] = (),
    ) -> None:
        """End a RUNNING job in a terminal state (after ``moves``, in the same transaction)."""
        await self.commit(job_id, owner, moves, end=ops.JobEnd(state, detail, {"error": error}), result=result)

    async def commit(self, job_id: str, owner: str, moves: Sequence[ops.StepMove], *,
                     end: ops.JobEnd | None = None, result: dict[str, Any] | None = None,
                     renew: float | None = None) -> None:
        """Commit step transitions, the job's end and a lease renewal as one compare-and-set
        unit under the lease (``ops.commit``); raises StaleTransition if any of it is stale."""
        await self._writer.run(ops.commit(job_id, owner, at=self.clock(), moves=moves, end=end,
                                          result=result, renew=renew))

    async def move_step(
        self, job_id: str, owner: str, name: StepName, *, expected: StepState, to: StepState,
        detail: str, job_result: dict[str, Any] | None = None, fail_job: bool = False, **fields: Any,
    ) -> None:
        """Compare-and-set one step from ``expected`` to ``to`` and log it, under the lease.

        ``job_result`` is stored on the job in the same transaction (the invocation's reply);
        ``fail_job`` ends the job FAILED with the step's error in the same transaction too, so a
        crash can never leave a RUNNING job behind a FAILED step.
        """
        end = (ops.JobEnd(JobState.FAILED, f"step {name} failed: {detail}", {"error": fields.get("error")})
               if fail_job else None)
        await self.commit(job_id, owner, [ops.StepMove(name, expected, to, detail, fields)], end=end,
                          result=job_result)

    async def note(self, job_id: str, detail: str, *, step: StepName | None = None) -> None:
        """Log an event that changes no state (a retry, a poll result worth keeping)."""
        await self._writer.run(ops.note(job_id, detail, at=self.clock(), step=step))

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
    return job_from_row(row, step_rows)


def _writer_for(engine: AsyncEngine, clock: Callable[[], datetime]) -> Writer:
    if engine.dialect.name == "postgresql":
        return PostgresWriter(engine)
    database = engine.url.database
    if not database or database == ":memory:":
        raise UserError("fabricflow needs a database file, not an in-memory SQLite database")
    return SQLiteWriter(str(Path(database).expanduser()), clock=clock)
