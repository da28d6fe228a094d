"""Reading a SQLite job database with the standard library alone, for `list`, `show`, `events`
and `status`.

Importing SQLAlchemy and Alembic costs more CPU than such a command does in all
(benchmarks/startup.py), so these commands read the file through stdlib ``sqlite3``, opened
read-only: they never create, migrate or change a database. The queries are written for one
schema revision; a database at any other (older, which JobStore migrates, or newer, which it
refuses with advice) is left to JobStore. Writes never come here.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from orchestrator.domain import Event, Job, Step
from orchestrator.errors import NotFoundError, UserError
from orchestrator.machine import JobKind, JobState, StepName, StepState

#: The Alembic revision these queries are written for. tests/unit/test_readonly.py checks that it
#: is the newest migration: a new migration fails that test until the queries here are checked
#: against it (until then a database at the new revision is read through JobStore, correctly).
SCHEMA_REVISION = "0003"

#: A job's latest teardown that deletes, or has deleted, some of its resources (``retry`` and
#: ``invoke`` refuse such a job): one still to run or running, or one that ended after a step of
#: it left PENDING for a delete. A FAILED teardown does not count, nor one that ended having sent
#: no delete: cancelled before it ran, or keeping only reused and adopted resources (its steps
#: all PENDING or SKIPPED). Plain SQL with ``:id``, for both stores.
LIVE_TEARDOWN = ("SELECT t.id, t.state FROM jobs t WHERE t.parent_id = :id AND t.kind = 'teardown'"
                 " AND t.state <> 'FAILED' AND (t.state NOT IN ('CANCELLED', 'SUCCEEDED') OR EXISTS"
                 " (SELECT 1 FROM steps s WHERE s.job_id = t.id AND s.state NOT IN ('PENDING', 'SKIPPED')))"
                 " ORDER BY t.created_at DESC, t.id LIMIT 1")

# A plain SQLite URL as SQLAlchemy reads it, with a driver fabricflow takes: no options after "?".
_SQLITE_URL = re.compile(r"^sqlite(?:\+aiosqlite)?:///([^?]+)$")


def sqlite_file(url: str) -> Path | None:
    """The database file of a plain ``sqlite[+aiosqlite]:///FILE`` URL; None for anything else
    (other backends and drivers, in-memory databases, URL options), which JobStore handles."""
    match = _SQLITE_URL.match(url)
    if match is None:
        return None
    database = unquote(match.group(1))
    return None if database == ":memory:" else Path(database).expanduser()


def sqlite_problem(message: str) -> str | None:
    """One line a user can act on, from an SQLite error message; None if there is none better."""
    lowered = message.lower()
    if "file is not a database" in lowered:
        return "not a SQLite database file"
    if "readonly" in lowered or "read-only" in lowered:
        return "the database is read-only"
    if "locked" in lowered or "busy" in lowered:
        return "the database is locked by another process"
    if "disk is full" in lowered or "full" in lowered:
        return "the disk is full"
    if "unable to open" in lowered:
        return "cannot open the database file (check the directory exists and is writable)"
    return None


class ReadOnlyStore:
    """The reading half of JobStore's interface (resolve, get, list, events), on stdlib sqlite3."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path) -> ReadOnlyStore | None:
        """The store, or None when the file's schema is not the one these queries know.

        Raises NotFoundError when there is no file (nothing is created) and UserError when the
        file is not a fabricflow database.
        """
        if not path.is_file():
            raise NotFoundError(f"no database at {path}")
        # mode=ro: this connection cannot write, whatever happens; the busy timeout only matters
        # while a checkpoint holds the WAL index.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            revision = _revision(conn, path)
        except BaseException:
            conn.close()
            raise
        if revision != SCHEMA_REVISION:
            conn.close()
            return None
        return cls(conn, path)

    def _rows(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        return self._query(sql, params)

    def _query(self, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> list[sqlite3.Row]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise UserError(f"{self.path}: {sqlite_problem(str(exc)) or exc}") from None

    async def resolve(self, ref: str) -> str:
        """The full job ID for an ID or a unique prefix of one (as JobStore.resolve)."""
        ref = job_ref(ref)
        # Every ID starting with ref sorts in [ref, ref + "g"): IDs are lowercase hex digits.
        return the_one(ref, [r["id"] for r in self._rows(
            "SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT 6", ref, ref + "g")])

    async def get(self, job_id: str) -> Job:
        """The job with its steps; NotFoundError if there is none."""
        found = self._rows("SELECT * FROM jobs WHERE id = ?", job_id)
        if not found:
            raise NotFoundError(f"no job {job_id!r}")
        return job_from_row(found[0], self._rows("SELECT * FROM steps WHERE job_id = ?", job_id))

    async def list(self, *, state: str | None = None, name: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, without their steps; ``name`` matches as a substring (as LIKE does)."""
        where, params = [], []
        if state:
            where.append("state = ?")
            params.append(state.upper())
        if name:
            escaped = name.replace("/", "//").replace("%", "/%").replace("_", "/_")
            where.append("name LIKE ? ESCAPE '/'")
            params.append(f"%{escaped}%")
        sql = ("SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created_at DESC LIMIT ?")
        return [job_from_row(row, ()) for row in self._rows(sql, *params, limit)]

    async def events(self, job_id: str, *, after: int = 0) -> list[Event]:
        """The job's events with an id greater than ``after``, oldest first."""
        rows = self._rows("SELECT id, job_id, at, step, from_state, to_state, detail FROM events"
                          " WHERE job_id = ? AND id > ? ORDER BY id", job_id, after)
        return [Event(id=r["id"], job_id=r["job_id"], at=as_utc(r["at"]), step=r["step"],  # type: ignore[arg-type]
                      from_state=r["from_state"], to_state=r["to_state"], detail=r["detail"]) for r in rows]

    async def live_teardown(self, job_id: str) -> tuple[str, str] | None:
        """The job's teardown that deletes or has deleted some of it (``LIVE_TEARDOWN``), as (ID,
        state), or None."""
        rows = self._query(LIVE_TEARDOWN, {"id": job_id})
        return (rows[0]["id"], rows[0]["state"]) if rows else None

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        """Rows of a query with ``:name`` parameters (``store.overview``'s plain SQL)."""
        return self._query(sql, params)

    async def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def _revision(conn: sqlite3.Connection, path: Path) -> str | None:
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "alembic_version" not in tables:
            if tables:
                raise UserError(f"{path}: not a fabricflow database (it holds other tables)")
            raise NotFoundError(f"no database at {path} (the file is empty)")
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error as exc:
        raise UserError(f"{path}: {sqlite_problem(str(exc)) or exc}") from None
    return row[0] if row else None


def job_ref(ref: str) -> str:
    """A job reference as typed, normalised; NotFoundError unless it can be (part of) a job ID."""
    ref = ref.strip().lower()
    if not ref or not all(c in "0123456789abcdef" for c in ref):
        raise NotFoundError(f"no job {ref!r}: job IDs are hexadecimal")
    return ref


def the_one(ref: str, ids: list[str]) -> str:
    """The single job ID a prefix matched; NotFoundError for none, UserError for several."""
    if not ids:
        raise NotFoundError(f"no job {ref!r}")
    if len(ids) > 1:
        listed = ", ".join(i[:12] for i in ids[:5])
        raise UserError(f"job ID prefix {ref!r} is ambiguous: it matches {listed}; type more of it")
    return ids[0]


# Rows to snapshots, from any driver's rows (stdlib sqlite3's, SQLAlchemy's, the writer's): the
# one mapping, kept here because this module imports nothing heavy (store/ops.py uses it too).

def as_utc(value: Any) -> datetime | None:
    """A timestamp as any driver returns it (SQLite's text, PostgreSQL's datetime), aware UTC."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def step_from_row(s: Any) -> Step:
    """A step snapshot from a row as any driver returns it."""
    return Step(
        name=StepName(s["name"]), state=StepState(s["state"]), resource_id=s["resource_id"],
        resource_status=s["resource_status"], request_name=s["request_name"], extra=_json(s["extra"]) or {},
        attempts=s["attempts"], error=_json(s["error"]), started_at=as_utc(s["started_at"]),
        updated_at=as_utc(s["updated_at"]), finished_at=as_utc(s["finished_at"]),
    )


def job_from_row(row: Any, step_rows: Iterable[Any]) -> Job:
    """A job snapshot from rows as any driver returns them."""
    return Job(
        id=row["id"], name=row["name"], state=JobState(row["state"]), spec=_json(row["spec"]),
        kind=JobKind(row["kind"]), parent_id=row["parent_id"],
        cancel_requested_at=as_utc(row["cancel_requested_at"]), started_at=as_utc(row["started_at"]),
        steps={StepName(s["name"]): step_from_row(s) for s in step_rows},
        created_at=as_utc(row["created_at"]), updated_at=as_utc(row["updated_at"]),  # type: ignore[arg-type]
        spec_version=row["spec_version"], state_version=row["state_version"], error=_json(row["error"]),
        result=_json(row["result"]), lease_owner=row["lease_owner"],
        lease_expires_at=as_utc(row["lease_expires_at"]), recoveries=row["recoveries"],
        finished_at=as_utc(row["finished_at"]),
    )
