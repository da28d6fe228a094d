"""`fabricflow status` and the daemon registry, on real SQLite files and the real PostgreSQL server:
what a user checks on one screen (daemons alive, stale, stopped; jobs by state; what the oldest
running jobs wait for; the latest failures), and that reading it never creates a database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store import ops
from orchestrator.store.ops import StepMove
from tests.conftest import make_spec
from tests.crash.procs import FABRICFLOW, env
from tests.integration.clocked import Clock, clocked_store, finished, register
from tests.integration.test_cli import _structlog_reset  # noqa: F401 - autouse fixture
from tests.integration.test_cli_first_use import files_under
from tests.integration.test_first_use import HEAVY, _loaded, imported_by

DENIED = {"code": "APIGW.0301", "message": "Incorrect IAM authentication information", "request_id": "r-1"}
QUOTA = {"code": "ModelArts.0001", "message": "quota exceeded\nsecond line", "request_id": None}
THROTTLED = {"code": "APIG.0429", "message": "slow down", "request_id": None}


def status(url: str, *args: str):
    return CliRunner().invoke(main, ["status", *args, "--db", url], catch_exceptions=False)


async def populate(url: str, spec_data) -> dict[str, str]:
    """Three running jobs (one on a lapsed lease), two failures, one each PENDING, SUCCEEDED and
    CANCELLED, and daemons alive, stale, stopped, and stopped two days ago."""
    clock = Clock()
    ids: dict[str, str] = {}
    async with clocked_store(url, clock) as store:
        clock.ago(seconds=252)
        job = await store.submit(make_spec(spec_data, name="oldest"))
        ids["oldest"] = job.id
        await store.claim(job.id, "daemon-a", lease=3600)
        await store.commit(job.id, "daemon-a", [
            StepMove(StepName.WORKSPACE, StepState.PENDING, StepState.IN_FLIGHT, "creating",
                     {"request_name": "apieworkspace"}),
            StepMove(StepName.WORKSPACE, StepState.IN_FLIGHT, StepState.SUCCEEDED, "created", {"resource_id": "ws-1"}),
            StepMove(StepName.ENDPOINT, StepState.PENDING, StepState.IN_FLIGHT, "creating",
                     {"request_name": "apie_test"}),
            StepMove(StepName.ENDPOINT, StepState.IN_FLIGHT, StepState.SUCCEEDED, "created",
                     {"resource_id": "ep-1", "resource_status": "CREATING"}),
            StepMove(StepName.ENDPOINT_READY, StepState.PENDING, StepState.WAITING, "polling",
                     {"resource_status": "CREATING"}),
        ])
        clock.ago(seconds=100)
        job = await store.submit(make_spec(spec_data, name="lapsed"))
        ids["lapsed"] = job.id
        await store.claim(job.id, "daemon-gone", lease=1)  # its holder died 99 s ago
        clock.ago(seconds=30)
        job = await store.submit(make_spec(spec_data, name="retrying"))
        ids["retrying"] = job.id
        await store.claim(job.id, "daemon-a", lease=3600)
        await store.commit(job.id, "daemon-a", [
            StepMove(StepName.WORKSPACE, StepState.PENDING, StepState.IN_FLIGHT, "creating",
                     {"request_name": "ws-retry"}),
            StepMove(StepName.WORKSPACE, StepState.IN_FLIGHT, StepState.IN_FLIGHT, "throttled", {
                "attempts": 2, "error": THROTTLED, "run_after": datetime.now(UTC) + timedelta(seconds=600)}),
        ])
        clock.ago(minutes=5)
        ids["denied"] = await finished(store, make_spec(spec_data, name="denied"), JobState.FAILED, error=DENIED)
        clock.ago(minutes=1)
        ids["quota"] = await finished(store, make_spec(spec_data, name="quota"), JobState.FAILED, error=QUOTA)
        clock.now()
        ids["done"] = await finished(store, make_spec(spec_data, name="done"), JobState.SUCCEEDED)
        ids["pending"] = (await store.submit(make_spec(spec_data, name="pending"))).id
        ids["cancelled"] = (await store.submit(make_spec(spec_data, name="cancelled"))).id
        await store.cancel(ids["cancelled"])

        clock.ago(days=2)
        await register(store, "daemon-c")
        await store.writer.run(ops.daemon_stopped("daemon-c"))
        clock.ago(hours=2, minutes=10)
        await register(store, "daemon-gone")
        clock.ago(hours=2)  # its last heartbeat, ten minutes after its start; then it died
        await store.writer.run(ops.daemon_heartbeat("daemon-gone", [], lease=30), urgent=True)
        clock.ago(minutes=10)
        await register(store, "daemon-b")
        clock.ago(minutes=9)
        await store.writer.run(ops.daemon_stopped("daemon-b"))
        clock.ago(minutes=20)
        await register(store, "daemon-a")
        clock.now()
        before = store.writer.stats()
        # Its heartbeat renews one lease: it claims "retrying" after the beat, as a daemon claims
        # between two beats, so its row says 1 until the next one while it holds 2.
        held = await store.writer.run(ops.daemon_heartbeat("daemon-a", [ids["oldest"]], lease=30), urgent=True)
        after = store.writer.stats()
    assert held == 1
    # The registry's beat rides on the leases' own write: one operation, one commit, two statements.
    assert (after.batches - before.batches, after.operations - before.operations,
            after.statements - before.statements) == (1, 1, 2)
    return ids


def test_status_json_on_sqlite(tmp_path, spec_data):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    ids = asyncio.run(populate(url, spec_data))

    result = status(url, "--json")

    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["database"] == str(tmp_path / "jobs.db")
    daemons = shown["daemons"]
    # jobs_held: its row's count, as of its last heartbeat; jobs_held_now: the RUNNING jobs under
    # its lease as read now ("lapsed" is still daemon-gone's, which no heartbeat ever counted).
    assert [(d["owner"], d["state"], d["jobs_held"], d["jobs_held_now"]) for d in daemons] == [
        ("daemon-a", "alive", 1, 2), ("daemon-gone", "stale", 0, 1), ("daemon-b", "stopped", 0, 0)]  # not daemon-c
    alive, stale, stopped = daemons
    assert alive["heartbeat_age_seconds"] < 30 and alive["stopped_at"] is None and alive["pid"] == 4242
    assert 7200 <= stale["heartbeat_age_seconds"] < 7200 + 60
    assert stopped["stopped_at"] is not None
    # Uptime: an alive one's until now; a stale one's until its last heartbeat, two hours ago, not
    # the 2h10m since its start; a stopped one's until its stop.
    assert 1200 <= alive["uptime_seconds"] < 1200 + 60
    assert 600 <= stale["uptime_seconds"] < 601
    assert 60 <= stopped["uptime_seconds"] < 61
    assert shown["jobs"] == {"PENDING": 1, "RUNNING": 3, "SUCCEEDED": 1, "FAILED": 2, "CANCELLED": 1}

    running = shown["running"]
    assert [r["id"] for r in running] == [ids["oldest"], ids["lapsed"], ids["retrying"]]
    oldest, lapsed, retrying = running
    assert {k: oldest[k] for k in ("name", "owner", "step", "step_state", "resource_kind", "resource_id",
                                   "resource_status", "attempts", "retry_at", "cancel_requested")} == {
        "name": "oldest", "owner": "daemon-a", "step": "endpoint_ready", "step_state": "WAITING",
        "resource_kind": "endpoint", "resource_id": "ep-1", "resource_status": "CREATING", "attempts": 0,
        "retry_at": None, "cancel_requested": False}
    assert 252 <= oldest["running_seconds"] < 252 + 60
    assert re.fullmatch(r"endpoint_ready WAITING, endpoint ep-1 CREATING for 4m\d\ds", oldest["waiting_for"])
    assert re.fullmatch(r"workspace PENDING; lease lapsed \d+s ago, waiting for a daemon to take it over",
                        lapsed["waiting_for"])
    assert lapsed["owner"] == "daemon-gone"
    assert retrying["step"] == "workspace" and retrying["attempts"] == 2 and retrying["retry_at"]
    assert re.fullmatch(r"workspace IN_FLIGHT, creating workspace 'ws-retry' for \d\ds, attempt 3 in 9m\d\ds "
                        r"\(last: \[APIG.0429\] slow down\)", retrying["waiting_for"])

    assert shown["failures"] == [
        {"id": ids["quota"], "name": "quota", "kind": "create", "step": "workspace",
         "finished_at": shown["failures"][0]["finished_at"], "error": QUOTA},
        {"id": ids["denied"], "name": "denied", "kind": "create", "step": "workspace",
         "finished_at": shown["failures"][1]["finished_at"], "error": DENIED},
    ]
    assert shown["failures"][0]["finished_at"] > shown["failures"][1]["finished_at"]

    limited = json.loads(status(url, "--json", "--limit", "1").stdout)
    assert [r["id"] for r in limited["running"]] == [ids["oldest"]]
    assert [f["id"] for f in limited["failures"]] == [ids["quota"]]
    assert [d["owner"] for d in limited["daemons"]] == ["daemon-a", "daemon-gone", "daemon-b"]


def test_status_on_a_terminal_reads_as_one_screen(tmp_path, spec_data):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    ids = asyncio.run(populate(url, spec_data))

    result = status(url)

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'jobs.db'} at ")
    assert "daemons: 1 alive" in lines
    assert f"  {'STATE':<8} {'OWNER':<40} {'VERSION':<9} {'HEARTBEAT':>10} {'JOBS':>5}  UPTIME" in lines
    # JOBS: held now (daemon-a's row still says 1; daemon-gone's 0); a dead daemon's uptime ends
    # at its last heartbeat and does not grow.
    assert re.search(r"^  alive    daemon-a +0\.1\.0 +\d+s ago +2  up 20m\d\ds$", result.stdout, re.MULTILINE)
    assert re.search(r"^  stale    daemon-gone +0\.1\.0 +2h00m ago +1  was up 10m00s until its last heartbeat$",
                     result.stdout, re.MULTILINE)
    assert re.search(r"^  stopped  daemon-b +0\.1\.0 +10m\d\ds ago +0  was up 60s, stopped 9m\d\ds ago$",
                     result.stdout, re.MULTILINE)
    assert "daemon-c" not in result.stdout
    assert "jobs:    PENDING 1  RUNNING 3  SUCCEEDED 1  FAILED 2  CANCELLED 1" in lines
    assert "oldest running (of 3):" in lines
    assert re.search(rf"^  {ids['oldest'][:8]} +4m\d\ds  oldest +endpoint_ready WAITING, endpoint ep-1 CREATING "
                     r"for 4m\d\ds$", result.stdout, re.MULTILINE)
    assert "latest failures (of 2):" in lines
    assert re.search(rf"^  {ids['denied'][:8]} +5m\d\ds  denied +workspace: \[APIGW.0301\] Incorrect IAM "
                     r"authentication information$", result.stdout, re.MULTILINE)
    assert re.search(rf"^  {ids['quota'][:8]} +\d+s  quota +workspace: \[ModelArts.0001\] quota exceeded$",
                     result.stdout, re.MULTILINE)
    assert "\x1b[" not in result.stdout  # not a terminal: no colours


def _on_a_terminal(*args: str, **extra: str) -> str:
    """The command's stdout when it is a terminal (a pseudo-terminal)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*FABRICFLOW, *args], stdout=follower, stderr=subprocess.PIPE, env=env(**extra))
        os.close(follower)
        chunks = []
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            assert ready, "no output from the command within 60 s"
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.stderr is not None
        with proc.stderr:
            errors = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, errors
    finally:
        os.close(leader)
    return b"".join(chunks).decode()


