"""The first five minutes, as a new user meets them: real `fabricflow` processes, fresh files.

Many first users at once, Ctrl-C, a terminal (colours, progress lines), a busy port, a broken
state file, and what the quick commands import. Nothing here measures time: deadlines are
only safety nets.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import QUICKSTART
from tests.crash.procs import FABRICFLOW, Emulator, env, query

# Each process loads what submit imports, says so, and waits at a gate that the test opens for all
# of them at once: their first look at the new file then truly overlaps, on any machine.
GATED = """
import os, sys
from orchestrator.cli import main
import aiosqlite, alembic.command, orchestrator.store.jobs
ready, gate = int(sys.argv[1]), int(sys.argv[2])
os.write(ready, b".")
os.read(gate, 1)  # returns once the test has closed the gate's other end
main(sys.argv[3:], prog_name="fabricflow")
"""


@pytest.mark.timeout(600)
def test_twenty_first_submits_at_once_on_a_new_database_all_succeed(tmp_path):
    path = tmp_path / "new" / "jobs.db"  # neither the directory nor the file exists yet
    ready_r, ready_w = os.pipe()
    gate_r, gate_w = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", GATED, str(ready_w), str(gate_r),
                               "submit", str(QUICKSTART), "--db", f"sqlite:///{path}"],
                              pass_fds=(ready_w, gate_r), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env())
             for _ in range(20)]
    os.close(ready_w)
    os.close(gate_r)
    try:
        arrived = b""
        deadline = time.monotonic() + 300
        while len(arrived) < 20:
            assert time.monotonic() < deadline, f"only {len(arrived)} of 20 processes reached the gate"
            if select.select([ready_r], [], [], 1)[0]:
                arrived += os.read(ready_r, 20)
    finally:
        os.close(gate_w)  # open the gate: every process runs `fabricflow submit` now
        os.close(ready_r)
    outputs = [proc.communicate(timeout=300) for proc in procs]

    assert [proc.returncode for proc in procs] == [0] * 20, [err for _, err in outputs if err]
    assert [err for _, err in outputs] == [""] * 20
    ids = [out.strip() for out, _ in outputs]
    assert len(set(ids)) == 20 and all(len(job_id) == 32 for job_id in ids)
    assert sorted(row[0] for row in query(path, "SELECT id FROM jobs")) == sorted(ids)
    assert query(path, "SELECT count(*) FROM events") == [(20,)]  # one "submitted" event each


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_during_run_exits_130_and_says_where_the_job_stands(tmp_path, sent, code):
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    proc = subprocess.Popen([*FABRICFLOW, "run", str(QUICKSTART), "--db", db], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=env(FABRICFLOW_EMULATOR__READY_AFTER="600"))  # waits until interrupted
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "endpoint_ready    WAITING" in line:
            proc.send_signal(sent)
            break
    _, rest = proc.communicate(timeout=60)
    printed = "".join(seen) + rest

    assert proc.returncode == code, printed
    assert "stopped; job" in printed and "CANCELLED" in printed
    assert "Traceback" not in printed and "Aborted" not in printed
    assert query(tmp_path / "jobs.db", "SELECT state FROM jobs") == [("CANCELLED",)]


# --- on a terminal ------------------------------------------------------------------------------


def on_a_terminal(*args: str, until: str, send: int | None = None, timeout: float = 90,
                  **env_extra: str) -> tuple[int, str]:
    """Run fabricflow with stdout and stderr on a pseudo-terminal, as in a shell; once ``until``
    has been printed, send ``send`` (if given). Returns the exit code and everything printed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*FABRICFLOW, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=env(**env_extra))
    os.close(slave)
    printed = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"no end after {timeout}s; printed so far:\n{printed.decode()}"
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child has closed the terminal
                chunk = b""
            if not chunk:
                break
            printed += chunk
            if send is not None and until in printed.decode(errors="replace"):
                proc.send_signal(send)
                send = None
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = printed.decode(errors="replace").replace("\r\n", "\n")
    assert until in text, text
    return code, text


ANSI = "\x1b["


@pytest.mark.parametrize("no_color", [False, True])
def test_no_color_turns_off_ansi_colours_on_a_terminal(tmp_path, no_color):
    extra = {"NO_COLOR": "1"} if no_color else {}
    code, printed = on_a_terminal("daemon", "--log-level", "info", "--db", f"sqlite:///{tmp_path / 'jobs.db'}",
                                  until="daemon_started", send=signal.SIGTERM, **extra)
    assert code == 0, printed
    assert (ANSI in printed) is not no_color, printed  # coloured on a terminal, unless NO_COLOR


def test_retries_during_run_are_progress_lines_not_log_records(tmp_path):
    emulator = Emulator("--ready-after", "0.2", "--instance-ready-after", "0.2", log=tmp_path / "emulator.log")
    try:
        request = urllib.request.Request(f"{emulator.url}/_emulator/faults", method="POST",
                                         data=json.dumps({"fail_next": 2, "status": 503}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()
        code, printed = on_a_terminal("run", str(QUICKSTART), "--db", f"sqlite:///{tmp_path / 'jobs.db'}",
                                      "--fabric-url", emulator.url, until="SUCCEEDED")
    finally:
        emulator.stop()

    assert code == 0, printed
    # The job's first request: the catalogue check before its first create.
    retries = re.findall(r"^\[ *[\d.]+s\] workspace +retrying in [\d.]+s \(retry (\d)\): list spec_codes: "
                         r"HTTP 503", printed, re.MULTILINE)
    assert retries == ["1", "2"], printed
    assert "stamina.retry_scheduled" not in printed and ANSI not in printed
    assert not [line for line in printed.splitlines() if line.lstrip().startswith("{")], printed


# --- the emulator's start -----------------------------------------------------------------------


def emulator_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FABRICFLOW, "emulator", *args], capture_output=True, text=True, env=env(),
                          timeout=60, check=False)


