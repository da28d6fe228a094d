"""Alembic: upgrade head on an empty file, metadata matches, and clear words for odd databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from orchestrator.errors import UserError
from orchestrator.store import db
from orchestrator.store.jobs import JobStore
from orchestrator.store.schema import metadata


async def test_upgrade_head_on_empty_file_matches_metadata(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata))
            state = await conn.run_sync(db._schema_state)
    finally:
        await engine.dispose()
    assert diff == []
    assert state.is_current and state.current == db.head_revision()


async def test_open_creates_and_migrates_a_new_sqlite_file(tmp_path: Path):
    path = tmp_path / "deep" / "dir" / "new.db"
    store = await JobStore.open(f"sqlite+aiosqlite:///{path}")
    await store.close()
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"jobs", "steps", "events", "alembic_version"} <= tables
    assert mode == "wal"


async def test_behind_schema_without_auto_upgrade_says_what_to_run(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    sqlite3.connect(tmp_path / "old.db").close()
    with pytest.raises(UserError) as err:
        await JobStore.open(url, auto_upgrade=False)
    assert "fabricflow db upgrade --db" in str(err.value)
    assert db.head_revision() in str(err.value)


async def test_foreign_database_is_refused(tmp_path: Path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(UserError, match="not a fabricflow database"):
        await JobStore.open(f"sqlite+aiosqlite:///{path}")


async def test_not_a_database_file(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError) as err:
        await JobStore.open(f"sqlite+aiosqlite:///{path}")
    assert str(err.value) == f"{path}: not a SQLite database file"


async def test_newer_schema_than_this_fabricflow(tmp_path: Path):
    path = tmp_path / "new.db"
    store = await JobStore.open(f"sqlite+aiosqlite:///{path}")
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(UserError, match="newer than this fabricflow"):
        await JobStore.open(f"sqlite+aiosqlite:///{path}")


def test_bad_database_url():
    with pytest.raises(UserError, match="not a database URL"):
        db.create_engine("not a url")
    with pytest.raises(UserError, match="unsupported database"):
        db.create_engine("mysql://x/y")


@pytest.mark.parametrize(
    ("driver_message", "said"),
    [
        ("database is locked", "the database is locked by another process"),
        ("attempt to write a readonly database", "the database is read-only"),
        ("database or disk is full", "the disk is full"),
        ("file is not a database", "not a SQLite database file"),
        ("unable to open database file", "cannot open the database file (check the directory exists and is writable)"),
    ],
)
def test_database_problems_are_one_plain_line(driver_message, said):
    from sqlalchemy.exc import OperationalError

    exc = OperationalError("UPDATE jobs SET ...", {"secret": "params"}, sqlite3.OperationalError(driver_message))
    assert db.database_problem(exc) == said


async def test_a_database_at_the_first_revision_is_upgraded_by_any_command(tmp_path: Path):
    from alembic import command

    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    engine = db.create_engine(url)
    async with engine.connect() as conn:
        await conn.run_sync(lambda sync: command.upgrade(db.alembic_config(sync), "0001"))
        await conn.commit()
    await engine.dispose()
    store = await JobStore.open(url)  # as `fabricflow list` does
    await store.close()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == db.head_revision()
        assert "kind" in {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
