"""Errors fabricflow raises, one tree.

::

    OrchestratorError
    ├── FabricError           what Fabric answered (or did not): status, code, request_id; exit 4
    │   ├── RetryableError    connect errors, 429/500/502/503/504, read timeouts on reads;
    │   │                     may carry ``retry_after`` (seconds, from Retry-After): exit 4
    │   ├── TerminalError     validation 4xx, auth rejected, schema errors in a response:
    │   │   │                 exit 2, 3 or 4 by what Fabric said (below)
    │   │   └── ResourceFailedError   a resource reached CREATE_FAILED / FAILED on Fabric
    │   └── NeedsReconcileError   outcome unknown: a create was sent but no answer came back: exit 4
    ├── UserError             bad input (a spec, a setting, a job ID), from the command line or
    │   │                     the Python API: exit 2
    │   ├── NotFoundError     a job ID that matches nothing, a missing database: exit 3
    │   └── DatabaseError     the database failed an operation (locked, read-only, disk full): exit 2
    ├── JobFailedError        a job the caller asked about did not succeed (``check=True``): exit 1
    └── InvocationFailedError an invocation Fabric did not complete (``check=True``): its
                              FabricError's exit code

The command line prints any of these as one line and exits with its ``exit_code`` (2 if it has
none); the Python API (``orchestrator.api``) raises them as they are, with the same messages.
Only ``fabric.classify.classify`` maps HTTP statuses and aiohttp exceptions into this tree.
Bugs (``StaleTransition``, ``IllegalTransition``) live outside it and crash loudly.

Exit codes of a FabricError, which reaches the command line only from a command's own request
(``plan``'s look-ups, ``orphans``, ``invoke``, the check of a spec's reused IDs; inside a job it
fails the job instead, exit 1): 4 (``EXIT_FABRIC``) when Fabric could not be reached or failed
to answer, so that trying again later may help (a transport error, a timeout, a 5xx, a 429, an
unknown outcome, an answer that is not what the API documents); 2 when Fabric refused what the
user gave it (a 4xx: a field or value it rejects, a name already taken, a resource in the wrong
state, credentials it does not accept, 401/403, which only the user can fix), and fabricflow's
own refusals of a spec (``fabricflow.invalid_spec``, ``fabricflow.conflict``); 3 when it answered
404, that what the command named does not exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.domain import Invocation, Job


#: The exit code of a command whose own request Fabric could not answer (see the module's docstring).
EXIT_FABRIC = 4
#: Codes of TerminalErrors that are fabricflow's own refusals of a spec, the user's to fix (exit 2).
SPEC_REFUSALS = frozenset({"fabricflow.invalid_spec", "fabricflow.conflict"})


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

    @property
    def exit_code(self) -> int:
        """4: Fabric could not be reached or did not answer as it should (TerminalError refines it)."""
        return EXIT_FABRIC


class RetryableError(FabricError):
    """Transient: nothing is known to have changed; try again after a backoff."""


class TerminalError(FabricError):
    """Trying again cannot help; the step and the job fail."""

    @property
    def exit_code(self) -> int:
        """3 for a 404, 2 for any other 4xx or a refused spec (the user's to fix), else 4."""
        if self.status == 404:
            return 3
        if self.status is not None and 400 <= self.status < 500:
            return 2
        if self.status is None and self.code in SPEC_REFUSALS:
            return 2
        return EXIT_FABRIC  # a 5xx classify leaves terminal (501, 505), or a response off the API


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


class InvocationFailedError(OrchestratorError):
    """Fabric did not complete an invocation; ``invocation`` is the stored record (with its
    ``error``), ``error`` the FabricError. Raised only where the caller asked for it
    (``check=True``); its exit code is the error's (see the module's docstring)."""

    def __init__(self, invocation: Invocation, error: FabricError) -> None:
        super().__init__(error.message)
        self.invocation = invocation
        self.error = error

    @property
    def exit_code(self) -> int:
        """The FabricError's exit code: 4 for Fabric unreachable or failing, 2 or 3 for a refusal."""
        return self.error.exit_code


class StaleTransition(RuntimeError):
    """A compare-and-set found the row in another state than expected: another owner moved it."""
