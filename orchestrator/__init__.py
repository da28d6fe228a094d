"""fabricflow: DataArts Fabric inference services as durable, resumable jobs.

The Python API (see ``orchestrator.api``)::

    import orchestrator

    async with orchestrator.connect(db="jobs.db") as ff:   # Fabricflow: submit, run, wait, ...
        job = await ff.run("spec.yaml")

and, for code without an event loop, ``orchestrator.SyncFabricflow`` (``orchestrator.sync``).
Jobs, steps and events come back as the frozen snapshots of ``orchestrator.domain``; errors
are the tree of ``orchestrator.errors``, rooted at ``OrchestratorError``.

The names below are imported on first use, so that ``import orchestrator`` (and the
``fabricflow`` command, whose ``--help`` must be quick) loads nothing it does not need.
"""

TYPE_CHECKING = False  # not typing's: importing typing would cost the command line's start-up
if TYPE_CHECKING:
    from orchestrator.api import Cancellation, Fabricflow, JobRef, SpecSource, connect
    from orchestrator.domain import Event, Invocation, Job, Step
    from orchestrator.engine.runner import Observer
    from orchestrator.errors import (
        DatabaseError,
        FabricError,
        InvocationFailedError,
        JobFailedError,
        NeedsReconcileError,
        NotFoundError,
        OrchestratorError,
        ResourceFailedError,
        RetryableError,
        TerminalError,
        UserError,
    )
    from orchestrator.machine import JobKind, JobState, StepName, StepState
    from orchestrator.spec import JobSpec
    from orchestrator.sync import SyncFabricflow

    __version__: str

__all__ = [
    "Cancellation",
    "DatabaseError",
    "Event",
    "FabricError",
    "Fabricflow",
    "Invocation",
    "InvocationFailedError",
    "Job",
    "JobFailedError",
    "JobKind",
    "JobRef",
    "JobSpec",
    "JobState",
    "NeedsReconcileError",
    "NotFoundError",
    "Observer",
    "OrchestratorError",
    "ResourceFailedError",
    "RetryableError",
    "SpecSource",
    "Step",
    "StepName",
    "StepState",
    "SyncFabricflow",
    "TerminalError",
    "UserError",
    "__version__",
    "connect",
]

# Where each public name lives.
_HOMES = {
    "Cancellation": "orchestrator.api", "Fabricflow": "orchestrator.api", "JobRef": "orchestrator.api",
    "SpecSource": "orchestrator.api", "connect": "orchestrator.api",
    "Event": "orchestrator.domain", "Invocation": "orchestrator.domain", "Job": "orchestrator.domain",
    "Step": "orchestrator.domain",
    "Observer": "orchestrator.engine.runner",
    "DatabaseError": "orchestrator.errors", "FabricError": "orchestrator.errors",
    "InvocationFailedError": "orchestrator.errors", "JobFailedError": "orchestrator.errors",
    "NeedsReconcileError": "orchestrator.errors",
    "NotFoundError": "orchestrator.errors", "OrchestratorError": "orchestrator.errors",
    "ResourceFailedError": "orchestrator.errors", "RetryableError": "orchestrator.errors",
    "TerminalError": "orchestrator.errors", "UserError": "orchestrator.errors",
    "JobKind": "orchestrator.machine", "JobState": "orchestrator.machine", "StepName": "orchestrator.machine",
    "StepState": "orchestrator.machine",
    "JobSpec": "orchestrator.spec",
    "SyncFabricflow": "orchestrator.sync",
}


def __getattr__(name: str) -> object:
    """Import a public name from its module on first use."""
    if name == "__version__":
        from importlib.metadata import version

        return version("fabricflow")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next look-up is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
