"""The ``--state-file`` format: the emulator's records as JSON, written atomically.

Monotonic clocks restart with the process, so every monotonic time is stored as a wall-clock
epoch; ``offset`` (wall epoch minus monotonic now) converts both ways.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict
from datetime import datetime
from typing import Any

from .records import Late, Resource, Stats


class StateFileError(Exception):
    """The ``--state-file`` exists but cannot be loaded (unreadable, not JSON, not our shape)."""


def write(path: str, resources: list[Resource], late: list[Late], stats: Stats,
          offset: float) -> None:
    """Replace the file at ``path``; atomically, so a kill mid-write loses nothing."""
    doc = {"resources": [_row(res, offset) for res in resources],
           "late": [{"requested_at": item.requested_at + offset, "due": item.due + offset,
                     "resource": _row(item.res, offset)} for item in late],
           "created": {kind: dict(names) for kind, names in stats.created.items()},
           "requests": stats.requests, "late_created": stats.late_created,
           "churn_deleted": stats.churn_deleted}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
    os.replace(tmp, path)


def read(path: str, offset: float) -> tuple[list[Resource], list[Late], Stats]:
    """The records of a state file, or StateFileError saying why it cannot be one."""
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
        if not isinstance(doc, dict):
            raise TypeError(f"a JSON object was expected, not {type(doc).__name__}")
        return _records(doc, offset)
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # json.JSONDecodeError is a ValueError
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise StateFileError(f"{path}: not an emulator state file ({reason})") from None


def _records(doc: dict[str, Any], offset: float) -> tuple[list[Resource], list[Late], Stats]:
    resources = [_resource(row, offset) for row in doc.get("resources", [])]
    late = [Late(item["requested_at"] - offset, item["due"] - offset,
                 _resource(item["resource"], offset)) for item in doc.get("late", [])]
    stats = Stats()
    for kind, names in doc.get("created", {}).items():
        stats.created.setdefault(kind, Counter()).update(names)
    stats.requests = doc.get("requests", 0)
    stats.late_created = doc.get("late_created", 0)
    stats.churn_deleted = doc.get("churn_deleted", 0)
    return resources, late, stats


def _row(res: Resource, offset: float) -> dict[str, Any]:
    row = asdict(res)
    row["created_at"] = res.created_at + offset
    row["deleted_at"] = None if res.deleted_at is None else res.deleted_at + offset
    row["create_time"] = res.create_time.isoformat()
    row["update_time"] = res.update_time.isoformat()
    return row


def _resource(row: dict[str, Any], offset: float) -> Resource:
    row["created_at"] -= offset
    if row["deleted_at"] is not None:
        row["deleted_at"] -= offset
    row["create_time"] = datetime.fromisoformat(row["create_time"])
    row["update_time"] = datetime.fromisoformat(row["update_time"])
    if row["failure"] is not None:
        row["failure"] = tuple(row["failure"])
    return Resource(**row)
