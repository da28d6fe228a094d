"""Exactly once against what a real cloud does (issue 9), with the emulator's faults over HTTP:
a create carried out after the client gave up, lists that lag behind creates, pages that shift
under someone else's delete. Each test counts what the emulator created and what the job
recorded; none depends on the machine's speed beyond generous settle windows."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from orchestrator.domain import Job
from orchestrator.emulator.keys import STORE
from orchestrator.engine.runner import EngineSettings, Runner
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store.jobs import JobStore
from tests.conftest import make_spec, until
from tests.integration.test_engine import FAST, OWNER, faults, stats

#: A settle window far longer than any late create below: whatever the machine's speed, the late
#: create lands inside it.
SETTLING = EngineSettings(**{**FAST.__dict__, "settle_seconds": 10.0, "look_interval": 0.05})
#: The old behaviour, to show what the window prevents.
NO_SETTLE = EngineSettings(**{**FAST.__dict__, "settle_seconds": 0.0})


async def shared_workspace(url: str, name: str = "sharedws") -> str:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/workspaces", json={"name": name}) as resp:
            return (await resp.json())["id"]


async def run(store: JobStore, url: str, spec: Any, settings: EngineSettings, observer: Any = None) -> Job:
    job = await store.submit(spec)
    assert await store.claim(job.id, OWNER, lease=30) is not None
    async with FabricClient(url) as client:
        await Runner(store, client, owner=OWNER, settings=settings, observer=observer).run(job.id)
    return await store.get(job.id)


@contextlib.asynccontextmanager
async def landing_after_a_look(store: JobStore, emulator: Any) -> AsyncIterator[None]:
    """Carry out the pending late create once the job has looked and found nothing: so the test
    proves the look-again, whatever the machine's speed (the window is far longer than this)."""

    async def land() -> None:
        async def looked() -> bool:
            for j in await store.list():
                if any((e.detail or "").startswith("look 1: ") for e in await store.events(j.id)):
                    return True
            return False

        await until(looked, bool, timeout=60)
        emulator.app[STORE].reschedule_late(0)

    task = asyncio.create_task(land())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def details(store: JobStore, job: Job) -> list[str]:
    return [e.detail or "" for e in await store.events(job.id)]


async def live_endpoints(url: str, ws: str, name: str) -> list[str]:
    async with FabricClient(url) as client:
        return [e.id for e in await client.find_endpoints(ws, name) if e.status not in ("DELETING", "DELETED")]


async def test_a_create_carried_out_late_is_adopted_within_the_settle_window(store, emulator, spec_data):
    ws = await shared_workspace(emulator.url)
    await faults(emulator.url, late_next=1, late_by=3600)  # the endpoint's create: answer lost, done later
    async with landing_after_a_look(store, emulator):
        job = await run(store, emulator.url, make_spec(spec_data, workspace={"id": ws}), SETTLING)

    assert job.state is JobState.SUCCEEDED
    counts = await stats(emulator.url)
    assert counts["created"]["endpoint"] == {"apie_test": 1} and counts["late_created"] == 1
    assert counts["operations"]["create_endpoint"] == 1  # never sent again
    assert await live_endpoints(emulator.url, ws, "apie_test") == [job.resource_id(StepName.ENDPOINT)]
    events = await details(store, job)
    looks = [d for d in events if d.startswith("look ") and "settle window 10s" in d]
    assert looks and looks[0].startswith("look 1: no endpoint named 'apie_test' carries this job's marker yet; "
                                         "a create sent by the last attempt may still be carried out")
    assert f"found endpoint {job.resource_id(StepName.ENDPOINT)} created earlier by this job; adopted" in events


