"""The daemon registry with real daemon processes: `fabricflow status` shows a running daemon
alive with the jobs it holds, stopped after SIGTERM, stale at once after kill -9 (its process
is gone from this machine); on PostgreSQL, every daemon sharing the database."""

from __future__ import annotations

import json
import re
import socket
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QUICKSTART
from tests.crash.procs import Daemon, Emulator, cli, wait_for


def status(url: str) -> dict[str, Any]:
    return json.loads(cli("status", "--json", "--db", url).stdout)


def daemon_row(url: str, daemon: Daemon) -> dict[str, Any] | None:
    return next((d for d in status(url)["daemons"] if f":{daemon.proc.pid}:" in d["owner"]), None)


@pytest.fixture
def emulator(tmp_path: Path):
    # Endpoints stay CREATING for the whole test: the job is held, waiting, while we look.
    emu = Emulator("--ready-after", "600", log=tmp_path / "emulator.log")
    yield emu
    emu.stop()


def test_a_daemon_is_alive_while_it_runs_stopped_after_sigterm_stale_after_kill9(tmp_path, emulator):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
    first = Daemon(url, emulator.url, tmp_path / "first.log")
    try:
        # Heartbeats every second (tests/crash/procs.py): the held job shows within a few.
        row = wait_for("the daemon alive, holding the job", lambda: (
            (r := daemon_row(url, first)) and r["state"] == "alive" and r["jobs_held"] == 1 and r))
        shown = status(url)
        assert [(r["id"], r["owner"], r["step"], r["step_state"]) for r in shown["running"]] == [
            (job_id, row["owner"], "endpoint_ready", "WAITING")]
        assert shown["running"][0]["waiting_for"].startswith(
            f"endpoint_ready WAITING, endpoint {shown['running'][0]['resource_id']} CREATING for ")
    finally:
        assert first.terminate() == 0
    assert row["host"] == socket.gethostname() and row["pid"] == first.proc.pid
    assert row["version"] == version("fabricflow") and row["lease_seconds"] == 5.0

    stopped = daemon_row(url, first)
    assert stopped is not None and stopped["state"] == "stopped" and stopped["jobs_held"] == 0
    assert datetime.fromisoformat(stopped["stopped_at"]) >= datetime.fromisoformat(stopped["heartbeat_at"])
    assert status(url)["jobs"]["PENDING"] == 1  # handed back by the drain

    # A lease of ten minutes: only its process being gone can make this daemon stale in the test.
    second = Daemon(url, emulator.url, tmp_path / "second.log", FABRICFLOW_DAEMON__LEASE_SECONDS="600")
    wait_for("the second daemon alive, holding the job", lambda: (
        (r := daemon_row(url, second)) and r["state"] == "alive" and r["jobs_held"] == 1))
    second.kill()
    # Nothing marks a killed daemon's row, but its process is gone from this machine: stale at
    # the first look, long before its lease is over.
    crashed = daemon_row(url, second)
    assert crashed is not None and crashed["state"] == "stale" and crashed["stopped_at"] is None
    assert crashed["heartbeat_age_seconds"] < 600 and crashed["lease_seconds"] == 600
    assert [d["state"] for d in status(url)["daemons"]] == ["stale", "stopped"]


@pytest.mark.timeout(180)
async def test_every_daemon_sharing_postgresql_registers(tmp_path, emulator, pg_url):
    import asyncio

    await asyncio.to_thread(cli, "db", "upgrade", "--db", pg_url)
    await asyncio.to_thread(cli, "submit", str(QUICKSTART), "--db", pg_url)
    daemons = [Daemon(pg_url, emulator.url, tmp_path / f"d{i}.log") for i in range(2)]
    try:
        def both_alive() -> Any:
            rows = [daemon_row(pg_url, d) for d in daemons]
            alive = all(r and r["state"] == "alive" for r in rows)
            return alive and sum(r["jobs_held"] for r in rows) == 1 and rows  # the one job, held by one

        rows = await asyncio.to_thread(wait_for, "both daemons alive, one holding the job", both_alive, timeout=60)
        assert sorted(r["jobs_held"] for r in rows) == [0, 1]
    finally:
        for daemon in daemons:
            assert daemon.terminate() == 0
    shown = await asyncio.to_thread(status, pg_url)
    assert sorted(d["state"] for d in shown["daemons"]) == ["stopped", "stopped"]
    assert {d["pid"] for d in shown["daemons"]} == {d.proc.pid for d in daemons}


def test_status_counts_the_jobs_of_a_daemon_killed_before_its_first_heartbeat(tmp_path, emulator):
    # No heartbeat for ten minutes: the registry row's count stays 0 from the start to the kill.
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
    daemon = Daemon(url, emulator.url, tmp_path / "daemon.log", FABRICFLOW_DAEMON__HEARTBEAT_SECONDS="600",
                    FABRICFLOW_DAEMON__LEASE_SECONDS="1200")
    try:
        row = wait_for("the daemon alive, holding the job it claimed", lambda: (
            (r := daemon_row(url, daemon)) and r["state"] == "alive" and r["jobs_held_now"] == 1 and r))
        assert row["jobs_held"] == 0  # its last heartbeat (its registration) counted none
        # JOBS: 1, read from the jobs (its row still says 0).
        assert re.fullmatch(rf"  alive    {re.escape(_shown(row['owner']))} +\S+ +\d+s ago +1  up \S+",
                            _daemon_line(url, row["owner"]))
    finally:
        daemon.kill()
    held_by = f"held by  {row['owner']} until "
    assert any(text.startswith(held_by) for text in cli("show", job_id, "--db", url).stdout.splitlines())
    crashed = daemon_row(url, daemon)
    assert crashed is not None and crashed["state"] == "stale"
    assert (crashed["jobs_held"], crashed["jobs_held_now"]) == (0, 1)  # what `show` says it holds
    assert crashed["uptime_seconds"] == 0.0  # known up until its last heartbeat: its registration
    assert re.fullmatch(rf"  stale    {re.escape(_shown(row['owner']))} +\S+ +\d+s ago +1  "
                        r"was up 0s until its last heartbeat", _daemon_line(url, row["owner"]))


def _shown(owner: str) -> str:
    """An owner as the OWNER column shows it (40 characters at most)."""
    return owner if len(owner) <= 40 else owner[:39] + "…"


def _daemon_line(url: str, owner: str) -> str:
    """The line of ``fabricflow status`` that lists the daemon ``owner``."""
    lines = cli("status", "--db", url).stdout.splitlines()
    return next(line for line in lines if line[11:51].rstrip() == _shown(owner))
