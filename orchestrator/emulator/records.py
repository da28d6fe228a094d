"""The emulator's records: resources, pending late creates and counters, with no behaviour."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

KINDS = ("workspace", "endpoint", "model", "service_instance")
# Kinds with a lifecycle; workspaces and models are created and deleted synchronously.
STATEFUL = ("endpoint", "service_instance")


def iso(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, as in the Fabric examples."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{moment.microsecond // 1000:03d}Z"


def new_id(kind: str) -> str:
    """UUID4 strings, except endpoints: 32 hex characters as in the endpoint example.

    Ids come from the OS, not the seeded RNG, so an emulator restarted on the same state file
    and seed never hands out an id twice.
    """
    return uuid.uuid4().hex if kind == "endpoint" else str(uuid.uuid4())


@dataclass
class Resource:
    """One workspace, endpoint, model or service instance."""

    kind: str
    id: str
    name: str
    workspace_id: str | None
    fields: dict[str, Any]
    created_at: float  # monotonic seconds
    create_time: datetime
    update_time: datetime
    deleted_at: float | None = None  # monotonic seconds of the DELETE
    failure: tuple[str, str] | None = None  # (error_code, error_msg) once the create fails


@dataclass
class Late:
    """A create request whose answer was dropped and which is carried out at ``due``."""

    requested_at: float  # monotonic seconds
    due: float  # monotonic seconds
    res: Resource  # as the request asked; its times are set when it is carried out


@dataclass
class Stats:
    """What ``GET /_emulator/stats`` reports, minus the live counts (computed)."""

    created: dict[str, Counter[str]] = field(
        default_factory=lambda: {kind: Counter() for kind in KINDS})
    requests: int = 0
    operations: Counter[str] = field(default_factory=Counter)  # requests by handler, e.g. show_endpoint
    late_created: int = 0  # late creates carried out (also counted in ``created``)
    churn_deleted: int = 0  # bystanders deleted between two pages of a list (page churn)
