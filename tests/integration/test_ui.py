"""The live page (``fabricflow ui``, orchestrator/ui.py): its read-only JSON API and stream on a
real SQLite file, and the page itself rendered in real headless Chromium over the DevTools
protocol, against jobs run by the real engine on the real emulator."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from orchestrator import ui
from orchestrator.engine.runner import Runner
from orchestrator.fabric.client import FabricClient
from orchestrator.machine import JobState, StepName, StepState
from orchestrator.store.jobs import JobStore
from tests.conftest import make_spec, until
from tests.integration.test_engine import FAST, OWNER, run_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCRIPT_NAME = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


@asynccontextmanager
async def serving(db_url: str) -> AsyncIterator[str]:
    """``ui.make_app`` on a free loopback port; its base URL."""
    runner = web.AppRunner(ui.make_app(db_url), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, await resp.json()


# --- the JSON API ----------------------------------------------------------------------------


async def test_jobs_are_listed_with_filters_and_counts(store, db_url, spec_data, http_session):
    a = await store.submit(make_spec(spec_data, name="alpha-one"))
    b = await store.submit(make_spec(spec_data, name="beta"))
    c = await store.submit(make_spec(spec_data, name="alpha-two"))
    await store.cancel(b.id)
    async with serving(db_url) as base:
        status, body = await get(http_session, f"{base}/ui/api/jobs")
        assert status == 200
        assert body["counts"] == {"PENDING": 2, "RUNNING": 0, "SUCCEEDED": 0, "FAILED": 0, "CANCELLED": 1}
        assert body["total"] == 3
        assert [j["id"] for j in body["jobs"]] == [c.id, b.id, a.id]  # newest first
        _, body = await get(http_session, f"{base}/ui/api/jobs?name=alpha")
        assert [j["name"] for j in body["jobs"]] == ["alpha-two", "alpha-one"]
        assert body["counts"]["CANCELLED"] == 1  # the counts are the whole database's
        _, body = await get(http_session, f"{base}/ui/api/jobs?state=cancelled")
        assert [(j["id"], j["state"]) for j in body["jobs"]] == [(b.id, "CANCELLED")]
        _, body = await get(http_session, f"{base}/ui/api/jobs?state=PENDING&name=two")
        assert [j["id"] for j in body["jobs"]] == [c.id]
        _, body = await get(http_session, f"{base}/ui/api/jobs?limit=1")
        assert [j["id"] for j in body["jobs"]] == [c.id]

        status, body = await get(http_session, f"{base}/ui/api/jobs?state=DONE")
        assert (status, body) == (400, {"error": "unknown state 'DONE'; one of PENDING, RUNNING, SUCCEEDED, "
                                                 "FAILED, CANCELLED"})
        status, body = await get(http_session, f"{base}/ui/api/jobs?limit=0")
        assert (status, body) == (400, {"error": "limit must be between 1 and 1000"})


async def test_one_job_has_steps_events_and_a_404_for_an_unknown_one(store, db_url, emulator, spec_data,
                                                                    http_session):
    job = await run_job(store, emulator.url, make_spec(spec_data, name="done"))
    assert job.state is JobState.SUCCEEDED
    async with serving(db_url) as base:
        status, body = await get(http_session, f"{base}/ui/api/jobs/{job.id[:10]}")  # a prefix will do
        assert status == 200
        shown = body["job"]
        assert shown["id"] == job.id and shown["state"] == "SUCCEEDED"
        assert shown["result"]["endpoint_id"] == job.resource_id(StepName.ENDPOINT)
        assert "You said: hello" in shown["result"]["reply"]
        steps = {s["name"]: s for s in shown["steps"]}
        assert list(steps) == [str(n) for n in job.order]
        ready = steps["endpoint_ready"]
        assert (ready["state"], ready["resource_status"], ready["is_wait"]) == ("SUCCEEDED", "RUNNING", True)
        assert steps["endpoint"]["is_wait"] is False
        for step in steps.values():  # each bar of the timeline has both ends
            assert step["started_at"] <= step["finished_at"]
        assert body["events"][-1]["to"] == "SUCCEEDED"
        assert len(body["events"]) == len(await store.events(job.id))
        assert body["last_invocation"] is None  # no `fabricflow invoke` since

        status, body = await get(http_session, f"{base}/ui/api/jobs/{'f' * 32}")
        assert (status, body) == (404, {"error": f"no job '{'f' * 32}'"})
        status, body = await get(http_session, f"{base}/ui/api/jobs/not-hex")
        assert (status, body) == (404, {"error": "no job 'not-hex': job IDs are hexadecimal"})


async def test_the_page_never_writes_the_database(store, db_url, spec_data, tmp_path, http_session):
    job = await store.submit(make_spec(spec_data, name="still"))
    await store.close()  # everything checkpointed into the file
    db_file = tmp_path / "jobs.db"
    before = (db_file.read_bytes(), db_file.stat().st_mtime_ns)
    async with serving(db_url) as base:
        for path in ("/ui/", "/ui/static/app.js", "/ui/api/jobs", "/ui/api/jobs?state=PENDING",
                     f"/ui/api/jobs/{job.id}", f"/ui/api/jobs/{'0' * 8}"):
            async with http_session.get(base + path) as resp:
                assert resp.status in (200, 404), path
                await resp.read()
        async with http_session.get(f"{base}/ui/api/stream?job={job.id}") as resp:
            assert await resp.content.readline() == b"event: jobs\n"
    assert (db_file.read_bytes(), db_file.stat().st_mtime_ns) == before


async def test_a_missing_database_is_not_found_and_not_created(tmp_path, http_session):
    missing = tmp_path / "nowhere" / "jobs.db"
    async with serving(f"sqlite:///{missing}") as base:
        status, body = await get(http_session, f"{base}/ui/api/jobs")
    assert (status, body) == (404, {"error": f"no database at {missing}"})
    assert not missing.parent.exists()


async def read_event(resp: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    """The next Server-Sent Event of a stream (keep-alive comments skipped)."""
    name, data = None, None
    while True:
        line = (await resp.content.readline()).decode()
        if line.startswith("event: "):
            name = line[7:].strip()
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "\n" and name is not None:
            return name, data  # type: ignore[return-value]
        elif line == "":
            raise EOFError("the stream ended")


async def test_the_stream_sends_each_change_once_and_ends_on_shutdown(store, db_url, spec_data, http_session,
                                                                     monkeypatch):
    monkeypatch.setattr(ui, "REFRESH_SECONDS", 0.05)
    job = await store.submit(make_spec(spec_data, name="streamed"))
    async with serving(db_url) as base:
        resp = await http_session.get(f"{base}/ui/api/stream?job={job.id[:8]}&state=PENDING")
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = [await read_event(resp), await read_event(resp)]
        assert [name for name, _ in first] == ["jobs", "job"]
        assert [j["id"] for j in first[0][1]["jobs"]] == [job.id]
        assert first[1][1]["job"]["state"] == "PENDING"
        # Nothing changes for many refreshes: nothing is sent. Then a cancel: one message each.
        reads = ui.read_jobs
        counted: list[int] = []

        async def counting(*args: Any, **kwargs: Any) -> Any:
            counted.append(1)
            return await reads(*args, **kwargs)

        monkeypatch.setattr(ui, "read_jobs", counting)
        await until(lambda: asyncio.sleep(0, len(counted)), lambda n: n >= 5)
        await store.cancel(job.id)
        name, data = await read_event(resp)
        assert (name, data["jobs"]) == ("jobs", [])  # no longer PENDING: filtered out
        name, data = await read_event(resp)
        assert (name, data["job"]["state"]) == ("job", "CANCELLED")
    # The server has stopped (serving's cleanup): the open stream ended rather than waited out.
    with pytest.raises(EOFError):
        await read_event(resp)
    resp.close()


# --- the CLI -----------------------------------------------------------------------------------


def test_ui_command_refuses_a_missing_database(tmp_path):
    missing = tmp_path / "jobs.db"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "ui", "--db", f"sqlite:///{missing}", "--port", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr.strip()) == (3, f"error: no database at {missing}")
    assert not missing.exists()


def test_ui_command_serves_the_page_and_prints_its_url(tmp_path, db_url, spec_data):
    asyncio.run(_submit_one(db_url, spec_data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRICFLOW_")}
    with subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", "--db", db_url, "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("fabricflow ui on http://127.0.0.1:") and "read-only" in line, line
            url = line.split(" on ", 1)[1].split()[0]
            assert url.endswith("/ui/")
            with urllib.request.urlopen(f"{url}api/jobs", timeout=10) as resp:
                assert [j["name"] for j in json.loads(resp.read())["jobs"]] == ["served"]
            proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


async def _submit_one(db_url: str, spec_data: dict[str, Any]) -> None:
    store = await JobStore.open(db_url)
    try:
        await store.submit(make_spec(spec_data, name="served"))
    finally:
        await store.close()


# --- the page in headless Chromium ----------------------------------------------------------


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.calls = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    async def value(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, what: str, expression: str, *, timeout: float = 60) -> Any:
        """Evaluate until truthy; the deadline is only a safety net."""
        deadline = time.monotonic() + timeout
        while not (value := await self.value(expression)):
            assert time.monotonic() < deadline, f"the page never showed {what}: {await self.value('document.body.innerText')}"
            await asyncio.sleep(0.1)
        return value


@asynccontextmanager
async def chromium(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[Page]:
    """Headless Chromium with a blank tab, its DevTools on a free loopback port."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian's chromium package; .ci/run installs it)")
    profile = tmp_path / "chromium-profile"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
        "about:blank", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its port here once listening
        await until(lambda: asyncio.sleep(0, port_file.is_file() and port_file.read_text().count("\n") >= 1),
                    bool, timeout=60)
        port = port_file.read_text().split()[0]
        targets = await until(lambda: _targets(session, port), lambda ts: any(t["type"] == "page" for t in ts),
                              timeout=60)
        page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with session.ws_connect(page_ws, max_msg_size=0) as ws:
            yield Page(ws)
    finally:
        proc.terminate()
        await proc.wait()


