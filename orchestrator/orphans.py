"""Orphans: resources carrying a fabricflow ownership marker that no job in this database records.

Fabric takes no idempotency key, so a create whose answer was lost may still be carried out;
a lost database, a lost job or a duplicate leaves such a resource behind. ``find_orphans`` looks
through every workspace (and the endpoints, models and service instances inside each) and
sorts what carries a marker against the jobs; ``delete_orphans`` deletes the orphans in
dependency order, waiting until each is gone. Nothing a job records is ever an orphan, and
nothing of a job that is still under way is ever deleted: its create may be awaiting its record.
Every listing and every delete is retried on transient errors (``retries.persist``, honouring
Retry-After): a listing as a command's look-up is, a delete as often as a job's step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.domain import markers_in
from orchestrator.errors import FabricError, RetryableError, TerminalError
from orchestrator.machine import (
    JobKind,
    JobState,
    ResourceKind,
    StepState,
    poll_delay,
)
from orchestrator.retries import RetryPolicy, persist

if TYPE_CHECKING:
    from orchestrator.fabric.client import FabricClient
    from orchestrator.store.jobs import JobStore

#: Deleted in this order, each group waited until gone before the next: an instance holds its
#: endpoint and model, and a workspace can only go once it is empty.
PHASES: tuple[tuple[ResourceKind, ...], ...] = (
    (ResourceKind.SERVICE_INSTANCE,), (ResourceKind.MODEL, ResourceKind.ENDPOINT), (ResourceKind.WORKSPACE,))
#: A resource in one of these is already on its way out: it holds nothing back.
LEAVING = frozenset({"DELETING", "DELETED"})
#: Steps that have started and not ended: the resource they create may not be recorded yet.
OPEN_STEPS = frozenset({StepState.IN_FLIGHT, StepState.WAITING})
#: The lengths of a marker's job ID part: 16 hex digits, or 8 (markers of fabricflow 0.1).
MARKER_SIZES = (8, 16)
#: Workspaces looked through at once (each costs three listings).
SCAN_CONCURRENCY = 8
#: While waiting for deletes to finish, say what is left this often (seconds).
PROGRESS_EVERY = 5.0


# --- what Fabric holds and what the database records --------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """A resource as a listing shows it; ``uses`` are a service instance's endpoint and model."""

    kind: ResourceKind
    id: str
    name: str | None
    workspace_id: str | None
    description: str | None = None
    status: str | None = None
    uses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Orphan:
    """A resource carrying a marker that no job records. ``skipped`` ones are never deleted
    (their job is under way, or they hold resources that are not orphans); ``reason`` says why."""

    kind: ResourceKind
    id: str
    name: str | None
    workspace_id: str | None
    job_id_prefix: str
    reason: str
    status: str | None = None
    skipped: bool = False
    markers: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The object of ``orphans --json``."""
        return {"kind": str(self.kind), "id": self.id, "name": self.name, "workspace_id": self.workspace_id,
                "job_id_prefix": self.job_id_prefix, "reason": self.reason}


@dataclass(slots=True)
class JobRecord:
    """What one job records: its resource IDs per step, and the steps it has not ended."""

    id: str
    kind: JobKind
    state: JobState
    parent_id: str | None
    recorded: dict[str, list[str]] = field(default_factory=dict)
    open_steps: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Records:
    """Every job of a database, indexed for the questions an orphan hunt asks."""

    jobs: dict[str, JobRecord]
    recorded: set[str]
    teardowns: dict[str, list[JobRecord]]
    by_prefix: dict[str, list[JobRecord]] = field(default_factory=dict)  # creating jobs by 8 and 16 hex

    @classmethod
    def from_rows(cls, job_rows: Iterable[Any], step_rows: Iterable[Any]) -> Records:
        """From rows of ``jobs`` (id, kind, state, parent_id) and ``steps`` (job_id, name, state,
        resource_id, extra), as any driver returns them."""
        jobs = {r["id"]: JobRecord(r["id"], JobKind(r["kind"]), JobState(r["state"]), r["parent_id"])
                for r in job_rows}
        recorded: set[str] = set()
        for s in step_rows:
            job = jobs.get(s["job_id"])
            if job is None:
                continue
            extra = _json(s["extra"]) or {}
            ids = [s["resource_id"], *extra.get("targets", [])]  # a teardown's targets too
            ids = list(dict.fromkeys(i for i in ids if isinstance(i, str) and i))
            job.recorded.setdefault(s["name"], []).extend(ids)
            recorded.update(ids)
            if StepState(s["state"]) in OPEN_STEPS:
                job.open_steps.append(f"{s['name']} {s['state']}")
        teardowns: dict[str, list[JobRecord]] = defaultdict(list)
        by_prefix: dict[str, list[JobRecord]] = defaultdict(list)
        for job in jobs.values():
            if job.kind is JobKind.TEARDOWN and job.parent_id:
                teardowns[job.parent_id].append(job)
            elif job.kind is JobKind.CREATE:
                for size in MARKER_SIZES:
                    by_prefix[job.id[:size]].append(job)
        return cls(jobs, recorded, dict(teardowns), dict(by_prefix))

    def jobs_of(self, part: str) -> list[JobRecord]:
        """The creating jobs whose ID starts with a marker's job ID part."""
        return self.by_prefix.get(part, [])

    def busy(self, job: JobRecord) -> str | None:
        """Why a job's resources must be left alone now, or None when the job is over."""
        short = job.id[:8]
        if not job.state.is_terminal:
            return f"job {short} is {job.state}: its create may still be awaiting its recording"
        teardowns = self.teardowns.get(job.id, [])
        for teardown in teardowns:
            if not teardown.state.is_terminal:
                return (f"teardown job {teardown.id[:8]} of job {short} is {teardown.state}: "
                        "it is deleting the job's resources")
        torn_down = any(t.state is JobState.SUCCEEDED for t in teardowns)
        if job.open_steps and not torn_down:
            return (f"job {short} ended {job.state} with step {job.open_steps[0]}: its create may not be "
                    f"recorded (`fabricflow teardown {short}` finds it by name and marker)")
        return None


