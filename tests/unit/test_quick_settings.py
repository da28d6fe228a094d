"""The read commands' quick path to ``db`` (config_files.quick_db) against Settings on the same
inputs: the same value or the same error whenever it answers, and it steps aside otherwise."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import Settings, load_settings
from orchestrator.config_files import CHOICES, quick_db
from orchestrator.errors import UserError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.upper().startswith(("FABRICFLOW_", "HUAWEICLOUD_")):
            monkeypatch.delenv(name)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def outcome(resolve: Any) -> tuple[str, Any]:
    try:
        return "ok", resolve()
    except UserError as exc:
        return "error", str(exc)


# (environment, config file text or None for no --config, "missing" for a --config that does not
# exist, options given, whether the quick path answers)
CASES: dict[str, tuple[dict[str, str], str | None, dict[str, Any], bool]] = {
    "defaults": ({}, None, {}, True),
    "--db": ({}, None, {"db": "sqlite:///opt.db"}, True),
    "--db empty": ({}, None, {"db": ""}, True),
    "FABRICFLOW_DB": ({"FABRICFLOW_DB": "sqlite:///env.db"}, None, {}, True),
    "fabricflow_db in lower case": ({"fabricflow_db": "sqlite:///lower.db"}, None, {}, True),
    "FABRICFLOW_DB empty": ({"FABRICFLOW_DB": ""}, None, {}, True),
    "XDG_DATA_HOME": ({"XDG_DATA_HOME": "/srv/data"}, None, {}, True),
    "config db": ({}, 'db = "sqlite:///file.db"\n', {}, True),
    "env beats config": ({"FABRICFLOW_DB": "sqlite:///env.db"}, 'db = "sqlite:///file.db"\n', {}, True),
    "option beats env and config": ({"FABRICFLOW_DB": "sqlite:///env.db"}, 'db = "sqlite:///file.db"\n',
                                    {"db": "sqlite:///opt.db"}, True),
    "other string settings": ({"FABRICFLOW_FABRIC_URL": "http://127.0.0.1:1", "FABRICFLOW_AUTH_TOKEN": "t"},
                              'fabric_url = "http://x"\nfabric_ep_url = "http://y"\n',
                              {"fabric_url": "http://127.0.0.1:2", "log_level": "debug"}, True),
    "choices": ({"FABRICFLOW_LOG_FORMAT": "json"}, 'log_level = "info"\n', {}, True),
    "shipped section as it is": ({}, "[poll]\ninitial = 1.0\n", {}, True),
    "missing config file": ({}, "missing", {}, True),
    "config not TOML": ({}, "db = \n", {}, True),
    "config db not a string": ({}, "db = 5\n", {}, False),
    "config bad choice": ({}, 'log_level = "loud"\n', {}, False),
    "env bad choice": ({"FABRICFLOW_LOG_LEVEL": "loud"}, None, {}, False),
    "config section changed": ({}, "[daemon]\nconcurrency = 50\n", {}, False),
    "config section invalid": ({}, "[daemon]\nconcurrency = 0\n", {}, False),
    "config number of another type": ({}, "[http]\nconnect_timeout = 10\n", {}, False),
    "lease check": ({}, "[http]\ncreate_timeout = 40.0\n", {}, False),
    "config unknown key": ({}, "colour = true\n", {}, False),
    "config region": ({}, 'region = "mars"\n', {}, False),
    "env nested": ({"FABRICFLOW_DAEMON__CONCURRENCY": "x"}, None, {}, False),
    "env region": ({"FABRICFLOW_REGION": "mars"}, None, {}, False),
    "option region": ({}, None, {"region": "cn-north-4"}, False),
    "env unknown": ({"FABRICFLOW_WHATEVER": "1"}, None, {}, False),
    "env ak by field name": ({"FABRICFLOW_AK": "a"}, None, {}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quick_db_agrees_with_settings(case, tmp_path, monkeypatch):
    environment, text, given, quick = CASES[case]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config: Path | None = None
    if text is not None:
        config = tmp_path / "config.toml"
        if text != "missing":
            config.write_text(text)

    full = outcome(lambda: load_settings(config, **given).db)
    fast = outcome(lambda: quick_db(config, given))

    assert (fast != ("ok", None)) is quick, (fast, full)
    if quick:
        assert fast == full
    if case == "defaults":
        assert full == ("ok", f"sqlite+aiosqlite:///{tmp_path / 'home' / '.local/share/fabricflow/fabricflow.db'}")


@pytest.mark.parametrize("credentials", ["", "HUAWEICLOUD_SDK_AK", "FABRICFLOW_AUTH_TOKEN", "huaweicloud_sdk_sk"])
def test_a_malformed_sdk_credentials_file_is_the_same_error_unless_other_credentials_are_set(
        credentials, tmp_path, monkeypatch):
    broken = tmp_path / "credentials"
    broken.write_text("no section header\n")
    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(broken))
    if credentials:
        monkeypatch.setenv(credentials, "x")

    full = outcome(lambda: load_settings(None).db)
    fast = outcome(lambda: quick_db(None, {}))

    assert fast == full
    assert (full[0] == "error") is (not credentials)
    if not credentials:
        assert full[1] == f"{broken}: not a valid credentials file: MissingSectionHeaderError"


def test_the_choices_are_settings_own():
    for key, choices in CHOICES.items():
        assert typing.get_args(Settings.model_fields[key].annotation) == choices
