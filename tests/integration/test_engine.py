"""The runner against the real emulator on loopback and a real SQLite file."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy import update

from orchestrator.domain import ownership_marker
from orchestrator.engine.runner import EngineSettings, Runner
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store.jobs import JobStore
from orchestrator.store.schema import steps
from tests.conftest import make_spec

FAST = EngineSettings(poll_initial=0.05, poll_max=0.2, max_attempts=6, backoff_base=0.01, backoff_cap=0.05,
                      settle_seconds=0.3, look_interval=0.05)
OWNER = "test-owner"


async def run_job(store: JobStore, url: str, spec: Any, *, settings: EngineSettings = FAST) -> Any:
    job = await store.submit(spec)
    assert await store.claim(job.id, OWNER, lease=30) is not None
    async with FabricClient(url) as client:
        await Runner(store, client, owner=OWNER, settings=settings).run(job.id)
    return await store.get(job.id)


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_emulator/stats") as resp:
        return await resp.json()


async def faults(url: str, **knobs: Any) -> None:
    async with aiohttp.ClientSession() as session, session.post(f"{url}/_emulator/faults", json=knobs) as resp:
        assert resp.status == 200, await resp.text()


def created_once(counts: dict[str, Any], spec_data: dict[str, Any]) -> None:
    assert counts["created"]["workspace"] == {spec_data["workspace"]["name"]: 1}
    assert counts["created"]["endpoint"] == {spec_data["endpoint"]["name"]: 1}
    assert counts["created"]["model"] == {spec_data["model"]["name"]: 1}
    assert counts["created"]["service_instance"] == {spec_data["service_instance"]["name"]: 1}


async def test_job_runs_end_to_end(store, emulator, spec_data):
    job = await run_job(store, emulator.url, make_spec(spec_data))

    assert job.state is JobState.SUCCEEDED
    assert all(s.state is StepState.SUCCEEDED for s in job.steps.values())
    out = job.as_json()["result"]
    for key in ("workspace_id", "endpoint_id", "model_id", "model_version_id", "service_instance_id"):
        assert out[key], key
    assert "You said: hello" in out["reply"]
    assert out["finish_reason"] == "stop"
    assert out["usage"]["total_tokens"] > 0
    assert job.steps[StepName.ENDPOINT_READY].resource_status == "RUNNING"
    created_once(await stats(emulator.url), spec_data)
    edges = [(e.step, e.from_state, e.to_state) for e in await store.events(job.id)]
    assert edges[0] == (None, None, "PENDING")
    assert ("workspace", "PENDING", "IN_FLIGHT") in edges
    assert edges[-1] == (None, "RUNNING", "SUCCEEDED")


async def test_create_failed_endpoint_fails_job_with_fabric_error(store, emulator_factory, spec_data):
    emu = await emulator_factory(ready_after=0.1, instance_ready_after=0.1, create_fail="apie_test")
    job = await run_job(store, emu.url, make_spec(spec_data))

    assert job.state is JobState.FAILED
    step = job.steps[StepName.ENDPOINT_READY]
    assert step.state is StepState.FAILED
    assert step.resource_status == "CREATE_FAILED"
    assert job.error is not None and job.error["code"] == step.error["code"]
    assert "CREATE_FAILED" in job.error["message"]
    assert job.steps[StepName.MODEL].state is StepState.PENDING  # nothing after the failure ran


async def test_lost_create_responses_are_reconciled_not_resent(store, emulator_factory, spec_data):
    # Every create reaches Fabric and creates the resource, but no response ever comes back.
    emu = await emulator_factory(ready_after=0.1, instance_ready_after=0.1, drop_rate=1.0, seed=1)
    job = await run_job(store, emu.url, make_spec(spec_data))

    assert job.state is JobState.SUCCEEDED, job.error
    created_once(await stats(emu.url), spec_data)
    details = [e.detail or "" for e in await store.events(job.id)]
    assert sum("created earlier by this job; adopted" in d for d in details) == 4


async def test_transient_errors_are_retried_and_counted(store, emulator, spec_data):
    await faults(emulator.url, fail_next=3, status=503)
    job = await run_job(store, emulator.url, make_spec(spec_data))

    assert job.state is JobState.SUCCEEDED
    assert job.steps[StepName.WORKSPACE].attempts >= 1
    created_once(await stats(emulator.url), spec_data)


async def test_same_named_foreign_resource_is_a_conflict(store, emulator, spec_data):
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{emulator.url}/v1/workspaces",
                                  json={"name": spec_data["workspace"]["name"], "description": "mine"})
        foreign = (await resp.json())["id"]
    job = await run_job(store, emulator.url, make_spec(spec_data))

    assert job.state is JobState.FAILED
    assert job.error["code"] == "fabricflow.conflict"
    assert foreign in job.error["message"]
    assert "on_existing: adopt" in job.error["message"]
    assert (await stats(emulator.url))["created"]["workspace"] == {spec_data["workspace"]["name"]: 1}


async def test_on_existing_adopt_reuses_and_marks_skipped(store, emulator, spec_data):
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{emulator.url}/v1/workspaces",
                                  json={"name": spec_data["workspace"]["name"], "description": "mine"})
        foreign = (await resp.json())["id"]
    job = await run_job(store, emulator.url, make_spec(spec_data, on_existing="adopt"))

    assert job.state is JobState.SUCCEEDED
    ws = job.steps[StepName.WORKSPACE]
    assert (ws.state, ws.resource_id, ws.extra.get("adopted")) == (StepState.SKIPPED, foreign, True)


async def test_in_flight_step_found_on_recovery_is_adopted(store, emulator, spec_data):
    """A crash after the create reached Fabric but before its ID was committed."""
    spec = make_spec(spec_data)
    job = await store.submit(spec)
    await store.claim(job.id, OWNER, lease=30)
    await store.move_step(job.id, OWNER, StepName.WORKSPACE, expected=StepState.PENDING,
                          to=StepState.IN_FLIGHT, detail="intent", request_name="apieworkspace")
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{emulator.url}/v1/workspaces", json={
            "name": "apieworkspace", "description": f"apie test workspace {ownership_marker(job.id)}"})
        orphan = (await resp.json())["id"]
    async with FabricClient(emulator.url) as client:
        await Runner(store, client, owner=OWNER, settings=FAST).run(job.id)
    job = await store.get(job.id)

    assert job.state is JobState.SUCCEEDED
    assert job.steps[StepName.WORKSPACE].resource_id == orphan
    created_once(await stats(emulator.url), spec_data)


async def test_a_resumed_wait_polls_at_the_pace_it_had_reached(store, emulator_factory, spec_data):
    """An hour into a wait, a restart does not start the 0.01 s, 0.02 s, 0.04 s... ramp again."""
    emu = await emulator_factory(ready_after=3600, instance_ready_after=0.1)
    job = await store.submit(make_spec(spec_data, timeouts={"endpoint_ready": "3h"}))
    await store.claim(job.id, OWNER, lease=30)
    async with FabricClient(emu.url) as client:
        ws = await client.create_workspace({"name": spec_data["workspace"]["name"]})
        ep = await client.create_endpoint(ws.id, {**spec_data["endpoint"], "description": "x"})
    for name, resource in ((StepName.WORKSPACE, ws.id), (StepName.ENDPOINT, ep.id)):
        await store.move_step(job.id, OWNER, name, expected=StepState.PENDING, to=StepState.IN_FLIGHT,
                              detail="intent")
        await store.move_step(job.id, OWNER, name, expected=StepState.IN_FLIGHT, to=StepState.SUCCEEDED,
                              detail="made by the test", resource_id=resource)
    await store.move_step(job.id, OWNER, StepName.ENDPOINT_READY, expected=StepState.PENDING,
                          to=StepState.WAITING, detail="waiting", resource_id=ep.id, resource_status="CREATING")
    async with store.engine.begin() as conn:  # the wait began an hour ago
        await conn.execute(update(steps).where(steps.c.job_id == job.id, steps.c.name == "endpoint_ready")
                           .values(started_at=datetime.now(UTC) - timedelta(hours=1)))
    before = (await stats(emu.url))["operations"].get("show_endpoint", 0)
    paced = EngineSettings(**{**FAST.__dict__, "poll_initial": 0.01, "poll_max": 0.4})
    async with FabricClient(emu.url) as client:
        runner = Runner(store, client, owner=OWNER, settings=paced)
        task = asyncio.create_task(runner.run(job.id))
        await asyncio.sleep(1.2)
        runner.stop.set()
        assert await task is JobState.PENDING  # released at the safe point
    polls = (await stats(emu.url))["operations"].get("show_endpoint", 0) - before
    # At the cap's pace: a first poll spread over 0.4 s, then one per 0.4-0.5 s, so at most 4 in
    # 1.2 s (a slow machine only makes fewer); starting the ramp again would make 8 or more.
    assert 1 <= polls <= 4, polls


async def test_wait_times_out_with_last_status(store, emulator_factory, spec_data):
    emu = await emulator_factory(ready_after=60, instance_ready_after=0.1)
    job = await run_job(store, emu.url, make_spec(spec_data, timeouts={"endpoint_ready": "1s"}))

    assert job.state is JobState.FAILED
    assert job.error["code"] == "fabricflow.timeout"
    assert "waiting for endpoint" in job.error["message"]
    assert "last status CREATING" in job.error["message"]


async def test_reused_workspace_is_checked_and_skipped(store, emulator, spec_data):
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{emulator.url}/v1/workspaces", json={"name": "existingws"})
        ws_id = (await resp.json())["id"]
    job = await run_job(store, emulator.url, make_spec(spec_data, workspace={"id": ws_id}))
    assert job.state is JobState.SUCCEEDED
    assert job.steps[StepName.WORKSPACE].state is StepState.SKIPPED

    missing = await run_job(store, emulator.url, make_spec(spec_data, workspace={"id": "0" * 32}))
    assert missing.state is JobState.FAILED
    assert "does not exist" in missing.error["message"]


async def _run_on_one_endpoint(store, emulator_factory, spec_data, *, shared: bool, tag: str) -> int:
    """Ten jobs reusing one endpoint that takes 1.5 s to be RUNNING; returns their endpoint polls."""
    emu = await emulator_factory(ready_after=1.5, instance_ready_after=0.1)
    async with aiohttp.ClientSession() as session:
        ws = (await (await session.post(f"{emu.url}/v1/workspaces", json={"name": f"sharedws{tag}"})).json())["id"]
        body = {"name": "shared", "type": "inference"}
        ep = (await (await session.post(f"{emu.url}/v1/workspaces/{ws}/endpoints", json=body)).json())["id"]
    before = (await stats(emu.url))["operations"].get("show_endpoint", 0)
    specs = [make_spec(spec_data, name=f"j{tag}{i}", workspace={"id": ws}, endpoint={"id": ep},
                       model={**spec_data["model"], "name": f"m{i}"},
                       service_instance={"name": f"s{i}"}) for i in range(10)]
    jobs = [await store.submit(s) for s in specs]
    for j in jobs:
        await store.claim(j.id, OWNER, lease=30)
    steady = EngineSettings(**{**FAST.__dict__, "poll_initial": 0.25, "poll_max": 0.25})
    async with FabricClient(emu.url) as client:
        if shared:  # one runner: one shared poller
            runner = Runner(store, client, owner=OWNER, settings=steady)
            await asyncio.gather(*(runner.run(j.id) for j in jobs))
        else:  # a runner (and a poller) per job: nothing shared
            await asyncio.gather(*(Runner(store, client, owner=OWNER, settings=steady).run(j.id) for j in jobs))
    assert {(await store.get(j.id)).state for j in jobs} == {JobState.SUCCEEDED}
    # Each job also reads the reused endpoint once to check that it exists: not a poll.
    return (await stats(emu.url))["operations"]["show_endpoint"] - before - len(jobs)


async def test_many_jobs_waiting_on_one_endpoint_share_polls(store, emulator_factory, spec_data):
    """Jobs that reuse one endpoint poll it together, not once each."""
    shared = await _run_on_one_endpoint(store, emulator_factory, spec_data, shared=True, tag="a")
    alone = await _run_on_one_endpoint(store, emulator_factory, spec_data, shared=False, tag="b")
    # Counted, not timed: alone, every one of the 10 jobs polls the endpoint at least once per
    # round (10 x ~6); shared, one poll per round serves all of them. However slow the machine,
    # a round of polls costs 10 GETs alone and 1 shared.
    assert alone >= 20, alone
    assert shared * 2 <= alone, (alone, shared)


async def test_per_step_retry_limit_fails_with_the_reason(store, emulator, spec_data):
    await faults(emulator.url, fail_next=10, status=503)
    limited = EngineSettings(**{**FAST.__dict__, "attempts_per_step": (("workspace", 2),)})
    job = await run_job(store, emulator.url, make_spec(spec_data), settings=limited)

    assert job.state is JobState.FAILED
    step = job.steps[StepName.WORKSPACE]
    assert step.attempts == 2
    assert job.error["message"].startswith("gave up after 2 attempts: ")
    assert "HTTP 503" in job.error["message"]
    retried = [e.detail for e in await store.events(job.id) if "failed (" in (e.detail or "")]
    assert retried and "retrying in" in retried[0]


async def test_unknown_spec_code_and_base_model_fail_before_creating(store, emulator, spec_data):
    data = dict(spec_data, endpoint={**spec_data["endpoint"],
                                     "reserved_resource": {"mu": {"spec_code": "mu.nope", "min": 0, "max": 1}}})
    job = await run_job(store, emulator.url, make_spec(data))
    assert job.state is JobState.FAILED
    assert job.error["code"] == "fabricflow.invalid_spec"
    assert "unknown spec_code mu.nope; Fabric offers" in job.error["message"]
    assert "mu.llama3.8b" in job.error["message"]
    # Checked before the job's first create: not even its workspace was made.
    assert (await stats(emulator.url))["created"]["workspace"] == {}
    assert (await stats(emulator.url))["created"]["endpoint"] == {}
    assert job.steps[StepName.WORKSPACE].state is StepState.FAILED

    model = {**spec_data["model"], "version": {"name": "v1", "config": {
        "llm_model_config": {"base_model_type": "GPT_99", "model_path": "obs://b/m"}}}}
    job = await run_job(store, emulator.url, make_spec(dict(spec_data, workspace={"name": "otherws"}, model=model)))
    assert job.state is JobState.FAILED
    assert "unknown base_model_type GPT_99" in job.error["message"]
    assert (await stats(emulator.url))["created"] == {"workspace": {}, "endpoint": {}, "model": {},
                                                      "service_instance": {}}


async def test_runner_that_lost_its_lease_sends_no_create(store, emulator, spec_data):
    job = await store.submit(make_spec(spec_data))
    await store.claim_next("old", limit=1, lease=30)
    async with FabricClient(emulator.url) as client:
        old = Runner(store, client, owner="old", settings=FAST)
        # The lease moves to another daemon between the intent and the create request.
        real_find = old.client.find_workspaces

        async def find_then_lose_lease(name, **options):
            found = await real_find(name, **options)
            async with store.engine.begin() as conn:
                from sqlalchemy import update

                from orchestrator.store.schema import jobs
                await conn.execute(update(jobs).where(jobs.c.id == job.id).values(lease_owner="new"))
            return found

        old.client.find_workspaces = find_then_lose_lease  # type: ignore[method-assign]
        await old.run(job.id)
    assert (await stats(emulator.url))["created"]["workspace"] == {}
    assert (await store.get(job.id)).lease_owner == "new"


async def test_running_job_behind_a_failed_step_ends_failed_without_acting(store, emulator, spec_data):
    """A crash between failing a step and failing its job (an older fabricflow) resolves cleanly."""
    job = await store.submit(make_spec(spec_data), owner=OWNER, lease=30)
    async with store.engine.begin() as conn:
        from sqlalchemy import update

        from orchestrator.store.schema import steps
        await conn.execute(update(steps).where(steps.c.job_id == job.id, steps.c.name == "workspace").values(
            state="FAILED", error={"code": "X.1", "message": "boom", "request_id": None}))
    async with FabricClient(emulator.url) as client:
        state = await Runner(store, client, owner=OWNER, settings=FAST).run(job.id)
    assert state is JobState.FAILED
    assert (await store.get(job.id)).error["code"] == "X.1"
    assert (await stats(emulator.url))["requests"] == 0


async def test_a_failed_step_fails_its_job_in_the_same_transaction(store, emulator_factory, spec_data):
    emu = await emulator_factory(ready_after=0.1, instance_ready_after=0.1, create_fail="apie_test")
    job = await run_job(store, emu.url, make_spec(spec_data))
    edges = [(e.id, e.step, e.to_state, e.at) for e in await store.events(job.id)]
    step_failed = next(e for e in edges if e[1] == "endpoint_ready" and e[2] == "FAILED")
    job_failed = next(e for e in edges if e[1] is None and e[2] == "FAILED")
    assert job_failed[0] == step_failed[0] + 1  # written together, in one commit


async def test_several_marked_matches_keep_one_and_delete_the_rest(store, emulator, spec_data):
    from orchestrator.domain import ownership_marker

    ids = []
    async with aiohttp.ClientSession() as session:
        ws = (await (await session.post(f"{emulator.url}/v1/workspaces", json={"name": "otherws1"})).json())["id"]
    job = await store.submit(make_spec(spec_data, workspace={"id": ws}), owner=OWNER, lease=30)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # a create carried out twice (a late create, a gateway's retry)
            body = {"name": "apie_test", "type": "inference", "description": f"copy {ownership_marker(job.id)}"}
            resp = await session.post(f"{emulator.url}/v1/workspaces/{ws}/endpoints", json=body)
            ids.append((await resp.json())["id"])
    async with FabricClient(emulator.url) as client:
        await Runner(store, client, owner=OWNER, settings=FAST).run(job.id)
        kept = await client.show_endpoint(ws, ids[0])
        left = [e.id for e in await client.find_endpoints(ws, "apie_test") if e.status not in ("DELETING", "DELETED")]
    job = await store.get(job.id)
    assert job.state is JobState.SUCCEEDED
    assert job.resource_id(StepName.ENDPOINT) == ids[0]  # the oldest one is kept
    assert kept.status == "RUNNING" and left == [ids[0]]
    events = [e.detail for e in await store.events(job.id)]
    assert (f"deleted duplicate endpoint {ids[1]}: named 'apie_test' with this job's marker, "
            f"but {ids[0]} is the one recorded") in events


async def test_service_instances_and_invocations_go_to_the_ep_host(store, emulator_factory, spec_data):
    fabric = await emulator_factory(ready_after=0.1, instance_ready_after=0.1)
    ep_host = await emulator_factory(ready_after=0.1, instance_ready_after=0.1)
    job = await store.submit(make_spec(spec_data), owner=OWNER, lease=30)
    async with FabricClient(fabric.url, ep_url=ep_host.url) as client:
        await Runner(store, client, owner=OWNER, settings=FAST).run(job.id)
    job = await store.get(job.id)
    # The second emulator knows no workspace: the instance call reached it and was refused.
    assert job.steps[StepName.SERVICE_INSTANCE].state is StepState.FAILED
    assert (await stats(ep_host.url))["requests"] >= 1
    assert (await stats(fabric.url))["created"]["service_instance"] == {}


async def test_failed_service_instance_fails_job_with_fabric_error(store, emulator_factory, spec_data):
    emu = await emulator_factory(ready_after=0.1, instance_ready_after=0.1, instance_fail="serviceInstance")
    job = await run_job(store, emu.url, make_spec(spec_data))

    assert job.state is JobState.FAILED
    step = job.steps[StepName.SERVICE_READY]
    assert (step.state, step.resource_status) == (StepState.FAILED, "FAILED")
    assert job.error["code"] == "FABRIC.4002"
    assert "model load error" in job.error["message"]
    assert job.steps[StepName.INVOCATION].state is StepState.PENDING


async def test_reused_model_with_a_pinned_version(store, emulator, spec_data):
    async with aiohttp.ClientSession() as session:
        ws = (await (await session.post(f"{emulator.url}/v1/workspaces", json={"name": "modelsws"})).json())["id"]
        made = await (await session.post(f"{emulator.url}/v1/workspaces/{ws}/models", json={
            "name": "kept", "type": "LLM_MODEL", "version": {"name": "v1"}})).json()
    spec = make_spec(spec_data, workspace={"id": ws}, model={"id": made["id"], "version_id": made["version_id"]})
    job = await run_job(store, emulator.url, spec)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.as_json()["result"]["model_version_id"] == made["version_id"]
    assert job.steps[StepName.MODEL].state is StepState.SKIPPED

    wrong = make_spec(spec_data, name="wrong", workspace={"id": ws}, endpoint={**spec_data["endpoint"], "name": "e2"},
                      model={"id": made["id"], "version_id": "f" * 32}, service_instance={"name": "other"})
    job = await run_job(store, emulator.url, wrong)
    assert job.state is JobState.FAILED and f"has no version {'f' * 32}" in job.error["message"]
