"""SharedPoller: one GET per resource per interval, however many jobs wait on it."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.engine.poller import SharedPoller


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """Counts calls; each call blocks until ``release`` is set, then returns the next value."""

    def __init__(self, *, block: bool = True, error: BaseException | None = None) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        if not block:
            self.release.set()
        self.error = error
        self.started = asyncio.Event()
        self.finished = 0

    async def __call__(self) -> str:
        self.calls += 1
        n = self.calls
        self.started.set()
        await self.release.wait()
        self.finished += 1
        if self.error is not None:
            raise self.error
        return f"status-{n}"


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def poller(clock: Clock) -> SharedPoller:
    return SharedPoller(min_interval=5.0, clock=clock)


async def test_concurrent_reads_share_one_fetch(poller):
    fetch = Fetcher()
    waiters = [asyncio.create_task(poller.read(("endpoint", "e1"), fetch)) for _ in range(50)]
    await fetch.started.wait()
    await _settle()
    assert fetch.calls == 1
    fetch.release.set()
    results = await asyncio.gather(*waiters)
    assert results == ["status-1"] * 50
    assert fetch.calls == 1


async def test_read_within_min_interval_is_cached(poller, clock):
    fetch = Fetcher(block=False)
    assert await poller.read("k", fetch) == "status-1"
    clock.now += 4.9
    assert await poller.read("k", fetch) == "status-1"
    assert fetch.calls == 1


async def test_read_after_min_interval_fetches_again(poller, clock):
    fetch = Fetcher(block=False)
    assert await poller.read("k", fetch) == "status-1"
    clock.now += 5.0
    assert await poller.read("k", fetch) == "status-2"
    assert fetch.calls == 2
    clock.now += 1.0
    assert await poller.read("k", fetch) == "status-2"
    assert fetch.calls == 2


async def test_cache_age_counts_from_when_the_fetch_finished(poller, clock):
    fetch = Fetcher()
    task = asyncio.create_task(poller.read("k", fetch))
    await fetch.started.wait()
    clock.now += 10.0  # a slow GET
    fetch.release.set()
    assert await task == "status-1"
    clock.now += 4.0
    assert await poller.read("k", fetch) == "status-1"
    assert fetch.calls == 1


async def test_zero_interval_always_fetches(clock):
    poller = SharedPoller(min_interval=0.0, clock=clock)
    fetch = Fetcher(block=False)
    assert [await poller.read("k", fetch) for _ in range(3)] == ["status-1", "status-2", "status-3"]


async def test_different_keys_fetch_separately(poller):
    a, b = Fetcher(), Fetcher()
    ta = [asyncio.create_task(poller.read(("endpoint", "a"), a)) for _ in range(5)]
    tb = [asyncio.create_task(poller.read(("endpoint", "b"), b)) for _ in range(5)]
    await a.started.wait()
    await b.started.wait()
    assert (a.calls, b.calls) == (1, 1)
    b.release.set()
    assert await asyncio.gather(*tb) == ["status-1"] * 5
    assert not any(t.done() for t in ta)  # a's read is independent of b's
    a.release.set()
    assert await asyncio.gather(*ta) == ["status-1"] * 5


async def test_same_id_different_kind_is_a_different_key(poller):
    e, s = Fetcher(block=False), Fetcher(block=False)
    await poller.read(("endpoint", "x"), e)
    await poller.read(("service_instance", "x"), s)
    assert (e.calls, s.calls) == (1, 1)


async def test_error_reaches_every_waiter_and_is_not_cached(poller):
    boom = RuntimeError("503 from Fabric")
    fetch = Fetcher(error=boom)
    waiters = [asyncio.create_task(poller.read("k", fetch)) for _ in range(10)]
    await fetch.started.wait()
    fetch.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(r is boom for r in results)
    assert fetch.calls == 1

    # Not cached: the next read, even within min_interval, fetches again.
    fetch.error = None
    assert await poller.read("k", fetch) == "status-2"
    assert fetch.calls == 2


async def test_error_does_not_evict_or_replace_an_older_value(poller, clock):
    fetch = Fetcher(block=False)
    assert await poller.read("k", fetch) == "status-1"
    clock.now += 6.0
    fetch.error = RuntimeError("transient")
    with pytest.raises(RuntimeError, match="transient"):
        await poller.read("k", fetch)
    fetch.error = None
    assert await poller.read("k", fetch) == "status-3"


async def test_cancelling_one_waiter_does_not_cancel_the_shared_fetch(poller):
    fetch = Fetcher()
    waiters = [asyncio.create_task(poller.read("k", fetch)) for _ in range(3)]
    await fetch.started.wait()
    waiters[0].cancel()
    await _settle()
    assert waiters[0].cancelled()
    fetch.release.set()
    assert await asyncio.gather(*waiters[1:]) == ["status-1", "status-1"]
    assert fetch.calls == 1 and fetch.finished == 1


async def test_fetch_survives_when_every_waiter_is_cancelled(poller):
    fetch = Fetcher()
    waiters = [asyncio.create_task(poller.read("k", fetch)) for _ in range(3)]
    await fetch.started.wait()
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    fetch.release.set()
    await _settle()
    assert fetch.finished == 1
    # The result the abandoned fetch got is served from cache.
    assert await poller.read("k", fetch) == "status-1"
    assert fetch.calls == 1


async def test_abandoned_failing_fetch_leaves_no_unretrieved_exception(poller):
    # filterwarnings=error would turn "Future exception was never retrieved" into a failure.
    fetch = Fetcher(error=ValueError("lost"))
    waiter = asyncio.create_task(poller.read("k", fetch))
    await fetch.started.wait()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    fetch.release.set()
    await _settle()
    assert fetch.finished == 1
    fetch.error = None
    assert await poller.read("k", fetch) == "status-2"


async def test_late_reader_joins_the_read_in_flight(poller):
    fetch = Fetcher()
    first = asyncio.create_task(poller.read("k", fetch))
    await fetch.started.wait()
    second = asyncio.create_task(poller.read("k", fetch))
    await _settle()
    fetch.release.set()
    assert await asyncio.gather(first, second) == ["status-1", "status-1"]
    assert fetch.calls == 1


async def test_forget_drops_the_cached_value(poller):
    fetch = Fetcher(block=False)
    await poller.read("k", fetch)
    poller.forget("k")
    assert await poller.read("k", fetch) == "status-2"
    poller.forget("never-seen")  # no error


async def test_no_leftover_inflight_entries(poller):
    ok, bad = Fetcher(block=False), Fetcher(block=False, error=KeyError("x"))
    await poller.read("a", ok)
    with pytest.raises(KeyError):
        await poller.read("b", bad)
    assert poller._inflight == {}
