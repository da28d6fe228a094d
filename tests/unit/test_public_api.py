"""The top-level package: an explicit ``__all__``, every public name documented, a cheap import."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import orchestrator
from orchestrator.api import Fabricflow
from orchestrator.sync import SyncFabricflow

# Type aliases are strings at run time; their documentation is in orchestrator/api.py.
ALIASES = {"JobRef", "SpecSource"}


def test_every_public_name_resolves_and_is_documented():
    assert len(orchestrator.__all__) == len(set(orchestrator.__all__))
    for name in orchestrator.__all__:
        value = getattr(orchestrator, name)
        if name in ALIASES or name == "__version__":
            assert isinstance(value, str) and value
            continue
        assert inspect.getdoc(value), f"orchestrator.{name} has no docstring"
    for cls in (Fabricflow, SyncFabricflow, orchestrator.Cancellation):
        for member, raw in vars(cls).items():
            value = getattr(cls, member)
            if not member.startswith("_") and (callable(value) or isinstance(raw, property)):
                assert inspect.getdoc(value), f"{cls.__name__}.{member} has no docstring"
    assert set(orchestrator.__all__) <= set(dir(orchestrator))


def test_the_sync_wrapper_has_every_method_of_the_api():
    public = {name for name in vars(Fabricflow) if not name.startswith("_")}
    assert public - {name for name in vars(SyncFabricflow) if not name.startswith("_")} == set()


def test_an_unknown_name_is_an_attribute_error():
    try:
        orchestrator.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "no attribute 'NoSuchThing'" in str(exc)
    else:
        raise AssertionError("orchestrator.NoSuchThing resolved")


def test_importing_the_package_loads_nothing_heavy():
    """`import orchestrator` (which the command line's entry point does) loads no part of the API."""
    probe = ("import json, sys, orchestrator; print(json.dumps(sorted(m for m in sys.modules if m.startswith("
             "('orchestrator', 'sqlalchemy', 'aiohttp', 'pydantic', 'structlog', 'typing')))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                       check=True).stdout)
    assert loaded == ["orchestrator"]
