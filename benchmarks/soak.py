"""A soak: thousands of jobs through one daemon, in waves; does its memory stay flat?

    python benchmarks/soak.py                               # 5,000 jobs in waves of 250
    python benchmarks/soak.py --jobs 600 --wave 60          # the size tests/crash/test_soak.py runs

An emulator in its own process (endpoints ready after ``--ready-after`` seconds) and one
``fabricflow daemon`` process on a SQLite file. The jobs arrive in waves: ``fabricflow submit
SPEC --count WAVE`` (names of their own per wave, ``{index}`` within it), then wait until the
daemon has finished the wave, then the next, so the daemon's working set is the same in every
wave and only what it keeps between jobs could grow. The daemon's resident memory (VmRSS in
/proc/PID/status) is sampled about every second and at the end of each wave.

After the warm-up (the first ``--warmup-share`` of the waves: imports, caches, the allocator's
pools filling) the end-of-wave samples should stay flat: ``flat`` is max <= 1.10 x min.
``slope_mb_per_1000_jobs`` is the least-squares line through the post-warm-up samples against
the jobs finished; a leak shows as a slope well above zero. Prints one JSON object; exit code 0
when every job SUCCEEDED, nothing was created twice and the memory stayed flat, 1 otherwise.
Everything on 127.0.0.1; every child is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests.crash.procs` lives beside the package, not in it

from tests.crash.procs import Daemon, Emulator, cli, query

#: ``flat``: after the warm-up, the largest end-of-wave RSS at most this many times the smallest.
FLAT_RATIO = 1.10
FINISHED = "SELECT count(*) FROM jobs WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED')"


@dataclass
class Soak:
    """One soak run: the printed report, and what a test checks beyond it."""

    report: dict[str, Any]
    #: GET /_emulator/stats "created": kind -> name -> times created.
    created: dict[str, dict[str, int]]
    #: Job name -> final state, from the jobs table.
    states: dict[str, str]


def wave_names(wave: int) -> dict[str, str]:
    """The templated names of one wave's jobs; ``{index}`` counts 0 .. WAVE-1 within it."""
    tag = f"{wave:03d}"
    return {"name": f"soak-{tag}-{{index}}", "workspace": f"skws-{tag}-{{index}}",
            "endpoint": f"skep-{tag}-{{index}}", "model": f"skm-{tag}-{{index}}",
            "service_instance": f"sksi-{tag}-{{index}}"}


def expected_names(jobs: int, wave: int) -> dict[str, set[str]]:
    """Every name the soak's jobs create, per emulator kind (and ``job`` for the jobs' own names)."""
    names: dict[str, set[str]] = {k: set() for k in ("job", "workspace", "endpoint", "model", "service_instance")}
    for w, size in enumerate(wave_sizes(jobs, wave)):
        for kind, template in wave_names(w).items():
            names["job" if kind == "name" else kind].update(template.format(index=i) for i in range(size))
    return names


def wave_sizes(jobs: int, wave: int) -> list[int]:
    return [min(wave, jobs - start) for start in range(0, jobs, wave)]


def write_spec(workdir: Path, wave: int) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    names = wave_names(wave)
    data["name"] = names["name"]
    for kind in ("workspace", "endpoint", "model", "service_instance"):
        data[kind]["name"] = names[kind]
    path = workdir / f"wave-{wave:03d}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def finished(db: Path) -> int:
    return int(query(db, FINISHED)[0][0])


def drain(stream: Any) -> None:
    """Read a child's stderr to the end so that its pipe never fills and blocks it."""
    try:
        for _ in stream:
            pass
    except (OSError, ValueError):  # closed by Emulator.stop()
        pass


def summarise(waves: list[dict[str, Any]], warmup_share: float) -> dict[str, Any]:
    """The warm-up cut and the post-warm-up statistics over the end-of-wave RSS samples."""
    cut = min(len(waves) - 2, max(1, round(len(waves) * warmup_share))) if len(waves) > 2 else 0
    after = waves[cut:]
    rss = [w["rss_mb"] for w in after]
    x = [w["jobs_finished"] / 1000 for w in after]
    slope = statistics.linear_regression(x, rss).slope if len(set(x)) > 1 else 0.0
    low, high = min(rss), max(rss)
    return {"warmup_waves": cut, "warmup_jobs": waves[cut - 1]["jobs_finished"] if cut else 0,
            "post_warmup": {"waves": len(after), "min_mb": round(low, 1), "max_mb": round(high, 1),
                            "median_mb": round(statistics.median(rss), 1),
                            "growth_ratio": round(high / low, 3),
                            "slope_mb_per_1000_jobs": round(slope, 2),
                            "peak_mb": round(max(w["peak_mb"] for w in after), 1)},
            "flat": high <= FLAT_RATIO * low}


