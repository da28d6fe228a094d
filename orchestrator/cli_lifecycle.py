"""Lifecycle commands: cancel, retry, teardown, invoke, chat.

Each acts on a job that exists, so none of them creates a database: a missing SQLite file is
"no database at PATH" (exit 3).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli_common import (
    EXIT_FAILED,
    emit_json,
    finish_submitted,
    follow,
    global_options,
    job_argument,
    run_async,
    settings_from,
    with_flow,
)
from orchestrator.errors import InvocationFailedError, UserError
from orchestrator.machine import JobState, StepState

if TYPE_CHECKING:
    from orchestrator.api import Fabricflow
    from orchestrator.config import Settings
    from orchestrator.domain import Invocation, Job


@click.command()
@job_argument
@click.option("--teardown", "then_teardown", is_flag=True,
              help="Also delete what the job created (a teardown job, run once the job has stopped).")
@click.option("--wait", is_flag=True, help="Wait until the job (and its teardown) has ended. "
                   "Tells on stderr when no daemon is alive to run them.")
@global_options
@click.pass_context
def cancel(ctx: click.Context, job_ref: str, then_teardown: bool, wait: bool) -> None:
    """Cancel a job. A PENDING job ends CANCELLED at once; a RUNNING one stops at its next safe
    point (never between a create request and recording its result) and ends CANCELLED."""
    settings = settings_from(ctx)

    async def go(flow: Fabricflow) -> Job | None:
        ended = (job := await flow.get(job_ref)).state.is_terminal  # ended already: no cancel to report
        done = await flow.cancel(job, teardown=then_teardown)
        if not ended:
            click.echo(f"job {job.id[:8]}: " + ("CANCELLED" if done.job.state is JobState.CANCELLED
                       else "cancellation requested; it stops at its next safe point"), err=True)
        teardown = done.teardown
        if teardown is not None:
            click.echo(teardown.id)
            click.echo(f"teardown job {teardown.id[:8]} submitted; a daemon runs it once the job has stopped",
                       err=True)
        if wait:
            await follow(flow, job.id, printer=False)
            if teardown is not None:
                return await follow(flow, teardown.id, printer=True)
        return teardown

    result = run_async(with_flow(settings, go))
    if wait and result is not None and result.state is not JobState.SUCCEEDED:
        ctx.exit(EXIT_FAILED)


@click.command()
@job_argument
@global_options
@click.pass_context
def retry(ctx: click.Context, job_ref: str) -> None:
    """Run a FAILED (or CANCELLED) job again from its failed step, keeping the IDs recorded.

    The job goes back to PENDING for a daemon to pick up; the events show the retry.
    """
    settings = settings_from(ctx)

    job = run_async(with_flow(settings, lambda flow: flow.retry(job_ref)))
    failed_at = next((s.name for s in job.steps.values() if s.state is StepState.PENDING
                      and s.attempts == 0 and s.started_at), None)
    where = f" from step {failed_at}" if failed_at else ""
    click.echo(f"job {job.id[:8]} is PENDING again{where}; a daemon will continue it", err=True)


@click.command()
@job_argument
@click.option("--wait", is_flag=True, help="Wait until the teardown has ended; exit 1 if it fails. "
                   "Tells on stderr when no daemon is alive to run it.")
@click.option("--json", "as_json", is_flag=True, help="Print the teardown job object (with --wait, when done).")
@global_options
@click.pass_context
def teardown(ctx: click.Context, job_ref: str, wait: bool, as_json: bool) -> None:
    """Delete exactly the resources JOB created, in reverse order, each waited until gone.

    Reused resources and ones adopted with on_existing: adopt are kept. The teardown is a durable
    job of its own (a daemon runs it; it survives crashes); prints its ID. A job has one teardown
    at a time: refused while one is pending or running, or after one succeeded; after one failed
    or was cancelled, a new one deletes what is left.
    """
    settings = settings_from(ctx)

    async def go(flow: Fabricflow) -> Job:
        created = await flow.teardown(job_ref)
        if wait:
            if not as_json:
                click.echo(created.id)
            return await follow(flow, created.id, printer=not as_json)
        return created

    finish_submitted(ctx, run_async(with_flow(settings, go)), as_json=as_json, wait=wait)


# --- invocations ------------------------------------------------------------------------------


def _options(temperature: float | None, max_tokens: int | None, top_p: float | None) -> dict[str, Any]:
    given = {"temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}
    return {k: v for k, v in given.items() if v is not None}


def invocation_options(func: Any) -> Any:
    """Options the invocation API accepts, passed through."""
    for option in reversed([
        click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature (0-2)."),
        click.option("--max-tokens", type=click.IntRange(min=0),
                     help="Longest reply, in tokens (0: Fabric's default, 4096)."),
        click.option("--top-p", type=click.FloatRange(0, 1), help="Nucleus sampling (0-1)."),
        click.option("--system", help="A system message sent before the conversation."),
    ]):
        func = option(func)
    return func


async def _invoke_once(flow: Fabricflow, job_ref: str, messages: list[dict[str, str]],
                       options: dict[str, Any], *, system: str | None, check: bool = False) -> Invocation:
    """One invocation through the API, its reply streaming to stderr (then a newline);
    ``check`` as in ``Fabricflow.invoke``."""

    def on_text(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    record = await flow.invoke(job_ref, messages, system=system, on_text=on_text, check=check, **options)
    if record.error is None:
        sys.stderr.write("\n")
    return record


def _embedded_hint(settings: Settings) -> None:
    if settings.is_embedded:
        raise UserError("invoke talks to the Fabric the job ran against, and the embedded emulator "
                        "keeps nothing between runs: pass --fabric-url (a real Fabric, or a running "
                        "`fabricflow emulator`)")


@click.command()
@job_argument
@click.argument("message")
@invocation_options
@click.option("--json", "as_json", is_flag=True, help="Print the stored invocation record as JSON.")
@global_options
@click.pass_context
def invoke(ctx: click.Context, job_ref: str, message: str, temperature: float | None,
           max_tokens: int | None, top_p: float | None, system: str | None, as_json: bool) -> None:
    """Send MESSAGE to JOB's service instance; the reply streams to stderr as it arrives.

    Each invocation is stored with its reply, usage, finish_reason, time to first token and
    duration, or with Fabric's error. Exit code 0 when Fabric answered; 4 when it could not be
    reached or failed (a connection refused or cut, a timeout, a 5xx, a 429), 2 when it refused
    the request (a 4xx: a value it rejects, credentials it does not accept), 3 when it says the
    service instance does not exist.
    """
    settings = settings_from(ctx)
    _embedded_hint(settings)
    options = _options(temperature, max_tokens, top_p)

    async def go(flow: Fabricflow) -> Invocation:
        return await _invoke_once(flow, job_ref, [{"role": "user", "content": message}], options, system=system,
                                  check=True)

    try:
        record = run_async(with_flow(settings, go))
    except InvocationFailedError as exc:
        if as_json:
            emit_json(exc.invocation.as_json())
        raise  # one line, "error: MESSAGE", and the error's exit code
    if as_json:
        emit_json(record.as_json())


@click.command()
@job_argument
@invocation_options
@global_options
@click.pass_context
def chat(ctx: click.Context, job_ref: str, temperature: float | None, max_tokens: int | None,
         top_p: float | None, system: str | None) -> None:
    """Talk with JOB's service instance: one line per turn, the conversation kept; Ctrl-D ends.

    Every turn is stored like `fabricflow invoke`. A turn Fabric does not answer prints its
    error and is left out of the conversation, which goes on.
    """
    settings = settings_from(ctx)
    _embedded_hint(settings)
    options = _options(temperature, max_tokens, top_p)

    async def go(flow: Fabricflow) -> None:
        job = await flow.invocable(job_ref)  # before the first prompt: a job with no service is refused
        history: list[dict[str, str]] = []
        while True:
            sys.stderr.write("you> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.strip()})
            sys.stderr.write("model> ")
            record = await _invoke_once(flow, job.id, list(history), options, system=system)
            if record.error:
                sys.stderr.write(f"\nerror: {record.error['message']}\n")
                history.pop()
                continue
            history.append({"role": "assistant", "content": record.reply or ""})

    run_async(with_flow(settings, go))


COMMANDS = (cancel, retry, teardown, invoke, chat)
