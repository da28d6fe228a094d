"""Fault injection: the seeded decisions to fail, slow, drop, cut, create late or churn.

Every random decision draws from one ``random.Random(seed)`` in request order, so two runs
with the same seed and the same request sequence fail, drop and cut the same requests.
Scripted faults (``fail_next``, ``drop_next``, ``cut_next``, ``late_next``, ``churn_next``)
take precedence and draw nothing. The late-create and page-churn decisions draw nothing
while their rate is 0, so with them off a seed gives the faults it gave before they existed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

from .config import EmulatorConfig
from .errors import invalid

TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
RATES = ("fail_rate", "drop_rate", "slow_rate", "cut_rate", "late_create", "page_churn")
SECONDS = ("late_by", "list_lag")
COUNTS = ("fail_next", "drop_next", "cut_next", "cut_after", "late_next", "churn_next")
T = TypeVar("T")


class Faults:
    """Mutable fault state of one emulator; starts from the config, reset restores it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Back to the configured rates, a freshly seeded RNG and no scripted faults."""
        self.rng = random.Random(self.config.seed)
        self.rates = {name: float(getattr(self.config, name)) for name in RATES}
        self.seconds = {name: float(getattr(self.config, name)) for name in SECONDS}
        self.fail_next = 0
        self.fail_status = 503
        self.drop_next = 0
        self.cut_next = 0
        self.cut_after = 1
        self.late_next = 0
        self.churn_next = 0

    def take_failure(self) -> int | None:
        """The status to fail this request with, or None to let it through."""
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.fail_status
        if self.rng.random() < self.rates["fail_rate"]:
            return self.rng.choice(TRANSIENT_STATUSES)
        return None

    def take_slow(self) -> bool:
        """Whether to delay this request by ``slow_seconds``."""
        return self.rng.random() < self.rates["slow_rate"]

    def take_drop(self) -> bool:
        """Whether to close the connection instead of answering this successful create."""
        if self.drop_next > 0:
            self.drop_next -= 1
            return True
        return self.rng.random() < self.rates["drop_rate"]

    def take_late(self) -> bool:
        """Whether to carry out this create ``late_by`` seconds from now and drop its answer."""
        if self.late_next > 0:
            self.late_next -= 1
            return True
        rate = self.rates["late_create"]
        return rate > 0 and self.rng.random() < rate

    def take_churn(self, bystander: Callable[[], T | None]) -> T | None:
        """The resource another user deletes before this later page is served, or None.

        ``bystander()`` finds the one that would go (or None). A scripted ``churn_next`` is
        spent only on a page where there is one to delete; otherwise one draw decides (while
        ``page_churn`` > 0), and nothing more is drawn.
        """
        if self.churn_next > 0:
            found = bystander()
            if found is not None:
                self.churn_next -= 1
            return found
        rate = self.rates["page_churn"]
        if rate > 0 and self.rng.random() < rate:
            return bystander()
        return None

    def take_cut(self, chunks: int) -> int | None:
        """How many chunks of a ``chunks``-long stream to send before cutting, or None."""
        if self.cut_next > 0:
            self.cut_next -= 1
            return max(0, min(self.cut_after, chunks - 1))
        if self.rng.random() < self.rates["cut_rate"]:
            return self.rng.randint(1, max(1, chunks - 1))
        return None

    def update(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Apply a ``POST /_emulator/faults`` document; returns the resulting knobs.

        Every value is checked before any is applied, so a 400 changes nothing.
        """
        unknown = set(doc) - set(RATES) - set(SECONDS) - set(COUNTS) - {"status"}
        if unknown:
            raise invalid(f"Unknown fault settings: {', '.join(sorted(unknown))}")
        for name, value in doc.items():
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if name in RATES and not (number and 0 <= value <= 1):
                raise invalid(f"{name} must be a number between 0 and 1")
            if name in SECONDS and not (number and 0 <= value < float("inf")):
                raise invalid(f"{name} must be a number of seconds >= 0")
            if name in COUNTS and not (number and isinstance(value, int) and value >= 0):
                raise invalid(f"{name} must be a non-negative integer")
            if name == "status" and not (number and isinstance(value, int)
                                         and 400 <= value <= 599):
                raise invalid("status must be an HTTP error status (400-599)")
        for name, value in doc.items():
            if name in RATES:
                self.rates[name] = float(value)
            elif name in SECONDS:
                self.seconds[name] = float(value)
            elif name == "status":
                self.fail_status = value
            else:
                setattr(self, name, value)
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """The current knobs, as ``/_emulator/faults`` reports them."""
        return {**self.rates, **self.seconds, "fail_next": self.fail_next,
                "status": self.fail_status, "drop_next": self.drop_next,
                "cut_next": self.cut_next, "cut_after": self.cut_after,
                "late_next": self.late_next, "churn_next": self.churn_next}
