"""What the first commands a user types cost: CPU time of `fabricflow --help`, `--version`,
`list`, `show ID` and `events ID` as fresh processes.

    python benchmarks/startup.py [--runs 5]

Each command runs ``--runs`` times as a child process (stdout and stderr to /dev/null); its
CPU time is the child's user + system time from ``os.wait4``, so neither this process nor
the machine's other load is counted, and wall time is not measured at all. ``list``,
``show`` and ``events`` read a small database (three submitted jobs) made once beforehand.
Prints one JSON object: per command the median and every run, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FABRICFLOW = [sys.executable, "-m", "orchestrator"]


def child_env(home: Path) -> dict[str, str]:
    """No user configuration, credentials or data directory leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICFLOW_", "HUAWEICLOUD_SDK_"))}
    env.update({"XDG_DATA_HOME": str(home / "xdg"), "HOME": str(home),
                "HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(home / "no-credentials")})
    return env


def cpu_seconds(argv: list[str], env: dict[str, str]) -> float:
    """User + system CPU time of one run of ``argv`` (which must exit 0)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
    finally:
        os.close(devnull)
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv[2:])} exited {code}")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="Runs per command (the median is reported).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fabricflow-startup-") as tmp:
        home = Path(tmp)
        env = child_env(home)
        db = f"sqlite:///{home / 'jobs.db'}"
        spec = str(ROOT / "examples" / "quickstart.yaml")
        submitted = subprocess.run([*FABRICFLOW, "submit", spec, spec, spec, "--db", db], env=env,
                                   capture_output=True, text=True, check=True)
        job_id = submitted.stdout.split()[0]
        commands = {
            "--help": ["--help"],
            "--version": ["--version"],
            "list": ["list", "--db", db],
            "show ID": ["show", job_id[:8], "--db", db],
            "events ID": ["events", job_id[:8], "--db", db],
        }
        report: dict[str, object] = {"python": sys.version.split()[0], "runs": args.runs}
        for label, command in commands.items():
            runs = [cpu_seconds([*FABRICFLOW, *command], env) for _ in range(args.runs)]
            report[label] = {"cpu_seconds_median": round(statistics.median(runs), 3),
                             "cpu_seconds": [round(r, 3) for r in runs]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
