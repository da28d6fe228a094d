"""Teardown, cancel and retry, with the real runner, a real SQLite file and the emulator."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from orchestrator.config import DaemonSettings
from orchestrator.engine.daemon import heartbeat
from orchestrator.engine.runner import Runner
from orchestrator.errors import UserError
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import JobKind, JobState, StepName, StepState
from tests.conftest import make_spec
from tests.integration.test_engine import FAST, OWNER, run_job, stats

BEAT = DaemonSettings(heartbeat_seconds=0.5, lease_seconds=5)


async def run_teardown(store, url, parent_id):
    job = await store.submit_teardown(parent_id)
    await store.claim(job.id, OWNER, lease=30)
    async with FabricClient(url) as client:
        await Runner(store, client, owner=OWNER, settings=FAST).run(job.id)
    return await store.get(job.id)


async def wait_until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_teardown_deletes_everything_the_job_created(store, emulator, spec_data):
    job = await run_job(store, emulator.url, make_spec(spec_data))
    assert job.state is JobState.SUCCEEDED

    teardown = await run_teardown(store, emulator.url, job.id)

    assert teardown.kind is JobKind.TEARDOWN and teardown.parent_id == job.id
    assert teardown.state is JobState.SUCCEEDED, teardown.error
    assert [teardown.steps[n].state for n in teardown.order] == [StepState.SUCCEEDED] * 4
    assert teardown.steps[StepName.ENDPOINT].resource_id == job.resource_id(StepName.ENDPOINT)
    live = (await stats(emulator.url))["live"]
    assert live == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}
    assert [n for n in teardown.order] == ["service_instance", "model", "endpoint", "workspace"]


async def test_teardown_keeps_reused_resources_and_skips_gone_ones(store, emulator, spec_data):
    async with aiohttp.ClientSession() as session:
        ws = (await (await session.post(f"{emulator.url}/v1/workspaces", json={"name": "keepme"})).json())["id"]
    job = await run_job(store, emulator.url, make_spec(spec_data, workspace={"id": ws}))
    instance = job.resource_id(StepName.SERVICE_INSTANCE)
    async with FabricClient(emulator.url) as client:  # somebody deleted the instance already
        await client.delete_service_instance(ws, instance)

    teardown = await run_teardown(store, emulator.url, job.id)

    assert teardown.state is JobState.SUCCEEDED, teardown.error
    assert teardown.steps[StepName.WORKSPACE].state is StepState.SKIPPED
    assert "reused" in (await store.events(teardown.id))[-2].detail
    live = (await stats(emulator.url))["live"]
    assert live == {"workspace": 1, "endpoint": 0, "model": 0, "service_instance": 0}


async def test_cancel_during_endpoint_wait_then_teardown(store, emulator_factory, spec_data):
    emu = await emulator_factory(ready_after=60, instance_ready_after=0.1)
    job = await store.submit(make_spec(spec_data))
    await store.claim(job.id, OWNER, lease=30)
    async with FabricClient(emu.url) as client:
        runner = Runner(store, client, owner=OWNER, settings=FAST)
        async with heartbeat(store, runner, BEAT):  # passes the CLI's cancel request to the runner
            task = asyncio.create_task(runner.run(job.id))

            async def waiting():
                return (await store.get(job.id)).steps[StepName.ENDPOINT_READY].state is StepState.WAITING

            await wait_until(waiting)
            assert await store.cancel(job.id) is JobState.RUNNING  # requested, not yet stopped
            state = await asyncio.wait_for(task, timeout=5)

    job = await store.get(job.id)
    assert state is JobState.CANCELLED and job.state is JobState.CANCELLED
    assert job.steps[StepName.MODEL].state is StepState.PENDING
    assert any("cancelled at a safe point" in (e.detail or "") for e in await store.events(job.id))

    teardown = await run_teardown(store, emu.url, job.id)
    assert teardown.state is JobState.SUCCEEDED, teardown.error
    assert teardown.steps[StepName.MODEL].state is StepState.SKIPPED
    live = (await stats(emu.url))["live"]
    assert live == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}


async def test_cancel_pending_job_is_immediate(store, spec_data):
    job = await store.submit(make_spec(spec_data))
    assert await store.cancel(job.id) is JobState.CANCELLED
    assert (await store.get(job.id)).state is JobState.CANCELLED
    assert await store.claim(job.id, OWNER, lease=30) is None


async def test_retry_continues_from_failed_step_keeping_ids(store, emulator_factory, spec_data):
    emu = await emulator_factory(ready_after=0.1, instance_ready_after=1.5)
    job = await run_job(store, emu.url, make_spec(spec_data, timeouts={"service_ready": "0.3s"}))
    assert job.state is JobState.FAILED
    assert job.steps[StepName.SERVICE_READY].state is StepState.FAILED
    before = {n: job.resource_id(n) for n in (StepName.WORKSPACE, StepName.ENDPOINT, StepName.MODEL,
                                              StepName.SERVICE_INSTANCE)}
    await asyncio.sleep(1.5)  # the instance becomes RUNNING meanwhile

    retried = await store.retry(job.id)
    assert retried.state is JobState.PENDING and retried.error is None
    assert retried.steps[StepName.SERVICE_READY].state is StepState.PENDING
    await store.claim(job.id, OWNER, lease=30)
    async with FabricClient(emu.url) as client:
        await Runner(store, client, owner=OWNER, settings=FAST).run(job.id)
    job = await store.get(job.id)

    assert job.state is JobState.SUCCEEDED
    assert {n: job.resource_id(n) for n in before} == before
    counts = (await stats(emu.url))["created"]
    assert all(sum(by_name.values()) == 1 for by_name in counts.values())
    assert any(e.detail == "retry requested from step service_ready" for e in await store.events(job.id))


async def test_whole_job_timeout(store, emulator_factory, spec_data):
    emu = await emulator_factory(ready_after=60, instance_ready_after=0.1)
    job = await run_job(store, emu.url, make_spec(spec_data, timeouts={"job": "0.5s"}))
    assert job.state is JobState.FAILED
    assert job.error["code"] == "fabricflow.job_timeout"


async def test_teardown_also_finds_unrecorded_resources_by_name_and_marker(store, emulator, spec_data):
    from orchestrator.domain import ownership_marker

    job = await run_job(store, emulator.url, make_spec(spec_data))
    ws = job.resource_id(StepName.WORKSPACE)
    async with aiohttp.ClientSession() as session:  # e.g. left by a runner that lost its lease
        body = {"name": "apie_test", "type": "inference", "description": f"x {ownership_marker(job.id)}"}
        extra = (await (await session.post(f"{emulator.url}/v1/workspaces/{ws}/endpoints", json=body)).json())["id"]

    teardown = await run_teardown(store, emulator.url, job.id)

    assert teardown.state is JobState.SUCCEEDED, teardown.error
    assert extra in teardown.steps[StepName.ENDPOINT].extra["targets"]
    assert (await stats(emulator.url))["live"] == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}


async def test_a_teardown_that_kept_everything_does_not_stand_in_the_way_of_the_service(store, emulator, spec_data):
    first = await run_job(store, emulator.url, make_spec(spec_data))
    ws = first.resource_id(StepName.WORKSPACE)
    adopter = await run_job(store, emulator.url, make_spec(spec_data, workspace={"id": ws}, on_existing="adopt"))
    made = (StepName.WORKSPACE, StepName.ENDPOINT, StepName.MODEL, StepName.SERVICE_INSTANCE)
    assert {adopter.steps[name].state for name in made} == {StepState.SKIPPED}  # reused, adopted: none made

    teardown = await run_teardown(store, emulator.url, adopter.id)

    assert teardown.state is JobState.SUCCEEDED, teardown.error
    assert {s.state for s in teardown.steps.values()} == {StepState.SKIPPED}
    assert (await stats(emulator.url))["live"] == {"workspace": 1, "endpoint": 1, "model": 1, "service_instance": 1}
    assert await store.live_teardown(adopter.id) is None  # invoke and retry may still use the job
    assert await store.live_teardown(first.id) is None


async def test_a_second_teardown_is_refused_until_the_first_fails_or_is_cancelled(store, emulator, spec_data):
    job = await run_job(store, emulator.url, make_spec(spec_data))
    pending = await store.submit_teardown(job.id)
    with pytest.raises(UserError) as twice:
        await store.submit_teardown(job.id)
    assert str(twice.value) == (f"job {job.id[:8]} already has a teardown: {pending.id[:8]} (PENDING) is to tear "
                                f"it down; fabricflow show {pending.id[:8]} tells what it deleted and kept")
    await store.cancel(pending.id)  # cancelled before it ran: a new one may go ahead
    done = await run_teardown(store, emulator.url, job.id)
    assert done.state is JobState.SUCCEEDED, done.error
    deletes = (await stats(emulator.url))["requests"]
    with pytest.raises(UserError) as again:
        await store.submit_teardown(job.id)
    assert str(again.value) == (f"job {job.id[:8]} already has a teardown: {done.id[:8]} (SUCCEEDED) tore it "
                                f"down; fabricflow show {done.id[:8]} tells what it deleted and kept")
    assert (await stats(emulator.url))["requests"] == deletes  # no new job, nothing sent
    teardowns = [j for j in await store.list() if j.parent_id == job.id]
    assert sorted(j.state for j in teardowns) == sorted([JobState.CANCELLED, JobState.SUCCEEDED])
