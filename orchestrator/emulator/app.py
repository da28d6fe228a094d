"""The emulator as an aiohttp application: factory, in-process runner and blocking server.

Both Fabric hosts (``fabric`` and ``fabric-ep``) are served on one port; their paths do not
collide.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from . import control, invoke, routes_fabric, routes_instances, routes_models
from .config import EmulatorConfig
from .faults import Faults
from .keys import CONFIG, FAULTS, STORE
from .middleware import add_request_id, pipeline
from .resources import Store

# In-flight streams get this long to finish when the server stops; tests should not wait.
SHUTDOWN_TIMEOUT = 2.0
# AK/SK signing supports bodies up to 12 MB (REFERENCE §3.2); aiohttp's default is 1 MB.
MAX_BODY = 12 * 1024 * 1024


def create_app(config: EmulatorConfig) -> web.Application:
    """A fresh emulator application with its own state."""
    app = web.Application(middlewares=[pipeline], client_max_size=MAX_BODY)
    app[CONFIG] = config
    app[STORE] = Store(config)
    app[FAULTS] = Faults(config)
    app.on_response_prepare.append(add_request_id)
    for module in (routes_fabric, routes_models, routes_instances, invoke, control):
        module.add_routes(app)
    return app


@dataclass(frozen=True)
class RunningEmulator:
    """A started emulator: base URL without trailing slash, bound port, and the app."""

    url: str
    port: int
    app: web.Application


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def running_emulator(config: EmulatorConfig, host: str = "127.0.0.1",
                           port: int = 0) -> AsyncIterator[RunningEmulator]:
    """Serve the emulator on ``host:port`` (0 = a free port) for the ``async with`` body."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield RunningEmulator(url=_url(host, bound), port=bound, app=app)
    finally:
        await runner.cleanup()


def serve(config: EmulatorConfig, host: str, port: int, *,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly; ``on_ready(url)`` once listening."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with running_emulator(config, host, port) as emulator:
                if on_ready is not None:
                    on_ready(emulator.url)
                await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
