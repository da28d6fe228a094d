"""Log events as `run`'s progress lines, and NO_COLOR-free console logs."""

from __future__ import annotations

import io

import pytest
import structlog

from orchestrator import logs


@pytest.fixture(autouse=True)
def _structlog_defaults():
    yield
    structlog.reset_defaults()


def test_a_stamina_retry_becomes_one_short_line():
    event = {"event": "stamina.retry_scheduled", "level": "warning", "timestamp": "2026-12-01T10:00:00Z",
             "job_id": "3f9c", "step": "workspace", "callable": "<context block>", "args": (), "kwargs": {},
             "retry_num": 1, "wait_for": 1.0, "waited_so_far": 0.0,
             "caused_by": "RetryableError('list workspaces: HTTP 429 APIGW.0308: throttled')"}
    assert logs.as_line(event) == ("workspace         retrying in 1.0s (retry 1): list workspaces: HTTP 429 "
                                   "APIGW.0308: throttled")


def test_other_events_keep_their_name_level_and_fields():
    event = {"event": "job_lease_lost", "level": "warning", "timestamp": "t", "job_id": "3f9c", "owner": "o"}
    assert logs.as_line(event) == f"{'':<17} warning: job_lease_lost owner=o"


def test_lines_mode_sends_events_to_the_progress_printer_and_nothing_to_stderr(capsys):
    printed: list[str] = []
    logs.configure("warning", "auto", lines=printed.append)
    structlog.get_logger("stamina").warning("stamina.retry_scheduled", step="endpoint", retry_num=2, wait_for=0.5,
                                            caused_by="RetryableError('list endpoints: HTTP 503 x')")
    structlog.get_logger().info("step_transitioned")  # below the level: dropped
    assert printed == ["endpoint          retrying in 0.5s (retry 2): list endpoints: HTTP 503 x"]
    assert capsys.readouterr().err == ""


def test_json_format_wins_over_lines(capsys):
    printed: list[str] = []
    logs.configure("warning", "json", lines=printed.append)
    structlog.get_logger().warning("heartbeat_failed", error="OSError")
    assert printed == []
    assert '"event": "heartbeat_failed"' in capsys.readouterr().err


def test_console_lines_without_colour(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    logs.configure("info", "console", color=False)
    structlog.get_logger().info("daemon_started", owner="o")
    assert "daemon_started" in out.getvalue() and "\x1b[" not in out.getvalue()
    out.truncate(0)
    logs.configure("info", "console", color=True)
    structlog.get_logger().info("daemon_started", owner="o")
    assert "\x1b[" in out.getvalue()
