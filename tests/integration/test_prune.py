"""`fabricflow db prune`, on real SQLite files and the real PostgreSQL server: exactly the old
finished jobs' rows go (counted in every table), never an unfinished job, never a job whose
teardown stays; the registry rows of daemons long gone; bad durations and missing databases."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store import ops
from tests.conftest import make_spec
from tests.integration.clocked import Clock, clocked_store, finished, register
from tests.integration.test_cli import _structlog_reset  # noqa: F401 - autouse fixture

TABLES = ("jobs", "steps", "events", "invocations", "daemons")
ERROR = {"code": "X.1", "message": "no", "request_id": None}


def prune(url: str, *args: str):
    return CliRunner().invoke(main, ["db", "prune", *args, "--db", url], catch_exceptions=False)


async def populate(url: str, spec_data) -> dict[str, str]:
    """Jobs and daemons 40 days old and one day old, finished and not, with and without
    resources and teardowns."""
    clock = Clock()
    ids: dict[str, str] = {}

    def spec(name: str):
        return make_spec(spec_data, name=name)

    async def torn_down(parent: str, state: JobState, name: str) -> None:
        ids[name] = (await store.submit_teardown(ids[parent])).id
        await store.claim(ids[name], "runner", lease=30)
        await store.finish(ids[name], "runner", state, detail="ended", error=None if state is JobState.SUCCEEDED
                           else ERROR)

    async with clocked_store(url, clock) as store:
        clock.ago(days=40)
        # Its workspace was never torn down: the row is the only record of it.
        ids["old_ok"] = await finished(store, spec("old_ok"), JobState.SUCCEEDED)
        # Torn down, so neither row is needed any more.
        ids["old_torn"] = await finished(store, spec("old_torn"), JobState.SUCCEEDED)
        await store.record_invocation(ids["old_torn"], service_instance_id="si-1", request={"messages": []},
                                      reply="hi", finish_reason="stop", usage={"total_tokens": 3})
        await torn_down("old_torn", JobState.SUCCEEDED, "teardown_torn")
        ids["old_failed"] = await finished(store, spec("old_failed"), JobState.FAILED, error=ERROR)  # made nothing
        # Failed with a create IN_FLIGHT: a resource may exist that no step recorded.
        ids["old_poison"] = (await store.submit(spec("old_poison"))).id
        await store.claim(ids["old_poison"], "runner", lease=30)
        await store.finish(ids["old_poison"], "runner", JobState.FAILED, detail="poison", error=ERROR, moves=[
            ops.StepMove(StepName.WORKSPACE, StepState.PENDING, StepState.IN_FLIGHT, "creating",
                         {"request_name": "ws"})])
        ids["old_cancelled"] = (await store.submit(spec("old_cancelled"))).id
        await store.cancel(ids["old_cancelled"])
        ids["old_pending"] = (await store.submit(spec("old_pending"))).id
        ids["old_running"] = (await store.submit(spec("old_running"))).id
        await store.claim(ids["old_running"], "runner", lease=30)
        # A parent whose teardown has not run yet: the teardown reads its steps.
        ids["parent_busy"] = await finished(store, spec("parent_busy"), JobState.SUCCEEDED)
        ids["teardown_busy"] = (await store.submit_teardown(ids["parent_busy"])).id
        # A teardown that failed: it goes, its parent (whose resources may remain) stays.
        ids["parent_done"] = await finished(store, spec("parent_done"), JobState.SUCCEEDED)
        await torn_down("parent_done", JobState.FAILED, "teardown_done")
        # A parent whose teardown finished yesterday: the teardown stays, so its parent does.
        ids["parent_kept"] = await finished(store, spec("parent_kept"), JobState.SUCCEEDED)
        await register(store, "old-stopped")
        await store.writer.run(ops.daemon_stopped("old-stopped"))
        await register(store, "old-crashed")
        clock.ago(days=1)
        await torn_down("parent_kept", JobState.SUCCEEDED, "teardown_young")
        ids["young_ok"] = await finished(store, spec("young_ok"), JobState.SUCCEEDED)
        await register(store, "young-stopped")
        await store.writer.run(ops.daemon_stopped("young-stopped"))
        clock.now()
        await register(store, "alive")
    return ids


GONE = ("old_torn", "teardown_torn", "old_failed", "old_cancelled", "teardown_done")
OWNING = ("old_ok", "old_poison", "parent_done")  # kept unless --with-resources
KEPT = ("parent_busy", "parent_kept")  # old and finished, but a teardown that stays refers to them
LEFT = ["old_ok", "old_poison", "parent_done", "old_pending", "old_running", "parent_busy", "parent_kept",
        "young_ok", "teardown of parent_busy", "teardown of parent_kept"]


def counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}


def rows_of(path: Path, job_ids: list[str]) -> dict[str, int]:
    marks = ", ".join("?" * len(job_ids))
    with sqlite3.connect(path) as conn:
        found = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE job_id IN ({marks})", job_ids).fetchone()[0]
                 for t in ("steps", "events", "invocations")}
    return {"jobs": len(job_ids), **found}


def test_prune_removes_exactly_the_old_finished_jobs_rows(tmp_path, spec_data):
    path = tmp_path / "jobs.db"
    url = f"sqlite:///{path}"
    ids = asyncio.run(populate(url, spec_data))
    gone = [ids[n] for n in GONE]
    before = counts(path)
    expected_rows = rows_of(path, gone)
    assert expected_rows["invocations"] == 1 and expected_rows["events"] > 10

    dry = prune(url, "--older-than", "30d", "--dry-run", "--json")

    assert dry.exit_code == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True and plan["older_than"] == "30d"
    # Teardowns first: a prune cut short never leaves a teardown whose parent is gone.
    assert set(plan["jobs"][:2]) == {ids["teardown_torn"], ids["teardown_done"]}
    assert sorted(plan["jobs"]) == sorted(gone)
    assert plan["rows"] == expected_rows
    assert plan["daemons"] == 2
    assert plan["kept"] == {"for_teardown": sorted(ids[n] for n in KEPT),
                            "with_resources": sorted(ids[n] for n in OWNING)}
    assert counts(path) == before  # nothing removed

    done = prune(url, "--older-than", "30d", "--json")

    assert done.exit_code == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["dry_run"] is False
    assert sorted(outcome["jobs"]) == sorted(gone)
    assert outcome["rows"] == expected_rows and outcome["daemons"] == 2
    after = counts(path)
    assert after == {t: before[t] - expected_rows.get(t, 0) for t in TABLES} | {"daemons": before["daemons"] - 2}
    with sqlite3.connect(path) as conn:
        left = {name: (state, parent) for name, state, parent in conn.execute("SELECT name, state, parent_id FROM jobs")}
        daemons = sorted(o for (o,) in conn.execute("SELECT owner FROM daemons"))
        for table in ("steps", "events", "invocations"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table} WHERE job_id NOT IN (SELECT id FROM jobs)"
                                ).fetchone()[0] == 0, table
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert sorted(left) == sorted(LEFT)
    assert left["old_pending"][0] == "PENDING" and left["old_running"][0] == "RUNNING"
    assert left["teardown of parent_busy"] == ("PENDING", ids["parent_busy"])  # still knows what to delete
    assert left["teardown of parent_kept"] == ("SUCCEEDED", ids["parent_kept"])
    assert daemons == ["alive", "young-stopped"]

    again = prune(url, "--older-than", "30d")
    assert again.exit_code == 0
    lines = again.stdout.splitlines()
    assert lines[0].startswith("removed 0 finished jobs (finished before ")
    short = {group: ", ".join(ids[n][:8] for n in sorted(names, key=lambda n: ids[n]))
             for group, names in (("owning", OWNING), ("kept", KEPT))}
    assert lines[1:] == [
        (f"kept 3 old finished jobs whose resources were never torn down ({short['owning']}): "
         "`fabricflow teardown JOB` first, or --with-resources to forget them anyway"),
        f"kept 2 old finished jobs that a younger or unfinished teardown refers to ({short['kept']})"]
    assert counts(path) == after

    forced = json.loads(prune(url, "--older-than", "30d", "--with-resources", "--json").stdout)
    assert sorted(forced["jobs"]) == sorted(ids[n] for n in OWNING)
    assert forced["kept"] == {"for_teardown": sorted(ids[n] for n in KEPT), "with_resources": []}
    with sqlite3.connect(path) as conn:
        assert sorted(n for (n,) in conn.execute("SELECT name FROM jobs")) == sorted(
            n for n in LEFT if n not in OWNING)


def test_prune_says_what_it_removes_in_words(tmp_path, spec_data):
    path = tmp_path / "jobs.db"
    url = f"sqlite:///{path}"
    ids = asyncio.run(populate(url, spec_data))
    rows = rows_of(path, [ids[n] for n in GONE])

    result = prune(url, "--older-than", "30d", "--dry-run")

    assert result.exit_code == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("would remove 5 finished jobs (finished before ")
    assert first.endswith(f", over 30d ago) with {rows['steps']} steps, {rows['events']} events and 1 invocation; "
                          "2 daemons from the registry")


def test_a_job_retried_after_the_plan_is_not_pruned(tmp_path, spec_data):
    path = tmp_path / "jobs.db"
    url = f"sqlite:///{path}"

    async def go() -> tuple[list[str], str]:
        clock = Clock()
        async with clocked_store(url, clock) as store:
            clock.ago(days=40)
            failed = await finished(store, make_spec(spec_data, name="f"), JobState.FAILED, error=ERROR)
            clock.now()
            before = datetime.now(UTC) - timedelta(days=30)
            plan = await store.writer.run(ops.prune_plan(before=before, at=datetime.now(UTC)))
            assert plan.job_ids == [failed]
            await store.retry(failed)  # between the plan and the delete
            removed, rows = await store.writer.run(ops.prune_jobs(plan.job_ids, before=before))
            assert rows == {"jobs": 0, "events": 0, "invocations": 0, "steps": 0}
            return removed, failed

    removed, failed = asyncio.run(go())
    assert removed == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT state FROM jobs WHERE id = ?", (failed,)).fetchall() == [("PENDING",)]


@pytest.mark.parametrize(("given", "seconds", "shown"), [
    ("30d", 30 * 86400, "30d"), ("12h", 12 * 3600, "12h"), ("90m", 90 * 60, "90m"), ("45s", 45, "45s"),
    ("2w", 14 * 86400, "2w"), ("1.5h", 5400, "90m"), (" 7d ", 7 * 86400, "1w"),
])
def test_durations(tmp_path, given, seconds, shown):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    assert CliRunner().invoke(main, ["db", "upgrade", "--db", url]).exit_code == 0
    started = datetime.now(UTC)

    result = prune(url, "--older-than", given, "--dry-run", "--json")

    assert result.exit_code == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["older_than"] == shown
    cutoff = datetime.fromisoformat(outcome["before"])
    assert started - timedelta(seconds=seconds) <= cutoff <= datetime.now(UTC) - timedelta(seconds=seconds)


@pytest.mark.parametrize("given", ["30", "3x", "-1d", "", "d", "30 days"])
def test_a_bad_duration_exits_2_and_touches_nothing(tmp_path, given):
    path = tmp_path / "jobs.db"
    result = prune(f"sqlite:///{path}", "--older-than", given)
    assert result.exit_code == 2
    assert result.stderr.endswith(f"Error: Invalid value for '--older-than': {given!r} is not a duration; use a "
                                  "number and a unit: 30d, 12h, 90m, 45s or 2w\n")
    assert not path.exists()


def test_older_than_is_required_and_the_help_says_what_is_kept():
    missing = CliRunner().invoke(main, ["db", "prune"])
    assert missing.exit_code == 2 and "Missing option '--older-than'" in missing.stderr
    shown = CliRunner().invoke(main, ["db", "prune", "--help"]).stdout
    for words in ("SUCCEEDED, FAILED, CANCELLED", "PENDING or RUNNING never does", "--with-resources", "--dry-run",
                  "30d, 12h, 90m"):
        assert words in " ".join(shown.split()), words


async def test_prune_on_postgresql(pg_url, spec_data):
    ids = await populate(pg_url, spec_data)
    conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        async def count() -> dict[str, int]:
            return {t: await conn.fetchval(f"SELECT COUNT(*) FROM {t}") for t in TABLES}

        # The registry writes with the server's clock: age its old rows as 40 days would have.
        await conn.execute("UPDATE daemons SET started_at = now() - interval '40 days', heartbeat_at = now() - "
                           "interval '40 days', stopped_at = CASE WHEN stopped_at IS NULL THEN NULL ELSE now() - "
                           "interval '40 days' END WHERE owner LIKE 'old-%'")
        gone = [ids[n] for n in GONE]
        per_job = {t: await conn.fetchval(f"SELECT COUNT(*) FROM {t} WHERE job_id = ANY($1)", gone)
                   for t in ("steps", "events", "invocations")}
        before = await count()

        result = await asyncio.to_thread(prune, pg_url, "--older-than", "30d", "--json")

        assert result.exit_code == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert sorted(outcome["jobs"]) == sorted(gone)
        assert outcome["rows"] == {"jobs": len(gone), **per_job}
        assert outcome["kept"]["for_teardown"] == sorted(ids[n] for n in KEPT) and outcome["daemons"] == 2
        after = await count()
        assert after == {"jobs": before["jobs"] - len(gone), **{t: before[t] - per_job[t] for t in per_job},
                         "daemons": before["daemons"] - 2}
        left = {r["name"]: r["parent_id"] for r in await conn.fetch("SELECT name, parent_id FROM jobs")}
        assert sorted(left) == sorted(LEFT)
        assert left["teardown of parent_busy"] == ids["parent_busy"]
        assert sorted(r["owner"] for r in await conn.fetch("SELECT owner FROM daemons")) == ["alive", "young-stopped"]
    finally:
        await conn.close()
