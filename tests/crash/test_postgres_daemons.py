"""Several daemons share the work through PostgreSQL; one dies by kill -9, the other finishes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
import yaml

from tests.conftest import QUICKSTART
from tests.crash.procs import Daemon, Emulator, cli


@pytest.fixture
def emulator(tmp_path: Path):
    emu = Emulator("--ready-after", "2", "--instance-ready-after", "0.3", log=tmp_path / "emulator.log")
    yield emu
    emu.stop()


async def poll(conn: asyncpg.Connection, sql: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await conn.fetch(sql)
        if check(rows):
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting on: {sql}")


@pytest.mark.timeout(180)
async def test_two_daemons_share_jobs_and_survive_kill9(tmp_path, emulator, pg_url):
    cli("db", "upgrade", "--db", pg_url)
    base = yaml.safe_load(QUICKSTART.read_text())
    job_ids = []
    for i in range(8):
        spec = dict(base, name=f"pg-{i}", workspace={"name": f"pgws-{i}"},
                    endpoint={**base["endpoint"], "name": f"ep_{i}"}, model={**base["model"], "name": f"m{i}"},
                    service_instance={"name": f"si{i}"})
        path = tmp_path / f"job{i}.yaml"
        path.write_text(yaml.safe_dump(spec))
        job_ids.append(cli("submit", str(path), "--db", pg_url).stdout.strip())

    share = {"FABRICFLOW_DAEMON__CONCURRENCY": "4"}
    first = Daemon(pg_url, emulator.url, tmp_path / "a.log", **share)
    second = Daemon(pg_url, emulator.url, tmp_path / "b.log", **share)
    conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        owners = await poll(conn, "SELECT DISTINCT lease_owner FROM jobs WHERE state = 'RUNNING'",
                            lambda rows: len(rows) == 2)
        # Kill the daemon that owns a job while it waits for its endpoint.
        waiting = await poll(conn, "SELECT j.lease_owner FROM jobs j JOIN steps s ON s.job_id = j.id "
                             "WHERE s.name = 'endpoint_ready' AND s.state = 'WAITING'", lambda rows: rows)
        victim = first if f":{first.proc.pid}:" in waiting[0]["lease_owner"] else second
        survivor = second if victim is first else first
        assert {r["lease_owner"] for r in owners}
        victim.kill()
        assert survivor.proc.poll() is None
        await poll(conn, "SELECT state FROM jobs", lambda rows: all(r["state"] == "SUCCEEDED" for r in rows),
                   timeout=120)
        recovered = await conn.fetch("SELECT job_id FROM events WHERE detail LIKE 'recovered by%'")
        assert recovered, "the survivor should have recovered the victim's jobs"
    finally:
        await conn.close()
        for daemon in (first, second):
            if daemon.proc.poll() is None:
                assert daemon.terminate() == 0
    stats = emulator.stats()
    for kind in ("workspace", "endpoint", "model", "service_instance"):
        assert len(stats["created"][kind]) == 8 and set(stats["created"][kind].values()) == {1}, (kind, stats)
