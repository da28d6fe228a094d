"""`fabricflow orphans`: a real emulator on 127.0.0.1, a real SQLite file, the command in-process.

The command runs in a worker thread (it starts its own event loop) while the emulator serves
from the test's loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import structlog
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.domain import ownership_marker
from orchestrator.errors import TerminalError
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import JobState, ResourceKind, StepName
from orchestrator.orphans import Records, judge
from tests.conftest import make_spec, until
from tests.integration.test_engine import run_job, stats

#: A marker's job part that no job of these tests has (job IDs are random uuid4 hex).
STRANGER = "0123456789abcdef"
NOT_HERE = f"job {STRANGER} is not in this database"


@pytest.fixture(autouse=True)
def _structlog_reset():
    """The CLI configures structlog for the process; undo it for the tests that follow."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRICFLOW_POLL__INITIAL", "0.05")
    monkeypatch.setenv("FABRICFLOW_POLL__MAX", "0.2")
    monkeypatch.setenv("FABRICFLOW_RETRY__BACKOFF_BASE", "0.05")


async def orphans(db_url: str, url: str | None, *args: str) -> Any:
    """`fabricflow orphans ARGS --db DB [--fabric-url URL]`, as a user types it."""
    argv = ["orphans", *args, "--db", db_url, *(["--fabric-url", url] if url else [])]
    return await asyncio.to_thread(CliRunner().invoke, main, argv, catch_exceptions=False)


def entry(kind: str, res_id: str, name: str, workspace_id: str | None, prefix: str, reason: str) -> dict[str, Any]:
    return {"kind": kind, "id": res_id, "name": name, "workspace_id": workspace_id,
            "job_id_prefix": prefix, "reason": reason}


async def endpoint_status(client: FabricClient, ws: str, endpoint_id: str) -> str | None:
    try:
        return (await client.show_endpoint(ws, endpoint_id)).status
    except TerminalError as exc:
        assert exc.status == 404
        return None


async def world(store, url: str, spec_data: dict[str, Any]) -> dict[str, Any]:
    """A job run to SUCCEEDED, then beside it: a duplicate endpoint with its marker, a workspace
    with the marker of a job this database does not know, a user's endpoint without a marker,
    and a workspace with the marker of a job submitted but never run."""
    spec = make_spec(spec_data, workspace={"name": "orphanws", "description": "apie test workspace"})
    job = await run_job(store, url, spec)
    assert job.state is JobState.SUCCEEDED, job.error
    waiting = await store.submit(make_spec(spec_data, workspace={"name": "laterws"}))
    ws = job.resource_id(StepName.WORKSPACE)
    async with FabricClient(url) as client:
        duplicate = await client.create_endpoint(ws, {
            "name": "apie_test", "type": "inference", "description": f"apie test endpoint {ownership_marker(job.id)}"})
        stranger = await client.create_workspace({"name": "strayws", "description": f"x [fabricflow:{STRANGER}]"})
        users = await client.create_endpoint(ws, {"name": "users_own", "type": "inference", "description": "mine"})
        in_progress = await client.create_workspace({"name": "laterws",
                                                     "description": f"y {ownership_marker(waiting.id)}"})
    return {"job": job, "waiting": waiting, "ws": ws, "duplicate": duplicate.id, "stranger": stranger.id,
            "users": users.id, "in_progress": in_progress.id}


