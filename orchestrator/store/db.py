"""Opening the database: engine settings per backend, and the schema's migration state."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidRequestError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orchestrator.errors import NotFoundError, UserError
from orchestrator.store.readonly import sqlite_problem

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest migration in migrations/versions, so that opening a current database needs no
#: Alembic (importing it costs about 0.1 s of CPU at every start). Adding a migration: bump
#: this; tests/unit/test_schema_head.py compares it with Alembic's own idea of the head.
HEAD_REVISION = "0003"

# Installed from a wheel, migrations/ is inside the package (pyproject.toml maps it there); in a
# checkout, installed editable or not, it is at the repository's top level.
_PACKAGE = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = _PACKAGE / "_migrations"
if not MIGRATIONS_DIR.is_dir():
    MIGRATIONS_DIR = _PACKAGE.parent / "migrations"
WRITE = "fabricflow_write"  # execution option: this connection's transactions write


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config pointing at our migrations, optionally bound to an open connection."""
    from alembic.config import Config  # only when migrating or checking a revision: see HEAD_REVISION

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest migration this fabricflow ships."""
    return HEAD_REVISION


def describe(url: str) -> str:
    """The database as a user recognises it: the file for SQLite, the URL without password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    """True for SQLite URLs."""
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str) -> AsyncEngine:
    """An async engine with the settings fabricflow relies on for this backend."""
    try:
        return _create_engine(url)
    except UserError:
        raise
    except (ValueError, OSError, ImportError, InvalidRequestError, NoSuchModuleError) as exc:
        where = _safe(url)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--db {where}: cannot use this database: {reason} (fabricflow takes "
                        "sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST/DB URLs)") from None


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable URL)"


