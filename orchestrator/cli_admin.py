"""The commands around the jobs: the emulator, the database schema, the configuration."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import click

from orchestrator.cli_common import (
    Group,
    emit_json,
    global_options,
    run_async,
    settings_from,
)
from orchestrator.cli_ops import Duration
from orchestrator.errors import UserError
from orchestrator.listening import cannot_listen


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option("--ready-after", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds an endpoint stays CREATING.")
@click.option("--instance-ready-after", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds a service instance stays CREATING.")
@click.option("--delete-after", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Seconds an endpoint or service instance stays DELETING.")
@click.option("--cold-start", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds the first invocation waits when the endpoint's mu min is 0.")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests answered with a transient 429/500/502/503/504.")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of creates whose resource is created but whose response is never sent.")
@click.option("--slow-rate", type=click.FloatRange(0, 1), default=0.0, help="Share of requests delayed.")
@click.option("--cut-rate", type=click.FloatRange(0, 1), default=0.0, help="Share of streams cut mid-way.")
@click.option("--late-create", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="RATE",
              help="Share of creates carried out after the client gave up: the connection is closed with no "
                   "answer and the resource appears only --late-by seconds later.")
@click.option("--late-by", type=click.FloatRange(min=0), default=3.0, show_default=True, metavar="SECONDS",
              help="Seconds after its dropped request that a late create is carried out.")
@click.option("--list-lag", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Seconds a new resource stays missing from lists (GET by ID finds it at once).")
@click.option("--page-churn", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="RATE",
              help="Share of later list pages (offset > 0) before which another user's resource listed on an "
                   "earlier page is deleted (never one whose description carries a [fabricflow:...] marker).")
@click.option("--create-fail", metavar="REGEX", help="Endpoints whose name matches end in CREATE_FAILED.")
@click.option("--instance-fail", metavar="REGEX", help="Service instances whose name matches end in FAILED.")
@click.option("--seed", type=int, help="Seed for every random fault decision (reproducible runs).")
@click.option("--auth", type=click.Choice(["none", "token", "aksk"]), default="none", show_default=True)
@click.option("--token", help="The accepted X-Auth-Token with --auth token.")
@click.option("--ak", help="The accepted access key with --auth aksk.")
@click.option("--sk", help="The secret key of --ak.")
@click.option("--max-clock-skew", type=click.FloatRange(min=0), default=900, show_default=True,
              help="Allowed X-Sdk-Date skew in seconds; 0 turns the check off.")
@click.option("--state-file", type=click.Path(dir_okay=False), help="Keep resources across emulator restarts.")
@global_options
def emulator(host: str, port: int, ready_after: float, instance_ready_after: float,
             delete_after: float, cold_start: float, fail_rate: float,
             drop_rate: float, slow_rate: float, cut_rate: float, late_create: float, late_by: float,
             list_lag: float, page_churn: float, create_fail: str | None, instance_fail: str | None,
             seed: int | None, auth: str, token: str | None, ak: str | None, sk: str | None,
             max_clock_skew: float, state_file: str | None) -> None:
    """Serve the local Fabric API emulator (both hosts on one port) until Ctrl-C.

    GET /_emulator/stats counts what was created, per kind and name. Fault decisions draw
    from one RNG (--seed); GET/POST /_emulator/faults shows and changes them at runtime.
    """
    from orchestrator.emulator.app import serve
    from orchestrator.emulator.config import EmulatorConfig
    from orchestrator.emulator.statefile import StateFileError

    try:
        config = EmulatorConfig(
            ready_after=ready_after, instance_ready_after=instance_ready_after, delete_after=delete_after,
            cold_start=cold_start, fail_rate=fail_rate,
            drop_rate=drop_rate, slow_rate=slow_rate, cut_rate=cut_rate, late_create=late_create,
            late_by=late_by, list_lag=list_lag, page_churn=page_churn, create_fail=create_fail,
            instance_fail=instance_fail,
            seed=seed, auth=auth, token=token, ak=ak, sk=sk,  # type: ignore[arg-type]
            max_clock_skew=max_clock_skew, state_file=state_file,
        )
    except Exception as exc:  # ValueError: a bad option value; EmulatorConfig names the field, not the option
        message = str(exc)
        first, _, rest = message.partition(" ")
        if (name := first.rstrip(":")) in EmulatorConfig.__dataclass_fields__:
            message = f"--{name.replace('_', '-')}{first[len(name):]} {rest}"
        raise UserError(f"emulator: {message}") from None
    if state_file is not None:
        _check_state_file(Path(state_file))

    def ready(url: str) -> None:
        click.echo(f"fabricflow emulator listening on {url} (auth {auth}); Ctrl-C to stop", err=True)

    try:
        serve(config, host, port, on_ready=ready)
    except StateFileError as exc:
        raise UserError(f"emulator: --state-file {exc}") from None
    except (OSError, UnicodeError) as exc:  # binding: the state file's errors are StateFileError
        raise cannot_listen(exc, host, port, who="emulator") from None


def _check_state_file(path: Path) -> None:
    """Refuse a state file the emulator could not write later, before it starts listening."""
    where = path.parent if str(path.parent) else Path(".")
    if not where.is_dir():
        raise UserError(f"emulator: --state-file {path}: no directory {where}")
    if not os.access(where, os.W_OK):
        raise UserError(f"emulator: --state-file {path}: directory {where} is not writable")


@click.group(cls=Group, name="db")
@global_options
def db_group() -> None:
    """Database commands: upgrade the schema, prune finished jobs."""


@db_group.command()
@global_options
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Apply every pending migration to the database (creating it if needed)."""
    from orchestrator.api import describe_database, upgrade_database

    settings = settings_from(ctx)
    head = run_async(upgrade_database(settings.db))
    click.echo(f"{describe_database(settings.db)}: schema at {head} (current)")


