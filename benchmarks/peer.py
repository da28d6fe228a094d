"""fabricflow beside its peer, DBOS Transact, running the same procedure against one emulator.

    python benchmarks/peer.py
    python benchmarks/peer.py --jobs 500 --concurrency 100 --reps 3 --ready-after 0.5 --instance-ready-after 0.2
    python benchmarks/peer.py --jobs 50 --concurrency 20 --reps 1 --only fabricflow

Starts ONE emulator (``fabricflow emulator --host 127.0.0.1 --port 0``) for the whole run and
resets it (``POST /_emulator/reset``) before each engine's turn. Each repetition runs both
engines, alternating their order (rep 1: fabricflow then DBOS, rep 2: DBOS then fabricflow, ...),
and reports ratios taken within the repetition, since absolute figures move from run to run.

fabricflow: N jobs (names as the peer's: job-<i>-ws, -ep, -model, -svc) are submitted to a fresh
SQLite file in this process (not measured), then ``fabricflow daemon`` is started as a child
with the peer's polling (status polls, claim interval: ``--poll``, default 0.1 s, the peer's
poll_sleep and queue_poll). ``seconds`` runs from the daemon's start to all N jobs terminal
(the file is read every 0.1 s); then the daemon is sent SIGTERM and its CPU time and peak RSS
are taken from ``os.wait4``.

DBOS: ``dbos_pipeline.py`` (from ``--peer-dir``, default ../shared/peer-bench beside the repo,
run where it is) in its own virtual environment (``--dbos-venv``, created on first use), with
the same jobs, concurrency and polling; ``seconds`` and ``jobs_per_s`` are its own (enqueue to
all finished), CPU and peak RSS come from ``os.wait4`` as for fabricflow; what it reports
itself is kept under ``reported``.

Per engine: jobs_per_s, cpu_ms_per_job (whole process, interpreter start included),
run_cpu_ms_per_job (fabricflow: from its first claim on; DBOS: its own figure, from enqueue on),
peak_rss_mb, seconds, requests_per_job (the emulator's count) and operations_per_job (the same
count by Fabric operation: creates, lists, status reads, invocations), emulator_cpu_ms_per_job
(the emulator process's CPU during the engine's turn, per job: the two share the machine's
cores), failed, duplicates (names the
emulator saw created more than once), write_commits_per_job (SQLAlchemy commits that wrote, the
peer's ``--count-db`` method, in both engines; fabricflow's include its submission commits as
DBOS's include its enqueue commits; off with ``--no-count-db``) and, for fabricflow,
events_per_job (rows of its events log, the submission's included) and step_seconds (the median
time of each step, from its events, and of the whole job from its claim: the least a job can
take here, at the emulator's readiness and streaming delays, whatever the engine).
After the runs, ``bounds`` sets the store issue's targets (10x DBOS's jobs/s, a tenth of its CPU
per job) beside what this set-up allows any engine: jobs_per_s_cap (concurrency over the emulator's
two readiness delays), and the CPU of the bare HTTP client (one aiohttp GET, measured in a process
of its own against the same emulator, times fabricflow's requests per job) and of fabricflow's
start-up; ``--no-floor`` skips the measurement.
Prints one JSON object; progress goes to stderr. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = ("fabricflow", "dbos")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
DBOS_REQUIREMENTS = ("dbos>=3,<4", "aiohttp", "aiosqlite", "sqlalchemy[asyncio]>=2")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The peer's --count-db method (SQLAlchemy commits and statements of every engine in the
# process), loaded into the fabricflow daemon as a sitecustomize module; counts written at exit.
COUNTER_SOURCE = textwrap.dedent('''
    import atexit, json, os
    import sqlalchemy as sa

    COUNTS = {"commits": 0, "write_commits": 0, "statements": 0, "dml": 0}

    def _on_exec(conn, cursor, statement, params, context, executemany):
        COUNTS["statements"] += 1
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            COUNTS["dml"] += 1
            conn.info["dml"] = True

    def _on_commit(conn):
        COUNTS["commits"] += 1
        if conn.info.pop("dml", False):
            COUNTS["write_commits"] += 1

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", _on_exec)
    sa.event.listen(sa.engine.Engine, "commit", _on_commit)

    # fabricflow's group-commit writer commits through the plain sqlite3 driver: count its
    # batches (one write commit each) and their statements too.
    try:
        from orchestrator.store import writer as _writer
    except ImportError:
        _writer = None
    if _writer is not None and hasattr(_writer, "SQLiteWriter"):
        _real_commit = _writer.SQLiteWriter._commit

        def _commit(self, conn, batch):
            before = self._statements
            outcomes = _real_commit(self, conn, batch)
            COUNTS["commits"] += 1
            COUNTS["write_commits"] += 1
            COUNTS["dml"] += self._statements - before
            COUNTS["statements"] += self._statements - before
            return outcomes

        _writer.SQLiteWriter._commit = _commit

    def _dump():
        path = os.environ.get("FABRICFLOW_BENCH_DB_COUNTS")
        if path:
            with open(path, "w") as handle:
                json.dump(COUNTS, handle)

    atexit.register(_dump)
''')


def log(message: str) -> None:
    print(f"[peer] {message}", file=sys.stderr, flush=True)


def child_env(**extra: str) -> dict[str, str]:
    """This environment without fabricflow settings or cloud credentials, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICFLOW_", "HUAWEICLOUD_SDK_"))}
    env.update({"PYTHONUNBUFFERED": "1",
                "HUAWEICLOUD_SDK_CREDENTIALS_FILE": "/nonexistent/fabricflow-bench/credentials"})
    env.update(extra)
    return env


