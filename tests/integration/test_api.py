"""The Python API against the real emulator (on 127.0.0.1, or embedded) and real SQLite files.

Each public operation, with the command line's rules: specs validated before anything is written
(the CLI's error classes and messages), IDs recorded, nothing created twice, lifecycle as the
CLI's, the daemon in the test's own event loop, the blocking wrapper in a plain script, no
secrets in reprs or errors, and no logging imposed on the host program.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

import orchestrator
from orchestrator import (
    Cancellation,
    Fabricflow,
    JobFailedError,
    JobKind,
    JobState,
    NotFoundError,
    OrchestratorError,
    StepName,
    StepState,
    UserError,
    connect,
)
from orchestrator.store.jobs import JobStore
from tests.conftest import ROOT, until
from tests.integration.test_engine import stats

SPEC: dict[str, Any] = {
    "name": "api-job",
    "workspace": {"name": "apiworkspace", "description": "made by the API tests"},
    "endpoint": {"name": "api_endpoint", "reserved_resource": {"mu": {"spec_code": "mu.llama3.8b", "min": 0, "max": 1}}},
    "model": {"name": "api-model", "version": {"name": "v1"}},
    "service_instance": {"name": "api_instance"},
    "invocation": {"messages": [{"role": "user", "content": "hello"}]},
}
#: Copies of SPEC that each create resources of their own.
INDEXED = {**SPEC, "name": "api-{index}", "workspace": {"name": "apiws-{index}"}}

#: Quick polling and claiming; the leases and timeouts stay the defaults.
FAST: dict[str, Any] = {
    "poll": {"initial": 0.05, "max": 0.2},
    "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
    "daemon": {"claim_interval": 0.05, "heartbeat_seconds": 0.2},
}
QUICK_EMBEDDED = {"emulator": {"ready_after": 0.2, "instance_ready_after": 0.2}}
RESOURCE_STEPS = (StepName.WORKSPACE, StepName.ENDPOINT, StepName.MODEL, StepName.SERVICE_INSTANCE)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "api.db"


@pytest.fixture
async def flow(db_path: Path, emulator: Any) -> Any:
    """A Fabricflow on a SQLite file and the emulator server on 127.0.0.1."""
    async with connect(db_path, fabric_url=emulator.url, **FAST) as ff:
        yield ff


def rows(db: Path, sql: str = "SELECT id, state FROM jobs ORDER BY created_at") -> list[tuple[Any, ...]]:
    """Rows read straight from the SQLite file, as a user checking the database would."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # no tables yet
            return []


