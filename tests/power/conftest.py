"""The power-cut harness: the LD_PRELOAD shim, compiled once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.power.powercut import build_shim


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shim.so`` built from shim.c; skipped without gcc, except under CI, where that fails."""
    if shutil.which("gcc") is None:
        reason = "gcc is not installed: the power-cut tests compile an LD_PRELOAD shim (apt-get install gcc)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return build_shim(tmp_path_factory.mktemp("powercut-shim"))