async def test_dry_run_lists_exactly_the_orphans_and_deletes_nothing(store, db_url, emulator, spec_data):
    w = await world(store, emulator.url, spec_data)
    job = w["job"]
    before = (await stats(emulator.url))["live"]

    result = await orphans(db_url, emulator.url, "--json")

    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {
        "orphans": [
            entry("endpoint", w["duplicate"], "apie_test", w["ws"], job.id[:16],
                  f"duplicate: job {job.id[:8]} records {job.resource_id(StepName.ENDPOINT)} instead"),
            entry("workspace", w["stranger"], "strayws", None, STRANGER, NOT_HERE),
        ],
        "skipped": [
            entry("workspace", w["in_progress"], "laterws", None, w["waiting"].id[:16],
                  f"job {w['waiting'].id[:8]} is PENDING: its create may still be awaiting its recording"),
        ],
        "deleted": [],
        "failed": [],
    }
    assert "another fabricflow database" in result.stderr
    assert (await stats(emulator.url))["live"] == before

    table = await orphans(db_url, emulator.url)
    assert table.exit_code == 0, table.stderr
    listed = [line.split()[1] for line in table.stdout.splitlines() if line.startswith("  ")]
    assert listed == [w["duplicate"], w["stranger"], w["in_progress"]]  # the last one as skipped
    assert "dry run: nothing was deleted" in table.stdout and "--delete" in table.stdout
    assert (await stats(emulator.url))["live"] == before


async def test_dry_run_on_postgresql(pg_url, emulator, spec_data):
    from orchestrator.store.jobs import JobStore

    store = await JobStore.open(pg_url, auto_upgrade=True)
    try:
        w = await world(store, emulator.url, spec_data)
    finally:
        await store.close()

    result = await orphans(pg_url, emulator.url, "--json")

    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    assert [o["id"] for o in found["orphans"]] == [w["duplicate"], w["stranger"]]
    assert [o["id"] for o in found["skipped"]] == [w["in_progress"]]


async def test_delete_removes_exactly_the_orphans(store, db_url, emulator, spec_data):
    w = await world(store, emulator.url, spec_data)
    job = w["job"]
    before = (await stats(emulator.url))["live"]

    result = await orphans(db_url, emulator.url, "--delete")

    assert result.exit_code == 0, result.stderr
    deleted = [line for line in result.stdout.splitlines() if line.startswith("deleted ")]
    assert deleted == [f"deleted endpoint {w['duplicate']} 'apie_test' in workspace {w['ws']}",
                       f"deleted workspace {w['stranger']} 'strayws'"]
    after = (await stats(emulator.url))["live"]
    assert after == {**before, "endpoint": before["endpoint"] - 1, "workspace": before["workspace"] - 1}
    async with FabricClient(emulator.url) as client:
        assert await endpoint_status(client, w["ws"], w["duplicate"]) is None  # 404: gone
        assert await client.get_workspace(w["stranger"]) is None
        # What the job records, the user's own endpoint and the unfinished job's workspace stay.
        assert await endpoint_status(client, w["ws"], job.resource_id(StepName.ENDPOINT)) == "RUNNING"
        instance = await client.show_service_instance(w["ws"], job.resource_id(StepName.SERVICE_INSTANCE))
        assert instance.status == "RUNNING"
        assert await client.get_model(w["ws"], job.resource_id(StepName.MODEL)) is not None
        assert await endpoint_status(client, w["ws"], w["users"]) == "RUNNING"
        assert await client.get_workspace(w["in_progress"]) is not None

    again = json.loads((await orphans(db_url, emulator.url, "--json")).stdout)
    assert again["orphans"] == [] and [s["id"] for s in again["skipped"]] == [w["in_progress"]]


