"""The ``fabricflow`` command line. It reads and writes the database; it never talks to a daemon.

Exit codes: 0 success, 1 the job failed, 2 bad input, 3 not found.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from orchestrator import logs
from orchestrator.config import Settings, load_settings
from orchestrator.domain import Event, Job
from orchestrator.errors import NotFoundError, OrchestratorError, UserError
from orchestrator.machine import JobState
from orchestrator.render import ProgressPrinter, format_event, format_job, format_jobs
from orchestrator.spec import (
    JobSpec,
    Reuse,
    has_index,
    load_spec,
    parse_copies,
    read_spec_data,
    resource_names,
)
from orchestrator.store import db
from orchestrator.store.jobs import JobStore

# The engine, the Fabric client and aiohttp are imported inside the commands that talk to
# Fabric, so that `list`, `show` and `events` start quickly.

T = TypeVar("T")
EXIT_FAILED = 1

# --- global options, accepted before or after the command ----------------------------------

_GLOBALS = ("config", "db", "fabric_url", "fabric_ep_url", "region", "log_level")


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
                     help="Structured logs on stderr at this level."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_from(ctx: click.Context) -> Settings:
    """Settings from the global options given anywhere on the command line."""
    given = dict(ctx.find_root().meta.get("fabricflow.globals", {}))
    config_file = given.pop("config", None)
    settings = load_settings(config_file, **given)
    ctx.find_root().meta["fabricflow.db"] = settings.db
    logs.configure(settings.log_level, settings.log_format)
    return settings


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine on a fresh event loop."""
    return asyncio.run(coro)  # type: ignore[arg-type]


