"""Operating fabricflow for months: ``status`` (one screen: daemons, jobs, what the oldest wait
for, the latest failures) and the work behind ``db prune`` (its command sits in cli_admin's db
group).

``status`` is a read command: it never creates a database, and reads a SQLite file at the
current schema through stdlib sqlite3 (``store.readonly``), importing nothing heavy.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli_common import (
    emit_json,
    global_options,
    open_flow,
    run_async,
    settings_from,
    with_flow,
)

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.domain import Job
    from orchestrator.store.overview import Current, DaemonRow, Overview


@click.command()
@click.option("--limit", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="Show the N oldest running jobs, the N latest failures, the N latest stopped daemons.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: daemons, jobs, running, failures.")
@global_options
@click.pass_context
def status(ctx: click.Context, limit: int, as_json: bool) -> None:
    """One screen on how fabricflow is doing, from the database alone.

    \b
    daemons    every daemon not stopped, and those stopped in the last 24 hours:
               alive (a heartbeat within its lease time, and on this machine its process
               still there), stale (none since: crashed, hung or cut off from the
               database, or its process gone; its jobs are taken over when their leases
               lapse) or stopped; HEARTBEAT: how long since its last one; JOBS: the
               running jobs it holds now; UPTIME: how long it has been up, for a stale
               one until its last heartbeat (a dead daemon's does not grow), for a
               stopped one until its stop
    jobs       how many are in each state
    running    the oldest running jobs, each with its current step and what it waits for
               (a create in its settle window after an unknown outcome: only looking)
    failures   the latest failed jobs with their error code and message

    --json prints {database, at, daemons: [{owner, state, host, pid, version, lease_seconds,
    started_at, heartbeat_at, heartbeat_age_seconds, stopped_at, jobs_held, jobs_held_now,
    uptime_seconds}], jobs: {STATE: N}, running: [{id, name, kind, owner, started_at,
    running_seconds, lease_expires_at, step, step_state, step_seconds, attempts, resource_kind,
    resource_id, resource_status, retry_at, cancel_requested, settle_look, waiting_for}],
    failures: [{id, name, kind, finished_at, step, error}]}. jobs_held is the count at its last
    heartbeat, jobs_held_now the RUNNING jobs under its lease as read now; settle_look is the
    number of a settle window's latest look, else null. Times are ISO 8601 in UTC, read against
    the database's clock.
    """
    from orchestrator.api import describe_database, sqlite_file

    settings = settings_from(ctx, configure_logs=False)
    overview = run_async(with_flow(settings, lambda flow: flow.overview(limit=limit), read_only=True))
    path = sqlite_file(settings.db)
    where = str(path) if path is not None else describe_database(settings.db)  # a URL: never its password
    if as_json:
        emit_json(overview_json(overview, where))
        return
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # no-color.org
    click.echo(format_overview(overview, where, color=color), color=color)


# --- JSON ------------------------------------------------------------------------------------

def overview_json(o: Overview, database: str) -> dict[str, Any]:
    """The object of ``status --json``."""
    return {
        "database": database,
        "at": o.at.isoformat(),
        "daemons": [d.as_json() for d in o.daemons],
        "jobs": o.jobs,
        "running": [_running_json(job, current, o.at) for job, current in o.running],
        "failures": [{"id": job.id, "name": job.name, "kind": str(job.kind), "step": _failed_step(job),
                      "finished_at": _iso(job.finished_at), "error": job.error} for job in o.failures],
    }


def _running_json(job: Job, current: Current, now: datetime) -> dict[str, Any]:
    from orchestrator.render import latest_status

    step = job.steps[current.step] if current.step else None
    since = job.started_at or job.created_at
    return {
        "id": job.id, "name": job.name, "kind": str(job.kind), "owner": job.lease_owner,
        "started_at": since.isoformat(), "running_seconds": round(_seconds(now - since), 1),
        "lease_expires_at": _iso(job.lease_expires_at),
        "step": str(current.step) if current.step else None,
        "step_state": str(step.state) if step else None,
        "step_seconds": round(_seconds(now - step.started_at), 1) if step and step.started_at else None,
        "attempts": step.attempts if step else 0,
        "resource_kind": str(current.resource_kind) if current.resource_kind else None,
        "resource_id": current.resource_id,
        "resource_status": latest_status(job, current.step) if current.step else None,
        "retry_at": _iso(current.retry_at),
        "cancel_requested": job.cancel_requested_at is not None,
        "settle_look": current.settle_look,
        "waiting_for": waiting_for(job, current, now),
    }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _seconds(delta: timedelta) -> float:
    return max(0.0, delta.total_seconds())


def _failed_step(job: Job) -> str | None:
    from orchestrator.machine import StepState

    return next((str(n) for n in job.order if job.steps[n].state is StepState.FAILED), None)


# --- text ------------------------------------------------------------------------------------

def age(seconds: float) -> str:
    """A span as people say it: 45s, 4m12s, 3h05m, 2d07h."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 2 * 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def waiting_for(job: Job, current: Current, now: datetime) -> str:
    """What a running job waits for, e.g. "endpoint_ready WAITING, endpoint ep-1 CREATING for 4m12s"."""
    from orchestrator.machine import Action, StepState, row_of
    from orchestrator.render import latest_status

    if current.step is None:
        return "every step done; finishing"
    step = job.steps[current.step]
    text = f"{current.step} {step.state}"
    action = row_of(job.kind, current.step).action
    # The invocation's row names no resource kind of its own: it streams from the instance.
    what = str(current.resource_kind or ("service_instance" if action is Action.INVOKE else ""))
    took = f" for {age(_seconds(now - step.started_at))}" if step.started_at else ""
    if step.state is StepState.WAITING:
        status = latest_status(job, current.step) or "status unknown"
        text += f", {what} {current.resource_id or '?'} {status}{took}"
    elif step.state is StepState.IN_FLIGHT:
        target = (f"{step.request_name!r}" if action is Action.CREATE and step.request_name
                  else current.resource_id or "")
        verb = {Action.CREATE: "creating", Action.DELETE: "deleting", Action.INVOKE: "streaming from"}.get(action)
        if current.settle_look is not None:
            # After an unknown outcome the engine only looks: no create is sent in this window.
            verb, target = "looking for", f"{target} (settle window, look {current.settle_look})".lstrip()
        text += ", " + " ".join(part for part in (verb or "calling", what, target) if part) + took
    if current.retry_at is not None and current.retry_at > now:
        text += f", attempt {step.attempts + 1} in {age(_seconds(current.retry_at - now))}"
        if step.error:
            text += f" (last: {_error(step.error)})"
    if job.lease_expires_at is not None and job.lease_expires_at < now:
        lapsed = age(_seconds(now - job.lease_expires_at))
        text += f"; lease lapsed {lapsed} ago, waiting for a daemon to take it over"
    if job.cancel_requested_at is not None:
        text += "; cancel requested"
    return text


def _error(error: dict[str, Any]) -> str:
    code = error.get("code")
    message = str(error.get("message") or "").splitlines()[0] if error.get("message") else ""
    return f"[{code}] {message}" if code else message


_STATE_STYLE = {"alive": {"fg": "green"}, "stale": {"fg": "yellow", "bold": True}, "stopped": {"dim": True}}


def format_overview(o: Overview, database: str, *, color: bool = False) -> str:
    """``fabricflow status`` for a terminal."""
    def style(text: str, **how: Any) -> str:
        return click.style(text, **how) if color else text

    lines = [f"{database} at {_local(o.at)}", ""]
    if o.daemons:
        alive = sum(d.state == "alive" for d in o.daemons)
        lines.append(f"daemons: {alive} alive")
        lines.append(f"  {'STATE':<8} {'OWNER':<40} {'VERSION':<9} {'HEARTBEAT':>10} {'JOBS':>5}  UPTIME")
        lines += [_daemon_line(d, o.at, style) for d in o.daemons]
    else:
        lines.append("daemons: none registered (start one with `fabricflow daemon`)")
    lines.append("")
    lines.append("jobs:    " + "  ".join(f"{state} {n}" for state, n in o.jobs.items()))
    if o.running:
        lines += ["", f"oldest running (of {o.jobs.get('RUNNING', 0)}):",
                  f"  {'ID':<8} {'FOR':>7}  {'NAME':<24} WAITING FOR"]
        for job, current in o.running:
            since = job.started_at or job.created_at
            lines.append(f"  {job.id[:8]:<8} {age(_seconds(o.at - since)):>7}  {_cut(job.name, 24):<24} "
                         f"{waiting_for(job, current, o.at)}")
    if o.failures:
        lines += ["", f"latest failures (of {o.jobs.get('FAILED', 0)}):",
                  f"  {'ID':<8} {'AGO':>7}  {'NAME':<24} ERROR"]
        for job in o.failures:
            ago = age(_seconds(o.at - job.finished_at)) if job.finished_at else "-"
            step = _failed_step(job)
            error = (f"{step}: " if step else "") + (_error(job.error) if job.error else "no error recorded")
            lines.append(f"  {job.id[:8]:<8} {ago:>7}  {_cut(job.name, 24):<24} {style(error, fg='red')}")
    return "\n".join(lines)


def _daemon_line(d: DaemonRow, now: datetime, style: Any) -> str:
    # JOBS: what it holds as read now; its row's count is its last heartbeat's (up to
    # heartbeat_seconds old, and 0 for one killed before its first).
    if d.stopped_at is not None:
        uptime = f"was up {age(d.uptime)}, stopped {age(_seconds(now - d.stopped_at))} ago"
    elif d.state == "stale":
        uptime = f"was up {age(d.uptime)} until its last heartbeat"  # dead: no longer growing
    else:
        uptime = f"up {age(d.uptime)}"
    state = style(f"{d.state:<8}", **_STATE_STYLE[d.state])
    return (f"  {state} {_cut(d.owner, 40):<40} {_cut(d.version, 9):<9} {age(d.heartbeat_age) + ' ago':>10} "
            f"{d.jobs_held_now:>5}  {uptime}")


def _local(at: datetime) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


# --- db prune --------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType):
    """A span such as 30d, 12h, 90m, 45s or 2w, as a timedelta (a bad one exits 2)."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value))
        if match is None:
            self.fail(f"{value!r} is not a duration; use a number and a unit: 30d, 12h, 90m, 45s or 2w",
                      param, ctx)
        return timedelta(seconds=float(match.group(1)) * _UNIT[match.group(2)])


async def prune(settings: Settings, *, older_than: timedelta, dry_run: bool,
                with_resources: bool = False) -> dict[str, Any]:
    """Remove (or, ``dry_run``, count) finished jobs' rows and old daemons' registry rows: the
    object ``db prune --json`` prints."""
    flow = await open_flow(settings, announce=False)  # a missing SQLite file: exit 3, nothing made
    try:
        outcome = await flow.prune(older_than=older_than, dry_run=dry_run, with_resources=with_resources)
    finally:
        await flow.close()
    return {"dry_run": outcome["dry_run"], "older_than": span(older_than), **outcome}


def span(delta: timedelta) -> str:
    """A duration in the largest unit that states it exactly: 30d, 90m, 2w, 45s."""
    seconds = delta.total_seconds()
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNIT[unit] == 0:
            return f"{int(seconds // _UNIT[unit])}{unit}"
    return f"{seconds:g}s"


def format_prune(outcome: dict[str, Any]) -> str:
    """What ``db prune`` removed (or would remove), and what it kept and why."""
    rows = outcome["rows"]
    verb = "would remove" if outcome["dry_run"] else "removed"
    before = _local(datetime.fromisoformat(outcome["before"]))
    text = (f"{verb} {_count(len(outcome['jobs']), 'finished job')} (finished before {before}, over "
            f"{outcome['older_than']} ago) with {_count(rows['steps'], 'step')}, "
            f"{_count(rows['events'], 'event')} and {_count(rows['invocations'], 'invocation')}; "
            f"{_count(outcome['daemons'], 'daemon')} from the registry")
    kept = outcome["kept"]
    if kept["with_resources"]:
        text += (f"\nkept {_count(len(kept['with_resources']), 'old finished job')} whose resources were never "
                 f"torn down ({_ids(kept['with_resources'])}): `fabricflow teardown JOB` first, or "
                 "--with-resources to forget them anyway")
    if kept["for_teardown"]:
        text += (f"\nkept {_count(len(kept['for_teardown']), 'old finished job')} that a younger or unfinished "
                 f"teardown refers to ({_ids(kept['for_teardown'])})")
    return text


def _ids(job_ids: list[str]) -> str:
    return ", ".join(i[:8] for i in job_ids[:10]) + (", ..." if len(job_ids) > 10 else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


COMMANDS = (status,)
