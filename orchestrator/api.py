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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeAlias, cast
from urllib.parse import quote

from orchestrator.domain import Event, Invocation, Job
from orchestrator.errors import DatabaseError, FabricError, JobFailedError, UserError
from orchestrator.machine import JobKind, JobState, StepName, StepState
from orchestrator.submission import SpecSource, specs_for

# SQLAlchemy, aiohttp, pydantic, the engine and the emulator are imported where they are used:
# importing this module stays cheap, so that quick commands (list, show) can go through it.
if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.engine.runner import Observer
    from orchestrator.fabric.client import FabricClient
    from orchestrator.spec import JobSpec
    from orchestrator.store.jobs import JobStore
    from orchestrator.store.readonly import ReadOnlyStore
    from orchestrator.wiring import Target

__all__ = ["Cancellation", "Fabricflow", "JobRef", "SpecSource", "connect"]


JobRef: TypeAlias = "str | Job"
"""A job: its ID, any unique prefix of it, or the ``Job`` itself."""

#: How often ``wait`` and ``events(follow=True)`` read the database, in seconds (as the CLI does).
POLL_SECONDS = 0.5

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

    async def submit_many(self, specs: Iterable[SpecSource], *, count: int = 1) -> list[str]:
        """Validate specs and enqueue ``count`` copies of each in one transaction; their IDs in order.

        ``{index}`` in a spec's strings becomes the job's number in this call (0, 1, 2, ...,
        counting on across the specs in order) and ``{job}`` its ID's first 8 digits; with
        ``count`` above 1 a spec whose resource names have neither is refused. Every copy is
        checked before anything is written: all jobs are submitted, or (UserError) none.
        """
        store = self._job_store()
        job_ids, parsed = specs_for(list(specs), count=count)
        await self._check_reused(parsed)
        with self._database_errors():
            return await store.submit_many(parsed, ids=job_ids)

    async def run(self, spec: SpecSource, *, observer: Observer | None = None,
                  stop: asyncio.Event | None = None, check: bool = False) -> Job:
        """Submit a spec and execute it here, as ``fabricflow run`` does; returns the final job.

        ``observer`` sees each step transition (``on_step``) and each piece of the streamed reply
        (``on_text``) as they happen. Setting ``stop``, or cancelling the call, stops the job at
        its next safe point (never between a create and the recording of its result): it is left
        PENDING for a daemon, or CANCELLED on the embedded emulator, whose resources end with
        this ``Fabricflow``. A stopped call returns the job; a cancelled one raises CancelledError.
        ``check=True`` raises JobFailedError unless the job SUCCEEDED.
        """
        from orchestrator.engine.daemon import heartbeat, new_owner
        from orchestrator.engine.procedure import check_reused
        from orchestrator.engine.runner import EngineSettings, Runner

        store = self._job_store()
        (job_id,), (parsed,) = specs_for([spec], count=1)
        target, client = await self._client()
        with self._database_errors():
            await check_reused(client, parsed)  # a missing reused resource: nothing is written
            owner = new_owner()
            job = await store.submit(parsed, owner=owner, lease=self._settings.daemon.lease_seconds,
                                     job_id=job_id)
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
                    await self._after_stop(job.id, state, target)
                    raise
                finally:
                    if relay is not None:
                        relay.cancel()
            await self._after_stop(job.id, state, target)
            final = await store.get(job.id)
        if check and final.state is not JobState.SUCCEEDED:
            raise JobFailedError(final)
        return final

    async def _after_stop(self, job_id: str, state: JobState, target: Target) -> None:
        if state is JobState.PENDING and target.embedded:
            await self._job_store().cancel(job_id)  # nothing could finish it once the emulator is gone

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
        ``teardown=True`` instead) or is itself a teardown.
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
    ) -> Invocation:
        """A new streamed chat completion on the job's service instance, stored with the job.

        ``message`` is the user's message, or a whole conversation (``[{"role": ..., "content":
        ...}, ...]``); ``system`` is sent before it. ``on_text`` sees each piece of the reply as
        it arrives. Returns the stored record: its ``reply``, ``usage``, ``finish_reason``, time
        to first token and duration, or its ``error`` if Fabric refused. On the embedded
        emulator, only a job this ``Fabricflow`` ran can be invoked (its resources are here).
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
            return await _invoke_once(store, target_job, client, {"messages": messages, **options}, on_text)

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
    ) -> None:
        """Run submitted jobs in this event loop, as ``fabricflow daemon`` does, until stopped.

        It stops (drains: running jobs stop at their next safe point, PENDING again for the next
        daemon) when ``stop`` is set, when the call is cancelled (then it raises CancelledError
        once drained), or on SIGTERM/SIGINT while it runs in the main thread; the process's own
        handlers of those signals are back when it returns. ``ready`` is set once it claims
        jobs. On SQLite one daemon owns a file (UserError for a second) and resumes at start-up
        every job a crashed daemon left RUNNING. ``metrics_port`` serves ``/healthz`` and
        ``/metrics`` on ``metrics_host`` (0: a free port, told to ``on_metrics_ready(url)``).
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
                        on_metrics_ready=on_metrics_ready)
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

                target = await self._fabric_stack.enter_async_context(fabric_target(self._settings, announce=False))
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


# --- invocations -----------------------------------------------------------------------------


async def _target_of(store: JobStore, job_id: str) -> Job:
    """The job whose service instance to invoke; UserError unless it has a RUNNING one."""
    job = await store.get(job_id)
    if job.kind is not JobKind.CREATE:
        raise UserError(f"job {job.id[:8]} is a teardown job; invoke the job that created the service")
    if job.steps[StepName.SERVICE_READY].state is not StepState.SUCCEEDED:
        raise UserError(f"job {job.id[:8]} has no RUNNING service instance yet "
                        f"(job {job.state}, service_ready {job.steps[StepName.SERVICE_READY].state})")
    return job


async def _invoke_once(store: JobStore, job: Job, client: FabricClient, request: dict[str, Any],
                       on_text: Callable[[str], None] | None) -> Invocation:
    """One streamed invocation, stored with its reply and timings, or with Fabric's error."""
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
        return await store.record_invocation(
            job.id, service_instance_id=instance_id, request=request, error=exc.as_dict(),
            duration_ms=int((time.monotonic() - started) * 1000))
    return await store.record_invocation(
        job.id, service_instance_id=instance_id, request=request, reply=result.reply,
        finish_reason=result.finish_reason, usage=result.usage,
        ttft_ms=int((first[0] - started) * 1000) if first else None,
        duration_ms=int((time.monotonic() - started) * 1000))


# --- stores and the database -------------------------------------------------------------------


def _db_url(db: str | os.PathLike[str]) -> str:
    """A database URL from a URL or from a SQLite file's path."""
    text = os.fspath(db)
    if "://" in text:
        return text
    # Quoted: SQLAlchemy decodes %XX in SQLite file names, so '%', '?' and '#' in a path survive.
    return "sqlite+aiosqlite:///" + quote(str(Path(text).expanduser().absolute()), safe="/")


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
