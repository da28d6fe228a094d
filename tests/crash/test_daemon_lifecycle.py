"""The daemon process: SIGTERM drains and exits 0; secrets never leak into output or the database."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART
from tests.crash.procs import FABRICFLOW, Daemon, Emulator, cli, env, query, wait_for


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_drains_releases_and_resumes(tmp_path: Path, stop: int):
    emulator = Emulator("--ready-after", "3", "--instance-ready-after", "0.2", log=tmp_path / "e.log")
    try:
        db = tmp_path / "jobs.db"
        url = f"sqlite+aiosqlite:///{db}"
        job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
        daemon = Daemon(url, emulator.url, tmp_path / "d1.log")
        wait_for("the endpoint wait", lambda: query(
            db, "SELECT state FROM steps WHERE job_id=? AND name='endpoint_ready'", job_id)[0][0] == "WAITING")
        started = time.monotonic()
        daemon.proc.send_signal(stop)
        assert daemon.proc.wait(timeout=30) == 0
        daemon.log_file.close()
        assert time.monotonic() - started < 10  # a sleeping wait stops at once
        assert query(db, "SELECT state, lease_owner FROM jobs WHERE id=?", job_id) == [("PENDING", None)]
        details = [d for (d,) in query(db, "SELECT detail FROM events WHERE job_id=?", job_id)]
        assert any("(shutting down)" in d for d in details)

        again = Daemon(url, emulator.url, tmp_path / "d2.log")
        try:
            wait_for("the job to finish", lambda: query(
                db, "SELECT state FROM jobs WHERE id=?", job_id)[0][0] == "SUCCEEDED", timeout=60)
        finally:
            assert again.terminate() == 0
        assert all(sum(v.values()) == 1 for v in emulator.stats()["created"].values())
    finally:
        emulator.stop()


AK, SK, PROJECT, TOKEN = "AKLEAKCHECK0000001", "SKLEAKCHECKsecretvalue42", "proj0000000000000000000000000001", "STSLEAK999"


@pytest.mark.parametrize("auth", ["aksk", "token"])
def test_secrets_never_leak(tmp_path: Path, auth: str):
    if auth == "aksk":
        emulator = Emulator("--auth", "aksk", "--ak", AK, "--sk", SK, "--ready-after", "0.2",
                            "--instance-ready-after", "0.2", log=tmp_path / "e.log")
        secret_env = {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK, "HUAWEICLOUD_SDK_PROJECT_ID": PROJECT,
                      "HUAWEICLOUD_SDK_SECURITY_TOKEN": TOKEN}
        secrets = [AK, SK, TOKEN]
    else:
        emulator = Emulator("--auth", "token", "--token", TOKEN, "--ready-after", "0.2",
                            "--instance-ready-after", "0.2", log=tmp_path / "e.log")
        secret_env = {"FABRICFLOW_AUTH_TOKEN": TOKEN}
        secrets = [TOKEN]
    try:
        db = tmp_path / "jobs.db"
        url = f"sqlite+aiosqlite:///{db}"
        run = subprocess.run([*FABRICFLOW, "run", str(QUICKSTART), "--db", url, "--fabric-url", emulator.url,
                              "--json", "--log-level", "debug"], capture_output=True, text=True,
                             env=env(**secret_env), timeout=60)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["state"] == "SUCCEEDED"
        # A wrong key: the job fails with the gateway's words, and still no secret anywhere.
        wrong = dict(secret_env, **({"HUAWEICLOUD_SDK_SK": SK + "x"} if auth == "aksk"
                                    else {"FABRICFLOW_AUTH_TOKEN": TOKEN + "x"}))
        failed = subprocess.run([*FABRICFLOW, "run", str(QUICKSTART), "--db", url, "--fabric-url", emulator.url,
                                 "--json", "--log-level", "debug"], capture_output=True, text=True,
                                env=env(**wrong), timeout=60)
        assert failed.returncode == 1
        error = json.loads(failed.stdout)["error"]
        assert error["code"] == "APIGW.0301"
        shown = subprocess.run([*FABRICFLOW, "config", "show", "--db", url], capture_output=True, text=True,
                               env=env(**secret_env), timeout=60)
        outputs = run.stdout + run.stderr + failed.stdout + failed.stderr + shown.stdout + shown.stderr
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.db*"))
        for secret in secrets + [SK + "x", TOKEN + "x"]:
            assert secret not in outputs
            assert secret.encode() not in stored
    finally:
        emulator.stop()


def test_daemon_starting_beside_a_live_run_leaves_its_job_alone(tmp_path: Path):
    emulator = Emulator("--ready-after", "3", "--instance-ready-after", "0.2", log=tmp_path / "e.log")
    try:
        db = tmp_path / "jobs.db"
        url = f"sqlite+aiosqlite:///{db}"
        run = subprocess.Popen([*FABRICFLOW, "run", str(QUICKSTART), "--db", url, "--fabric-url", emulator.url,
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
        wait_for("the run to wait for its endpoint", lambda: query(
            db, "SELECT count(*) FROM steps WHERE name='endpoint_ready' AND state='WAITING'")[0][0] == 1)
        daemon = Daemon(url, emulator.url, tmp_path / "d.log")
        try:
            out, _ = run.communicate(timeout=60)
        finally:
            assert daemon.terminate() == 0
        assert run.returncode == 0
        assert json.loads(out)["state"] == "SUCCEEDED"
        details = [d for (d,) in query(db, "SELECT detail FROM events")]
        assert not any(d.startswith("recovered by") for d in details)
        assert all(sum(v.values()) == 1 for v in emulator.stats()["created"].values())
    finally:
        emulator.stop()


def test_daemon_serves_health_and_metrics(tmp_path: Path):
    import urllib.request

    emulator = Emulator("--ready-after", "0.2", "--instance-ready-after", "0.2", log=tmp_path / "e.log")
    try:
        db = tmp_path / "jobs.db"
        url = f"sqlite+aiosqlite:///{db}"
        job_id = cli("submit", str(QUICKSTART), "--db", url).stdout.strip()
        log = tmp_path / "d.log"
        with open(log, "w") as err:
            daemon = subprocess.Popen([*FABRICFLOW, "daemon", "--db", url, "--fabric-url", emulator.url,
                                       "--metrics-port", "0"], stdout=subprocess.DEVNULL, stderr=err, env=env())
        try:
            line = wait_for("the metrics address", lambda: next(
                (ln for ln in log.read_text().splitlines() if "health and metrics on" in ln), None))
            base = line.split(" on ", 1)[1].split("/healthz")[0]
            wait_for("the job to finish", lambda: query(
                db, "SELECT state FROM jobs WHERE id=?", job_id)[0][0] == "SUCCEEDED", timeout=60)
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
                health = json.loads(resp.read())
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
        finally:
            daemon.send_signal(15)
            assert daemon.wait(timeout=30) == 0
        assert health["status"] == "ok" and health["jobs_running"] == 0
        assert 'fabricflow_step_transitions_total{state="SUCCEEDED",step="invocation"} 1.0' in metrics
        assert "fabricflow_jobs_running 0.0" in metrics
    finally:
        emulator.stop()
