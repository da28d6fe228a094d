"""Real processes for crash tests: the emulator and the daemon, started as a user would."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

FABRICFLOW = [sys.executable, "-m", "orchestrator"]


def env(**extra: str) -> dict[str, str]:
    """The environment for child processes: fast polling, short leases, no user config."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICFLOW_", "HUAWEICLOUD_SDK_"))}
    base.update({
        "FABRICFLOW_POLL__INITIAL": "0.1",
        "FABRICFLOW_POLL__MAX": "0.3",
        "FABRICFLOW_RETRY__BACKOFF_BASE": "0.05",
        "FABRICFLOW_RETRY__BACKOFF_CAP": "0.2",
        "FABRICFLOW_DAEMON__CLAIM_INTERVAL": "0.1",
        "FABRICFLOW_DAEMON__HEARTBEAT_SECONDS": "1",
        "FABRICFLOW_DAEMON__LEASE_SECONDS": "5",
        "FABRICFLOW_HTTP__CREATE_TIMEOUT": "3",
        # After an unknown outcome, look for 3 s (the create timeout) before creating again.
        "FABRICFLOW_RECONCILE__SETTLE_SECONDS": "3",
        "FABRICFLOW_RECONCILE__LOOK_INTERVAL": "0.3",
        "PYTHONUNBUFFERED": "1",
        # Never the developer's own ~/.huaweicloud/credentials.
        "HUAWEICLOUD_SDK_CREDENTIALS_FILE": "/nonexistent/fabricflow-tests/credentials",
    })
    base.update(extra)
    return base


class Emulator:
    """``fabricflow emulator`` in its own process on a free loopback port."""

    def __init__(self, *args: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [*FABRICFLOW, "emulator", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "fabricflow emulator listening on http://127.0.0.1:PORT ..."
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.url = line.split("listening on ", 1)[1].split()[0]
        # The rest of its stderr goes to the log file: left in the pipe, a long run's output (an
        # aiohttp warning per connection that a killed daemon left) fills it and blocks the emulator.
        self._drain = threading.Thread(target=self._copy_stderr, name="emulator-stderr", daemon=True)
        self._drain.start()

    def _copy_stderr(self) -> None:
        assert self.proc.stderr is not None
        with open(self.log, "a") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_emulator/stats", timeout=60) as resp:
            return json.loads(resp.read())

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=60) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        drain = getattr(self, "_drain", None)  # absent when it failed to start
        if drain is not None:
            drain.join(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


class Daemon:
    """``fabricflow daemon`` in its own process; its output goes to a log file."""

    def __init__(self, db_url: str, fabric_url: str, log: Path, *, command: list[str] | None = None,
                 **env_extra: str) -> None:
        self.log_file = open(log, "a")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [*(command or FABRICFLOW), "daemon", "--db", db_url, "--fabric-url", fabric_url],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=env(**env_extra),
        )

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as with a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log_file.close()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the drain; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.log_file.close()
        return code


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a fabricflow command and capture its output."""
    result = subprocess.run([*FABRICFLOW, *args], capture_output=True, text=True, env=env(), timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"fabricflow {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def query(db_file: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the job database directly, as a user with sqlite3 would."""
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 30.0, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except sqlite3.OperationalError:  # the file or its tables do not exist yet
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
