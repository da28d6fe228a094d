"""The Python API: every operation of the command line, from your own asyncio code.

::

    import asyncio
    import orchestrator

    async def main() -> None:
        async with orchestrator.connect(db="jobs.db") as ff:  # the embedded emulator by default
            job = await ff.run("spec.yaml")                   # submit and execute here
            print(job.id, job.state, job.result)

    asyncio.run(main())

A ``Fabricflow`` holds one job database and one Fabric (a real one, by ``fabric_url`` or
``region``, or the embedded emulator, which lives as long as the ``Fabricflow`` does). It follows
the command line's rules: a spec is validated (and the resources it reuses are checked) before
anything is written; errors are those of ``orchestrator.errors``, with the CLI's messages;
secrets never reach a repr, the database or an exception. It configures no logging: fabricflow
logs through structlog once the host has configured structlog, else through the standard
library's ``logging`` (loggers named ``orchestrator....``), so the host decides what is shown.

``orchestrator.sync.SyncFabricflow`` offers the same methods to code without an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeAlias, cast
from urllib.parse import quote

from orchestrator.domain import Event, Invocation, Job
from orchestrator.errors import (
    DatabaseError,
    FabricError,
    InvocationFailedError,
    JobFailedError,
    NotFoundError,
    UserError,
)
from orchestrator.machine import JobKind, JobState, StepName, StepState
from orchestrator.submission import Prepared, SpecSource, specs_for

# SQLAlchemy, aiohttp, pydantic, the engine and the emulator are imported where they are used:
# importing this module stays cheap, so that quick commands (list, show) can go through it.
if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.engine.runner import Observer
    from orchestrator.fabric.client import FabricClient
    from orchestrator.orphans import DeleteEvent, Deletion, Orphan
    from orchestrator.plan import Plan
    from orchestrator.spec import JobSpec
    from orchestrator.store.jobs import JobStore
    from orchestrator.store.overview import DaemonRow, Fetch, Overview
    from orchestrator.store.readonly import ReadOnlyStore
    from orchestrator.wiring import Target

__all__ = ["Cancellation", "Fabricflow", "JobRef", "Prepared", "SpecSource", "connect"]


JobRef: TypeAlias = "str | Job"
"""A job: its ID, any unique prefix of it, or the ``Job`` itself."""

#: How often ``wait`` and ``events(follow=True)`` read the database, in seconds (as the CLI does).
POLL_SECONDS = 0.5

#: Jobs ``prune`` removes per transaction: a prune of months never holds the write lock for long.
PRUNE_BATCH = 500

#: Job IDs are this many hexadecimal digits (uuid4().hex); a longer "prefix" is no job's.
JOB_ID_LENGTH = 32


@dataclass(frozen=True, slots=True)
class Cancellation:
    """What ``Fabricflow.cancel`` did: the job afterwards, and the teardown job it submitted."""

    job: Job
    """The job as it is now: CANCELLED, or still RUNNING until its runner's next safe point."""
    teardown: Job | None = None
    """The teardown job (``teardown=True``); a daemon runs it once the job has stopped."""

    @property
    def requested(self) -> bool:
        """True when the job is still running and stops at its next safe point."""
        return not self.job.state.is_terminal


