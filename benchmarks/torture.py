"""The torture suite at full size, from the command line; prints a JSON summary on stdout.

    python benchmarks/torture.py --jobs 100 --kills 20 --fail-rate 0.1 --drop-rate 0.1 --seed 1
    python benchmarks/torture.py --db postgresql+asyncpg://postgres@127.0.0.1/EMPTY_DB --daemons 3

A real emulator (with the given fault rates) and a real daemon run on loopback; the daemon is
killed with SIGKILL ``--kills`` times, mostly while creates are in flight, then finishes every
job. With ``--daemons N`` (PostgreSQL only) N daemons share the jobs; each round kills one of
them and restarts it, and the others take its jobs over once their leases lapse. Exit code 0 when every invariant holds (no job lost, no failure, nothing created twice,
every recorded ID exists, every event path legal), 1 otherwise; the broken ones are listed in
``violations``. See tests/torture/scenario.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests.torture` lives beside the package, not in it

from tests.torture.scenario import run_torture


def rate(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs to submit (default 100)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILL rounds (default 20)")
    parser.add_argument("--fail-rate", type=rate, default=0.1, help="share of requests failed with 429/5xx")
    parser.add_argument("--drop-rate", type=rate, default=0.1, help="share of creates whose answer is lost")
    parser.add_argument("--slow-rate", type=rate, default=0.05, help="share of requests delayed 2 s")
    parser.add_argument("--cut-rate", type=rate, default=0.0, help="share of streamed replies cut mid-way")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ready-after", type=float, default=1.5, help="endpoint CREATING -> RUNNING, s")
    parser.add_argument("--instance-ready-after", type=float, default=0.5, help="instance readiness, s")
    parser.add_argument("--finish-timeout", type=float, default=600.0,
                        help="seconds the last daemon gets to finish every job")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="the jobs database: sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST/DB, "
                             "migrated here and holding no jobs yet (default: a SQLite file in the workdir)")
    parser.add_argument("--daemons", type=int, default=1,
                        help="daemons running at once (default 1; more than 1 needs a PostgreSQL --db)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="each daemon's job concurrency (default: the shipped setting with one "
                             "daemon; a little more than jobs/daemons with several)")
    parser.add_argument("--max-recoveries", type=int, default=None,
                        help="the daemon's poison-job limit (default: the shipped setting)")
    parser.add_argument("--late-create", type=rate, default=0.1,
                        help="share of creates carried out --late-by seconds after their answer was lost")
    parser.add_argument("--late-by", type=float, default=1.0,
                        help="seconds a late create lands after its request (below the daemons' settle window, "
                             "FABRICFLOW_RECONCILE__SETTLE_SECONDS=3 in tests/crash/procs.py)")
    parser.add_argument("--list-lag", type=float, default=0.3, help="seconds new resources stay out of lists")
    parser.add_argument("--page-churn", type=rate, default=0.5,
                        help="share of later list pages before which another user's resource is deleted")
    parser.add_argument("--bystanders", type=int, default=110,
                        help="another user's workspaces named like the first job's (its look-ups span pages)")
    parser.add_argument("--stops", type=int, default=0,
                        help="with --daemons >= 2: SIGSTOP a daemon holding jobs for 1.5 leases, then SIGCONT, "
                             "this many times")
    parser.add_argument("--skew", type=float, default=0.0, metavar="SECONDS",
                        help="with --daemons >= 2: the first daemon's clock this far off the database's")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the SQLite database, specs and daemon logs here (default: a temporary "
                             "directory, removed unless an invariant is broken)")
    parser.add_argument("--brief", action="store_true", help="leave the per-kill log out of the JSON")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.kills < 0:
        parser.error("--jobs must be >= 1 and --kills >= 0")
    if args.daemons < 1 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--daemons and --concurrency must be >= 1")
    backend = urlsplit(args.db).scheme.split("+")[0] if args.db else "sqlite"
    if backend not in ("sqlite", "postgresql", "postgres"):
        parser.error(f"--db {args.db!r}: use a sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST/DB URL")
    if (args.stops or args.skew) and args.daemons < 2:
        parser.error("--stops and --skew need --daemons 2 or more (on PostgreSQL)")
    if args.daemons > 1 and backend == "sqlite":
        parser.error(f"--daemons {args.daemons} needs PostgreSQL: fabricflow runs one daemon per SQLite file; "
                     "pass --db postgresql+asyncpg://USER@HOST/DB (an empty database)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fabricflow-torture-"))
    summary = run_torture(
        jobs=args.jobs, kill_rounds=args.kills, fail_rate=args.fail_rate, drop_rate=args.drop_rate,
        slow_rate=args.slow_rate, seed=args.seed, workdir=workdir, cut_rate=args.cut_rate,
        ready_after=args.ready_after, instance_ready_after=args.instance_ready_after,
        finish_timeout=args.finish_timeout, max_recoveries=args.max_recoveries,
        db_url=args.db, daemons=args.daemons, concurrency=args.concurrency,
        late_create=args.late_create, late_by=args.late_by, list_lag=args.list_lag, page_churn=args.page_churn,
        bystanders=args.bystanders, stop_rounds=args.stops, skew_seconds=args.skew,
    )
    broken = bool(summary["violations"])
    if args.brief:
        summary.pop("kill_log", None)
    if args.workdir is None and not broken:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        summary["workdir"] = str(workdir)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