class Steps:
    """An observer that remembers every step transition and can be waited on for one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, StepName, StepState]] = []
        self.texts: list[str] = []
        self._changed = asyncio.Event()

    def on_step(self, job: Any, step: StepName, state: StepState, detail: str) -> None:
        self.seen.append((job.id, step, state))
        self._changed.set()

    def on_text(self, job_id: str, text: str) -> None:
        self.texts.append(text)

    async def reached(self, step: StepName, state: StepState) -> str:
        """The ID of the job once one of its steps has reached ``state``."""
        async with asyncio.timeout(30):  # a safety net only: the wait ends on the transition
            while True:
                for job_id, name, to in self.seen:
                    if (name, to) == (step, state):
                        return job_id
                self._changed.clear()
                await self._changed.wait()


async def cli(*args: str) -> tuple[int, str, str]:
    """The real ``fabricflow`` command in a subprocess (the test's event loop keeps serving the
    emulator meanwhile): exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", *args, cwd=ROOT, env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def python(script: str, *args: str, cwd: Path) -> tuple[int, str, str]:
    """A fresh interpreter running ``script``, as a host program would: exit code, stdout, stderr."""
    path = cwd / "host.py"
    path.write_text(textwrap.dedent(script), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(path), *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- run and submit ------------------------------------------------------------------------------


async def test_run_returns_a_succeeded_job_with_its_ids_and_creates_each_resource_once(flow, emulator, db_path):
    observer = Steps()

    job = await flow.run(SPEC, observer=observer)

    assert job.state is JobState.SUCCEEDED and job.error is None
    result = job.as_json()["result"]
    for key in ("workspace_id", "endpoint_id", "model_id", "model_version_id", "service_instance_id"):
        assert result[key], key
    assert result["reply"] == "Hello from the fabricflow emulator. You said: hello"
    counts = (await stats(emulator.url))["created"]
    assert counts == {"workspace": {"apiworkspace": 1}, "endpoint": {"api_endpoint": 1},
                      "model": {"api-model": 1}, "service_instance": {"api_instance": 1}}
    assert rows(db_path) == [(job.id, "SUCCEEDED")]
    recorded = dict(rows(db_path, f"SELECT name, resource_id FROM steps WHERE job_id = '{job.id}'"))
    assert {str(name): job.resource_id(name) for name in RESOURCE_STEPS} == {
        str(name): recorded[str(name)] for name in RESOURCE_STEPS}
    # The observer saw the run as it happened, and the streamed reply.
    assert (job.id, StepName.ENDPOINT_READY, StepState.WAITING) in observer.seen
    assert observer.seen[-1] == (job.id, StepName.INVOCATION, StepState.SUCCEEDED)
    assert "".join(observer.texts) == result["reply"]


async def test_run_on_the_embedded_emulator_by_default(db_path):
    async with connect(db_path, **QUICK_EMBEDDED, **FAST) as ff:
        assert ff.is_embedded and ff.fabric == "embedded"  # nothing started until it is needed
        job = await ff.run(SPEC, check=True)
        assert ff.fabric.startswith("embedded at http://127.0.0.1:")
        counts = await stats(ff.fabric.removeprefix("embedded at "))

    assert job.state is JobState.SUCCEEDED
    assert counts["created"]["workspace"] == {"apiworkspace": 1}
    assert rows(db_path) == [(job.id, "SUCCEEDED")]


async def test_submit_enqueues_pending_jobs_in_one_call(flow, db_path, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))

    job = await flow.submit(spec_file)
    ids = await flow.submit_many([INDEXED, {**INDEXED, "name": "other-{index}"}], count=2)

    assert job.state is JobState.PENDING and {s.state for s in job.steps.values()} == {StepState.PENDING}
    assert len(ids) == 4 and len(set(ids)) == 4
    names = [(await flow.get(job_id)).name for job_id in ids]
    assert names == ["api-0", "api-1", "other-2", "other-3"]  # {index} counts on across the specs
    assert (await flow.get(ids[3])).spec["workspace"]["name"] == "apiws-3"
    assert sorted(rows(db_path)) == sorted([(job.id, "PENDING"), *((i, "PENDING") for i in ids)])


async def test_a_bad_spec_raises_the_clis_error_and_writes_nothing(flow, emulator, db_path, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "workspace": {"name": "ws!"},
                                   "endpoint": {**SPEC["endpoint"], "colour": "blue"}}))

    with pytest.raises(UserError) as submitted:
        await flow.submit(bad)
    with pytest.raises(UserError) as ran:
        await flow.run(bad)
    code, _out, err = await cli("submit", str(bad), "--db", f"sqlite+aiosqlite:///{db_path}")

    assert code == 2 and err == f"error: {submitted.value}\n"  # the same message, word for word
    assert str(ran.value) == str(submitted.value)
    assert f"{bad}: workspace.name: String should match pattern" in str(submitted.value)
    assert f"{bad}: endpoint.colour: Extra inputs are not permitted" in str(submitted.value)
    # A mapping is named "spec"; among several, by its place. All are checked before any is written.
    with pytest.raises(UserError) as many:
        await flow.submit_many([SPEC, {**SPEC, "model": {"name": "m"}}])
    assert str(many.value) == "specs[1]: model.version: Field required"
    with pytest.raises(UserError, match="no such file"):
        await flow.submit(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"2 copies would all have the same resource names .* put \{index\} or \{job\}"):
        await flow.submit_many([SPEC], count=2)
    with pytest.raises(TypeError, match="a spec is a file path, a mapping or a JobSpec"):
        await flow.submit(42)
    assert rows(db_path) == []
    assert (await stats(emulator.url))["requests"] == 0  # not even a look-up reached Fabric


async def test_a_spec_model_is_accepted_as_it_is(flow):
    spec = orchestrator.JobSpec.model_validate(SPEC)
    job = await flow.submit(spec)
    assert orchestrator.JobSpec.model_validate(job.spec) == spec


async def test_submit_on_a_real_fabric_checks_reused_resources_before_writing(flow, emulator, db_path):
    reusing = {**SPEC, "workspace": {"id": "no-such-workspace"}}

    with pytest.raises(NotFoundError) as missing:
        await flow.submit(reusing)

    assert str(missing.value) == "workspace no-such-workspace (reused by the spec) does not exist"
    assert rows(db_path) == []


