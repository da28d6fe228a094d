"""The README's "Python API" section: its first Python block runs as it is and leaves a SUCCEEDED job."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def readme_block() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## Python API\n" in text, "README.md has no 'Python API' section"
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert found is not None, "the 'Python API' section has no ```python block"
    return found.group(1)


def test_the_first_python_block_runs_as_is_and_ends_with_a_succeeded_job(tmp_path: Path):
    script = tmp_path / "readme_example.py"
    script.write_text(readme_block(), encoding="utf-8")
    # As a user would run it: from a directory of their own, no fabricflow settings in the
    # environment, the default (embedded emulator) configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICFLOW_", "HUAWEICLOUD_SDK_", "PYTHON"))}
    env["HUAWEICLOUD_SDK_CREDENTIALS_FILE"] = str(tmp_path / "no-credentials")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=100)

    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        rows = conn.execute("SELECT id, state FROM jobs").fetchall()
        steps = conn.execute("SELECT name, state, resource_id FROM steps").fetchall()
    assert [state for _id, state in rows] == ["SUCCEEDED"]
    assert {state for _name, state, _rid in steps} == {"SUCCEEDED"}
    assert all(rid for name, _state, rid in steps if name in ("workspace", "endpoint", "model", "service_instance"))
    (job_id, _state), = rows
    # What it prints is its own: the job, then its events; no log line of fabricflow's in between.
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{job_id} SUCCEEDED Hello from the fabricflow emulator")
    assert lines[-1].startswith("job RUNNING -> SUCCEEDED")
    assert proc.stderr == ""
