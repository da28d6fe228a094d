"""What a new user sees from the command line (in-process, click's runner): exact messages,
exit codes, and no file written where none should be."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import cli as cli_module
from orchestrator.cli import main
from tests.conftest import QUICKSTART
from tests.integration.test_cli import _structlog_reset, job_rows  # noqa: F401 - autouse fixture


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, like a new user's."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("FABRICFLOW_EMULATOR__READY_AFTER", "0.2")
    monkeypatch.setenv("FABRICFLOW_EMULATOR__INSTANCE_READY_AFTER", "0.2")
    monkeypatch.setenv("FABRICFLOW_POLL__INITIAL", "0.05")
    monkeypatch.setenv("FABRICFLOW_POLL__MAX", "0.2")
    return work


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --- read commands never create a database --------------------------------------------------


@pytest.mark.parametrize("args", [
    ["list"], ["list", "--json"], ["list", "--state", "failed"], ["show", "3f9c"], ["show", "3f9c", "--json"],
    ["events", "3f9c"], ["events", "3f9c", "--follow"], ["cancel", "3f9c"], ["retry", "3f9c"],
    ["teardown", "3f9c"], ["invoke", "3f9c", "hi", "--fabric-url", "http://127.0.0.1:9"],
])
def test_commands_on_a_missing_database_say_so_and_write_nothing(fresh, args):
    result = invoke(*args, "--db", "sqlite:///typo/x.db")
    assert result.exit_code == 3
    assert result.stderr == "error: no database at typo/x.db\n"
    assert result.stdout == ""
    assert files_under(fresh) == []  # no typo/ directory, no file


def test_the_default_database_is_not_created_by_reading(fresh, tmp_path):
    result = invoke("list")
    default = tmp_path / "xdg" / "fabricflow" / "fabricflow.db"  # XDG_DATA_HOME is tmp_path/xdg
    assert result.exit_code == 3
    assert result.stderr == f"error: no database at {default}\n"
    assert not (tmp_path / "xdg").exists()


def test_an_empty_file_is_not_turned_into_a_database_by_reading(fresh):
    Path("empty.db").touch()
    result = invoke("list", "--db", "sqlite:///empty.db")
    assert result.exit_code == 3
    assert result.stderr == "error: no database at empty.db (the file is empty)\n"
    assert files_under(fresh) == ["empty.db"] and Path("empty.db").stat().st_size == 0


def test_submit_creates_the_database_and_its_directory(fresh):
    result = invoke("submit", str(QUICKSTART), "--db", "sqlite:///new/dir/jobs.db")
    assert result.exit_code == 0, result.stderr
    assert job_rows(fresh / "new" / "dir" / "jobs.db") == 1


def test_list_says_when_filters_match_nothing_and_when_there_is_nothing(fresh):
    db = "sqlite:///jobs.db"
    assert invoke("submit", str(QUICKSTART), "--db", db).exit_code == 0
    nomatch = invoke("list", "--name", "nomatch", "--db", db)
    assert nomatch.exit_code == 0
    assert nomatch.stdout == "no job matches --name 'nomatch'\n"
    assert invoke("list", "--state", "failed", "--name", "quick", "--db", db).stdout == \
        "no job matches --state FAILED --name 'quick'\n"
    assert "llama3-quickstart" in invoke("list", "--name", "QUICK", "--db", db).stdout  # as SQLite's LIKE


# --- bad input -------------------------------------------------------------------------------


def test_a_spec_over_1_mb_is_refused_before_it_is_parsed(fresh):
    big = fresh / "big.yaml"
    big.write_text(QUICKSTART.read_text() + "#" * (1024 * 1024) + "\n")
    size = big.stat().st_size
    for command in ("run", "submit"):
        result = invoke(command, str(big), "--db", "sqlite:///jobs.db")
        assert result.exit_code == 2
        assert result.stderr == (f"error: {big}: too large for a job spec: {size:,} bytes, more than the "
                                 "limit of 1 MB (1,048,576 bytes)\n")
    assert files_under(fresh) == ["big.yaml"]


def test_reserved_resource_min_above_max_is_rejected(fresh):
    spec = fresh / "minmax.yaml"
    spec.write_text(QUICKSTART.read_text().replace("min: 0, max: 1", "min: 5, max: 1"))
    result = invoke("submit", str(spec), "--db", "sqlite:///jobs.db")
    assert result.exit_code == 2
    assert result.stderr == f"error: {spec}: endpoint.reserved_resource.mu: min (5) is greater than max (1)\n"
    assert files_under(fresh) == ["minmax.yaml"]


@pytest.mark.parametrize("command", ["show", "events", "cancel", "retry", "teardown"])
def test_a_job_id_prefix_longer_than_an_id_is_not_a_job_id(fresh, command):
    assert invoke("submit", str(QUICKSTART), "--db", "sqlite:///jobs.db").exit_code == 0
    result = invoke(command, "a" * 100_000, "--db", "sqlite:///jobs.db")
    assert result.exit_code == 2
    assert result.stderr == ("error: not a job ID: 'aaaaaaaaaaaa'... is 100,000 characters long; a job ID has "
                             "32 hexadecimal digits (any unique prefix of one will do)\n")


def test_config_show_takes_json(fresh):
    plain, as_json = invoke("config", "show"), invoke("config", "show", "--json")
    assert plain.exit_code == as_json.exit_code == 0
    assert json.loads(as_json.stdout) == json.loads(plain.stdout)
    assert json.loads(as_json.stdout)["fabric_url"] == "embedded"


# --- run and show -----------------------------------------------------------------------------


def test_show_gives_the_endpoint_its_latest_status(fresh):
    db = "sqlite:///jobs.db"
    job = json.loads(invoke("run", str(QUICKSTART), "--json", "--db", db).stdout)
    steps = {s["name"]: s for s in job["steps"]}
    assert steps["endpoint"]["resource_status"] == "CREATING"  # recorded by the create, and kept
    table = invoke("show", job["id"], "--db", db).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()[:1] and
            line.split()[0] in steps}
    assert rows["endpoint"][3] == "RUNNING" and rows["endpoint_ready"][3] == "RUNNING"
    assert rows["service_instance"][3] == "RUNNING"


def test_run_says_what_it_waits_for_while_it_waits(fresh, monkeypatch):
    monkeypatch.setattr(cli_module, "TICK_SECONDS", 0.05)
    monkeypatch.setenv("FABRICFLOW_EMULATOR__READY_AFTER", "1.5")  # the wait outlasts many ticks
    result = invoke("run", str(QUICKSTART), "--db", "sqlite:///jobs.db")
    assert result.exit_code == 0, result.stderr
    ticks = re.findall(r"^\[ *[\d.]+s\] endpoint_ready +WAITING +(\d+)s, status CREATING$", result.stderr, re.MULTILINE)
    assert ticks, result.stderr
    assert [int(t) for t in ticks] == sorted(int(t) for t in ticks)  # elapsed time only grows


def test_a_failed_steps_error_without_a_code_shows_no_brackets(fresh, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on: every request is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("FABRICFLOW_RETRY__MAX_ATTEMPTS", "1")
    ran = invoke("run", str(QUICKSTART), "--json", "--db", "sqlite:///jobs.db",
                 "--fabric-url", f"http://127.0.0.1:{port}")
    assert ran.exit_code == 1
    job = json.loads(ran.stdout)
    assert job["error"]["code"] is None and job["error"]["message"].startswith("gave up after 1 attempts: ")
    shown = invoke("show", job["id"], "--db", "sqlite:///jobs.db").stdout
    assert f"error    {job['error']['message']}\n" in shown
    assert f"{'':<17} ! {job['error']['message']}\n" in shown
    assert "[None]" not in shown
