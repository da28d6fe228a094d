"""What every command module of the CLI shares: global options, Settings, exit codes, stores.

Exit codes: 0 success, 1 the job failed, 2 bad input, 3 not found, 4 Fabric could not be
reached or failed a command's own request (a transport error, a timeout, a 5xx, a 429, an
unknown outcome; Fabric refusing the user's input is 2, or 3 for a 404: ``orchestrator.errors``),
130 interrupted (Ctrl-C; 128 + the signal's number for other signals, as shells report it).

Nothing heavy is imported at module level here or in the command modules: SQLAlchemy, Alembic,
aiohttp, pydantic-settings and the engine are imported inside the commands that need them, so
``--help``, ``--version`` and the read commands start quickly (benchmarks/startup.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from orchestrator.errors import OrchestratorError, UserError

if TYPE_CHECKING:
    from orchestrator.api import Fabricflow
    from orchestrator.config import Settings
    from orchestrator.domain import Job

T = TypeVar("T")
EXIT_FAILED = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, what a shell reports for Ctrl-C

#: Job IDs are this many hexadecimal digits (uuid4().hex); a longer "prefix" is no job's.
JOB_ID_LENGTH = 32

# --- global options, accepted before or after the command ----------------------------------


def db_argument(url: str) -> str:
    """A database URL as one word for a shell command line the user is told to run: quoted,
    with any password shown as ***."""
    import shlex

    from sqlalchemy.engine import make_url

    return shlex.quote(make_url(url).render_as_string(hide_password=True))


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        ctx.find_root().meta.setdefault("fabricflow.globals", {})[param.name] = value
    return value


def global_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --config, --db, --fabric-url, --fabric-ep-url, --region, --log-level to a command."""
    options = [
        click.option("--config", "config", type=click.Path(dir_okay=False), expose_value=False,
                     callback=_remember, help="TOML file overriding config/default.toml."),
        click.option("--db", "db", metavar="URL", expose_value=False, callback=_remember,
                     help="SQLAlchemy URL of the job database [env FABRICFLOW_DB; default a SQLite "
                          "file under ~/.local/share/fabricflow]."),
        click.option("--fabric-url", "fabric_url", metavar="URL", expose_value=False, callback=_remember,
                     help="Fabric API base URL [env FABRICFLOW_FABRIC_URL; default: the embedded emulator]."),
        click.option("--fabric-ep-url", "fabric_ep_url", metavar="URL", expose_value=False,
                     callback=_remember, help="fabric-ep host (service instances, invocations); "
                     "defaults to --fabric-url."),
        click.option("--region", "region", metavar="REGION", expose_value=False, callback=_remember,
                     help="Use the real Fabric hosts of a region, e.g. cn-north-4."),
        click.option("--log-level", "log_level", expose_value=False, callback=_remember,
                     type=click.Choice(["debug", "info", "warning", "error"]),
                     help="Structured logs on stderr at this level [default: info for the daemon, "
                          "warning otherwise]."),
        click.option("--log-format", "log_format", expose_value=False, callback=_remember,
                     type=click.Choice(["auto", "json", "console"]),
                     help="Logs as JSON lines or console lines; auto: console on a terminal, "
                          "JSON otherwise [env FABRICFLOW_LOG_FORMAT]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_from(ctx: click.Context, *, configure_logs: bool = True,
                  log_lines: Callable[[str], None] | None = None, log_level: str = "warning") -> Settings:
    """Settings from the global options given anywhere on the command line.

    ``configure_logs`` sets up structlog (commands that only read the database log nothing);
    ``log_lines`` turns log events into lines of a command's own progress output (``run``);
    ``log_level``: the command's own level when no option, variable or file sets one (the daemon
    logs at info: a line per claim, step transition and job end).

    Without ``configure_logs``, when ``config_files.quick_db`` is sure of ``db`` (the only
    setting list, show and events use), Settings are built only if something else is asked
    for: those commands then never import pydantic-settings. Either way the answers, and the
    errors, are those of Settings.
    """
    given = dict(ctx.find_root().meta.get("fabricflow.globals", {}))
    config_file = given.pop("config", None)
    if not configure_logs:
        from orchestrator.config_files import quick_db

        db = quick_db(config_file, given)
        if db is not None:
            ctx.find_root().meta["fabricflow.db"] = db
            return cast("Settings", _DeferredSettings(db, config_file, given))
    from orchestrator.config import load_settings

    settings = load_settings(config_file, **given)
    ctx.find_root().meta["fabricflow.db"] = settings.db
    if configure_logs:
        from orchestrator import logs

        # NO_COLOR (no-color.org): any non-empty value turns ANSI colours off.
        color = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
        logs.register_secrets(*logs.secrets_of(settings))
        level = settings.log_level if "log_level" in settings.model_fields_set else log_level
        logs.configure(level, settings.log_format, color=color, lines=log_lines)
    return settings


class _DeferredSettings:
    """Settings whose ``db`` is known (``quick_db``); any other attribute builds them in full."""

    def __init__(self, db: str, config_file: str | None, given: dict[str, Any]) -> None:
        self.db = db
        self._args = (config_file, given)
        self._settings: Settings | None = None

    def __getattr__(self, name: str) -> Any:
        if self._settings is None:
            from orchestrator.config import load_settings

            config_file, given = self._args
            self._settings = load_settings(config_file, **given)
        return getattr(self._settings, name)


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine on a fresh event loop."""
    import asyncio

    return asyncio.run(coro)  # type: ignore[arg-type]


class Group(click.Group):
    """Turns expected errors into one clear line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OrchestratorError as exc:
            click.echo(f"error: {exc}", err=True)
            # Each error knows its code (errors.py): a FabricError's says whose fault it was.
            ctx.exit(getattr(exc, "exit_code", 2))
        except KeyboardInterrupt:
            # Not click's "Aborted!" and exit 1, which the README reserves for a failed job.
            click.echo("\ninterrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            # SQLAlchemy is imported only by commands that use it; if it is not loaded, this is
            # no database error.
            sa_exc = sys.modules.get("sqlalchemy.exc")
            if sa_exc is None or not isinstance(exc, sa_exc.DBAPIError):
                raise
            # The database failed mid-command (locked, read-only, disk full): one line, no SQL.
            from orchestrator.api import database_problem, describe_database

            url = ctx.find_root().meta.get("fabricflow.db")
            where = describe_database(url) if url else "database"
            click.echo(f"error: {where}: {database_problem(exc)}", err=True)
            ctx.exit(2)


def emit_json(data: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


# --- JOB arguments --------------------------------------------------------------------------


def _job_ref(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    ref = value.strip().lower()
    if len(ref) > JOB_ID_LENGTH:
        raise UserError(f"not a job ID: {ref[:12]!r}... is {len(ref):,} characters long; a job ID has "
                        f"{JOB_ID_LENGTH} hexadecimal digits (any unique prefix of one will do)")
    return ref


def job_argument(func: Callable[..., Any]) -> Callable[..., Any]:
    """The JOB argument (an ID or a unique prefix of one), checked before any query."""
    return click.argument("job_ref", metavar="JOB", callback=_job_ref)(func)


# --- the Python API, which every command goes through ------------------------------------


async def open_flow(settings: Settings, *, create: bool = False, read_only: bool = False,
                    announce: bool = True) -> Fabricflow:
    """The API on the configured database and Fabric; ``create`` lets a missing SQLite file be
    created (commands that submit). Without it, a missing file is "no database at PATH" (exit 3)
    and nothing is written. ``read_only``: a SQLite file at the current schema is read through
    stdlib sqlite3 (no SQLAlchemy to import). ``announce``: say where the embedded emulator runs.
    """
    from orchestrator.api import Fabricflow

    return await Fabricflow.from_settings(settings, create=create, read_only=read_only, announce=announce)


async def with_flow(settings: Settings, func: Callable[[Fabricflow], Awaitable[T]], *, create: bool = False,
                    read_only: bool = False) -> T:
    """``func(flow)`` on the API (see ``open_flow``), closed afterwards."""
    flow = await open_flow(settings, create=create, read_only=read_only)
    try:
        return await func(flow)
    finally:
        await flow.close()


async def follow(flow: Fabricflow, job_id: str, *, printer: bool) -> Job:
    """Print the job's events to stderr as they are committed until it ends; returns the final job.
    Meanwhile, say on stderr if no daemon is alive to run it (``cli_waiting``)."""
    from orchestrator.cli_waiting import watching_daemons
    from orchestrator.render import format_event

    async with watching_daemons(flow, [job_id]):
        async for event in flow.events(job_id, follow=True):
            if printer:
                click.echo(format_event(event), err=True)
    return await flow.get(job_id)


def finish_submitted(ctx: click.Context, job: Any, *, as_json: bool, wait: bool) -> None:
    """Print a submitted job (its ID, or the object with --json); exit 1 if a waited job failed."""
    from orchestrator.machine import JobState

    if as_json:
        emit_json(job.as_json())
    elif not wait:
        click.echo(job.id)
    if wait and job.state is not JobState.SUCCEEDED:
        ctx.exit(EXIT_FAILED)
