"""The cost of many jobs waiting for their endpoints: status GETs per endpoint, writes, memory.

    python benchmarks/waiting.py --jobs 2000 --window 10

Submits N jobs against an emulator (in its own process) whose endpoints stay CREATING, runs one
daemon in this process until every job waits on its endpoint, then measures over a window:
status GETs per endpoint per second (the poll interval is capped at ``--poll-max`` seconds and
jittered upwards by up to a quarter, so about 1 / (1.125 x poll-max) is expected), database writes (unchanged polls commit nothing) and the
daemon's resident memory per waiting job. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from orchestrator import logs  # noqa: E402
from orchestrator.config import DaemonSettings  # noqa: E402
from orchestrator.engine.daemon import Daemon  # noqa: E402
from orchestrator.engine.runner import EngineSettings, Runner  # noqa: E402
from orchestrator.fabric.client import FabricClient  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402
from orchestrator.store.jobs import JobStore  # noqa: E402
from orchestrator.store.schema import events, steps  # noqa: E402
from tests.crash.procs import Emulator  # noqa: E402


def rss_mb() -> float:
    """Current resident memory of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def requests(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_emulator/stats") as resp:
        return (await resp.json())["requests"]


async def scalar(store: JobStore, query: Any) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def main(n: int, window: float, poll_max: float) -> dict[str, Any]:
    emulator = Emulator("--ready-after", "3600", "--port", "0", log=Path("/dev/null"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = await JobStore.open(f"sqlite+aiosqlite:///{Path(tmp) / 'waiting.db'}")
            base = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
            for i in range(n):
                await store.submit(parse_spec(dict(base, name=f"wait-{i}", workspace={"name": f"wws-{i}"},
                                                   endpoint={**base["endpoint"], "name": f"wep_{i}"})))
            baseline = rss_mb()
            engine = EngineSettings(poll_initial=poll_max / 4, poll_max=poll_max)
            started = time.perf_counter()
            async with FabricClient(emulator.url) as client:
                runner = Runner(store, client, owner="bench", settings=engine)
                daemon = Daemon(store, runner, DaemonSettings(concurrency=n + 10, claim_interval=0.5),
                                url=str(store.engine.url))
                task = asyncio.create_task(daemon.run())
                waiting = select(func.count()).select_from(steps).where(
                    steps.c.name == "endpoint_ready", steps.c.state == "WAITING")
                while await scalar(store, waiting) < n:
                    await asyncio.sleep(0.5)
                ramp = time.perf_counter() - started
                await asyncio.sleep(2 * poll_max)  # past the first, faster polls
                writes = select(func.count()).select_from(events)
                r0, w0, t0 = await requests(emulator.url), await scalar(store, writes), time.perf_counter()
                await asyncio.sleep(window)
                r1, w1, t1 = await requests(emulator.url), await scalar(store, writes), time.perf_counter()
                during = rss_mb()
                daemon.stop()
                await task
            await store.close()
    finally:
        emulator.stop()
    seconds = t1 - t0
    return {
        "benchmark": "waiting", "jobs_waiting": n, "window_seconds": round(seconds, 1),
        "poll_max_seconds": poll_max, "seconds_until_all_waiting": round(ramp, 1),
        "status_gets_per_endpoint_per_second": round((r1 - r0) / n / seconds, 3),
        # Jittered intervals are 0.5-1.0 x poll-max: one GET per endpoint per interval averages
        # 1 / (0.75 x poll-max), never more than 1 / (0.5 x poll-max), however many jobs wait.
        "expected_mean": round(1 / (1.125 * poll_max), 3),
        "events_written_during_window": w1 - w0,
        "rss_mb_before_daemon": round(baseline, 1), "rss_mb_while_waiting": round(during, 1),
        "kb_per_waiting_job": round((during - baseline) * 1024 / n, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--poll-max", type=float, default=2.0)
    args = parser.parse_args()
    logs.configure("warning")
    print(json.dumps(asyncio.run(main(args.jobs, args.window, args.poll_max)), indent=2))
