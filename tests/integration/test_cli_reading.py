"""The read commands' stdlib reader against JobStore: the same jobs, steps, events and errors,
and the fallback to JobStore for a database at another schema revision."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import NotFoundError, UserError
from orchestrator.spec import load_spec
from orchestrator.store.jobs import JobStore
from orchestrator.store.readonly import SCHEMA_REVISION, ReadOnlyStore
from tests.conftest import QUICKSTART
from tests.integration.test_cli import _structlog_reset  # noqa: F401 - autouse fixture


@pytest.fixture
def ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A database with a finished job, a failed one and a pending one (run and submitted by the CLI)."""
    monkeypatch.setenv("FABRICFLOW_EMULATOR__READY_AFTER", "0.1")
    monkeypatch.setenv("FABRICFLOW_EMULATOR__INSTANCE_READY_AFTER", "0.1")
    monkeypatch.setenv("FABRICFLOW_POLL__INITIAL", "0.05")
    path = tmp_path / "jobs.db"
    url = f"sqlite:///{path}"
    failing = tmp_path / "failing.yaml"
    failing.write_text(QUICKSTART.read_text().replace("endpoint_ready: 30m", "endpoint_ready: 0.05s")
                       .replace("llama3-quickstart", "slow_endpoint"))
    ids = []
    for args in (["run", str(QUICKSTART), "--json"], ["run", str(failing), "--json"]):
        if args[1] == str(failing):
            monkeypatch.setenv("FABRICFLOW_EMULATOR__READY_AFTER", "30")
        ids.append(json.loads(CliRunner().invoke(main, [*args, "--db", url]).stdout)["id"])
    ids.append(CliRunner().invoke(main, ["submit", str(QUICKSTART), "--db", url]).stdout.strip())
    return path, ids


async def test_the_reader_returns_what_jobstore_returns(ran):
    path, ids = ran
    store = await JobStore.open(f"sqlite:///{path}", auto_upgrade=False)
    reader = ReadOnlyStore.open(path)
    assert reader is not None
    try:
        for job_id in ids:
            assert await reader.get(job_id) == await store.get(job_id)
            assert await reader.events(job_id) == await store.events(job_id)
            assert await reader.events(job_id, after=3) == await store.events(job_id, after=3)
            assert await reader.resolve(job_id[:10].upper()) == await store.resolve(job_id[:10].upper()) == job_id
        for filters in ({}, {"state": "failed"}, {"name": "QUICK"}, {"name": "slow_"}, {"name": "%"}, {"limit": 2}):
            assert await reader.list(**filters) == await store.list(**filters), filters
        for ref in ("", "xyz", "0" * 32):
            with pytest.raises(NotFoundError) as by_reader:
                await reader.resolve(ref)
            with pytest.raises(NotFoundError) as by_store:
                await store.resolve(ref)
            assert str(by_reader.value) == str(by_store.value)
    finally:
        await reader.close()
        await store.close()


async def test_both_stores_find_the_teardown_that_retry_and_invoke_refuse_for(ran):
    path, ids = ran
    done, failed, _pending = ids
    store = await JobStore.open(f"sqlite:///{path}", auto_upgrade=False)
    try:
        teardown = await store.submit_teardown(done)
        reader = ReadOnlyStore.open(path)
        assert reader is not None
        try:
            assert await reader.live_teardown(done) == await store.live_teardown(done) == (teardown.id, "PENDING")
            assert await reader.live_teardown(failed) is None and await store.live_teardown(failed) is None
            await store.cancel(teardown.id)  # before it sent any delete: it no longer counts
            assert await reader.live_teardown(done) is None and await store.live_teardown(done) is None
        finally:
            await reader.close()
    finally:
        await store.close()


async def test_an_ambiguous_prefix_is_said_the_same_way(tmp_path):
    path = tmp_path / "many.db"
    store = await JobStore.open(f"sqlite:///{path}")
    ids = await store.submit_many([load_spec(QUICKSTART)] * 40)
    common = next(p for p in "0123456789abcdef" if sum(job_id.startswith(p) for job_id in ids) >= 2)
    reader = ReadOnlyStore.open(path)
    assert reader is not None
    try:
        with pytest.raises(UserError) as by_reader:
            await reader.resolve(common)
        with pytest.raises(UserError) as by_store:
            await store.resolve(common)
    finally:
        await reader.close()
        await store.close()
    assert str(by_reader.value) == str(by_store.value)
    assert str(by_reader.value).startswith(f"job ID prefix '{common}' is ambiguous: it matches ")


