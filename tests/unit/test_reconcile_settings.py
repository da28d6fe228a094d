"""The settle window's settings: shipped defaults, and the bound that keeps it meaningful."""

from __future__ import annotations

import os

import pytest

from orchestrator.config import Settings, load_settings
from orchestrator.engine.runner import EngineSettings
from orchestrator.errors import UserError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("FABRICFLOW_", "HUAWEICLOUD_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def test_shipped_defaults_settle_well_above_the_create_timeout():
    settings = load_settings()
    assert settings.reconcile == Settings().reconcile  # config/default.toml documents the code's defaults
    assert settings.reconcile.settle_seconds == 120.0 and settings.http.create_timeout == 20.0
    assert settings.reconcile.final_sweep is True
    engine = EngineSettings.from_settings(settings)
    assert (engine.settle_seconds, engine.look_interval, engine.final_sweep) == (120.0, 5.0, True)


def test_a_settle_window_shorter_than_the_create_timeout_is_refused(monkeypatch):
    monkeypatch.setenv("FABRICFLOW_RECONCILE__SETTLE_SECONDS", "5")
    with pytest.raises(UserError) as caught:
        load_settings()
    assert str(caught.value) == (
        "reconcile.settle_seconds (5s) must be at least http.create_timeout (20s): a create the client "
        "gave up on may still be carried out that long after it was sent")
