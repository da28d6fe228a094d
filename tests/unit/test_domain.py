"""Ownership markers and the --json contract of jobs and steps (DESIGN.md, "Contracts")."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from orchestrator.domain import Event, Job, Step, carries_marker, ownership_marker, with_marker
from orchestrator.machine import STEP_ORDER, JobState, StepName, StepState

JOB_ID = "3f9c2a1e7b6d4c1a9e2f0a1b2c3d4e5f"
OTHER_ID = "aa11bb2200004000800000000000000a"
CREATED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
UPDATED = datetime(2025, 1, 2, 3, 9, 0, tzinfo=UTC)

JOB_KEYS = {"id", "name", "state", "error", "steps", "result"}
JOB_OPTIONAL_KEYS = {"created_at", "updated_at", "kind", "parent_id"}
STEP_KEYS = {"name", "state", "resource_id", "resource_status", "attempts", "error"}
RESULT_KEYS = {
    "workspace_id",
    "endpoint_id",
    "model_id",
    "model_version_id",
    "service_instance_id",
    "reply",
    "finish_reason",
    "usage",
}


# --- ownership marker -----------------------------------------------------------------------


def test_ownership_marker_shape():
    assert ownership_marker(JOB_ID) == "[fabricflow:3f9c2a1e7b6d4c1a]"
    assert re.fullmatch(r"\[fabricflow:[0-9a-f]{16}\]", ownership_marker(JOB_ID))  # 64 bits


def test_ownership_marker_short_id():
    assert ownership_marker("abc") == "[fabricflow:abc]"


def test_a_marker_is_matched_as_a_whole_token_not_a_substring():
    assert carries_marker(with_marker("ws", JOB_ID), JOB_ID)
    assert not carries_marker(with_marker("ws", OTHER_ID), JOB_ID)
    # Another job whose ID shares the first 16 digits but the token is longer: not this job's.
    assert not carries_marker("ws [fabricflow:3f9c2a1e7b6d4c1aff]", JOB_ID)
    assert not carries_marker("ws fabricflow:3f9c2a1e7b6d4c1a", JOB_ID)  # no brackets, no token
    assert not carries_marker(None, JOB_ID)


def test_markers_of_fabricflow_0_1_still_count_for_their_jobs():
    assert carries_marker("ws [fabricflow:3f9c2a1e]", JOB_ID)  # 32 bits, as 0.1 wrote them
    assert not carries_marker("ws [fabricflow:3f9c2a1e]", OTHER_ID)


def test_markers_of_different_jobs_differ():
    assert ownership_marker(JOB_ID) != ownership_marker(OTHER_ID)


def test_with_marker_appends_once():
    described = with_marker("apie test workspace", JOB_ID)
    assert described == "apie test workspace [fabricflow:3f9c2a1e7b6d4c1a]"
    assert described.count("[fabricflow:") == 1


def test_with_marker_is_idempotent():
    once = with_marker("desc", JOB_ID)
    assert with_marker(once, JOB_ID) == once
    assert with_marker(with_marker(once, JOB_ID), JOB_ID) == once


@pytest.mark.parametrize("description", ["", "   "])
def test_with_marker_empty_description(description):
    assert with_marker(description, JOB_ID) == "[fabricflow:3f9c2a1e7b6d4c1a]"


def test_with_marker_keeps_another_jobs_marker_and_adds_its_own():
    theirs = with_marker("shared name", OTHER_ID)
    both = with_marker(theirs, JOB_ID)
    assert both == f"{theirs} [fabricflow:3f9c2a1e7b6d4c1a]"
    assert ownership_marker(OTHER_ID) in both and ownership_marker(JOB_ID) in both


def test_with_marker_keeps_the_description_text():
    text = "modèle de test, 中文 description"
    assert with_marker(text, JOB_ID).startswith(text + " ")


def test_marker_contains_no_character_service_instances_forbid():
    # DeployServiceInstance rejects ! < > = & " ' in descriptions.
    assert not set(ownership_marker(JOB_ID)) & set("!<>=&\"'")


# --- Job / Step JSON contract ---------------------------------------------------------------


def _steps(**overrides: Step) -> dict[StepName, Step]:
    steps = {name: Step(name=name, state=StepState.PENDING) for name in STEP_ORDER}
    steps.update({StepName(k): v for k, v in overrides.items()})
    return steps


def _job(**kw) -> Job:
    fields = dict(
        id=JOB_ID,
        name="llama3-quickstart",
        state=JobState.PENDING,
        spec={"name": "llama3-quickstart"},
        steps=_steps(),
        created_at=CREATED,
        updated_at=UPDATED,
    )
    fields.update(kw)
    return Job(**fields)


def _finished_job() -> Job:
    ok = StepState.SUCCEEDED
    steps = _steps(
        workspace=Step(StepName.WORKSPACE, ok, resource_id="ws-1", attempts=1),
        endpoint=Step(StepName.ENDPOINT, ok, resource_id="ep-1", resource_status="CREATING"),
        endpoint_ready=Step(StepName.ENDPOINT_READY, ok, resource_id="ep-1", resource_status="RUNNING"),
        model=Step(StepName.MODEL, ok, resource_id="m-1", extra={"version_id": "mv-1"}),
        service_instance=Step(StepName.SERVICE_INSTANCE, ok, resource_id="si-1"),
        service_ready=Step(StepName.SERVICE_READY, ok, resource_id="si-1", resource_status="RUNNING"),
        invocation=Step(StepName.INVOCATION, ok, resource_id="si-1", resource_status="stop"),
    )
    return _job(
        state=JobState.SUCCEEDED,
        steps=steps,
        result={"reply": "Hello!", "finish_reason": "stop",
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
    )


@pytest.mark.parametrize("job", [_job(), _finished_job()], ids=["pending", "succeeded"])
def test_job_json_has_exactly_the_contract_keys(job):
    data = job.as_json()
    assert JOB_KEYS <= set(data)
    assert set(data) - JOB_KEYS <= JOB_OPTIONAL_KEYS
    json.dumps(data)  # plain JSON, no datetimes or enums left


@pytest.mark.parametrize("job", [_job(), _finished_job()], ids=["pending", "succeeded"])
def test_each_step_has_exactly_the_contract_keys(job):
    steps = job.as_json()["steps"]
    assert [s["name"] for s in steps] == [str(n) for n in STEP_ORDER]
    for step in steps:
        assert set(step) == STEP_KEYS


@pytest.mark.parametrize("job", [_job(), _finished_job()], ids=["pending", "succeeded"])
def test_result_has_exactly_the_contract_keys(job):
    assert set(job.as_json()["result"]) == RESULT_KEYS


def test_pending_job_json_values():
    data = _job().as_json()
    assert data["id"] == JOB_ID
    assert data["name"] == "llama3-quickstart"
    assert data["state"] == "PENDING"
    assert data["error"] is None
    assert all(v is None for v in data["result"].values())
    assert all(s["state"] == "PENDING" and s["attempts"] == 0 and s["error"] is None
               and s["resource_id"] is None and s["resource_status"] is None for s in data["steps"])
    assert data["created_at"] == CREATED.isoformat()
    assert data["updated_at"] == UPDATED.isoformat()


def test_finished_job_json_values():
    data = _finished_job().as_json()
    assert data["state"] == "SUCCEEDED"
    assert data["result"] == {
        "workspace_id": "ws-1",
        "endpoint_id": "ep-1",
        "model_id": "m-1",
        "model_version_id": "mv-1",
        "service_instance_id": "si-1",
        "reply": "Hello!",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    by_name = {s["name"]: s for s in data["steps"]}
    assert by_name["endpoint_ready"]["resource_status"] == "RUNNING"
    assert by_name["workspace"]["attempts"] == 1


def test_failed_job_carries_error_triple():
    error = {"code": "DLM.4001", "message": "create endpoint: HTTP 400", "request_id": "r-1"}
    steps = _steps(endpoint=Step(StepName.ENDPOINT, StepState.FAILED, attempts=3, error=error))
    data = _job(state=JobState.FAILED, error=error, steps=steps).as_json()
    assert data["error"] == error
    assert set(data["error"]) == {"code", "message", "request_id"}
    failed = next(s for s in data["steps"] if s["name"] == "endpoint")
    assert failed["state"] == "FAILED" and failed["error"] == error and failed["attempts"] == 3


def test_internal_fields_are_not_exposed():
    job = _job(lease_owner="daemon-1", spec={"secret-ish": "x"}, recoveries=2)
    text = json.dumps(job.as_json())
    for leaked in ("lease_owner", "daemon-1", "spec", "recoveries", "secret-ish"):
        assert leaked not in text


def test_step_json_has_plain_strings():
    data = Step(StepName.MODEL, StepState.IN_FLIGHT, request_name="LLama3-8b").as_json()
    assert data == {"name": "model", "state": "IN_FLIGHT", "resource_id": None,
                    "resource_status": None, "attempts": 0, "error": None}
    assert type(data["name"]) is str and type(data["state"]) is str


def test_summary_json_keys():
    data = _job().summary_json()
    assert set(data) == {"id", "name", "state", "created_at", "updated_at"}
    json.dumps(data)


def test_event_json():
    event = Event(id=1, job_id=JOB_ID, at=CREATED, step="workspace", from_state="PENDING",
                  to_state="IN_FLIGHT", detail="creating workspace apieworkspace")
    data = event.as_json()
    assert data["from"] == "PENDING" and data["to"] == "IN_FLIGHT"
    json.dumps(data)