def judge(kind: ResourceKind, resource_id: str, markers: Iterable[str],
          records: Records) -> tuple[bool, str, str] | None:
    """(skipped, job ID prefix, reason) for a resource carrying these markers; None when a job
    records it (or it carries no marker)."""
    parts = list(dict.fromkeys(markers))
    if not parts or resource_id in records.recorded:
        return None
    jobs = [(part, job) for part in parts for job in records.jobs_of(part)]
    if not jobs:
        return False, parts[0], f"job {parts[0]} is not in this database"
    for part, job in jobs:
        why = records.busy(job)
        if why is not None:
            return True, part, why
    part, job = jobs[0]
    others = [i for i in job.recorded.get(str(kind), []) if i != resource_id]
    if others:
        return False, part, f"duplicate: job {job.id[:8]} records {others[0]} instead"
    return False, part, f"not recorded by job {job.id[:8]}"


async def read_records(store: JobStore) -> Records:
    """Every job and its recorded resource IDs, from the database (SQLite or PostgreSQL)."""
    from sqlalchemy import or_, select

    from orchestrator.store.schema import jobs, steps

    async with store.engine.connect() as conn:
        job_rows = (await conn.execute(select(jobs.c.id, jobs.c.kind, jobs.c.state, jobs.c.parent_id))).mappings()
        job_rows = list(job_rows)
        query = select(steps.c.job_id, steps.c.name, steps.c.state, steps.c.resource_id, steps.c.extra).where(
            or_(steps.c.resource_id.is_not(None), steps.c.state.in_([str(s) for s in OPEN_STEPS])))
        step_rows = list((await conn.execute(query)).mappings())
    return Records.from_rows(job_rows, step_rows)


# --- finding ------------------------------------------------------------------------------


async def find_orphans(client: FabricClient, recorded: Records | Callable[[], Awaitable[Records]], *,
                       retry: RetryPolicy | None = None) -> list[Orphan]:
    """Every resource carrying a marker that no job records, workspaces last; skipped ones too.

    ``recorded`` is best a coroutine function reading the database: it is called after Fabric
    has been looked through, so that a job submitted meanwhile is known by the time its
    resources are judged (read before, they would look like another database's). ``retry``:
    how each listing is retried (see ``scan``).
    """
    resources = await scan(client, retry=retry)
    records = recorded if isinstance(recorded, Records) else await recorded()
    return sort_out(resources, records)