async def test_check_raises_job_failed_error_carrying_the_job(emulator_factory, db_path):
    emu = await emulator_factory(ready_after=0.1, instance_ready_after=0.1, create_fail="api_endpoint")
    async with connect(db_path, fabric_url=emu.url, **FAST) as ff:
        with pytest.raises(JobFailedError) as failed:
            await ff.run(SPEC, check=True)
        job = failed.value.job
        unchecked = await ff.run({**SPEC, "workspace": {"name": "otherworkspace"}})

    assert isinstance(failed.value, OrchestratorError) and failed.value.exit_code == 1
    assert job.state is JobState.FAILED and job.steps[StepName.ENDPOINT_READY].resource_status == "CREATE_FAILED"
    assert str(failed.value) == f"job {job.id[:8]} (api-job) FAILED: {job.error['message']}"
    assert "CREATE_FAILED" in job.error["message"]
    assert unchecked.state is JobState.FAILED  # without check, a failed job is returned


async def test_run_stops_at_a_safe_point_when_asked_or_cancelled(emulator_factory, db_path, tmp_path):
    emu = await emulator_factory(ready_after=600, instance_ready_after=0.1)  # the endpoint stays CREATING
    async with connect(db_path, fabric_url=emu.url, **FAST) as ff:
        observer, stop = Steps(), asyncio.Event()
        running = asyncio.create_task(ff.run(SPEC, observer=observer, stop=stop))
        await observer.reached(StepName.ENDPOINT_READY, StepState.WAITING)
        stop.set()
        stopped = await running

        observer = Steps()
        running = asyncio.create_task(ff.run({**SPEC, "workspace": {"name": "secondworkspace"}}, observer=observer))
        second = await observer.reached(StepName.ENDPOINT_READY, StepState.WAITING)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        cancelled = await ff.get(second)

    # Left for a daemon to finish, its lease handed back, nothing created twice.
    for job in (stopped, cancelled):
        assert job.state is JobState.PENDING and job.lease_owner is None
        assert job.steps[StepName.ENDPOINT_READY].state is StepState.WAITING
        assert job.steps[StepName.MODEL].state is StepState.PENDING
    assert (await stats(emu.url))["created"]["endpoint"] == {"api_endpoint": 2}  # one per job
    # On the embedded emulator, whose resources end with the Fabricflow, a stopped job is CANCELLED.
    async with connect(tmp_path / "embedded.db", emulator={"ready_after": 600}, **FAST) as ff:
        observer, stop = Steps(), asyncio.Event()
        running = asyncio.create_task(ff.run(SPEC, observer=observer, stop=stop))
        await observer.reached(StepName.ENDPOINT_READY, StepState.WAITING)
        stop.set()
        ended = await running
        assert ended.state is JobState.CANCELLED
        last = [e async for e in ff.events(ended)][-1]
        assert (last.from_state, last.to_state, last.detail) == (
            "PENDING", "CANCELLED",
            "stopped, and cancelled: its resources were in the embedded emulator, which ends with this process")


# --- events, reading ---------------------------------------------------------------------------


async def test_events_follow_a_job_live_until_it_ends(flow):
    job = await flow.submit(SPEC)
    stop = asyncio.Event()
    daemon: asyncio.Task[None] | None = None
    seen = []

    async with asyncio.timeout(60):  # a safety net: the iteration ends by itself with the job
        async for event in flow.events(job, follow=True):
            seen.append(event)
            if daemon is None:
                # Nothing runs the job until its first event has arrived: every later one is
                # committed, and read, while this loop follows.
                assert (await flow.get(job)).state is JobState.PENDING
                daemon = asyncio.create_task(flow.serve(stop=stop))
    stop.set()
    assert daemon is not None
    await daemon

    assert (seen[0].from_state, seen[0].to_state) == (None, "PENDING")
    assert (seen[-1].from_state, seen[-1].to_state) == ("RUNNING", "SUCCEEDED")
    assert [e.id for e in seen] == sorted({e.id for e in seen})  # in order, none twice
    assert [e.id for e in seen] == [e.id async for e in flow.events(job.id[:8])]  # all of them
    assert [e.id for e in seen[3:]] == [e.id async for e in flow.events(job, after=seen[2].id)]


