"""What an operator sees of a real daemon process: /metrics, /healthz and its JSON log lines.

The daemon and the emulator are real processes (tests/crash/procs.py). Between them sits a
byte-for-byte relay that notes each answer's X-Request-Id, so the log's request_id can be
compared with what Fabric (the emulator) really said.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from importlib.metadata import version
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PG_ADMIN_URL, QUICKSTART
from tests.crash.procs import FABRICFLOW, Emulator, cli, env, query, wait_for

# The client's operation label -> the emulator's handler name, for the creates.
CREATES = {"create_workspace": "create_workspace", "create_endpoint": "create_endpoint",
           "create_model": "create_model", "create_service_instance": "create_instance"}


class Relay:
    """An HTTP relay on a loopback port that records (method, path, status, X-Request-Id)."""

    def __init__(self, upstream: str) -> None:
        self.seen: list[tuple[str, str, int, str | None]] = []
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as resp:
                        status, answer, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as err:
                    status, answer, data = err.code, err.headers, err.read()
                relay.seen.append((self.command, self.path.split("?")[0], status, answer.get("X-Request-Id")))
                self.send_response(status)
                for key, value in answer.items():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = _forward

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_daemon(db_url: str, fabric_url: str, log: Path, *args: str,
                 **env_extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """`fabricflow daemon --metrics-port 0`, its stderr to ``log``; returns it and its metrics URL."""
    with open(log, "w") as err:
        proc = subprocess.Popen([*FABRICFLOW, "daemon", "--db", db_url, "--fabric-url", fabric_url,
                                 "--metrics-port", "0", *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=env(**env_extra))
    line = wait_for("the metrics address", lambda: next(
        (ln for ln in log.read_text().splitlines() if "health and metrics on" in ln), None))
    return proc, line.split(" on ", 1)[1].split("/healthz")[0]


def samples(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def health(base: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_finished_job_shows_in_metrics_and_json_logs(tmp_path: Path):
    emulator = Emulator("--ready-after", "0.2", "--instance-ready-after", "0.2", log=tmp_path / "e.log")
    relay = Relay(emulator.url)
    try:
        db = tmp_path / "jobs.db"
        url = f"sqlite+aiosqlite:///{db}"
        job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
        log = tmp_path / "d.log"
        # No --log-level: the daemon's default (info) prints claims, transitions and the job's end.
        daemon, base = start_daemon(url, relay.url, log, "--log-format", "json")
        try:
            wait_for("the job to finish", lambda: query(
                db, "SELECT state FROM jobs WHERE id=?", job_id)[0][0] == "SUCCEEDED", timeout=90)
            found = samples(base)
            status, body = health(base)
            # The live page is served on the same port (orchestrator/ui.py).
            with urllib.request.urlopen(f"{base}/ui/api/jobs", timeout=30) as resp:
                page_jobs = json.loads(resp.read())
            with urllib.request.urlopen(f"{base}/ui/", timeout=30) as resp:
                page = resp.read().decode()
        finally:
            daemon.send_signal(15)
            assert daemon.wait(timeout=30) == 0
        stats = emulator.stats()
    finally:
        relay.stop()
        emulator.stop()

    assert (status, body["status"], body["problems"]) == (200, "ok", [])
    assert "<html" in page.lower()
    assert [j["id"] for j in page_jobs["jobs"]] == [job_id] and page_jobs["jobs"][0]["state"] == "SUCCEEDED"
    # Requests by operation, counted against what the emulator received.
    requests = {dict(labels)["operation"]: v for (name, labels), v in found.items()
                if name == "fabricflow_fabric_requests_total"}
    assert sum(requests.values()) == stats["requests"] == len(relay.seen)
    for ours, theirs in CREATES.items():
        assert value(found, "fabricflow_fabric_requests_total", operation=ours, status="200") \
            + value(found, "fabricflow_fabric_requests_total", operation=ours, status="201") \
            == stats["operations"][theirs] == 1
    assert value(found, "fabricflow_fabric_request_duration_seconds_count", operation="create_workspace") == 1
    assert requests.get("show_endpoint", 0) == stats["operations"].get("show_endpoint", 0) > 0
    assert value(found, "fabricflow_polls_total", operation="show_endpoint") == requests["show_endpoint"]
    # Jobs by state come from the database.
    assert value(found, "fabricflow_jobs", state="SUCCEEDED") == 1
    assert value(found, "fabricflow_jobs", state="RUNNING") == value(found, "fabricflow_jobs", state="PENDING") == 0
    assert value(found, "fabricflow_jobs_claimed_total", how="new") == 1
    assert value(found, "fabricflow_lease_takeovers_total") == 0
    assert value(found, "fabricflow_step_transitions_total", step="invocation", state="SUCCEEDED") == 1
    assert value(found, "fabricflow_step_duration_seconds_count", step="endpoint_ready", state="SUCCEEDED") == 1
    assert value(found, "fabricflow_commit_batch_size_count") > 0
    assert value(found, "fabricflow_commit_duration_seconds_count") == value(found, "fabricflow_commit_batch_size_count")
    assert value(found, "fabricflow_heartbeat_age_seconds") >= 0 or value(found, "fabricflow_heartbeat_age_seconds") == -1
    build = [dict(labels) for (name, labels), _ in found.items() if name == "fabricflow_build_info"]
    assert len(build) == 1 and build[0]["version"] == version("fabricflow") and build[0]["python"]

    # One JSON line per claim, step transition and job end, each with job_id and step.
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    by_event = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    [claim] = by_event["job_claimed"]
    assert (claim["job_id"], claim["step"], claim["level"]) == (job_id, "workspace", "info")
    [end] = by_event["job_transitioned"]
    assert (end["job_id"], end["to"], end["step"]) == (job_id, "SUCCEEDED", "invocation")
    moves = by_event["step_transitioned"]
    assert all(m["job_id"] == job_id and m["step"] for m in moves)
    # A create's request_id is the X-Request-Id the emulator answered it with.
    answered = {path.rsplit("/", 1)[-1]: rid for method, path, st, rid in relay.seen if method == "POST" and st < 300}
    done = {m["step"]: m for m in moves if m["to"] == "SUCCEEDED"}
    assert done["workspace"]["request_id"] == answered["workspaces"]
    assert done["model"]["request_id"] == answered["models"]
    assert done["service_instance"]["request_id"] == answered["instances"]
    assert done["invocation"]["request_id"] == answered["invocations"]
    assert len(set(answered.values())) == len(answered)  # four different requests


async def test_healthz_says_503_while_the_database_does_not_answer(tmp_path: Path, pg_url: str):
    name = pg_url.rsplit("/", 1)[1]
    cli("db", "upgrade", "--db", pg_url)
    emulator = Emulator(log=tmp_path / "e.log")
    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    daemon = None
    try:
        daemon, base = await asyncio.to_thread(start_daemon, pg_url, emulator.url, tmp_path / "d.log")
        status, body = await asyncio.to_thread(health, base)
        assert (status, body["status"]) == (200, "ok")
        # The database goes away: no new connections, the daemon's current ones cut.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        deadline = time.monotonic() + 60  # a safety net: the first probe after the cut already fails
        while True:
            status, body = await asyncio.to_thread(health, base)
            if status == 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 503 and body["status"] == "unhealthy"
        assert any(p.startswith("database not answering") for p in body["problems"]), body
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        deadline = time.monotonic() + 60
        while True:
            status, body = await asyncio.to_thread(health, base)
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert (status, body["problems"]) == (200, [])
    finally:
        if daemon is not None:
            daemon.send_signal(15)
            await asyncio.to_thread(daemon.wait, 30)
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        emulator.stop()


@pytest.mark.parametrize("given", [None, "warning"])
def test_the_daemons_default_level_is_info(tmp_path: Path, given: str | None):
    emulator = Emulator(log=tmp_path / "e.log")
    try:
        log = tmp_path / "d.log"
        url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
        daemon, _ = start_daemon(url, emulator.url, log, "--log-format", "json",
                                 *(["--log-level", given] if given else []))
        daemon.send_signal(15)
        assert daemon.wait(timeout=30) == 0
    finally:
        emulator.stop()
    events = [json.loads(ln)["event"] for ln in log.read_text().splitlines() if ln.startswith("{")]
    assert ("daemon_started" in events) is (given is None)


def test_healthz_counts_the_registration_as_the_first_heartbeat(tmp_path: Path):
    """A daemon is registered, heartbeat and all, before it serves /healthz: the age of its
    heartbeat is a number from the first answer, not null until the first beat of its loop."""
    emulator = Emulator(log=tmp_path / "e.log")
    try:
        url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
        # Beats ten minutes apart, leases of an hour: only the registration can have beaten yet.
        daemon, base = start_daemon(url, emulator.url, tmp_path / "d.log", FABRICFLOW_DAEMON__HEARTBEAT_SECONDS="600",
                                    FABRICFLOW_DAEMON__LEASE_SECONDS="3600")
        try:
            status, body = health(base)
            assert status == 200 and body["status"] == "ok", body
            assert isinstance(body["seconds_since_heartbeat"], float) and body["seconds_since_heartbeat"] < 600, body
        finally:
            daemon.terminate()
            assert daemon.wait(timeout=30) == 0
    finally:
        emulator.stop()


# --- a metrics address the daemon cannot have ---------------------------------------------------


def refused_daemon(db_url: str, fabric_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`fabricflow daemon ARGS` expected to stop at once: its exit code and output."""
    return subprocess.run([*FABRICFLOW, "daemon", "--db", db_url, "--fabric-url", fabric_url, *args],
                          capture_output=True, text=True, env=env(), timeout=60)


