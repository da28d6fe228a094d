"""While a command waits for a daemon's work (``submit --wait``, ``teardown --wait``, ``cancel
--wait``): say on stderr when no daemon is alive on the database, which would otherwise look
like a wait that hangs.

The judgement is ``fabricflow status``'s (the daemon registry: a heartbeat within its lease
time and, on this machine, its process still there), read through ``Fabricflow.daemons``. The
notice is said once when the watch first finds no daemon alive, and again only after one has
been seen alive since (and then gone); the wait itself goes on either way, and ends as soon as
a daemon that appears later has run the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from orchestrator.api import Fabricflow

#: How often the watch reads the registry (two small queries), in seconds.
WATCH_SECONDS = 1.0
#: The first look waits this long: a daemon started along with the command (``fabricflow
#: daemon & fabricflow submit --wait``) has registered by then, so no notice is said for nothing.
GRACE_SECONDS = 3.0

#: The global options a daemon needs to run the same jobs against the same Fabric, as given
#: to the waiting command (``--db`` is always named: the daemon must open this database).
_PASSED_ON = (("config", "--config"), ("fabric_url", "--fabric-url"), ("fabric_ep_url", "--fabric-ep-url"),
              ("region", "--region"))


def daemon_command(db: str, given: dict[str, Any]) -> str:
    """The command that starts a daemon on database ``db`` (a URL; a password is shown as ***),
    with the options of ``given`` (the command line's global options) it needs, shell-quoted."""
    from orchestrator.cli_common import db_argument

    words = ["fabricflow", "daemon", "--db", db_argument(db)]
    for key, option in _PASSED_ON:
        if given.get(key):
            words += [option, shlex.quote(str(given[key]))]
    return " ".join(words)


def no_daemon_notice(command: str) -> str:
    """The line said on stderr when no daemon is alive."""
    return (f"fabricflow: no daemon is alive on this database (fabricflow status shows the registry); "
            f"start one with: {command}")


class DaemonWatch:
    """Looks at the registry for a wait on ``job_ids``; ``look`` returns the notice to say, or
    None (a daemon is alive, the jobs have ended, or it has been said already)."""

    def __init__(self, flow: Fabricflow, job_ids: Sequence[str], command: str) -> None:
        self._flow = flow
        self._job_ids = list(job_ids)
        self._notice = no_daemon_notice(command)
        self._said = False

    async def look(self) -> str | None:
        """One look: the notice when no daemon is alive while a job waited for has not ended,
        and it has not been said since a daemon was last seen alive."""
        if any(d.is_alive for d in await self._flow.daemons()):
            self._said = False
            return None
        if self._said:
            return None
        # Read after the registry: a job that a daemon ended before it stopped reads as ended.
        states = await self._flow.states(self._job_ids)
        if all(state.is_terminal for state in states.values()):
            return None  # nothing left to wait for (the wait sees so itself)
        self._said = True
        return self._notice

    async def run(self, say: Callable[[str], None], *, every: float = WATCH_SECONDS,
                  grace: float = GRACE_SECONDS) -> None:
        """Look every ``every`` seconds, the first time after ``grace``, until cancelled; say
        each notice."""
        await asyncio.sleep(grace)
        while True:
            try:
                notice = await self.look()
            except Exception:  # noqa: BLE001 - only advice: the wait reports a failing database itself
                return
            if notice is not None:
                say(notice)
            await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def watching_daemons(flow: Fabricflow, job_ids: Sequence[str]) -> AsyncIterator[None]:
    """Watch the registry (``DaemonWatch``) while the body waits for ``job_ids``, saying the
    notice on stderr. The daemon command it suggests carries the current command's ``--db``
    and the Fabric options given to it."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    given = dict(root.meta.get("fabricflow.globals", {})) if root is not None else {}
    db = root.meta.get("fabricflow.db") if root is not None else None
    command = daemon_command(db, given) if db else "fabricflow daemon"
    watch = DaemonWatch(flow, job_ids, command)
    task = asyncio.create_task(watch.run(lambda line: click.echo(line, err=True)))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
