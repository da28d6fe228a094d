"""Read commands: list, show, events. They never create a database: a missing file is
"no database at PATH" (exit 3).

They open the Python API read-only: a SQLite file at the current schema is then read through
stdlib sqlite3 (``store.readonly``), so these commands import neither SQLAlchemy nor Alembic.
Any other database goes through JobStore, which migrates an older SQLite file as every command does.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from orchestrator.cli_common import (
    emit_json,
    global_options,
    job_argument,
    run_async,
    settings_from,
    with_flow,
)
from orchestrator.machine import JobState
from orchestrator.render import format_event, format_job, format_jobs

if TYPE_CHECKING:
    from orchestrator.api import Fabricflow


@click.command(name="list")
@click.option("--state", type=click.Choice([s.value for s in JobState], case_sensitive=False),
              help="Only jobs in this state.")
@click.option("--name", help="Only jobs whose name contains this text.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {id, name, state, created_at, updated_at}.")
@global_options
@click.pass_context
def list_jobs(ctx: click.Context, state: str | None, name: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    settings = settings_from(ctx, configure_logs=False)
    jobs = run_async(with_flow(settings, lambda flow: flow.list(state=state, name=name, limit=limit),
                               read_only=True))
    if as_json:
        emit_json([j.summary_json() for j in jobs])
    else:
        click.echo(format_jobs(jobs, state=state, name=name))


@click.command()
@job_argument
@click.option("--json", "as_json", is_flag=True, help="The job object (steps, IDs, result) as JSON.")
@global_options
@click.pass_context
def show(ctx: click.Context, job_ref: str, as_json: bool) -> None:
    """Show a job step by step: states, resource IDs, statuses, attempts, errors, reply.

    JOB is a job ID or any unique prefix of one.
    """
    settings = settings_from(ctx, configure_logs=False)

    job = run_async(with_flow(settings, lambda flow: flow.get(job_ref), read_only=True))
    now = datetime.now(UTC)  # a step in progress: how long so far
    click.echo(json.dumps(job.as_json(), indent=2, ensure_ascii=False) if as_json else format_job(job, now=now))


@click.command()
@job_argument
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of events (with --follow: JSON lines).")
@global_options
@click.pass_context
def events(ctx: click.Context, job_ref: str, follow: bool, as_json: bool) -> None:
    """Print a job's event log: every transition, retry and adoption, oldest first."""
    settings = settings_from(ctx, configure_logs=False)

    async def go(flow: Fabricflow) -> None:
        if not follow:
            found = [event async for event in flow.events(job_ref)]
            if as_json:
                emit_json([e.as_json() for e in found])
            for event in [] if as_json else found:
                click.echo(format_event(event))
            return
        async for event in flow.events(job_ref, follow=True):
            click.echo(json.dumps(event.as_json()) if as_json else format_event(event))

    run_async(with_flow(settings, go, read_only=True))


COMMANDS = (list_jobs, show, events)