async def _targets(session: aiohttp.ClientSession, port: str) -> list[dict[str, Any]]:
    async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
        return await resp.json()


async def test_the_page_shows_a_running_job_and_a_finished_jobs_ids_live(store, db_url, emulator,
                                                                        emulator_factory, spec_data,
                                                                        http_session, tmp_path):
    done = await run_job(store, emulator.url, make_spec(spec_data, name="finished job"))
    assert done.state is JobState.SUCCEEDED
    endpoint_id = done.resource_id(StepName.ENDPOINT)
    # A second job waits on an endpoint that stays CREATING for the whole test.
    slow = await emulator_factory(ready_after=3600, instance_ready_after=0.2)
    running = await store.submit(make_spec(spec_data, name=SCRIPT_NAME))
    assert await store.claim(running.id, OWNER, lease=300) is not None
    async with FabricClient(slow.url) as client:
        runner = Runner(store, client, owner=OWNER, settings=FAST)
        task = asyncio.create_task(runner.run(running.id))
        try:
            await until(lambda: store.get(running.id),
                        lambda j: j.steps[StepName.ENDPOINT_READY].state is StepState.WAITING, timeout=30)
            async with serving(db_url) as base, chromium(tmp_path, http_session) as page:
                await page.call("Page.navigate", url=f"{base}/ui/#job={done.id}")
                ids = "[...document.querySelectorAll('.job-id, .resource-id')].map(e => e.textContent)"
                await page.wait_for("both jobs and the endpoint ID",
                                    f"{ids}.includes({json.dumps(running.id)}) && {ids}.includes({json.dumps(endpoint_id)})")
                text = await page.value("document.body.innerText")
                assert running.id in text and endpoint_id in text
                assert "RUNNING" in text and "SUCCEEDED" in text
                assert await page.value("document.getElementById('job-id').textContent") == done.id
                assert "You said: hello" in await page.value("document.getElementById('reply').textContent")
                # The steps' bars, the waits among them drawn as waits.
                assert await page.value("document.querySelectorAll('#timeline .bar').length") == len(done.order)
                assert await page.value("document.querySelectorAll('#timeline .bar.wait').length") == 2
                # A job name is text, never markup: shown as typed, nothing of it ran.
                assert SCRIPT_NAME in text
                assert await page.value("window.pwned === undefined && !document.querySelector('#jobs img')")

                # Live: a job submitted now appears without a reload, and the running one's view follows it.
                added = await store.submit(make_spec(spec_data, name="added later"))
                await page.wait_for("the new job", f"{ids}.includes({json.dumps(added.id)})")
                await page.call("Runtime.evaluate", expression=f"location.hash = 'job={running.id}'")
                await page.wait_for("the running job's view",
                                    f"document.getElementById('job-id').textContent === {json.dumps(running.id)}")
                await page.wait_for("its endpoint waiting",
                                    "document.querySelector('#timeline .bar.wait.state-WAITING') !== null")
                assert await page.value("document.getElementById('job-name').textContent") == SCRIPT_NAME
                assert await page.value("window.pwned === undefined")
        finally:
            runner.stop.set()
            await asyncio.wait_for(task, 30)
