"""The daemon: claims runnable jobs, runs many on one event loop, keeps their leases alive."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from aiohttp import web
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from orchestrator.config import DaemonSettings
from orchestrator.domain import Job
from orchestrator.engine.health import DaemonMetrics, serving
from orchestrator.engine.runner import Runner
from orchestrator.errors import UserError
from orchestrator.listening import cannot_listen
from orchestrator.logs import get_logger
from orchestrator.machine import StepState, next_step
from orchestrator.process import is_dead, pid_namespace
from orchestrator.store import db, ops
from orchestrator.store.schema import jobs as jobs_table
from orchestrator.store.jobs import JobStore

log = get_logger(__name__)  # structlog if configured, else stdlib logging: never stdout


def new_owner() -> str:
    """A lease owner name a person can trace back to a process: host:pid:random, and on Linux
    ``:pidns``, the PID namespace its PID belongs to (``process.is_dead`` reads both)."""
    owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    namespace = pid_namespace()
    return f"{owner}:{namespace}" if namespace else owner


def _version() -> str:
    """fabricflow's version, as the registry records it (who still runs an old one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fabricflow")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


@contextlib.contextmanager
def sqlite_file_lock(url: str) -> AsyncIterator[None]:  # type: ignore[misc]
    """Hold an OS lock beside the SQLite file: one daemon per file, said clearly to a second."""
    database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    path = Path(database).expanduser().resolve()
    lock_path = path.with_name(path.name + ".lock")
    handle = open(lock_path, "a+")  # noqa: SIM115 - held for the daemon's life
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(f"{path}: another fabricflow daemon is already running on this "
                            f"database ({holder}); stop it first or use another --db") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock; the kernel does the same on kill -9


#: Most jobs claimed per claim round.
CLAIM_BATCH = 100

#: A daemon whose clock is off the database's by more than this share of the lease takes no jobs over.
MAX_SKEW_OF_LEASE = 0.25

#: How often the daemon compares its clock with the database's, in seconds.
SKEW_CHECK_SECONDS = 60.0

#: How often a runner's process looks for `fabricflow cancel` requests, in seconds.
CANCEL_POLL_SECONDS = 1.0


