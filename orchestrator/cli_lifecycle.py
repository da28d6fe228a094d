"""Lifecycle commands: cancel, retry, teardown, invoke, chat.

Each acts on a job that exists, so none of them creates a database: a missing SQLite file is
"no database at PATH" (exit 3).
"""

from __future__ import annotations

import sys
import time
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
    with_store,
)
from orchestrator.errors import FabricError, UserError
from orchestrator.machine import JobKind, JobState, StepName, StepState

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.domain import Invocation, Job
    from orchestrator.store.jobs import JobStore


@click.command()
@job_argument
@click.option("--teardown", "then_teardown", is_flag=True,
              help="Also delete what the job created (a teardown job, run once the job has stopped).")
@click.option("--wait", is_flag=True, help="Wait until the job (and its teardown) has ended.")
@global_options
@click.pass_context
def cancel(ctx: click.Context, job_ref: str, then_teardown: bool, wait: bool) -> None:
    """Cancel a job. A PENDING job ends CANCELLED at once; a RUNNING one stops at its next safe
    point (never between a create request and recording its result) and ends CANCELLED."""
    settings = settings_from(ctx)

    async def go(store: JobStore) -> Job | None:
        job_id = await store.resolve(job_ref)
        job = await store.get(job_id)
        if job.state.is_terminal:
            if not then_teardown:
                raise UserError(f"job {job_id[:8]} already ended {job.state}; nothing to cancel")
        else:
            state = await store.cancel(job_id)
            click.echo(f"job {job_id[:8]}: " + ("CANCELLED" if state is JobState.CANCELLED
                       else "cancellation requested; it stops at its next safe point"), err=True)
        teardown = await store.submit_teardown(job_id) if then_teardown else None
        if teardown is not None:
            click.echo(teardown.id)
            click.echo(f"teardown job {teardown.id[:8]} submitted; a daemon runs it once the job has stopped",
                       err=True)
        if wait:
            await follow(store, job_id, printer=False)
            if teardown is not None:
                return await follow(store, teardown.id, printer=True)
        return teardown

    result = run_async(with_store(settings, go))
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

    async def go(store: JobStore) -> Job:
        return await store.retry(await store.resolve(job_ref))

    job = run_async(with_store(settings, go))
    failed_at = next((s.name for s in job.steps.values() if s.state is StepState.PENDING
                      and s.attempts == 0 and s.started_at), None)
    where = f" from step {failed_at}" if failed_at else ""
    click.echo(f"job {job.id[:8]} is PENDING again{where}; a daemon will continue it", err=True)


@click.command()
@job_argument
@click.option("--wait", is_flag=True, help="Wait until the teardown has ended; exit 1 if it fails.")
@click.option("--json", "as_json", is_flag=True, help="Print the teardown job object (with --wait, when done).")
@global_options
@click.pass_context
def teardown(ctx: click.Context, job_ref: str, wait: bool, as_json: bool) -> None:
    """Delete exactly the resources JOB created, in reverse order, each waited until gone.

    Reused resources and ones adopted with on_existing: adopt are kept. The teardown is a durable
    job of its own (a daemon runs it; it survives crashes); prints its ID.
    """
    settings = settings_from(ctx)

    async def go(store: JobStore) -> Job:
        job_id = await store.resolve(job_ref)
        job = await store.get(job_id)
        if not job.state.is_terminal:
            raise UserError(f"job {job_id[:8]} is {job.state}; cancel it first: "
                            f"fabricflow cancel {job_id[:8]} --teardown")
        created = await store.submit_teardown(job_id)
        if wait:
            if not as_json:
                click.echo(created.id)
            return await follow(store, created.id, printer=not as_json)
        return created

    finish_submitted(ctx, run_async(with_store(settings, go)), as_json=as_json, wait=wait)


# --- invocations ------------------------------------------------------------------------------


