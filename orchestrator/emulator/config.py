"""Settings of the local Fabric API emulator (timings, fault injection, authentication)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

AuthMode = Literal["none", "token", "aksk"]


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything that shapes one emulator run; frozen so a running app never drifts.

    Fault rates can still be changed at runtime through ``POST /_emulator/faults``; those
    changes live in the app's fault state, not here.
    """

    ready_after: float = 2.0
    """Seconds an endpoint stays CREATING before RUNNING (or CREATE_FAILED)."""
    instance_ready_after: float = 1.0
    """Seconds a service instance stays CREATING before RUNNING."""
    delete_after: float = 0.5
    """Seconds an endpoint or service instance stays DELETING before DELETED."""
    fail_rate: float = 0.0
    """Share of API requests answered with a transient 429/500/502/503/504, doing nothing."""
    drop_rate: float = 0.0
    """Share of create requests whose resource is created but whose connection is closed."""
    instance_fail: str | None = None
    """Regex; service instances whose name matches (re.search) end in FAILED."""
    create_fail: str | None = None
    """Regex; endpoints whose name matches (re.search) end in CREATE_FAILED."""
    seed: int | None = None
    """Seed of the single RNG behind every fault decision."""
    auth: AuthMode = "none"
    """``none``, ``token`` (X-Auth-Token must equal ``token``) or ``aksk`` (SDK-HMAC-SHA256)."""
    token: str | None = None
    ak: str | None = None
    sk: str | None = None
    max_clock_skew: float = 900
    """Allowed difference between X-Sdk-Date and the server clock; 0 turns the check off."""
    stream_chunk_delay: float = 0.01
    """Pause between two SSE chunks of a streamed invocation."""
    slow_rate: float = 0.0
    """Share of API requests delayed by ``slow_seconds`` before they are handled."""
    slow_seconds: float = 2.0
    cut_rate: float = 0.0
    """Share of streamed invocations cut mid-way (connection closed, no ``[DONE]``)."""
    state_file: str | None = None
    """JSON file the resources are saved to after each change and loaded from at start."""
    cold_start: float = 0.0
    """Seconds the first invocation of a service instance waits before its first chunk when
    the instance's endpoint reserves ``min: 0`` MU (scaled to zero, so it must start first)."""
    late_create: float = 0.0
    """Share of create requests carried out after the client gave up: the connection is closed
    with no answer, and the resource is created only ``late_by`` seconds later."""
    late_by: float = 3.0
    """Seconds after its (dropped) request that a late create is carried out."""
    list_lag: float = 0.0
    """Seconds a new resource stays missing from list responses (GET by ID finds it at once)."""
    page_churn: float = 0.0
    """Share of list pages with ``offset > 0`` before which another user's resource listed on
    an earlier page is deleted, so the later items shift left under the client's feet."""

    def __post_init__(self) -> None:
        for name in ("fail_rate", "drop_rate", "slow_rate", "cut_rate", "late_create",
                     "page_churn"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in ("cold_start", "late_by", "list_lag"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.auth not in ("none", "token", "aksk"):
            raise ValueError(f"auth must be none, token or aksk, got {self.auth!r}")
        if self.auth == "token" and not self.token:
            raise ValueError("auth='token' needs a token")
        if self.auth == "aksk" and not (self.ak and self.sk):
            raise ValueError("auth='aksk' needs ak and sk")
        for name in ("create_fail", "instance_fail"):
            if (pattern := getattr(self, name)) is not None:
                try:
                    re.compile(pattern)  # a bad pattern should fail at start, not per request
                except re.error as exc:
                    raise ValueError(f"{name}: {pattern!r} is not a regular expression: {exc}") from None