@contextlib.asynccontextmanager
async def heartbeat(store: JobStore, runner: Runner, settings: DaemonSettings,
                    on_beat: Callable[[bool], None] | None = None, *,
                    registered: bool = False) -> AsyncIterator[None]:
    """While the block runs: renew every lease the runner's owner holds (one statement per
    beat; ``registered``: and the daemon's registry row, in the same transaction), and pass
    cancellation requests written by the CLI on to the runner."""
    owner = runner.owner

    async def beat() -> None:
        while True:
            await asyncio.sleep(settings.heartbeat_seconds)
            try:
                # Only the jobs this process really runs: a job whose runner is gone must lapse.
                if registered:
                    await store.writer.run(ops.daemon_heartbeat(owner, runner.active(), lease=settings.lease_seconds),
                                           urgent=True)
                else:
                    await store.heartbeat(owner, lease=settings.lease_seconds, job_ids=runner.active())
            except Exception as exc:  # a missed beat is survivable; the next one may succeed
                log.warning("heartbeat_failed", error=type(exc).__name__)
                if on_beat is not None:
                    on_beat(False)
            else:
                if on_beat is not None:
                    on_beat(True)

    async def watch_cancels() -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            try:
                for job_id in await store.cancel_requested(owner):
                    runner.request_cancel(job_id)
            except Exception as exc:
                log.warning("cancel_poll_failed", error=type(exc).__name__)

    tasks = [asyncio.create_task(beat(), name="heartbeat"),
             asyncio.create_task(watch_cancels(), name="cancel-watch")]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Daemon:
    """Runs jobs until stopped by SIGTERM/SIGINT (or ``stop``)."""

    def _live_page(self, app: web.Application) -> None:
        """The read-only live page (orchestrator/ui.py) at /ui/ on the metrics port."""
        from orchestrator import ui

        ui.add_routes(app, self.url)

    def __init__(self, store: JobStore, runner: Runner, settings: DaemonSettings, *, url: str,
                 metrics: DaemonMetrics | None = None, metrics_address: tuple[str, int] | None = None,
                 on_metrics_ready: Callable[[str], None] | None = None,
                 on_started: Callable[[str], None] | None = None,
                 routes: Iterable[web.RouteDef] = ()) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        self.url = url
        self.metrics = metrics or DaemonMetrics()
        self.metrics.set_version(_version())
        # The parts report to the metrics through hooks (none of them imports prometheus_client).
        if runner.client is not None and getattr(runner.client, "observer", None) is None:
            runner.client.observer = self.metrics
        if hasattr(store.writer, "on_batch"):
            store.writer.on_batch = self.metrics.on_batch
        self.metrics_address = metrics_address
        self.routes = list(routes)  # extra pages on the metrics port (e.g. a live web page)
        self.on_metrics_ready = on_metrics_ready
        self.on_started = on_started  # told the owner once registered: nothing of a refused start is announced
        self.owner = runner.owner
        self.tasks: dict[str, asyncio.Task[object]] = {}
        self._wake = asyncio.Event()

    def stop(self) -> None:
        """Stop claiming; running jobs stop at their next safe point."""
        self.runner.stop.set()
        self._wake.set()

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """Claim and run jobs until stopped, then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        cfg = self.settings
        lock = sqlite_file_lock(self.url) if db.is_sqlite(self.url) else contextlib.nullcontext()
        with lock:
            async with contextlib.AsyncExitStack() as stack:
                # Bound before registering: a metrics address the daemon cannot have is one
                # UserError with no registry row left behind and no job claimed, as is a second
                # daemon refused by the lock. Until the registration /healthz answers 503 "starting"
                # (no heartbeat yet), whatever metrics object it was handed.
                self.metrics.last_heartbeat = None
                metrics_url = None if self.metrics_address is None else await self._serve_metrics(stack)
                await self.store.writer.run(ops.register_daemon(
                    self.owner, host=socket.gethostname(), pid=os.getpid(), version=_version(),
                    lease=cfg.lease_seconds), urgent=True)
                # The registry row carries a heartbeat from now on: /healthz says so from the start,
                # not null until the first beat of the loop (heartbeat_seconds later).
                self.metrics.last_heartbeat = time.monotonic()
                if self.on_started is not None:
                    self.on_started(self.owner)
                if metrics_url is not None and self.on_metrics_ready is not None:
                    self.on_metrics_ready(metrics_url)  # announced once /healthz has a heartbeat to tell
                await stack.enter_async_context(heartbeat(self.store, self.runner, cfg, self.metrics.beat,
                                                          registered=True))
                await stack.enter_async_context(self.store.listen(self._wake.set))
                if db.is_sqlite(self.url):
                    # This process owns the file: a RUNNING job whose holder died (a crashed
                    # daemon or `fabricflow run`) is resumed now, without waiting for its lease.
                    async for batch in self.store.reclaim_batches(self.owner, lease=cfg.lease_seconds,
                                                                  is_dead=is_dead, max_runs=cfg.max_recoveries):
                        for job in batch:
                            self._spawn(job)
                log.info("daemon_started", owner=self.owner, database=db.describe(self.url))
                if ready is not None:
                    ready.set()
                failures = 0
                skew_checked, takeover = float("-inf"), True
                while not self.runner.stop.is_set():
                    if loop.time() - skew_checked > SKEW_CHECK_SECONDS:
                        skew_checked = loop.time()
                        takeover = await self._clock_agrees(cfg.lease_seconds)
                    # Claim in batches: a flood of new jobs ramps up instead of queueing thousands
                    # of first transitions at once.
                    free = min(cfg.concurrency - len(self.tasks), CLAIM_BATCH)
                    pause = cfg.claim_interval
                    try:
                        claimed = await self.store.claim_next(self.owner, limit=free, lease=cfg.lease_seconds,
                                                              running=set(self.tasks), max_runs=cfg.max_recoveries,
                                                              takeover=takeover)
                        for job in claimed:
                            self._spawn(job)
                        failures = 0
                        if claimed and len(claimed) == free:
                            pause = 0.0  # a full batch: more may be waiting; claim again at once
                    except (DBAPIError, SQLAlchemyTimeoutError, OSError) as exc:
                        # A locked file, a failover, a full pool: survivable; keep running jobs and retry.
                        failures += 1
                        pause = min(30.0, cfg.claim_interval * 2**failures)
                        log.warning("claim_failed", error=type(exc).__name__, retry_in=round(pause, 1))
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=pause)
                await self._drain()
            # Once the heartbeat has stopped, so that no beat lands after it.
            try:
                await self.store.writer.run(ops.daemon_stopped(self.owner), urgent=True)
            except (DBAPIError, SQLAlchemyTimeoutError, OSError) as exc:  # its row goes stale instead
                log.warning("daemon_stop_unrecorded", error=type(exc).__name__)
        writes = self.store.writer.stats()
        log.info("daemon_stopped", owner=self.owner, write_commits=writes.batches,
                 write_operations=writes.operations, write_statements=writes.statements)

    async def _serve_metrics(self, stack: contextlib.AsyncExitStack) -> str:
        """Bind and serve /healthz, /metrics and /ui/ on ``metrics_address`` for the rest of
        ``stack``; its URL. A bind that fails is a UserError naming the option."""
        assert self.metrics_address is not None
        host, port = self.metrics_address
        try:
            return await stack.enter_async_context(serving(
                self.metrics, owner=self.owner, running=lambda: len(self.tasks),
                lease_seconds=self.settings.lease_seconds, host=host, port=port, probe=self._probe,
                job_counts=self._job_counts, routes=self.routes, setup=self._live_page))
        except (OSError, UnicodeError) as exc:
            raise cannot_listen(exc, host, port, who="daemon", host_option="--metrics-host",
                                port_option="--metrics-port") from None

    async def _clock_agrees(self, lease: float) -> bool:
        """Whether this machine's clock agrees with the database's closely enough to take over
        other daemons' lapsed jobs. Leases are measured on the database's clock; a daemon whose
        own clock is far off still says so, since its logs and timeouts would mislead."""
        try:
            skew = await self.store.clock_skew()
        except (DBAPIError, SQLAlchemyTimeoutError, OSError):
            return True  # the claim will report the database problem itself
        if abs(skew) <= lease * MAX_SKEW_OF_LEASE:
            return True
        log.error("clock_skew", skew_seconds=round(skew, 1), limit_seconds=round(lease * MAX_SKEW_OF_LEASE, 1),
                  detail="this machine's clock differs from the database's; fix its time (NTP). Until "
                         "then this daemon takes only new jobs, never another daemon's lapsed ones")
        return False

    async def _probe(self) -> None:
        """/healthz: the database answers a trivial query."""
        async with self.store.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def _job_counts(self) -> dict[str, int]:
        """/metrics: jobs by state, from the database (the truth, whoever runs them)."""
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(select(jobs_table.c.state, func.count()).group_by(jobs_table.c.state))
            return {str(state): int(count) for state, count in rows}

    def _spawn(self, job: Job) -> None:
        job_id = job.id
        if job_id in self.tasks:  # already running here; never two runners on one job
            return
        # A job some step of which has moved before is resumed (``recoveries`` counts this claim too).
        resumed = any(st.state is not StepState.PENDING for st in job.steps.values())
        step = next_step({n: st.state for n, st in job.steps.items()}, job.order)
        log.info("job_resumed" if resumed else "job_claimed", job_id=job_id, step=str(step) if step else None,
                 recoveries=job.recoveries)
        self.metrics.claimed(resumed=resumed)
        task = asyncio.create_task(self._run_one(job), name=f"job-{job_id[:8]}")
        self.tasks[job_id] = task
        task.add_done_callback(lambda _t: (self.tasks.pop(job_id, None), self.metrics.forget(job_id),
                                           self._wake.set()))

    async def _run_one(self, job: Job) -> None:
        job_id = job.id
        try:
            await self.runner.run(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug or a database outage: hand the job back rather than hold it forever.
            log.error("job_crashed", job_id=job_id, error=type(exc).__name__, exc_info=True)
            with contextlib.suppress(Exception):
                await self.store.release(job_id, self.owner,
                                         detail=f"run aborted by {type(exc).__name__}; will be retried",
                                         crashed=True)

    async def _drain(self) -> None:
        if not self.tasks:
            return
        log.info("daemon_draining", jobs=len(self.tasks))
        done, pending = await asyncio.wait(list(self.tasks.values()), timeout=self.settings.drain_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            # Cancelled mid-call: leave them RUNNING; the lease expires and the next daemon
            # reconciles them. Releasing here could hand out a job whose create is in the air.
            log.warning("daemon_drain_timeout", abandoned=len(pending))