class Group(click.Group):
    """Turns expected errors into one clear line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OrchestratorError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(getattr(exc, "exit_code", 2))
        except DBAPIError as exc:
            # The database failed mid-command (locked, read-only, disk full): one line, no SQL.
            url = ctx.find_root().meta.get("fabricflow.db")
            where = db.describe(url) if url else "database"
            click.echo(f"error: {where}: {db.database_problem(exc)}", err=True)
            ctx.exit(2)


def emit_json(data: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@global_options
@click.version_option(package_name="fabricflow")
def main() -> None:
    """fabricflow: DataArts Fabric inference services as durable, resumable jobs.

    A job creates a workspace, an endpoint (waiting until it is RUNNING), a model and a service
    instance (waiting again), then streams a chat completion from it. Every ID and status is
    committed to a database, so a job survives crashes and never creates a resource twice.

    \b
    Try it with the bundled emulator (no cloud account needed):
      fabricflow run examples/quickstart.yaml
    \b
    Or run jobs in the background:
      fabricflow daemon &                      # executes submitted jobs
      fabricflow submit examples/quickstart.yaml
      fabricflow list / show JOB / events JOB --follow
    """


async def _open(settings: Settings, *, create: bool = True) -> JobStore:
    return await JobStore.open(settings.db, auto_upgrade=None if create else False)


# --- run / submit ------------------------------------------------------------------------------


@main.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON on stdout.")
@global_options
@click.pass_context
def run(ctx: click.Context, spec_file: str, as_json: bool) -> None:
    """Submit SPEC and execute it here, showing progress and the streamed reply on stderr.

    Ctrl-C stops at a safe point and leaves the job PENDING for a daemon (or another run) to
    finish. Exit code 0 when the job succeeds, 1 when it fails.
    """
    settings = settings_from(ctx)
    spec = load_spec(spec_file)
    job = run_async(_run(settings, spec))
    if as_json:
        emit_json(job.as_json())
    if job.state is not JobState.SUCCEEDED:
        ctx.exit(EXIT_FAILED)


async def _run(settings: Settings, spec: Any) -> Any:
    from orchestrator.engine.daemon import heartbeat, new_owner
    from orchestrator.engine.procedure import check_reused
    from orchestrator.engine.runner import EngineSettings, Runner
    from orchestrator.wiring import client_for, fabric_target

    store = await _open(settings)
    try:
        async with fabric_target(settings) as target, client_for(settings, target) as client:
            await check_reused(client, spec)  # a missing reused resource: nothing is written
            owner = new_owner()
            job = await store.submit(spec, owner=owner, lease=settings.daemon.lease_seconds)
            printer = ProgressPrinter()
            printer.line(f"job {job.id} ({job.name}) submitted to {db.describe(settings.db)}")
            runner = Runner(store, client, owner=owner, settings=EngineSettings.from_settings(settings),
                            observer=printer)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, runner.stop.set)
            ticker = asyncio.create_task(_tick(store, job.id, printer))
            try:
                async with heartbeat(store, runner, settings.daemon):
                    state = await runner.run(job)
            finally:
                ticker.cancel()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            if state is JobState.PENDING and target.embedded:
                await store.cancel(job.id)  # its resources die with this process's emulator
                printer.line(f"stopped; job {job.id[:8]} CANCELLED (the embedded emulator's resources "
                             "end with this process, so nothing could finish it)")
            elif state is JobState.PENDING:
                printer.line(f"stopped; job {job.id[:8]} is PENDING: `fabricflow daemon` will finish it")
            final = await store.get(job.id)
            if state is not JobState.PENDING:
                error = f": {final.error['message']}" if final.error else ""
                printer.line(f"job {job.id[:8]} {final.state}{error}")
            return final
    finally:
        await store.close()


async def _tick(store: JobStore, job_id: str, printer: ProgressPrinter) -> None:
    """On long waits, say every 15 s what is being waited for."""
    while True:
        await asyncio.sleep(5)
        if printer.idle_for() < 15:
            continue
        job = await store.get(job_id)
        waiting = [s for s in job.steps.values() if s.state in ("WAITING", "IN_FLIGHT")]
        for step in waiting:
            status = f" (status {step.resource_status})" if step.resource_status else ""
            printer.line(f"{step.name:<17} still {step.state}{status}")


#: The most jobs one ``submit`` creates: its one transaction stays short, its specs fit in memory.
MAX_JOBS = 100_000


@main.command()
@click.argument("spec_files", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help=f"Submit N copies of each SPEC (at most {MAX_JOBS} jobs in all); "
                   "{index} in a spec's strings numbers them.")
@click.option("--wait", is_flag=True, help="Wait until a daemon has finished every job; exit 1 if any fails.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the job object instead of its ID (a JSON array of them for several jobs).")
@global_options
@click.pass_context
def submit(ctx: click.Context, spec_files: tuple[str, ...], count: int, wait: bool, as_json: bool) -> None:
    """Validate each SPEC and enqueue it for a daemon; prints the new jobs' IDs, one per line.

    With --count N every SPEC is submitted N times. {index} in any string of a spec becomes the
    job's number in this command (0, 1, 2, ..., counting on across the SPECs in order), so that
    each copy creates resources of its own; --count refuses a spec whose resource names lack it.
    Quote such strings in YAML ("ws-{index}"): there an unquoted { starts a mapping.

    \b
    For example, with   workspace: {name: "ws-{index}"}   in spec.yaml:
      fabricflow submit spec.yaml --count 100      # 100 jobs: workspaces ws-0 ... ws-99
      fabricflow submit a.yaml b.yaml              # two jobs, IDs in this order

    Every copy of every SPEC is checked before anything is written, and the jobs are committed
    in one transaction: either all of them are submitted or, on any error, none.
    """
    settings = settings_from(ctx)
    specs = specs_from_files(spec_files, count=count)
    if not run_async(_submit(settings, specs, wait=wait, as_json=as_json)):
        ctx.exit(EXIT_FAILED)


def specs_from_files(paths: Sequence[str], *, count: int = 1) -> list[JobSpec]:
    """``count`` validated copies of each spec file, ``{index}`` numbering them across the files.

    Raises one UserError naming every bad file (or first bad copy of one), before anything is written.
    """
    if count * len(paths) > MAX_JOBS:
        asked = f"--count {count}" if len(paths) == 1 else f"{len(paths)} specs x --count {count}"
        raise UserError(f"{asked} is {count * len(paths)} jobs, more than one submit takes "
                        f"({MAX_JOBS}); split them over several commands")
    specs: list[JobSpec] = []
    problems: list[str] = []
    for n, path in enumerate(paths):
        try:
            data = read_spec_data(path)
            _check_names_differ(data, path, count)
            specs += parse_copies(data, range(n * count, (n + 1) * count), path)
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("\n".join(problems))
    return specs


def _check_names_differ(data: Any, path: str, count: int) -> None:
    """Refuse copies of a spec that would all create resources of the same names."""
    names = resource_names(data)
    if count > 1 and names and not any(has_index(name) for name in names.values()):
        raise UserError(f"{path}: --count {count} would give every copy the same resource names "
                        f"({', '.join(names)}), so the jobs would collide; put {{index}} in at least one, "
                        'e.g. name: "ws-{index}"')


async def _submit(settings: Settings, specs: list[JobSpec], *, wait: bool, as_json: bool) -> bool:
    """Submit every spec in one transaction and print the IDs or jobs; False if a waited job failed."""
    await _check_reused(settings, specs)
    store = await _open(settings)
    try:
        ids = await store.submit_many(specs)
        if not as_json:
            click.echo("\n".join(ids))
        if not wait:
            if as_json:
                _emit_jobs([await store.get(job_id) for job_id in ids])
            return True
        if len(ids) == 1:
            jobs = [await _follow(store, ids[0], printer=True)]
        else:
            jobs = await _wait_for_all(store, ids)
        if as_json:
            _emit_jobs(jobs)
        return all(job.state is JobState.SUCCEEDED for job in jobs)
    finally:
        await store.close()


def _emit_jobs(jobs: list[Job]) -> None:
    """One job as a JSON object, several as a JSON array of them."""
    emit_json(jobs[0].as_json() if len(jobs) == 1 else [job.as_json() for job in jobs])


async def _check_reused(settings: Settings, specs: list[JobSpec]) -> None:
    """On a real (or separate) Fabric, check that the resources the specs reuse exist, once for
    each distinct set of reused IDs (copies of one spec share theirs), before anything is written."""
    distinct = {_reused_ids(spec): spec for spec in specs if _reuses(spec)}
    if settings.is_embedded or not distinct:
        return
    from orchestrator.engine.procedure import check_reused
    from orchestrator.wiring import client_for, fabric_target

    async with fabric_target(settings) as target, client_for(settings, target) as client:
        for spec in distinct.values():
            await check_reused(client, spec)


_REUSABLE = ("workspace", "endpoint", "model")


def _reuses(spec: Any) -> bool:
    return any(isinstance(getattr(spec, key), Reuse) for key in _REUSABLE)


def _reused_ids(spec: JobSpec) -> tuple[str | None, ...]:
    return tuple(part.id if isinstance(part := getattr(spec, key), Reuse) else None for key in _REUSABLE)


async def _wait_for_all(store: JobStore, ids: list[str]) -> list[Job]:
    """Wait until every job has ended, printing one line on stderr as each does; the final jobs."""
    ended: dict[str, Job] = {}
    while True:
        pending = [job_id for job_id in ids if job_id not in ended]
        states = await _states(store, pending)
        for job_id in pending:
            if job_id not in states:
                raise NotFoundError(f"job {job_id} is no longer in the database")
            if states[job_id].is_terminal:
                ended[job_id] = job = await store.get(job_id)
                error = f": {job.error['message']}" if job.error else ""
                click.echo(f"job {job.id[:8]} ({job.name}) {job.state}{error}", err=True)
        if len(ended) == len(ids):
            return [ended[job_id] for job_id in ids]
        await asyncio.sleep(0.5)


async def _states(store: JobStore, ids: list[str]) -> dict[str, JobState]:
    """The current state of each job, read in a few queries rather than one per job."""
    # JobStore reads one job at a time; this bulk read belongs there once the store is reopened.
    from sqlalchemy import select

    from orchestrator.store.schema import jobs

    found: dict[str, JobState] = {}
    async with store.engine.connect() as conn:
        for start in range(0, len(ids), 500):  # within every database's bound-parameter limit
            query = select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(ids[start:start + 500]))
            found.update((job_id, JobState(state)) for job_id, state in await conn.execute(query))
    return found


def finish_submitted(ctx: click.Context, job: Any, *, as_json: bool, wait: bool) -> None:
    """Print a submitted job (its ID, or the object with --json); exit 1 if a waited job failed."""
    if as_json:
        emit_json(job.as_json())
    elif not wait:
        click.echo(job.id)
    if wait and job.state is not JobState.SUCCEEDED:
        ctx.exit(EXIT_FAILED)


async def follow_events(store: JobStore, job_id: str, *, after: int = 0) -> AsyncIterator[Event]:
    """The job's events as they are committed, until it has ended and its last event is out."""
    while True:
        ended = (await store.get(job_id)).state.is_terminal  # read before the events: none missed
        for event in await store.events(job_id, after=after):
            after = event.id
            yield event
        if ended:
            return
        await asyncio.sleep(0.5)


async def _follow(store: JobStore, job_id: str, *, printer: bool) -> Any:
    """Print the job's events to stderr as they are committed until it ends; returns the final job."""
    async for event in follow_events(store, job_id):
        if printer:
            click.echo(format_event(event), err=True)
    return await store.get(job_id)


# --- daemon ------------------------------------------------------------------------------------


@main.command()
@click.option("--concurrency", type=click.IntRange(min=1), help="Jobs run at once (default 200).")
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Serve /healthz and /metrics (Prometheus) on this port (0: a free one).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
@global_options
@click.pass_context
def daemon(ctx: click.Context, concurrency: int | None, metrics_port: int | None, metrics_host: str) -> None:
    """Run submitted jobs until SIGTERM or Ctrl-C, then drain and exit 0.

    On SQLite one daemon owns a database file and, at start-up, resumes every job a crashed
    daemon left RUNNING. Jobs continue where they stopped; nothing is created twice.
    """
    settings = settings_from(ctx)
    if concurrency:
        settings.daemon.concurrency = concurrency

    async def go() -> None:
        from orchestrator.engine.daemon import Daemon, new_owner
        from orchestrator.engine.health import DaemonMetrics
        from orchestrator.engine.runner import EngineSettings, Runner
        from orchestrator.wiring import client_for, fabric_target

        store = await _open(settings)
        try:
            async with fabric_target(settings) as target, client_for(settings, target) as client:
                metrics = DaemonMetrics()
                runner = Runner(store, client, owner=new_owner(), settings=EngineSettings.from_settings(settings),
                                observer=metrics)
                d = Daemon(store, runner, settings.daemon, url=settings.db, metrics=metrics,
                           metrics_address=None if metrics_port is None else (metrics_host, metrics_port),
                           on_metrics_ready=lambda url: click.echo(f"health and metrics on {url}/healthz, "
                                                                   f"{url}/metrics", err=True))
                click.echo(f"fabricflow daemon {runner.owner} on {db.describe(settings.db)}", err=True)
                await d.run()
        finally:
            await store.close()

    run_async(go())


# --- reading -------------------------------------------------------------------------------------


@main.command(name="list")
@click.option("--state", type=click.Choice([s.value for s in JobState], case_sensitive=False),
              help="Only jobs in this state.")
@click.option("--name", help="Only jobs whose name contains this text.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {id, name, state, created_at, updated_at}.")
@global_options
@click.pass_context
def list_jobs(ctx: click.Context, state: str | None, name: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    settings = settings_from(ctx)
    jobs = run_async(_with_store(settings, lambda s: s.list(state=state, name=name, limit=limit)))
    if as_json:
        emit_json([j.summary_json() for j in jobs])
    else:
        click.echo(format_jobs(jobs))


@main.command()
@click.argument("job_ref", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="The job object (steps, IDs, result) as JSON.")
@global_options
@click.pass_context
def show(ctx: click.Context, job_ref: str, as_json: bool) -> None:
    """Show a job step by step: states, resource IDs, statuses, attempts, errors, reply.

    JOB is a job ID or any unique prefix of one.
    """
    settings = settings_from(ctx)

    async def get(store: JobStore) -> Any:
        return await store.get(await store.resolve(job_ref))

    job = run_async(_with_store(settings, get))
    click.echo(json.dumps(job.as_json(), indent=2, ensure_ascii=False) if as_json else format_job(job))


@main.command()
@click.argument("job_ref", metavar="JOB")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of events (with --follow: JSON lines).")
@global_options
@click.pass_context
def events(ctx: click.Context, job_ref: str, follow: bool, as_json: bool) -> None:
    """Print a job's event log: every transition, retry and adoption, oldest first."""
    settings = settings_from(ctx)

    async def go(store: JobStore) -> None:
        job_id = await store.resolve(job_ref)
        if not follow:
            found = await store.events(job_id)
            if as_json:
                emit_json([e.as_json() for e in found])
            for event in [] if as_json else found:
                click.echo(format_event(event))
            return
        async for event in follow_events(store, job_id):
            click.echo(json.dumps(event.as_json()) if as_json else format_event(event))

    run_async(_with_store(settings, go))


async def _with_store(settings: Settings, func: Callable[[JobStore], Awaitable[T]]) -> T:
    store = await _open(settings)
    try:
        return await func(store)
    finally:
        await store.close()


# --- emulator, db, config ------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option("--ready-after", type=float, default=2.0, show_default=True, help="Seconds an endpoint stays CREATING.")
@click.option("--instance-ready-after", type=float, default=1.0, show_default=True,
              help="Seconds a service instance stays CREATING.")
@click.option("--delete-after", type=float, default=0.5, show_default=True,
              help="Seconds an endpoint or service instance stays DELETING.")
@click.option("--cold-start", type=float, default=0.0, show_default=True,
              help="Seconds the first invocation waits when the endpoint's mu min is 0.")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests answered with a transient 429/500/502/503/504.")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of creates whose resource is created but whose response is never sent.")
@click.option("--slow-rate", type=click.FloatRange(0, 1), default=0.0, help="Share of requests delayed.")
@click.option("--cut-rate", type=click.FloatRange(0, 1), default=0.0, help="Share of streams cut mid-way.")
@click.option("--create-fail", metavar="REGEX", help="Endpoints whose name matches end in CREATE_FAILED.")
@click.option("--instance-fail", metavar="REGEX", help="Service instances whose name matches end in FAILED.")
@click.option("--seed", type=int, help="Seed for every random fault decision (reproducible runs).")
@click.option("--auth", type=click.Choice(["none", "token", "aksk"]), default="none", show_default=True)
@click.option("--token", help="The accepted X-Auth-Token with --auth token.")
@click.option("--ak", help="The accepted access key with --auth aksk.")
@click.option("--sk", help="The secret key of --ak.")
@click.option("--max-clock-skew", type=float, default=900, show_default=True,
              help="Allowed X-Sdk-Date skew in seconds; 0 turns the check off.")
@click.option("--state-file", type=click.Path(dir_okay=False), help="Keep resources across emulator restarts.")
@global_options
def emulator(host: str, port: int, ready_after: float, instance_ready_after: float,
             delete_after: float, cold_start: float, fail_rate: float,
             drop_rate: float, slow_rate: float, cut_rate: float, create_fail: str | None,
             instance_fail: str | None,
             seed: int | None, auth: str, token: str | None, ak: str | None, sk: str | None,
             max_clock_skew: float, state_file: str | None) -> None:
    """Serve the local Fabric API emulator (both hosts on one port) until Ctrl-C.

    GET /_emulator/stats counts what was created, per kind and name.
    """
    from orchestrator.emulator.app import serve
    from orchestrator.emulator.config import EmulatorConfig

    try:
        config = EmulatorConfig(
            ready_after=ready_after, instance_ready_after=instance_ready_after, delete_after=delete_after,
            cold_start=cold_start, fail_rate=fail_rate,
            drop_rate=drop_rate, slow_rate=slow_rate, cut_rate=cut_rate, create_fail=create_fail,
            instance_fail=instance_fail,
            seed=seed, auth=auth, token=token, ak=ak, sk=sk,  # type: ignore[arg-type]
            max_clock_skew=max_clock_skew, state_file=state_file,
        )
    except Exception as exc:  # re.error, ValueError: a bad option value
        raise UserError(f"emulator: {exc}") from None

    def ready(url: str) -> None:
        click.echo(f"fabricflow emulator listening on {url} (auth {auth}); Ctrl-C to stop", err=True)

    serve(config, host, port, on_ready=ready)


@main.group(cls=Group)
@global_options
def db_group() -> None:
    """Database schema commands."""


main.add_command(db_group, name="db")


@db_group.command()
@global_options
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Apply every pending migration to the database (creating it if needed)."""
    settings = settings_from(ctx)

    async def go() -> str:
        store = await JobStore.open(settings.db, auto_upgrade=True)
        await store.close()
        return db.head_revision()

    head = run_async(go())
    click.echo(f"{db.describe(settings.db)}: schema at {head} (current)")


@main.group(cls=Group, name="config")
@global_options
def config_group() -> None:
    """Configuration commands."""


@config_group.command(name="show")
@global_options
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective settings as JSON, secrets masked."""
    emit_json(settings_from(ctx).masked())


# The lifecycle commands register themselves on `main` when imported.
from orchestrator import cli_lifecycle  # noqa: E402, F401
