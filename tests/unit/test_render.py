"""What people read: the latest status of a resource, error lines, list's empty answers, run's ticks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from orchestrator.domain import Job, Step
from orchestrator.machine import STEP_ORDER, TEARDOWN_STEPS, JobKind, JobState, StepName, StepState
from orchestrator.render import format_job, format_jobs, latest_status, waiting_lines

NOW = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def job(kind: JobKind = JobKind.CREATE, error: dict | None = None, **steps: Step) -> Job:
    names = STEP_ORDER if kind is JobKind.CREATE else tuple(row.name for row in TEARDOWN_STEPS)
    table = {name: steps.get(str(name), Step(name, StepState.PENDING)) for name in names}
    return Job(id="3f9c2a1e7b6d4c1a9e2f0a1b2c3d4e5f", name="j", state=JobState.RUNNING, spec={}, steps=table,
               created_at=NOW, updated_at=NOW, kind=kind, error=error)


def step(name: str, state: StepState, status: str | None = None, started: float | None = None, **kw) -> Step:
    started_at = NOW - timedelta(seconds=started) if started is not None else None
    return Step(StepName(name), state, resource_id="r1", resource_status=status, started_at=started_at, **kw)


def test_the_endpoint_shows_the_status_its_ready_step_saw_last():
    done = job(endpoint=step("endpoint", StepState.SUCCEEDED, "CREATING"),
               endpoint_ready=step("endpoint_ready", StepState.SUCCEEDED, "RUNNING"))
    assert latest_status(done, StepName.ENDPOINT) == "RUNNING"
    assert latest_status(done, StepName.ENDPOINT_READY) == "RUNNING"


def test_while_unchanged_polls_record_nothing_the_wait_shows_the_creates_status():
    waiting = job(endpoint=step("endpoint", StepState.SUCCEEDED, "CREATING"),
                  endpoint_ready=step("endpoint_ready", StepState.WAITING, None))
    assert latest_status(waiting, StepName.ENDPOINT_READY) == "CREATING"
    assert latest_status(waiting, StepName.ENDPOINT) == "CREATING"


def test_steps_not_started_and_other_resources_keep_their_own_status():
    partial = job(endpoint=step("endpoint", StepState.SUCCEEDED, "CREATING"),
                  invocation=step("invocation", StepState.SUCCEEDED, "stop"))
    assert latest_status(partial, StepName.ENDPOINT_READY) is None  # PENDING
    assert latest_status(partial, StepName.SERVICE_INSTANCE) is None
    assert latest_status(partial, StepName.INVOCATION) == "stop"
    teardown = job(JobKind.TEARDOWN, endpoint=step("endpoint", StepState.WAITING, "DELETING"))
    assert latest_status(teardown, StepName.ENDPOINT) == "DELETING"


def test_show_leaves_out_a_missing_error_code():
    failed = job(error={"code": None, "message": "gave up after 8 attempts: cannot connect"},
                 workspace=step("workspace", StepState.FAILED,
                                error={"code": None, "message": "gave up after 8 attempts: cannot connect"}))
    text = format_job(failed)
    assert "error    gave up after 8 attempts: cannot connect\n" in text
    assert f"{'':<17} ! gave up after 8 attempts: cannot connect" in text
    assert "None" not in text
    coded = format_job(job(error={"code": "FABRIC.0400", "message": "bad"}))
    assert "error    [FABRIC.0400] bad" in coded


def test_list_tells_an_empty_database_from_filters_that_match_nothing():
    assert format_jobs([]).startswith("no jobs yet: ")
    assert format_jobs([], name="nomatch") == "no job matches --name 'nomatch'"
    assert format_jobs([], state="failed") == "no job matches --state FAILED"
    assert format_jobs([], state="failed", name="x") == "no job matches --state FAILED --name 'x'"


def test_waiting_lines_give_each_steps_elapsed_time_and_latest_status():
    waiting = job(endpoint=step("endpoint", StepState.SUCCEEDED, "CREATING", started=20),
                  endpoint_ready=step("endpoint_ready", StepState.WAITING, None, started=12))
    assert waiting_lines(waiting, NOW) == ["endpoint_ready    WAITING    12s, status CREATING"]
    longer = job(model=step("model", StepState.IN_FLIGHT, None, started=3725))
    assert waiting_lines(longer, NOW) == ["model             IN_FLIGHT  1h02m"]
    minutes = job(service_ready=step("service_ready", StepState.WAITING, "CREATING", started=185))
    assert waiting_lines(minutes, NOW) == ["service_ready     WAITING    3m05s, status CREATING"]
    assert waiting_lines(job(), NOW) == []  # nothing in progress: nothing to say


def test_status_says_what_an_invocation_in_flight_streams_from():
    from orchestrator.cli_ops import waiting_for
    from orchestrator.store.overview import current_of

    streaming = job(service_instance=step("service_instance", StepState.SUCCEEDED, "RUNNING"),
                    invocation=step("invocation", StepState.IN_FLIGHT, started=3))
    for name in ("workspace", "endpoint", "endpoint_ready", "model", "service_ready"):
        streaming.steps[StepName(name)] = step(name, StepState.SUCCEEDED)
    assert waiting_for(streaming, current_of(streaming, {}), NOW) == (
        "invocation IN_FLIGHT, streaming from service_instance r1 for 3s")


def test_show_says_how_long_a_running_job_s_step_has_taken_so_far():
    waiting = job(endpoint=step("endpoint", StepState.SUCCEEDED, "CREATING", started=60,
                                finished_at=NOW - timedelta(seconds=59)),
                  endpoint_ready=step("endpoint_ready", StepState.WAITING, started=59))
    rows = {line.split()[0]: line for line in format_job(waiting, now=NOW).splitlines()[6:]}
    assert rows["endpoint"].endswith("  1.0s") and rows["endpoint_ready"].endswith("  59.0s…")
    assert rows["model"].endswith("   -")
    assert format_job(waiting).splitlines()[8].endswith("      …")  # no clock: still going



def test_show_gives_a_step_an_ended_job_left_unfinished_its_last_state_and_no_running_timer():
    # Cancelled 30 s ago while its endpoint_ready step waited: that step is in progress no more.
    waiting = job(endpoint=step("endpoint", StepState.SUCCEEDED, "CREATING", started=60,
                                finished_at=NOW - timedelta(seconds=59)),
                  endpoint_ready=step("endpoint_ready", StepState.WAITING, started=59))
    fields = {f: getattr(waiting, f) for f in waiting.__slots__}
    cancelled = Job(**{**fields, "state": JobState.CANCELLED, "finished_at": NOW - timedelta(seconds=30)})
    for text in (format_job(cancelled, now=NOW), format_job(cancelled)):
        assert "…" not in text
        rows = {line.split()[0]: line for line in text.splitlines()[6:]}
        assert rows["endpoint_ready"] == f"{'endpoint_ready':<17} {'WAITING':<10} {'r1':<36} {'CREATING':<14} " \
                                         f"{0:>7} {'29.0s':>7}"  # 59 s ago until the cancel 30 s ago
        assert rows["endpoint"].endswith("  1.0s") and rows["model"].endswith("   -")
    # No end recorded (a job of an older version): the job's last update stands for it.
    undated = Job(**{**fields, "state": JobState.FAILED, "updated_at": NOW - timedelta(seconds=9)})
    assert format_job(undated, now=NOW).splitlines()[8].endswith(f"{'50.0s':>7}")


def test_status_says_a_create_in_its_settle_window_is_looking_not_creating():
    from dataclasses import replace

    from orchestrator.cli_ops import waiting_for
    from orchestrator.store.overview import SETTLE_LOOK, current_of

    settling = job(workspace=step("workspace", StepState.IN_FLIGHT, started=21, request_name="quickstart-a05d489a"))
    current = current_of(settling, {})
    assert waiting_for(settling, current, NOW) == "workspace IN_FLIGHT, creating workspace 'quickstart-a05d489a' for 21s"
    assert waiting_for(settling, replace(current, settle_look=3), NOW) == (
        "workspace IN_FLIGHT, looking for workspace 'quickstart-a05d489a' (settle window, look 3) for 21s")
    # The engine's notes (engine/procedure.py, _settling): a look with more to come, and the last.
    looking = ("look 3: no workspace named 'quickstart-a05d489a' carries this job's marker yet; a create sent by "
               "the last attempt may still be carried out, so none is sent for 98s more (settle window 120s); "
               "looking again in 20.0s")
    over = ("look 9: no workspace named 'quickstart-a05d489a' carries this job's marker; the settle window (120s) "
            "is over, so it is created")
    assert SETTLE_LOOK.match(looking).group(1) == "3"
    assert SETTLE_LOOK.match(over) is None
