"""Teardown and invoke with real processes: kill -9 mid-teardown, invocations stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART
from tests.crash.procs import Daemon, Emulator, cli, query, wait_for


@pytest.fixture
def emulator(tmp_path: Path):
    emu = Emulator("--ready-after", "0.3", "--instance-ready-after", "0.3", "--delete-after", "3",
                   log=tmp_path / "emulator.log")
    yield emu
    emu.stop()


def test_kill9_during_teardown_resumes_and_leaves_nothing(tmp_path, emulator):
    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    job = json.loads(cli("run", str(QUICKSTART), "--db", url, "--fabric-url", emulator.url, "--json").stdout)
    assert job["state"] == "SUCCEEDED"
    assert emulator.stats()["live"] == {"workspace": 1, "endpoint": 1, "model": 1, "service_instance": 1}

    teardown_id = cli("teardown", job["id"][:10], "--db", url).stdout.strip()
    first = Daemon(url, emulator.url, tmp_path / "daemon1.log")

    def instance_deleting():
        rows = query(db, "SELECT state FROM steps WHERE job_id=? AND name='service_instance'", teardown_id)
        return rows and rows[0][0] == "WAITING"

    wait_for("the teardown to wait for the instance to be gone", instance_deleting)
    first.kill()

    second = Daemon(url, emulator.url, tmp_path / "daemon2.log")
    try:
        wait_for("the teardown to finish", lambda: query(
            db, "SELECT state FROM jobs WHERE id=?", teardown_id)[0][0] in ("SUCCEEDED", "FAILED"), timeout=60)
    finally:
        assert second.terminate() == 0
    shown = json.loads(cli("show", teardown_id, "--db", url, "--json").stdout)
    assert shown["state"] == "SUCCEEDED", shown
    assert [s["name"] for s in shown["steps"]] == ["service_instance", "model", "endpoint", "workspace"]
    assert emulator.stats()["live"] == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}
    # Deleting twice is harmless, creating twice never happened.
    assert all(sum(v.values()) == 1 for v in emulator.stats()["created"].values())


def test_invoke_streams_and_stores_the_invocation(tmp_path, emulator):
    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    job = json.loads(cli("run", str(QUICKSTART), "--db", url, "--fabric-url", emulator.url, "--json").stdout)

    result = cli("invoke", job["id"], "what is fabric?", "--max-tokens", "50", "--temperature", "0.5",
                 "--db", url, "--fabric-url", emulator.url, "--json")
    record = json.loads(result.stdout)
    assert "You said: what is fabric?" in record["reply"]
    assert "You said: what is fabric?" in result.stderr  # streamed as it arrived
    assert record["finish_reason"] == "stop"
    assert record["usage"]["total_tokens"] > 0
    assert record["ttft_ms"] is not None and record["duration_ms"] >= record["ttft_ms"]
    assert record["request"]["max_tokens"] == 50 and record["request"]["temperature"] == 0.5
    rows = query(db, "SELECT job_id, reply FROM invocations")
    assert rows == [(job["id"], record["reply"])]


def test_invoke_refuses_embedded_emulator_and_unready_jobs(tmp_path):
    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
    result = cli("invoke", job_id, "hi", "--db", url, check=False)
    assert result.returncode == 2
    assert "embedded emulator keeps nothing between runs" in result.stderr
    result = cli("invoke", job_id, "hi", "--db", url, "--fabric-url", "http://127.0.0.1:9", check=False)
    assert result.returncode == 2
    assert "has no RUNNING service instance yet" in result.stderr


def test_run_with_missing_reused_ids_exits_3_and_writes_nothing(tmp_path, emulator):
    db = tmp_path / "jobs.db"
    spec = tmp_path / "reuse.yaml"
    spec.write_text(QUICKSTART.read_text().replace(
        "workspace: {name: apieworkspace, description: apie test workspace}", "workspace: {id: " + "a" * 32 + "}"))
    result = cli("run", str(spec), "--db", f"sqlite+aiosqlite:///{db}", "--fabric-url", emulator.url, check=False)
    assert result.returncode == 3
    assert f"workspace {'a' * 32} (reused by the spec) does not exist" in result.stderr
    assert query(db, "SELECT count(*) FROM jobs") == [(0,)]


def test_chat_keeps_the_conversation_and_stores_each_turn(tmp_path, emulator):
    import subprocess

    from tests.crash.procs import FABRICFLOW, env

    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    job = json.loads(cli("run", str(QUICKSTART), "--db", url, "--fabric-url", emulator.url, "--json").stdout)
    chat = subprocess.run([*FABRICFLOW, "chat", job["id"], "--db", url, "--fabric-url", emulator.url],
                          input="first question\n\nsecond question\n", capture_output=True, text=True,
                          env=env(), timeout=60)
    assert chat.returncode == 0, chat.stderr
    assert "You said: first question" in chat.stderr and "You said: second question" in chat.stderr
    rows = query(db, "SELECT request FROM invocations ORDER BY id")
    assert len(rows) == 2
    second = json.loads(rows[1][0])["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]


def test_submit_checks_reused_ids_against_a_real_fabric_before_writing(tmp_path, emulator):
    db = tmp_path / "jobs.db"
    spec = tmp_path / "reuse.yaml"
    spec.write_text(QUICKSTART.read_text().replace(
        "workspace: {name: apieworkspace, description: apie test workspace}", "workspace: {id: " + "b" * 32 + "}"))
    result = cli("submit", str(spec), "--db", f"sqlite+aiosqlite:///{db}", "--fabric-url", emulator.url, check=False)
    assert result.returncode == 3
    assert "(reused by the spec) does not exist" in result.stderr
    assert not db.exists() or query(db, "SELECT count(*) FROM jobs") == [(0,)]


def test_submit_wait_and_teardown_wait_with_a_daemon(tmp_path, emulator):
    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    cli("db", "upgrade", "--db", url)
    daemon = Daemon(url, emulator.url, tmp_path / "d.log")
    try:
        done = cli("submit", str(QUICKSTART), "--db", url, "--wait", "--json")
        job = json.loads(done.stdout)
        assert job["state"] == "SUCCEEDED" and job["result"]["reply"]
        gone = cli("teardown", job["id"], "--db", url, "--wait", "--json")
        teardown = json.loads(gone.stdout)
        assert teardown["state"] == "SUCCEEDED" and teardown["parent_id"] == job["id"]
    finally:
        assert daemon.terminate() == 0
    assert emulator.stats()["live"] == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}


def test_events_follow_streams_a_live_job_until_it_ends(tmp_path, emulator):
    import subprocess

    from tests.crash.procs import FABRICFLOW, env

    db = tmp_path / "jobs.db"
    url = f"sqlite+aiosqlite:///{db}"
    job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
    follow = subprocess.Popen([*FABRICFLOW, "events", job_id, "--follow", "--json", "--db", url],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
    daemon = Daemon(url, emulator.url, tmp_path / "d.log")
    try:
        out, _ = follow.communicate(timeout=60)
    finally:
        assert daemon.terminate() == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert follow.returncode == 0
    assert events[0]["to"] == "PENDING" and events[-1]["to"] == "SUCCEEDED"
    assert any(e["step"] == "endpoint_ready" and e["to"] == "WAITING" for e in events)
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})  # each once, in order
