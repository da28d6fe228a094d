"""Power cuts under the real processes: no acknowledged job is lost, no cloud resource is doubled.

The daemon and every ``fabricflow submit`` run under the power-cut shim (tests/power/shim.c),
so the database directory behaves like a disk whose unsynced writes vanish when the power goes.
The emulator plays the cloud and is not under the shim: what it created stays created.

Three times: a daemon runs, jobs are submitted one by one (each printed ID is an acknowledgement:
the job is accepted), the daemon is seen busy (steps in flight, jobs finishing), a few more jobs
are acknowledged, then the daemon is SIGKILLed and the power is cut. A last daemon runs every
job to its end. Then:

1. every acknowledged job is in the database and SUCCEEDED;
2. no name was created twice in the emulator (``/_emulator/stats``);
3. every resource the emulator holds with a fabricflow ownership marker is recorded by a job's
   steps: the cuts left no orphans;
4. the database passes ``PRAGMA integrity_check``;
5. the cuts really dropped writes (and the shim saw the database's WAL in every run).

A store that acknowledges a submit before its commit is fsynced (SQLite ``synchronous=NORMAL``
in WAL mode) fails 1: the jobs acknowledged just before a cut are gone after it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import QUICKSTART
from tests.crash.procs import FABRICFLOW, Daemon, Emulator, env, query, wait_for
from tests.power.powercut import cut_power, env_with_shim
from tests.torture.scenario import list_all

#: Per cut: jobs submitted before the daemon is seen busy, and jobs acknowledged just before the
#: cut. 3 cuts, 21 jobs: about 20 s of CLI start-ups on an idle 2-core machine.
PHASES = [(4, 3), (4, 3), (4, 3)]
KINDS = ("workspace", "endpoint", "model", "service_instance")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
MARKER = "[fabricflow:"


def write_spec(workdir: Path, index: int) -> Path:
    """The quickstart with names of its own for job ``index``."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["name"] = f"powercut-{index}"
    data["workspace"]["name"] = f"pcws-{index}"
    data["endpoint"]["name"] = f"pcep-{index}"
    data["model"]["name"] = f"pcmodel-{index}"
    data["service_instance"]["name"] = f"pcsi-{index}"
    data["invocation"]["messages"][0]["content"] = f"hello from job {index}"
    path = workdir / "specs" / f"job-{index:03d}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_under(extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``procs.cli`` with extra environment (the shim)."""
    result = subprocess.run([*FABRICFLOW, *args], check=False, capture_output=True, text=True,
                            env=env(**extra), timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"fabricflow {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def snapshot(db: Path, scratch: Path) -> dict[str, Any]:
    """What the database holds right after a cut, read from a copy (the original stays as the
    cut left it for the next daemon): job IDs by state."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for suffix in ("", "-wal"):
        if Path(f"{db}{suffix}").exists():
            shutil.copyfile(f"{db}{suffix}", scratch / f"{db.name}{suffix}")
    conn = sqlite3.connect(scratch / db.name)
    try:
        rows = conn.execute("SELECT id, state FROM jobs").fetchall()
    except sqlite3.OperationalError:  # the cut took the schema itself
        rows = []
    finally:
        conn.close()
    return {job_id: state for job_id, state in rows}


def count(db: Path, sql: str, *params: Any) -> int:
    return int(query(db, sql, *params)[0][0])


def marked_resources(base: str) -> list[tuple[str, str, str]]:
    """(kind, id, name) of every emulator resource whose description carries a fabricflow marker."""
    found = []
    for ws in list_all(base, "/v1/workspaces", "workspaces"):
        if MARKER in (ws.get("description") or ""):
            found.append(("workspace", ws["id"], ws["name"]))
        prefix = f"/v1/workspaces/{urllib.parse.quote(ws['id'], safe='')}"
        for kind, path, key in (("endpoint", "/endpoints", "endpoints"),
                                ("model", "/models", "models"),
                                ("service_instance", "/services/instances", "service_instances")):
            for item in list_all(base, prefix + path, key):
                if MARKER in (item.get("description") or ""):
                    found.append((kind, item["id"], item["name"]))
    return found


@pytest.mark.timeout(240)
def test_power_cuts_lose_no_acknowledged_job_and_create_nothing_twice(tmp_path: Path, shim: Path) -> None:
    started = time.monotonic()
    disk = tmp_path / "disk"  # POWERCUT_DIR: the "disk" that loses power
    db = disk / "data" / "jobs.db"
    db.parent.mkdir(parents=True)
    url = f"sqlite+aiosqlite:///{db}"
    under_shim = env_with_shim(shim, disk)
    daemon_env = {**under_shim, "FABRICFLOW_LOG_LEVEL": "info", "FABRICFLOW_LOG_FORMAT": "json"}
    emulator = Emulator("--ready-after", "1", "--instance-ready-after", "0.3", log=tmp_path / "emulator.log")
    logs: list[Path] = []
    acknowledged: list[str] = []
    cuts: list[dict[str, Any]] = []
    daemon: Daemon | None = None

    def start_daemon() -> Daemon:
        logs.append(tmp_path / f"daemon-{len(logs) + 1}.log")
        return Daemon(url, emulator.url, logs[-1], **daemon_env)

    def submit() -> str:
        spec = write_spec(tmp_path, len(acknowledged) + 1)
        job_id = cli_under(under_shim, "submit", str(spec), "--db", url).stdout.strip()
        assert len(job_id) == 32, job_id
        acknowledged.append(job_id)
        return job_id

    def in_progress() -> int:
        return count(db, "SELECT COUNT(*) FROM steps WHERE state IN ('IN_FLIGHT', 'WAITING')")

    def succeeded() -> int:
        return count(db, "SELECT COUNT(*) FROM jobs WHERE state = 'SUCCEEDED'")

    try:
        cli_under(under_shim, "db", "upgrade", "--db", url)
        after_cut: dict[str, str] = {}
        for phase, (early, late) in enumerate(PHASES, start=1):
            daemon = start_daemon()
            done_before = sum(1 for state in after_cut.values() if state == "SUCCEEDED")
            for _ in range(early):
                submit()
            wait_for(f"phase {phase}: a job to succeed while others are in flight",
                     lambda done=done_before: succeeded() > done and in_progress() > 0, timeout=60)
            late_ids = [submit() for _ in range(late)]
            started_late = (f"SELECT COUNT(*) FROM steps WHERE job_id IN ({','.join('?' * late)}) "
                            "AND state != 'PENDING'")
            wait_for(f"phase {phase}: the daemon to work on a job acknowledged just now",
                     lambda sql=started_late, ids=tuple(late_ids): in_progress() > 0 and count(db, sql, *ids) > 0,
                     timeout=60)
            assert daemon.proc.poll() is None, f"daemon died by itself:\n{logs[-1].read_text()}"
            in_flight = in_progress()
            daemon.kill()
            daemon = None
            cut = cut_power(disk)
            after_cut = snapshot(db, tmp_path / f"after-cut-{phase}")
            cut["at_second"] = round(time.monotonic() - started, 1)
            cut["steps_in_flight_at_kill"] = in_flight
            cut["acknowledged_so_far"] = len(acknowledged)
            cut["acknowledged_missing_after_cut"] = [j for j in acknowledged if j not in after_cut]
            cut["succeeded_after_cut"] = sum(1 for s in after_cut.values() if s == "SUCCEEDED")
            cuts.append(cut)

        daemon = start_daemon()
        wait_for("the last daemon to start", lambda: '"daemon_started"' in logs[-1].read_text(errors="replace"))
        wait_for("every job in the database to end", lambda: count(
            db, f"SELECT COUNT(*) FROM jobs WHERE state NOT IN {TERMINAL}") == 0, timeout=90)
        assert daemon.terminate(timeout=40) == 0, logs[-1].read_text()
        daemon = None
        finished_at = round(time.monotonic() - started, 1)

        stats = emulator.stats()
        marked = marked_resources(emulator.url)
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.kill()
        emulator.stop()

    conn = sqlite3.connect(db)
    try:
        states = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
        recorded = {rid for (rid,) in conn.execute("SELECT resource_id FROM steps WHERE resource_id IS NOT NULL")}
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()

    lost = [j for j in acknowledged if j not in states]
    not_succeeded = {j: states[j] for j in acknowledged if j in states and states[j] != "SUCCEEDED"}
    duplicates = {kind: {name: n for name, n in stats["created"].get(kind, {}).items() if n > 1} for kind in KINDS}
    duplicates = {kind: names for kind, names in duplicates.items() if names}
    orphans = [m for m in marked if m[1] not in recorded]
    summary = {
        "seconds": round(time.monotonic() - started, 1),
        "all_jobs_ended_at_second": finished_at,
        "acknowledged": len(acknowledged),
        "lost": lost,
        "not_succeeded": not_succeeded,
        "duplicates": duplicates,
        "orphans": orphans,
        "integrity": integrity,
        "created": {kind: sum(stats["created"].get(kind, {}).values()) for kind in KINDS},
        "cuts": [{k: v for k, v in c.items() if k != "shm_deleted"} for c in cuts],
        "dropped_records": sum(c["records"] for c in cuts),
    }
    shown = json.dumps(summary, indent=1)
    (tmp_path / "summary.json").write_text(shown)
    print(shown)

    # 1. No acknowledged job is lost, and every one finished.
    assert lost == [], f"{len(lost)} acknowledged jobs are not in the database after the power cuts\n{shown}"
    assert not_succeeded == {}, shown
    # 2. Nothing created twice.
    assert duplicates == {}, shown
    # 3. Nothing the daemon created is unknown to the database.
    assert orphans == [], shown
    # 4. The file is sound.
    assert integrity == [("ok",)], shown
    # 5. The cuts bit. The shim saw the WAL in every daemon's life; the writes dropped always
    # include the daemon lock file's (truncated and rewritten at start-up, never fsynced), so
    # there is at least one. Dropped WAL or database writes may legitimately be none with a
    # durable store: it fsyncs every commit before acknowledging it, so only a kill in the
    # middle of a transaction (frames written, fsync not yet done) leaves any to drop.
    assert all("data/jobs.db-wal" in c["logs"] for c in cuts), shown
    assert summary["dropped_records"] >= 1, shown