def _options(temperature: float | None, max_tokens: int | None, top_p: float | None) -> dict[str, Any]:
    given = {"temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}
    return {k: v for k, v in given.items() if v is not None}


def invocation_options(func: Any) -> Any:
    """Options the invocation API accepts, passed through."""
    for option in reversed([
        click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature (0-2)."),
        click.option("--max-tokens", type=click.IntRange(min=0), help="Longest reply, in tokens."),
        click.option("--top-p", type=click.FloatRange(0, 1), help="Nucleus sampling (0-1)."),
        click.option("--system", help="A system message sent before the conversation."),
    ]):
        func = option(func)
    return func


async def _target_of(store: JobStore, job_ref: str) -> Job:
    job = await store.get(await store.resolve(job_ref))
    if job.kind is not JobKind.CREATE:
        raise UserError(f"job {job.id[:8]} is a teardown job; invoke the job that created the service")
    if job.steps[StepName.SERVICE_READY].state is not StepState.SUCCEEDED:
        raise UserError(f"job {job.id[:8]} has no RUNNING service instance yet "
                        f"(job {job.state}, service_ready {job.steps[StepName.SERVICE_READY].state})")
    return job


async def _invoke_once(settings: Settings, store: JobStore, job: Job, client: Any,
                       messages: list[dict[str, str]], options: dict[str, Any], *, echo: bool) -> Invocation:
    instance_id = job.resource_id(StepName.SERVICE_INSTANCE)
    workspace_id = job.resource_id(StepName.WORKSPACE)
    assert instance_id and workspace_id
    started = time.monotonic()
    first: list[float] = []

    def on_text(text: str) -> None:
        if not first:
            first.append(time.monotonic())
        if echo:
            sys.stderr.write(text)
            sys.stderr.flush()

    request = {"messages": messages, **options}
    try:
        result = await client.invoke(workspace_id, instance_id, request, on_text=on_text)
    except FabricError as exc:
        return await store.record_invocation(
            job.id, service_instance_id=instance_id, request=request, error=exc.as_dict(),
            duration_ms=int((time.monotonic() - started) * 1000))
    if echo:
        sys.stderr.write("\n")
    return await store.record_invocation(
        job.id, service_instance_id=instance_id, request=request, reply=result.reply,
        finish_reason=result.finish_reason, usage=result.usage,
        ttft_ms=int((first[0] - started) * 1000) if first else None,
        duration_ms=int((time.monotonic() - started) * 1000))


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
    duration.
    """
    settings = settings_from(ctx)
    _embedded_hint(settings)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]

    async def go(store: JobStore) -> Invocation:
        from orchestrator.wiring import client_for, fabric_target

        job = await _target_of(store, job_ref)
        async with fabric_target(settings) as target, client_for(settings, target) as client:
            return await _invoke_once(settings, store, job, client, messages,
                                      _options(temperature, max_tokens, top_p), echo=True)

    record = run_async(with_store(settings, go))
    if as_json:
        emit_json(record.as_json())
    if record.error:
        click.echo(f"error: {record.error['message']}", err=True)
        ctx.exit(EXIT_FAILED)


@click.command()
@job_argument
@invocation_options
@global_options
@click.pass_context
def chat(ctx: click.Context, job_ref: str, temperature: float | None, max_tokens: int | None,
         top_p: float | None, system: str | None) -> None:
    """Talk with JOB's service instance: one line per turn, the conversation kept; Ctrl-D ends.

    Every turn is stored like `fabricflow invoke`.
    """
    settings = settings_from(ctx)
    _embedded_hint(settings)
    options = _options(temperature, max_tokens, top_p)

    async def go(store: JobStore) -> None:
        from orchestrator.wiring import client_for, fabric_target

        job = await _target_of(store, job_ref)
        history = [{"role": "system", "content": system}] if system else []
        async with fabric_target(settings) as target, client_for(settings, target) as client:
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
                record = await _invoke_once(settings, store, job, client, list(history), options, echo=True)
                if record.error:
                    sys.stderr.write(f"\nerror: {record.error['message']}\n")
                    history.pop()
                    continue
                history.append({"role": "assistant", "content": record.reply or ""})

    run_async(with_store(settings, go))


COMMANDS = (cancel, retry, teardown, invoke, chat)
