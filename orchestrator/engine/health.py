"""The daemon's small HTTP surface: ``/healthz`` for supervisors, ``/metrics`` for Prometheus.

Every metric lives on the daemon's own registry (several daemons may share a process, as in
tests). The parts report through small hooks, so none of them imports prometheus_client: the
Fabric client calls ``on_request``/``on_retry``, the writer ``on_batch``, the runner ``on_step``
and ``on_retry``, the daemon ``claimed`` and ``beat``. Another module adds its own pages to the
same port by passing ``routes`` to ``serving`` (or calling ``build_app``).
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrator.domain import Job
from orchestrator.listening import url_host
from orchestrator.machine import JobState, StepName, StepState

#: How long /healthz waits for the database's answer before it says 503.
PROBE_TIMEOUT = 5.0

#: The event loop ticks this often; a tick this many times late means the loop is stuck.
LOOP_TICK = 0.5

_ENDS = (StepState.SUCCEEDED, StepState.SKIPPED, StepState.FAILED)
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SLOW = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class DaemonMetrics:
    """Metrics of one daemon, in a registry of its own (no global state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    last_heartbeat: float | None = None  # monotonic time of the last successful heartbeat
    version: str = "unknown"

    def __post_init__(self) -> None:
        r = self.registry
        self.transitions = Counter("fabricflow_step_transitions", "Committed step transitions.",
                                   ["step", "state"], registry=r)
        self.running = Gauge("fabricflow_jobs_running", "Jobs this daemon is running.", registry=r)
        self.jobs = Gauge("fabricflow_jobs", "Jobs in the database by state (read at scrape time).",
                          ["state"], registry=r)
        self.heartbeats = Counter("fabricflow_heartbeats", "Lease heartbeats, by outcome.", ["outcome"],
                                  registry=r)
        self.heartbeat_age = Gauge("fabricflow_heartbeat_age_seconds",
                                   "Seconds since the last successful lease heartbeat (-1: none yet).", registry=r)
        self.heartbeat_age.set_function(self._heartbeat_age)
        self.step_seconds = Histogram("fabricflow_step_duration_seconds",
                                      "From a step's first move to its end, within one run.", ["step", "state"],
                                      buckets=_SLOW, registry=r)
        self.wait_seconds = Histogram("fabricflow_wait_duration_seconds",
                                      "Time a step spent WAITING (polls, back-offs) before moving on.", ["step"],
                                      buckets=_SLOW, registry=r)
        self.requests = Counter("fabricflow_fabric_requests", "Requests to Fabric by operation and status code "
                                "(status \"none\": no answer).", ["operation", "status"], registry=r)
        self.request_seconds = Histogram("fabricflow_fabric_request_duration_seconds",
                                         "Latency of requests to Fabric, until the answer's body was read "
                                         "(invocations: until the stream's headers).", ["operation"],
                                         buckets=_FAST, registry=r)
        self.retries = Counter("fabricflow_retries", "Retries: kind \"read\" within one call, \"step\" by the "
                               "engine; reason http_NNN, connection or unknown_outcome.", ["kind", "reason"],
                               registry=r)
        self.polls = Counter("fabricflow_polls", "Status polls sent to Fabric, by operation.", ["operation"],
                             registry=r)
        self.claims = Counter("fabricflow_jobs_claimed", "Jobs this daemon claimed: new, or resumed after "
                              "another run (a lapsed lease taken over, a crashed daemon's job).", ["how"],
                              registry=r)
        self.takeovers = Counter("fabricflow_lease_takeovers", "Jobs resumed by this daemon after their "
                                 "holder's lease lapsed or its process died.", registry=r)
        self.batch_size = Histogram("fabricflow_commit_batch_size", "Operations per group commit.",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.batch_seconds = Histogram("fabricflow_commit_duration_seconds", "Latency of one group commit.",
                                       buckets=_FAST, registry=r)
        self.build = Info("fabricflow_build", "fabricflow's version and Python's.", registry=r)
        self.build.info({"version": self.version, "python": platform.python_version()})
        self._started: dict[tuple[str, str], float] = {}  # (job, step): when its first move of this run came
        self._waiting: dict[tuple[str, str], float] = {}  # (job, step): when it went WAITING
        self._children: dict[tuple[str, int | None], tuple[Any, Any, Any]] = {}  # on_request's label children
        self._step_children: dict[tuple[StepName, StepState], tuple[Any, Any]] = {}  # on_step's

    def set_version(self, version: str) -> None:
        """The ``fabricflow_build_info`` labels."""
        self.version = version
        self.build.info({"version": version, "python": platform.python_version()})

    def _heartbeat_age(self) -> float:
        return -1.0 if self.last_heartbeat is None else time.monotonic() - self.last_heartbeat

    # --- hooks -------------------------------------------------------------------------------

    def on_step(self, job: Job, step: StepName, state: StepState, detail: str) -> None:
        """Runner hook: count a committed step transition; time steps and waits."""
        children = self._step_children.get((step, state))
        if children is None:
            children = self._step_children[(step, state)] = (
                self.transitions.labels(step=str(step), state=str(state)),
                self.step_seconds.labels(step=str(step), state=str(state)) if state in _ENDS else None)
        children[0].inc()
        key, now = (job.id, str(step)), time.monotonic()
        waited = self._waiting.pop(key, None)
        if waited is not None:
            self.wait_seconds.labels(step=key[1]).observe(now - waited)  # once per wait, not per move
        if state is StepState.WAITING:
            self._waiting[key] = now
        if children[1] is not None:
            began = self._started.pop(key, None)
            if began is not None:
                children[1].observe(now - began)
        else:
            self._started.setdefault(key, now)

    def on_text(self, job_id: str, text: str) -> None:
        """Runner hook: streamed text is not counted."""

    def on_request(self, operation: str, status: int | None, seconds: float) -> None:
        """Fabric client hook, once per request: a dict look-up, an increment, an observation."""
        children = self._children.get((operation, status))
        if children is None:
            children = self._children[(operation, status)] = (
                self.requests.labels(operation=operation, status=str(status) if status else "none"),
                self.request_seconds.labels(operation=operation),
                self.polls.labels(operation=operation) if operation.startswith("show_") else None)
        children[0].inc()
        children[1].observe(seconds)
        if children[2] is not None:
            children[2].inc()

    def on_retry(self, kind: str, reason: str) -> None:
        """Client and runner hook: one retry."""
        self.retries.labels(kind=kind, reason=reason).inc()

    def on_batch(self, operations: int, seconds: float) -> None:
        """Writer hook (maybe on the writer's thread; prometheus_client is thread-safe)."""
        self.batch_size.observe(operations)
        self.batch_seconds.observe(seconds)

    def claimed(self, *, resumed: bool) -> None:
        """Daemon hook: a job claimed; one resumed after another run is a takeover."""
        self.claims.labels(how="resumed" if resumed else "new").inc()
        if resumed:
            self.takeovers.inc()

    def forget(self, job_id: str) -> None:
        """The job left this daemon: drop its timers."""
        for table in (self._started, self._waiting):
            for key in [k for k in table if k[0] == job_id]:
                del table[key]

    def beat(self, ok: bool) -> None:
        """Record a heartbeat's outcome."""
        self.heartbeats.labels(outcome="ok" if ok else "failed").inc()
        if ok:
            self.last_heartbeat = time.monotonic()


Routes = Iterable[web.RouteDef]


def build_app(metrics: DaemonMetrics, *, owner: str, running: Callable[[], int], lease_seconds: float,
              probe: Callable[[], Awaitable[object]] | None = None,
              job_counts: Callable[[], Awaitable[dict[str, int]]] | None = None,
              routes: Routes = (), setup: Callable[[web.Application], None] | None = None) -> web.Application:
    """The aiohttp app of ``/healthz`` and ``/metrics``, plus any extra ``routes``, and whatever
    ``setup`` adds to the app before it starts (the live page: its routes and shutdown hooks).

    ``probe`` asks the database something cheap (503 when it fails or takes over
    ``PROBE_TIMEOUT``); ``job_counts`` reads the jobs by state for the ``fabricflow_jobs`` gauge.
    """
    loop_tick = [time.monotonic()]

    async def tick() -> None:
        while True:
            loop_tick[0] = time.monotonic()
            await asyncio.sleep(LOOP_TICK)

    async def ticker(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(tick(), name="health-loop-tick")
        yield
        task.cancel()

    async def healthz(_request: web.Request) -> web.Response:
        now = time.monotonic()
        age = None if metrics.last_heartbeat is None else now - metrics.last_heartbeat
        problems = []
        if age is None:
            # Bound but not registered yet (the daemon binds first, so that a port it cannot have
            # leaves no registry row): nothing to call healthy, nor a lapsed heartbeat.
            problems.append("starting: not registered yet")
        elif age >= lease_seconds:
            problems.append(f"no lease heartbeat for {age:.0f}s")
        if now - loop_tick[0] > max(10 * LOOP_TICK, 5.0):
            problems.append(f"event loop stalled for {now - loop_tick[0]:.0f}s")
        if probe is not None:
            try:
                await asyncio.wait_for(probe(), PROBE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - any failure means the database is not answering
                problems.append(f"database not answering ({type(exc).__name__})")
        status = "starting" if age is None else "unhealthy" if problems else "ok"
        body = {"status": status, "owner": owner, "jobs_running": running(),
                "seconds_since_heartbeat": None if age is None else round(age, 1), "problems": problems}
        return web.json_response(body, status=503 if problems else 200)

    async def metrics_page(_request: web.Request) -> web.Response:
        metrics.running.set(running())
        if job_counts is not None:
            try:
                counts = await asyncio.wait_for(job_counts(), PROBE_TIMEOUT)
            except Exception:  # noqa: BLE001 - the page still shows the rest; /healthz says why
                pass
            else:
                for state in JobState:
                    metrics.jobs.labels(state=str(state)).set(counts.get(str(state), 0))
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.cleanup_ctx.append(ticker)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_routes(list(routes))
    if setup is not None:
        setup(app)
    return app


@asynccontextmanager
async def serving(metrics: DaemonMetrics, *, owner: str, running: Callable[[], int], lease_seconds: float,
                  host: str, port: int,
                  probe: Callable[[], Awaitable[object]] | None = None,
                  job_counts: Callable[[], Awaitable[dict[str, int]]] | None = None,
                  routes: Routes = (), setup: Callable[[web.Application], None] | None = None,
                  ) -> AsyncIterator[str]:
    """Serve ``build_app`` on ``host:port`` (0: a free port) while the block runs; yields its URL.

    Entering raises what binding raises: ``OSError`` (the port taken, an address not of this
    machine), ``socket.gaierror`` (a host that does not resolve), ``UnicodeError`` (a host name
    that is not one).
    """
    app = build_app(metrics, owner=owner, running=running, lease_seconds=lease_seconds, probe=probe,
                    job_counts=job_counts, routes=routes, setup=setup)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield f"http://{url_host(host)}:{bound}"
    finally:
        await runner.cleanup()
