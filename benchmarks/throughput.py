"""Throughput, memory and request cost of a daemon running many jobs at once.

    python benchmarks/throughput.py --jobs 200 --jobs 1000

For each size: submit N jobs (unique names) to a fresh SQLite file, run one daemon (in this
process) against an emulator in its own process, and report wall time, jobs per second, peak
RSS, Fabric requests per job and, from the emulator's counters, that nothing was created twice.
Also runs N jobs that all wait on ONE shared endpoint, to show that they share its polls.
Prints one JSON object. Compare ratios measured in one run; the machines are noisy.
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

from orchestrator import logs  # noqa: E402
from orchestrator.config import DaemonSettings  # noqa: E402
from orchestrator.engine.daemon import Daemon  # noqa: E402
from orchestrator.engine.runner import EngineSettings, Runner  # noqa: E402
from orchestrator.fabric.client import FabricClient  # noqa: E402
from orchestrator.machine import JobState  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402
from orchestrator.store.jobs import JobStore  # noqa: E402
from tests.crash.procs import Emulator  # noqa: E402

ENGINE = EngineSettings(poll_initial=0.25, poll_max=1.0, max_attempts=8, backoff_base=0.1, backoff_cap=1.0)
DAEMON = DaemonSettings(concurrency=2000, lease_seconds=60, heartbeat_seconds=5, claim_interval=0.2)


def spec_for(i: int, base: dict[str, Any], shared: tuple[str, str] | None) -> Any:
    data = dict(base, name=f"bench-{i}", model={**base["model"], "name": f"m{i}"},
                service_instance={"name": f"si{i}"})
    if shared:
        data["workspace"], data["endpoint"] = {"id": shared[0]}, {"id": shared[1]}
    else:
        data["workspace"] = {"name": f"bws-{i}"}
        data["endpoint"] = {**base["endpoint"], "name": f"ep_{i}"}
    return parse_spec(data)


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_emulator/stats") as resp:
        return await resp.json()


async def shared_endpoint(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session:
        ws = await (await session.post(f"{url}/v1/workspaces", json={"name": "sharedws"})).json()
        ep = await (await session.post(f"{url}/v1/workspaces/{ws['id']}/endpoints",
                                        json={"name": "shared", "type": "inference"})).json()
    return ws["id"], ep["id"]


async def run_size(n: int, workdir: Path, *, shared: bool) -> dict[str, Any]:
    emulator = Emulator("--ready-after", "2", "--instance-ready-after", "1", "--port", "0",
                        log=workdir / f"emulator-{n}.log")
    try:
        url = emulator.url
        ids = await shared_endpoint(url) if shared else None
        store = await JobStore.open(f"sqlite+aiosqlite:///{workdir / f'bench-{n}-{shared}.db'}")
        base = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
        for i in range(n):
            await store.submit(spec_for(i, base, ids))
        before = (await stats(url))["requests"]
        started = time.perf_counter()
        async with FabricClient(url) as client:
            runner = Runner(store, client, owner="bench", settings=ENGINE)
            daemon = Daemon(store, runner, DAEMON, url=str(store.engine.url))
            task = asyncio.create_task(daemon.run())
            while await store.count(state=JobState.SUCCEEDED) + await store.count(state=JobState.FAILED) < n:
                await asyncio.sleep(0.2)
            elapsed = time.perf_counter() - started
            daemon.stop()
            await task
        after = await stats(url)
        failed = await store.count(state=JobState.FAILED)
        await store.close()
        created = after["created"]
        dupes = sum(c > 1 for kind in created.values() for c in kind.values())
        return {
            "jobs": n, "shared_endpoint": shared, "seconds": round(elapsed, 2),
            "jobs_per_second": round(n / elapsed, 1), "failed": failed, "duplicates": dupes,
            "requests_per_job": round((after["requests"] - before) / n, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    finally:
        emulator.stop()


async def main(sizes: list[int]) -> dict[str, Any]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            results.append(await run_size(n, Path(tmp), shared=False))
        results.append(await run_size(sizes[-1], Path(tmp), shared=True))
    return {"benchmark": "throughput", "results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, action="append", help="job count (repeatable); default 100 and 500")
    args = parser.parse_args()
    logs.configure("warning")
    print(json.dumps(asyncio.run(main(args.jobs or [100, 500])), indent=2))
