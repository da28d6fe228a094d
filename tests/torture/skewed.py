"""``python -m tests.torture.skewed SECONDS daemon ...``: fabricflow with its clock SECONDS off.

The torture scenario starts one daemon this way to show that leases follow the database's
clock: a daemon whose own clock is wrong says so (``clock_skew``) and takes no job over. Only the
store's clock is shifted (every timestamp fabricflow writes or compares comes from it); the
process's real clock, which asyncio's timers use, is left alone.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta

import orchestrator.store.jobs as jobs

OFFSET = timedelta(seconds=float(sys.argv.pop(1)))
_real = jobs.utcnow


def skewed() -> datetime:
    return _real() + OFFSET


jobs.utcnow = skewed
jobs.JobStore.__init__.__kwdefaults__["clock"] = skewed

if __name__ == "__main__":
    from orchestrator.entry import main

    main()
