"""Fixtures that run the Fabric API emulator on loopback, on a free port."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from orchestrator.emulator.app import RunningEmulator, running_emulator
from orchestrator.emulator.config import EmulatorConfig

EmulatorFactory = Callable[..., Awaitable[RunningEmulator]]


@pytest.fixture
async def emulator_factory() -> AsyncIterator[EmulatorFactory]:
    """``await emulator_factory(**EmulatorConfig kwargs)`` starts one more emulator on
    127.0.0.1; every emulator started this way stops when the test ends."""
    async with AsyncExitStack() as stack:

        async def start(**settings: Any) -> RunningEmulator:
            config = EmulatorConfig(**settings)
            return await stack.enter_async_context(
                running_emulator(config, host="127.0.0.1", port=0))

        yield start


@pytest.fixture
async def emulator(emulator_factory: EmulatorFactory) -> RunningEmulator:
    """An emulator with quick transitions (0.2 s to RUNNING) and no faults."""
    return await emulator_factory(ready_after=0.2, instance_ready_after=0.2)


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session, closed after the test (warnings are errors)."""
    async with aiohttp.ClientSession() as session:
        yield session