async def test_list_get_and_job_references(flow):
    ids = [(await flow.submit({**SPEC, "name": f"api-{n}"})).id for n in range(3)]  # one after another
    await flow.cancel(ids[1])

    assert [j.id for j in await flow.list()] == ids[::-1]  # newest first
    assert [j.id for j in await flow.list(state="cancelled")] == [ids[1]]
    assert [j.id for j in await flow.list(state=JobState.PENDING, name="api-2")] == [ids[2]]
    assert [j.id for j in await flow.list(limit=1)] == [ids[2]]
    with pytest.raises(UserError, match="unknown job state 'nope'"):
        await flow.list(state="nope")
    job = await flow.get(ids[0][:10].upper())  # any unique prefix, as typed
    assert job.id == ids[0] and await flow.resolve(job) == ids[0] and await flow.resolve(ids[0][:9]) == ids[0]
    with pytest.raises(NotFoundError, match=r"^no job 'abc123def'$"):
        await flow.get("abc123def")
    with pytest.raises(NotFoundError, match="job IDs are hexadecimal"):
        await flow.get("xyz")
    with pytest.raises(UserError, match="not a job ID: 'aaaaaaaaaaaa'... is 40 characters long"):
        await flow.get("a" * 40)


async def test_read_only_and_create_false_never_create_a_database(tmp_path):
    missing = tmp_path / "missing" / "jobs.db"
    for options in ({"read_only": True}, {"create": False}):
        with pytest.raises(NotFoundError) as caught:
            await Fabricflow.open(missing, **options)
        assert str(caught.value) == f"no database at {missing}"
    assert not missing.parent.exists()

    existing = tmp_path / "jobs.db"
    async with connect(existing) as ff:
        job = await ff.submit(SPEC)
    async with connect(existing, read_only=True) as reader:
        assert [j.id for j in await reader.list()] == [job.id]
        assert (await reader.get(job.id[:6])).state is JobState.PENDING
        with pytest.raises(UserError, match="opened with read_only=True"):
            await reader.cancel(job)
    assert rows(existing) == [(job.id, "PENDING")]


async def test_postgresql_by_url_with_its_password_kept_out_of_sight(pg_url, emulator):
    migrated = await JobStore.open(pg_url, auto_upgrade=True)  # as `fabricflow db upgrade` would
    await migrated.close()
    with_password = pg_url.replace("postgres@", "postgres:hunter2@", 1)  # the local server trusts
    assert "hunter2" in with_password

    async with connect(with_password, fabric_url=emulator.url, **FAST) as ff:
        job = await ff.run(SPEC)
        listed = await ff.list()
        shown = repr(ff)

    assert job.state is JobState.SUCCEEDED and [j.id for j in listed] == [job.id]
    assert "hunter2" not in shown and "//postgres:***@127.0.0.1:5432/" in shown


# --- lifecycle -------------------------------------------------------------------------------


