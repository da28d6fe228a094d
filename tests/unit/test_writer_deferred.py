"""The SQLite writer's deferred INSERTs (``Sql(defer=True)``: the events rows): held back and
inserted for the whole batch before COMMIT, yet every caller sees what it saw before.

Each test makes one batch on purpose: a first operation blocks the writer thread until the
others are queued behind it, so they all go in the next transaction, in the order queued.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from orchestrator.errors import StaleTransition
from orchestrator.machine import StepName, StepState
from orchestrator.store import ops
from orchestrator.store.jobs import JobStore
from orchestrator.store.writer import Sql
from tests.conftest import make_spec

OWNER = "deferred-test"


@pytest.fixture
async def store(db_url):
    opened = await JobStore.open(db_url, auto_upgrade=True)
    yield opened
    await opened.close()


async def one_batch(store: JobStore, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run ``calls`` (each queues one operation) in one batch of the writer; their outcomes."""
    entered, release = threading.Event(), threading.Event()

    def blocker(d: Any) -> Any:
        entered.set()
        release.wait(30)  # on the writer thread: what is queued meanwhile forms the next batch
        yield Sql("SELECT 1 AS one")

    before = store.writer.stats().batches
    first = asyncio.ensure_future(store.writer.run(blocker))
    assert await asyncio.to_thread(entered.wait, 30), "the writer never ran the blocker"
    tasks = [asyncio.ensure_future(call()) for call in calls]
    await asyncio.sleep(0)  # every call has queued its operation
    release.set()
    await first
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert store.writer.stats().batches - before == 2, "the calls did not share one batch"
    return results


async def running_jobs(store: JobStore, spec_data, n: int) -> list[str]:
    return await store.submit_many([make_spec(spec_data, name=f"d{i}") for i in range(n)], owner=OWNER, lease=600)


def intent() -> ops.StepMove:
    return ops.StepMove(StepName.WORKSPACE, StepState.PENDING, StepState.IN_FLIGHT, "intent")


async def details(store: JobStore, job_id: str) -> list[str]:
    return [e.detail for e in await store.events(job_id)]


async def test_the_events_of_a_batch_are_committed_with_it_in_order(store, spec_data):
    ids = await running_jobs(store, spec_data, 5)
    calls = [lambda job_id=job_id: store.commit(job_id, OWNER, [intent()]) for job_id in ids]
    calls.append(lambda: store.note(ids[0], "after the intent"))
    assert await one_batch(store, calls) == [None] * 6
    for job_id in ids:
        assert (await store.get(job_id)).steps[StepName.WORKSPACE].state is StepState.IN_FLIGHT
    assert (await details(store, ids[0]))[-2:] == ["intent", "after the intent"]
    assert (await details(store, ids[1]))[-1] == "intent"


async def test_a_failed_operation_leaves_none_of_its_held_rows(store, spec_data):
    ids = await running_jobs(store, spec_data, 3)

    def note_then_fail(d: Any) -> Any:
        done = yield Sql(ops._EVENT, {"job_id": ids[1], "at": store.clock(), "step": None, "src": None,
                                      "dst": None, "detail": "never"}, defer=True)
        assert done.rowcount == 1  # what it would have been, answered at once
        raise ValueError("this caller's own error")

    calls = [lambda: store.commit(ids[0], OWNER, [intent()]), lambda: store.writer.run(note_then_fail),
             lambda: store.commit(ids[2], OWNER, [intent()])]
    first, failed, last = await one_batch(store, calls)
    assert first is None and last is None
    assert isinstance(failed, ValueError)
    assert "never" not in await details(store, ids[1])
    assert (await details(store, ids[0]))[-1] == "intent" and (await details(store, ids[2]))[-1] == "intent"


async def test_a_lost_compare_and_set_still_fails_only_its_caller(store, spec_data):
    ids = await running_jobs(store, spec_data, 3)
    await store.commit(ids[1], OWNER, [intent()])  # a second intent is stale
    results = await one_batch(store, [lambda job_id=job_id: store.commit(job_id, OWNER, [intent()])
                                      for job_id in ids])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StaleTransition)
    assert (await details(store, ids[1])).count("intent") == 1


async def test_a_row_that_fails_to_insert_fails_only_its_caller(store, spec_data):
    """A held row that breaks a constraint (an event for a job that does not exist) is found
    only at the flush: the batch runs again without deferring, which fails only its caller."""
    ids = await running_jobs(store, spec_data, 2)
    calls = [lambda: store.commit(ids[0], OWNER, [intent()]), lambda: store.note("0" * 32, "no such job"),
             lambda: store.commit(ids[1], OWNER, [intent()])]
    first, missing, last = await one_batch(store, calls)
    assert first is None and last is None
    assert isinstance(missing, sa_exc.DBAPIError) and "FOREIGN KEY" in str(missing)
    for job_id in ids:  # committed once each: the run again did not log them twice
        assert (await details(store, job_id)).count("intent") == 1


async def test_a_statement_on_the_events_table_sees_the_held_rows(store, spec_data):
    ids = await running_jobs(store, spec_data, 1)
    logged = len(await details(store, ids[0]))

    def count_events(d: Any) -> Any:
        found = yield Sql("SELECT COUNT(*) AS n FROM events WHERE job_id = :job_id", {"job_id": ids[0]})
        return found.rows[0]["n"]

    calls = [lambda: store.commit(ids[0], OWNER, [intent()]), lambda: store.note(ids[0], "noted"),
             lambda: store.writer.run(count_events)]
    assert await one_batch(store, calls) == [None, None, logged + 2]


async def test_only_a_plain_insert_is_held(store, spec_data):
    """An INSERT whose rows may insert nothing (OR IGNORE) runs at once even if marked."""
    ids = await running_jobs(store, spec_data, 1)
    from orchestrator.store.schema import events

    async with store.engine.connect() as conn:
        (first_id,) = (await conn.execute(select(events.c.id).where(events.c.job_id == ids[0]))).first()

    def ignored(d: Any) -> Any:
        done = yield Sql("INSERT OR IGNORE INTO events (id, job_id, at, detail) VALUES (:id, :job_id, :at, 'dup')",
                         {"id": first_id, "job_id": ids[0], "at": store.clock()}, defer=True)
        return done.rowcount

    assert await one_batch(store, [lambda: store.writer.run(ignored)]) == [0]


async def test_a_row_failing_in_a_flush_before_a_read_fails_only_its_caller(store, spec_data):
    """The same when the held rows are inserted early, for a statement on their table that a
    later operation runs: that operation is not the one to fail."""
    ids = await running_jobs(store, spec_data, 1)
    logged = len(await details(store, ids[0]))

    def count_events(d: Any) -> Any:
        found = yield Sql("SELECT COUNT(*) AS n FROM events WHERE job_id = :job_id", {"job_id": ids[0]})
        return found.rows[0]["n"]

    calls = [lambda: store.commit(ids[0], OWNER, [intent()]), lambda: store.note("0" * 32, "no such job"),
             lambda: store.writer.run(count_events)]
    done, missing, counted = await one_batch(store, calls)
    assert done is None and isinstance(missing, sa_exc.DBAPIError)
    assert counted == logged + 1
