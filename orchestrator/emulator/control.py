"""The emulator's own routes under ``/_emulator/``: no auth, no faults, not counted."""

from __future__ import annotations

from aiohttp import web

from .common import ok, store_of
from .keys import FAULTS
from .validation import json_body


async def stats(request: web.Request) -> web.Response:
    """``{"created": {KIND: {NAME: COUNT}}, "live": {KIND: COUNT}, "requests": N}``."""
    return ok(store_of(request).snapshot())


async def reset(request: web.Request) -> web.Response:
    """Forget every resource and counter; fault knobs and the RNG return to the config."""
    store_of(request).reset()
    request.app[FAULTS].reset()
    return ok(store_of(request).snapshot())


async def show_faults(request: web.Request) -> web.Response:
    """The current fault knobs."""
    return ok(request.app[FAULTS].describe())


async def set_faults(request: web.Request) -> web.Response:
    """Change rates (``fail_rate``, ``drop_rate``, ``slow_rate``, ``cut_rate``) or script
    the next requests (``fail_next`` + ``status``, ``drop_next``, ``cut_next`` + ``cut_after``).
    """
    return ok(request.app[FAULTS].update(await json_body(request)))


def add_routes(app: web.Application) -> None:
    """Register the control routes."""
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_post("/_emulator/reset", reset)
    app.router.add_get("/_emulator/faults", show_faults)
    app.router.add_post("/_emulator/faults", set_faults)
