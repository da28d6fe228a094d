"""The quick start runs again and again against one long-running emulator: {job} gives every
job a workspace of its own. Real processes: `fabricflow emulator`, `fabricflow run`."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from tests.conftest import EXAMPLE_QUICKSTART
from tests.crash.procs import FABRICFLOW, Emulator, env, query
from tests.integration.test_cli import _structlog_reset  # noqa: F401 - autouse fixture


@pytest.mark.timeout(180)
def test_the_quick_start_twice_against_one_emulator_gives_two_jobs_that_both_succeed(tmp_path):
    emulator = Emulator("--ready-after", "0.2", "--instance-ready-after", "0.2", log=tmp_path / "emulator.log")
    try:
        runs = [subprocess.run([*FABRICFLOW, "run", str(EXAMPLE_QUICKSTART), "--json", "--fabric-url", emulator.url,
                                "--db", f"sqlite:///{tmp_path / 'jobs.db'}"],
                               capture_output=True, text=True, env=env(), timeout=120)
                for _ in range(2)]
        stats = emulator.stats()
    finally:
        emulator.stop()

    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    jobs = [json.loads(run.stdout) for run in runs]
    assert [job["state"] for job in jobs] == ["SUCCEEDED", "SUCCEEDED"]
    first, second = (job["id"][:8] for job in jobs)
    assert first != second
    assert stats["created"]["workspace"] == {f"quickstart-{first}": 1, f"quickstart-{second}": 1}
    assert stats["live"]["workspace"] == 2
    # The stored spec is the job's own, {job} replaced: what `show` and a resumed job see.
    stored = dict(query(tmp_path / "jobs.db", "SELECT id, spec FROM jobs"))
    assert {json.loads(stored[job["id"]])["workspace"]["name"] for job in jobs} == {
        f"quickstart-{first}", f"quickstart-{second}"}


def test_submit_count_with_index_and_job_names_each_copy_after_both(tmp_path):
    data = yaml.safe_load(EXAMPLE_QUICKSTART.read_text())
    data["workspace"]["name"] = "ws{index}-{job}"
    data["name"] = "copy {index} of job {job}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    db = tmp_path / "jobs.db"

    result = CliRunner().invoke(main, ["submit", str(spec), "--count", "3", "--db", f"sqlite:///{db}"],
                                catch_exceptions=False)

    assert result.exit_code == 0, result.stderr
    ids = result.stdout.split()
    rows = dict(query(db, "SELECT id, spec FROM jobs"))
    names = {job_id: json.loads(rows[job_id])["workspace"]["name"] for job_id in ids}
    assert names == {job_id: f"ws{n}-{job_id[:8]}" for n, job_id in enumerate(ids)}
    assert sorted(query(db, "SELECT name FROM jobs")) == sorted((f"copy {n} of job {job_id[:8]}",)
                                                                for n, job_id in enumerate(ids))


def test_a_name_too_long_once_job_is_replaced_is_refused_saying_so(tmp_path):
    data = yaml.safe_load(EXAMPLE_QUICKSTART.read_text())
    data["workspace"]["name"] = "a-workspace-name-of-25ch-{job}"  # 30 as written, 33 as sent
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    db = tmp_path / "jobs.db"

    result = CliRunner().invoke(main, ["submit", str(spec), "--db", f"sqlite:///{db}"], catch_exceptions=False)

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {spec}: workspace.name: String should match pattern '^[A-Za-z0-9_-]{{4,32}}$' "
                           "('a-workspace-name-of-25ch-")
    assert line.endswith("' here, made from 'a-workspace-name-of-25ch-{job}'; {job} is the job ID's first 8 hex "
                         "digits)")
    assert not db.exists()
