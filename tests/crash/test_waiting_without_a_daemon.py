"""The waiting commands (submit --wait, teardown --wait, cancel --wait) on a database where no
daemon is alive: one notice on stderr saying so, as `fabricflow status` judges the registry,
and the wait goes on until a daemon started later has run the job. Real daemon and emulator
processes, a real SQLite file."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from orchestrator.api import Fabricflow
from orchestrator.cli_waiting import DaemonWatch, no_daemon_notice
from tests.conftest import EXAMPLE_QUICKSTART, QUICKSTART
from tests.crash.procs import FABRICFLOW, Daemon, Emulator, cli, env, query, wait_for


def notice(url: str, fabric_url: str) -> str:
    return no_daemon_notice(f"fabricflow daemon --db {url} --fabric-url {fabric_url}")


class Waiting:
    """A waiting command in its own process, its stderr collected line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*FABRICFLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env())
        self.lines: list[str] = []
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def said(self, line: str) -> int:
        return self.lines.count(line)

    def wait(self, timeout: float = 120) -> int:
        """Its exit code, once it has ended; its stdout is then in ``stdout``."""
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()  # a few lines: the pipe never fills
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def quick(tmp_path: Path):
    emu = Emulator("--ready-after", "0.2", "--instance-ready-after", "0.2", log=tmp_path / "emulator.log")
    yield emu
    emu.stop()


@pytest.fixture
def slow(tmp_path: Path):
    # Endpoints stay CREATING for the whole test: a job is held, waiting, while we look.
    emu = Emulator("--ready-after", "600", log=tmp_path / "emulator.log")
    yield emu
    emu.stop()


async def test_the_watch_says_it_once_and_again_only_after_a_daemon_was_alive(tmp_path, slow):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
    ended = cli("submit", str(EXAMPLE_QUICKSTART), "--db", url).stdout.strip()
    cli("cancel", ended, "--db", url)  # PENDING: CANCELLED at once
    flow = await Fabricflow.open(url, fabric_url=slow.url)
    daemon = None
    try:
        said = notice(url, slow.url)
        watch = DaemonWatch(flow, [job_id], f"fabricflow daemon --db {url} --fabric-url {slow.url}")
        # Ten looks, no daemon: said at the first, not repeated at the nine after it.
        assert [await watch.look() for _ in range(10)] == [said] + [None] * 9
        # Nothing is said for jobs that have all ended: nothing is waited for.
        assert [await DaemonWatch(flow, [ended], "x").look() for _ in range(3)] == [None] * 3

        daemon = Daemon(url, slow.url, tmp_path / "daemon.log", FABRICFLOW_DAEMON__LEASE_SECONDS="600")
        wait_for("the daemon holding the job", lambda: query(
            tmp_path / "jobs.db", "SELECT 1 FROM jobs WHERE id = ? AND state = 'RUNNING'", job_id), timeout=60)
        assert [await watch.look() for _ in range(5)] == [None] * 5  # alive: nothing to say
        daemon.kill()
        # Its process is gone from this machine: stale at the first look, long before its lease
        # (600 s) is over, as `status` judges it. Said again, once.
        assert [await watch.look() for _ in range(5)] == [said] + [None] * 4
        assert [d.state for d in await flow.daemons()] == ["stale"]
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.kill()
        await flow.close()


@pytest.mark.timeout(240)
def test_submit_and_teardown_wait_say_no_daemon_is_alive_once_and_go_on_when_one_runs_the_job(tmp_path, quick):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    said = notice(url, quick.url)
    submit = Waiting("submit", str(QUICKSTART), "--wait", "--db", url, "--fabric-url", quick.url)
    daemon = None
    try:
        wait_for("the notice", lambda: submit.said(said), timeout=60)
        assert submit.proc.poll() is None  # still waiting
        daemon = Daemon(url, quick.url, tmp_path / "daemon.log")
        assert submit.wait() == 0
        job_id = submit.stdout.strip()
        assert submit.said(said) == 1, submit.lines
        assert submit.lines.index(said) < next(i for i, line in enumerate(submit.lines) if "SUCCEEDED" in line)
        assert daemon.terminate() == 0
        daemon = None

        teardown = Waiting("teardown", job_id, "--wait", "--db", url, "--fabric-url", quick.url)
        try:
            wait_for("the teardown's notice", lambda: teardown.said(said), timeout=60)
            daemon = Daemon(url, quick.url, tmp_path / "second.log")
            assert teardown.wait() == 0, teardown.lines
            assert teardown.said(said) == 1, teardown.lines
        finally:
            teardown.stop()
    finally:
        submit.stop()
        if daemon is not None:
            daemon.terminate()


@pytest.mark.timeout(240)
def test_submit_wait_of_several_jobs_says_it_once(tmp_path, quick):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    said = notice(url, quick.url)
    submit = Waiting("submit", str(EXAMPLE_QUICKSTART), "--count", "2", "--wait", "--db", url,
                     "--fabric-url", quick.url)
    daemon = None
    try:
        wait_for("the notice", lambda: submit.said(said), timeout=60)
        daemon = Daemon(url, quick.url, tmp_path / "daemon.log")
        assert submit.wait() == 0, submit.lines
        assert submit.said(said) == 1, submit.lines
        assert sum(" SUCCEEDED" in line for line in submit.lines) == 2
    finally:
        submit.stop()
        if daemon is not None:
            daemon.terminate()


@pytest.mark.timeout(240)
def test_cancel_wait_of_a_job_whose_daemon_was_killed_says_it_and_ends_once_another_takes_over(tmp_path, slow):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
    first = Daemon(url, slow.url, tmp_path / "first.log", FABRICFLOW_DAEMON__LEASE_SECONDS="600")
    wait_for("the job waiting for its endpoint", lambda: query(
        tmp_path / "jobs.db", "SELECT 1 FROM steps WHERE job_id = ? AND name = 'endpoint_ready' AND state = 'WAITING'",
        job_id), timeout=60)
    first.kill()  # its job stays RUNNING under a lease of ten minutes
    said = notice(url, slow.url)
    cancel = Waiting("cancel", job_id, "--wait", "--db", url, "--fabric-url", slow.url)
    second = None
    try:
        wait_for("the notice", lambda: cancel.said(said), timeout=60)
        # On the same machine, a new daemon takes a dead process's job over at once; the job then
        # stops at its next safe point.
        second = Daemon(url, slow.url, tmp_path / "second.log")
        assert cancel.wait() == 0, cancel.lines
        assert cancel.said(said) == 1, cancel.lines
        assert query(tmp_path / "jobs.db", "SELECT state FROM jobs WHERE id = ?", job_id) == [("CANCELLED",)]
    finally:
        cancel.stop()
        if second is not None:
            second.terminate()
