"""kill -9 the daemon mid-job; a restarted daemon finishes it without creating anything twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import QUICKSTART
from tests.crash.procs import Daemon, Emulator, cli, query, wait_for


@pytest.fixture
def emulator(tmp_path: Path):
    emu = Emulator("--ready-after", "4", "--instance-ready-after", "0.5", log=tmp_path / "emulator.log")
    yield emu
    emu.stop()


def step_state(db: Path, job_id: str, step: str) -> str | None:
    rows = query(db, "SELECT state FROM steps WHERE job_id = ? AND name = ?", job_id, step)
    return rows[0][0] if rows else None


def job_state(db: Path, job_id: str) -> str | None:
    rows = query(db, "SELECT state FROM jobs WHERE id = ?", job_id)
    return rows[0][0] if rows else None


def test_kill9_while_waiting_for_endpoint_resumes_without_duplicates(tmp_path, emulator):
    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
    assert len(job_id) == 32

    first = Daemon(url, emulator.url, tmp_path / "daemon1.log")
    wait_for("the job to wait for its endpoint", lambda: step_state(db, job_id, "endpoint_ready") == "WAITING")
    first.kill()

    # The crash left the job where it was: endpoint created and recorded, nothing after it.
    assert job_state(db, job_id) == "RUNNING"
    endpoint_id = query(db, "SELECT resource_id FROM steps WHERE job_id=? AND name='endpoint'", job_id)[0][0]
    assert endpoint_id
    assert step_state(db, job_id, "model") == "PENDING"

    second = Daemon(url, emulator.url, tmp_path / "daemon2.log")
    try:
        wait_for("the job to finish", lambda: job_state(db, job_id) in ("SUCCEEDED", "FAILED"), timeout=60)
    finally:
        assert second.terminate() == 0

    assert job_state(db, job_id) == "SUCCEEDED", (tmp_path / "daemon2.log").read_text()
    stats = emulator.stats()
    assert stats["created"]["workspace"] == {"apieworkspace": 1}
    assert stats["created"]["endpoint"] == {"apie_test": 1}
    assert stats["created"]["model"] == {"LLama3-8b": 1}
    assert stats["created"]["service_instance"] == {"test_serviceInstanceName": 1}
    # The endpoint that finished is the one recorded before the crash.
    assert query(db, "SELECT resource_id FROM steps WHERE job_id=? AND name='endpoint_ready'",
                 job_id)[0][0] == endpoint_id
    details = [d for (d,) in query(db, "SELECT detail FROM events WHERE job_id=? ORDER BY id", job_id)]
    assert any(d.startswith("recovered by") for d in details)
    reply = query(db, "SELECT result FROM jobs WHERE id=?", job_id)[0][0]
    assert "You said: hello" in reply


def test_second_daemon_on_same_file_is_refused(tmp_path, emulator):
    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    cli("db", "upgrade", "--db", url)
    first = Daemon(url, emulator.url, tmp_path / "daemon1.log")
    try:
        wait_for("the first daemon to hold the lock", lambda: "fabricflow daemon" in (tmp_path / "daemon1.log").read_text())
        wait_for("the lock file", lambda: (tmp_path / "jobs.db.lock").read_text().startswith("pid"))
        second = cli("daemon", "--db", url, "--fabric-url", emulator.url, check=False)
        assert second.returncode == 2
        assert "another fabricflow daemon is already running" in second.stderr
        assert str(db) in second.stderr
    finally:
        assert first.terminate() == 0
