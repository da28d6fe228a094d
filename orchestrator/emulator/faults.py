"""Fault injection: the seeded decisions to fail, slow, drop or cut, and runtime knobs.

Every random decision draws from one ``random.Random(seed)`` in request order, so two runs
with the same seed and the same request sequence fail, drop and cut the same requests.
Scripted faults (``fail_next``, ``drop_next``, ``cut_next``) take precedence and draw nothing.
"""

from __future__ import annotations

import random
from typing import Any

from .config import EmulatorConfig
from .errors import invalid

TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
RATES = ("fail_rate", "drop_rate", "slow_rate", "cut_rate")


class Faults:
    """Mutable fault state of one emulator; starts from the config, reset restores it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Back to the configured rates, a freshly seeded RNG and no scripted faults."""
        self.rng = random.Random(self.config.seed)
        self.rates = {name: float(getattr(self.config, name)) for name in RATES}
        self.fail_next = 0
        self.fail_status = 503
        self.drop_next = 0
        self.cut_next = 0
        self.cut_after = 1

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

    def take_cut(self, chunks: int) -> int | None:
        """How many chunks of a ``chunks``-long stream to send before cutting, or None."""
        if self.cut_next > 0:
            self.cut_next -= 1
            return max(0, min(self.cut_after, chunks - 1))
        if self.rng.random() < self.rates["cut_rate"]:
            return self.rng.randint(1, max(1, chunks - 1))
        return None

    def update(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Apply a ``POST /_emulator/faults`` document; returns the resulting knobs."""
        unknown = set(doc) - set(RATES) - {"fail_next", "drop_next", "cut_next", "cut_after",
                                           "status"}
        if unknown:
            raise invalid(f"Unknown fault settings: {', '.join(sorted(unknown))}")
        for name in RATES:
            if name in doc:
                value = doc[name]
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not 0 <= value <= 1:
                    raise invalid(f"{name} must be a number between 0 and 1")
                self.rates[name] = float(value)
        for name in ("fail_next", "drop_next", "cut_next", "cut_after"):
            if name in doc:
                value = doc[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise invalid(f"{name} must be a non-negative integer")
                setattr(self, name, value)
        if "status" in doc:
            status = doc["status"]
            if isinstance(status, bool) or not isinstance(status, int) \
                    or not 400 <= status <= 599:
                raise invalid("status must be an HTTP error status (400-599)")
            self.fail_status = status
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """The current knobs, as ``/_emulator/faults`` reports them."""
        return {**self.rates, "fail_next": self.fail_next, "status": self.fail_status,
                "drop_next": self.drop_next, "cut_next": self.cut_next,
                "cut_after": self.cut_after}
