"""The stdlib SQLite reader: which URLs it reads, and the schema revision its queries are for."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.store import db
from orchestrator.store.readonly import SCHEMA_REVISION, sqlite_file


def test_the_readers_queries_are_for_the_newest_migration():
    # A new migration fails this until store/readonly.py is checked against it and SCHEMA_REVISION
    # bumped; meanwhile databases at the new revision are read through JobStore.
    assert SCHEMA_REVISION == db.head_revision()


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:///jobs.db", Path("jobs.db")),
    ("sqlite+aiosqlite:///jobs.db", Path("jobs.db")),
    ("sqlite:////abs/dir/jobs.db", Path("/abs/dir/jobs.db")),
    ("sqlite:///with%20space.db", Path("with space.db")),
    ("sqlite:///~/jobs.db", Path.home() / "jobs.db"),
])
def test_plain_sqlite_urls_name_their_file_as_sqlalchemy_reads_them(url, path):
    assert sqlite_file(url) == path
    assert db.sqlite_path(url) == path


@pytest.mark.parametrize("url", [
    "postgresql://u@h/db", "sqlite://", "sqlite:///:memory:", "sqlite:///jobs.db?mode=ro",
    "sqlite+pysqlite:///jobs.db", "not a url",
])
def test_anything_else_is_left_to_jobstore(url):
    assert sqlite_file(url) is None
