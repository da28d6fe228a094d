"""A command's own Fabric calls, retried as the engine retries a step.

A job's step that meets a transient error (RetryableError) is tried again up to
``retry.max_attempts`` times (8), each after ``machine.backoff`` (capped exponential, with
jitter) or the server's Retry-After if that is longer (``machine.decide``). Commands that call
Fabric themselves (``plan``'s look-ups, ``orphans`` and its deletes) have no state table to come
back to, so they wait within the call, through stamina as the client's in-call read retries do
(its ``stamina.retry_scheduled`` log lines, its testing mode), with the same backoff and at most
COMMAND_ATTEMPTS calls.
Each attempt is one client call, whose reads keep their own in-call retries, as in a step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import stamina

from orchestrator.errors import RetryableError
from orchestrator.machine import MAX_RETRY_AFTER, backoff

if TYPE_CHECKING:
    from orchestrator.config import Settings

T = TypeVar("T")

#: The most calls a command makes of one request (a job's step makes ``retry.max_attempts``, 8).
COMMAND_ATTEMPTS = 4


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a call is tried: the engine's ``retry`` settings."""

    attempts: int = 8
    backoff_base: float = 1.0
    backoff_cap: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy of the engine's steps (``retry.max_attempts``, ``backoff_base``, ``backoff_cap``),
        but at most COMMAND_ATTEMPTS calls: somebody waits at the terminal, and a Fabric that is down
        should be told in seconds (about 10 with the defaults), not after a job's two minutes."""
        retry = settings.retry
        return cls(attempts=min(retry.max_attempts, COMMAND_ATTEMPTS), backoff_base=retry.backoff_base,
                   backoff_cap=retry.backoff_cap)


async def persist(call: Callable[[], Awaitable[T]], policy: RetryPolicy | None) -> T:
    """``await call()``, made again after each RetryableError until ``policy.attempts`` calls have
    failed; then that error is raised, saying so (``gave up after N attempts: ...``, as a step
    says). Any other error is raised at once. Without a policy, one call."""
    if policy is None or policy.attempts <= 1:
        return await call()
    failures = 0

    def wait(exc: Exception) -> bool | float:
        nonlocal failures
        if not isinstance(exc, RetryableError):
            return False
        failures += 1
        return delay_after(exc, failures, policy)

    try:
        async for attempt in stamina.retry_context(on=wait, attempts=policy.attempts, timeout=None):
            with attempt:
                return await call()
    except RetryableError as exc:
        raise RetryableError(f"gave up after {failures} attempts: {exc.message}", status=exc.status,
                             code=exc.code, request_id=exc.request_id, retry_after=exc.retry_after) from exc
    raise AssertionError("unreachable: stamina returns or raises")  # pragma: no cover


def delay_after(exc: RetryableError, failures: int, policy: RetryPolicy) -> float:
    """Seconds to wait after the ``failures``-th failed call: the engine's backoff, or the
    server's Retry-After when that is longer (at most ``machine.MAX_RETRY_AFTER``)."""
    delay = backoff(failures, base=policy.backoff_base, cap=policy.backoff_cap)
    if exc.retry_after is not None:
        # As the engine: honour the server's Retry-After, but never wait for hours on one header.
        delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER))
    return delay
