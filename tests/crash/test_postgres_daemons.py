"""Several daemons share the work through PostgreSQL; one dies by kill -9, the other finishes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
import yaml

from tests.conftest import QUICKSTART
from tests.crash.procs import FABRICFLOW, Daemon, Emulator, cli


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


def _can_unshare_pids() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


# The daemon runs as PID 4,000,000 of a PID namespace of its own: a PID that no process outside
# can have (this kernel's pid_max is far lower), on the same host name, as in a Kubernetes pod
# with hostNetwork beside another.
IN_ITS_OWN_PID_NAMESPACE = [
    "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
    'echo 3999999 > /proc/sys/kernel/ns_last_pid; "$@"; :', "sh", *FABRICFLOW,
]


@pytest.mark.timeout(180)
@pytest.mark.skipif(not _can_unshare_pids(), reason="needs unshare --pid (Linux, root)")
async def test_a_daemon_in_another_pid_namespace_is_judged_by_its_lease_alone(tmp_path, pg_url):
    """Same host name, another PID namespace: its PID does not exist here, but that does not
    make it dead. `fabricflow status` shows it alive while it beats, and another daemon takes
    its jobs over only once its leases lapse."""
    import json
    import os

    emulator = Emulator("--ready-after", "600", log=tmp_path / "emulator.log")  # every job waits, held
    cli("db", "upgrade", "--db", pg_url)
    base = yaml.safe_load(QUICKSTART.read_text())
    for i in range(3):
        spec = dict(base, name=f"ns-{i}", workspace={"name": f"nsws-{i}"})
        path = tmp_path / f"job{i}.yaml"
        path.write_text(yaml.safe_dump(spec))
        cli("submit", str(path), "--db", pg_url)
    inside = Daemon(pg_url, emulator.url, tmp_path / "inside.log", command=IN_ITS_OWN_PID_NAMESPACE)
    outside: Daemon | None = None
    conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))

    def state_of(owner: str) -> str:
        daemons = json.loads(cli("status", "--json", "--db", pg_url).stdout)["daemons"]
        return next(d["state"] for d in daemons if d["owner"] == owner)

    try:
        waiting = ("SELECT j.lease_owner FROM jobs j JOIN steps s ON s.job_id = j.id "
                   "WHERE s.name = 'endpoint_ready' AND s.state = 'WAITING'")
        held = await poll(conn, waiting, lambda rows: len(rows) == 3)
        owners = {r["lease_owner"] for r in held}
        assert len(owners) == 1
        owner = owners.pop()
        _, pid, _, namespace = owner.split(":")
        assert pid == "4000000" and namespace and namespace != format(os.stat("/proc/self/ns/pid").st_ino, "x")
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)  # from here, that PID is no process at all
        assert state_of(owner) == "alive"

        outside = Daemon(pg_url, emulator.url, tmp_path / "outside.log")
        # Two heartbeats of its own (one a second) span many claim passes (every 0.1 s).
        beats = await poll(conn, "SELECT owner, heartbeat_at - started_at AS up FROM daemons "
                           "WHERE stopped_at IS NULL AND owner <> '" + owner + "'",
                           lambda rows: rows and rows[0]["up"].total_seconds() >= 2)
        assert {r["lease_owner"] for r in await conn.fetch(waiting)} == {owner}
        assert await conn.fetchval("SELECT count(*) FROM events WHERE detail LIKE 'recovered by%'") == 0
        assert state_of(owner) == "alive"

        inside.kill()  # the whole namespace goes: its leases (5 s) lapse, then the jobs move
        await poll(conn, "SELECT DISTINCT lease_owner FROM jobs WHERE state = 'RUNNING'",
                   lambda rows: [r["lease_owner"] for r in rows] == [beats[0]["owner"]], timeout=60)
        assert state_of(owner) == "stale"
        created = emulator.stats()["created"]  # one endpoint per job's workspace, none again
        assert created["workspace"] == {"nsws-0": 1, "nsws-1": 1, "nsws-2": 1} and created["endpoint"] == {
            "apie_test": 3}, created
    finally:
        await conn.close()
        if inside.proc.poll() is None:
            inside.kill()
        if outside is not None and outside.proc.poll() is None:
            assert outside.terminate() == 0
        emulator.stop()
