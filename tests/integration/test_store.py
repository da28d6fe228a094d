"""JobStore on a real SQLite file: leases, recoveries, poison jobs, version gating."""

from __future__ import annotations

import asyncio

import pytest

from sqlalchemy import update

from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store.schema import jobs
from tests.conftest import ids, make_spec


async def test_poison_job_ends_failed_after_too_many_interrupted_runs(store, spec_data):
    job = await store.submit(make_spec(spec_data))
    for attempt in range(2):  # a run starts (counted by its claim), then its daemon "crashes"
        assert ids(await store.claim_next(f"crash{attempt}", limit=1, lease=0.01, max_runs=2)) == [job.id]
        assert (await store.get(job.id)).recoveries == attempt + 1
        await asyncio.sleep(0.03)  # the lease lapses
    assert await store.claim_next("third", limit=1, lease=30, max_runs=2) == []
    failed = await store.get(job.id)
    assert failed.state is JobState.FAILED
    assert failed.error["code"] == "fabricflow.poison"
    assert "interrupted 2 times in a row without progress" in failed.error["message"]
    assert (await store.events(job.id))[-1].to_state == "FAILED"


async def test_progress_resets_the_poison_count_and_in_flight_steps_are_named(store, spec_data):
    job = await store.submit(make_spec(spec_data))
    assert (await store.claim(job.id, "a", lease=0.01, max_runs=1)).recoveries == 1
    await store.move_step(job.id, "a", StepName.WORKSPACE, expected=StepState.PENDING,
                          to=StepState.IN_FLIGHT, detail="intent", request_name="ws")
    assert (await store.get(job.id)).recoveries == 0  # progress
    await asyncio.sleep(0.03)
    assert ids(await store.claim_next("b", limit=1, lease=0.01, max_runs=1)) == [job.id]
    await asyncio.sleep(0.03)
    assert await store.claim_next("c", limit=1, lease=30, max_runs=1) == []
    message = (await store.get(job.id)).error["message"]
    assert "step workspace was IN_FLIGHT" in message and f"fabricflow teardown {job.id[:8]}" in message


async def test_reclaim_all_takes_every_running_job_at_start_up(store, spec_data):
    a = await store.submit(make_spec(spec_data, name="a"))
    b = await store.submit(make_spec(spec_data, name="b"))
    await store.claim_next("dead", limit=2, lease=3600)  # leases far from expiry, holder gone
    assert sorted(ids(await store.reclaim_all("fresh", lease=30, is_dead=lambda o: o == "dead"))) == sorted([a.id, b.id])
    assert {(await store.get(j.id)).lease_owner for j in (a, b)} == {"fresh"}
    assert "recovered by fresh (previous owner dead)" in (await store.events(a.id))[-1].detail


async def test_reclaim_batches_take_each_job_once_in_transactions_of_the_batch_size(store, spec_data):
    dead = [await store.submit(make_spec(spec_data, name=f"d{i}")) for i in range(5)]
    await store.claim_next("dead", limit=5, lease=3600)
    live = await store.submit(make_spec(spec_data, name="live"), owner="live-run", lease=3600)
    batches = [ids(b) async for b in store.reclaim_batches("fresh", lease=30, is_dead=lambda o: o == "dead",
                                                           size=2)]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(i for b in batches for i in b) == sorted(j.id for j in dead)
    assert (await store.get(live.id)).lease_owner == "live-run"
    for job in dead:  # one "recovered by" event each: nobody was taken twice
        assert [e.detail for e in await store.events(job.id)].count("recovered by fresh (previous owner dead)") == 1


async def test_heartbeat_renews_only_the_owners_leases(store, spec_data):
    mine = await store.submit(make_spec(spec_data, name="mine"))
    theirs = await store.submit(make_spec(spec_data, name="theirs"))
    await store.claim(mine.id, "me", lease=1)
    await store.claim(theirs.id, "them", lease=1)
    assert await store.heartbeat("me", lease=600) == 1
    assert (await store.get(mine.id)).lease_expires_at > (await store.get(theirs.id)).lease_expires_at


async def test_jobs_from_a_newer_fabricflow_wait_for_a_daemon_that_knows_them(store, spec_data):
    job = await store.submit(make_spec(spec_data))
    async with store.engine.begin() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == job.id).values(state_version=99))
    assert ids(await store.claim_next("old-daemon", limit=5, lease=30)) == []
    assert (await store.get(job.id)).state is JobState.PENDING


async def test_a_daemon_never_reclaims_a_job_it_is_running(store, spec_data):
    job = await store.submit(make_spec(spec_data))
    assert ids(await store.claim_next("me", limit=1, lease=0.01)) == [job.id]
    await asyncio.sleep(0.03)  # my heartbeat was starved; my runner is still alive
    assert ids(await store.claim_next("me", limit=1, lease=30, running={job.id})) == []
    # ... but a lapsed job of mine that nobody runs any more (its hand-back failed) is taken again.
    assert ids(await store.claim_next("me", limit=1, lease=30)) == [job.id]


async def test_renew_fences_a_runner_that_lost_its_lease(store, spec_data):
    from orchestrator.errors import StaleTransition

    job = await store.submit(make_spec(spec_data))
    await store.claim_next("old", limit=1, lease=0.01)
    await asyncio.sleep(0.03)
    await store.claim_next("new", limit=1, lease=30)
    await store.renew(job.id, "new", lease=30)
    with pytest.raises(StaleTransition):
        await store.renew(job.id, "old", lease=30)


async def test_reclaim_all_leaves_a_live_holders_job_alone(store, spec_data):
    """A `fabricflow run` holding a job while a daemon starts on the same file keeps it."""
    job = await store.submit(make_spec(spec_data), owner="live-run", lease=30)
    assert ids(await store.reclaim_all("daemon", lease=30, is_dead=lambda o: False)) == []
    assert (await store.get(job.id)).lease_owner == "live-run"


async def test_heartbeat_renews_only_the_jobs_being_run(store, spec_data):
    running = await store.submit(make_spec(spec_data, name="running"), owner="me", lease=1)
    orphan = await store.submit(make_spec(spec_data, name="orphan"), owner="me", lease=1)
    assert await store.heartbeat("me", lease=600, job_ids=[running.id]) == 1
    assert (await store.get(running.id)).lease_expires_at > (await store.get(orphan.id)).lease_expires_at


async def test_retry_is_refused_once_a_teardown_exists(store, spec_data):
    from orchestrator.errors import UserError

    job = await store.submit(make_spec(spec_data))
    await store.cancel(job.id)
    await store.submit_teardown(job.id)
    with pytest.raises(UserError, match="has a teardown"):
        await store.retry(job.id)
