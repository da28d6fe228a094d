"""Read the job database behind a fabricflow ``--db`` URL, synchronously, SQLite or PostgreSQL.

The torture scenario looks at the database from the outside while daemons write to it, as a
user with ``sqlite3`` or ``psql`` would: read-only, one statement at a time, each statement in
its own transaction. SQL is written once with ``?`` placeholders (SQLite's); for PostgreSQL they
become ``$1, $2, ...`` and the statement runs on asyncpg (the driver fabricflow already depends
on) through a private event loop, so the caller stays synchronous.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, Self

from sqlalchemy.engine import make_url


def to_numbered(sql: str) -> str:
    """``?`` placeholders to PostgreSQL's ``$1, $2, ...``; a ``?`` inside a quoted literal stays."""
    out: list[str] = []
    number = 0
    quote: str | None = None
    for char in sql:
        if quote is not None:
            quote = None if char == quote else quote  # '' (an escaped quote) closes and reopens
        elif char in ("'", '"'):
            quote = char
        elif char == "?":
            number += 1
            out.append(f"${number}")
            continue
        out.append(char)
    return "".join(out)


class Reader:
    """Read-only, synchronous queries on the database a fabricflow ``--db`` URL names.

    ``query(sql, *params)`` returns a list of plain tuples on both backends. Close it (or use it
    as a context manager) to drop the PostgreSQL connection and its event loop.
    """

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self.backend = parsed.get_backend_name()
        self.described = ((parsed.database or "") if self.backend == "sqlite"
                          else parsed.render_as_string(hide_password=True))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None
        if self.backend == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                raise ValueError(f"{url}: the torture scenario needs a SQLite file, not an in-memory database")
            self.file = Path(parsed.database)
        elif self.backend == "postgresql":
            self.dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        else:
            raise ValueError(f"{url}: unsupported database {self.backend!r} (sqlite or postgresql)")

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.backend == "sqlite":
            conn = sqlite3.connect(f"file:{self.file}?mode=ro", uri=True, timeout=10)
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        return self._pg(to_numbered(sql), params)

    def scalar(self, sql: str, *params: Any) -> Any:
        rows = self.query(sql, *params)
        return rows[0][0] if rows else None

    def _pg(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        import asyncpg

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        for attempt in (1, 2):
            if self._conn is None or self._conn.is_closed():
                self._conn = self._loop.run_until_complete(asyncpg.connect(
                    self.dsn, timeout=10, server_settings={
                        "application_name": "fabricflow-torture-reader",
                        "default_transaction_read_only": "on",
                    }))
            try:
                rows = self._loop.run_until_complete(self._conn.fetch(sql, *params, timeout=30))
            except (OSError, asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.InterfaceError):
                self._drop()
                if attempt == 2:
                    raise
                continue
            return [tuple(row) for row in rows]
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._loop is not None and not conn.is_closed():
            import asyncpg

            try:
                self._loop.run_until_complete(conn.close(timeout=5))
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()

    def close(self) -> None:
        self._drop()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
