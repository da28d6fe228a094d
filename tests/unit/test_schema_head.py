"""The schema head the store opens databases against, without importing Alembic."""

from __future__ import annotations

from alembic.script import ScriptDirectory

from orchestrator.store import db


def test_the_head_revision_is_alembics_newest_migration():
    # A new migration fails this until db.HEAD_REVISION is bumped: until then, a database at
    # the old head would be taken as current and the new migration never run.
    script = ScriptDirectory.from_config(db.alembic_config())
    assert script.get_heads() == [db.HEAD_REVISION]