async def scan(client: FabricClient, *, retry: RetryPolicy | None = None) -> list[Resource]:
    """Every workspace, and the endpoints, models and service instances inside each (all pages).

    Each listing is retried on transient errors under ``retry`` (none: only the client's in-call
    retries); one that still fails raises, and nothing is judged on a partial look.
    """
    workspaces = await persist(client.list_workspaces, retry)
    found = [Resource(ResourceKind.WORKSPACE, w.id, w.name, None, w.description) for w in workspaces]
    slots = asyncio.Semaphore(SCAN_CONCURRENCY)

    async def inside(workspace_id: str) -> list[Resource]:
        async with slots:
            try:
                endpoints, models, instances = await asyncio.gather(
                    persist(lambda: client.list_endpoints(workspace_id), retry),
                    persist(lambda: client.list_models(workspace_id, sort_by="CREATE_TIME", order_by="ASC"), retry),
                    persist(lambda: client.list_service_instances(workspace_id, sort_by="CREATE_TIME",
                                                                  order_by="ASC"), retry))
            except TerminalError as exc:
                if exc.status == 404:
                    return []  # deleted since it was listed, with everything in it
                raise
        return ([Resource(ResourceKind.ENDPOINT, e.id, e.name, workspace_id, e.description, e.status)
                 for e in endpoints]
                + [Resource(ResourceKind.MODEL, m.id, m.name, workspace_id, m.description) for m in models]
                + [Resource(ResourceKind.SERVICE_INSTANCE, i.id, i.name, workspace_id, i.description, i.status,
                            tuple(u for u in (i.endpoint_id, i.source.id if i.source else None) if u))
                   for i in instances])

    for children in await asyncio.gather(*(inside(w.id) for w in workspaces)):
        found.extend(children)
    return found


def sort_out(resources: list[Resource], records: Records) -> list[Orphan]:
    """The orphans (and skipped ones) among listed resources: instances, then models and
    endpoints, then workspaces. An endpoint or model serving an instance that is not an
    orphan, and a workspace holding anything that is not, are skipped."""
    orphans: dict[str, Orphan] = {}
    inside: dict[str, list[Resource]] = defaultdict(list)
    for res in resources:
        if res.workspace_id is not None:
            inside[res.workspace_id].append(res)
        markers = tuple(markers_in(res.description))
        verdict = judge(res.kind, res.id, markers, records)
        if verdict is not None:
            skipped, prefix, reason = verdict
            orphans[res.id] = Orphan(res.kind, res.id, res.name, res.workspace_id, prefix, reason, res.status,
                                     skipped, markers)

    def stays(res: Resource) -> bool:  # neither deleted with the orphans nor on its way out already
        orphan = orphans.get(res.id)
        return (orphan is None or orphan.skipped) and res.status not in LEAVING

    for kind in (ResourceKind.MODEL, ResourceKind.ENDPOINT, ResourceKind.WORKSPACE):
        for res in resources:
            orphan = orphans.get(res.id)
            if res.kind is not kind or orphan is None or orphan.skipped:
                continue
            if kind is ResourceKind.WORKSPACE:
                held, verb = [r for r in inside[res.id] if stays(r)], "holds"
            else:
                held, verb = [r for r in inside[res.workspace_id or ""] if r.kind is ResourceKind.SERVICE_INSTANCE
                              and res.id in r.uses and stays(r)], "serves"
            if held:
                what = ", ".join(f"{r.kind} {r.id}" for r in held[:3]) + (" ..." if len(held) > 3 else "")
                orphans[res.id] = replace(orphan, skipped=True,
                                          reason=f"{orphan.reason}; kept: it {verb} {what}, not an orphan")
    order = [kind for phase in PHASES for kind in phase]
    return sorted(orphans.values(), key=lambda o: order.index(o.kind))


def recheck(orphans: list[Orphan], records: Records) -> list[Orphan]:
    """The orphans judged again against a fresh read of the database (just before deleting):
    one that a job has recorded since, or whose job is under way again, is skipped."""
    checked = []
    for orphan in orphans:
        verdict = judge(orphan.kind, orphan.id, orphan.markers, records)
        if orphan.skipped or (verdict is not None and not verdict[0]):
            checked.append(orphan)
        else:
            reason = verdict[2] if verdict is not None else "recorded by a job since it was found"
            checked.append(replace(orphan, skipped=True, reason=reason))
    return checked


# --- deleting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeleteSettings:
    """How long to wait for a delete to finish, how often to look, how often to retry (a
    delete met by a transient error: the engine's ``retry`` settings, see ``retries.persist``)."""

    timeout: float = 30 * 60.0  # as a teardown's wait
    poll_initial: float = 1.0
    poll_max: float = 30.0
    attempts: int = 8
    backoff_base: float = 1.0
    backoff_cap: float = 30.0


@dataclass(frozen=True)
class DeleteEvent:
    """Something to tell the user: an orphan ``deleted`` or ``failed``, or still ``waiting``."""

    what: Literal["deleted", "failed", "waiting"]
    orphan: Orphan | None
    detail: str