async def test_delete_goes_in_dependency_order_and_keeps_what_holds_others(store, db_url, emulator, spec_data):
    """An unknown job's workspace with an endpoint, a model and an instance on them: the
    instance goes first, the workspace last (the emulator refuses any other order). An orphan
    workspace holding a user's endpoint stays."""
    await run_job(store, emulator.url, make_spec(spec_data, workspace={"name": "keptjob"}))
    marker = f"[fabricflow:{STRANGER}]"
    async with FabricClient(emulator.url) as client:
        ws = (await client.create_workspace({"name": "lostws", "description": marker})).id
        ep = (await client.create_endpoint(ws, {"name": "lost_ep", "type": "inference", "description": marker})).id
        model = await client.create_model(ws, {**spec_data["model"], "name": "lost_model", "description": marker})
        await until(lambda: endpoint_status(client, ws, ep), lambda status: status == "RUNNING")
        instance = (await client.create_service_instance(ws, {
            "name": "lost_instance", "description": marker, "endpoint_id": ep,
            "source": {"id": model.id, "version_id": model.version_id}})).id
        held = (await client.create_workspace({"name": "sharedws", "description": marker})).id
        mine = (await client.create_endpoint(held, {"name": "mine", "type": "inference", "description": "mine"})).id
    before = (await stats(emulator.url))["live"]

    result = await orphans(db_url, emulator.url, "--delete", "--json")

    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert [(o["kind"], o["id"]) for o in out["deleted"]] == [
        ("service_instance", instance), ("model", model.id), ("endpoint", ep), ("workspace", ws)]
    assert out["failed"] == []
    assert out["skipped"] == [entry("workspace", held, "sharedws", None, STRANGER,
                                    f"{NOT_HERE}; kept: it holds endpoint {mine}, not an orphan")]
    after = (await stats(emulator.url))["live"]
    assert after == {"workspace": before["workspace"] - 1, "endpoint": before["endpoint"] - 1,
                     "model": before["model"] - 1, "service_instance": before["service_instance"] - 1}
    async with FabricClient(emulator.url) as client:
        assert await client.get_workspace(held) is not None
        assert await endpoint_status(client, held, mine) == "RUNNING"


async def test_a_delete_that_does_not_finish_is_reported_and_the_rest_go_on(store, db_url, emulator_factory,
                                                                            spec_data):
    emu = await emulator_factory(ready_after=0.1, instance_ready_after=0.1, delete_after=3600)
    w = await world(store, emu.url, spec_data)

    result = await orphans(db_url, emu.url, "--delete", "--timeout", "1s", "--json")

    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert [(o["id"], o["error"]) for o in out["failed"]] == [(w["duplicate"], "still DELETING after 1s")]
    assert [o["id"] for o in out["deleted"]] == [w["stranger"]]
    assert f"error: could not delete endpoint {w['duplicate']} 'apie_test': still DELETING after 1s" in result.stderr
    assert "waiting until 1 deleted resource(s) are gone" in result.stderr


async def test_missing_database_is_exit_3_and_creates_nothing(tmp_path, emulator):
    path = tmp_path / "none.db"

    result = await orphans(f"sqlite+aiosqlite:///{path}", emulator.url)

    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"error: no database at {path}; after a lost database, `fabricflow db upgrade --db sqlite+aiosqlite:///{path}` "
        "makes an empty one, against which every marked resource is listed as an orphan (another database may "
        "still own some: check before --delete)")
    assert not path.exists()
    assert (await stats(emulator.url))["requests"] == 0


async def test_embedded_emulator_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "none.db"

    result = await orphans(f"sqlite+aiosqlite:///{path}", None)

    assert result.exit_code == 2
    assert "embedded emulator" in result.stderr and "--fabric-url" in result.stderr
    assert not path.exists()


async def test_deletes_are_retried_as_a_steps_are_and_give_up_saying_so(emulator):
    """A delete met by 503s is sent again (stamina as in production, with tiny waits) up to the
    engine's limit, counted by the emulator; one that still fails is reported and named so."""
    import stamina

    from orchestrator.orphans import DeleteSettings, Deletion, Orphan, delete_orphans
    from tests.integration.test_engine import faults

    stamina.set_testing(False)  # the autouse fixture's is restored after the test
    async with FabricClient(emulator.url) as client:
        made = [await client.create_workspace({"name": name, "description": f"x [fabricflow:{STRANGER}]"})
                for name in ("lostws-one", "lostws-two")]
    found = [Orphan(ResourceKind.WORKSPACE, ws.id, ws.name, None, STRANGER, NOT_HERE) for ws in made]
    settings = DeleteSettings(timeout=30, poll_initial=0.01, poll_max=0.05, attempts=4, backoff_base=0.001,
                              backoff_cap=0.002)
    events = []

    await faults(emulator.url, fail_next=3, status=503)
    async with FabricClient(emulator.url) as client:
        assert await delete_orphans(client, found[:1], events.append, settings) == [Deletion(found[0])]
    assert (await stats(emulator.url))["operations"]["delete_workspace"] == 4  # 3 refused, then done

    await faults(emulator.url, fail_next=1000, status=503)
    async with FabricClient(emulator.url) as client:
        done = await delete_orphans(client, found[1:], events.append, settings)
    message = ("gave up after 4 attempts: delete workspace: HTTP 503 APIGW.0503: Service unavailable "
               "(injected by the emulator)")
    assert done == [Deletion(found[1], message)]
    assert (await stats(emulator.url))["operations"]["delete_workspace"] == 4 + 4
    assert [(e.what, e.detail) for e in events if e.what != "waiting"] == [("deleted", "gone"), ("failed", message)]


