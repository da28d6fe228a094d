"""The torture suite at CI size: faulty emulator, many jobs, the daemon killed -9 again and again,
on a SQLite file (one daemon) and on PostgreSQL (several daemons at once, one killed per round).

The full size runs from the command line: ``python benchmarks/torture.py --jobs 100 --kills 20``
(add ``--db postgresql+asyncpg://... --daemons 3`` for PostgreSQL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.torture.reader import to_numbered
from tests.torture.scenario import LEGITIMATE_FAILURE_CODES, check_events, run_torture

#: What a real cloud does on top of kill -9 and 5xx (issue 9): creates carried out a second after
#: their answer was lost (the daemons settle for 3 s: tests/crash/procs.py), lists 0.3 s behind
#: creates, and another user's deletes between pages of the first job's 2-page look-ups. At 10%
#: of some 40 creates, a run would see no late create about once in 30: the first create to
#: succeed is made late besides, so that every run checks one.
CLOUD = {"late_create": 0.1, "late_first": 1, "late_by": 1.0, "list_lag": 0.3, "page_churn": 0.5,
         "bystanders": 110}
CI_SIZE = {"jobs": 12, "kill_rounds": 4, "fail_rate": 0.1, "drop_rate": 0.1, "slow_rate": 0.05, "seed": 7,
           **CLOUD}
#: Several daemons sharing a PostgreSQL database; each round kills one of them.
PG_SIZE = {"jobs": 8, "kill_rounds": 3, "daemons": 3, "fail_rate": 0.1, "drop_rate": 0.1, "slow_rate": 0.05,
           "seed": 7, **CLOUD, "stop_rounds": 1, "skew_seconds": 10.0}


def run_and_show(tmp_path: Path, size: dict[str, Any], **more: Any) -> tuple[dict[str, Any], str]:
    summary = run_torture(**size, **more, workdir=tmp_path / "torture")
    shown = json.dumps(summary, indent=1)
    (tmp_path / "summary.json").write_text(shown)
    print(shown)
    return summary, shown


def assert_invariants(summary: dict[str, Any], shown: str, size: dict[str, Any]) -> None:
    # The run really tortured the engine: every kill happened, with creates in the air.
    assert summary["kills"] == size["kill_rounds"], shown
    assert summary["kills_with_creates_in_flight"] >= 1, shown
    assert summary["last_daemon_exit_code"] == 0, shown
    # 1. Every job SUCCEEDED, or FAILED with an error the injected faults make legitimate.
    assert summary["succeeded"] + summary["failed"] == size["jobs"], shown
    assert [f for f in summary["failed_reasons"] if f["code"] not in LEGITIMATE_FAILURE_CODES] == [], shown
    # 2. No job lost.
    assert summary["lost"] == 0, shown
    # 3. No name created twice (from /_emulator/stats), and every job's four names created once.
    assert summary["duplicates"] == 0 and summary["duplicate_names"] == {}, shown
    assert summary["created"] == {k: size["jobs"] for k in summary["created"]}, shown
    # 4. Every recorded resource ID exists in the emulator; nothing live is unrecorded.
    assert summary["missing_resources"] == 0, shown
    assert summary["orphans"] == 0, shown
    # 5. Every event sequence is a legal path through the state tables.
    assert summary["illegal_event_paths"] == 0, shown
    # The cloud's faults really happened: late creates landed, pages churned under look-ups.
    assert summary["cloud_faults"]["late_created"] >= 1, shown
    assert summary["cloud_faults"]["late_pending"] == 0, shown
    # Whatever else the checks found (daemon errors in the logs, wiring between steps).
    assert summary["violations"] == [], shown


@pytest.mark.timeout(180)
def test_torture_no_job_lost_nothing_created_twice(tmp_path: Path) -> None:
    summary, shown = run_and_show(tmp_path, CI_SIZE)
    assert summary["database"] == "sqlite" and summary["daemons"] == 1, shown
    assert_invariants(summary, shown, CI_SIZE)


@pytest.mark.timeout(240)
def test_torture_on_postgresql_several_daemons(tmp_path: Path, pg_url: str) -> None:
    summary, shown = run_and_show(tmp_path, PG_SIZE, db_url=pg_url)
    assert summary["database"] == "postgresql" and summary["daemons"] == PG_SIZE["daemons"], shown
    assert summary["daemon_exit_codes"] == [0] * PG_SIZE["daemons"], shown
    # The daemons really shared the work, and the kills hit daemons that held jobs, whose jobs
    # others (or their successors) took over once the leases lapsed.
    assert summary["takeovers"]["daemons_that_ran_jobs"] >= 2, shown
    assert summary["kills_of_a_daemon_running_jobs"] >= 1, shown
    assert summary["takeovers"].get("recoveries", 0) >= 1, shown
    # A daemon frozen past its lease woke up to jobs others had taken (its runners fenced off), and
    # the daemon whose clock is 10 s ahead said so and took nothing over.
    assert len(summary["stops"]) == 1, shown
    assert summary["clock_skew"]["clock_skew_lines"] >= 1 and summary["clock_skew"]["takeovers"] == 0, shown
    assert_invariants(summary, shown, PG_SIZE)


def test_several_daemons_need_postgresql(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need PostgreSQL"):
        run_torture(**{**PG_SIZE, "daemons": 2}, workdir=tmp_path / "torture")


def test_reader_numbers_placeholders_outside_literals() -> None:
    assert to_numbered("SELECT 1 WHERE a = ? AND b LIKE 'x?%' AND c = ?") == \
        "SELECT 1 WHERE a = $1 AND b LIKE 'x?%' AND c = $2"
    assert to_numbered("SELECT 'it''s?' , ?") == "SELECT 'it''s?' , $1"


# --- the event-path checker must reject what it is there to reject ----------------------------

JOB = "0" * 32
LEGAL = [
    (1, None, None, "PENDING", "submitted"),
    (2, None, "PENDING", "RUNNING", "claimed"),
    (3, "workspace", "PENDING", "IN_FLIGHT", "intent"),
    (4, None, "RUNNING", "RUNNING", "recovered by"),
    (5, "workspace", None, None, "a note"),
    (6, "workspace", "IN_FLIGHT", "SUCCEEDED", "adopted"),
    (7, None, "RUNNING", "SUCCEEDED", "done"),
]


def test_event_checker_accepts_a_legal_path() -> None:
    assert check_events(JOB, LEGAL, "SUCCEEDED", {"workspace": "SUCCEEDED", "endpoint": "PENDING"}) == []


@pytest.mark.parametrize(
    ("events", "job_state", "steps", "expected"),
    [
        pytest.param([(1, None, None, "RUNNING", "x")], "RUNNING", {}, "not None -> PENDING", id="first-job-event"),
        pytest.param([*LEGAL[:2], (3, "workspace", "PENDING", "SUCCEEDED", "x")], "RUNNING",
                     {"workspace": "SUCCEEDED"}, "not in STEP_TRANSITIONS", id="illegal-step-edge"),
        pytest.param([*LEGAL[:2], (3, None, "RUNNING", "RUNNING", "x"), (4, None, "PENDING", "RUNNING", "x")],
                     "RUNNING", {}, "but was RUNNING", id="job-edge-from-wrong-state"),
        pytest.param([LEGAL[0], (2, None, "PENDING", "SUCCEEDED", "x")], "SUCCEEDED", {},
                     "not in JOB_TRANSITIONS", id="illegal-job-edge"),
        pytest.param([LEGAL[0], (2, "workspace", "PENDING", "IN_FLIGHT", "x")], "PENDING",
                     {"workspace": "IN_FLIGHT"}, "while the job was PENDING", id="step-moves-outside-a-run"),
        pytest.param(LEGAL, "FAILED", {"workspace": "SUCCEEDED"}, "the jobs table says FAILED", id="job-table-disagrees"),
        pytest.param(LEGAL, "SUCCEEDED", {"workspace": "IN_FLIGHT"}, "the steps table says IN_FLIGHT",
                     id="step-table-disagrees"),
    ],
)
def test_event_checker_rejects(events, job_state, steps, expected) -> None:
    problems = check_events(JOB, events, job_state, steps)
    assert any(expected in p for p in problems), problems