@dataclass(frozen=True)
class Deletion:
    """What became of one orphan: gone (``error`` None) or not, and why."""

    orphan: Orphan
    error: str | None = None


async def delete_orphans(client: FabricClient, orphans: list[Orphan], on_event: Callable[[DeleteEvent], None],
                         settings: DeleteSettings = DeleteSettings()) -> list[Deletion]:
    """Delete the orphans that are not skipped, in dependency order (see PHASES), each waited
    until gone (404 counts as gone); a failure is reported and the rest carry on."""
    done: list[Deletion] = []
    for phase in PHASES:
        accepted = []
        for orphan in (o for o in orphans if o.kind in phase and not o.skipped):
            try:
                await _delete(client, orphan, settings)
                accepted.append(orphan)
            except FabricError as exc:
                done.append(Deletion(orphan, exc.message))
                on_event(DeleteEvent("failed", orphan, exc.message))
        done.extend(await _wait_gone(client, accepted, on_event, settings))
    return done


async def _delete(client: FabricClient, orphan: Orphan, settings: DeleteSettings) -> None:
    policy = RetryPolicy(attempts=settings.attempts, backoff_base=settings.backoff_base,
                         backoff_cap=settings.backoff_cap)
    try:
        await persist(lambda: _send_delete(client, orphan), policy)
    except TerminalError as exc:
        # Already gone, or already being deleted (a second run): both are what was wanted.
        if exc.status == 404 or (exc.status == 400 and "DELETING" in exc.message.upper()):
            return
        try:
            gone = (await _status(client, orphan))[0]
        except FabricError:
            gone = False
        if gone:
            return
        raise


async def _send_delete(client: FabricClient, o: Orphan) -> None:
    ws = o.workspace_id or ""
    if o.kind is ResourceKind.SERVICE_INSTANCE:
        await client.delete_service_instance(ws, o.id)
    elif o.kind is ResourceKind.MODEL:
        await client.delete_model(ws, o.id)
    elif o.kind is ResourceKind.ENDPOINT:
        await client.delete_endpoint(ws, o.id)
    else:
        await client.delete_workspace(o.id)


async def _status(client: FabricClient, o: Orphan) -> tuple[bool, str | None]:
    """(gone, status): gone once Fabric answers 404, DELETED, or no longer lists it."""
    ws = o.workspace_id or ""
    try:
        if o.kind is ResourceKind.SERVICE_INSTANCE:
            status = (await client.show_service_instance(ws, o.id)).status
        elif o.kind is ResourceKind.ENDPOINT:
            status = (await client.show_endpoint(ws, o.id)).status
        elif o.kind is ResourceKind.MODEL:
            return await client.get_model(ws, o.id) is None, None
        else:
            return await client.get_workspace(o.id) is None, None
    except TerminalError as exc:
        if exc.status == 404:
            return True, None
        raise
    return status == "DELETED", status


async def _wait_gone(client: FabricClient, pending: list[Orphan], on_event: Callable[[DeleteEvent], None],
                     settings: DeleteSettings) -> list[Deletion]:
    done: list[Deletion] = []
    deadline = time.monotonic() + settings.timeout
    told = None
    polls = 0
    while pending:
        left: list[tuple[Orphan, str | None]] = []
        for orphan in pending:
            try:
                gone, status = await _status(client, orphan)
            except RetryableError:
                gone, status = False, orphan.status  # look again at the next poll
            except TerminalError as exc:
                done.append(Deletion(orphan, exc.message))
                on_event(DeleteEvent("failed", orphan, exc.message))
                continue
            if gone:
                done.append(Deletion(orphan))
                on_event(DeleteEvent("deleted", orphan, "gone"))
            else:
                left.append((orphan, status))
        pending = [orphan for orphan, _ in left]
        if not pending:
            break
        if time.monotonic() >= deadline:
            for orphan, status in left:
                message = f"still {status or 'present'} after {settings.timeout:.0f}s"
                done.append(Deletion(orphan, message))
                on_event(DeleteEvent("failed", orphan, message))
            break
        if told is None or time.monotonic() - told >= PROGRESS_EVERY:
            told = time.monotonic()
            what = ", ".join(f"{o.kind} {o.id} {status or ''}".rstrip() for o, status in left[:5])
            on_event(DeleteEvent("waiting", None, f"waiting until {len(left)} deleted resource(s) are gone: "
                                 f"{what}{' ...' if len(left) > 5 else ''}"))
        polls += 1
        await asyncio.sleep(poll_delay(polls, initial=settings.poll_initial, cap=settings.poll_max))
    return done


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value