async def test_without_a_settle_window_the_late_create_is_a_duplicate_the_final_sweep_deletes(
        store, emulator, spec_data):
    ws = await shared_workspace(emulator.url)
    await faults(emulator.url, late_next=1, late_by=3600)  # held until the test lets it land

    class LandTheLateCreate:
        """Once the job has recorded its (second) endpoint, the first create is carried out."""

        def on_step(self, job: Job, step: StepName, state: StepState, detail: str) -> None:
            if step is StepName.ENDPOINT_READY and state is StepState.WAITING:
                emulator.app[STORE].reschedule_late(0)

        def on_text(self, job_id: str, text: str) -> None:
            pass

    job = await run(store, emulator.url, make_spec(spec_data, workspace={"id": ws}), NO_SETTLE,
                    observer=LandTheLateCreate())

    assert job.state is JobState.SUCCEEDED
    counts = await stats(emulator.url)
    assert counts["created"]["endpoint"] == {"apie_test": 2} and counts["late_created"] == 1
    recorded = job.resource_id(StepName.ENDPOINT)
    assert await live_endpoints(emulator.url, ws, "apie_test") == [recorded]  # the duplicate is gone
    deleted = [d for d in await details(store, job) if d.startswith("deleted duplicate endpoint ")]
    assert len(deleted) == 1 and deleted[0].endswith(
        f": named 'apie_test' with this job's marker, but {recorded} is the one recorded")


async def test_a_list_that_lags_behind_the_create_is_waited_out(store, emulator_factory, spec_data):
    emulator = await emulator_factory(ready_after=0.1, instance_ready_after=0.1, list_lag=0.5)
    ws = await shared_workspace(emulator.url)
    async with FabricClient(emulator.url) as client:  # the workspace too shows in lists only once 0.5 s old
        await until(lambda: client.get_workspace(ws), lambda found: found is not None)
    await faults(emulator.url, drop_next=1)  # the endpoint is created, its answer lost
    job = await run(store, emulator.url, make_spec(spec_data, workspace={"id": ws}), SETTLING)

    assert job.state is JobState.SUCCEEDED
    counts = await stats(emulator.url)
    assert counts["created"]["endpoint"] == {"apie_test": 1}
    assert counts["operations"]["create_endpoint"] == 1
    assert f"found endpoint {job.resource_id(StepName.ENDPOINT)} created earlier by this job; adopted" \
        in await details(store, job)


async def test_a_delete_between_pages_cannot_hide_the_jobs_own_endpoint(store, emulator, spec_data):
    # The case: 100 other endpoints in a shared workspace, one of page 1 deleted by another
    # user while page 2 is read. Page 2 then starts one item late and would miss the job's own.
    ws = await shared_workspace(emulator.url)
    async with aiohttp.ClientSession() as session:
        for n in range(100):
            body = {"name": f"apie_test-other-{n}", "type": "inference"}  # matched by the fuzzy filter
            async with session.post(f"{emulator.url}/v1/workspaces/{ws}/endpoints", json=body) as resp:
                assert resp.status == 200
    await faults(emulator.url, drop_next=1, churn_next=1)
    job = await run(store, emulator.url, make_spec(spec_data, workspace={"id": ws}), SETTLING)

    assert job.state is JobState.SUCCEEDED
    counts = await stats(emulator.url)
    assert counts["churn_deleted"] == 1
    assert counts["created"]["endpoint"]["apie_test"] == 1  # not created a second time
    assert counts["operations"]["create_endpoint"] == 101
    assert await live_endpoints(emulator.url, ws, "apie_test") == [job.resource_id(StepName.ENDPOINT)]


async def test_a_cancel_waits_for_the_settle_window_and_leaves_nothing_unrecorded(store, emulator, spec_data):
    ws = await shared_workspace(emulator.url)
    await faults(emulator.url, late_next=1, late_by=3600)
    job = await store.submit(make_spec(spec_data, workspace={"id": ws}))
    assert await store.claim(job.id, OWNER, lease=30) is not None
    async with FabricClient(emulator.url) as client:
        runner = Runner(store, client, owner=OWNER, settings=SETTLING)

        class CancelWhileSettling:
            def on_step(self, job: Job, step: StepName, state: StepState, detail: str) -> None:
                if "outcome unknown" in detail:
                    runner.request_cancel(job.id)

            def on_text(self, job_id: str, text: str) -> None:
                pass

        runner.observer = CancelWhileSettling()
        async with landing_after_a_look(store, emulator):
            assert await runner.run(job.id) is JobState.CANCELLED
    job = await store.get(job.id)
    # The late create landed inside the window and was adopted before the job stopped.
    assert job.step(StepName.ENDPOINT).state is StepState.SUCCEEDED
    assert await live_endpoints(emulator.url, ws, "apie_test") == [job.resource_id(StepName.ENDPOINT)]
    assert any("the requested cancel waits for it" in d for d in await details(store, job))
