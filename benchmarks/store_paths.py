"""Transitions committed per second: the SQLite write paths side by side, fsynced (synchronous=FULL).

    python benchmarks/store_paths.py
    python benchmarks/store_paths.py --transitions 20000 --callers 200 --batch 200
    python benchmarks/store_paths.py --paths sqlite3_per_commit fabricflow_writer  # some paths only

One step transition is what the runner commits most: a compare-and-set of a step under the
lease, the job's update and an ``events`` row (three statements). Each path commits the same
transitions of the same jobs on a fresh file, in one process, on the same disk, in one run:

- ``sqlite3_per_commit``: stdlib sqlite3, one transition per commit (the per-commit ceiling);
- ``sqlalchemy_core_thread``: SQLAlchemy Core on a synchronous connection, ``--batch`` per commit;
- ``aiosqlite_batch``: aiosqlite, ``--batch`` per commit, one ``executemany`` hand-off per statement;
- ``sqlite3_thread``: stdlib sqlite3, ``--batch`` per commit (the raw cost of the chosen path);
- ``writer_statements``: the writer's own statements, ``--batch`` per commit, written out by hand
  (its compare-and-sets checked, its parameters and timestamps built per transition): what the
  writer costs with none of its own Python around the statements;
- ``fabricflow_writer``: the store's group-commit writer, ``--callers`` concurrent callers each
  awaiting its own compare-and-set, batches formed by whatever queued during the last commit.

Every path runs under the daemon's garbage collection settings (``orchestrator.process.tune_gc``;
``--default-gc`` keeps CPython's). Prints one JSON object: per path, transitions per second, CPU
microseconds per transition (all threads), commits, and the ratio of each to the per-commit ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.machine import StepName, StepState  # noqa: E402
from orchestrator.process import tune_gc  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402
from orchestrator.store import ops  # noqa: E402
from orchestrator.store.jobs import JobStore  # noqa: E402
from orchestrator.store.writer import _SQLITE_TOKENS, sqlite_timestamp  # noqa: E402

OWNER = "bench"
STEP = ("UPDATE steps SET state = :to, updated_at = :at, attempts = :attempts WHERE job_id = :job_id "
        "AND name = :name AND EXISTS (SELECT 1 FROM jobs WHERE id = :job_id AND lease_owner = :owner "
        "AND state = 'RUNNING')")
JOB = "UPDATE jobs SET updated_at = :at, recoveries = 0 WHERE id = :job_id AND lease_owner = :owner"
EVENT = ("INSERT INTO events (job_id, at, step, from_state, to_state, detail) "
         "VALUES (:job_id, :at, :name, 'IN_FLIGHT', :to, 'bench')")


async def prepare(path: Path, jobs: int) -> list[str]:
    """A migrated file with ``jobs`` RUNNING jobs held by OWNER, their workspace step IN_FLIGHT."""
    import yaml

    store = await JobStore.open(f"sqlite+aiosqlite:///{path}")
    base = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    base["workspace"]["name"] = "bench-ws"  # the example names it after each job ({job})
    ids = await store.submit_many([parse_spec(dict(base, name=f"b{i}")) for i in range(jobs)],
                                  owner=OWNER, lease=3600)
    for job_id in ids:
        await store.move_step(job_id, OWNER, StepName.WORKSPACE, expected=StepState.PENDING,
                              to=StepState.IN_FLIGHT, detail="intent")
    await store.close()
    return ids


def params(ids: list[str], n: int) -> list[dict[str, Any]]:
    at = sqlite_timestamp(datetime.now(UTC))
    return [{"job_id": ids[i % len(ids)], "owner": OWNER, "name": "workspace", "to": "IN_FLIGHT",
             "attempts": i, "at": at} for i in range(n)]


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def per_commit(path: Path, ids: list[str], n: int) -> int:
    conn = connect(path)
    for p in params(ids, n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(STEP, p)
        conn.execute(JOB, p)
        conn.execute(EVENT, p)
        conn.execute("COMMIT")
    conn.close()
    return n


def sqlite3_batched(path: Path, ids: list[str], n: int, batch: int) -> int:
    conn = connect(path)
    rows = params(ids, n)
    commits = 0
    for start in range(0, n, batch):
        conn.execute("BEGIN IMMEDIATE")
        for p in rows[start:start + batch]:
            conn.execute("SAVEPOINT op")
            conn.execute(STEP, p)
            conn.execute(JOB, p)
            conn.execute(EVENT, p)
            conn.execute("RELEASE op")
        conn.execute("COMMIT")
        commits += 1
    conn.close()
    return commits


def writer_statements(path: Path, ids: list[str], n: int, batch: int) -> int:
    """The writer's own statements for the transition (``ops.commit``'s step and job updates as
    the SQLite writer renders them, its events rows in one ``executemany`` before COMMIT), each
    compare-and-set checked, its parameters built and its timestamp formatted per transition,
    as the writer does, but written out by hand: what the writer's work costs with none of its
    own Python (operations, results, futures, the event loop) around it."""
    move = ops.StepMove(StepName.WORKSPACE, StepState.IN_FLIGHT, StepState.IN_FLIGHT, "bench")
    step_sql = ops._step_sql(move.expected, move.to, ()).format(**_SQLITE_TOKENS)
    job_sql = ops._job_sql(False, None, (), False).format(**_SQLITE_TOKENS)
    event_sql = ops._EVENT.format(**_SQLITE_TOKENS)
    conn = connect(path)
    cursor = conn.cursor()
    commits = 0
    for start in range(0, n, batch):
        conn.execute("BEGIN IMMEDIATE")
        events = []
        for i in range(start, min(start + batch, n)):
            job_id, at = ids[i % len(ids)], sqlite_timestamp(datetime.now(UTC))
            cursor.execute(step_sql, {"job_id": job_id, "owner": OWNER, "name": "workspace", "expected": "IN_FLIGHT",
                                      "to": "IN_FLIGHT", "at": at})
            if cursor.rowcount != 1:
                raise RuntimeError(f"step of {job_id} missed its compare-and-set")
            cursor.execute(job_sql, {"job_id": job_id, "owner": OWNER, "at": at})
            if cursor.rowcount != 1:
                raise RuntimeError(f"job {job_id} missed its compare-and-set")
            events.append({"job_id": job_id, "at": at, "step": "workspace", "src": "IN_FLIGHT", "dst": "IN_FLIGHT",
                           "detail": "bench"})
        cursor.executemany(event_sql, events)
        conn.execute("COMMIT")
        commits += 1
    conn.close()
    return commits


def sqlalchemy_core(path: Path, ids: list[str], n: int, batch: int) -> int:
    from sqlalchemy import create_engine, event, text

    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi: Any, _record: Any) -> None:
        dbapi.isolation_level = None
        dbapi.execute("PRAGMA journal_mode=WAL")
        dbapi.execute("PRAGMA synchronous=FULL")

    step, job, ev = text(STEP), text(JOB), text(EVENT)
    rows = params(ids, n)
    commits = 0
    with engine.connect() as conn:
        for start in range(0, n, batch):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            for p in rows[start:start + batch]:
                conn.execute(step, p)
                conn.execute(job, p)
                conn.execute(ev, p)
            conn.exec_driver_sql("COMMIT")
            commits += 1
    engine.dispose()
    return commits


async def aiosqlite_batch(path: Path, ids: list[str], n: int, batch: int) -> int:
    import aiosqlite

    rows = params(ids, n)
    commits = 0
    async with aiosqlite.connect(path, isolation_level=None, timeout=30) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        for start in range(0, n, batch):
            chunk = rows[start:start + batch]
            await conn.execute("BEGIN IMMEDIATE")
            await conn.executemany(STEP, chunk)
            await conn.executemany(JOB, chunk)
            await conn.executemany(EVENT, chunk)
            await conn.execute("COMMIT")
            commits += 1
    return commits


async def writer(path: Path, ids: list[str], n: int, callers: int) -> int:
    store = await JobStore.open(f"sqlite+aiosqlite:///{path}")
    per = n // callers

    async def caller(c: int) -> None:
        job_id = ids[c % len(ids)]
        for _ in range(per):
            await store.commit(job_id, OWNER, [ops.StepMove(StepName.WORKSPACE, StepState.IN_FLIGHT,
                                                            StepState.IN_FLIGHT, "bench")])

    before = store.writer.stats().batches
    await asyncio.gather(*(caller(c) for c in range(callers)))
    commits = store.writer.stats().batches - before
    await store.close()
    return commits


PATHS = ("sqlite3_per_commit", "sqlalchemy_core_thread", "aiosqlite_batch", "sqlite3_thread", "writer_statements",
         "fabricflow_writer")


def measure(name: str, run: Any, n: int) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    commits = run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{name}: {n / wall:,.0f} transitions/s", file=sys.stderr)
    return {"transitions": n, "seconds": round(wall, 3), "transitions_per_s": round(n / wall),
            "cpu_us_per_transition": round(cpu / n * 1e6, 1), "commits": commits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transitions", type=int, default=20000)
    parser.add_argument("--per-commit", type=int, default=5000,
                        help="transitions of the per-commit path (about a second: shorter runs swing with the noise)")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--dir", help="directory for the database files (default: a temporary one)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), metavar="PATH",
                        help=f"run only these paths (of {', '.join(PATHS)}); the ratios need sqlite3_per_commit")
    parser.add_argument("--default-gc", action="store_true",
                        help="keep CPython's garbage collection settings (default: the daemon's, "
                             "orchestrator.process.tune_gc, for every path alike)")
    args = parser.parse_args()
    if not args.default_gc:
        tune_gc()
    n = args.transitions
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        def fresh(name: str) -> tuple[Path, list[str]]:
            path = Path(tmp) / f"{name}.db"
            return path, asyncio.run(prepare(path, args.jobs))

        runs: dict[str, tuple[Any, int]] = {
            "sqlite3_per_commit": (lambda p, i: per_commit(p, i, args.per_commit), args.per_commit),
            "sqlalchemy_core_thread": (lambda p, i: sqlalchemy_core(p, i, n, args.batch), n),
            "aiosqlite_batch": (lambda p, i: asyncio.run(aiosqlite_batch(p, i, n, args.batch)), n),
            "sqlite3_thread": (lambda p, i: sqlite3_batched(p, i, n, args.batch), n),
            "writer_statements": (lambda p, i: writer_statements(p, i, n, args.batch), n),
            "fabricflow_writer": (lambda p, i: asyncio.run(writer(p, i, n, args.callers)), n),
        }
        results: dict[str, Any] = {}
        for name in PATHS:
            if name in args.paths:
                run, count = runs[name]
                path, ids = fresh(name)
                results[name] = measure(name, lambda run=run, path=path, ids=ids: run(path, ids), count)
    if "sqlite3_per_commit" in results:
        ceiling = results["sqlite3_per_commit"]["transitions_per_s"]
        for result in results.values():
            result["x_per_commit"] = round(result["transitions_per_s"] / ceiling, 1)
    print(json.dumps({"benchmark": "store_paths", "synchronous": "FULL", "batch": args.batch,
                      "gc": "default" if args.default_gc else "daemon (tune_gc)",
                      "callers": args.callers, "results": results}, indent=2))


if __name__ == "__main__":
    main()
