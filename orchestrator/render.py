"""What people read: live progress, job tables, event lists. Machines get ``--json`` instead."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from orchestrator.domain import Event, Job, Step
from orchestrator.machine import ROWS, STEPS, JobKind, StepName, StepState


def _short(job_id: str) -> str:
    return job_id[:8]


class ProgressPrinter:
    """Prints step transitions and the streamed reply to stderr while a job runs."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.started = time.monotonic()
        self.last_output = self.started
        self._in_reply = False

    def restart_clock(self) -> None:
        """Count the elapsed time shown on each line from now (the job's submission)."""
        self.started = self.last_output = time.monotonic()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.last_output = time.monotonic()

    def line(self, text: str) -> None:
        """A line of progress, ending a streamed reply first if one is open."""
        if self._in_reply:
            self._write("\n")
            self._in_reply = False
        self._write(f"[{time.monotonic() - self.started:6.1f}s] {text}\n")

    def on_step(self, job: Job, step: StepName, state: StepState, detail: str) -> None:
        """A step changed state."""
        self.line(f"{step:<17} {state:<10} {detail}")

    def on_text(self, job_id: str, text: str) -> None:
        """A piece of the reply arrived."""
        if not self._in_reply:
            self._write("reply: ")
            self._in_reply = True
        self._write(text)

    def idle_for(self) -> float:
        """Seconds since anything was printed."""
        return time.monotonic() - self.last_output


def _when(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def _duration(step_start: datetime | None, step_end: datetime | None, now: datetime | None = None) -> str:
    """How long a step took; for one still going (``now`` given), how long so far, then "…"."""
    if step_start is None:
        return "-"
    if step_end is None:
        if now is None:
            return "…"
        return _duration(step_start, max(now, step_start)) + "…"
    seconds = (step_end - step_start).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def format_job(job: Job, *, now: datetime | None = None) -> str:
    """``fabricflow show``: the job, then one row per step; with ``now``, a running job's step
    in progress shows how long it has taken so far. A job that has ended has no step in
    progress: one it left unfinished (WAITING when it was cancelled, say) keeps that state, with
    the time it spent until the job ended and no running mark."""
    running = now if not job.state.is_terminal else None
    lines = [
        f"job      {job.id}",
        f"name     {job.name}",
        f"state    {job.state}" + ("  (cancellation requested)" if job.cancel_requested_at
                                   and not job.state.is_terminal else ""),
        f"created  {_when(job.created_at)}    updated {_when(job.updated_at)}",
    ]
    if job.kind is JobKind.TEARDOWN:
        lines.append(f"tears down job {job.parent_id}")
    if job.lease_owner:
        lines.append(f"held by  {job.lease_owner} until {_when(job.lease_expires_at)}")
    if job.error:
        rid = f" (request {job.error['request_id']})" if job.error.get("request_id") else ""
        lines.append(f"error    {_error(job.error)}{rid}")
    lines.append("")
    header = f"{'STEP':<17} {'STATE':<10} {'RESOURCE':<36} {'STATUS':<14} {'RETRIES':>7} {'TIME':>7}"
    lines.append(header)
    for name in job.order:
        step = job.steps[name]
        lines.append(
            f"{name:<17} {step.state:<10} {step.resource_id or '-':<36} "
            f"{latest_status(job, name) or '-':<14} {step.attempts:>7} "
            f"{_duration(step.started_at, _ended(job, step), running):>7}"
        )
        if step.error and step.state is not StepState.SUCCEEDED:
            lines.append(f"{'':<17} ! {_error(step.error)}")
    model = job.steps[StepName.MODEL]
    if job.kind is JobKind.CREATE and model.extra.get("version_id"):
        lines.append(f"\nmodel version  {model.extra['version_id']}")
    if job.result and job.result.get("reply") is not None:
        usage = job.result.get("usage") or {}
        lines.append(f"reply          {job.result['reply']}")
        lines.append(f"finish_reason  {job.result.get('finish_reason')}    usage {usage}")
    return "\n".join(lines)


def _ended(job: Job, step: Step) -> datetime | None:
    """When the step stopped: its own end, or for a job that has ended, the job's (a step it
    left unfinished stopped with it)."""
    if step.finished_at is not None or not job.state.is_terminal or step.started_at is None:
        return step.finished_at
    return max(job.finished_at or job.updated_at, step.started_at)


def format_jobs(jobs: list[Job], *, state: str | None = None, name: str | None = None) -> str:
    """``fabricflow list``: one line per job; with none, whether filters or an empty database
    are the reason."""
    if not jobs:
        filters = ([f"--state {state.upper()}"] if state else []) + ([f"--name {name!r}"] if name else [])
        if filters:
            return f"no job matches {' '.join(filters)}"
        return "no jobs yet: submit one with `fabricflow run SPEC` or `fabricflow submit SPEC`"
    rows = [f"{'ID':<10} {'STATE':<10} {'CREATED':<19}  NAME"]
    rows += [f"{_short(j.id):<10} {j.state:<10} {_when(j.created_at):<19}  {j.name}" for j in jobs]
    return "\n".join(rows)


def format_event(event: Event) -> str:
    """One line of ``fabricflow events``."""
    what = event.step or "job"
    edge = f"{event.from_state or '-'} -> {event.to_state}" if event.to_state else "note"
    return f"{_when(event.at)}  {what:<17} {edge:<24} {event.detail or ''}"


def _error(error: dict[str, Any]) -> str:
    """``[code] message``, without the brackets when there is no code."""
    code = error.get("code")
    return f"[{code}] {error.get('message')}" if code else str(error.get("message"))


def latest_status(job: Job, name: StepName) -> str | None:
    """The newest status known for the resource a step is about.

    A create step records the status its create returned (an endpoint's CREATING); the poll
    step after it records later ones (RUNNING). Once a step has started, the resource's latest
    recorded status is shown on it, whichever step of that resource recorded it.
    """
    step = job.steps[name]
    if job.kind is not JobKind.CREATE or step.state is StepState.PENDING or ROWS[name].kind is None:
        return step.resource_status
    kind = ROWS[name].kind
    known = [job.steps[row.name].resource_status for row in STEPS
             if row.kind is kind and row.name in job.steps and job.steps[row.name].state is not StepState.PENDING
             and job.steps[row.name].resource_status]
    return known[-1] if known else step.resource_status


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def waiting_lines(job: Job, now: datetime | None = None) -> list[str]:
    """For ``run``'s quiet stretches: each step in progress, how long it has been, its status."""
    now = now or datetime.now(UTC)
    lines = []
    for name in job.order:
        step = job.steps[name]
        if step.state not in (StepState.WAITING, StepState.IN_FLIGHT):
            continue
        text = f"{name:<17} {step.state:<10}"
        if step.started_at is not None:
            text += f" {_elapsed((now - step.started_at).total_seconds())}"
        status = latest_status(job, name)
        lines.append(text + (f", status {status}" if status else ""))
    return lines
