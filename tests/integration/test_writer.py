"""Group commit on both backends: many callers, few transactions, each compare-and-set its own."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from sqlalchemy import select

from orchestrator.errors import StaleTransition
from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store import ops
from orchestrator.store.jobs import JobStore
from orchestrator.store.schema import events, steps
from tests.conftest import fresh_pg_database, make_spec

OWNER = "writer-test"


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_store(request, db_url):
    async with contextlib.AsyncExitStack() as stack:
        url = db_url if request.param == "sqlite" else await stack.enter_async_context(fresh_pg_database())
        store = await JobStore.open(url, auto_upgrade=True)
        stack.push_async_callback(store.close)
        yield store


async def running_jobs(store: JobStore, spec_data, n: int) -> list[str]:
    """``n`` jobs RUNNING under OWNER, as ``fabricflow run`` submits them."""
    return await store.submit_many([make_spec(spec_data, name=f"w{i}") for i in range(n)], owner=OWNER, lease=600)


def intent(name: StepName = StepName.WORKSPACE) -> ops.StepMove:
    return ops.StepMove(name, StepState.PENDING, StepState.IN_FLIGHT, "intent", {"request_name": "ws"})


async def test_many_callers_share_few_transactions(any_store, spec_data):
    ids = await running_jobs(any_store, spec_data, 50)
    before = any_store.writer.stats()
    await asyncio.gather(*(any_store.commit(job_id, OWNER, [intent()]) for job_id in ids))
    after = any_store.writer.stats()
    assert after.operations - before.operations == 50
    assert after.batches - before.batches < 50  # grouped: fewer commits than callers
    for job_id in ids:  # and every one of them is committed, visible to any other reader
        assert (await any_store.get(job_id)).steps[StepName.WORKSPACE].state is StepState.IN_FLIGHT


async def test_a_lost_compare_and_set_fails_only_its_caller(any_store, spec_data):
    ids = await running_jobs(any_store, spec_data, 10)
    stale = ids[3]
    await any_store.commit(stale, OWNER, [intent()])  # now IN_FLIGHT: a second intent is stale
    results = await asyncio.gather(*(any_store.commit(job_id, OWNER, [intent()]) for job_id in ids),
                                   return_exceptions=True)
    assert isinstance(results[3], StaleTransition)
    assert [r for i, r in enumerate(results) if i != 3] == [None] * 9
    for job_id in ids:
        assert (await any_store.get(job_id)).steps[StepName.WORKSPACE].state is StepState.IN_FLIGHT


async def test_a_half_done_unit_is_undone_whole_and_the_batch_still_commits(any_store, spec_data):
    ids = await running_jobs(any_store, spec_data, 6)
    broken = ids[2]
    # Its first move would apply; its second (endpoint from IN_FLIGHT) cannot: the unit is undone.
    half = [intent(), ops.StepMove(StepName.ENDPOINT, StepState.IN_FLIGHT, StepState.SUCCEEDED, "no")]
    calls = [any_store.commit(job_id, OWNER, half if job_id == broken else [intent()]) for job_id in ids]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[2], StaleTransition)
    assert sum(r is None for r in results) == 5
    job = await any_store.get(broken)
    assert job.steps[StepName.WORKSPACE].state is StepState.PENDING  # nothing of it stayed
    async with any_store.engine.connect() as conn:
        logged = (await conn.execute(select(events.c.id).where(events.c.job_id == broken,
                                                               events.c.step == "workspace"))).all()
    assert logged == []
    for job_id in ids:
        if job_id != broken:
            assert (await any_store.get(job_id)).steps[StepName.WORKSPACE].state is StepState.IN_FLIGHT


async def test_a_job_end_commits_with_its_last_step(any_store, spec_data):
    (job_id,) = await running_jobs(any_store, spec_data, 1)
    await any_store.commit(job_id, OWNER, [intent()])
    done = ops.StepMove(StepName.WORKSPACE, StepState.IN_FLIGHT, StepState.SUCCEEDED, "created", {"resource_id": "w1"})
    await any_store.commit(job_id, OWNER, [done], end=ops.JobEnd(JobState.SUCCEEDED, "all steps succeeded"),
                           result={"reply": "hi"})
    job = await any_store.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.lease_owner is None and job.result == {"reply": "hi"}
    assert job.steps[StepName.WORKSPACE].resource_id == "w1"
    async with any_store.engine.connect() as conn:
        rows = (await conn.execute(select(steps.c.finished_at).where(steps.c.job_id == job_id,
                                                                     steps.c.name == "workspace"))).all()
    assert rows[0][0] is not None


async def test_heartbeats_jump_the_queue_of_transitions(db_url, spec_data, monkeypatch):
    """A heartbeat queued behind hundreds of transitions is in the next batch, not the last."""
    from orchestrator.store import writer

    monkeypatch.setattr(writer, "MAX_BATCH", 50)
    store = await JobStore.open(db_url)
    try:
        ids = await running_jobs(store, spec_data, 300)
        transitions = [asyncio.ensure_future(store.commit(job_id, OWNER, [intent()])) for job_id in ids]
        await asyncio.sleep(0)  # all 300 are queued before the heartbeat
        seen: list[int] = []
        beat = asyncio.ensure_future(store.heartbeat(OWNER, lease=900, job_ids=ids))
        beat.add_done_callback(lambda _: seen.append(sum(t.done() for t in transitions)))
        await asyncio.gather(beat, *transitions)
        assert beat.result() == 300
        # Queued last, committed in the first or second of six batches: at most 100 went first.
        assert seen[0] <= 100, seen
    finally:
        await store.close()


async def test_a_deadlock_victim_is_run_again_not_failed(spec_data):
    """PostgreSQL picks one transaction of a deadlock as its victim; the writer runs that
    operation again (its savepoint undid it) instead of failing its caller (a job_crashed)."""
    from sqlalchemy import text

    from orchestrator.store.writer import Sql, is_transient

    async with fresh_pg_database() as url:
        store = await JobStore.open(url, auto_upgrade=True)
        try:
            x, y = await running_jobs(store, spec_data, 2)
            runs = []

            def both(_dialect):  # locks Y, then waits for X, which the other connection holds
                runs.append(1)
                yield Sql("UPDATE jobs SET name = name WHERE id = :id", {"id": y})
                if len(runs) == 1:
                    holding.set()
                yield Sql("UPDATE jobs SET name = name WHERE id = :id", {"id": x})

            holding = asyncio.Event()
            async with store.engine.connect() as other:
                trans = await other.begin()
                await other.execute(text("UPDATE jobs SET name = name WHERE id = :id"), {"id": x})
                write = asyncio.create_task(store.writer.run(both))
                await asyncio.wait_for(holding.wait(), 30)
                await asyncio.sleep(0.2)  # the writer is now waiting for X (it waited first)
                await other.execute(text("UPDATE jobs SET name = name WHERE id = :id"), {"id": y})
                await trans.commit()
                await asyncio.wait_for(write, 60)
            assert len(runs) == 2  # the writer was the victim, and its operation ran again
        finally:
            await store.close()
    assert is_transient(RuntimeError("deadlock detected")) and not is_transient(RuntimeError("no"))
