"""The Python API for code without an event loop: scripts, notebooks, synchronous services.

::

    from orchestrator import SyncFabricflow

    with SyncFabricflow.open(db="jobs.db") as ff:       # the embedded emulator by default
        job = ff.run("spec.yaml")
        for event in ff.events(job):
            print(event.step, event.to_state)

``SyncFabricflow`` has the methods of ``orchestrator.api.Fabricflow``, blocking. They run on an
event loop of its own, in a thread of its own, for as long as it is open: so the embedded
emulator (and the Fabric client's connections) live from one call to the next, and it works
where an event loop already runs in the calling thread (a notebook). Ctrl-C during a call
cancels it as cancelling the async call would (``run`` stops the job at its next safe point),
then raises KeyboardInterrupt. Callbacks (``observer``, ``on_text``) run on that loop's thread
and must not call back into the ``SyncFabricflow``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Self, TypeVar

from orchestrator.api import Cancellation, Fabricflow, JobRef, Prepared, SpecSource
from orchestrator.domain import Event, Invocation, Job
from orchestrator.machine import JobState

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.engine.runner import Observer
    from orchestrator.orphans import DeleteEvent, Deletion, Orphan
    from orchestrator.store.overview import DaemonRow, Overview

__all__ = ["SyncFabricflow"]

T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread; coroutines are handed to it and waited for."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fabricflow-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> tuple[concurrent.futures.Future[T], Callable[[], None]]:
        """Start ``coro`` on the loop: its outcome, and a thread-safe way to cancel it."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a SyncFabricflow cannot be called from its own callbacks (observer, on_text)")
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            tasks.append(task)
            task.add_done_callback(lambda done: _settle(done, outcome))

        def cancel() -> None:
            self.loop.call_soon_threadsafe(lambda: tasks[0].cancel())

        self.loop.call_soon_threadsafe(start)
        return outcome, cancel

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result; Ctrl-C cancels it, waits, and re-raises."""
        outcome, cancel = self.submit(coro)
        try:
            return outcome.result()
        except KeyboardInterrupt:
            cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                outcome.result()  # until it has stopped at a safe point (a second Ctrl-C abandons it)
            raise

    def close(self) -> None:
        """Stop the loop and its thread."""
        if self.loop.is_closed():
            return

        async def shutdown() -> None:
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


def _settle(task: asyncio.Task[T], outcome: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        outcome.set_exception(asyncio.CancelledError())
    elif (exc := task.exception()) is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(task.result())


async def _next(events: AsyncGenerator[Event, None]) -> Event | None:
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def _close(events: AsyncGenerator[Event, None]) -> None:
    await events.aclose()


class SyncFabricflow:
    """``Fabricflow`` for code without an event loop: the same methods, blocking.

    ``with SyncFabricflow.open(...) as ff:``, or ``ff = SyncFabricflow.open(...)`` and
    ``ff.close()``. See ``orchestrator.api.Fabricflow`` for what each method does.
    """

    def __init__(self, flow: Fabricflow, loop: _Loop) -> None:
        """Use ``SyncFabricflow.open``."""
        self._flow = flow
        self._loop = loop

    @classmethod
    def open(
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
    ) -> SyncFabricflow:
        """Open the job database and get ready to talk to Fabric (see ``Fabricflow.open``)."""
        loop = _Loop()
        try:
            flow = loop.call(Fabricflow.open(db, fabric_url=fabric_url, fabric_ep_url=fabric_ep_url,
                                             region=region, config=config, create=create,
                                             read_only=read_only, **overrides))
        except BaseException:
            loop.close()
            raise
        return cls(flow, loop)

    @classmethod
    def from_settings(cls, settings: Settings, *, create: bool = True, read_only: bool = False,
                      announce: bool = False) -> SyncFabricflow:
        """Open the job database of ``settings`` already loaded (see ``Fabricflow.from_settings``)."""
        loop = _Loop()
        try:
            flow = loop.call(Fabricflow.from_settings(settings, create=create, read_only=read_only,
                                                      announce=announce))
        except BaseException:
            loop.close()
            raise
        return cls(flow, loop)

    def close(self) -> None:
        """Stop the embedded emulator (if it runs), close the database, end the loop's thread."""
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.call(self._flow.close())
        finally:
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SyncFabricflow(db={self.db!r}, fabric={self.fabric!r})"

    @property
    def db(self) -> str:
        """The database as a user recognises it: the file, or the URL without its password."""
        return self._flow.db

    @property
    def fabric(self) -> str:
        """Where Fabric is: its URL, or ``embedded`` (with the emulator's URL once it runs)."""
        return self._flow.fabric

    @property
    def is_embedded(self) -> bool:
        """True when the embedded emulator stands in for Fabric."""
        return self._flow.is_embedded

    def submit(self, spec: SpecSource) -> Job:
        """Validate a spec and enqueue it for a daemon; the new job, PENDING."""
        return self._loop.call(self._flow.submit(spec))

    def submit_many(self, specs: Iterable[SpecSource] | Prepared, *, count: int = 1) -> list[str]:
        """Validate specs and enqueue ``count`` copies of each in one transaction; their IDs."""
        return self._loop.call(self._flow.submit_many(specs, count=count))

    def run(self, spec: SpecSource | Prepared, *, observer: Observer | None = None, check: bool = False,
            on_submitted: Callable[[Job], None] | None = None,
            on_stopped: Callable[[Job], None] | None = None) -> Job:
        """Submit a spec and execute it here; the final job. Ctrl-C stops it at a safe point."""
        return self._loop.call(self._flow.run(spec, observer=observer, check=check, on_submitted=on_submitted,
                                              on_stopped=on_stopped))

    def wait(self, job: JobRef, *, check: bool = False) -> Job:
        """Wait until the job has ended; returns it."""
        return self._loop.call(self._flow.wait(job, check=check))

    def events(self, job: JobRef, *, follow: bool = False, after: int = 0) -> Iterator[Event]:
        """The job's event log, oldest first; ``follow=True`` goes on until the job has ended."""
        events = self._flow.events(job, follow=follow, after=after)
        try:
            while (event := self._loop.call(_next(events))) is not None:
                yield event
        finally:
            if not self._loop.loop.is_closed():
                self._loop.call(_close(events))

    def states(self, jobs: Iterable[JobRef]) -> dict[str, JobState]:
        """The current state of each job, by full ID; a job no longer in the database is absent."""
        return self._loop.call(self._flow.states(jobs))

    def overview(self, *, limit: int = 5) -> Overview:
        """One look at how fabricflow is doing: daemons, jobs per state, oldest running, latest failures."""
        return self._loop.call(self._flow.overview(limit=limit))

    def daemons(self) -> list[DaemonRow]:
        """The daemons of the registry not stopped, each judged alive or stale as ``status`` judges it."""
        return self._loop.call(self._flow.daemons())

    def prune(self, *, older_than: timedelta, dry_run: bool = False, with_resources: bool = False) -> dict[str, Any]:
        """Remove (``dry_run``: count) the rows of jobs that ended longer ago than ``older_than``."""
        return self._loop.call(self._flow.prune(older_than=older_than, dry_run=dry_run,
                                                with_resources=with_resources))

    def find_orphans(self, *, recheck: bool = False, on_start: Callable[[str], None] | None = None) -> list[Orphan]:
        """Resources carrying a fabricflow marker that no job in this database records."""
        return self._loop.call(self._flow.find_orphans(recheck=recheck, on_start=on_start))

    def delete_orphans(self, orphans: Sequence[Orphan], *, timeout: float | None = None,
                       on_event: Callable[[DeleteEvent], None] | None = None) -> list[Deletion]:
        """Delete the orphans not skipped, each waited until gone; failures in ``Deletion.error``."""
        return self._loop.call(self._flow.delete_orphans(orphans, timeout=timeout, on_event=on_event))

    def get(self, job: JobRef) -> Job:
        """The job, step by step, as last committed."""
        return self._loop.call(self._flow.get(job))

    def resolve(self, job: JobRef) -> str:
        """The full ID of a job given by ID, unique prefix or ``Job``."""
        return self._loop.call(self._flow.resolve(job))

    def invocations(self, job: JobRef) -> list[Invocation]:
        """The invocations stored for the job, oldest first."""
        return self._loop.call(self._flow.invocations(job))

    def cancel(self, job: JobRef, *, teardown: bool = False) -> Cancellation:
        """Cancel a job (and, with ``teardown=True``, submit a teardown of what it created)."""
        return self._loop.call(self._flow.cancel(job, teardown=teardown))

    def retry(self, job: JobRef) -> Job:
        """Put a FAILED or CANCELLED job back to PENDING, from its failed step."""
        return self._loop.call(self._flow.retry(job))

    def teardown(self, job: JobRef) -> Job:
        """Submit a teardown job deleting exactly what the ended job created."""
        return self._loop.call(self._flow.teardown(job))

    def invoke(self, job: JobRef, message: str | Sequence[Mapping[str, str]], *, system: str | None = None,
               temperature: float | None = None, max_tokens: int | None = None, top_p: float | None = None,
               on_text: Callable[[str], None] | None = None, check: bool = False) -> Invocation:
        """A new streamed chat completion on the job's service instance, stored with the job."""
        return self._loop.call(self._flow.invoke(job, message, system=system, temperature=temperature,
                                                 max_tokens=max_tokens, top_p=top_p, on_text=on_text,
                                                 check=check))

    def invocable(self, job: JobRef) -> Job:
        """The job, if ``invoke`` can talk to it: a create job whose service instance is RUNNING."""
        return self._loop.call(self._flow.invocable(job))

    def serve(self, *, stop: threading.Event | None = None, ready: threading.Event | None = None,
              concurrency: int | None = None, metrics_port: int | None = None,
              metrics_host: str = "127.0.0.1", on_metrics_ready: Callable[[str], None] | None = None,
              on_started: Callable[[str], None] | None = None) -> None:
        """Run submitted jobs until ``stop`` is set (from another thread) or Ctrl-C, then drain.

        ``stop`` is also set once the daemon has stopped for any other reason; ``ready`` once it
        claims jobs. Signals other than Ctrl-C keep their usual effect here (the loop runs in
        another thread): use ``fabricflow daemon`` for a service that SIGTERM drains.
        """
        stop = stop if stop is not None else threading.Event()
        stop_serving = asyncio.Event()
        claiming = asyncio.Event()

        async def serving() -> None:
            relay = asyncio.ensure_future(_then(claiming, ready.set)) if ready is not None else None
            try:
                await self._flow.serve(stop=stop_serving, ready=claiming, concurrency=concurrency,
                                       metrics_port=metrics_port, metrics_host=metrics_host,
                                       on_metrics_ready=on_metrics_ready, on_started=on_started)
            finally:
                if relay is not None:
                    relay.cancel()
                stop.set()

        outcome, _cancel = self._loop.submit(serving())
        interrupted = False
        try:
            stop.wait()
        except KeyboardInterrupt:
            interrupted = True
        self._loop.loop.call_soon_threadsafe(stop_serving.set)
        outcome.result()  # drained (a second Ctrl-C abandons the running jobs to their leases)
        if interrupted:
            raise KeyboardInterrupt

    def list(self, *, state: JobState | str | None = None, name: str | None = None,
             limit: int = 100) -> list[Job]:
        """Jobs, newest first, without their steps."""
        return self._loop.call(self._flow.list(state=state, name=name, limit=limit))


async def _then(event: asyncio.Event, action: Callable[[], None]) -> None:
    await event.wait()
    action()
