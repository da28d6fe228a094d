"""One redaction processor: secret keys at any depth, configured secrets inside longer strings."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from pydantic import SecretStr

from orchestrator import logs

AK, SK, TOKEN = "AKIDEXAMPLE0001", "sk-very-secret-0002", "MIIEtokenvalue0003"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.setattr(logs, "_secrets", ())
    logs.register_secrets(SecretStr(AK), SecretStr(SK), TOKEN, None, "pw")  # "pw": too short to mask
    yield
    structlog.reset_defaults()


def _json_lines(monkeypatch, emit) -> list[dict]:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    logs.configure("info", "json")
    emit(structlog.get_logger("t"))
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_nested_keys_and_embedded_values_are_masked(monkeypatch):
    [event] = _json_lines(monkeypatch, lambda log: log.info(
        "request_sent",
        request={"url": "http://127.0.0.1/v1", "meta": {"authorization": "Bearer abc.def"}},
        attempts=[{"x-auth-token": "zzz"}, ("note", f"signed with {AK} at noon")],
        detail=f"token=abc123 and sk: {SK}; then Authorization: Bearer eyJhbGciOi.xyz",
        db="postgresql://fabric:hunter2@127.0.0.1/jobs",
        error=ValueError(f"rejected key {SK}"),
        token="plain",
    ))
    assert event["request"] == {"url": "http://127.0.0.1/v1", "meta": {"authorization": "********"}}
    assert event["attempts"] == [{"x-auth-token": "********"}, ["note", "signed with ******** at noon"]]
    assert event["detail"] == "token=******** and sk: ********; then Authorization: ********"
    assert event["db"] == "postgresql://fabric:********@127.0.0.1/jobs"
    assert event["error"] == "ValueError: rejected key ********"
    assert event["token"] == "********"


def test_a_tracebacks_text_is_scrubbed(monkeypatch):
    def emit(log):
        try:
            raise RuntimeError(f"auth failed for {TOKEN}")
        except RuntimeError:
            log.error("job_crashed", exc_info=True)

    [event] = _json_lines(monkeypatch, emit)
    assert "RuntimeError: auth failed for ********" in event["exception"]
    assert TOKEN not in json.dumps(event)


def test_ordinary_values_are_left_alone(monkeypatch):
    [event] = _json_lines(monkeypatch, lambda log: log.info(
        "step_transitioned", step="workspace", detail="created ws-1 (pw)", attempts=2, task="keep=this"))
    assert (event["detail"], event["attempts"], event["task"]) == ("created ws-1 (pw)", 2, "keep=this")


def test_the_python_api_path_redacts_through_stdlib_logging(caplog):
    assert not structlog.is_configured()
    caplog.set_level(logging.INFO, logger="orchestrator.test")
    logs.get_logger("orchestrator.test").warning(
        "call_failed", headers={"X-Auth-Token": TOKEN}, detail={"inner": [f"X-Security-Token={TOKEN}"]},
        message=f"the key {AK} was refused")
    [record] = caplog.records
    text = record.getMessage()
    assert AK not in text and TOKEN not in text
    assert "headers=********" in text and "the key ******** was refused" in text
    assert "X-Security-Token=********" in text
