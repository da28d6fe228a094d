"""Exit code 4 for commands whose own requests Fabric does not answer, and the retries of
`plan` and `orphans` before they give up: the CLI as a subprocess, against a closed loopback
port or a real emulator process with injected faults, asserted by the emulator's request counts.

The subprocesses run with the engine's retry settings shortened (tests/crash/procs.env: 50 ms
backoff, 200 ms cap); FABRICFLOW_RETRY__MAX_ATTEMPTS sets the limit where a test counts on it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLE_QUICKSTART, QUICKSTART
from tests.crash.procs import FABRICFLOW, Emulator, env

#: Each read is tried 3 times within the client's call (FabricClient.read_attempts).
IN_CALL = 3
STRANGER = "0123456789abcdef"


def fabricflow(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FABRICFLOW, *args], capture_output=True, text=True, env=env(**extra_env),
                          timeout=110)


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    return done.stderr.strip().splitlines()[-1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def create_workspaces(url: str, names: list[str], description: str) -> None:
    """Create them through any injected fault (a fault is answered before anything is done)."""
    for name in names:
        while True:
            try:
                post(url, "/v1/workspaces", {"name": name, "description": description})
                break
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code not in (429, 500, 502, 503, 504):
                    raise


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator("--ready-after", "0.1", "--instance-ready-after", "0.1", log=tmp_path / "emulator.log")
    yield emu
    emu.stop()


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    assert fabricflow("db", "upgrade", "--db", url).returncode == 0
    return url


# --- Fabric down ---------------------------------------------------------------------------------


def test_plan_against_a_closed_port_exits_4_with_the_message():
    port = closed_port()

    done = fabricflow("plan", str(EXAMPLE_QUICKSTART), "--fabric-url", f"http://127.0.0.1:{port}",
                      FABRICFLOW_RETRY__MAX_ATTEMPTS="2")

    assert done.returncode == 4, done.stderr
    assert last_line(done) == ("error: gave up after 2 attempts: list spec_codes: cannot connect: "
                               f"[Errno 111] Connect call failed ('127.0.0.1', {port})")
    assert done.stdout == ""


def test_orphans_against_a_closed_port_exits_4_with_the_message(db):
    port = closed_port()

    done = fabricflow("orphans", "--db", db, "--fabric-url", f"http://127.0.0.1:{port}",
                      FABRICFLOW_RETRY__MAX_ATTEMPTS="2")

    assert done.returncode == 4, done.stderr
    assert last_line(done) == ("error: gave up after 2 attempts: list workspaces: cannot connect: "
                               f"[Errno 111] Connect call failed ('127.0.0.1', {port})")
    assert done.stdout == ""


@pytest.mark.parametrize(("command", "listing"), [("plan", "list spec_codes"), ("orphans", "list workspaces")])
def test_a_persistent_5xx_exits_4_after_the_steps_retry_limit(emulator, db, command, listing):
    post(emulator.url, "/_emulator/faults", {"fail_next": 1000, "status": 500})
    args = [str(EXAMPLE_QUICKSTART)] if command == "plan" else ["--db", db]

    done = fabricflow(command, *args, "--fabric-url", emulator.url, FABRICFLOW_RETRY__MAX_ATTEMPTS="4")

    assert done.returncode == 4, done.stderr
    assert last_line(done) == (f"error: gave up after 4 attempts: {listing}: HTTP 500 FABRIC.0500: "
                               "Internal server error (injected by the emulator)")
    # retry.max_attempts calls, each a read the client tries 3 times: and not one request more.
    assert emulator.stats()["requests"] == 4 * IN_CALL


# --- Fabric flaky: orphans rides it out, as jobs do ------------------------------------------------


def test_orphans_rides_out_more_5xx_in_a_row_than_the_in_call_retries(emulator, db):
    names = ["lostws-a", "lostws-b"]
    create_workspaces(emulator.url, names, f"x [fabricflow:{STRANGER}]")
    before = emulator.stats()["requests"]
    post(emulator.url, "/_emulator/faults", {"fail_next": 5, "status": 503})

    done = fabricflow("orphans", "--db", db, "--fabric-url", emulator.url, "--json")

    assert done.returncode == 0, done.stderr
    assert sorted(o["name"] for o in json.loads(done.stdout)["orphans"]) == names
    # The workspaces' listing: 3 failed tries, then 2 more and the answer; then 3 listings in each.
    assert emulator.stats()["requests"] - before == (5 + 1) + 3 * len(names)


def test_orphans_succeeds_against_a_fail_rate_of_a_fifth(tmp_path, db):
    emu = Emulator("--fail-rate", "0.2", "--seed", "3", log=tmp_path / "flaky.log")
    try:
        names = [f"lostws-{i:03d}" for i in range(60)]
        create_workspaces(emu.url, names, f"x [fabricflow:{STRANGER}]")
        before = emu.stats()["requests"]

        done = fabricflow("orphans", "--db", db, "--fabric-url", emu.url, "--json")

        assert done.returncode == 0, done.stderr
        assert sorted(o["name"] for o in json.loads(done.stdout)["orphans"]) == names
        sent = emu.stats()["requests"] - before
    finally:
        emu.stop()
    listings = 1 + 3 * len(names)  # the workspaces (one page), then three listings in each
    assert sent > listings, (sent, listings)  # the rest were injected faults, retried


# --- the user's own mistakes stay 2 -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "orphans"])
def test_credentials_fabric_refuses_exit_2_without_retries(tmp_path, db, command):
    emu = Emulator("--auth", "token", "--token", "right-token", log=tmp_path / "auth.log")
    try:
        args = [str(EXAMPLE_QUICKSTART)] if command == "plan" else ["--db", db]
        done = fabricflow(command, *args, "--fabric-url", emu.url, FABRICFLOW_AUTH_TOKEN="wrong-token")
        requests = emu.stats()["requests"]
    finally:
        emu.stop()

    assert done.returncode == 2, done.stderr
    listing = "list spec_codes" if command == "plan" else "list workspaces"
    assert last_line(done) == (f"error: {listing}: HTTP 401 APIGW.0301: Incorrect IAM authentication "
                               "information: decrypt token fail")
    assert requests == 1


def test_a_400_from_fabric_is_exit_2_and_a_refused_spec_still_2(emulator, tmp_path):
    post(emulator.url, "/_emulator/faults", {"fail_next": 1, "status": 400})
    done = fabricflow("plan", str(EXAMPLE_QUICKSTART), "--fabric-url", emulator.url)
    assert done.returncode == 2, done.stderr
    assert last_line(done) == "error: list spec_codes: HTTP 400 FABRIC.0400: Injected fault"
    assert emulator.stats()["requests"] == 1

    spec = tmp_path / "taken.yaml"
    spec.write_text(QUICKSTART.read_text().replace("mu.llama3.8b", "mu.nonesuch"))
    done = fabricflow("plan", str(spec), "--fabric-url", emulator.url)
    assert done.returncode == 2, done.stderr
    assert last_line(done) == f"error: {spec}: run would refuse this spec (endpoint)"


# --- invoke: its own request ------------------------------------------------------------------------


def test_invoke_exits_4_when_fabric_fails_or_is_gone_and_2_when_it_refuses(tmp_path):
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    emu = Emulator("--ready-after", "0.1", "--instance-ready-after", "0.1", log=tmp_path / "emulator.log")
    try:
        ran = fabricflow("run", str(QUICKSTART), "--db", db, "--fabric-url", emu.url, "--json")
        assert ran.returncode == 0, ran.stderr
        job_id = json.loads(ran.stdout)["id"]

        post(emu.url, "/_emulator/faults", {"fail_next": 1, "status": 503})
        down = fabricflow("invoke", job_id, "hi", "--db", db, "--fabric-url", emu.url, "--json")
        assert down.returncode == 4, down.stderr
        assert last_line(down) == ("error: invoke service instance: HTTP 503 APIGW.0503: Service unavailable "
                                   "(injected by the emulator)")
        record = json.loads(down.stdout)  # --json prints the stored record, with its error
        assert record["error"]["code"] == "APIGW.0503" and record["reply"] is None

        post(emu.url, "/_emulator/faults", {"fail_next": 1, "status": 400})
        refused = fabricflow("invoke", job_id, "hi", "--db", db, "--fabric-url", emu.url)
        assert refused.returncode == 2, refused.stderr
        assert last_line(refused) == "error: invoke service instance: HTTP 400 FABRIC.0400: Injected fault"

        answered = fabricflow("invoke", job_id, "hi", "--db", db, "--fabric-url", emu.url)
        assert answered.returncode == 0, answered.stderr
    finally:
        emu.stop()

    gone = fabricflow("invoke", job_id, "hi", "--db", db, "--fabric-url", emu.url)
    assert gone.returncode == 4, gone.stderr
    assert last_line(gone) == "error: invoke service instance: stream interrupted after 0 chunks " \
                              "(ClientConnectorError)"


def test_help_texts_list_exit_4():
    for command in ("plan", "orphans", "invoke", "run"):
        text = fabricflow(command, "--help").stdout
        assert " 4 when " in " ".join(text.split()), command