# --- child processes -----------------------------------------------------------------------------


class Child:
    """A child process whose resource usage is collected with ``os.wait4``."""

    def __init__(self, cmd: list[str], *, log_path: Path, env: dict[str, str], cwd: Path,
                 stdout: Path | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in _reaped()
        self._out = open(stdout, "w") if stdout else None  # noqa: SIM115
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out or self._log,
                                     stderr=self._log, env=env, cwd=cwd)
        self.exit_code: int | None = None
        self.rusage: Any = None
        self.ended: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> bool:
        """True once the child has exited (reaping it and keeping its rusage)."""
        if self.exit_code is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status, usage)
        return self.exit_code is not None

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL."""
        if self.poll():
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        if not self.wait(timeout):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(10)

    def _reaped(self, status: int, usage: Any) -> None:
        self.ended = time.perf_counter()
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.exit_code  # so Popen never waits for it again
        self.rusage = usage
        self._log.close()
        if self._out:
            self._out.close()

    def cpu_s(self) -> float:
        return self.rusage.ru_utime + self.rusage.ru_stime

    def peak_rss_mb(self) -> float:
        return self.rusage.ru_maxrss / 1024  # kilobytes on Linux

    def live_cpu_s(self) -> float | None:
        """CPU time so far, from /proc (Linux), while the child runs."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Emulator:
    """One ``fabricflow emulator`` on a free loopback port, for the whole run."""

    def __init__(self, workdir: Path, ready_after: float, instance_ready_after: float) -> None:
        cmd = [sys.executable, "-m", "orchestrator", "emulator", "--host", "127.0.0.1", "--port", "0",
               "--ready-after", str(ready_after), "--instance-ready-after", str(instance_ready_after)]
        self.child = Child(cmd, log_path=workdir / "emulator.log", env=child_env(), cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            text = self.child.log_path.read_text(errors="replace")
            if "listening on " in text:
                self.url = text.split("listening on ", 1)[1].split()[0].rstrip("/")
                break
            if self.child.poll() or time.monotonic() > deadline:
                self.child.stop()
                raise RuntimeError(f"emulator did not start:\n{self.child.log_tail()}")
            time.sleep(0.05)
        if not self.url.startswith("http://127.0.0.1:"):
            self.child.stop()
            raise RuntimeError(f"emulator is not on 127.0.0.1: {self.url}")

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         data=b"{}" if method == "POST" else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_emulator/stats")

    def reset(self) -> None:
        self._call("POST", "/_emulator/reset")

    def stop(self) -> None:
        self.child.stop(timeout=10)


def emulator_counts(stats: dict[str, Any], jobs: int) -> dict[str, Any]:
    created = stats["created"]
    return {
        "requests_per_job": round(stats["requests"] / jobs, 2),
        "operations_per_job": {op: round(count / jobs, 2) for op, count in sorted(stats.get("operations", {}).items())},
        "duplicates": sum(count > 1 for names in created.values() for count in names.values()),
        "created": {kind: len(names) for kind, names in created.items()},
    }


# --- fabricflow ----------------------------------------------------------------------------------


def spec_data(i: int) -> dict[str, Any]:
    """Job i of the peer's pipeline, as a fabricflow spec (same names, same bodies where they can be)."""
    base = f"job-{i}"
    return {
        "name": base,
        "workspace": {"name": f"{base}-ws", "description": "peer bench"},
        "endpoint": {"name": f"{base}-ep", "description": "peer bench", "type": "inference",
                     "reserved_resource": {"mu": {"spec_code": "mu.llama3.8b", "min": 1, "max": 1}}},
        "model": {"name": f"{base}-model", "description": "peer bench", "type": "LLM_MODEL",
                  "version": {"name": "v1", "description": "v1",
                              "config": {"llm_model_config": {"base_model_type": "", "model_path": ""}}}},
        "service_instance": {"name": f"{base}-svc", "description": "peer bench"},
        "invocation": {"messages": [{"role": "user", "content": f"hello from {base}"}]},
    }


class CommitCounter:
    """The peer's --count-db counters, for this process's own SQLAlchemy engines (submission)."""

    def __init__(self) -> None:
        import sqlalchemy as sa

        self.counts = {"commits": 0, "write_commits": 0, "statements": 0, "dml": 0}
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", self._on_exec)
        sa.event.listen(sa.engine.Engine, "commit", self._on_commit)

    def _on_exec(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.counts["statements"] += 1
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.counts["dml"] += 1
            conn.info["dml"] = True

    def _on_commit(self, conn: Any) -> None:
        self.counts["commits"] += 1
        if conn.info.pop("dml", False):
            self.counts["write_commits"] += 1


async def submit_all(db_url: str, jobs: int) -> None:
    from orchestrator.spec import parse_spec
    from orchestrator.store.jobs import JobStore

    specs = [parse_spec(spec_data(i), f"job-{i}") for i in range(jobs)]
    store = await JobStore.open(db_url)
    try:
        for spec in specs:
            await store.submit(spec)
    finally:
        await store.close()


def step_seconds(events: Iterable[tuple[str, str, str | None, str | None]]) -> dict[str, float]:
    """Median seconds of each part of a job, from its events: from the claim (or the end of the
    step before) to each step's success, and ``job``, from the claim to the job's end. Where a
    job spends its time, and so the least it can take, whatever the engine."""
    def at(text: str) -> float:
        return datetime.fromisoformat(text.replace(" ", "T")).timestamp()

    parts: dict[str, list[float]] = {}
    started: dict[str, float] = {}
    last: dict[str, float] = {}
    for job_id, when, step, to_state in events:
        t = at(when)
        if step is None and to_state == "RUNNING" and job_id not in started:
            started[job_id] = last[job_id] = t
        elif job_id in last and step is not None and to_state == "SUCCEEDED":
            parts.setdefault(step, []).append(t - last[job_id])
            last[job_id] = t
        elif job_id in started and step is None and to_state == "SUCCEEDED":
            parts.setdefault("job", []).append(t - started[job_id])
    return {name: round(statistics.median(values), 3) for name, values in parts.items()}


def run_fabricflow(args: argparse.Namespace, emulator: Emulator, workdir: Path, tag: str,
                   counter: CommitCounter | None) -> dict[str, Any]:
    n = args.jobs
    db_file = workdir / f"fabricflow-{tag}.db"
    db_url = f"sqlite+aiosqlite:///{db_file}"
    before = dict(counter.counts) if counter else None
    asyncio.run(submit_all(db_url, n))
    submit_counts = {k: counter.counts[k] - before[k] for k in before} if counter and before else None
    poll = str(args.poll)
    env = child_env(
        FABRICFLOW_DAEMON__CONCURRENCY=str(args.concurrency),
        FABRICFLOW_DAEMON__CLAIM_INTERVAL=poll,
        FABRICFLOW_POLL__INITIAL=poll,
        FABRICFLOW_POLL__MAX=poll,
        FABRICFLOW_LOG_LEVEL="warning",
    )
    counts_file = workdir / f"fabricflow-{tag}.counts.json"
    if args.count_db:
        site = workdir / "ff-sitecustomize"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(COUNTER_SOURCE)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        env["FABRICFLOW_BENCH_DB_COUNTS"] = str(counts_file)
    emulator.reset()
    cmd = [sys.executable, "-m", "orchestrator", "daemon", "--db", db_url, "--fabric-url", emulator.url]
    daemon = Child(cmd, log_path=workdir / f"daemon-{tag}.log", env=env, cwd=ROOT)
    conn: sqlite3.Connection | None = None
    first_claim_at = first_claim_cpu = None
    try:
        deadline = daemon.started + args.timeout
        while True:
            if daemon.poll():
                raise RuntimeError(f"fabricflow daemon exited {daemon.exit_code} before the jobs finished:\n"
                                   f"{daemon.log_tail()}")
            try:
                if conn is None:
                    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=5)
                done, started = conn.execute(
                    "SELECT coalesce(sum(state IN (?, ?, ?)), 0), coalesce(sum(state != 'PENDING'), 0) FROM jobs",
                    TERMINAL).fetchone()
            except sqlite3.OperationalError:
                if conn is not None:
                    conn.close()
                conn = None
                done = started = 0
            now = time.perf_counter()
            if started and first_claim_at is None:
                first_claim_at, first_claim_cpu = now, daemon.live_cpu_s()
            if done >= n:
                break
            if now > deadline:
                raise RuntimeError(f"fabricflow: {done}/{n} jobs terminal after {args.timeout:g}s:\n{daemon.log_tail()}")
            time.sleep(0.1)
        seconds = time.perf_counter() - daemon.started
        daemon.stop(signal.SIGTERM, timeout=30)
    finally:
        if conn is not None:
            conn.close()
        daemon.stop(signal.SIGKILL, timeout=10)  # a no-op once it has exited
    emu = emulator_counts(emulator.stats(), n)
    with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=5) as db:
        by_state = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
        results = [row[0] for row in db.execute("SELECT result FROM jobs WHERE state = 'SUCCEEDED'")]
        timeline = step_seconds(db.execute("SELECT job_id, at, step, to_state FROM events ORDER BY id"))
    no_reply = sum(1 for text in results if not (json.loads(text) if text else {}).get("reply"))
    cpu_s = daemon.cpu_s()
    result: dict[str, Any] = {
        "jobs": n, "concurrency": args.concurrency,
        "seconds": round(seconds, 3), "jobs_per_s": round(n / seconds, 2),
        "cpu_ms_per_job": round(1000 * cpu_s / n, 2),
        "run_cpu_ms_per_job": round(1000 * (cpu_s - first_claim_cpu) / n, 2) if first_claim_cpu is not None else None,
        "peak_rss_mb": round(daemon.peak_rss_mb(), 1),
        "requests_per_job": emu["requests_per_job"],
        "operations_per_job": emu["operations_per_job"],
        "failed": by_state.get("FAILED", 0) + by_state.get("CANCELLED", 0),
        "duplicates": emu["duplicates"],
        "succeeded": by_state.get("SUCCEEDED", 0), "empty_text": no_reply,
        "events_per_job": round(events / n, 2),
        "step_seconds": timeline,
        "cpu_s": round(cpu_s, 2),
        "first_claim_after_s": round(first_claim_at - daemon.started, 3) if first_claim_at else None,
        "process_seconds": round(daemon.ended - daemon.started, 3) if daemon.ended else None,
        "daemon_exit_code": daemon.exit_code,
        "created": emu["created"],
    }
    if args.count_db:
        try:
            daemon_counts = json.loads(counts_file.read_text())
        except (OSError, ValueError):
            daemon_counts = None  # the daemon did not exit through the interpreter's shutdown
        if daemon_counts is not None and submit_counts is not None:
            total = {k: daemon_counts[k] + submit_counts[k] for k in daemon_counts}
            result["write_commits_per_job"] = round(total["write_commits"] / n, 2)
            result["daemon_write_commits_per_job"] = round(daemon_counts["write_commits"] / n, 2)
            result["db"] = total
    return result


