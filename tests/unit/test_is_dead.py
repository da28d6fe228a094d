"""Which lease owners are dead processes: only those of this machine and this PID namespace."""

import os
import socket
import subprocess
import sys

from orchestrator.engine.daemon import new_owner
from orchestrator.process import is_dead, pid_namespace

HOST = socket.gethostname()[:32]


def a_dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: its PID names no process now
    return child.pid


def test_an_owner_is_dead_only_when_its_pid_is_gone_from_this_namespace():
    dead = a_dead_pid()
    here = pid_namespace()
    assert here  # Linux: /proc/self/ns/pid
    assert is_dead(f"{HOST}:{dead}:abc123:{here}")
    assert is_dead(f"{HOST}:{dead}:abc123")  # an owner of an earlier version, with no namespace
    assert not is_dead(f"{HOST}:{os.getpid()}:abc123:{here}")  # this very process
    assert not is_dead(f"{HOST}:{dead}:abc123:{'0' if here != '0' else '1'}")  # PIDs we cannot see
    assert not is_dead(f"another-host:{dead}:abc123:{here}")  # only its lease tells
    assert not is_dead("daemon-a") and not is_dead("") and not is_dead(f"{HOST}:notapid:abc123")


def test_a_new_owner_names_this_host_pid_and_namespace():
    host, pid, suffix, namespace = new_owner().split(":")
    assert (host, pid, namespace) == (HOST, str(os.getpid()), pid_namespace()) and len(suffix) == 6
    assert len(new_owner()) <= 64  # the lease_owner and daemons.owner columns
    assert not is_dead(new_owner())
