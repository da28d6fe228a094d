"""Leases on the database's clock: a daemon with a skewed clock takes no other daemon's jobs."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from orchestrator.config import DaemonSettings
from orchestrator.engine.daemon import Daemon
from orchestrator.engine.runner import Runner
from orchestrator.machine import JobState
from orchestrator.store.jobs import JobStore, utcnow
from tests.conftest import ids, make_spec


async def test_leases_on_postgresql_follow_the_databases_clock(pg_url, spec_data):
    honest = await JobStore.open(pg_url, auto_upgrade=True)
    # A daemon whose clock runs 10 minutes ahead: were leases computed from its clock, every
    # live lease would look lapsed to it.
    ahead = JobStore(honest.engine, clock=lambda: utcnow() + timedelta(minutes=10))
    try:
        job = await honest.submit(make_spec(spec_data))
        assert ids(await honest.claim_next("honest", limit=1, lease=30)) == [job.id]
        assert await ahead.claim_next("ahead", limit=5, lease=30) == []
        assert (await honest.get(job.id)).lease_owner == "honest"
        assert 590 < -(await ahead.clock_skew()) < 610
    finally:
        await ahead.writer.close()
        await honest.close()


async def test_a_daemon_whose_clock_is_off_says_so_and_takes_nothing_over(pg_url, spec_data):
    store = await JobStore.open(pg_url, auto_upgrade=True)
    skewed = JobStore(store.engine, clock=lambda: utcnow() + timedelta(seconds=20))
    try:
        lapsed = await store.submit(make_spec(spec_data, name="lapsed"))
        assert ids(await store.claim_next("gone", limit=1, lease=0.05)) == [lapsed.id]
        await asyncio.sleep(0.2)  # its lease lapses on the database's clock
        fresh = await store.submit(make_spec(spec_data, name="fresh"))
        daemon = Daemon(skewed, Runner(skewed, client=None, owner="skewed"),  # type: ignore[arg-type]
                        DaemonSettings(concurrency=5, claim_interval=0.05, lease_seconds=30),
                        url=str(store.engine.url))
        with structlog.testing.capture_logs() as logged:
            assert await daemon._clock_agrees(30) is False
        (said,) = [e for e in logged if e["event"] == "clock_skew"]
        assert 19 < -said["skew_seconds"] < 21 and said["log_level"] == "error"
        # Without takeovers it claims the new job only, never the lapsed one of another daemon.
        taken = await skewed.claim_next("skewed", limit=5, lease=30, takeover=False)
        assert ids(taken) == [fresh.id]
        assert (await store.get(lapsed.id)).lease_owner == "gone"
        assert (await store.get(lapsed.id)).state is JobState.RUNNING
    finally:
        await skewed.writer.close()
        await store.close()