async def test_cancel_retry_and_teardown_behave_as_the_clis(emulator_factory, db_path):
    emu = await emulator_factory(ready_after=600, instance_ready_after=0.1, delete_after=0.1)
    db_url = f"sqlite+aiosqlite:///{db_path}"
    async with connect(db_path, fabric_url=emu.url, **FAST) as ff:
        pending = await ff.submit(SPEC)
        with pytest.raises(UserError) as not_yet:
            await ff.teardown(pending)
        done = await ff.cancel(pending)
        assert done == Cancellation(job=await ff.get(pending), teardown=None)
        assert done.job.state is JobState.CANCELLED and not done.requested
        with pytest.raises(UserError) as again:
            await ff.cancel(pending.id[:8])
        assert (await ff.retry(pending)).state is JobState.PENDING
        with pytest.raises(UserError) as not_failed:
            await ff.retry(pending)

        # A running job stops at its next safe point; its teardown deletes what it made.
        stop = asyncio.Event()
        await ff.cancel(pending)
        running = await ff.submit({**SPEC, "workspace": {"name": "runningworkspace"}})
        daemon = asyncio.create_task(ff.serve(stop=stop))
        await until(lambda: ff.get(running), lambda j: j.steps[StepName.ENDPOINT_READY].state is StepState.WAITING,
                    timeout=30)
        asked = await ff.cancel(running, teardown=True)
        cancelled = await ff.wait(running)
        torn_down = await ff.wait(asked.teardown, check=True)
        stop.set()
        await daemon

        codes = {}
        for args in (("cancel", pending.id), ("retry", running.id[:8]), ("teardown", asked.teardown.id)):
            code, _out, err = await cli(*args, "--db", db_url)
            codes[args[0]] = (code, err)

    assert str(not_yet.value) == (f"job {pending.id[:8]} is PENDING; cancel it first: "
                                  f"fabricflow cancel {pending.id[:8]} --teardown")
    assert str(again.value) == f"job {pending.id[:8]} already ended CANCELLED; nothing to cancel"
    assert str(not_failed.value) == f"job {pending.id[:8]} is PENDING; only FAILED or CANCELLED jobs can be retried"
    assert codes["cancel"] == (2, f"error: job {pending.id[:8]} already ended CANCELLED; nothing to cancel\n")
    assert asked.requested and asked.job.state is JobState.RUNNING
    assert asked.teardown is not None and asked.teardown.kind is JobKind.TEARDOWN
    assert asked.teardown.parent_id == running.id
    assert cancelled.state is JobState.CANCELLED and cancelled.steps[StepName.MODEL].state is StepState.PENDING
    assert torn_down.state is JobState.SUCCEEDED
    assert (await stats(emu.url))["live"] == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}
    # The API refuses what the CLI refuses, in the same words.
    async with connect(db_path, fabric_url=emu.url) as ff:
        for command, call in (("retry", lambda: ff.retry(running.id[:8])), ("teardown", lambda: ff.teardown(asked.teardown))):
            with pytest.raises(UserError) as refused:
                await call()
            assert codes[command] == (2, f"error: {refused.value}\n")


async def test_invoke_stores_a_new_invocation(flow, tmp_path):
    job = await flow.run(SPEC)
    pieces: list[str] = []

    record = await flow.invoke(job.id[:8], "once more", system="be brief", max_tokens=50, on_text=pieces.append)

    assert record.error is None and record.job_id == job.id
    assert record.reply == "".join(pieces) and "once more" in record.reply
    assert record.request["messages"][0] == {"role": "system", "content": "be brief"}
    assert record.request["max_tokens"] == 50 and record.finish_reason
    assert record.service_instance_id == job.resource_id(StepName.SERVICE_INSTANCE)
    assert [i.id for i in await flow.invocations(job)] == [record.id]
    teardown = await flow.teardown(job)
    with pytest.raises(UserError, match="is a teardown job; invoke the job that created the service"):
        await flow.invoke(teardown, "hi")
    with pytest.raises(UserError) as torn:  # its instance is about to go: Fabric would answer 404
        await flow.invoke(job, "hi")
    assert str(torn.value) == (f"job {job.id[:8]} has a teardown ({teardown.id[:8]}, PENDING) that deletes or "
                               "has deleted what the job created; submit a new job to talk to a service")
    assert [i.id for i in await flow.invocations(job)] == [record.id]  # nothing sent, nothing stored
    await flow.cancel(teardown)  # before it ran: it deleted nothing, so the service may be used again
    again = await flow.invoke(job, "still there?")
    assert again.error is None and "still there?" in again.reply
    assert [i.id for i in await flow.invocations(job)] == [record.id, again.id]
    async with connect(tmp_path / "other.db") as embedded:  # its emulator has not run this job
        with pytest.raises(UserError, match="the embedded emulator keeps nothing between runs"):
            await embedded.invoke(job, "hi")


# --- the daemon ------------------------------------------------------------------------------


async def test_the_daemon_started_from_python_runs_jobs_and_stops_cleanly(flow, emulator):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop, ready = asyncio.Event(), asyncio.Event()
    daemon = asyncio.create_task(flow.serve(stop=stop, ready=ready, concurrency=5))
    async with asyncio.timeout(30):
        await ready.wait()

    ids = await flow.submit_many([INDEXED], count=2)
    jobs = [await flow.wait(job_id, check=True) for job_id in ids]
    stop.set()
    async with asyncio.timeout(30):
        assert await daemon is None  # drained and returned
    later = await flow.submit({**INDEXED, "workspace": {"name": "apiws-later"}})

    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 2
    assert (await stats(emulator.url))["created"]["workspace"] == {"apiws-0": 1, "apiws-1": 1}
    assert (await flow.get(later)).state is JobState.PENDING  # nothing claims once stopped
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the host's handlers are back

    # Cancelled instead, it drains too, then says so; the database is free for the next daemon.
    daemon = asyncio.create_task(flow.serve(ready=(ready := asyncio.Event())))
    async with asyncio.timeout(30):
        await ready.wait()
    await flow.wait(later)
    daemon.cancel()
    with pytest.raises(asyncio.CancelledError):
        await daemon
    assert (await flow.get(later)).state is JobState.SUCCEEDED
    with pytest.raises(UserError, match="concurrency must be at least 1"):
        await flow.serve(concurrency=0)


