"""``fabricflow orphans``: resources carrying a fabricflow marker that no job in this database records.

It reads the database and never writes it, and never creates one: a missing SQLite file is
"no database at PATH" (exit 3). It talks to the Fabric given by --fabric-url or --region.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli_common import (
    EXIT_FAILED,
    db_argument,
    emit_json,
    global_options,
    open_flow,
    run_async,
    settings_from,
)
from orchestrator.errors import NotFoundError, UserError

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.orphans import DeleteEvent, Deletion, Orphan


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from orchestrator.spec import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option("--delete", is_flag=True,
              help="Delete the orphans listed (without it, nothing is deleted: a dry run).")
@click.option("--timeout", metavar="DURATION", callback=_duration,
              help="With --delete: how long to wait for deleted resources to be gone, e.g. 90s, 30m "
                   "[default: 30m].")
@click.option("--json", "as_json", is_flag=True,
              help="Print {orphans, skipped, deleted, failed} as JSON on stdout; lines go to stderr.")
@global_options
@click.pass_context
def orphans(ctx: click.Context, delete: bool, timeout: float | None, as_json: bool) -> None:
    """List cloud resources that fabricflow made and no job in this database records.

    Every resource fabricflow creates carries an ownership marker in its description:
    [fabricflow:<the first 16 hex digits of the job ID>]. Fabric takes no idempotency key, so a
    create whose answer was lost may still be carried out; after a lost database, a lost or
    pruned job, or a duplicate, a resource with a marker can exist that no job records: an
    orphan, still costing money. This command looks through every workspace of the Fabric given
    by --fabric-url (or --region), and the endpoints, models and service instances inside each,
    and checks each marked resource against the jobs of --db.

    It is a dry run by default: it prints the orphans, with the reason each is one, and deletes
    nothing. With --delete it deletes them: service instances first, then models and endpoints,
    then orphan workspaces once empty, waiting until each is gone; one line per deleted
    resource; exit 1 if any could not be deleted.

    Never deleted: a resource any job records, one whose job is still under way (its create may
    be awaiting its record; listed as skipped), and a workspace or endpoint that still holds or
    serves something that is not an orphan. A marker whose job is not in this database may be
    another database's (another --db, another machine): check before deleting.

    Every listing and delete is retried on transient errors with a job's step's backoff,
    honouring Retry-After (a listing at most 4 times, a delete retry.max_attempts times, as a
    step). With no database (a lost one), make an empty one with `fabricflow db upgrade --db
    PATH`: against it every marked resource is an orphan. Exit code 0 when the look
    (and the deletes) went through, 1 when a delete did not, 4 when Fabric could not be reached
    or failed a listing still after those retries (nothing is listed or deleted then), 2 when it
    refused the credentials, 3 for a missing database.

    \b
    Examples:
      fabricflow orphans --fabric-url http://127.0.0.1:8080
      fabricflow orphans --region cn-north-4 --db postgresql://user@host/fabricflow --delete
    """
    settings = settings_from(ctx)
    if settings.is_embedded:
        raise UserError("orphans looks for resources on the Fabric your jobs ran against; the embedded "
                        "emulator (the default configuration) starts empty in every process and keeps "
                        "nothing, so there is nothing to find in it: pass --fabric-url URL (a real Fabric, "
                        "or a running `fabricflow emulator`) or --region REGION")
    found, deletions = run_async(_orphans(settings, delete=delete, timeout=timeout, as_json=as_json))
    failed = [d for d in deletions if d.error is not None]
    if as_json:
        emit_json({
            "orphans": [o.as_json() for o in found if not o.skipped],
            "skipped": [o.as_json() for o in found if o.skipped],
            "deleted": [d.orphan.as_json() for d in deletions if d.error is None],
            "failed": [{**d.orphan.as_json(), "error": d.error} for d in failed],
        })
    if failed:
        ctx.exit(EXIT_FAILED)


async def _orphans(settings: Settings, *, delete: bool, timeout: float | None,
                   as_json: bool) -> tuple[list[Orphan], list[Deletion]]:
    """Find (and delete) the orphans; what was found (judged again before deleting) and deleted."""
    try:
        flow = await open_flow(settings)  # before any request: a missing database is exit 3
    except NotFoundError as exc:
        raise NotFoundError(f"{exc}; after a lost database, `fabricflow db upgrade --db {db_argument(settings.db)}` "
                            "makes an empty one, against which every marked resource is listed as an orphan "
                            "(another database may still own some: check before --delete)") from None
    try:
        found = await flow.find_orphans(
            recheck=delete, on_start=lambda url: click.echo(f"looking through every workspace on {url} ...",
                                                            err=True))
        _listing(found, flow.db, err=as_json)
        if not delete:
            _dry_run_hint(found, err=as_json)
            return found, []
        deletions = await flow.delete_orphans(found, timeout=timeout, on_event=_printer(err=as_json))
        gone = sum(1 for d in deletions if d.error is None)
        if deletions:
            click.echo(f"deleted {gone} of {len(deletions)} orphan(s)", err=True)
        return found, deletions
    finally:
        await flow.close()


def _line(orphan: Orphan) -> str:
    where = f" in workspace {orphan.workspace_id}" if orphan.workspace_id else ""
    status = f" ({orphan.status})" if orphan.status else ""
    return f"  {orphan.kind} {orphan.id} {orphan.name!r}{where}{status}: {orphan.reason}"


def _listing(found: list[Orphan], where: str, *, err: bool) -> None:
    orphans = [o for o in found if not o.skipped]
    skipped = [o for o in found if o.skipped]
    if not found:
        click.echo(f"no orphans: every resource carrying a fabricflow marker is recorded by a job in {where}",
                   err=err)
        return
    if orphans:
        click.echo(f"{len(orphans)} orphan(s), carrying a fabricflow marker that no job in {where} records:",
                   err=err)
        for orphan in orphans:
            click.echo(_line(orphan), err=err)
    else:
        click.echo(f"no orphans in {where}", err=err)
    if skipped:
        click.echo(f"{len(skipped)} skipped, never deleted:", err=err)
        for orphan in skipped:
            click.echo(_line(orphan), err=err)
    if any("not in this database" in o.reason for o in orphans):
        click.echo("note: a job that is not in this database may belong to another fabricflow database "
                   "(another --db, another machine), or its rows were pruned: check before deleting its "
                   "resources", err=True)


def _dry_run_hint(found: list[Orphan], *, err: bool) -> None:
    count = sum(1 for o in found if not o.skipped)
    if count:
        click.echo(f"dry run: nothing was deleted. To delete the {count} orphan(s), run again with --delete "
                   "(and the same --db and --fabric-url)", err=err)


def _printer(*, err: bool) -> Any:
    """One line per deleted resource (stdout, or stderr under --json); failures and progress on stderr."""

    def on_event(event: DeleteEvent) -> None:
        o = event.orphan
        if event.what == "deleted" and o is not None:
            where = f" in workspace {o.workspace_id}" if o.workspace_id else ""
            click.echo(f"deleted {o.kind} {o.id} {o.name!r}{where}", err=err)
        elif event.what == "failed" and o is not None:
            click.echo(f"error: could not delete {o.kind} {o.id} {o.name!r}: {event.detail}", err=True)
        else:
            click.echo(event.detail, err=True)

    return on_event


COMMANDS = (orphans,)