def _create_engine(url: str) -> AsyncEngine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"--db: {url!r} is not a database URL (e.g. sqlite+aiosqlite:///jobs.db)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername == "sqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        if parsed.database and parsed.database != ":memory:":
            # "~" as the writer (stdlib sqlite3 on the same path) and sqlite_path() read it.
            parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
        # No directory is made here: only prepare() creates a database, and only for a writer.
        # A generous busy timeout: the CLI and the daemon share the file and wait for each other
        # rather than fail with "database is locked".
        engine = create_async_engine(parsed, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+asyncpg")
        return create_async_engine(parsed, pool_pre_ping=True)
    raise UserError(f"--db: unsupported database {backend!r}; use sqlite or postgresql")


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself, so writers can ask for IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers (the CLI) never block the writer (the daemon) and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        # Enforce steps/events -> jobs references; SQLite ignores them unless asked.
        cursor.execute("PRAGMA foreign_keys=ON")
        # FULL: every commit fsyncs the WAL before it returns, so what fabricflow acknowledged
        # (a submitted job's ID, an intent, a recorded resource ID) survives a power cut.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (IMMEDIATE): a deferred transaction that reads and
        # then writes can fail with SQLITE_BUSY without waiting for the busy timeout.
        mode = "IMMEDIATE" if conn.get_execution_options().get(WRITE) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


@dataclass(frozen=True)
class SchemaState:
    """Where the database's schema stands relative to this fabricflow."""

    current: str | None
    head: str
    foreign: bool  # tables exist but they are not fabricflow's

    @property
    def is_current(self) -> bool:
        """True when no migration is pending."""
        return self.current == self.head


def _schema_state(connection: Connection) -> SchemaState:
    tables = set(inspect(connection).get_table_names())
    current = None
    if "alembic_version" in tables:  # read as Alembic does, without importing it
        rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version").fetchall()
        if len(rows) > 1:
            raise UserError(f"the database records several schema revisions ({', '.join(r[0] for r in rows)}); "
                            "fabricflow's migrations are linear: was it migrated by another tool?")
        current = rows[0][0] if rows else None
    foreign = current is None and bool(tables - {"alembic_version"})
    return SchemaState(current=current, head=head_revision(), foreign=foreign)


def _upgrade(connection: Connection) -> None:
    from alembic import command

    command.upgrade(alembic_config(connection), "head")


async def schema_state(engine: AsyncEngine) -> SchemaState:
    """Read the schema's migration state."""
    async with engine.connect() as conn:
        return await conn.run_sync(_schema_state)


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration."""
    async with engine.connect() as conn:
        await conn.run_sync(_upgrade)
        await conn.commit()


async def prepare(engine: AsyncEngine, url: str, *, auto_upgrade: bool) -> None:
    """Make sure the schema is fabricflow's and current, or say exactly what to do.

    SQLite files are upgraded on the spot (one daemon owns a file); a shared PostgreSQL database
    is upgraded only by ``fabricflow db upgrade``, so several daemons never race a migration.
    A missing SQLite file is created (with its directory) only when ``auto_upgrade`` allows it.
    """
    where = describe(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        if not auto_upgrade:
            raise NotFoundError(f"no database at {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{where}: cannot create its directory: {exc.strerror or exc}") from None
    try:
        state = await _usable_state(engine, url)
        if state.is_current:
            return
        if not auto_upgrade:
            raise UserError(
                f"{where}: schema is at {state.current or 'nothing'}, this fabricflow needs "
                f"{state.head}; run: fabricflow db upgrade --db '{_safe(url)}'"
            )
        async with migration_lock(path):
            # Whoever held the lock before may have migrated already: look again.
            if not (await _usable_state(engine, url)).is_current:
                await upgrade(engine)
    except DBAPIError as exc:
        raise UserError(f"{where}: {database_problem(exc)}") from None
    except (OSError, NoSuchModuleError) as exc:
        raise UserError(f"{where}: cannot open: {exc}") from None


async def _usable_state(engine: AsyncEngine, url: str) -> SchemaState:
    """The schema's state, refused if the tables are not fabricflow's or are newer than it."""
    state = await schema_state(engine)
    if state.foreign:
        raise UserError(f"{describe(url)}: not a fabricflow database (it holds other tables)")
    if not state.is_current and state.current is not None:
        from alembic.script import ScriptDirectory

        known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
        if state.current not in known:
            raise UserError(
                f"{describe(url)}: schema revision {state.current} is newer than this fabricflow "
                f"(knows up to {state.head}); upgrade fabricflow"
            )
    return state


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other backends, in-memory databases and non-URLs
    (which ``create_engine`` reports)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser()


#: The longest a process waits for another's migration of the same SQLite file, in seconds.
MIGRATION_LOCK_WAIT = 120.0


@contextlib.asynccontextmanager
async def migration_lock(path: Path | None) -> AsyncIterator[None]:
    """Hold an OS lock on ``<file>.migration.lock`` beside a SQLite file while it is migrated.

    Without it, the first users of a new file (twenty ``fabricflow submit`` started at once)
    each find it empty and race to create the same tables: SQLite's busy timeout does not help a
    transaction that read before it writes, so most failed with "database is locked". With it,
    one migrates while the others wait, then find the schema current. The lock is taken only
    when a migration is due, so reading a current database never makes the file.
    """
    if path is None:  # PostgreSQL: migrated only by `fabricflow db upgrade`
        yield
        return
    lock_path = path.with_name(path.name + ".migration.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + MIGRATION_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{path}: another process has been migrating this database for "
                                    f"{MIGRATION_LOCK_WAIT:g}s ({lock_path} is locked); try again") from None
                # Polled rather than blocking in a thread, so that Ctrl-C ends the wait at once.
                await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock (as the kernel does if this process dies)


def database_problem(exc: DBAPIError) -> str:
    """One line a user can act on, from a driver error."""
    orig = exc.orig
    text = str(orig).splitlines()[0] if orig is not None else str(exc)
    if isinstance(orig, sqlite3.DatabaseError) or "sqlite" in type(orig).__module__:
        return sqlite_problem(text) or text
    return text
