"""The live page: jobs by state, each job's steps on a timeline, its IDs, errors and last reply.

Read-only. A SQLite file at the current schema is read through ``store.readonly`` (stdlib
sqlite3 opened with ``mode=ro``, in a worker thread, so a daemon serving the page never blocks
its event loop on a read); any other database through a JobStore opened without migrating,
used only for reads. Nothing here writes.

Routes, all under ``/ui/``: the page and its assets (``orchestrator/ui_static``, shipped in the
package: no CDN), ``api/jobs`` (``?state=&name=&limit=``: jobs and counts by state),
``api/jobs/{JOB}`` (one job: steps with times, result, events, the last stored invocation) and
``api/stream`` (the same as Server-Sent Events, sent again whenever they change). ``fabricflow ui``
serves them alone (``make_app``); the daemon mounts them on its metrics port (``add_routes``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from orchestrator.domain import Job
from orchestrator.errors import NotFoundError, UserError
from orchestrator.machine import Action, JobState, row_of
from orchestrator.store.readonly import ReadOnlyStore, as_utc, sqlite_file

T = TypeVar("T")
STATIC_DIR = Path(__file__).with_name("ui_static")
PREFIX = "/ui"
#: How often a stream reads the database again (it sends only what changed).
REFRESH_SECONDS = 1.0
#: A comment line this often keeps idle streams open through proxies and finds closed clients.
KEEPALIVE_SECONDS = 15.0
#: The newest events a job's view shows.
EVENTS_SHOWN = 200
MAX_LIMIT = 1000

Read = Callable[[Any, "Fetch"], Awaitable[T]]
Fetch = Callable[[str, dict[str, Any]], Awaitable[list[Any]]]


class Reader:
    """Read-only access to the database at ``db_url`` for the page's requests."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self._path = sqlite_file(db_url)
        self._store: Any = None  # a JobStore, opened on first use when the file is not read directly
        self._lock = asyncio.Lock()

    async def read(self, func: Read[T]) -> T:
        """``await func(store, fetch)`` on a reading store; ``fetch`` runs plain SQL with ``:name`` parameters."""
        if self._path is not None:
            # A connection of its own in a worker thread: sqlite3 connections stay in their thread.
            found = await asyncio.to_thread(asyncio.run, _read_file(self._path, func))
            if found is not _OTHER_SCHEMA:
                return found  # type: ignore[return-value]
        store = await self._job_store()
        from sqlalchemy import text

        async with store.engine.connect() as conn:
            async def fetch(sql: str, params: dict[str, Any]) -> list[Any]:
                return list((await conn.execute(text(sql), params)).mappings())

            return await func(store, fetch)

    async def _job_store(self) -> Any:
        async with self._lock:
            if self._store is None:
                from orchestrator.store.jobs import JobStore

                # Never migrated from here: an old schema is an error telling how to upgrade.
                self._store = await JobStore.open(self.db_url, auto_upgrade=False)
            return self._store

    async def close(self) -> None:
        """Release the JobStore's connections, if one was opened."""
        if self._store is not None:
            await self._store.close()
            self._store = None


_OTHER_SCHEMA = object()


async def _read_file(path: Path, func: Read[T]) -> T | object:
    """``func`` on the file read directly; _OTHER_SCHEMA when its schema is not the current one
    (JobStore then says what to do). NotFoundError when there is no file: nothing is created."""
    store = ReadOnlyStore.open(path)
    if store is None:
        return _OTHER_SCHEMA
    try:
        return await func(store, store.fetch)
    finally:
        await store.close()


# --- what the page shows -------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_view(job: Job) -> dict[str, Any]:
    """A job as the page shows it: ``show --json``'s object, each step with its times and action."""
    view = job.as_json()
    for step_json, name in zip(view["steps"], job.order, strict=True):
        step = job.steps[name]
        step_json.update(
            action=str(row_of(job.kind, name).action),
            is_wait=row_of(job.kind, name).action is Action.POLL,
            started_at=_iso(step.started_at), updated_at=_iso(step.updated_at),
            finished_at=_iso(step.finished_at))
    view.update(started_at=_iso(job.started_at), finished_at=_iso(job.finished_at),
                cancel_requested=job.cancel_requested_at is not None)
    return view


def _summary(job: Job) -> dict[str, Any]:
    return {**job.summary_json(), "kind": str(job.kind),
            "error": job.error.get("message") if job.error else None}


async def read_jobs(reader: Reader, *, state: str | None, name: str | None, limit: int) -> dict[str, Any]:
    """Jobs (newest first, filtered) and every state's count, as of now."""

    async def go(store: Any, fetch: Fetch) -> dict[str, Any]:
        counts = {str(s): 0 for s in JobState}
        for row in await fetch("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state", {}):
            counts[row["state"]] = int(row["n"])
        jobs = await store.list(state=state, name=name, limit=limit)
        return {"counts": counts, "total": sum(counts.values()), "jobs": [_summary(j) for j in jobs]}

    return {"at": _now(), **await reader.read(go)}


