"""Tables: jobs, steps, the append-only events log, invocations and the daemon registry.
Alembic migrations are made from this."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

# Stable constraint names, so batch-mode migrations on SQLite can address them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them without an offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime passed to the store")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text; drop the offset so every stored value has one shape.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
EventId = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("kind", String(16), nullable=False, server_default="create"),
    # A teardown job's source: the job whose resources it deletes.
    Column("parent_id", String(32), ForeignKey("jobs.id", ondelete="SET NULL")),
    Column("state", String(16), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("spec_version", Integer, nullable=False),
    Column("state_version", Integer, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", UTCDateTime),
    Column("run_after", UTCDateTime),
    Column("recoveries", Integer, nullable=False, default=0),
    # Set by `fabricflow cancel` on a RUNNING job; its runner stops at the next safe point.
    Column("cancel_requested_at", UTCDateTime),
    Column("started_at", UTCDateTime),  # first claimed: the whole-job timeout counts from here
    Column("error", JSON),
    Column("result", JSON),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Index("ix_jobs_state_run_after", "state", "run_after"),
    Index("ix_jobs_lease_owner", "lease_owner"),
    # A parent's teardowns are looked up by it (retry, prune), and deleting a job makes the
    # database find the rows referring to it: without this index, each is a scan of every job.
    Index("ix_jobs_parent_id", "parent_id"),
)

steps = Table(
    "steps",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(32), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("resource_id", String(64)),
    Column("resource_status", String(32)),
    # The exact name sent with the create call, committed before the call (the intent).
    Column("request_name", String(200)),
    Column("extra", JSON),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", JSON),
    Column("run_after", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
)

events = Table(
    "events",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("step", String(32)),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("detail", Text),
    Index("ix_events_job_id_id", "job_id", "id"),
)

invocations = Table(
    "invocations",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("service_instance_id", String(64), nullable=False),
    Column("request", JSON, nullable=False),  # messages and options, as sent
    Column("reply", Text),
    Column("finish_reason", String(32)),
    Column("usage", JSON),
    Column("ttft_ms", Integer),  # time to first token
    Column("duration_ms", Integer),
    Column("error", JSON),
    Index("ix_invocations_job_id_id", "job_id", "id"),
)

# One row per daemon process that ever started: `fabricflow status` reads it. A daemon inserts
# its row at start, renews heartbeat_at in the same transaction as its jobs' leases, and sets
# stopped_at on a clean stop; alive means a heartbeat within its own lease time.
daemons = Table(
    "daemons",
    metadata,
    Column("owner", String(64), primary_key=True),  # the lease_owner its jobs carry
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(64), nullable=False),  # fabricflow's, to see which still run an old one
    Column("lease_seconds", Float, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    Column("stopped_at", UTCDateTime),
    Column("jobs_held", Integer, nullable=False, default=0),  # leases renewed by the last heartbeat
)
