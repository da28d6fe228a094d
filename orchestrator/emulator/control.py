"""The emulator's own routes under ``/_emulator/``: no auth, no faults, not counted."""

from __future__ import annotations

from aiohttp import web

from .common import ok, store_of
from .keys import FAULTS
from .validation import json_body


async def stats(request: web.Request) -> web.Response:
    """``{"created": {KIND: {NAME: COUNT}}, "live": {KIND: COUNT}, "requests": N, ...}``.

    Also ``operations`` (requests per handler), ``late_created`` (late creates carried out,
    counted in ``created`` too), ``late_pending`` (accepted, not carried out yet) and
    ``churn_deleted`` (bystanders deleted between the pages of a list).
    """
    return ok(store_of(request).snapshot())


async def reset(request: web.Request) -> web.Response:
    """Forget every resource, pending late create and counter; fault knobs and the RNG
    return to the config."""
    store_of(request).reset()
    request.app[FAULTS].reset()
    return ok(store_of(request).snapshot())


async def show_faults(request: web.Request) -> web.Response:
    """The current fault knobs."""
    return ok(request.app[FAULTS].describe())


async def set_faults(request: web.Request) -> web.Response:
    """Change rates (``fail_rate``, ``drop_rate``, ``slow_rate``, ``cut_rate``,
    ``late_create``, ``page_churn``) or seconds (``late_by``, ``list_lag``), or script the next
    requests (``fail_next`` + ``status``, ``drop_next``, ``cut_next`` + ``cut_after``,
    ``late_next``, ``churn_next``).

    A new ``late_by`` applies to the late creates still pending too: each is carried out
    ``late_by`` seconds after its request, so ``{"late_by": 0}`` carries them all out now.
    """
    faults, doc = request.app[FAULTS], await json_body(request)
    knobs = faults.update(doc)
    if "late_by" in doc:
        store_of(request).reschedule_late(faults.seconds["late_by"])
    return ok(knobs)


def add_routes(app: web.Application) -> None:
    """Register the control routes."""
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_post("/_emulator/reset", reset)
    app.router.add_get("/_emulator/faults", show_faults)
    app.router.add_post("/_emulator/faults", set_faults)