def test_colours_on_a_terminal_unless_no_color(tmp_path, spec_data):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    asyncio.run(populate(url, spec_data))

    coloured = _on_a_terminal("status", "--db", url)
    plain = _on_a_terminal("status", "--db", url, NO_COLOR="1")

    assert "\x1b[32malive" in coloured  # green
    assert "\x1b[31mworkspace: [APIGW.0301]" in coloured  # red
    assert "\x1b[" not in plain and "alive    daemon-a" in plain


async def _populate_pg(pg_url: str, spec_data) -> tuple[str, str]:
    # The writing process's clock is an hour slow: the registry still uses the server's clock,
    # as leases do, so the daemon that just beat is alive, not an hour stale.
    clock = Clock()
    async with clocked_store(pg_url, clock) as store:
        clock.ago(hours=1)
        await register(store, "pg-alive")
        await register(store, "pg-stopped")
        await store.writer.run(ops.daemon_stopped("pg-stopped"), urgent=True)
        await register(store, "pg-crashed")
        job = await store.submit(make_spec(spec_data, name="pg-job"))
        await store.claim(job.id, "pg-alive", lease=3600)
        assert await store.writer.run(ops.daemon_heartbeat("pg-alive", [job.id], lease=3600), urgent=True) == 1
        async with store.engine.begin() as conn:  # as a daemon that crashed two hours ago leaves it
            from sqlalchemy import text

            await conn.execute(text("UPDATE daemons SET heartbeat_at = now() - interval '2 hours' "
                                    "WHERE owner = 'pg-crashed'"))
        clock.now()
        failed = await finished(store, make_spec(spec_data, name="pg-failed"), JobState.FAILED, error=DENIED)
    return job.id, failed


