"""What a list call shows: filters, pages, and the list faults (lagging lists, page churn).

Every list route builds its full, ordered listing of resources and hands it to ``page``,
which hides what is too new to be listed (``list_lag``), lets another user delete a
resource listed on an earlier page before a later page is served (``page_churn``), then
cuts the requested page.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from .deletes import refusal
from .errors import invalid
from .keys import FAULTS, STORE
from .resources import Resource, Store

MARKER = "[fabricflow:"
"""The start of fabricflow's ownership marker: page churn never deletes what carries it."""
log = logging.getLogger(__name__)


def page(request: web.Request, listing: list[Resource]) -> tuple[int, list[Resource]]:
    """``(total, the requested page)`` of a listing, in its order, after the list faults."""
    store, faults = request.app[STORE], request.app[FAULTS]
    offset, _ = page_bounds(request.query)
    lag = faults.seconds["list_lag"]
    if lag > 0:
        now = store.clock()
        listing = [res for res in listing if now - res.created_at >= lag]
    if offset > 0:
        gone = faults.take_churn(lambda: bystander(store, listing[:offset]))
        if gone is not None:
            log.info("page churn: deleting %s %s before offset %d", gone.kind, gone.id, offset)
            store.stats.churn_deleted += 1
            store.delete(gone, finished=True)
            listing = [res for res in listing if res is not gone]
    return paginate(listing, request.query)


def bystander(store: Store, earlier: list[Resource]) -> Resource | None:
    """The first resource another user could delete now: not fabricflow's (no marker), not
    already being deleted, and holding nothing that Fabric would refuse to delete it over."""
    return next((res for res in earlier
                 if MARKER not in res.fields.get("description", "") and store.is_active(res)
                 and refusal(store, res) is None), None)


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
    """``(total of all matches, the requested page)``; catalogues are paged with this alone."""
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
