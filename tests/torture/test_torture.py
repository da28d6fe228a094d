"""The torture suite at CI size: faulty emulator, many jobs, the daemon killed -9 again and again.

The full size runs from the command line: ``python benchmarks/torture.py --jobs 100 --kills 20``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.torture.scenario import LEGITIMATE_FAILURE_CODES, check_events, run_torture

CI_SIZE = {"jobs": 12, "kill_rounds": 4, "fail_rate": 0.1, "drop_rate": 0.1, "slow_rate": 0.05, "seed": 7}


@pytest.mark.timeout(180)
def test_torture_no_job_lost_nothing_created_twice(tmp_path: Path) -> None:
    summary = run_torture(**CI_SIZE, workdir=tmp_path / "torture")
    shown = json.dumps(summary, indent=1)
    (tmp_path / "summary.json").write_text(shown)
    print(shown)

    # The run really tortured the engine: every kill happened, with creates in the air.
    assert summary["kills"] == CI_SIZE["kill_rounds"], shown
    assert summary["kills_with_creates_in_flight"] >= 1, shown
    assert summary["last_daemon_exit_code"] == 0, shown
    # 1. Every job SUCCEEDED, or FAILED with an error the injected faults make legitimate.
    assert summary["succeeded"] + summary["failed"] == CI_SIZE["jobs"], shown
    assert [f for f in summary["failed_reasons"] if f["code"] not in LEGITIMATE_FAILURE_CODES] == [], shown
    # 2. No job lost.
    assert summary["lost"] == 0, shown
    # 3. No name created twice (from /_emulator/stats), and every job's four names created once.
    assert summary["duplicates"] == 0 and summary["duplicate_names"] == {}, shown
    assert summary["created"] == {k: CI_SIZE["jobs"] for k in summary["created"]}, shown
    # 4. Every recorded resource ID exists in the emulator; nothing live is unrecorded.
    assert summary["missing_resources"] == 0, shown
    assert summary["orphans"] == 0, shown
    # 5. Every event sequence is a legal path through the state tables.
    assert summary["illegal_event_paths"] == 0, shown
    # Whatever else the checks found (daemon errors in the logs, wiring between steps).
    assert summary["violations"] == [], shown


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
