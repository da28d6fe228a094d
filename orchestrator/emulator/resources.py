"""In-memory state of the emulator: resources, their computed status, late creates, counters.

Status is never stored: it is computed from the monotonic time of the create/delete and the
configured delays, so a poll sees CREATING → RUNNING without any background task, and a
paused or slow test cannot miss a transition. Late creates work the same way: each access
first carries out those whose time has come (``settle``).
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from . import statefile
from .config import EmulatorConfig
from .records import KINDS, STATEFUL, Late, Resource, Stats, iso, new_id

__all__ = ["KINDS", "STATEFUL", "Resource", "Store", "iso"]


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
        self._late: list[Late] = []  # by due time
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

    def _new(self, kind: str, name: str, workspace_id: str | None, fields: dict[str, Any],
             failure: tuple[str, str] | None) -> Resource:
        now = self.wall_clock()
        return Resource(kind=kind, id=new_id(kind), name=name, workspace_id=workspace_id,
                        fields=fields, created_at=self.clock(), create_time=now,
                        update_time=now, failure=failure)

    def add(self, kind: str, name: str, workspace_id: str | None, fields: dict[str, Any],
            *, failure: tuple[str, str] | None = None) -> Resource:
        """Create a resource and count it in the stats."""
        self.settle()  # a late create that is due comes first, in creation order
        res = self._new(kind, name, workspace_id, fields, failure)
        self._put(res)
        self.stats.created[kind][name] += 1
        self.save()
        return res

    def add_later(self, kind: str, name: str, workspace_id: str | None, fields: dict[str, Any],
                  *, after: float, failure: tuple[str, str] | None = None) -> Resource:
        """Accept a create that is carried out ``after`` seconds from now; until then it is
        invisible and uncounted. Returns the resource as it will be (for the dropped answer)."""
        self.settle()
        res = self._new(kind, name, workspace_id, fields, failure)
        now = self.clock()
        bisect.insort(self._late, Late(now, now + after, res), key=lambda late: late.due)
        self.save()
        return res

    def reschedule_late(self, after: float) -> None:
        """A new ``late_by``: every pending late create is now due ``after`` seconds after its
        request (at once, if that moment has passed)."""
        self.settle()
        now = self.clock()
        for late in self._late:
            late.due = max(late.requested_at + after, now)
        self._late.sort(key=lambda late: late.due)
        self.save()

    def settle(self) -> None:
        """Carry out the late creates whose time has come, each as its request asked, unless
        Fabric would refuse it by then (its name taken, its workspace, model or endpoint gone)."""
        if not self._late or self._late[0].due > self.clock():
            return
        now, wall = self.clock(), self.wall_clock()
        while self._late and self._late[0].due <= now:
            late = self._late.pop(0)
            res = late.res
            if self._refuses(res):
                continue
            res.created_at = late.due
            res.create_time = res.update_time = wall - timedelta(seconds=now - late.due)
            for version in res.fields.get("versions", []):  # a model's
                version["create_time"] = iso(res.create_time)
            self._put(res)
            self.stats.created[res.kind][res.name] += 1
            self.stats.late_created += 1
        self.save()

    def _refuses(self, res: Resource) -> bool:
        """Whether the create of ``res`` would fail now (checked when a late one is due)."""
        if res.workspace_id is not None and self._get("workspace", res.workspace_id) is None:
            return True
        if res.kind in ("workspace", "model"):
            same = self._names.get((res.kind, res.workspace_id), {}).get(res.name, {})
            return any(self.is_live(other) for other in same.values())
        if res.kind == "service_instance":
            model = self._get("model", res.fields["source"]["id"], res.workspace_id)
            endpoint = self._get("endpoint", res.fields["endpoint_id"], res.workspace_id)
            return model is None or endpoint is None or self.status(endpoint) != "RUNNING"
        return False

    def get(self, kind: str, resource_id: str, workspace_id: str | None = None
            ) -> Resource | None:
        """A live resource of that kind (in that workspace), or None."""
        self.settle()
        return self._get(kind, resource_id, workspace_id)

    def _get(self, kind: str, resource_id: str, workspace_id: str | None = None
             ) -> Resource | None:
        res = self.resources.get(resource_id)
        if res is None or res.kind != kind or not self.is_live(res):
            return None
        if workspace_id is not None and res.workspace_id != workspace_id:
            return None
        return res

    def items(self, kind: str, workspace_id: str | None = None, *, name: str | None = None) -> list[Resource]:
        """Live resources of a kind, oldest first; ``name``: only those whose name contains it."""
        self.settle()
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

    def delete(self, res: Resource, *, finished: bool = False) -> None:
        """Start deleting (endpoints, instances) or remove at once (workspaces, models);
        ``finished``: a delete whose DELETING phase is already over, so it is gone at once."""
        if res.kind in STATEFUL and not finished:
            if res.deleted_at is None:
                res.deleted_at = self.clock()
                res.update_time = self.wall_clock()
        else:
            self._drop(res.id)
        self.save()

    def live_counts(self) -> dict[str, int]:
        """Per kind, how many resources are not DELETED."""
        self.settle()
        counts = {kind: 0 for kind in KINDS}
        for res in self.resources.values():
            if self.is_live(res):
                counts[res.kind] += 1
        return counts

    def snapshot(self) -> dict[str, Any]:
        """The ``/_emulator/stats`` document."""
        return {"created": {kind: dict(names) for kind, names in self.stats.created.items()},
                "live": self.live_counts(), "requests": self.stats.requests,
                "operations": dict(self.stats.operations),
                "late_created": self.stats.late_created, "late_pending": len(self._late),
                "churn_deleted": self.stats.churn_deleted}

    def reset(self) -> None:
        """Forget every resource and counter."""
        self.resources.clear()
        self._scopes.clear()
        self._names.clear()
        self._late.clear()
        self.stats = Stats()
        self.save()

    # -- persistence -------------------------------------------------------------------

    def save(self) -> None:
        """Write the state file, if any (see ``statefile``)."""
        path = self.config.state_file
        if not path:
            return
        # DELETED resources are invisible everywhere; forget them so the file stays small.
        for gone in [r.id for r in self.resources.values() if not self.is_live(r)]:
            self._drop(gone)
        statefile.write(path, list(self.resources.values()), self._late, self.stats,
                        self._offset())

    def _load(self, path: str) -> None:
        """Load a state file, or raise StateFileError saying why it cannot be one."""
        resources, late, self.stats = statefile.read(path, self._offset())
        for res in resources:
            self._put(res)
        self._late = sorted(late, key=lambda item: item.due)

    def _offset(self) -> float:
        """Wall-clock epoch minus monotonic time: how the state file stores monotonic times."""
        return self.wall_clock().timestamp() - self.clock()