def test_emulator_on_a_port_in_use_is_one_line_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = emulator_command("--port", str(port))
    assert result.returncode == 2
    assert result.stderr == (f"error: emulator: cannot listen on 127.0.0.1:{port} (--port): address already in use; "
                             "another process listens there (--port 0 picks a free one)\n")


@pytest.mark.parametrize("command", [("emulator", "--port", "0"), ("ui", "--port", "0")])
@pytest.mark.parametrize(("host", "reason"), [("not..host", "not a valid host name")])
def test_a_host_that_is_not_one_is_one_line_exit_2(tmp_path, command, host, reason):
    # "not..host" is refused by the IDNA codec here, before any name is looked up: no DNS query leaves.
    extra = ("--db", f"sqlite:///{tmp_path / 'ui.db'}") if command[0] == "ui" else ()
    if extra:
        assert subprocess.run([*FABRICFLOW, "db", "upgrade", *extra], capture_output=True, text=True,
                              env=env(), timeout=60, check=False).returncode == 0
    result = subprocess.run([*FABRICFLOW, *command, "--host", host, *extra], capture_output=True, text=True,
                            env=env(), timeout=60, check=False)
    assert (result.returncode, result.stderr) == (2, f"error: {command[0]}: cannot listen on {host}:0 (--host): "
                                                     f"{reason}\n")


@pytest.mark.parametrize(("args", "message"), [
    (("--create-fail", "("), "error: emulator: --create-fail: '(' is not a regular expression: missing ), "
                             "unterminated subpattern at position 0\n"),
    (("--fail-rate", "0.2", "--page-churn", "0.5", "--late-by", "1", "--list-lag", "0", "--auth", "token"),
     "error: emulator: auth='token' needs a token\n"),
])
def test_emulator_option_errors_name_the_option(args, message):
    result = emulator_command("--port", "0", *args)
    assert (result.returncode, result.stderr) == (2, message)


def test_emulator_refuses_negative_delays():
    result = emulator_command("--port", "0", "--ready-after", "-5")
    assert result.returncode == 2
    assert "Invalid value for '--ready-after': -5.0 is not in the range x>=0." in result.stderr


@pytest.mark.parametrize(("content", "reason"), [
    ("{garbage", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[1, 2]", "a JSON object was expected, not list"),
    ('{"resources": [{"kind": "workspace"}]}', "missing field 'created_at'"),
])
def test_emulator_with_a_broken_state_file_is_one_line_exit_2(tmp_path, content, reason):
    state = tmp_path / "state.json"
    state.write_text(content)
    result = emulator_command("--port", "0", "--state-file", str(state))
    assert result.returncode == 2
    assert result.stderr == f"error: emulator: --state-file {state}: not an emulator state file ({reason})\n"
    assert state.read_text() == content  # left as it was


def test_emulator_state_file_in_a_missing_directory_is_refused_at_start(tmp_path):
    result = emulator_command("--port", "0", "--state-file", str(tmp_path / "nowhere" / "state.json"))
    assert result.returncode == 2
    assert result.stderr == f"error: emulator: --state-file {tmp_path / 'nowhere' / 'state.json'}: " \
                            f"no directory {tmp_path / 'nowhere'}\n"


# --- what the quick commands import -------------------------------------------------------------

# Counting imported modules stands in for timing them: it does not depend on the machine.
PROBE = """
import json, sys
from orchestrator.cli import main
code = None
try:
    main(sys.argv[1:], prog_name="fabricflow")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""
HEAVY = ("alembic", "aiohttp", "aiosqlite", "sqlalchemy.ext.asyncio", "sqlalchemy.orm", "structlog", "yaml",
         "orchestrator.spec", "orchestrator.store.jobs", "orchestrator.engine", "orchestrator.fabric")


def imported_by(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env(),
                            timeout=60, check=False)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), result
    return report["modules"]


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if any(m == name or m.startswith(name + ".") for m in modules)]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["list", "--help"]])
def test_help_and_version_import_no_database_or_settings_machinery(args):
    modules = imported_by(*args)
    assert _loaded(modules, ("sqlalchemy", "pydantic", "pydantic_settings", "orchestrator.config", *HEAVY)) == []


def test_list_and_show_read_sqlite_without_sqlalchemy_alembic_or_aiohttp(tmp_path):
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    submitted = subprocess.run([*FABRICFLOW, "submit", str(QUICKSTART), "--db", db], capture_output=True,
                               text=True, env=env(), timeout=60, check=True)
    job_id = submitted.stdout.strip()
    for args in (["list", "--db", db], ["show", job_id[:8], "--db", db], ["events", job_id, "--db", db]):
        assert _loaded(imported_by(*args), HEAVY) == [], args