def test_a_database_at_an_older_revision_is_read_through_jobstore_which_migrates_it(tmp_path):
    from alembic import command

    from orchestrator.store import db

    path = tmp_path / "old.db"

    async def at_first_revision() -> None:  # as a fabricflow whose newest migration was 0001 left it
        engine = db.create_engine(f"sqlite:///{path}")
        async with engine.connect() as conn:
            await conn.run_sync(lambda sync: command.upgrade(db.alembic_config(sync), "0001"))
            await conn.commit()
        await engine.dispose()

    asyncio.run(at_first_revision())
    assert ReadOnlyStore.open(path) is None

    result = CliRunner().invoke(main, ["list", "--json", "--db", f"sqlite:///{path}"])

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_REVISION


def test_a_database_at_a_newer_revision_is_refused_with_advice(tmp_path):
    path = tmp_path / "new.db"
    url = f"sqlite:///{path}"
    assert CliRunner().invoke(main, ["submit", str(QUICKSTART), "--db", url]).exit_code == 0
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    result = CliRunner().invoke(main, ["list", "--db", url])
    assert result.exit_code == 2
    assert "schema revision 9999 is newer than this fabricflow" in result.stderr


@pytest.mark.parametrize(("content", "said"), [
    (b"this is not sqlite" * 100, "not a SQLite database file"),
])
def test_a_file_that_is_no_database_is_one_line(tmp_path, content, said):
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["list", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: {said}\n"
    assert path.read_bytes() == content


def test_a_foreign_database_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    before = path.read_bytes()
    result = CliRunner().invoke(main, ["show", "abc", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: not a fabricflow database (it holds other tables)\n"
    assert path.read_bytes() == before


async def test_the_reader_sees_each_commit_made_after_it_opened(tmp_path):
    # `events --follow` reads through one connection for as long as the job runs.
    path = tmp_path / "live.db"
    store = await JobStore.open(f"sqlite:///{path}")
    reader = None
    try:
        job = await store.submit(load_spec(QUICKSTART))
        reader = ReadOnlyStore.open(path)
        assert reader is not None
        assert (await reader.get(job.id)).state == "PENDING"
        seen = len(await reader.events(job.id))
        await store.cancel(job.id)
        assert (await reader.get(job.id)).state == "CANCELLED"
        assert [e.to_state for e in await reader.events(job.id, after=seen)] == ["CANCELLED"]
    finally:
        if reader is not None:
            await reader.close()
        await store.close()


async def test_show_of_a_job_cancelled_while_waiting_has_no_step_in_progress(store, db_url, emulator_factory,
                                                                             spec_data):
    from orchestrator.config import DaemonSettings
    from orchestrator.engine.daemon import heartbeat
    from orchestrator.engine.runner import Runner
    from orchestrator.fabric.client import FabricClient
    from orchestrator.machine import JobState, StepName, StepState
    from tests.conftest import make_spec, until
    from tests.integration.test_engine import FAST, OWNER

    emu = await emulator_factory(ready_after=600)  # the endpoint stays CREATING: the job waits on it
    job = await store.submit(make_spec(spec_data))
    await store.claim(job.id, OWNER, lease=30)
    async with FabricClient(emu.url) as client:
        runner = Runner(store, client, owner=OWNER, settings=FAST)
        async with heartbeat(store, runner, DaemonSettings(heartbeat_seconds=0.5, lease_seconds=5)):
            task = asyncio.create_task(runner.run(job.id))
            await until(lambda: store.get(job.id),
                        lambda j: j.steps[StepName.ENDPOINT_READY].state is StepState.WAITING, timeout=30)
            await store.cancel(job.id)  # the runner stops at its next safe point
            assert await asyncio.wait_for(task, timeout=30) is JobState.CANCELLED
    job = await store.get(job.id)
    waited = job.steps[StepName.ENDPOINT_READY]
    assert waited.state is StepState.WAITING and waited.finished_at is None and job.finished_at is not None

    result = await asyncio.to_thread(CliRunner().invoke, main, ["show", job.id, "--db", db_url])

    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    assert "state    CANCELLED" in result.stdout.splitlines()
    took = (job.finished_at - waited.started_at).total_seconds()
    assert rows["endpoint_ready"] == (f"{'endpoint_ready':<17} {'WAITING':<10} {waited.resource_id or '-':<36} "
                                      f"{'CREATING':<14} {waited.attempts:>7} {f'{took:.1f}s':>7}")
    assert "…" not in result.stdout  # nothing is in progress in a job that has ended
