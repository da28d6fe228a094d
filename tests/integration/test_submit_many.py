"""``fabricflow submit`` of several specs and of ``--count`` copies, run as a real process.

Every check reads the database directly, as a user with sqlite3 would; nothing depends on speed
(the only wait is for a daemon, against a generous deadline).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.spec import parse_copies, parse_spec, with_index
from tests.conftest import QUICKSTART

FABRICFLOW = [sys.executable, "-m", "orchestrator"]
QUICK = {  # the embedded emulator and the polling, quick
    "FABRICFLOW_EMULATOR__READY_AFTER": "0.2",
    "FABRICFLOW_EMULATOR__INSTANCE_READY_AFTER": "0.2",
    "FABRICFLOW_POLL__INITIAL": "0.05",
    "FABRICFLOW_POLL__MAX": "0.2",
    "FABRICFLOW_DAEMON__CLAIM_INTERVAL": "0.1",
}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where the commands' job database goes (not created by the fixture)."""
    return tmp_path / "jobs.db"


def fabricflow(db: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one fabricflow command on ``db`` (the autouse fixture has already isolated the env)."""
    return subprocess.run([*FABRICFLOW, *args, "--db", f"sqlite:///{db}"], check=False, capture_output=True,
                          text=True, env={**os.environ, **QUICK}, timeout=timeout)


def templated(tmp_path: Path, file: str, prefix: str, **changes: Any) -> Path:
    """The quickstart spec with ``{index}`` in its name and every resource name, as a file."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["name"] = f"{prefix}-job-{{index}}"
    for key in ("workspace", "endpoint", "model", "service_instance"):
        data[key]["name"] = f"{prefix}-{key[:2]}-{{index}}"
    data.update(changes)
    path = tmp_path / file
    path.write_text(yaml.safe_dump(data))
    return path


def stored(db: Path) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """``{job id: (name, state, spec)}`` for every job in the database."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, name, state, spec FROM jobs").fetchall()
    return {job_id: (name, state, json.loads(spec)) for job_id, name, state, spec in rows}


def test_several_files_print_ids_in_order_and_number_across_files(tmp_path, db):
    a = templated(tmp_path, "a.yaml", "a")
    b = templated(tmp_path, "b.yaml", "b")

    result = fabricflow(db, "submit", str(a), str(b), str(a))

    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    jobs = stored(db)
    assert len(ids) == 3 and set(ids) == set(jobs)
    assert [jobs[i][0] for i in ids] == ["a-job-0", "b-job-1", "a-job-2"]
    assert [jobs[i][2]["workspace"]["name"] for i in ids] == ["a-wo-0", "b-wo-1", "a-wo-2"]
    assert {jobs[i][1] for i in ids} == {"PENDING"}


def test_count_templates_every_string_of_every_copy(tmp_path, db):
    spec = templated(tmp_path, "spec.yaml", "x", invocation={"messages": [{"role": "user", "content": "hi {index}"}]})

    result = fabricflow(db, "submit", str(spec), "--count", "5")

    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    jobs = stored(db)
    assert len(ids) == len(jobs) == 5
    assert [jobs[i][0] for i in ids] == [f"x-job-{n}" for n in range(5)]
    for n, job_id in enumerate(ids):
        spec_data = jobs[job_id][2]
        assert [spec_data[k]["name"] for k in ("workspace", "endpoint", "model", "service_instance")] == [
            f"x-wo-{n}", f"x-en-{n}", f"x-mo-{n}", f"x-se-{n}"]
        assert spec_data["invocation"]["messages"][0]["content"] == f"hi {n}"
        assert spec_data["endpoint"]["reserved_resource"] == {"mu": {"spec_code": "mu.llama3.8b", "min": 0, "max": 1}}


def test_count_without_index_in_resource_names_is_refused(tmp_path, db):
    spec = tmp_path / "named.yaml"  # {index} in the job's name only: the resources would collide
    spec.write_text(QUICKSTART.read_text().replace("name: llama3-quickstart", 'name: "job-{index}"'))

    result = fabricflow(db, "submit", str(spec), "--count", "3")

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "collide" in result.stderr and 'name: "ws-{index}"' in result.stderr
    assert "workspace.name, endpoint.name, model.name, service_instance.name" in result.stderr
    assert not db.exists()


def test_a_bad_second_file_writes_nothing(tmp_path, db):
    good = templated(tmp_path, "good.yaml", "g")
    short = templated(tmp_path, "short.yaml", "s", workspace={"name": "w{index}"})  # "w1": under 4 characters

    result = fabricflow(db, "submit", str(good), str(short))

    assert result.returncode == 2
    assert "short.yaml: workspace.name: String should match pattern" in result.stderr
    assert not db.exists()


def test_errors_name_the_copy_and_every_bad_file(tmp_path, db):
    good = templated(tmp_path, "good.yaml", "g")
    long = templated(tmp_path, "long.yaml", "l", workspace={"name": "w" * 31 + "{index}"})  # 32 chars up to 9

    result = fabricflow(db, "submit", str(good), str(long), str(tmp_path / "missing.yaml"), "--count", "6")

    assert result.returncode == 2
    assert "long.yaml (index 10): workspace.name" in result.stderr  # copies 6 to 9 were fine
    assert "missing.yaml: no such file" in result.stderr
    assert "good.yaml" not in result.stderr
    assert not db.exists()


@pytest.mark.parametrize(("count", "message"), [("0", "0 is not in the range x>=1"),
                                                ("100001", "more than one submit takes (100000)")])
def test_count_bounds(tmp_path, db, count, message):
    result = fabricflow(db, "submit", str(templated(tmp_path, "spec.yaml", "c")), "--count", count)
    assert result.returncode == 2
    assert message in result.stderr
    assert not db.exists()


def test_json_is_an_array_for_several_jobs_and_an_object_for_one(tmp_path, db):
    spec = templated(tmp_path, "spec.yaml", "j")

    several = fabricflow(db, "submit", str(spec), "--count", "3", "--json")
    one = fabricflow(db, "submit", str(QUICKSTART), "--json")

    assert several.returncode == 0 and one.returncode == 0, several.stderr + one.stderr
    jobs = json.loads(several.stdout)
    assert [job["name"] for job in jobs] == ["j-job-0", "j-job-1", "j-job-2"]
    assert {job["state"] for job in jobs} == {"PENDING"} and all(len(job["steps"]) == 7 for job in jobs)
    single = json.loads(one.stdout)
    assert isinstance(single, dict) and single["name"] == "llama3-quickstart"
    assert set(stored(db)) == {job["id"] for job in jobs} | {single["id"]}


def test_wait_for_several_prints_a_line_as_each_ends_and_exits_1_if_any_failed(tmp_path, db):
    ok = templated(tmp_path, "ok.yaml", "ok")
    gone = templated(tmp_path, "gone.yaml", "gone", workspace={"id": "no-such-workspace"})
    daemon = subprocess.Popen([*FABRICFLOW, "daemon", "--db", f"sqlite:///{db}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, **QUICK})
    try:
        result = fabricflow(db, "submit", str(ok), str(gone), "--count", "2", "--wait")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)

    assert result.returncode == 1, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 4
    ended = result.stderr.splitlines()  # one line per job as it ends, no event log
    assert len(ended) == 4
    assert f"job {ids[0][:8]} (ok-job-0) SUCCEEDED" in ended and f"job {ids[1][:8]} (ok-job-1) SUCCEEDED" in ended
    for n in (2, 3):
        (line,) = [line for line in ended if line.startswith(f"job {ids[n][:8]} (gone-job-{n}) FAILED: ")]
        assert "no-such-workspace" in line
    assert {state for _, state, _ in stored(db).values()} == {"SUCCEEDED", "FAILED"}


def test_help_shows_count_with_index():
    result = subprocess.run([*FABRICFLOW, "submit", "--help"], check=False, capture_output=True, text=True)
    assert result.returncode == 0
    assert "fabricflow submit spec.yaml --count 100" in result.stdout
    assert 'name: "ws-{index}"' in result.stdout and "fabricflow submit a.yaml b.yaml" in result.stdout


# --- the templating helpers themselves --------------------------------------------------------


def test_with_index_replaces_in_string_values_only_and_changes_nothing_in_place():
    data = {"name": "a-{index}-{index}", "{index}": ["x{index}", 3, None, True], "n": {"deep": "{index}"}}
    before = json.dumps(data)

    assert with_index(data, 12) == {"name": "a-12-12", "{index}": ["x12", 3, None, True], "n": {"deep": "12"}}
    assert json.dumps(data) == before


def test_parse_copies_equals_validating_each_copy(spec_data):
    spec_data["name"] = "job-{index}"
    spec_data["workspace"]["name"] = "ws-{index}"
    spec_data["timeouts"] = {"endpoint_ready": "{index}m"}  # a templated value in a nested model

    copies = parse_copies(spec_data, range(1, 30), "spec.yaml")

    assert copies == [parse_spec(with_index(spec_data, i)) for i in range(1, 30)]
    assert copies[4].timeouts.endpoint_ready == 300.0
    assert copies[0].invocation is copies[1].invocation  # untemplated parts are validated once
