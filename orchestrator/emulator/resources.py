"""In-memory state of the emulator: resources, their computed status, lists, counters.

Status is never stored: it is computed from the monotonic time of the create/delete and the
configured delays, so a poll sees CREATING → RUNNING without any background task, and a
paused or slow test cannot miss a transition.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, UTC
from typing import Any
from collections.abc import Callable, Iterable, Mapping

from .config import EmulatorConfig
from .errors import invalid


class StateFileError(Exception):
    """The ``--state-file`` exists but cannot be loaded (unreadable, not JSON, not our shape)."""


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
class Stats:
    """What ``GET /_emulator/stats`` reports, minus the live counts (computed)."""

    created: dict[str, Counter[str]] = field(
        default_factory=lambda: {kind: Counter() for kind in KINDS})
    requests: int = 0
    operations: Counter[str] = field(default_factory=Counter)  # requests by handler, e.g. show_endpoint


class Store:
    """All resources of one emulator, with injectable clocks for tests."""

    def __init__(self, config: EmulatorConfig, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
                 ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.resources: dict[str, Resource] = {}
        # The same resources by (kind, workspace): lists and name checks touch only their own
        # scope, so an emulator holding 10,000 jobs' resources still answers in microseconds.
        self._scopes: dict[tuple[str, str | None], dict[str, Resource]] = {}
        self._names: dict[tuple[str, str | None], dict[str, dict[str, Resource]]] = {}
        self.stats = Stats()
        if config.state_file and os.path.exists(config.state_file):
            self._load(config.state_file)

    # -- lifecycle ---------------------------------------------------------------------

    def status(self, res: Resource) -> str | None:
        """Current status of an endpoint or instance; None for kinds without one."""
        if res.kind not in STATEFUL:
            return None
        now = self.clock()
        if res.deleted_at is not None:
            return "DELETED" if now - res.deleted_at >= self.config.delete_after else "DELETING"
        if now - res.created_at < self._ready_after(res):
            return "CREATING"
        if res.failure is not None:
            return "CREATE_FAILED" if res.kind == "endpoint" else "FAILED"
        return "RUNNING"

    def updated(self, res: Resource) -> datetime:
        """Wall time of the last change, including transitions that happened by themselves."""
        moment = res.update_time
        if res.kind in STATEFUL:
            elapsed = self.clock() - res.created_at
            ready = self._ready_after(res)
            if elapsed >= ready:
                moment = max(moment, res.create_time + timedelta(seconds=ready))
            if res.deleted_at is not None and \
                    self.clock() - res.deleted_at >= self.config.delete_after:
                moment = max(moment, res.update_time + timedelta(seconds=self.config.delete_after))
        return moment

    def _ready_after(self, res: Resource) -> float:
        if res.kind == "endpoint":
            return self.config.ready_after
        return self.config.instance_ready_after

    def is_live(self, res: Resource) -> bool:
        """Not DELETED (DELETING still counts: the resource still exists)."""
        return self.status(res) != "DELETED"

    def is_active(self, res: Resource) -> bool:
        """Neither DELETING nor DELETED: the resource still holds what it was created for."""
        return res.deleted_at is None

    # -- access ------------------------------------------------------------------------

    def add(self, kind: str, name: str, workspace_id: str | None, fields: dict[str, Any],
            *, failure: tuple[str, str] | None = None) -> Resource:
        """Create a resource and count it in the stats."""
        now = self.wall_clock()
        res = Resource(kind=kind, id=new_id(kind), name=name, workspace_id=workspace_id,
                       fields=fields, created_at=self.clock(), create_time=now,
                       update_time=now, failure=failure)
        self._put(res)
        self.stats.created[kind][name] += 1
        self.save()
        return res

    def get(self, kind: str, resource_id: str, workspace_id: str | None = None
            ) -> Resource | None:
        """A live resource of that kind (in that workspace), or None."""
        res = self.resources.get(resource_id)
        if res is None or res.kind != kind or not self.is_live(res):
            return None
        if workspace_id is not None and res.workspace_id != workspace_id:
            return None
        return res

    def items(self, kind: str, workspace_id: str | None = None, *, name: str | None = None) -> list[Resource]:
        """Live resources of a kind, oldest first; ``name``: only those whose name contains it."""
        if workspace_id is None and kind != "workspace":
            return [res for res in self.resources.values() if res.kind == kind and self.is_live(res)
                    and (not name or name in res.name)]
        key = (kind, workspace_id)
        if name:  # the fuzzy filter over the names alone, not over every resource
            names = self._names.get(key, {})
            found = [res for n in names if name in n for res in names[n].values() if self.is_live(res)]
            return sorted(found, key=lambda res: res.created_at)
        return [res for res in self._scopes.get(key, {}).values() if self.is_live(res)]

    def rename(self, res: Resource, name: str) -> None:
        """Give a resource a new name."""
        self._unindex(res)
        res.name = name
        self._index(res)

    def _index(self, res: Resource) -> None:
        key = (res.kind, res.workspace_id)
        self._scopes.setdefault(key, {})[res.id] = res
        self._names.setdefault(key, {}).setdefault(res.name, {})[res.id] = res

    def _unindex(self, res: Resource) -> None:
        key = (res.kind, res.workspace_id)
        self._scopes.get(key, {}).pop(res.id, None)
        same = self._names.get(key, {}).get(res.name)
        if same is not None:
            same.pop(res.id, None)
            if not same:
                del self._names[key][res.name]

    def _put(self, res: Resource) -> None:
        self.resources[res.id] = res
        self._index(res)

    def _drop(self, resource_id: str) -> None:
        self._unindex(self.resources.pop(resource_id))

    def touch(self, res: Resource) -> None:
        """Record an update made through the API."""
        res.update_time = self.wall_clock()
        self.save()

    def delete(self, res: Resource) -> None:
        """Start deleting (endpoints, instances) or remove at once (workspaces, models)."""
        if res.kind in STATEFUL:
            if res.deleted_at is None:
                res.deleted_at = self.clock()
                res.update_time = self.wall_clock()
        else:
            self._drop(res.id)
        self.save()

    def live_counts(self) -> dict[str, int]:
        """Per kind, how many resources are not DELETED."""
        counts = {kind: 0 for kind in KINDS}
        for res in self.resources.values():
            if self.is_live(res):
                counts[res.kind] += 1
        return counts

    def snapshot(self) -> dict[str, Any]:
        """The ``/_emulator/stats`` document."""
        return {"created": {kind: dict(names) for kind, names in self.stats.created.items()},
                "live": self.live_counts(), "requests": self.stats.requests,
                "operations": dict(self.stats.operations)}

    def reset(self) -> None:
        """Forget every resource and counter."""
        self.resources.clear()
        self._scopes.clear()
        self._names.clear()
        self.stats = Stats()
        self.save()

    # -- persistence -------------------------------------------------------------------

    def save(self) -> None:
        """Write the state file, if any; atomically, so a kill mid-write loses nothing."""
        path = self.config.state_file
        if not path:
            return
        # Monotonic clocks restart with the process, so persist ages as wall-clock epochs.
        offset = self.wall_clock().timestamp() - self.clock()
        # DELETED resources are invisible everywhere; forget them so the file stays small.
        for gone in [r.id for r in self.resources.values() if not self.is_live(r)]:
            self._drop(gone)
        rows = []
        for res in self.resources.values():
            row = asdict(res)
            row["created_at"] = res.created_at + offset
            row["deleted_at"] = None if res.deleted_at is None else res.deleted_at + offset
            row["create_time"] = res.create_time.isoformat()
            row["update_time"] = res.update_time.isoformat()
            rows.append(row)
        doc = {"resources": rows, "created": self.snapshot()["created"],
               "requests": self.stats.requests}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(doc, handle)
        os.replace(tmp, path)

    def _load(self, path: str) -> None:
        """Load a state file, or raise StateFileError saying why it cannot be one."""
        try:
            with open(path, encoding="utf-8") as handle:
                doc = json.load(handle)
            if not isinstance(doc, dict):
                raise TypeError(f"a JSON object was expected, not {type(doc).__name__}")
            self._load_doc(doc)
        except OSError as exc:
            raise StateFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # json.JSONDecodeError is a ValueError
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise StateFileError(f"{path}: not an emulator state file ({reason})") from None

    def _load_doc(self, doc: dict[str, Any]) -> None:
        offset = self.wall_clock().timestamp() - self.clock()
        for row in doc.get("resources", []):
            row["created_at"] -= offset
            if row["deleted_at"] is not None:
                row["deleted_at"] -= offset
            row["create_time"] = datetime.fromisoformat(row["create_time"])
            row["update_time"] = datetime.fromisoformat(row["update_time"])
            if row["failure"] is not None:
                row["failure"] = tuple(row["failure"])
            res = Resource(**row)
            self._put(res)
        for kind, names in doc.get("created", {}).items():
            self.stats.created.setdefault(kind, Counter()).update(names)
        self.stats.requests = doc.get("requests", 0)


# -- lists -------------------------------------------------------------------------------

def page_bounds(query: Mapping[str, str]) -> tuple[int, int]:
    """``offset`` ≥ 0 (default 0) and ``limit`` 1–100 (default 10); anything else is a 400."""
    offset = _int_param(query, "offset", 0)
    limit = _int_param(query, "limit", 10)
    if offset < 0:
        raise invalid(f"offset must be >= 0, got {offset}")
    if not 1 <= limit <= 100:
        raise invalid(f"limit must be between 1 and 100, got {limit}")
    return offset, limit


def _int_param(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise invalid(f"{name} must be an integer, got {raw!r}") from None


def paginate(items: Iterable[Any], query: Mapping[str, str]) -> tuple[int, list[Any]]:
    """``(total of all matches, the requested page)``."""
    offset, limit = page_bounds(query)
    everything = list(items)
    return len(everything), everything[offset:offset + limit]


def name_matches(res: Resource, query: Mapping[str, str]) -> bool:
    """Fuzzy ``name`` filter: case-sensitive substring containment."""
    wanted = query.get("name")
    return not wanted or wanted in res.name


def field_matches(value: Any, query: Mapping[str, str], key: str) -> bool:
    """Exact filter on one query key; an absent or empty key matches everything."""
    wanted = query.get(key)
    return not wanted or wanted == value