async def test_the_daemon_refuses_a_metrics_port_in_use_before_it_registers(flow, emulator, db_path):
    await flow.submit(SPEC)
    started: list[str] = []
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(UserError) as refused:
            await flow.serve(metrics_port=port, on_started=started.append, on_metrics_ready=started.append)
    assert str(refused.value) == (f"daemon: cannot listen on 127.0.0.1:{port} (--metrics-port): address already "
                                  "in use; another process listens there (--metrics-port 0 picks a free one)")
    assert started == []  # nothing announced
    assert rows(db_path, "SELECT owner FROM daemons") == []
    assert rows(db_path, "SELECT state, lease_owner FROM jobs") == [("PENDING", None)]
    assert (await stats(emulator.url))["requests"] == 0
    # The file is free again: the next daemon, on a free port, starts.
    ready = asyncio.Event()
    daemon = asyncio.create_task(flow.serve(ready=ready, metrics_port=0, on_metrics_ready=started.append))
    async with asyncio.timeout(30):
        await ready.wait()
    daemon.cancel()
    with pytest.raises(asyncio.CancelledError):
        await daemon
    assert len(started) == 1 and started[0].startswith("http://127.0.0.1:")


# --- a plain script, secrets, logging --------------------------------------------------------


async def test_the_sync_wrapper_in_a_plain_script(emulator, tmp_path):
    code, out, err = await python(f"""
        import json, threading
        from orchestrator import JobState, SyncFabricflow

        SPEC = {json.dumps(SPEC)}
        with SyncFabricflow.open("jobs.db", fabric_url={emulator.url!r}, **{json.dumps(FAST)}) as ff:
            ran = ff.run(SPEC)
            queued = ff.submit_many([{{**SPEC, "name": "queued", "workspace": {{"name": "queuedworkspace"}}}}])
            stop = threading.Event()

            def waiter():
                ff.wait(queued[0])
                stop.set()

            thread = threading.Thread(target=waiter)
            thread.start()
            ff.serve(stop=stop)  # in this thread, until the waiter has seen the job end
            thread.join()
            print(json.dumps({{"ran": [ran.id, str(ran.state)], "queued": [queued[0], str(ff.get(queued[0]).state)],
                              "events": [e.to_state for e in ff.events(ran)], "listed": len(ff.list()),
                              "repr": repr(ff)}}))
    """, cwd=tmp_path)

    assert code == 0, err
    (line,) = out.splitlines()  # nothing but the script's own output on stdout
    shown = json.loads(line)
    assert shown["ran"][1] == "SUCCEEDED" and shown["queued"][1] == "SUCCEEDED"
    assert shown["events"][0] == "PENDING" and shown["events"][-1] == "SUCCEEDED" and shown["listed"] == 2
    assert shown["repr"] == f"SyncFabricflow(db='{tmp_path / 'jobs.db'}', fabric={emulator.url!r})"
    assert sorted(rows(tmp_path / "jobs.db")) == sorted([(shown["ran"][0], "SUCCEEDED"), (shown["queued"][0], "SUCCEEDED")])
    created = (await stats(emulator.url))["created"]["workspace"]
    assert created == {"apiworkspace": 1, "queuedworkspace": 1}


HOST = """
    import asyncio, io, json, logging, sys
    import structlog
    import orchestrator

    captured = io.StringIO()
    if sys.argv[1] == "with-logging":  # the host configures the standard library its own way
        logging.basicConfig(level=logging.INFO, stream=captured, format="%(name)s|%(levelname)s|%(message)s")

    async def main():
        async with orchestrator.connect("jobs.db", emulator={"ready_after": 0.1, "instance_ready_after": 0.1},
                                        poll={"initial": 0.05, "max": 0.1}) as ff:
            job = await ff.run(SPEC)
        print(json.dumps({"state": str(job.state), "structlog_configured": structlog.is_configured(),
                          "root_handlers": len(logging.getLogger().handlers), "logged": captured.getvalue()}))

    asyncio.run(main())
"""


