"""Specs as callers give them (files, mappings, models) turned into validated specs with job IDs.

Shared by everything that submits: the Python API's ``submit``, ``submit_many`` and ``run``.
Every spec is read and validated, ``{index}`` and ``{job}`` replaced, before anything is written.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

__all__ = ["MAX_JOBS", "Prepared", "SpecSource", "specs_for"]

SpecSource: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any] | JobSpec"
"""A job spec: the path of a YAML or JSON file, its parsed data (a mapping), or a ``JobSpec``."""

@dataclass(frozen=True, slots=True)
class Prepared:
    """Specs already read and validated for new jobs: the jobs' IDs and one spec for each, in order.

    For a caller that validates before it opens a database (the command line: a bad spec must
    not create one), then submits: ``submit_many`` and ``run`` take it as it is. Each spec's
    ``{job}`` must already be its ID's first 8 digits (``spec.parse_copies`` does that).
    """

    job_ids: list[str]
    """The new jobs' IDs (uuid4().hex), one per spec."""
    specs: list[JobSpec]
    """The validated specs, one per job."""

    def __post_init__(self) -> None:
        if len(self.job_ids) != len(self.specs):
            raise ValueError(f"{len(self.job_ids)} job IDs but {len(self.specs)} specs")


#: The most jobs one submission creates: its one transaction stays short, its specs fit in memory.
MAX_JOBS = 100_000


def specs_for(sources: list[SpecSource], *, count: int) -> tuple[list[str], list[JobSpec]]:
    """New job IDs and ``count`` validated copies of each spec for them, ``{index}`` numbering the
    copies across the specs and ``{job}`` naming each after its job. One UserError naming every
    bad spec (or the first bad copy of one); nothing is written before this returns."""
    from orchestrator.spec import parse_copies

    if count < 1:
        raise UserError(f"count must be at least 1, got {count}")
    if count * len(sources) > MAX_JOBS:
        raise UserError(f"{len(sources)} specs x count {count} is {count * len(sources)} jobs, more than one "
                        f"submit takes ({MAX_JOBS}); submit them in several calls")
    job_ids = [uuid.uuid4().hex for _ in range(count * len(sources))]
    specs: list[JobSpec] = []
    problems: list[str] = []
    for n, source in enumerate(sources):
        label = "spec" if len(sources) == 1 else f"specs[{n}]"
        try:
            data, label = _spec_data(source, label)
            _check_names_differ(data, label, count)
            specs += parse_copies(data, range(n * count, (n + 1) * count), label, job_ids[n * count:(n + 1) * count])
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("\n".join(problems))
    return job_ids, specs


def _spec_data(source: SpecSource, label: str) -> tuple[Any, str]:
    """A spec's plain data, and the name its messages give it (a file's path)."""
    from orchestrator.spec import JobSpec, read_spec_data

    if isinstance(source, str | os.PathLike):
        return read_spec_data(Path(source)), str(source)
    if isinstance(source, JobSpec):
        return source.model_dump(mode="json"), label
    if isinstance(source, Mapping):
        return dict(source), label
    raise TypeError(f"a spec is a file path, a mapping or a JobSpec, not {type(source).__name__}")


def _check_names_differ(data: Any, label: str, count: int) -> None:
    """Refuse copies of a spec that would all create resources of the same names."""
    from orchestrator.spec import is_templated, resource_names

    names = resource_names(data)
    if count > 1 and names and not any(is_templated(name) for name in names.values()):
        raise UserError(f"{label}: {count} copies would all have the same resource names "
                        f"({', '.join(names)}), so the jobs would collide; put {{index}} or {{job}} in at "
                        'least one, e.g. name: "ws-{index}"')