@db_group.command()
@click.option("--older-than", "older_than", type=Duration(), required=True, metavar="DURATION",
              help="Remove jobs that finished longer ago than this: 30d, 12h, 90m, 45s, 2w.")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@click.option("--with-resources", is_flag=True,
              help="Also remove jobs whose resources were never torn down (`fabricflow orphans` then "
                   "lists those resources).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: {dry_run, older_than, before, jobs: [IDs], rows: {jobs, steps, events, "
                   "invocations}, daemons, kept: {for_teardown: [IDs], with_resources: [IDs]}}.")
@global_options
@click.pass_context
def prune(ctx: click.Context, older_than: timedelta, dry_run: bool, with_resources: bool, as_json: bool) -> None:
    """Remove finished jobs' rows: their steps, events and invocations with them.

    Only jobs that ended (SUCCEEDED, FAILED, CANCELLED) longer ago than --older-than go. A job
    still PENDING or RUNNING never does. Neither does one that a teardown still refers to
    (unless that teardown goes too: a teardown reads its job's steps and shows what it tore
    down), nor, without --with-resources, a job whose resources were never torn down: its row is
    the only record of what it made, for `teardown` and `invoke`, and without it `orphans` would
    list a service still in use. The registry rows of daemons stopped (or silent) since before
    then go as well.

    \b
      fabricflow db prune --older-than 30d --dry-run   # what would go; nothing removed
      fabricflow db prune --older-than 30d

    Safe while daemons run: each batch of 500 jobs is one transaction, and a job retried
    meanwhile is left alone.
    """
    from orchestrator.cli_ops import format_prune
    from orchestrator.cli_ops import prune as prune_rows

    settings = settings_from(ctx)
    outcome = run_async(prune_rows(settings, older_than=older_than, dry_run=dry_run, with_resources=with_resources))
    if as_json:
        emit_json(outcome)
    else:
        click.echo(format_prune(outcome))


@click.group(cls=Group, name="config")
@global_options
def config_group() -> None:
    """Configuration commands."""


@config_group.command(name="show")
@click.option("--json", "as_json", is_flag=True, help="JSON, as without it (for symmetry with the other commands).")
@global_options
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings as JSON, secrets masked."""
    emit_json(settings_from(ctx, configure_logs=False).masked())


COMMANDS = (emulator, db_group, config_group)