class Fabricflow:
    """One job database and one Fabric: submit, run, watch and manage jobs.

    Open it with ``await Fabricflow.open(...)`` (close it with ``await ff.close()`` or
    ``async with ff:``), or with ``async with orchestrator.connect(...) as ff:``.
    """

    def __init__(self, settings: Settings, store: JobStore | ReadOnlyStore, *, writable: bool) -> None:
        """Use ``Fabricflow.open``; this takes parts it has built."""
        self._settings = settings
        self._store = store
        self._writable = writable
        self._fabric: tuple[Target, FabricClient] | None = None
        self._fabric_stack = contextlib.AsyncExitStack()
        self._fabric_lock = asyncio.Lock()
        self._closed = False
        self._announce = False

    @classmethod
    async def open(
        cls,
        db: str | os.PathLike[str] | None = None,
        *,
        fabric_url: str | None = None,
        fabric_ep_url: str | None = None,
        region: str | None = None,
        config: str | os.PathLike[str] | None = None,
        create: bool = True,
        read_only: bool = False,
        **overrides: Any,
    ) -> Fabricflow:
        """Open the job database and get ready to talk to Fabric.

        ``db``: a SQLite file's path, or a database URL (``sqlite+aiosqlite:///jobs.db``,
        ``postgresql://user@host/fabricflow``); by default ``FABRICFLOW_DB`` or the CLI's default
        file. ``fabric_url`` (``"embedded"`` for the bundled emulator, the default),
        ``fabric_ep_url`` and ``region`` pick Fabric as ``--fabric-url``, ``--fabric-ep-url`` and
        ``--region`` do; ``config`` is a TOML file like ``--config``. Settings come, as for the
        CLI, from these arguments, then ``FABRICFLOW_...`` variables, the config file and the
        defaults; credentials from the environment or the SDK's credentials file. Any other
        setting can be passed by name, e.g. ``poll={"initial": 0.5}``.

        ``create=False`` refuses to create a missing SQLite file (NotFoundError, as the CLI's
        read commands do); ``read_only=True`` also reads a current SQLite file through the
        standard library, read-only, and refuses every write. An older SQLite file is migrated;
        a PostgreSQL database must be at the current schema (``fabricflow db upgrade``).

        The embedded emulator starts when something first needs Fabric (``run``, ``serve``,
        ``invoke``) and stops, with everything it holds, when this ``Fabricflow`` closes.
        """
        from orchestrator.config import load_settings

        settings = load_settings(
            None if config is None else Path(config), db=None if db is None else _db_url(db),
            fabric_url=fabric_url, fabric_ep_url=fabric_ep_url, region=region, **overrides)
        store = await (_open_reader(settings.db) if read_only else _open_store(settings.db, create=create))
        return cls(settings, store, writable=not read_only)

    @classmethod
    async def from_settings(cls, settings: Settings, *, create: bool = True, read_only: bool = False,
                            announce: bool = False) -> Fabricflow:
        """Open the job database of ``settings`` already loaded (``orchestrator.config.load_settings``).

        ``create`` and ``read_only`` as for ``open``. ``announce=True`` prints one line on stderr
        when the embedded emulator starts (where it listens), as the command line does. Only
        ``settings.db`` is read until something needs Fabric.
        """
        store = await (_open_reader(settings.db) if read_only else _open_store(settings.db, create=create))
        flow = cls(settings, store, writable=not read_only)
        flow._announce = announce
        return flow

    async def close(self) -> None:
        """Stop the embedded emulator (if it runs), close the Fabric client and the database."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._fabric_stack.aclose()
        finally:
            await self._store.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Fabricflow(db={self.db!r}, fabric={self.fabric!r})"

    @property
    def db(self) -> str:
        """The database as a user recognises it: the file, or the URL without its password."""
        return _describe(self._settings.db)

    @property
    def is_embedded(self) -> bool:
        """True when the embedded emulator stands in for Fabric."""
        return self._settings.is_embedded

    @property
    def fabric(self) -> str:
        """Where Fabric is: its URL, or ``embedded`` (with the emulator's URL once it runs)."""
        if not self.is_embedded:
            return self._settings.fabric_url
        return f"embedded at {self._fabric[0].fabric_url}" if self._fabric is not None else "embedded"

    # --- submitting and running ---------------------------------------------------------------

    async def submit(self, spec: SpecSource) -> Job:
        """Validate a spec and enqueue it for a daemon (``serve``, or ``fabricflow daemon``).

        Returns the new job, PENDING. Nothing is written if the spec is bad (UserError, one
        line per problem) or, on a real Fabric, if a resource it reuses is missing (NotFoundError).
        ``{job}`` in the spec's strings becomes the first 8 hex digits of the job's ID.
        """
        (job_id,) = await self.submit_many([spec])
        with self._database_errors():
            return await self._store.get(job_id)

    async def submit_many(self, specs: Iterable[SpecSource] | Prepared, *, count: int = 1) -> list[str]:
        """Validate specs and enqueue ``count`` copies of each in one transaction; their IDs in order.

        ``{index}`` in a spec's strings becomes the job's number in this call (0, 1, 2, ...,
        counting on across the specs in order) and ``{job}`` its ID's first 8 digits; with
        ``count`` above 1 a spec whose resource names have neither is refused. Every copy is
        checked before anything is written: all jobs are submitted, or (UserError) none. Specs
        already ``Prepared`` are submitted as they are, under their IDs (``count`` must be 1).
        """
        store = self._job_store()
        job_ids, parsed = _prepared(specs, count=count)
        await self._check_reused(parsed)
        with self._database_errors():
            return await store.submit_many(parsed, ids=job_ids)

    async def run(self, spec: SpecSource | Prepared, *, observer: Observer | None = None,
                  stop: asyncio.Event | None = None, check: bool = False,
                  on_submitted: Callable[[Job], None] | None = None,
                  on_stopped: Callable[[Job], None] | None = None) -> Job:
        """Submit a spec and execute it here, as ``fabricflow run`` does; returns the final job.

        ``observer`` sees each step transition (``on_step``) and each piece of the streamed reply
        (``on_text``) as they happen. Setting ``stop``, or cancelling the call, stops the job at
        its next safe point (never between a create and the recording of its result): it is left
        PENDING for a daemon, or CANCELLED on the embedded emulator, whose resources end with
        this ``Fabricflow``. A stopped call returns the job; a cancelled one raises CancelledError.
        ``check=True`` raises JobFailedError unless the job SUCCEEDED. ``on_submitted`` sees the
        job once it is committed, before it runs; ``on_stopped`` the job as a stop (or its runner
        handing it back) left it before it ended: PENDING, or CANCELLED on the embedded emulator.
        ``spec`` may be one spec ``Prepared`` already (then it keeps its ID).
        """
        from orchestrator.engine.daemon import heartbeat, new_owner
        from orchestrator.engine.procedure import check_reused
        from orchestrator.engine.runner import EngineSettings, Runner

        store = self._job_store()
        job_ids, specs = _prepared(spec if isinstance(spec, Prepared) else [spec], count=1)
        if len(job_ids) != 1:
            raise UserError(f"run takes one spec, not {len(job_ids)}")
        (job_id,), (parsed,) = job_ids, specs
        target, client = await self._client()
        with self._database_errors():
            await check_reused(client, parsed)  # a missing reused resource: nothing is written
            owner = new_owner()
            job = await store.submit(parsed, owner=owner, lease=self._settings.daemon.lease_seconds,
                                     job_id=job_id)
            if on_submitted is not None:
                on_submitted(job)
            runner = Runner(store, client, owner=owner, settings=EngineSettings.from_settings(self._settings),
                            observer=observer)
            async with heartbeat(store, runner, self._settings.daemon):
                task = asyncio.ensure_future(runner.run(job))
                relay = asyncio.ensure_future(_relay(stop, runner.stop.set)) if stop is not None else None
                try:
                    state = await asyncio.shield(task)
                except asyncio.CancelledError:
                    runner.stop.set()
                    state = await task  # to the safe point
                    await self._after_stop(job.id, state, target, None)
                    raise
                finally:
                    if relay is not None:
                        relay.cancel()
            await self._after_stop(job.id, state, target, on_stopped)
            final = await store.get(job.id)
        if check and final.state is not JobState.SUCCEEDED:
            raise JobFailedError(final)
        return final

    async def _after_stop(self, job_id: str, state: JobState, target: Target,
                          on_stopped: Callable[[Job], None] | None) -> None:
        if state is not JobState.PENDING:
            return
        if target.embedded:
            # Nothing could finish it once the emulator is gone.
            await self._job_store().cancel(job_id, detail="stopped, and cancelled: its resources were in the "
                                                          "embedded emulator, which ends with this process")
        if on_stopped is not None:
            on_stopped(await self._store.get(job_id))

    async def wait(self, job: JobRef, *, check: bool = False) -> Job:
        """Wait until the job has ended (SUCCEEDED, FAILED or CANCELLED); returns it.

        Something must run it: ``serve`` in this process, or a ``fabricflow daemon``. Bound the
        wait with ``asyncio.timeout``. ``check=True`` raises JobFailedError unless it SUCCEEDED.
        """
        with self._database_errors():
            job_id = await self._resolve(job)
            while not (current := await self._store.get(job_id)).state.is_terminal:
                await asyncio.sleep(POLL_SECONDS)
        if check and current.state is not JobState.SUCCEEDED:
            raise JobFailedError(current)
        return current

    async def events(self, job: JobRef, *, follow: bool = False, after: int = 0) -> AsyncGenerator[Event, None]:
        """The job's event log, oldest first: every transition, retry and adoption.

        ``follow=True`` goes on yielding events as they are committed, and ends once the job has
        ended and its last event is out. ``after``: only events with a greater ``id``.
        """
        with self._database_errors():
            job_id = await self._resolve(job)
            while True:
                ended = not follow or (await self._store.get(job_id)).state.is_terminal  # before: none missed
                # (cast: the stores name a method ``list``, which mypy confuses with the type)
                for event in cast("list[Event]", await self._store.events(job_id, after=after)):
                    after = event.id
                    yield event
                if ended:
                    return
                await asyncio.sleep(POLL_SECONDS)

    # --- reading ------------------------------------------------------------------------------

    async def get(self, job: JobRef) -> Job:
        """The job, step by step, as last committed (``fabricflow show``).

        NotFoundError if no job has this ID (or prefix); UserError if a prefix matches several.
        """
        with self._database_errors():
            return await self._store.get(await self._resolve(job))

    async def resolve(self, job: JobRef) -> str:
        """The full ID of a job given by ID, unique prefix or ``Job``."""
        with self._database_errors():
            return await self._resolve(job)

    async def invocations(self, job: JobRef) -> list[Invocation]:
        """The invocations ``invoke`` stored for the job, oldest first."""
        with self._database_errors():
            return await self._job_store().invocations(await self._resolve(job))

    # --- lifecycle ----------------------------------------------------------------------------

    async def cancel(self, job: JobRef, *, teardown: bool = False) -> Cancellation:
        """Cancel a job: a PENDING one ends CANCELLED at once; a RUNNING one at its next safe point.

        ``teardown=True`` also submits a teardown job deleting what the job created (it runs
        once the job has stopped), and then accepts a job that has already ended. UserError if
        the job has ended and no teardown is asked for.
        """
        store = self._job_store()
        with self._database_errors():
            job_id = await self._resolve(job)
            current = await store.get(job_id)
            if current.state.is_terminal:
                if not teardown:
                    raise UserError(f"job {job_id[:8]} already ended {current.state}; nothing to cancel")
            else:
                await store.cancel(job_id)
            created = await store.submit_teardown(job_id) if teardown else None
            return Cancellation(job=await store.get(job_id), teardown=created)

    async def retry(self, job: JobRef) -> Job:
        """Put a FAILED or CANCELLED job back to PENDING, from its failed step, keeping its IDs.

        A daemon continues it. UserError for a job in another state, or one with a teardown.
        """
        store = self._job_store()
        with self._database_errors():
            return await store.retry(await self._resolve(job))

    async def teardown(self, job: JobRef) -> Job:
        """Submit a teardown job deleting exactly what the ended job created, in reverse order.

        Reused resources and adopted ones are kept. Returns the teardown job, PENDING: a durable
        job of its own, which a daemon runs. UserError if the job has not ended (cancel it with
        ``teardown=True`` instead), is itself a teardown, or has a teardown still to run, running
        or succeeded (a new one is accepted after one that failed or was cancelled).
        """
        store = self._job_store()
        with self._database_errors():
            job_id = await self._resolve(job)
            current = await store.get(job_id)
            if not current.state.is_terminal:
                raise UserError(f"job {job_id[:8]} is {current.state}; cancel it first: "
                                f"fabricflow cancel {job_id[:8]} --teardown")
            return await store.submit_teardown(job_id)

    async def invoke(
        self,
        job: JobRef,
        message: str | Sequence[Mapping[str, str]],
        *,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        on_text: Callable[[str], None] | None = None,
        check: bool = False,
    ) -> Invocation:
        """A new streamed chat completion on the job's service instance, stored with the job.

        ``message`` is the user's message, or a whole conversation (``[{"role": ..., "content":
        ...}, ...]``); ``system`` is sent before it. ``on_text`` sees each piece of the reply as
        it arrives. Returns the stored record: its ``reply``, ``usage``, ``finish_reason``, time
        to first token and duration, or its ``error`` if Fabric refused (or could not be
        reached). ``check=True`` raises InvocationFailedError instead, with the stored record
        and the FabricError, once the record is stored. On the embedded emulator, only a job
        this ``Fabricflow`` ran can be invoked (its resources are here).
        """
        store = self._job_store()
        if self.is_embedded and self._fabric is None:
            raise UserError("invoke talks to the Fabric the job ran against, and the embedded emulator "
                            "keeps nothing between runs: run the job with this Fabricflow first, or open "
                            "it with fabric_url= (a real Fabric, or a running `fabricflow emulator`)")
        messages = ([{"role": "system", "content": system}] if system else []) + (
            [{"role": "user", "content": message}] if isinstance(message, str) else [dict(m) for m in message])
        options = {key: value for key, value in
                   {"temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}.items() if value is not None}
        with self._database_errors():
            target_job = await _target_of(store, await self._resolve(job))
            _target, client = await self._client()
            record, error = await _invoke_once(store, target_job, client, {"messages": messages, **options},
                                               on_text)
        if check and error is not None:
            raise InvocationFailedError(record, error)
        return record

    async def invocable(self, job: JobRef) -> Job:
        """The job, if ``invoke`` can talk to it: a create job whose service instance is RUNNING.

        UserError otherwise (a teardown job, or one whose service_ready step has not succeeded).
        """
        with self._database_errors():
            return await _target_of(self._store, await self._resolve(job))

    # --- the daemon ---------------------------------------------------------------------------

    async def serve(
        self,
        *,
        stop: asyncio.Event | None = None,
        ready: asyncio.Event | None = None,
        concurrency: int | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        on_metrics_ready: Callable[[str], None] | None = None,
        on_started: Callable[[str], None] | None = None,
    ) -> None:
        """Run submitted jobs in this event loop, as ``fabricflow daemon`` does, until stopped.

        It stops (drains: running jobs stop at their next safe point, PENDING again for the next
        daemon) when ``stop`` is set, when the call is cancelled (then it raises CancelledError
        once drained), or on SIGTERM/SIGINT while it runs in the main thread; the process's own
        handlers of those signals are back when it returns. ``ready`` is set once it claims
        jobs. On SQLite one daemon owns a file (UserError for a second) and resumes at start-up
        every job a crashed daemon left RUNNING. ``metrics_port`` serves ``/healthz`` and
        ``/metrics`` on ``metrics_host`` (0: a free port, told to ``on_metrics_ready(url)``); an
        address it cannot listen on is a UserError, raised before the daemon registers or claims
        anything. ``on_started`` is told the daemon's owner ID (as ``fabricflow status`` lists it)
        once it is registered.
        """
        from orchestrator.engine.daemon import Daemon, new_owner
        from orchestrator.engine.health import DaemonMetrics
        from orchestrator.engine.runner import EngineSettings, Runner

        store = self._job_store()
        if concurrency is not None and concurrency < 1:
            raise UserError(f"concurrency must be at least 1, got {concurrency}")
        daemon_settings = self._settings.daemon
        if concurrency is not None:
            daemon_settings = daemon_settings.model_copy(update={"concurrency": concurrency})
        _target, client = await self._client()
        metrics = DaemonMetrics()
        runner = Runner(store, client, owner=new_owner(), settings=EngineSettings.from_settings(self._settings),
                        observer=metrics)
        daemon = Daemon(store, runner, daemon_settings, url=self._settings.db, metrics=metrics,
                        metrics_address=None if metrics_port is None else (metrics_host, metrics_port),
                        on_metrics_ready=on_metrics_ready, on_started=on_started)
        with self._database_errors(), _signals_restored():
            task = asyncio.ensure_future(daemon.run(ready=ready))
            relay = asyncio.ensure_future(_relay(stop, daemon.stop)) if stop is not None else None
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                daemon.stop()
                await task  # drained
                raise
            finally:
                if relay is not None:
                    relay.cancel()

    async def states(self, jobs: Iterable[JobRef]) -> dict[str, JobState]:
        """The current state of each job, by full ID, read in a few queries rather than one per
        job (a job given as a prefix is resolved first). A job no longer in the database is absent."""
        with self._database_errors():
            ids: list[str] = []
            for job in jobs:
                full = isinstance(job, str) and len(job) == JOB_ID_LENGTH
                ids.append(job if isinstance(job, str) and full else await self._resolve(job))
            if not self._writable:
                found: dict[str, JobState] = {}
                for job_id in ids:
                    with contextlib.suppress(NotFoundError):
                        found[job_id] = (await self._store.get(job_id)).state
                return found
            return await _states(self._job_store(), ids)

    # --- operating -----------------------------------------------------------------------------

    async def overview(self, *, limit: int = 5) -> Overview:
        """One look at how fabricflow is doing (``fabricflow status``): the daemons, how many jobs
        are in each state, the ``limit`` oldest running jobs and the ``limit`` latest failures."""
        from orchestrator.store.overview import read_overview

        with self._database_errors():
            async with self._fetching() as (fetch, now):
                return await read_overview(fetch, limit=limit, now=now)

    async def daemons(self) -> list[DaemonRow]:
        """The daemons of the registry not stopped, each judged alive or stale as ``fabricflow
        status`` judges it (``DaemonRow.is_alive``): is anything running this database's jobs?"""
        from orchestrator.store.overview import read_daemons

        with self._database_errors():
            async with self._fetching() as (fetch, now):
                return await read_daemons(fetch, now=now)

    @contextlib.asynccontextmanager
    async def _fetching(self) -> AsyncIterator[tuple[Fetch, datetime | None]]:
        """A ``fetch`` for ``store.overview``'s plain SQL on this database, and the clock its
        daemons write with: this machine's on SQLite, None (the server's, read by the query) else."""
        from orchestrator.store.readonly import ReadOnlyStore

        store = self._store
        # SQLite: the one daemon of a file writes with this machine's clock.
        if isinstance(store, ReadOnlyStore):
            yield store.fetch, datetime.now(UTC)
            return
        from sqlalchemy import text

        local = store.engine.dialect.name == "sqlite"
        async with store.engine.connect() as conn:
            async def fetch(sql: str, params: dict[str, Any]) -> list[Any]:
                return list((await conn.execute(text(sql), params)).mappings())

            yield fetch, datetime.now(UTC) if local else None

    async def find_orphans(self, *, recheck: bool = False,
                           on_start: Callable[[str], None] | None = None) -> list[Orphan]:
        """Resources on Fabric carrying a fabricflow marker that no job in this database records
        (``fabricflow orphans``); those never to be deleted come too, marked ``skipped``.

        It looks through every workspace and what each holds; ``on_start`` is told Fabric's URL as
        the look begins. ``recheck=True`` judges what was found again against the jobs as they are
        afterwards (do so just before deleting). Reads only, on Fabric and in the database. Each
        listing is retried on transient errors (``RetryPolicy.from_settings``: a step's backoff,
        at most ``retries.COMMAND_ATTEMPTS`` calls); one that still fails raises its RetryableError.
        """
        from orchestrator.orphans import find_orphans, read_records
        from orchestrator.orphans import recheck as judge
        from orchestrator.retries import RetryPolicy

        store = self._job_store()
        with self._database_errors():
            target, client = await self._client()
            if on_start is not None:
                on_start(target.fabric_url)
            found = await find_orphans(client, lambda: read_records(store),
                                       retry=RetryPolicy.from_settings(self._settings))
            return judge(found, await read_records(store)) if recheck else found

    async def delete_orphans(self, orphans: Sequence[Orphan], *, timeout: float | None = None,
                             on_event: Callable[[DeleteEvent], None] | None = None) -> list[Deletion]:
        """Delete the orphans not skipped: service instances first, then models and endpoints,
        then empty workspaces, each waited until gone (at most ``timeout`` seconds, 30 minutes by
        default). ``on_event`` sees each deletion, failure and progress note. A delete is retried
        on transient errors as a job's step is (``retry`` settings); a failure is in its
        ``Deletion.error``, and the rest carry on."""
        from orchestrator.orphans import DeleteSettings, delete_orphans

        _target, client = await self._client()
        retry = self._settings.retry
        return await delete_orphans(client, list(orphans), on_event or (lambda _event: None), DeleteSettings(
            timeout=timeout or DeleteSettings().timeout, poll_initial=self._settings.poll.initial,
            poll_max=self._settings.poll.max, attempts=retry.max_attempts, backoff_base=retry.backoff_base,
            backoff_cap=retry.backoff_cap))

    async def prune(self, *, older_than: timedelta, dry_run: bool = False,
                    with_resources: bool = False) -> dict[str, Any]:
        """Remove (``dry_run``: count) the rows of jobs that ended longer ago than ``older_than``,
        with their steps, events and invocations, and old daemons' registry rows (``db prune``).

        Kept: unfinished jobs, jobs a younger teardown refers to and, unless ``with_resources``,
        jobs whose resources were never torn down. Returns ``{dry_run, before, jobs: [IDs], rows:
        {table: N}, daemons: N, kept: {for_teardown: [IDs], with_resources: [IDs]}}``; each batch of
        PRUNE_BATCH jobs is one transaction.
        """
        from orchestrator.store import ops

        store = self._job_store()
        with self._database_errors():
            at = store.clock()
            before = at - older_than
            plan = await store.writer.run(ops.prune_plan(before=before, at=at, with_resources=with_resources))
            removed, rows, daemons = plan.job_ids, dict(plan.rows), len(plan.daemons)
            if not dry_run:
                removed, rows = [], dict.fromkeys(rows, 0)
                for start in range(0, len(plan.job_ids), PRUNE_BATCH):
                    ids, counts = await store.writer.run(
                        ops.prune_jobs(plan.job_ids[start:start + PRUNE_BATCH], before=before,
                                       with_resources=with_resources))
                    removed += ids
                    rows = {table: rows[table] + counts[table] for table in rows}
                daemons = await store.writer.run(ops.prune_daemons(plan.daemons, before=before))
            return {"dry_run": dry_run, "before": before.isoformat(), "jobs": removed, "rows": rows,
                    "daemons": daemons, "kept": {"for_teardown": plan.kept_for_teardown,
                                                 "with_resources": plan.kept_with_resources}}

    # --- listing (last: the method named ``list`` would shadow the type in later annotations) ---

    async def list(self, *, state: JobState | str | None = None, name: str | None = None,
                   limit: int = 100) -> list[Job]:
        """Jobs, newest first, without their steps (``fabricflow list``).

        ``state``: only jobs in this state; ``name``: only jobs whose name contains this text.
        """
        if state is not None and str(state).upper() not in JobState.__members__:
            raise UserError(f"unknown job state {str(state)!r} (one of {', '.join(JobState)})")
        if limit < 1:
            raise UserError(f"limit must be at least 1, got {limit}")
        with self._database_errors():
            return await self._store.list(state=None if state is None else str(state).upper(), name=name,
                                          limit=limit)

    # --- plumbing -----------------------------------------------------------------------------

    def _job_store(self) -> JobStore:
        """The writing store; UserError when opened read-only."""
        if not self._writable:
            raise UserError(f"{self.db}: opened with read_only=True; open it again without it to change jobs")
        return cast("JobStore", self._store)

    async def _resolve(self, job: JobRef) -> str:
        if isinstance(job, Job):
            return job.id
        ref = job.strip().lower()
        if len(ref) > JOB_ID_LENGTH:
            raise UserError(f"not a job ID: {ref[:12]!r}... is {len(ref):,} characters long; a job ID has "
                            f"{JOB_ID_LENGTH} hexadecimal digits (any unique prefix of one will do)")
        return await self._store.resolve(ref)

    async def _client(self) -> tuple[Target, FabricClient]:
        """Fabric's target and client, started on first use (the embedded emulator with them)."""
        async with self._fabric_lock:
            if self._closed:
                raise UserError("this Fabricflow is closed")
            if self._fabric is None:
                from orchestrator.wiring import client_for, fabric_target

                target = await self._fabric_stack.enter_async_context(
                    fabric_target(self._settings, announce=self._announce))
                client = await self._fabric_stack.enter_async_context(client_for(self._settings, target))
                self._fabric = (target, client)
            return self._fabric

    async def _check_reused(self, specs: Sequence[JobSpec]) -> None:
        """On a real (or separate) Fabric, check the resources the specs reuse exist, once per
        distinct set of reused IDs, before anything is written (as ``fabricflow submit``)."""
        from orchestrator.engine.procedure import check_reused
        from orchestrator.spec import Reuse

        def reused_ids(spec: JobSpec) -> tuple[str | None, ...]:
            return tuple(part.id if isinstance(part := getattr(spec, key), Reuse) else None
                         for key in ("workspace", "endpoint", "model"))

        distinct: dict[tuple[str | None, ...], JobSpec] = {}
        for spec in specs:
            if any(ids := reused_ids(spec)):
                distinct.setdefault(ids, spec)
        if self.is_embedded or not distinct:
            return
        _target, client = await self._client()
        for spec in distinct.values():
            await check_reused(client, spec)

    @contextlib.contextmanager
    def _database_errors(self) -> Iterator[None]:
        """A database failing mid-operation (locked, read-only, full) as one DatabaseError line."""
        try:
            yield
        except Exception as exc:
            problem = _database_problem(exc)
            if problem is None:
                raise
            raise DatabaseError(f"{self.db}: {problem}") from exc


@contextlib.asynccontextmanager
async def connect(
    db: str | os.PathLike[str] | None = None,
    *,
    fabric_url: str | None = None,
    fabric_ep_url: str | None = None,
    region: str | None = None,
    config: str | os.PathLike[str] | None = None,
    create: bool = True,
    read_only: bool = False,
    **overrides: Any,
) -> AsyncIterator[Fabricflow]:
    """``async with connect(...) as ff:`` a ``Fabricflow`` (see ``Fabricflow.open``), closed after."""
    ff = await Fabricflow.open(db, fabric_url=fabric_url, fabric_ep_url=fabric_ep_url, region=region,
                               config=config, create=create, read_only=read_only, **overrides)
    try:
        yield ff
    finally:
        await ff.close()


def _prepared(specs: Iterable[SpecSource] | Prepared, *, count: int) -> tuple[list[str], list[JobSpec]]:
    """Job IDs and validated specs: ``Prepared`` ones as they are, others read and validated."""
    if isinstance(specs, Prepared):
        if count != 1:
            raise UserError(f"count must be 1 for specs already prepared, got {count}")
        return list(specs.job_ids), list(specs.specs)
    return specs_for(list(specs), count=count)


async def _states(store: JobStore, ids: list[str]) -> dict[str, JobState]:
    """The current state of each job, read 500 at a time (within every database's parameter limit)."""
    from sqlalchemy import select

    from orchestrator.store.schema import jobs

    found: dict[str, JobState] = {}
    async with store.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            query = select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(ids[start:start + 500]))
            found.update((job_id, JobState(state)) for job_id, state in await conn.execute(query))
    return found


# --- invocations -----------------------------------------------------------------------------


async def _target_of(store: JobStore | ReadOnlyStore, job_id: str) -> Job:
    """The job whose service instance to invoke; UserError unless it has a RUNNING one."""
    job = await store.get(job_id)
    if job.kind is not JobKind.CREATE:
        raise UserError(f"job {job.id[:8]} is a teardown job; invoke the job that created the service")
    if job.steps[StepName.SERVICE_READY].state is not StepState.SUCCEEDED:
        raise UserError(f"job {job.id[:8]} has no RUNNING service instance yet "
                        f"(job {job.state}, service_ready {job.steps[StepName.SERVICE_READY].state})")
    teardown = await store.live_teardown(job.id)
    if teardown is not None:
        teardown_id, state = teardown
        raise UserError(f"job {job.id[:8]} has a teardown ({teardown_id[:8]}, {state}) that deletes or has "
                        "deleted what the job created; submit a new job to talk to a service")
    return job


async def _invoke_once(store: JobStore, job: Job, client: FabricClient, request: dict[str, Any],
                       on_text: Callable[[str], None] | None) -> tuple[Invocation, FabricError | None]:
    """One streamed invocation, stored with its reply and timings, or with Fabric's error (also
    returned)."""
    instance_id = job.resource_id(StepName.SERVICE_INSTANCE)
    workspace_id = job.resource_id(StepName.WORKSPACE)
    assert instance_id and workspace_id
    started = time.monotonic()
    first: list[float] = []

    def text(piece: str) -> None:
        if not first:
            first.append(time.monotonic())
        if on_text is not None:
            on_text(piece)

    try:
        result = await client.invoke(workspace_id, instance_id, request, on_text=text)
    except FabricError as exc:
        failed = await store.record_invocation(
            job.id, service_instance_id=instance_id, request=request, error=exc.as_dict(),
            duration_ms=int((time.monotonic() - started) * 1000))
        return failed, exc
    return await store.record_invocation(
        job.id, service_instance_id=instance_id, request=request, reply=result.reply,
        finish_reason=result.finish_reason, usage=result.usage,
        ttft_ms=int((first[0] - started) * 1000) if first else None,
        duration_ms=int((time.monotonic() - started) * 1000)), None


# --- stores and the database -------------------------------------------------------------------


def _db_url(db: str | os.PathLike[str]) -> str:
    """A database URL from a URL or from a SQLite file's path."""
    text = os.fspath(db)
    if "://" in text:
        return text
    # Quoted: SQLAlchemy decodes %XX in SQLite file names, so '%', '?' and '#' in a path survive.
    return "sqlite+aiosqlite:///" + quote(str(Path(text).expanduser().absolute()), safe="/")


async def plan_spec(spec: JobSpec, *, settings: Settings,
                    templated: Mapping[str, str] | None = None) -> tuple[Plan, str]:
    """What ``run`` would do with ``spec`` against the Fabric of ``settings`` (``fabricflow plan``):
    only reads are sent, and no database is opened. Returns the plan and where it was checked:
    ``embedded``, or Fabric's URL. ``templated``: names as written, for parts whose name holds ``{job}``.
    Each look-up is retried on transient errors (``RetryPolicy.from_settings``)."""
    from orchestrator.plan import make_plan
    from orchestrator.retries import RetryPolicy
    from orchestrator.wiring import client_for, fabric_target

    async with fabric_target(settings, announce=False) as target, client_for(settings, target) as client:
        made = await make_plan(client, spec, templated=templated, retry=RetryPolicy.from_settings(settings))
    return made, "embedded" if target.embedded else target.fabric_url


async def upgrade_database(url: str) -> str:
    """Apply every pending migration to the database at ``url`` (creating a SQLite file if
    needed); returns the schema revision it is now at (``fabricflow db upgrade``)."""
    from orchestrator.store import db
    from orchestrator.store.jobs import JobStore

    store = await JobStore.open(url, auto_upgrade=True)
    await store.close()
    return db.head_revision()


def sqlite_file(url: str) -> Path | None:
    """The database file of a plain ``sqlite[+aiosqlite]:///FILE`` URL, as the read-only path
    opens it; None for any other URL."""
    from orchestrator.store import readonly

    return readonly.sqlite_file(url)


def describe_database(url: str) -> str:
    """The database of a URL as a user recognises it: the SQLite file, or the URL without its password."""
    return _describe(url)


def database_problem(exc: BaseException) -> str | None:
    """One line a user can act on when ``exc`` is the database failing (locked, read-only, disk
    full), without SQL or parameters; None for any other exception."""
    return _database_problem(exc) if isinstance(exc, Exception) else None


def _describe(url: str) -> str:
    """The database as a user recognises it: the file, or the URL without its password."""
    from orchestrator.store import db

    try:
        return db.describe(url)
    except Exception:  # not a URL at all: opening it has said so already
        return "(unparsable URL)"


async def _open_store(url: str, *, create: bool) -> JobStore:
    """The job store; ``create`` lets a missing SQLite file be created. Without it, a missing file
    is NotFoundError("no database at PATH") and nothing is written (as the CLI's open_store)."""
    from orchestrator.store import db
    from orchestrator.store.jobs import JobStore

    path = db.sqlite_path(url)
    missing = not create and path is not None and not path.exists()
    return await JobStore.open(url, auto_upgrade=False if missing else None)


async def _open_reader(url: str) -> JobStore | ReadOnlyStore:
    """A store to read from that never creates a database: a SQLite file at the current schema
    through stdlib sqlite3, read-only; anything else through JobStore (as the CLI's open_reader)."""
    from orchestrator.store.readonly import ReadOnlyStore, sqlite_file

    path = sqlite_file(url)
    reader = ReadOnlyStore.open(path) if path is not None else None
    return reader if reader is not None else await _open_store(url, create=False)


def _database_problem(exc: Exception) -> str | None:
    """One line a user can act on, when ``exc`` is the database failing; else None."""
    import sqlite3

    sa_exc = sys.modules.get("sqlalchemy.exc")  # loaded only if something used SQLAlchemy
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        from orchestrator.store import db

        return db.database_problem(exc)
    if isinstance(exc, sqlite3.Error):  # the SQLite writer's own connection
        from orchestrator.store.readonly import sqlite_problem

        return sqlite_problem(str(exc)) or str(exc)
    return None


# --- stopping ----------------------------------------------------------------------------------


async def _relay(event: asyncio.Event, action: Callable[[], None]) -> None:
    """Call ``action`` once ``event`` is set."""
    await event.wait()
    action()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_restored() -> Iterator[None]:
    """Put back the process's SIGINT and SIGTERM handlers after the block, which (the daemon)
    installs its own on the event loop while it runs in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield  # the loop cannot install signal handlers here: nothing to put back
        return
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        yield
    finally:
        loop = asyncio.get_running_loop()
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)
