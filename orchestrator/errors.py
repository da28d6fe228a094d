"""Errors fabricflow raises, one tree.

::

    OrchestratorError
    ├── FabricError           what Fabric answered (or did not): status, code, request_id
    │   ├── RetryableError    connect errors, 429/500/502/503/504, read timeouts on reads;
    │   │                     may carry ``retry_after`` (seconds, from Retry-After)
    │   ├── TerminalError     validation 4xx, auth rejected, schema errors in a response
    │   │   └── ResourceFailedError   a resource reached CREATE_FAILED / FAILED on Fabric
    │   └── NeedsReconcileError   outcome unknown: a create was sent but no answer came back
    ├── UserError             bad input (a spec, a setting, a job ID), from the command line or
    │   │                     the Python API: exit 2
    │   ├── NotFoundError     a job ID that matches nothing, a missing database: exit 3
    │   └── DatabaseError     the database failed an operation (locked, read-only, disk full): exit 2
    └── JobFailedError        a job the caller asked about did not succeed (``check=True``): exit 1

The command line prints any of these as one line and exits with its ``exit_code`` (2 if it has
none); the Python API (``orchestrator.api``) raises them as they are, with the same messages.
Only ``fabric.classify.classify`` maps HTTP statuses and aiohttp exceptions into this tree.
Bugs (``StaleTransition``, ``IllegalTransition``) live outside it and crash loudly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.domain import Job


class OrchestratorError(Exception):
    """Base of every error fabricflow expects and handles."""


class FabricError(OrchestratorError):
    """An error talking to Fabric; carries what Fabric said, never request headers."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after

    def as_dict(self) -> dict[str, str | None]:
        """The ``{code, message, request_id}`` triple stored on steps and jobs."""
        return {"code": self.code, "message": self.message, "request_id": self.request_id}


class RetryableError(FabricError):
    """Transient: nothing is known to have changed; try again after a backoff."""


class TerminalError(FabricError):
    """Trying again cannot help; the step and the job fail."""


class ResourceFailedError(TerminalError):
    """A resource reached a failed state on Fabric (CREATE_FAILED, FAILED, ...)."""

    def __init__(self, message: str, *, resource_status: str | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.resource_status = resource_status


class NeedsReconcileError(FabricError):
    """A create may or may not have happened; look the resource up before resending."""


class UserError(OrchestratorError):
    """Bad input from the user: the message says what and where. Exit code 2."""

    exit_code = 2


class NotFoundError(UserError):
    """The thing the user named does not exist. Exit code 3."""

    exit_code = 3


class DatabaseError(UserError):
    """The database refused or failed an operation: locked, read-only, full, not a database.

    The message names the database (its file, or its URL without the password). Exit code 2.
    """


class JobFailedError(OrchestratorError):
    """A job ended in another state than SUCCEEDED; ``job`` is its final snapshot. Exit code 1.

    Raised only where the caller asked for it (``check=True`` in the Python API); otherwise a
    failed job is returned like any other, with its ``error``.
    """

    exit_code = 1

    def __init__(self, job: Job) -> None:
        error = f": {job.error['message']}" if job.error else ""
        super().__init__(f"job {job.id[:8]} ({job.name}) {job.state}{error}")
        self.job = job


class StaleTransition(RuntimeError):
    """A compare-and-set found the row in another state than expected: another owner moved it."""
