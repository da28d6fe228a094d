"""The Python API type-checks under ``mypy --strict``, and so does code that uses it.

Skipped, saying so, when mypy is not installed (the test extra installs it).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = ["orchestrator/__init__.py", "orchestrator/api.py", "orchestrator/submission.py", "orchestrator/sync.py"]

USER = '''
import asyncio
import threading

import orchestrator
from orchestrator import Event, Invocation, Job, JobState, SyncFabricflow


async def provision(spec_path: str) -> Job:
    async with orchestrator.connect(db="jobs.db", poll={"initial": 0.5}) as ff:
        job: Job = await ff.run(spec_path, check=True)
        ids: list[str] = await ff.submit_many([spec_path, {"name": "x"}], count=2)
        events: list[Event] = [e async for e in ff.events(job, follow=True)]
        again: Invocation = await ff.invoke(job.id[:8], "hello", max_tokens=10, on_text=print)
        cancelled: orchestrator.Cancellation = await ff.cancel(ids[0], teardown=True)
        stop = asyncio.Event()
        stop.set()
        await ff.serve(stop=stop, concurrency=10)
        listed: list[Job] = await ff.list(state=JobState.FAILED)
        print(events, again, cancelled.requested, listed, orchestrator.__version__)
        return await ff.wait(job)


def script() -> JobState:
    try:
        with SyncFabricflow.open("jobs.db", fabric_url="http://127.0.0.1:8080") as ff:
            threading.Event().set()
            return ff.run("spec.yaml").state
    except orchestrator.UserError as exc:
        print(exc.exit_code)
        raise
'''

MISTAKE = '''
import orchestrator


async def wrong() -> None:
    async with orchestrator.connect() as ff:
        await ff.get(42)
'''


def test_the_public_api_and_its_users_pass_mypy_strict(tmp_path: Path):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]' installs it)")
    user, mistake = tmp_path / "user.py", tmp_path / "mistake.py"
    user.write_text(textwrap.dedent(USER))
    mistake.write_text(textwrap.dedent(MISTAKE))
    # Imported modules are analysed for their types but not judged (--follow-imports=silent):
    # the contract is the public API's, not every module's.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / "mypy-cache"), *PUBLIC, str(user), str(mistake)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)

    # One error, the deliberate one: a job given as an int. The rest type-checks cleanly.
    expected = (f'{mistake}:7: error: Argument 1 to "get" of "Fabricflow" has incompatible type "int"; '
                'expected "str | Job"  [arg-type]')
    assert proc.stdout.splitlines() == [expected], proc.stdout + proc.stderr
    assert proc.returncode == 1


def test_the_package_says_it_is_typed():
    assert (ROOT / "orchestrator" / "py.typed").is_file()