def assert_nothing_done(db: Path, job_id: str, emulator: Emulator) -> None:
    """No registry row (in the file and as `status --json` reads it), the job untouched, Fabric never asked."""
    assert query(db, "SELECT count(*) FROM daemons") == [(0,)]
    assert json.loads(cli("status", "--json", "--db", f"sqlite:///{db}").stdout)["daemons"] == []
    assert query(db, "SELECT state, lease_owner, recoveries FROM jobs WHERE id=?", job_id) == [("PENDING", None, 0)]
    assert query(db, "SELECT count(*) FROM events WHERE job_id=?", job_id) == [(1,)]  # its submission only
    assert emulator.stats()["requests"] == 0


def test_a_metrics_port_in_use_is_one_line_exit_2_and_leaves_no_daemon_row(tmp_path: Path):
    emulator = Emulator(log=tmp_path / "e.log")
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        db = tmp_path / "jobs.db"
        url = f"sqlite:///{db}"
        job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
        refused = refused_daemon(url, emulator.url, "--metrics-port", str(port))
        assert (refused.returncode, refused.stdout) == (2, "")
        assert refused.stderr == (f"error: daemon: cannot listen on 127.0.0.1:{port} (--metrics-port): address "
                                  "already in use; another process listens there (--metrics-port 0 picks a free "
                                  "one)\n")
        assert_nothing_done(db, job_id, emulator)
    finally:
        holder.close()
        emulator.stop()


