"""Fixtures shared by every test tier: a real SQLite file migrated by Alembic, and the spec."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import stamina
import yaml

from orchestrator.spec import JobSpec, parse_spec
from orchestrator.store.jobs import JobStore

ROOT = Path(__file__).resolve().parent.parent
# The quick start with fixed names (which the tests assert on); the example itself names its
# workspace after each job ("quickstart-{job}"). tests/unit/test_examples.py keeps them alike.
QUICKSTART = ROOT / "tests" / "data" / "quickstart-fixed.yaml"
EXAMPLE_QUICKSTART = ROOT / "examples" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test reads the developer's credentials, config or data directory."""
    for name in list(os.environ):
        if name.startswith(("FABRICFLOW_", "HUAWEICLOUD_SDK_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    stamina.set_testing(True, attempts=3)  # in-call read retries without real waits
    yield
    stamina.set_testing(False)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A SQLite database file in the test's own directory."""
    return f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[JobStore]:
    """A JobStore on a fresh, migrated SQLite file."""
    opened = await JobStore.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def spec_data() -> dict[str, Any]:
    """The quickstart spec as plain data, to be varied by each test."""
    return copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))


def make_spec(data: dict[str, Any], **changes: Any) -> JobSpec:
    """The spec with top-level fields replaced."""
    return parse_spec({**data, **changes}, "test-spec")


def ids(jobs: Any) -> list[str]:
    """The IDs of job snapshots (what claims return), in order."""
    return [job.id for job in jobs]


PG_ADMIN_URL = os.environ.get("FABRICFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards.

    Skipped when no server answers on 127.0.0.1:5432, except under CI, where that is a failure.
    """
    async with fresh_pg_database() as url:
        yield url


@contextlib.asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """Create a PostgreSQL database for one test (skip without a server, outside CI); drop it after."""
    import uuid

    import asyncpg

    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}: {exc}")
    name = f"fabricflow_test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def until(read: Any, done: Any, timeout: float = 5.0, every: float = 0.02) -> Any:
    """Poll ``await read()`` until ``done(value)``; fail after ``timeout`` seconds (no bare sleeps)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r} after {timeout}s"
        await asyncio.sleep(every)
