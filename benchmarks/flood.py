"""A flood of jobs: submit thousands in one command, watch one daemon take them all, kill it, restart.

    python benchmarks/flood.py                      # 10,000 jobs, then kill -9 with them in flight
    python benchmarks/flood.py --jobs 1000 --window 20

1. ``fabricflow submit SPEC --count N`` (names templated with ``{index}``) into a fresh SQLite
   file: the command's wall time and the IDs it printed.
2. An emulator in its own process whose endpoints stay CREATING (``--ready-after`` far away)
   and ``fabricflow daemon`` (concurrency N, status polls every ``--interval`` seconds): the
   time until every job is claimed and waiting on its endpoint (``endpoint_ready`` WAITING).
3. Over ``--window`` seconds of waiting: the endpoint status GETs the emulator served, per
   endpoint per interval (the target: one), and the daemon's peak RSS (VmHWM).
4. kill -9 of the daemon with all N jobs in flight, and a new daemon: the time from its start
   until every job carries a "recovered by" event of the new daemon, and until every endpoint
   was polled again.

Prints one JSON object. Everything on 127.0.0.1; every child is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
FABRICFLOW = [sys.executable, "-m", "orchestrator"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICFLOW_", "HUAWEICLOUD_SDK_"))}
    env.update({"HUAWEICLOUD_SDK_CREDENTIALS_FILE": "/nonexistent/fabricflow-bench/credentials",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def templated_spec(workdir: Path) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["name"] = "flood-{index}"
    data["workspace"]["name"] = "flws-{index}"
    data["endpoint"]["name"] = "flep-{index}"
    data["model"]["name"] = "flm-{index}"
    data["service_instance"]["name"] = "flsi-{index}"
    path = workdir / "flood.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def count(db: Path, sql: str, *params: Any) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return int(conn.execute(sql, params).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=30) as resp:
        return json.loads(resp.read())


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_until(what: str, check: Any, timeout: float, every: float = 0.2) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--interval", type=float, default=None,
                        help="status poll interval, seconds (default: the configured backoff, 1 s doubling "
                             "to 30 s, whose cap is then the interval)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of waiting to count polls over")
    parser.add_argument("--timeout", type=float, default=300.0, help="safety net per phase, seconds")
    args = parser.parse_args()
    n = args.jobs
    children: list[subprocess.Popen[Any]] = []
    interval = args.interval or 30.0
    result: dict[str, Any] = {"benchmark": "flood", "jobs": n, "poll_interval_s": interval}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        db = workdir / "flood.db"
        url = f"sqlite:///{db}"
        try:
            spec = templated_spec(workdir)
            started = time.perf_counter()
            submitted = subprocess.run([*FABRICFLOW, "submit", str(spec), "--count", str(n), "--db", url],
                                       capture_output=True, text=True, env=child_env(), timeout=args.timeout)
            result["submit_seconds"] = round(time.perf_counter() - started, 2)
            if submitted.returncode != 0:
                raise RuntimeError(f"submit failed: {submitted.stderr}")
            result["ids_printed"] = len(submitted.stdout.split())
            emulator = subprocess.Popen([*FABRICFLOW, "emulator", "--host", "127.0.0.1", "--port", "0",
                                         "--ready-after", "100000"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=child_env())
            children.append(emulator)
            assert emulator.stderr is not None
            emu_url = emulator.stderr.readline().split("listening on ", 1)[1].split()[0]
            settings = {"FABRICFLOW_DAEMON__CONCURRENCY": str(n + 100), "FABRICFLOW_LOG_LEVEL": "warning"}
            if args.interval:
                settings.update(FABRICFLOW_POLL__INITIAL=str(interval), FABRICFLOW_POLL__MAX=str(interval))
            waiting = ("SELECT count(*) FROM steps WHERE name = 'endpoint_ready' AND state = 'WAITING'")

            def start_daemon(log: str) -> subprocess.Popen[Any]:
                proc = subprocess.Popen([*FABRICFLOW, "daemon", "--db", url, "--fabric-url", emu_url],
                                        stdout=open(workdir / log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                        env=child_env(**settings))
                children.append(proc)
                return proc

            daemon = start_daemon("daemon1.log")
            result["all_waiting_seconds"] = round(wait_until(
                "every job to wait on its endpoint", lambda: count(db, waiting) >= n, args.timeout), 1)
            if not args.interval:
                time.sleep(interval)  # past the backoff's ramp: every wait polls at the cap now
            before = stats(emu_url)["operations"].get("show_endpoint", 0)
            time.sleep(args.window)
            polls = stats(emu_url)["operations"].get("show_endpoint", 0) - before
            result["endpoint_gets_per_endpoint_per_interval"] = round(polls / n / (args.window / interval), 2)
            result["peak_rss_mb"] = round(peak_rss_mb(daemon.pid), 1)
            created = stats(emu_url)["created"]
            result["duplicates"] = sum(c > 1 for kind in created.values() for c in kind.values())

            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            in_flight = count(db, "SELECT count(*) FROM jobs WHERE state = 'RUNNING'")
            result["in_flight_at_kill"] = in_flight
            mark = count(db, "SELECT coalesce(max(id), 0) FROM events")
            polled_before = stats(emu_url)["operations"].get("show_endpoint", 0)
            restarted = time.perf_counter()
            daemon = start_daemon("daemon2.log")
            recovered = ("SELECT count(DISTINCT job_id) FROM events WHERE id > ? AND detail LIKE 'recovered by %'")
            wait_until("every job to be recovered", lambda: count(db, recovered, mark) >= in_flight, args.timeout,
                       every=0.05)
            result["recovered_all_seconds"] = round(time.perf_counter() - restarted, 2)
            wait_until("every endpoint to be polled again",
                       lambda: stats(emu_url)["operations"].get("show_endpoint", 0) - polled_before >= in_flight,
                       args.timeout, every=0.1)
            result["polling_again_seconds"] = round(time.perf_counter() - restarted, 2)
            result["peak_rss_mb_after_restart"] = round(peak_rss_mb(daemon.pid), 1)
            created = stats(emu_url)["created"]
            result["duplicates"] += sum(c > 1 for kind in created.values() for c in kind.values())
        finally:
            for proc in children:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in children:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