def gai_reason(host: str) -> str:
    """What this machine's resolver says of ``host``, as the daemon words it."""
    with pytest.raises(socket.gaierror) as refused:
        socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return str(refused.value.strerror).lower()


# Names the resolver refuses itself, before asking any DNS server (glibc: a space is no hostname
# character; the IDNA codec: an empty label), so that no query leaves the machine.
@pytest.mark.parametrize("host, reason", [("not a host", gai_reason),
                                          ("not..host", lambda _host: "not a valid host name")],
                         ids=["unresolvable", "no-hostname"])
def test_an_unresolvable_metrics_host_is_one_line_exit_2_and_leaves_no_daemon_row(
        tmp_path: Path, host: str, reason: Callable[[str], str]):
    emulator = Emulator(log=tmp_path / "e.log")
    try:
        db = tmp_path / "jobs.db"
        url = f"sqlite:///{db}"
        job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
        refused = refused_daemon(url, emulator.url, "--metrics-port", "0", "--metrics-host", host)
        assert (refused.returncode, refused.stdout) == (2, "")
        assert refused.stderr == f"error: daemon: cannot listen on {host}:0 (--metrics-host): {reason(host)}\n"
        assert_nothing_done(db, job_id, emulator)
    finally:
        emulator.stop()


def test_healthz_says_starting_while_the_daemon_is_bound_but_not_registered(tmp_path: Path):
    """The daemon binds its metrics port before it registers; a probe in between hears 503
    "starting", never "ok", and nothing is announced until the registration."""
    emulator = Emulator(log=tmp_path / "e.log")
    db = tmp_path / "jobs.db"
    url = f"sqlite:///{db}"
    cli("db", "upgrade", "--db", url)
    with socket.socket() as probe:  # a free port, to know where to look before anything is announced
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the registration waits for this (its busy timeout is 30 s)
    log = tmp_path / "d.log"
    daemon = None
    try:
        with open(log, "w") as err:
            daemon = subprocess.Popen([*FABRICFLOW, "daemon", "--db", url, "--fabric-url", emulator.url,
                                       "--metrics-port", str(port)], stdout=subprocess.DEVNULL, stderr=err,
                                      env=env())

        def answered() -> tuple[int, dict[str, Any]] | None:
            try:
                return health(f"http://127.0.0.1:{port}")
            except OSError:  # not bound yet
                return None

        status, body = wait_for("/healthz to answer", answered, timeout=20)
        assert (status, body["status"], body["seconds_since_heartbeat"]) == (503, "starting", None), body
        assert "starting: not registered yet" in body["problems"]
        assert log.read_text() == ""  # neither "fabricflow daemon ... on" nor "health and metrics on" yet
        assert query(db, "SELECT count(*) FROM daemons") == [(0,)]
        writer.rollback()
        wait_for("the metrics address", lambda: "health and metrics on" in log.read_text())
        status, body = health(f"http://127.0.0.1:{port}")
        assert (status, body["status"]) == (200, "ok"), body
        assert isinstance(body["seconds_since_heartbeat"], float)
        lines = log.read_text().splitlines()
        assert lines[0].startswith("fabricflow daemon ") and lines[1].startswith("health and metrics on")
    finally:
        writer.close()
        if daemon is not None:
            daemon.terminate()
            assert daemon.wait(timeout=30) == 0
        emulator.stop()


async def test_the_metrics_url_of_an_ipv6_host_is_bracketed():
    from orchestrator.engine.health import DaemonMetrics, serving

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with serving(DaemonMetrics(), owner="me", running=lambda: 0, lease_seconds=30, host="::1", port=0) as url:
        assert url.startswith("http://[::1]:")
        await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/metrics", timeout=10).read())  # it answers
