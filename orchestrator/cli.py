"""The ``fabricflow`` command line. It reads and writes the database; it never talks to a daemon.

This module holds the group and the commands that execute jobs (run, submit, daemon); the
others live in cli_reading (list, show, events), cli_lifecycle (cancel, retry, teardown,
invoke, chat) and cli_admin (emulator, db, config), all sharing cli_common. Exit codes are
documented there.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from orchestrator import (
    cli_admin,
    cli_lifecycle,
    cli_ops,
    cli_orphans,
    cli_reading,
    cli_ui,
)
from orchestrator.cli_common import (
    EXIT_FAILED,
    Group,
    emit_json,
    follow,
    global_options,
    open_flow,
    run_async,
    settings_from,
)
from orchestrator.errors import NotFoundError, UserError

if TYPE_CHECKING:
    from orchestrator.api import Fabricflow
    from orchestrator.config import Settings
    from orchestrator.domain import Job
    from orchestrator.render import ProgressPrinter
    from orchestrator.spec import JobSpec
    from orchestrator.submission import Prepared

# Every command goes through the Python API (orchestrator.api), imported inside the commands
# with the spec models, so that --help, --version, list, show and events start quickly. No
# command reaches into the engine, the store or the emulator itself (tests/unit/test_cli_layers.py).


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@global_options
@click.version_option(package_name="fabricflow")
def main() -> None:
    """fabricflow: DataArts Fabric inference services as durable, resumable jobs.

    A job creates a workspace, an endpoint (waiting until it is RUNNING), a model and a service
    instance (waiting again), then streams a chat completion from it. Every ID and status is
    committed to a database, so a job survives crashes and never creates a resource twice.

    \b
    Try it with the bundled emulator (no cloud account needed), from any directory:
      fabricflow example quickstart > quickstart.yaml
      fabricflow plan quickstart.yaml          # what run would do; writes nothing
      fabricflow run quickstart.yaml           # in a checkout: fabricflow run examples/quickstart.yaml
    \b
    Or run jobs in the background:
      fabricflow daemon &                      # executes submitted jobs
      fabricflow submit quickstart.yaml
      fabricflow list / show JOB / events JOB --follow
    """


for _module in (cli_reading, cli_lifecycle, cli_admin, cli_ops, cli_orphans, cli_ui):
    for _command in _module.COMMANDS:
        main.add_command(_command)


# --- run ---------------------------------------------------------------------------------------

#: While nothing else is printed, `run` says this often what it is waiting for, and for how long.
TICK_SECONDS = 5.0


@main.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON on stdout.")
@global_options
@click.pass_context
def run(ctx: click.Context, spec_file: str, as_json: bool) -> None:
    """Submit SPEC and execute it here, showing progress and the streamed reply on stderr.

    Ctrl-C stops at a safe point and leaves the job PENDING for a daemon (or another run) to
    finish; on the embedded emulator (no --fabric-url), whose resources end with this process, the
    job is CANCELLED instead. Exit code 0 when the job succeeds, 1 when it fails, 130 when
    interrupted; before it starts, 2 for a bad spec, 3 for a reused resource that does not
    exist, 4 when Fabric cannot be reached (or fails) to check one.
    Warnings (retried requests) appear as progress lines, unless log_format is json.
    """
    from orchestrator.machine import JobState
    from orchestrator.render import ProgressPrinter
    from orchestrator.spec import load_spec
    from orchestrator.submission import Prepared

    printer = ProgressPrinter()
    settings = settings_from(ctx, log_lines=printer.line)
    (job_id,) = new_job_ids(1)
    spec = load_spec(spec_file, job_id=job_id)  # {job} in its strings becomes the ID's first 8 digits
    job, stopped_by = run_async(_run(settings, Prepared([job_id], [spec]), printer))
    if as_json:
        emit_json(job.as_json())
    if stopped_by is not None:
        ctx.exit(128 + stopped_by)
    if job.state is not JobState.SUCCEEDED:
        ctx.exit(EXIT_FAILED)


async def _run(settings: Settings, spec: Prepared, printer: ProgressPrinter) -> tuple[Job, int | None]:
    """Run the job (the one ``spec`` holds) here; the final job, and the signal that stopped it
    early, if one did."""
    import asyncio

    flow = await open_flow(settings, create=True)
    try:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals: list[int] = []
        stopped: list[Job] = []
        ticker: list[asyncio.Task[None]] = []

        def on_signal(sig: int) -> None:
            signals.append(sig)
            stop.set()

        def submitted(job: Job) -> None:  # committed; Ctrl-C now stops it at a safe point
            printer.restart_clock()
            printer.line(f"job {job.id} ({job.name}) submitted to {flow.db}")
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig)
            ticker.append(asyncio.create_task(_tick(flow, job.id, printer)))

        try:
            final = await flow.run(spec, observer=printer, stop=stop, on_submitted=submitted,
                                   on_stopped=stopped.append)
        finally:
            for task in ticker:
                task.cancel()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if stopped and flow.is_embedded:  # the API has cancelled it: its resources die with this process
            printer.line(f"stopped; job {final.id[:8]} CANCELLED (the embedded emulator's resources "
                         "end with this process, so nothing could finish it)")
        elif stopped:
            printer.line(f"stopped; job {final.id[:8]} is PENDING: `fabricflow daemon` will finish it")
        else:
            error = f": {final.error['message']}" if final.error else ""
            printer.line(f"job {final.id[:8]} {final.state}{error}")
        return final, (signals[0] if signals and stopped else None)
    finally:
        await flow.close()


async def _tick(flow: Fabricflow, job_id: str, printer: ProgressPrinter) -> None:
    """While nothing else is printed, say every TICK_SECONDS what is being waited for, how long
    it has been, and the latest status known."""
    import asyncio

    from orchestrator.render import waiting_lines

    while True:
        idle = printer.idle_for()
        if idle < TICK_SECONDS:
            await asyncio.sleep(TICK_SECONDS - idle)
            continue
        lines = waiting_lines(await flow.get(job_id))
        for line in lines:
            printer.line(line)
        if not lines:  # between attempts, say: nothing to report, look again later
            await asyncio.sleep(TICK_SECONDS)


# --- submit ------------------------------------------------------------------------------------

#: The most jobs one ``submit`` creates: its one transaction stays short, its specs fit in memory.
MAX_JOBS = 100_000


@main.command()
@click.argument("spec_files", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help=f"Submit N copies of each SPEC (at most {MAX_JOBS} jobs in all); "
                   "{index} in a spec's strings numbers them, {job} names them after their job.")
@click.option("--wait", is_flag=True, help="Wait until a daemon has finished every job; exit 1 if any fails. "
                   "Tells on stderr when no daemon is alive to run them.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the job object instead of its ID (a JSON array of them for several jobs).")
@global_options
@click.pass_context
def submit(ctx: click.Context, spec_files: tuple[str, ...], count: int, wait: bool, as_json: bool) -> None:
    """Validate each SPEC and enqueue it for a daemon; prints the new jobs' IDs, one per line.

    Two tokens give each job resources of its own. {job} in any string of a spec becomes the
    first 8 hex digits of the new job's ID (the prefix `fabricflow list` shows), so the same spec
    can be submitted again and again (mind the length: a workspace name has 4-32 characters, so
    24 are left beside {job}). With --count N every SPEC is submitted N times; {index} becomes
    the job's number in this command (0, 1, 2, ..., counting on across the SPECs in order);
    --count refuses a spec whose resource names have neither token. Quote such strings in YAML
    ("ws-{index}"): there an unquoted { starts a mapping. `fabricflow run` and `plan` replace
    {job} too, and {index} by 0, as for the only job of a submit.

    \b
    For example, with   workspace: {name: "ws-{index}"}   in spec.yaml:
      fabricflow submit spec.yaml --count 100      # 100 jobs: workspaces ws-0 ... ws-99
      fabricflow submit a.yaml b.yaml              # two jobs, IDs in this order
    \b
    With   workspace: {name: "ws-{job}"}   instead, each submit makes a new workspace:
      fabricflow submit spec.yaml                  # job 3f9c2a1e...: workspace ws-3f9c2a1e
      fabricflow submit spec.yaml --count 3        # 3 jobs, 3 workspaces (with {index} too, if wanted)

    Every copy of every SPEC is checked before anything is written, and the jobs are committed
    in one transaction: either all of them are submitted or, on any error, none.
    """
    from orchestrator.submission import Prepared

    settings = settings_from(ctx)
    job_ids, specs = specs_from_files(spec_files, count=count)  # a bad spec: no database is opened
    if not run_async(_submit(settings, Prepared(job_ids, specs), wait=wait, as_json=as_json)):
        ctx.exit(EXIT_FAILED)


def new_job_ids(n: int) -> list[str]:
    """IDs for jobs about to be submitted: chosen first, since ``{job}`` in a spec needs its job's."""
    import uuid

    return [uuid.uuid4().hex for _ in range(n)]


def specs_from_files(paths: Sequence[str], *, count: int = 1) -> tuple[list[str], list[JobSpec]]:
    """New job IDs, and ``count`` validated copies of each spec file for them: ``{index}``
    numbering the copies across the files, ``{job}`` replaced by each copy's job ID.

    Raises one UserError naming every bad file (or first bad copy of one), before anything is written.
    """
    from orchestrator.spec import parse_copies, read_spec_data

    if count * len(paths) > MAX_JOBS:
        asked = f"--count {count}" if len(paths) == 1 else f"{len(paths)} specs x --count {count}"
        raise UserError(f"{asked} is {count * len(paths)} jobs, more than one submit takes "
                        f"({MAX_JOBS}); split them over several commands")
    job_ids = new_job_ids(count * len(paths))
    specs: list[JobSpec] = []
    problems: list[str] = []
    for n, path in enumerate(paths):
        try:
            data = read_spec_data(path)
            _check_names_differ(data, path, count)
            specs += parse_copies(data, range(n * count, (n + 1) * count), path,
                                  job_ids[n * count:(n + 1) * count])
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("\n".join(problems))
    return job_ids, specs


def _check_names_differ(data: Any, path: str, count: int) -> None:
    """Refuse copies of a spec that would all create resources of the same names."""
    from orchestrator.spec import is_templated, resource_names

    names = resource_names(data)
    if count > 1 and names and not any(is_templated(name) for name in names.values()):
        raise UserError(f"{path}: --count {count} would give every copy the same resource names "
                        f"({', '.join(names)}), so the jobs would collide; put {{index}} or {{job}} in at "
                        'least one, e.g. name: "ws-{index}"')


async def _submit(settings: Settings, prepared: Prepared, *, wait: bool, as_json: bool) -> bool:
    """Submit every spec in one transaction, under its ID (on a real Fabric, once the resources
    they reuse are found), and print the IDs or jobs; False if a waited job failed."""
    from orchestrator.machine import JobState

    flow = await open_flow(settings, create=True)
    try:
        ids = await flow.submit_many(prepared)
        if not as_json:
            click.echo("\n".join(ids))
        if not wait:
            if as_json:
                _emit_jobs([await flow.get(job_id) for job_id in ids])
            return True
        if len(ids) == 1:
            jobs = [await follow(flow, ids[0], printer=True)]
        else:
            jobs = await _wait_for_all(flow, ids)
        if as_json:
            _emit_jobs(jobs)
        return all(job.state is JobState.SUCCEEDED for job in jobs)
    finally:
        await flow.close()


def _emit_jobs(jobs: list[Job]) -> None:
    """One job as a JSON object, several as a JSON array of them."""
    emit_json(jobs[0].as_json() if len(jobs) == 1 else [job.as_json() for job in jobs])


async def _wait_for_all(flow: Fabricflow, ids: list[str]) -> list[Job]:
    """Wait until every job has ended, printing one line on stderr as each does (and whether no
    daemon is alive to run them, ``cli_waiting``); the final jobs."""
    from orchestrator.cli_waiting import watching_daemons

    async with watching_daemons(flow, ids):
        return await _each_ended(flow, ids)


async def _each_ended(flow: Fabricflow, ids: list[str]) -> list[Job]:
    import asyncio

    ended: dict[str, Job] = {}
    while True:
        pending = [job_id for job_id in ids if job_id not in ended]
        states = await flow.states(pending)  # a few queries, not one per job
        for job_id in pending:
            if job_id not in states:
                raise NotFoundError(f"job {job_id} is no longer in the database")
            if states[job_id].is_terminal:
                ended[job_id] = job = await flow.get(job_id)
                error = f": {job.error['message']}" if job.error else ""
                click.echo(f"job {job.id[:8]} ({job.name}) {job.state}{error}", err=True)
        if len(ended) == len(ids):
            return [ended[job_id] for job_id in ids]
        await asyncio.sleep(0.5)


# --- plan, example ---------------------------------------------------------------------------


@main.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: {spec, name, fabric_url, proceeds, steps: [{step, action, name, id, "
                   "reason}]}.")
@global_options
@click.pass_context
def plan(ctx: click.Context, spec_file: str, as_json: bool) -> None:
    """Check SPEC against Fabric and print what `run SPEC` would do, step by step; writes nothing.

    \b
    Each resource is one of:
      create NAME        nothing of that name exists (inside a workspace the job creates, nothing can)
      reuse ID           the spec's {id: ...}; it exists
      adopt ID           one same-named resource exists and the spec says on_existing: adopt
      refuse: REASON     a name already taken (on_existing: fail), a reused ID that does not exist,
                         or a catalogue value Fabric does not offer (spec_code, base_model_type)
    then the waits and the invocation. The checks are the engine's own (catalogues, reused IDs,
    the look-up by name before a create); only reads are sent, no database is opened. A name
    with {job} is new for every job: it is shown as written. Under the default configuration the
    embedded emulator answers, where nothing exists yet; --fabric-url checks a long-running one
    (or, with --region, Fabric).

    Each look-up is retried on transient errors with a job's step's backoff, honouring
    Retry-After, at most 4 times (a step tries retry.max_attempts times).

    Exit code 0 when run would go ahead, 2 when it would refuse the spec, 4 when Fabric could
    not be reached or failed a look-up still after those retries (so nothing is known of the spec).
    """
    # Log events (a retried read) are short lines on stderr, as in `run`: stdout is the plan.
    settings = settings_from(ctx, log_lines=lambda line: click.echo(line, err=True))
    from orchestrator.plan import read_draft

    spec, templated = read_draft(spec_file)  # a bad spec: exit 2 before any request
    from orchestrator.api import plan_spec

    made, where = run_async(plan_spec(spec, settings=settings, templated=templated))
    if as_json:
        emit_json({"spec": spec_file, "name": spec.name, "fabric_url": where, "proceeds": made.proceeds,
                   "steps": [step.as_json() for step in made.steps]})
    else:
        fabric = "the embedded emulator, where nothing exists yet" if where == "embedded" else where
        click.echo(f"plan for {spec_file} (job {spec.name!r}) against {fabric}")
        click.echo("\n".join(made.lines()))
        if templated:
            click.echo("{job} is the new job's ID, its first 8 hex digits")
        if made.proceeds:
            click.echo(f"run would proceed: {made.count('create')} to create, {made.count('reuse')} to reuse, "
                       f"{made.count('adopt')} to adopt")
    if not made.proceeds:
        refused = ", ".join(str(step.step) for step in made.refused)
        raise UserError(f"{spec_file}: run would refuse this spec ({refused})")


@main.command()
@click.argument("name", required=False)
@global_options
def example(name: str | None) -> None:
    """Print the bundled example spec NAME on stdout; without NAME, list them.

    \b
    From any directory:
      fabricflow example                            # list them
      fabricflow example quickstart > quickstart.yaml
      fabricflow run quickstart.yaml
    """
    from orchestrator.examples import example_files, example_text, summary

    if name is not None:
        click.echo(example_text(name), nl=False)
        return
    files = example_files()
    width = max((len(n) for n in files), default=0)
    for found, path in files.items():
        click.echo(f"{found:<{width}}  {summary(path)}")


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

    Logs one line per claim, step transition and job end (with job_id, step and Fabric's
    request_id) at the default level, info: JSON lines when stderr is not a terminal.
    """
    settings = settings_from(ctx, log_level="info")

    async def go() -> None:
        flow = await open_flow(settings, create=True)
        from orchestrator.process import tune_gc

        tune_gc()  # this process is the daemon: started, it allocates mostly short-lived objects
        try:
            await flow.serve(
                concurrency=concurrency or None, metrics_host=metrics_host, metrics_port=metrics_port,
                on_metrics_ready=lambda url: click.echo(f"health and metrics on {url}/healthz, {url}/metrics",
                                                        err=True),
                on_started=lambda owner: click.echo(f"fabricflow daemon {owner} on {flow.db}", err=True))
        finally:
            await flow.close()

    run_async(go())