async def read_job(reader: Reader, ref: str) -> dict[str, Any]:
    """One job (an ID or unique prefix): its view, its newest events and its last stored invocation."""

    async def go(store: Any, fetch: Fetch) -> dict[str, Any]:
        job = await store.get(await store.resolve(ref))
        events = [e.as_json() for e in await store.events(job.id)][-EVENTS_SHOWN:]
        rows = await fetch("SELECT at, reply, finish_reason, error FROM invocations WHERE job_id = :job"
                           " ORDER BY id DESC LIMIT 1", {"job": job.id})
        last = None
        if rows:
            row = rows[0]
            error = json.loads(row["error"]) if isinstance(row["error"], str) else row["error"]
            last = {"at": _iso(as_utc(row["at"])), "reply": row["reply"],
                    "finish_reason": row["finish_reason"], "error": error}
        return {"job": job_view(job), "events": events, "last_invocation": last}

    return {"at": _now(), **await reader.read(go)}


def _now() -> str:
    return datetime.now(UTC).isoformat()


# --- HTTP ----------------------------------------------------------------------------------

READER = web.AppKey("fabricflow_ui_reader", Reader)
STOPPING = web.AppKey("fabricflow_ui_stopping", asyncio.Event)


def _filters(request: web.Request) -> dict[str, Any]:
    query = request.query
    state = query.get("state") or None
    if state is not None and state.upper() not in {str(s) for s in JobState}:
        raise _bad(f"unknown state {state!r}; one of {', '.join(str(s) for s in JobState)}")
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise _bad(f"limit must be a whole number, not {query['limit']!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad(f"limit must be between 1 and {MAX_LIMIT}")
    return {"state": state.upper() if state else None, "name": query.get("name") or None, "limit": limit}


def _bad(message: str, status: int = 400) -> web.HTTPException:
    cls = web.HTTPNotFound if status == 404 else web.HTTPBadRequest
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def _answer(read: Awaitable[dict[str, Any]]) -> web.Response:
    try:
        return web.json_response(await read, headers={"Cache-Control": "no-store"})
    except NotFoundError as exc:
        raise _bad(str(exc), 404) from None
    except UserError as exc:
        raise _bad(str(exc)) from None


async def _jobs(request: web.Request) -> web.Response:
    return await _answer(read_jobs(request.app[READER], **_filters(request)))


async def _job(request: web.Request) -> web.Response:
    return await _answer(read_job(request.app[READER], request.match_info["job"]))


async def _stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: ``jobs`` (and ``job`` with ``?job=``) whenever they change, until the
    client leaves or the server stops."""
    reader, stopping = request.app[READER], request.app[STOPPING]
    filters = _filters(request)
    ref = request.query.get("job") or None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    sent: dict[str, str] = {}
    quiet = 0.0
    while not stopping.is_set():
        try:
            parts = {"jobs": read_jobs(reader, **filters)}
            if ref:
                parts["job"] = read_job(reader, ref)
            for event, read in parts.items():
                try:
                    data = await read
                except (NotFoundError, UserError) as exc:
                    data = {"error": str(exc)}
                # Only what changed is sent again; "at" changes every time, so it is left out of the comparison.
                body = json.dumps({k: v for k, v in data.items() if k != "at"}, sort_keys=True)
                if sent.get(event) != body:
                    sent[event] = body
                    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                    quiet = 0.0
            if quiet >= KEEPALIVE_SECONDS:
                await response.write(b": keep-alive\n\n")
                quiet = 0.0
        except ConnectionError:
            return response  # the client left
        try:
            await asyncio.wait_for(stopping.wait(), REFRESH_SECONDS)
        except TimeoutError:
            quiet += REFRESH_SECONDS
    return response


async def _page(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})


async def _to_page(_request: web.Request) -> web.Response:
    raise web.HTTPFound(f"{PREFIX}/")


def add_routes(app: web.Application, db_url: str) -> None:
    """Serve the page and its read-only API under ``/ui/`` from ``app`` (before it starts).

    Streams end when the app shuts down, and the reader's connections are released at cleanup.
    """
    app[READER] = Reader(db_url)
    app[STOPPING] = asyncio.Event()

    async def stop_streams(app: web.Application) -> None:
        app[STOPPING].set()

    async def close_reader(app: web.Application) -> None:
        await app[READER].close()

    app.on_shutdown.append(stop_streams)
    app.on_cleanup.append(close_reader)
    app.router.add_get(PREFIX, _to_page)
    app.router.add_get(f"{PREFIX}/", _page)
    app.router.add_get(f"{PREFIX}/api/jobs", _jobs)
    app.router.add_get(f"{PREFIX}/api/jobs/{{job}}", _job)
    app.router.add_get(f"{PREFIX}/api/stream", _stream)
    app.router.add_static(f"{PREFIX}/static", STATIC_DIR, append_version=False)


def make_app(db_url: str) -> web.Application:
    """The page alone (``fabricflow ui``), with ``/`` leading to it."""
    app = web.Application()
    app.router.add_get("/", _to_page)
    add_routes(app, db_url)
    return app
