"""Typed keys under which the emulator keeps its state on the app and on each request."""

from __future__ import annotations

from aiohttp import web

from .config import EmulatorConfig
from .faults import Faults
from .resources import Store

CONFIG = web.AppKey("config", EmulatorConfig)
STORE = web.AppKey("store", Store)
FAULTS = web.AppKey("faults", Faults)
REQUEST_ID = web.RequestKey("request_id", str)
LATE = web.RequestKey("late", bool)
"""Set on a create request whose resource will be created later: its answer is dropped."""
