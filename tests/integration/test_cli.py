"""The command line, in-process with click's runner: outputs, exit codes, nothing written on bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from orchestrator.cli import main
from tests.conftest import QUICKSTART


@pytest.fixture(autouse=True)
def _structlog_reset():
    """The CLI configures structlog for the process, bound to this test's stderr: undo it, so
    later tests in the session log as unconfigured structlog does (test_clock.py relies on it)."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "cli.db"
    # The embedded emulator, quick: the default configuration, with shorter delays.
    monkeypatch.setenv("FABRICFLOW_EMULATOR__READY_AFTER", "0.2")
    monkeypatch.setenv("FABRICFLOW_EMULATOR__INSTANCE_READY_AFTER", "0.2")
    monkeypatch.setenv("FABRICFLOW_POLL__INITIAL", "0.05")
    monkeypatch.setenv("FABRICFLOW_POLL__MAX", "0.2")

    def invoke(*args: str):
        return CliRunner().invoke(main, [*args, "--db", f"sqlite+aiosqlite:///{db}"], catch_exceptions=False)

    invoke.db = db  # type: ignore[attr-defined]
    return invoke


def job_rows(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_run_quickstart_json(cli):
    result = cli("run", str(QUICKSTART), "--json")

    assert result.exit_code == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "SUCCEEDED"
    assert [s["name"] for s in job["steps"]] == [
        "workspace", "endpoint", "endpoint_ready", "model", "service_instance", "service_ready", "invocation"]
    assert {s["state"] for s in job["steps"]} == {"SUCCEEDED"}
    assert all(job["result"][k] for k in ("workspace_id", "endpoint_id", "model_id", "model_version_id",
                                          "service_instance_id", "reply"))
    assert "embedded Fabric emulator" in result.stderr
    assert "reply: Hello from the fabricflow emulator" in result.stderr
    assert "endpoint_ready    WAITING" in result.stderr


def test_show_list_events_after_run(cli):
    job_id = json.loads(cli("run", str(QUICKSTART), "--json").stdout)["id"]

    shown = cli("show", job_id[:6], "--json")
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["id"] == job_id
    table = cli("show", job_id)
    assert "endpoint_ready    SUCCEEDED" in table.stdout
    assert "reply" in table.stdout

    listed = json.loads(cli("list", "--json").stdout)
    assert listed == [{k: listed[0][k] for k in ("id", "name", "state", "created_at", "updated_at")}]
    assert listed[0]["id"] == job_id and listed[0]["state"] == "SUCCEEDED"
    assert json.loads(cli("list", "--json", "--state", "failed").stdout) == []

    events = json.loads(cli("events", job_id, "--json").stdout)
    assert events[0]["to"] == "PENDING" and events[-1]["to"] == "SUCCEEDED"
    assert "workspace" in cli("events", job_id).stdout


def test_submit_prints_id_and_queues(cli):
    result = cli("submit", str(QUICKSTART))
    assert result.exit_code == 0
    job_id = result.stdout.strip()
    assert len(job_id) == 32
    shown = json.loads(cli("show", job_id, "--json").stdout)
    assert shown["state"] == "PENDING"
    assert {s["state"] for s in shown["steps"]} == {"PENDING"}


def test_bad_spec_exit_2_and_nothing_written(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("name: apieworkspace", "name: ws!").replace(
        "type: inference", "type: inference\n  colour: blue"))
    result = cli("run", str(bad))
    assert result.exit_code == 2
    assert "workspace.name: String should match pattern" in result.stderr
    assert "endpoint.colour: Extra inputs are not permitted" in result.stderr
    assert job_rows(cli.db) == 0

    assert cli("submit", str(tmp_path / "missing.yaml")).exit_code == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    result = cli("submit", str(broken))
    assert result.exit_code == 2 and "not valid YAML" in result.stderr
    assert job_rows(cli.db) == 0


def test_unknown_and_ambiguous_job_ids(cli):
    ids = [cli("submit", str(QUICKSTART)).stdout.strip() for _ in range(20)]
    result = cli("show", "abc123")
    assert result.exit_code == 3
    assert "no job 'abc123'" in result.stderr
    common = next(p for p in "0123456789abcdef" if sum(i.startswith(p) for i in ids) >= 2)
    result = cli("show", common)
    assert result.exit_code == 2
    assert "ambiguous" in result.stderr


def test_failed_job_exits_1_with_fabric_error(cli, monkeypatch, tmp_path):
    spec = tmp_path / "timeout.yaml"
    spec.write_text(QUICKSTART.read_text().replace("endpoint_ready: 30m", "endpoint_ready: 0.1s"))
    monkeypatch.setenv("FABRICFLOW_EMULATOR__READY_AFTER", "30")
    result = cli("run", str(spec), "--json")
    assert result.exit_code == 1
    job = json.loads(result.stdout)
    assert job["state"] == "FAILED"
    assert job["error"]["code"] == "fabricflow.timeout"
    assert "last status CREATING" in job["error"]["message"]


def test_config_show_masks_secrets(cli, monkeypatch):
    monkeypatch.setenv("HUAWEICLOUD_SDK_AK", "AKSECRETVALUE123")
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", "SKSECRETVALUE456")
    monkeypatch.setenv("FABRICFLOW_AUTH_TOKEN", "TOKENSECRET789")
    result = cli("config", "show")
    assert result.exit_code == 0
    assert "SECRETVALUE" not in result.stdout and "TOKENSECRET" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["ak"] == shown["sk"] == shown["auth_token"] == "********"


def test_unknown_config_key_is_exit_2(cli, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[daemon]\nconcurrencyy = 3\n")
    result = cli("list", "--config", str(cfg))
    assert result.exit_code == 2
    assert "daemon.concurrencyy" in result.stderr


def test_global_options_before_the_command(tmp_path):
    db = tmp_path / "g.db"
    submitted = CliRunner().invoke(main, ["--db", f"sqlite+aiosqlite:///{db}", "submit", str(QUICKSTART)])
    assert submitted.exit_code == 0, submitted.output
    result = CliRunner().invoke(main, ["--db", f"sqlite+aiosqlite:///{db}", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert [job["id"] for job in json.loads(result.stdout)] == [submitted.stdout.strip()]


def test_help_teaches(cli):
    top = CliRunner().invoke(main, ["--help"])
    assert "fabricflow example quickstart > quickstart.yaml" in top.stdout
    assert "fabricflow run quickstart.yaml" in top.stdout
    for command in ("run", "submit", "plan", "daemon", "list", "show", "events", "status", "orphans",
                    "emulator"):
        assert command in top.stdout
    assert "--fabric-url" in CliRunner().invoke(main, ["run", "--help"]).stdout


def test_cancel_and_retry_commands(cli):
    job_id = cli("submit", str(QUICKSTART)).stdout.strip()
    result = cli("cancel", job_id[:8])
    assert result.exit_code == 0 and "CANCELLED" in result.stderr
    assert json.loads(cli("show", job_id, "--json").stdout)["state"] == "CANCELLED"
    again = cli("cancel", job_id)
    assert again.exit_code == 2 and "already ended CANCELLED" in again.stderr

    retried = cli("retry", job_id)
    assert retried.exit_code == 0 and "PENDING again" in retried.stderr
    assert json.loads(cli("show", job_id, "--json").stdout)["state"] == "PENDING"
    refused = cli("retry", job_id)
    assert refused.exit_code == 2 and "only FAILED or CANCELLED jobs can be retried" in refused.stderr
    teardown = cli("teardown", job_id)
    assert teardown.exit_code == 2 and "cancel it first" in teardown.stderr


def test_events_follow_ends_with_the_job(cli):
    job_id = json.loads(cli("run", str(QUICKSTART), "--json").stdout)["id"]
    followed = cli("events", job_id, "--follow", "--json")
    assert followed.exit_code == 0
    lines = [json.loads(line) for line in followed.stdout.splitlines()]
    assert lines[0]["to"] == "PENDING" and lines[-1]["to"] == "SUCCEEDED"


@pytest.mark.parametrize("url", ["postgresql://u:pw@127.0.0.1:notaport/db", "sqlite+pysqlite:///x.db",
                                 "postgresql+psycopg2://u@127.0.0.1/x", "not a url"])
def test_bad_database_urls_are_one_line_exit_2(url):
    result = CliRunner().invoke(main, ["list", "--db", url])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --db")
    assert "Traceback" not in result.output and "pw" not in result.stderr


def test_create_timeout_must_stay_below_the_lease(cli, monkeypatch):
    monkeypatch.setenv("FABRICFLOW_HTTP__CREATE_TIMEOUT", "40")
    result = cli("list")
    assert result.exit_code == 2
    assert "must be shorter than daemon.lease_seconds" in result.stderr


def test_submit_json_and_list_name_filter(cli):
    submitted = cli("submit", str(QUICKSTART), "--json")
    assert submitted.exit_code == 0
    job = json.loads(submitted.stdout)
    assert job["state"] == "PENDING" and len(job["steps"]) == 7
    assert [j["id"] for j in json.loads(cli("list", "--json", "--name", "quick").stdout)] == [job["id"]]
    assert json.loads(cli("list", "--json", "--name", "nothing-like-it").stdout) == []