# --- DBOS ----------------------------------------------------------------------------------------


def default_dbos_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fabricflow-bench" / "dbos-venv"


def ensure_dbos_venv(venv: Path) -> float | None:
    """Create the peer's virtual environment if it is missing; returns the seconds it took."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import dbos, aiohttp, aiosqlite, sqlalchemy.ext.asyncio"]
    if python.exists() and subprocess.run(probe, check=False, capture_output=True, timeout=120).returncode == 0:
        return None
    log(f"creating the DBOS virtual environment in {venv} ...")
    started = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    for cmd in ([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "--quiet", *DBOS_REQUIREMENTS]):
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env=child_env())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    if subprocess.run(probe, check=False, capture_output=True, timeout=120).returncode != 0:
        raise RuntimeError(f"{venv}: dbos still cannot be imported after installing it")
    seconds = time.perf_counter() - started
    log(f"DBOS virtual environment ready in {seconds:.1f}s")
    return seconds


def run_dbos(args: argparse.Namespace, emulator: Emulator, workdir: Path, tag: str) -> dict[str, Any]:
    n = args.jobs
    script = args.peer_dir / "dbos_pipeline.py"
    poll = str(args.poll)
    cmd = [str(args.dbos_venv / "bin" / "python"), str(script), "--jobs", str(n),
           "--concurrency", str(args.concurrency), "--url", emulator.url,
           "--db", str(workdir / f"dbos-{tag}.sqlite"),
           "--poll-sleep", poll, "--queue-poll", poll, "--wait-interval", "0.1"]
    if args.count_db:
        cmd.append("--count-db")
    emulator.reset()
    out = workdir / f"dbos-{tag}.out"
    peer = Child(cmd, log_path=workdir / f"dbos-{tag}.log", stdout=out, cwd=workdir,
                 env=child_env(FABRIC_URL=emulator.url))
    try:
        if not peer.wait(args.timeout + 60):  # its own start-up and enqueueing come on top
            raise RuntimeError(f"DBOS peer still running after {args.timeout + 60:g}s:\n{peer.log_tail()}")
    finally:
        peer.stop(signal.SIGTERM, timeout=10)
    lines = [line for line in out.read_text(errors="replace").splitlines() if line.strip()]
    if peer.exit_code != 0 or not lines:
        raise RuntimeError(f"DBOS peer exited {peer.exit_code}:\n{peer.log_tail(30)}")
    reported = json.loads(lines[-1])
    emu = emulator_counts(emulator.stats(), n)
    cpu_s = peer.cpu_s()
    result: dict[str, Any] = {
        "jobs": n, "concurrency": args.concurrency,
        "seconds": reported["seconds"], "jobs_per_s": reported["jobs_per_s"],
        "cpu_ms_per_job": round(1000 * cpu_s / n, 2),
        "run_cpu_ms_per_job": reported["cpu_ms_per_job"],
        "peak_rss_mb": round(peer.peak_rss_mb(), 1),
        "requests_per_job": emu["requests_per_job"],
        "operations_per_job": emu["operations_per_job"],
        "failed": n - reported["succeeded"],
        "duplicates": emu["duplicates"],
        "succeeded": reported["succeeded"], "empty_text": reported.get("empty_text"),
        "cpu_s": round(cpu_s, 2),
        "first_step_after_s": reported.get("first_step_after_s"),
        "process_seconds": round(peer.ended - peer.started, 3) if peer.ended else None,
        "created": emu["created"],
    }
    if "db_write_commits" in reported:
        result["write_commits_per_job"] = round(reported["db_write_commits"] / n, 2)
    result["reported"] = reported
    return result


# --- what no engine can beat here ----------------------------------------------------------------

HTTP_FLOOR_SOURCE = textwrap.dedent("""\
    import asyncio, json, resource, sys
    import aiohttp

    async def main(url, concurrency, n):
        async with aiohttp.ClientSession() as session:
            async def get(count):
                for _ in range(count):
                    async with session.get(url + "/v1/workspaces", params={"limit": "1"}) as resp:
                        json.loads(await resp.read())
            await get(20)  # connections opened, code warm
            before = resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.gather(*(get(n // concurrency) for _ in range(concurrency)))
            after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(json.dumps({"requests": n // concurrency * concurrency,
                          "cpu_us_per_request": round(1e6 * cpu / (n // concurrency * concurrency), 1)}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")


def http_floor(emulator: Emulator, concurrency: int, requests: int = 5000) -> dict[str, Any]:
    """The CPU of one bare aiohttp GET (keep-alive, a small JSON answer read and parsed), in a
    process of its own with this Python, against the run's emulator at the run's concurrency."""
    emulator.reset()
    out = subprocess.run([sys.executable, "-c", HTTP_FLOOR_SOURCE, emulator.url, str(concurrency), str(requests)],
                         capture_output=True, text=True, timeout=300, env=child_env(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bounds(args: argparse.Namespace, median: dict[str, Any], floor: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets beside what the emulator's delays and the HTTP client allow.

    jobs_per_s_cap: ``concurrency`` jobs at a time, each waiting at least the emulator's two
    readiness delays (streaming and creates left out, so a generous cap). http_client_ms_per_job:
    the bare aiohttp floor times fabricflow's requests per job. startup_ms_per_job: fabricflow's
    CPU before its first claim (interpreter and imports), spread over the run's jobs.
    """
    ff, dbos = median.get("fabricflow", {}), median.get("dbos", {})
    cap = args.concurrency / (args.ready_after + args.instance_ready_after)
    out: dict[str, Any] = {"jobs_per_s_cap": round(cap, 1)}
    if isinstance(dbos.get("jobs_per_s"), int | float):
        out["target_jobs_per_s"] = round(10 * dbos["jobs_per_s"], 1)
        out["cap_over_dbos"] = ratio(cap, dbos["jobs_per_s"])
    if isinstance(dbos.get("cpu_ms_per_job"), int | float):
        out["target_cpu_ms_per_job"] = round(dbos["cpu_ms_per_job"] / 10, 2)
    if floor is not None:
        out["http_request_cpu_us"] = floor["cpu_us_per_request"]
        if isinstance(ff.get("requests_per_job"), int | float):
            out["http_client_ms_per_job"] = round(floor["cpu_us_per_request"] * ff["requests_per_job"] / 1000, 2)
    if isinstance(ff.get("cpu_ms_per_job"), int | float) and isinstance(ff.get("run_cpu_ms_per_job"), int | float):
        out["startup_ms_per_job"] = round(ff["cpu_ms_per_job"] - ff["run_cpu_ms_per_job"], 2)
    return out


# --- the run -------------------------------------------------------------------------------------

SUMMARY = ("jobs_per_s", "cpu_ms_per_job", "run_cpu_ms_per_job", "peak_rss_mb", "seconds",
           "requests_per_job", "emulator_cpu_ms_per_job", "failed", "duplicates", "write_commits_per_job",
           "events_per_job")
RATIOS = ("jobs_per_s", "cpu_ms_per_job", "run_cpu_ms_per_job", "peak_rss_mb")


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 3)
    return None


def median_of(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 3) if nums else None


def summarize(reps: list[dict[str, Any]], engines: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for engine in engines:
        runs = [rep[engine] for rep in reps if "error" not in rep.get(engine, {"error": 1})]
        out[engine] = {key: median_of([r.get(key) for r in runs]) for key in SUMMARY
                       if any(key in r for r in runs)}
        ops = sorted({op for r in runs for op in r.get("operations_per_job", {})})
        if ops:
            out[engine]["operations_per_job"] = {op: median_of([r["operations_per_job"].get(op, 0) for r in runs])
                                                 for op in ops}
        out[engine]["runs"] = len(runs)
    if len(engines) == 2:
        with_ratio = [rep["ratio"] for rep in reps if rep.get("ratio")]
        out["ratio"] = {key: median_of([r.get(key) for r in with_ratio]) for key in RATIOS}
    return out


def main(args: argparse.Namespace) -> int:
    engines = [args.only] if args.only else list(ENGINES)
    setup_s = None
    if "dbos" in engines:
        if not (args.peer_dir / "dbos_pipeline.py").is_file():
            raise SystemExit(f"no dbos_pipeline.py in {args.peer_dir} (set --peer-dir)")
        setup_s = ensure_dbos_venv(args.dbos_venv)
    counter = CommitCounter() if args.count_db and "fabricflow" in engines else None
    params = {
        "jobs": args.jobs, "concurrency": args.concurrency, "reps": args.reps,
        "ready_after": args.ready_after, "instance_ready_after": args.instance_ready_after,
        "poll": args.poll, "count_db": args.count_db, "engines": engines,
        "peer_script": str(args.peer_dir / "dbos_pipeline.py") if "dbos" in engines else None,
        "dbos_venv": str(args.dbos_venv) if "dbos" in engines else None,
        "dbos_venv_setup_seconds": round(setup_s, 1) if setup_s is not None else None,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
    }
    reps: list[dict[str, Any]] = []
    errors = 0
    with tempfile.TemporaryDirectory(prefix="fabricflow-peer-") as tmp:
        workdir = Path(tmp)
        emulator = Emulator(workdir, args.ready_after, args.instance_ready_after)
        try:
            log(f"emulator on {emulator.url}")
            for r in range(args.reps):
                order = engines if r % 2 == 0 else engines[::-1]
                rep: dict[str, Any] = {"rep": r + 1, "order": order}
                for engine in order:
                    log(f"rep {r + 1}/{args.reps}: {engine}, {args.jobs} jobs, concurrency {args.concurrency} ...")
                    try:
                        emulator_cpu = emulator.child.live_cpu_s()
                        if engine == "fabricflow":
                            rep[engine] = run_fabricflow(args, emulator, workdir, f"r{r + 1}", counter)
                        else:
                            rep[engine] = run_dbos(args, emulator, workdir, f"r{r + 1}")
                        emulator_after = emulator.child.live_cpu_s()
                        if emulator_cpu is not None and emulator_after is not None:
                            rep[engine]["emulator_cpu_ms_per_job"] = round(
                                (emulator_after - emulator_cpu) * 1000 / args.jobs, 2)
                        log(f"  {engine}: {rep[engine]['jobs_per_s']} jobs/s, "
                            f"{rep[engine]['cpu_ms_per_job']} ms CPU/job, failed {rep[engine]['failed']}")
                    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                        errors += 1
                        rep[engine] = {"error": f"{type(exc).__name__}: {exc}"}
                        log(f"  {engine} failed: {exc}")
                if len(engines) == 2 and all("error" not in rep[e] for e in engines):
                    ff, dbos = rep["fabricflow"], rep["dbos"]
                    rep["ratio"] = {key: ratio(ff.get(key), dbos.get(key)) for key in RATIOS}
                reps.append(rep)
            floor = None
            if args.floor:
                log("the bare HTTP client's floor ...")
                try:
                    floor = http_floor(emulator, args.concurrency)
                except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
                    log(f"  floor not measured: {exc}")
        finally:
            emulator.stop()
    median = summarize(reps, engines)
    print(json.dumps({"benchmark": "peer", "params": params, "reps": reps, "median": median,
                      "bounds": bounds(args, median, floor)}, indent=2))
    return 1 if errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500, help="jobs per engine per repetition (default 500)")
    parser.add_argument("--concurrency", type=int, default=100, help="jobs at once, both engines (default 100)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, engine order alternating (default 3)")
    parser.add_argument("--ready-after", type=float, default=0.5, help="emulator: endpoint CREATING seconds")
    parser.add_argument("--instance-ready-after", type=float, default=0.2,
                        help="emulator: service instance CREATING seconds")
    parser.add_argument("--poll", type=float, default=0.1,
                        help="status poll and claim/queue poll interval, both engines (the peer's default 0.1)")
    parser.add_argument("--only", choices=ENGINES, help="run one engine only (quick checks)")
    parser.add_argument("--dbos-venv", type=Path, default=default_dbos_venv(),
                        help="the peer's virtual environment, created on first use (default %(default)s)")
    parser.add_argument("--peer-dir", type=Path, default=ROOT.parent / "shared" / "peer-bench",
                        help="where dbos_pipeline.py is (default %(default)s)")
    parser.add_argument("--no-count-db", dest="count_db", action="store_false",
                        help="do not count SQLAlchemy commits (write_commits_per_job)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the bare aiohttp floor measured after the runs (see bounds in the output)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one engine's run may take before it is stopped (default 600)")
    args = parser.parse_args(argv)
    if min(args.jobs, args.concurrency, args.reps) < 1:
        parser.error("--jobs, --concurrency and --reps must be at least 1")
    args.peer_dir = args.peer_dir.resolve()
    args.dbos_venv = args.dbos_venv.expanduser().absolute()
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the children


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main(parse_args()))
