"""The daemon's small HTTP surface: ``/healthz`` for supervisors, ``/metrics`` for Prometheus."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrator.domain import Job
from orchestrator.machine import StepName, StepState


@dataclass
class DaemonMetrics:
    """Counters of one daemon, in a registry of its own (no global state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    last_heartbeat: float | None = None  # monotonic time of the last successful heartbeat

    def __post_init__(self) -> None:
        self.transitions = Counter("fabricflow_step_transitions", "Committed step transitions.",
                                   ["step", "state"], registry=self.registry)
        self.running = Gauge("fabricflow_jobs_running", "Jobs this daemon is running.", registry=self.registry)
        self.heartbeats = Counter("fabricflow_heartbeats", "Lease heartbeats, by outcome.", ["outcome"],
                                  registry=self.registry)

    def on_step(self, job: Job, step: StepName, state: StepState, detail: str) -> None:
        """Observer hook: count a committed step transition."""
        self.transitions.labels(step=str(step), state=str(state)).inc()

    def on_text(self, job_id: str, text: str) -> None:
        """Observer hook: streamed text is not counted."""

    def beat(self, ok: bool) -> None:
        """Record a heartbeat's outcome."""
        self.heartbeats.labels(outcome="ok" if ok else "failed").inc()
        if ok:
            self.last_heartbeat = time.monotonic()


@asynccontextmanager
async def serving(metrics: DaemonMetrics, *, owner: str, running: Callable[[], int], lease_seconds: float,
                  host: str, port: int, on_ready: Callable[[str], None] | None = None) -> AsyncIterator[str]:
    """Serve ``/healthz`` and ``/metrics`` on ``host:port`` (0: a free port) while the block runs."""

    async def healthz(_request: web.Request) -> web.Response:
        age = None if metrics.last_heartbeat is None else time.monotonic() - metrics.last_heartbeat
        healthy = age is None or age < lease_seconds  # leases still valid: the daemon holds its jobs
        body = {"status": "ok" if healthy else "unhealthy", "owner": owner, "jobs_running": running(),
                "seconds_since_heartbeat": None if age is None else round(age, 1)}
        return web.json_response(body, status=200 if healthy else 503)

    async def metrics_page(_request: web.Request) -> web.Response:
        metrics.running.set(running())
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}"
        if on_ready is not None:
            on_ready(url)
        yield url
    finally:
        await runner.cleanup()
