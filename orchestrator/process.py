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


def pid_namespace() -> str:
    """This process's PID namespace on Linux (its inode, in hex), or "" where there is none to read.

    Two containers can share a host name but not their processes: a Kubernetes pod with
    ``hostNetwork`` carries the node's name, yet its PIDs are invisible from the next pod's. A
    lease owner records its namespace, so that ``is_dead`` judges only owners whose PIDs it can
    see."""
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino, "x")
    except OSError:
        return ""


def is_dead(owner: str) -> bool:
    """True when ``owner`` (a lease owner, ``host:pid:random[:pidns]``) names a process of this
    machine, in this PID namespace, that no longer exists; False for another machine's or
    another namespace's, whose lease expiry alone tells."""
    parts = owner.split(":")
    host, pid_text = parts[0], parts[1] if len(parts) > 1 else ""
    namespace = parts[3] if len(parts) > 3 else ""  # none in the owners of earlier versions
    if host != socket.gethostname()[:32] or not pid_text.isdigit():
        return False
    if namespace and namespace != pid_namespace():
        return False  # a PID we cannot see from here: not a dead one
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by another user
    return False