def run_soak(*, jobs: int, wave: int, workdir: Path, ready_after: float = 0.2, instance_ready_after: float = 0.1,
             concurrency: int = 100, warmup_share: float = 0.2, wave_timeout: float = 300.0) -> Soak:
    """Feed ``jobs`` jobs to one daemon in waves of ``wave``, sampling its RSS; see the module doc."""
    if jobs < 1 or wave < 1:
        raise ValueError("--jobs and --wave must be at least 1")
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "soak.db"
    url = f"sqlite+aiosqlite:///{db}"
    emulator = Emulator("--ready-after", str(ready_after), "--instance-ready-after", str(instance_ready_after),
                        log=workdir / "emulator.log")
    threading.Thread(target=drain, args=(emulator.proc.stderr,), daemon=True).start()
    daemon: Daemon | None = None
    waves: list[dict[str, Any]] = []
    samples: list[tuple[float, int, float]] = []  # (seconds since the first submit, jobs finished, RSS MB)
    submit_seconds = 0.0
    try:
        daemon = Daemon(url, emulator.url, workdir / "daemon.log", FABRICFLOW_DAEMON__CONCURRENCY=str(concurrency),
                        FABRICFLOW_LOG_LEVEL="warning")
        pid = daemon.proc.pid
        started = time.perf_counter()
        total = 0
        for w, size in enumerate(wave_sizes(jobs, wave)):
            spec = write_spec(workdir, w)
            t0 = time.perf_counter()
            printed = cli("submit", str(spec), "--count", str(size), "--db", url).stdout.split()
            submit_seconds += time.perf_counter() - t0
            if len(printed) != size:
                raise RuntimeError(f"wave {w}: submit printed {len(printed)} IDs, not {size}")
            total += size
            wave_start, peak, last_sample = time.perf_counter(), 0.0, 0.0
            while True:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited {daemon.proc.returncode}; see {workdir / 'daemon.log'}")
                done, now = finished(db), time.perf_counter()
                if done >= total or now - last_sample >= 1.0:
                    rss = rss_mb(pid)
                    peak, last_sample = max(peak, rss), now
                    samples.append((round(now - started, 2), done, round(rss, 1)))
                if done >= total:
                    break
                if now - wave_start > wave_timeout:
                    raise RuntimeError(f"wave {w}: {total - done} jobs unfinished after {wave_timeout:.0f}s")
                time.sleep(0.2)
            waves.append({"wave": w, "jobs_finished": done, "rss_mb": round(rss, 1), "peak_mb": round(peak, 1),
                          "seconds": round(now - wave_start, 2)})
        elapsed = time.perf_counter() - started
        states = {name: state for name, state in query(db, "SELECT name, state FROM jobs")}
        created = emulator.stats()["created"]
        exit_code = daemon.terminate()
        daemon = None
    finally:
        if daemon is not None:
            daemon.kill()
        emulator.stop()
    duplicates = sorted(f"{kind}/{name}" for kind, names in created.items() for name, n in names.items() if n > 1)
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    report = {
        "benchmark": "soak", "jobs": jobs, "wave": wave, "waves": len(waves), "concurrency": concurrency,
        "ready_after_s": ready_after, "instance_ready_after_s": instance_ready_after,
        "states": counts, "duplicates": duplicates,
        "created": {kind: len(names) for kind, names in sorted(created.items())},
        "seconds": round(elapsed, 1), "submit_seconds": round(submit_seconds, 1),
        "jobs_per_s": round(jobs / elapsed, 1), "daemon_exit_code": exit_code,
        "rss_first_sample_mb": samples[0][2],
        **summarise(waves, warmup_share),
        "rss_mb_per_wave": [w["rss_mb"] for w in waves],
        "peak_mb_per_wave": [w["peak_mb"] for w in waves],
        "samples": len(samples),
    }
    (workdir / "samples.json").write_text(json.dumps({"waves": waves, "samples": samples}))
    return Soak(report, created, states)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000, help="jobs in all (default 5000)")
    parser.add_argument("--wave", type=int, default=250, help="jobs per wave (default 250)")
    parser.add_argument("--ready-after", type=float, default=0.2, help="endpoint CREATING -> RUNNING, s (0.2)")
    parser.add_argument("--concurrency", type=int, default=100, help="the daemon's job concurrency (default 100)")
    parser.add_argument("--warmup-share", type=float, default=0.2,
                        help="share of the waves left out as warm-up (default 0.2)")
    parser.add_argument("--wave-timeout", type=float, default=300.0, help="safety net per wave, s (default 300)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the database, specs, daemon log and every RSS sample (samples.json) here "
                             "(default: a temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    kwargs = {"jobs": args.jobs, "wave": args.wave, "ready_after": args.ready_after,
              "concurrency": args.concurrency, "warmup_share": args.warmup_share, "wave_timeout": args.wave_timeout}
    if args.workdir:
        soak = run_soak(workdir=args.workdir, **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="fabricflow-soak-") as tmp:
            soak = run_soak(workdir=Path(tmp), **kwargs)
    report = soak.report
    print(json.dumps(report, indent=2))
    ok = (report["states"] == {"SUCCEEDED": args.jobs} and not report["duplicates"] and report["flat"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