def test_help_teaches_markers_and_the_dry_run():
    text = CliRunner().invoke(main, ["orphans", "--help"]).stdout
    assert "[fabricflow:" in text and "dry run by default" in text and "--delete" in text


# --- judging against the database, without Fabric ---------------------------------------------

CREATE_ID = "5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d"
TEARDOWN_ID = "ffffffffffffffffffffffffffffffff"


def records(job_state: str, step_state: str, teardown_state: str | None = None) -> Records:
    jobs = [{"id": CREATE_ID, "kind": "create", "state": job_state, "parent_id": None}]
    steps = [{"job_id": CREATE_ID, "name": "workspace", "state": "SUCCEEDED", "resource_id": "ws-1", "extra": None},
             {"job_id": CREATE_ID, "name": "endpoint", "state": step_state, "resource_id": None, "extra": None}]
    if teardown_state:
        jobs.append({"id": TEARDOWN_ID, "kind": "teardown", "state": teardown_state, "parent_id": CREATE_ID})
        steps.append({"job_id": TEARDOWN_ID, "name": "workspace", "state": "SUCCEEDED", "resource_id": "ws-1",
                      "extra": json.dumps({"targets": ["ws-1", "ws-2"]})})
    return Records.from_rows(jobs, steps)


def test_judging_a_marked_resource():
    ep = ResourceKind.ENDPOINT
    # A job that ended with a create whose answer it never recorded: left to retry/teardown.
    skipped, prefix, reason = judge(ep, "ep-9", [CREATE_ID[:16]], records("FAILED", "IN_FLIGHT"))
    assert skipped and prefix == CREATE_ID[:16]
    assert reason.startswith("job 5a6b7c8d ended FAILED with step endpoint IN_FLIGHT")
    # Its teardown has finished: what is left is an orphan. A teardown's targets count as recorded.
    done = records("FAILED", "IN_FLIGHT", teardown_state="SUCCEEDED")
    assert judge(ep, "ep-9", [CREATE_ID[:16]], done) == (False, CREATE_ID[:16], "not recorded by job 5a6b7c8d")
    assert judge(ResourceKind.WORKSPACE, "ws-2", [CREATE_ID[:16]], done) is None
    # A teardown under way is deleting the job's resources: hands off.
    skipped, _, reason = judge(ep, "ep-9", [CREATE_ID[:16]], records("SUCCEEDED", "SUCCEEDED", "RUNNING"))
    assert skipped and reason.startswith("teardown job ffffffff of job 5a6b7c8d is RUNNING")
    # A marker of fabricflow 0.1 (8 hex digits) still names its job.
    verdict = judge(ResourceKind.WORKSPACE, "ws-3", [CREATE_ID[:8]], records("SUCCEEDED", "SUCCEEDED"))
    assert verdict == (False, CREATE_ID[:8], "duplicate: job 5a6b7c8d records ws-1 instead")
    assert judge(ep, "ep-9", [], records("SUCCEEDED", "SUCCEEDED")) is None  # no marker: not ours
