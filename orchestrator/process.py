"""Settings of a long-running fabricflow process (the daemon's), not of a library's host, and
whether a daemon's process still exists on this machine (standard library only: `fabricflow
status` reads it too, and starts in a tenth of a second).

The Python API never calls ``tune_gc``: how an embedding program collects its garbage is its own call.
"""

from __future__ import annotations

import gc
import os
import socket

#: Allocations between two young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Collect garbage less often in a daemon, once it has started.

    A step transition allocates a few dozen short-lived objects (its operation, parameters,
    futures, the writer's results), nearly none of them in reference cycles, so collecting the
    young generation every 700 allocations costs CPU for nothing: about 5 us of a transition's
    37 in `benchmarks/store_paths.py`. What start-up built (modules, settings, the schema) is
    moved out of the collector's sight with ``gc.freeze``, so older-generation passes skip it.
    Cyclic garbage still goes, a little later: at 20,000 allocations, a few MB at most.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


def is_dead(owner: str) -> bool:
    """True when ``owner`` (a lease owner, ``host:pid:random``) names a process of this machine
    that no longer exists; False for another machine's, whose lease expiry alone tells."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname()[:32] or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by another user
    return False