async def test_status_on_postgresql_reads_the_servers_clock(pg_url, spec_data):
    job_id, failed = await _populate_pg(pg_url, spec_data)
    # The CLI runs its own event loop: in a thread of its own, as from another process.
    result = await asyncio.to_thread(status, pg_url, "--json")

    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["database"] == pg_url  # db.describe: the URL, a password hidden (none here)
    assert [(d["owner"], d["state"], d["jobs_held"], d["jobs_held_now"]) for d in shown["daemons"]] == [
        ("pg-alive", "alive", 1, 1), ("pg-crashed", "stale", 0, 0), ("pg-stopped", "stopped", 0, 0)]
    assert shown["daemons"][0]["heartbeat_age_seconds"] < 30
    assert shown["jobs"] == {"PENDING": 0, "RUNNING": 1, "SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 0}
    assert [r["id"] for r in shown["running"]] == [job_id]
    assert shown["running"][0]["waiting_for"] == "workspace PENDING"
    assert [(f["id"], f["error"]) for f in shown["failures"]] == [(failed, DENIED)]


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["db", "prune", "--older-than", "30d"],
                                  ["db", "prune", "--older-than", "30d", "--dry-run", "--json"]])
def test_status_and_prune_on_a_missing_database_exit_3_and_create_nothing(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*args, "--db", "sqlite:///typo/x.db"], catch_exceptions=False)
    assert result.exit_code == 3
    assert result.stderr == "error: no database at typo/x.db\n"
    assert result.stdout == ""
    assert files_under(tmp_path) == []


