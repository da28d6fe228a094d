"""Group commit: one writer per process commits the write operations its callers wait on.

An operation is a generator (``store.ops``): it yields SQL statements, receives each one's
result and returns a value, so one definition runs on both backends. The writer collects every
operation queued while it was committing the previous batch and runs them all in one
transaction, each inside its own savepoint: an operation that raises (a lost compare-and-set)
is rolled back alone and fails only its caller. Every caller resumes only after the commit
that made its operation durable (SQLite: WAL with synchronous=FULL, so the commit is fsynced;
PostgreSQL: synchronous_commit on).

Urgent operations (claims, heartbeats, lease renewals) go to the front of the next batch on
SQLite, and skip the queue on their own connection on PostgreSQL, so they never wait behind
thousands of step transitions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")

#: The most operations one transaction carries; more wait for the next batch.
MAX_BATCH = 2000


class Sql:
    """One statement of an operation: SQL text with ``:name`` parameters.

    ``many`` runs it once per parameter dict. In the text, ``{now}`` is the database's clock
    (PostgreSQL's ``now()``; on SQLite the one process that owns the file) and ``{until}`` is
    that clock plus the ``lease`` parameter in seconds.

    ``defer`` marks a plain ``INSERT INTO ... VALUES`` whose result the operation does not read
    (an ``events`` row): the SQLite writer may hold its rows back and insert those of the whole
    batch in one ``executemany`` before COMMIT, and answers at once with the rows it will insert.

    A plain slotted class, not a dataclass: an operation makes several per transition, and a
    frozen dataclass's ``__init__`` (``object.__setattr__`` per field) cost three times as much.
    Treat it as immutable all the same.
    """

    __slots__ = ("text", "params", "many", "defer")

    def __init__(self, text: str, params: dict[str, Any] | None = None,
                 many: list[dict[str, Any]] | None = None, *, defer: bool = False) -> None:
        self.text = text
        self.params: dict[str, Any] = {} if params is None else params
        self.many = many
        self.defer = defer

    def __repr__(self) -> str:
        return f"Sql({self.text!r}, {self.params!r}, many={self.many!r}, defer={self.defer!r})"


class Result:
    """What a statement did: rows changed, and rows returned as dicts (a slotted class for the
    same reason as ``Sql``; treat it as immutable)."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rowcount: int, rows: list[dict[str, Any]]) -> None:
        self.rowcount = rowcount
        self.rows = rows

    def __repr__(self) -> str:
        return f"Result({self.rowcount!r}, {self.rows!r})"


Op = Generator[Sql, Result, T]


class Dialect(Protocol):
    """What an operation may ask of the backend it runs on."""

    name: str


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Counters of the writer, for metrics and benchmarks."""

    batches: int
    operations: int
    statements: int


class Writer(Protocol):
    """Runs operations, durably, in batches."""

    name: str

    async def run(self, op: Callable[[Dialect], Op[T]], *, urgent: bool = False) -> T: ...

    async def close(self) -> None: ...

    def stats(self) -> BatchStats: ...


def sqlite_timestamp(value: datetime) -> str:
    """A datetime in the text form SQLAlchemy stores on SQLite (UTC, no offset, microseconds)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # isoformat is several times cheaper than strftime, and this runs for every parameter. Cutting
    # the "+00:00" off its end costs half as much as replace(tzinfo=None) (keywords) beforehand.
    return value.isoformat(" ", "microseconds")[:-6]


def _sqlite_params(params: dict[str, Any], memo: dict[datetime, str]) -> dict[str, Any]:
    """``params`` with the values sqlite3 cannot bind as they are converted; ``params`` itself
    (not a copy) when there are none, which the caller must then not change."""
    out = None
    for key, value in params.items():
        kind = type(value)
        if kind is str or kind is int or value is None:  # the most common: bound as they are
            continue
        if kind is datetime:
            text = memo.get(value)
            if text is None:
                text = memo[value] = sqlite_timestamp(value)
            value = text
        elif kind is dict or kind is list:
            value = json.dumps(value)
        elif isinstance(value, str):
            # A StrEnum member (a state, a step name): sqlite3 binds its text, but only after
            # looking for an adapter and a __conform__ method; the plain str skips that.
            value = str.__str__(value)
        else:
            continue  # float, bytes, bool: bound as they are
        if out is None:
            out = params.copy()
        out[key] = value
    return params if out is None else out


def _pg_value(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


_SQLITE_TOKENS = {"now": ":now", "until": ":until", "ids": "SELECT value FROM json_each(:ids)", "skip_locked": ""}
_PG_TOKENS = {"now": "now()", "until": "(now() + make_interval(secs => CAST(:lease AS DOUBLE PRECISION)))",
              "ids": "SELECT json_array_elements_text(CAST(:ids AS json))", "skip_locked": "FOR UPDATE SKIP LOCKED"}


class SQLiteWriter:
    """The SQLite writer: one thread holding one stdlib ``sqlite3`` connection.

    Measured against SQLAlchemy Core on a synchronous connection and against aiosqlite with one
    hand-off per batch (``benchmarks/store_paths.py``), the plain driver in a thread was the
    cheapest per statement; one ``call_soon_threadsafe`` per batch wakes the event loop.
    """

    name = "sqlite"

    def __init__(self, path: str, *, clock: Callable[[], datetime], timeout: float = 30.0) -> None:
        self._path = path
        self._clock = clock
        self._timeout = timeout
        # run() takes the plain lock (a C context manager) and signals the condition only when
        # the writer thread sleeps on it: when busy, it looks at the queues before sleeping again.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._idle = False  # the writer thread waits on _cond (read and written under _lock)
        self._urgent: collections.deque[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]] = (
            collections.deque())
        self._normal: collections.deque[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]] = (
            collections.deque())
        self._closing = False
        # Each statement text as SQLite runs it: see _render.
        self._sql: dict[str, _Rendered] = {}
        self._batches = self._ops = self._statements = 0
        # Metrics hook: (operations, seconds) of each committed batch; called on the writer thread.
        self.on_batch: Callable[[int, float], None] | None = None
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fabricflow-writer", daemon=True)
        self._thread.start()

    def stats(self) -> BatchStats:
        return BatchStats(self._batches, self._ops, self._statements)

    async def run(self, op: Callable[[Dialect], Op[T]], *, urgent: bool = False) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closing:
                raise RuntimeError("the store is closed")
            (self._urgent if urgent else self._normal).append((op, future, loop))
            if self._idle:
                self._cond.notify()
        return await future

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # --- the writer thread ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None,
                               check_same_thread=False)
        # WAL: readers (the CLI, the daemon's own reads) never block this writer, nor it them.
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit fsyncs the WAL, so what a caller was told is committed survives a
        # power cut. Group commit makes this affordable: one fsync per batch, not per transition.
        conn.execute("PRAGMA synchronous=FULL")
        # Enforce steps/events -> jobs references; SQLite ignores them unless asked.
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _main(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                with self._cond:
                    while not self._urgent and not self._normal and not self._closing:
                        self._idle = True
                        self._cond.wait()
                        self._idle = False
                    if not self._urgent and not self._normal:
                        return  # closing, nothing left
                    batch = []
                    while self._urgent and len(batch) < MAX_BATCH:
                        batch.append(self._urgent.popleft())
                    while self._normal and len(batch) < MAX_BATCH:
                        batch.append(self._normal.popleft())
                if conn is None and self._open_error is None:
                    # Only at the first write: a store opened to read never creates the file.
                    try:
                        conn = self._connect()
                    except BaseException as exc:  # reported to every caller of this batch and later ones
                        self._open_error = exc
                started = time.perf_counter()
                results = self._commit(conn, batch)
                if self.on_batch is not None:
                    self.on_batch(len(batch), time.perf_counter() - started)
                by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
                for (_, future, loop), outcome in zip(batch, results, strict=True):
                    by_loop.setdefault(loop, []).append((future, outcome))
                for loop, settled in by_loop.items():
                    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                        loop.call_soon_threadsafe(_settle, settled)
        finally:
            if conn is not None:
                conn.close()

    def _render(self, sql: str) -> _Rendered:
        rendered = self._sql.get(sql)
        if rendered is None:
            rendered = self._sql[sql] = _Rendered(sql)
        return rendered

    def _commit(self, conn: sqlite3.Connection | None, batch: list[Any]) -> list[tuple[bool, Any]]:
        """Run the batch in one transaction; each operation's outcome, in order.

        No savepoint per operation (two statements each): an operation that fails before it
        changed a row (a compare-and-set that missed, the usual case) needs no undo. One that
        fails after changing rows rolls the whole transaction back; the batch then runs again
        without it, so it still fails alone.

        Deferred statements (``Sql.defer``: the events rows) are held in ``pending`` and
        inserted, one ``executemany`` per statement, before COMMIT: a transition then costs one
        round of Python fewer. Each operation's rows join ``pending`` as it runs and are cut off
        again if it fails, so a failed operation leaves none behind. If the held rows fail to
        insert (a constraint: say an event for a job that does not exist), nobody can tell which
        operation they came from: the transaction is rolled back and the batch runs again with
        every statement run at once, as it is yielded, which fails only the offender.
        """
        if conn is None:
            error = _wrap(self._open_error or RuntimeError("no connection"), "connect")
            return [(False, error)] * len(batch)
        failed: dict[int, BaseException | None] = {i: None for i, (_, f, _) in enumerate(batch) if f.cancelled()}
        # One clock reading for the whole batch: {now} is formatted once, and the text of each
        # datetime parameter is kept for the batch (its statements and operations share them).
        now = self._clock()
        now_text = sqlite_timestamp(now)
        memo: dict[datetime, str] = {}
        defer = True
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                return [(False, _wrap(exc, "BEGIN IMMEDIATE"))] * len(batch)
            cursor = conn.cursor()  # one for the batch: conn.execute would make one per statement
            outcomes: list[tuple[bool, Any]] = []
            pending: _Pending | None = _Pending() if defer else None
            statements = 0
            rerun = False
            try:
                for i, (op_factory, _future, _loop) in enumerate(batch):
                    if i in failed:
                        outcomes.append((False, failed[i]))
                        continue
                    changes = conn.total_changes
                    held = len(pending.rows) if pending is not None else 0
                    try:
                        value, count = self._drive(cursor, op_factory, now, now_text, memo, pending)
                    except _FlushFailed:  # pending.failed: run the batch again, deferring nothing
                        rerun = True
                        break
                    except Exception as exc:  # noqa: BLE001 - this caller's own error, e.g. StaleTransition
                        error = _wrap(exc, "operation")
                        if not conn.in_transaction:  # the driver ended the transaction: all of it fails
                            raise
                        if conn.total_changes != changes:  # half done: undo all, run the rest again
                            failed[i] = error
                            rerun = True
                            break
                        if pending is not None:
                            # Nothing changed, so nothing was flushed meanwhile (a flush inserts at
                            # least one row): the rows held since ``held`` are this operation's.
                            pending.cut(held)
                        outcomes.append((False, error))
                    else:
                        statements += count
                        outcomes.append((True, value))
                if not rerun and pending is not None and pending.rows:
                    try:
                        pending.flush(cursor)
                    except sqlite3.Error:
                        rerun = True
                if rerun:
                    if pending is not None and pending.failed:
                        defer = False  # run again with no statement held back: see the docstring
                    with contextlib.suppress(sqlite3.Error):  # a failed flush may have ended it
                        conn.execute("ROLLBACK")
                    continue
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                return [(False, _wrap(exc, "COMMIT"))] * len(batch)
            self._batches += 1
            self._ops += len(batch)
            self._statements += statements
            return outcomes

    def _drive(self, cursor: sqlite3.Cursor, op_factory: Any, now: datetime, now_text: str,
               memo: dict[datetime, str], pending: _Pending | None) -> tuple[Any, int]:
        # This loop runs for every statement of every caller: each call and lookup saved in it
        # is worth keeping (binding is inlined, the clock parameters are the rare case).
        gen = op_factory(self)
        send = gen.send
        rendered_sql = self._sql
        count = 0
        try:
            sql = next(gen)
            while True:
                count += 1
                rendered = rendered_sql.get(sql.text) or self._render(sql.text)
                query, clock, table = rendered.query, rendered.clock, rendered.table
                many = sql.many
                if pending is not None:
                    if table is not None and sql.defer:
                        # Inserted before COMMIT, or the batch runs again without deferring: each
                        # row of a plain INSERT ... VALUES inserts one row or fails the batch.
                        rows = [_sqlite_params(sql.params, memo)] if many is None else [
                            _sqlite_params(p, memo) for p in many]
                        if clock:
                            rows = [_clocked(b, p, rendered, now, now_text)
                                    for b, p in zip(rows, many or [sql.params], strict=True)]
                        if rows:  # (none held empty: a flush then always changes rows, see _commit)
                            pending.hold(query, table, rows)
                        sql = send(Result(len(rows), []))
                        continue
                    if pending.rows and pending.touched_by(query):
                        # It may read, change or depend on the held rows: insert them first.
                        try:
                            pending.flush(cursor)
                        except sqlite3.Error as exc:
                            raise _FlushFailed from exc
                if many is not None and len(many) != 1:
                    rows = [_sqlite_params(p, memo) for p in many]
                    if clock:
                        rows = [_clocked(b, p, rendered, now, now_text) for b, p in zip(rows, many, strict=True)]
                    cursor.executemany(query, rows)
                    result = Result(cursor.rowcount, [])
                else:
                    single = sql.params if many is None else many[0]
                    bound = _sqlite_params(single, memo)
                    if clock:
                        bound = _clocked(bound, single, rendered, now, now_text)
                    cursor.execute(query, bound)
                    if cursor.description is not None:
                        names = [d[0] for d in cursor.description]
                        result = Result(cursor.rowcount, [dict(zip(names, r, strict=True))
                                                          for r in cursor.fetchall()])
                    else:
                        result = Result(cursor.rowcount, [])
                sql = send(result)
        except StopIteration as stop:
            return stop.value, count


def _clocked(bound: dict[str, Any], params: dict[str, Any], rendered: _Rendered, now: datetime,
             now_text: str) -> dict[str, Any]:
    """``bound`` with the batch's clock (``:now``) and a lease's end (``:until``) added."""
    if bound is params:
        bound = dict(params)
    if rendered.uses_now:
        bound["now"] = now_text
    if rendered.until:
        bound["until"] = sqlite_timestamp(now + timedelta(seconds=float(params["lease"])))
    return bound


class _Rendered:
    """A statement's text as SQLite runs it, which clock parameters it needs (``clock``: any),
    and, for a plain ``INSERT INTO ... VALUES`` (which may be deferred), the table it fills."""

    __slots__ = ("query", "uses_now", "until", "clock", "table")

    def __init__(self, text: str) -> None:
        self.query = text.format(**_SQLITE_TOKENS)
        self.uses_now = ":now" in self.query
        self.until = "{until}" in text
        self.clock = self.uses_now or self.until
        self.table = _inserts_into(self.query)


_PLAIN_INSERT = re.compile(r"\s*INSERT\s+INTO\s+(\w+)\s*\([^()]*\)\s*VALUES\s*\([^()]*\)\s*", re.IGNORECASE)


def _inserts_into(query: str) -> str | None:
    """The table of a plain ``INSERT INTO t (...) VALUES (...)``: no OR IGNORE, ON CONFLICT,
    SELECT or RETURNING, so each parameter row inserts exactly one row or raises; else None."""
    match = _PLAIN_INSERT.fullmatch(query)
    return match.group(1) if match else None


class _FlushFailed(Exception):
    """Held rows failed to insert while an operation ran: not that operation's error."""


class _Pending:
    """The deferred rows of a batch, in the order they were yielded."""

    __slots__ = ("rows", "tables", "failed")

    def __init__(self) -> None:
        self.rows: list[tuple[str, list[dict[str, Any]]]] = []  # (query, its parameter rows)
        self.tables: set[str] = set()
        self.failed = False

    def hold(self, query: str, table: str, rows: list[dict[str, Any]]) -> None:
        self.rows.append((query, rows))
        self.tables.add(table)

    def cut(self, held: int) -> None:
        """Forget the rows held since there were ``held`` (a failed operation's)."""
        del self.rows[held:]

    def touched_by(self, query: str) -> bool:
        # A statement naming a table with held rows (even as a substring: flushing early is
        # only slower) must see them. Others cannot: the held rows are only ever inserted.
        for table in self.tables:
            if table in query:
                return True
        return False

    def flush(self, cursor: sqlite3.Cursor) -> None:
        """Insert the held rows, consecutive ones of the same statement in one executemany."""
        try:
            held, i = self.rows, 0
            while i < len(held):
                query, rows = held[i]
                i += 1
                if i < len(held) and held[i][0] == query:
                    rows = list(rows)
                    while i < len(held) and held[i][0] == query:
                        rows += held[i][1]
                        i += 1
                cursor.executemany(query, rows)
        except sqlite3.Error:
            self.failed = True
            raise
        self.rows = []
        self.tables = set()


#: Runs of one operation when PostgreSQL picks it as a deadlock victim (or a serialization
#: failure): the standard remedy is to run it again, and each operation is its own
#: compare-and-set, whose effects the rollback undid.
TRANSIENT_ATTEMPTS = 4
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


def is_transient(exc: BaseException) -> bool:
    """True for a PostgreSQL error that running the same transaction again may not meet."""
    for err in (exc, getattr(exc, "orig", None)):
        if err is not None and (getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)) in _TRANSIENT_SQLSTATES:
            return True
    return "deadlock detected" in str(exc)


