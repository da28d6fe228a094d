"""Errors fabricflow raises, one tree.

::

    OrchestratorError
    ├── RetryableError        connect errors, 429/500/502/503/504, read timeouts on reads;
    │                         may carry ``retry_after`` (seconds, from Retry-After)
    ├── TerminalError         validation 4xx, auth rejected, schema errors in a response
    │   └── ResourceFailedError   a resource reached CREATE_FAILED / FAILED on Fabric
    ├── NeedsReconcileError   outcome unknown: a create was sent but no answer came back
    └── UserError             bad input from the command line (spec, config, job id): exit 2
        └── NotFoundError     a job id that matches nothing: exit 3

Only ``fabric.classify.classify`` maps HTTP statuses and aiohttp exceptions into this tree.
Bugs (``StaleTransition``, ``IllegalTransition``) live outside it and crash loudly.
"""

from __future__ import annotations


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


class StaleTransition(RuntimeError):
    """A compare-and-set found the row in another state than expected: another owner moved it."""