def test_status_reads_sqlite_without_sqlalchemy_alembic_or_aiohttp(tmp_path):
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    subprocess.run([*FABRICFLOW, "db", "upgrade", "--db", db], capture_output=True, env=env(), timeout=60, check=True)
    for args in (["status", "--db", db], ["status", "--json", "--db", db]):
        assert _loaded(imported_by(*args), HEAVY) == [], args


def test_status_help_teaches_what_it_shows():
    result = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--help"], capture_output=True,
                            text=True, env=env(), timeout=60, check=True)
    for words in ("alive (a heartbeat within its lease time, and on this machine its process", "stale",
                  "--limit N", "--json"):
        assert words in result.stdout


def test_a_database_at_the_previous_revision_is_migrated_and_read_through_sqlalchemy(tmp_path, spec_data):
    from alembic import command

    from orchestrator.store import db
    from orchestrator.store.jobs import JobStore

    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"

    async def at_0002() -> str:  # as the fabricflow before the registry left it, with a job
        engine = db.create_engine(url)
        async with engine.connect() as conn:
            await conn.run_sync(lambda sync: command.upgrade(db.alembic_config(sync), "0002"))
            await conn.commit()
        store = JobStore(engine)
        try:
            return await finished(store, make_spec(spec_data, name="old"), JobState.FAILED, error=DENIED)
        finally:
            await store.close()

    failed = asyncio.run(at_0002())

    result = status(url, "--json")

    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["daemons"] == [] and shown["jobs"]["FAILED"] == 1
    assert [(f["id"], f["step"], f["error"]) for f in shown["failures"]] == [(failed, "workspace", DENIED)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0003"


async def _settling(store, emulator, spec_data, url: str) -> tuple[dict, str]:
    """A real runner whose workspace create has an unknown outcome (the emulator carries it out
    an hour later), so the step is IN_FLIGHT in its settle window, only looking; ``status --json``
    and ``status`` read while it has looked at least three times."""
    from orchestrator.engine.runner import EngineSettings, Runner
    from orchestrator.fabric.client import FabricClient
    from tests.conftest import until
    from tests.integration.test_engine import FAST, OWNER, faults, stats

    # A window far longer than the test: every look below is inside it.
    settling = EngineSettings(**{**FAST.__dict__, "settle_seconds": 600.0, "look_interval": 0.05})
    await faults(emulator.url, late_next=1, late_by=3600)
    job = await store.submit(make_spec(spec_data))
    await store.claim(job.id, OWNER, lease=600)
    async with FabricClient(emulator.url) as client:
        task = asyncio.create_task(Runner(store, client, owner=OWNER, settings=settling).run(job.id))
        try:
            await until(lambda: store.events(job.id),
                        lambda found: any((e.detail or "").startswith("look 3: ") for e in found), timeout=60)
            shown = json.loads((await asyncio.to_thread(status, url, "--json")).stdout)
            text = (await asyncio.to_thread(status, url)).stdout
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    looks = [e.detail for e in await store.events(job.id) if (e.detail or "").startswith("look ")]
    # Nothing but settle looks so far: no create was sent again, and the window is not over.
    assert looks and all(" yet; a create sent by the last attempt may still be carried out" in d for d in looks)
    assert (await stats(emulator.url))["operations"]["create_workspace"] == 1
    return shown, text


def _says_it_settles(shown: dict, text: str) -> None:
    [running] = shown["running"]
    assert running["step"] == "workspace" and running["step_state"] == "IN_FLIGHT"
    assert re.fullmatch(r"workspace IN_FLIGHT, looking for workspace 'apieworkspace' \(settle window, look \d+\) "
                        r"for \d+s", running["waiting_for"]), running["waiting_for"]
    assert running["settle_look"] >= 3
    assert re.search(rf"^  {running['id'][:8]} +\d+s  {running['name']} +workspace IN_FLIGHT, looking for "
                     r"workspace 'apieworkspace' \(settle window, look \d+\) for \d+s$", text, re.MULTILINE), text
    assert "creating workspace" not in text


async def test_status_says_a_create_in_its_settle_window_is_only_looking(store, db_url, emulator, spec_data):
    shown, text = await _settling(store, emulator, spec_data, db_url)
    _says_it_settles(shown, text)


async def test_status_on_postgresql_says_a_create_in_its_settle_window_is_only_looking(pg_url, emulator, spec_data):
    from orchestrator.store.jobs import JobStore

    store = await JobStore.open(pg_url, auto_upgrade=True)
    try:
        shown, text = await _settling(store, emulator, spec_data, pg_url)
    finally:
        await store.close()
    _says_it_settles(shown, text)