class PostgresWriter:
    """The PostgreSQL writer: an asyncio task that commits batches on one pooled connection."""

    name = "postgresql"

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queue: collections.deque[tuple[Any, asyncio.Future[Any]]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._texts: dict[str, Any] = {}
        self._batches = self._ops = self._statements = 0
        self.on_batch: Callable[[int, float], None] | None = None  # metrics: (operations, seconds) per batch

    def stats(self) -> BatchStats:
        return BatchStats(self._batches, self._ops, self._statements)

    async def run(self, op: Callable[[Dialect], Op[T]], *, urgent: bool = False) -> T:
        if self._closing:
            raise RuntimeError("the store is closed")
        if urgent:  # its own connection and transaction: never behind the queue
            for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
                try:
                    async with self._engine.begin() as conn:
                        await conn.execute(text("SET LOCAL synchronous_commit = on"))
                        value, _ = await self._drive(conn, op)
                        return value
                except Exception as exc:
                    if not (is_transient(exc) and attempt < TRANSIENT_ATTEMPTS):
                        raise
            raise AssertionError("unreachable")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._main(), name="fabricflow-writer")
        self._wake.set()
        return await future

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _main(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        statements = 0
        started = time.perf_counter()
        try:
            async with self._engine.begin() as conn:
                await conn.execute(text("SET LOCAL synchronous_commit = on"))
                for op_factory, future in batch:
                    if future.cancelled():
                        outcomes.append((False, None))
                        continue
                    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
                        savepoint = await conn.begin_nested()
                        try:
                            value, count = await self._drive(conn, op_factory)
                            statements += count
                        except Exception as exc:  # noqa: BLE001 - fails only this operation's caller
                            await savepoint.rollback()
                            if is_transient(exc) and attempt < TRANSIENT_ATTEMPTS:
                                continue  # a deadlock victim: its effects are undone, run it again
                            outcomes.append((False, exc))
                        else:
                            await savepoint.commit()
                            outcomes.append((True, value))
                        break
        except Exception as exc:  # noqa: BLE001 - the commit failed: every caller learns it
            outcomes = [(False, exc)] * len(batch)
        else:
            self._batches += 1
            self._ops += len(batch)
            self._statements += statements
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - started)
        _settle([(future, outcome) for (_, future), outcome in zip(batch, outcomes, strict=True)])

    def _text(self, sql: str) -> Any:
        compiled = self._texts.get(sql)
        if compiled is None:
            compiled = self._texts[sql] = text(sql.format(**_PG_TOKENS))
        return compiled

    async def _drive(self, conn: AsyncConnection, op_factory: Any) -> tuple[Any, int]:
        gen = op_factory(self)
        count = 0
        try:
            sql = next(gen)
            while True:
                count += 1
                statement = self._text(sql.text)
                # Sql.defer is only a permission to defer: each statement runs here as it is yielded.
                if sql.many is not None:
                    if not sql.many:
                        result = Result(0, [])
                    else:
                        done = await conn.execute(statement, [{k: _pg_value(v) for k, v in p.items()}
                                                              for p in sql.many])
                        result = Result(done.rowcount, [])
                else:
                    done = await conn.execute(statement, {k: _pg_value(v) for k, v in sql.params.items()})
                    rows = [dict(r) for r in done.mappings().all()] if done.returns_rows else []
                    result = Result(done.rowcount, rows)
                sql = gen.send(result)
        except StopIteration as stop:
            return stop.value, count


def _wrap(exc: BaseException, statement: str) -> BaseException:
    """A driver error as SQLAlchemy's DBAPIError, which the CLI and daemon already explain."""
    if isinstance(exc, sqlite3.Error):
        return sa_exc.DBAPIError.instance(statement, None, exc, sqlite3.Error)
    return exc


def _settle(settled: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for future, (ok, value) in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value if value is not None else asyncio.CancelledError())
