"""The store on a real PostgreSQL server: concurrent claims, lease fencing, LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.errors import StaleTransition, UserError
from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store.jobs import JobStore
from tests.conftest import ids, make_spec


@pytest.fixture
async def pg_store(pg_url):
    store = await JobStore.open(pg_url, auto_upgrade=True)
    yield store
    await store.close()


async def test_unmigrated_postgres_says_what_to_run(pg_url):
    with pytest.raises(UserError) as err:
        await JobStore.open(pg_url)  # no automatic upgrade on a shared database
    assert "fabricflow db upgrade --db 'postgresql+asyncpg://" in str(err.value)


async def test_concurrent_claims_never_share_a_job(pg_store, pg_url, spec_data):
    for i in range(30):
        await pg_store.submit(make_spec(spec_data, name=f"job{i}"))
    others = [await JobStore.open(pg_url) for _ in range(3)]
    try:
        claims = await asyncio.gather(*(
            s.claim_next(f"owner{i}", limit=12, lease=30) for i, s in enumerate(others)))
    finally:
        for s in others:
            await s.close()
    claimed = [job.id for batch in claims for job in batch]
    assert len(claimed) == len(set(claimed)) == 30
    assert await pg_store.count(state=JobState.RUNNING) == 30


async def test_stale_owner_cannot_move_a_reclaimed_job(pg_store, spec_data):
    job = await pg_store.submit(make_spec(spec_data))
    assert ids(await pg_store.claim_next("old", limit=1, lease=0.01)) == [job.id]
    await asyncio.sleep(0.05)  # the lease expires
    assert ids(await pg_store.claim_next("new", limit=1, lease=30)) == [job.id]
    with pytest.raises(StaleTransition):
        await pg_store.move_step(job.id, "old", StepName.WORKSPACE, expected=StepState.PENDING,
                                 to=StepState.IN_FLIGHT, detail="late write")
    await pg_store.move_step(job.id, "new", StepName.WORKSPACE, expected=StepState.PENDING,
                             to=StepState.IN_FLIGHT, detail="intent", request_name="ws")
    recovered = await pg_store.get(job.id)
    assert recovered.lease_owner == "new"
    assert recovered.steps[StepName.WORKSPACE].state is StepState.IN_FLIGHT


async def test_submit_notifies_listening_daemons(pg_store, spec_data):
    woke = asyncio.Event()
    async with pg_store.listen(woke.set):
        await pg_store.submit(make_spec(spec_data))
        await asyncio.wait_for(woke.wait(), timeout=5)