async def test_the_api_imposes_no_logging_on_the_host(tmp_path):
    script = f"SPEC = {json.dumps(SPEC)}\n" + textwrap.dedent(HOST)

    code, out, err = await python(script, "none", cwd=tmp_path)
    assert code == 0, err
    (line,) = out.splitlines()  # structlog unconfigured would have printed every transition here
    assert json.loads(line) == {"state": "SUCCEEDED", "structlog_configured": False, "root_handlers": 0,
                                "logged": ""}
    assert err == ""

    code, out, err = await python(script, "with-logging", cwd=tmp_path)
    assert code == 0, err
    (line,) = out.splitlines()
    shown = json.loads(line)
    assert shown["structlog_configured"] is False and shown["root_handlers"] == 1
    logged = shown["logged"].splitlines()
    assert any(entry.startswith("orchestrator.engine.runner|INFO|step_transitioned step=workspace")
               for entry in logged)
    assert any(entry.startswith("orchestrator.engine.runner|INFO|job_transitioned to=SUCCEEDED") for entry in logged)


AK, SK = "AKAPITESTEXAMPLE0001", "sk-api-test-secret-value-9f8e7d"


async def test_secrets_never_reach_reprs_errors_or_the_database(emulator_factory, monkeypatch, db_path, capfd):
    emu = await emulator_factory(auth="aksk", ak=AK, sk=SK, ready_after=0.1, instance_ready_after=0.1)
    monkeypatch.setenv("HUAWEICLOUD_SDK_AK", AK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", SK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_PROJECT_ID", "0" * 32)
    texts: list[str] = []
    async with connect(db_path, fabric_url=emu.url, **FAST) as ff:
        job = await ff.run(SPEC, check=True)  # signed with the keys: the emulator checks them
        record = await ff.invoke(job, "signed")
        texts += [repr(ff), str(ff), repr(job), json.dumps(job.as_json()), repr(record),
                  repr([e async for e in ff.events(job)])]
    wrong = SK[:-1] + "X"
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", wrong)
    async with connect(db_path, fabric_url=emu.url, **FAST) as ff:
        with pytest.raises(JobFailedError) as refused:
            await ff.run({**SPEC, "workspace": {"name": "refusedworkspace"}}, check=True)
        texts += [repr(ff), str(refused.value), repr(refused.value.job), repr(refused.value.args)]
        sync = await asyncio.to_thread(orchestrator.SyncFabricflow.open, db_path, fabric_url=emu.url)
        texts.append(repr(sync))
        await asyncio.to_thread(sync.close)

    assert job.state is JobState.SUCCEEDED and record.error is None
    assert "verify aksk signature fail" in str(refused.value)
    stored = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*") if p.is_file())
    out, err = capfd.readouterr()
    for secret in (SK, wrong):
        assert all(secret not in text for text in texts)
        assert secret.encode() not in stored
        assert secret not in out + err


async def test_ctrl_c_stops_the_sync_wrappers_run_at_a_safe_point(emulator_factory, tmp_path):
    emu = await emulator_factory(ready_after=600, instance_ready_after=0.1)  # the endpoint stays CREATING
    path = tmp_path / "host.py"
    path.write_text(textwrap.dedent(f"""
        from orchestrator import SyncFabricflow

        with SyncFabricflow.open("jobs.db", fabric_url={emu.url!r}, **{json.dumps(FAST)}) as ff:
            ff.run({json.dumps(SPEC)})
    """), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(path), cwd=tmp_path, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        sql = "SELECT state FROM steps WHERE name = 'endpoint_ready'"

        async def waiting() -> list[tuple[Any, ...]]:
            return rows(tmp_path / "jobs.db", sql)

        await until(waiting, lambda found: found == [("WAITING",)], timeout=60)
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == -signal.SIGINT and err.decode().rstrip().endswith("KeyboardInterrupt")
    # Stopped at the safe point: left PENDING for a daemon, its lease handed back, the wait recorded.
    assert rows(tmp_path / "jobs.db", "SELECT state, lease_owner FROM jobs") == [("PENDING", None)]
    assert rows(tmp_path / "jobs.db", sql) == [("WAITING",)]
    assert (await stats(emu.url))["created"]["endpoint"] == {"api_endpoint": 1}
