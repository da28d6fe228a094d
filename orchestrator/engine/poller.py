"""Shared status reads: jobs waiting on the same resource share one GET."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any


class SharedPoller:
    """Coalesces reads of one resource's status.

    A read in flight is joined rather than repeated, and a result younger than ``min_interval``
    seconds is served from memory, so N jobs waiting on one endpoint cost one GET per interval.
    """

    def __init__(self, *, min_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval = min_interval
        self._clock = clock
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}
        self._latest: dict[Hashable, tuple[float, Any]] = {}

    async def read(self, key: Hashable, fetch: Callable[[], Awaitable[Any]]) -> Any:
        """The resource's current state, fetched at most once per ``min_interval``."""
        cached = self._latest.get(key)
        if cached is not None and self._clock() - cached[0] < self.min_interval:
            return cached[1]
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(key, fetch))
            # Mark the outcome retrieved even if every waiter was cancelled meanwhile.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._inflight[key] = future
        # shield: one waiter being cancelled must not cancel the read the others share.
        return await asyncio.shield(future)

    async def _fetch(self, key: Hashable, fetch: Callable[[], Awaitable[Any]]) -> Any:
        try:
            value = await fetch()
            self._latest[key] = (self._clock(), value)
            return value
        finally:
            self._inflight.pop(key, None)

    def forget(self, key: Hashable) -> None:
        """Drop what is known about a resource (its wait is over)."""
        self._latest.pop(key, None)
