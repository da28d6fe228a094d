"""The read commands start quickly: list, show and events resolve ``db`` without Settings
(tests/unit/test_quick_settings.py compares the two paths), and import no pydantic at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import QUICKSTART
from tests.integration.test_first_use import PROBE, _loaded


def test_list_show_and_events_import_neither_pydantic_nor_the_settings_class(tmp_path):
    # A user's environment: no FABRICFLOW_* tuning (each variable but a few sends Settings).
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("FABRICFLOW_", "HUAWEICLOUD_SDK_"))}
    env.update(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "xdg"),
               HUAWEICLOUD_SDK_CREDENTIALS_FILE=str(tmp_path / "none"))

    def fabricflow(*args: str, probe: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, "-m", "orchestrator", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)

    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    job_id = fabricflow("submit", str(QUICKSTART), "--db", db).stdout.strip()
    for args in (["list", "--db", db], ["show", job_id[:8], "--db", db], ["events", job_id, "--db", db]):
        report = json.loads(fabricflow(*args, probe=True).stderr.strip().splitlines()[-1])
        assert report["code"] in (0, None), args
        assert _loaded(report["modules"], ("pydantic", "pydantic_settings", "orchestrator.config")) == [], args
    # Whatever the quick path is not sure of goes through Settings, and so does its error.
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nconcurrency = 0\n")
    result = fabricflow("list", "--db", db, "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr == f"error: {bad}: daemon.concurrency: Input should be greater than or equal to 1\n"
    assert fabricflow("list", "--db", db, "--config", str(tmp_path / "nope.toml")).stderr == \
        f"error: {tmp_path / 'nope.toml'}: no such config file\n"
