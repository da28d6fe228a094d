"""Settings: defaults, precedence, config files, SDK credentials, masking, regions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.config import DEFAULT_CONFIG_FILE, EMBEDDED, Settings, load_settings
from orchestrator.errors import UserError

AK = "AKSECRETVALUE0001"
SK = "SKSECRETVALUE-very-secret-0002"
TOKEN = "MIITOKENSECRET0003"
STS = "SECURITYTOKENSECRET0004"
FILE_AK = "FILEAKSECRET0005"
FILE_SK = "FILESKSECRET0006"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No real ~/.huaweicloud, no inherited FABRICFLOW_* or HUAWEICLOUD_SDK_* variables."""
    for name in list(os.environ):
        if name.startswith(("FABRICFLOW_", "HUAWEICLOUD_")):
            monkeypatch.delenv(name)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    return home


def _toml(tmp_path: Path, text: str, name: str = "extra.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _credentials(tmp_path: Path, monkeypatch, body: str) -> Path:
    path = tmp_path / "credentials"
    path.write_text(body, encoding="utf-8")
    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(path))
    return path


# --- defaults -------------------------------------------------------------------------------


def test_defaults(clean_env):
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.db == f"sqlite+aiosqlite:///{clean_env / '.local' / 'share' / 'fabricflow' / 'fabricflow.db'}"
    assert s.fabric_url == EMBEDDED and s.is_embedded
    assert s.fabric_ep_url is None
    assert s.ep_url == EMBEDDED
    assert s.region is None
    assert s.log_level == "warning"
    assert s.log_format == "auto"
    assert s.auth_token is None and s.ak is None and s.sk is None
    assert s.project_id is None and s.security_token is None
    assert (s.http.connect_timeout, s.http.read_timeout, s.http.invoke_timeout) == (10.0, 60.0, 300.0)
    assert (s.poll.initial, s.poll.max) == (1.0, 30.0)
    assert (s.retry.max_attempts, s.retry.backoff_base, s.retry.backoff_cap) == (8, 1.0, 30.0)
    assert s.daemon.concurrency == 200
    assert s.daemon.lease_seconds == 30.0
    assert s.daemon.heartbeat_seconds == 10.0
    assert s.daemon.max_recoveries == 10
    assert (s.emulator.ready_after, s.emulator.instance_ready_after) == (3.0, 2.0)
    assert s.config_files == (str(DEFAULT_CONFIG_FILE),)


def test_default_db_follows_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert load_settings().db == f"sqlite+aiosqlite:///{tmp_path / 'xdg' / 'fabricflow' / 'fabricflow.db'}"


def test_shipped_default_file_matches_code_defaults():
    """config/default.toml documents the defaults; it must not silently change them."""
    from_file = load_settings()
    assert DEFAULT_CONFIG_FILE.is_file()
    bare = Settings()
    for section in ("http", "poll", "retry", "daemon", "emulator"):
        assert getattr(from_file, section) == getattr(bare, section), section
    assert (from_file.fabric_url, from_file.log_level) == (bare.fabric_url, bare.log_level)


# --- precedence: init > env > --config > default.toml ---------------------------------------


CONFIG = """
db = "sqlite:///from-file.db"
log_level = "error"
fabric_url = "http://file.example:1"

[daemon]
concurrency = 7
lease_seconds = 45.0

[poll]
initial = 2.0
"""


def test_config_file_beats_default_toml(tmp_path):
    path = _toml(tmp_path, CONFIG)
    s = load_settings(path)
    assert s.db == "sqlite:///from-file.db"
    assert s.log_level == "error"  # default.toml says "warning"
    assert s.fabric_url == "http://file.example:1"
    assert s.daemon.concurrency == 7
    assert s.daemon.lease_seconds == 45.0
    assert s.poll.initial == 2.0
    assert s.poll.max == 30.0  # sections merge key by key with default.toml
    assert s.config_files == (str(DEFAULT_CONFIG_FILE), str(path))


def test_env_beats_config_file(tmp_path, monkeypatch):
    path = _toml(tmp_path, CONFIG)
    monkeypatch.setenv("FABRICFLOW_DB", "sqlite:///from-env.db")
    monkeypatch.setenv("FABRICFLOW_DAEMON__CONCURRENCY", "9")
    s = load_settings(path)
    assert s.db == "sqlite:///from-env.db"
    assert s.daemon.concurrency == 9
    assert s.daemon.lease_seconds == 45.0  # the file's other keys in the section survive
    assert s.log_level == "error"


def test_env_beats_default_toml(monkeypatch):
    monkeypatch.setenv("FABRICFLOW_DAEMON__CONCURRENCY", "3")
    monkeypatch.setenv("FABRICFLOW_LOG_LEVEL", "debug")
    s = load_settings()
    assert s.daemon.concurrency == 3
    assert s.log_level == "debug"


def test_init_beats_env_and_file(tmp_path, monkeypatch):
    path = _toml(tmp_path, CONFIG)
    monkeypatch.setenv("FABRICFLOW_DB", "sqlite:///from-env.db")
    monkeypatch.setenv("FABRICFLOW_DAEMON__CONCURRENCY", "9")
    s = load_settings(path, db="sqlite:///from-init.db", daemon={"concurrency": 11})
    assert s.db == "sqlite:///from-init.db"
    assert s.daemon.concurrency == 11


def test_none_overrides_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("FABRICFLOW_DB", "sqlite:///from-env.db")
    s = load_settings(None, db=None, fabric_url=None)
    assert s.db == "sqlite:///from-env.db"
    assert s.fabric_url == EMBEDDED


def test_credentials_from_env(monkeypatch):
    monkeypatch.setenv("HUAWEICLOUD_SDK_AK", AK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", SK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_PROJECT_ID", "proj-env")
    monkeypatch.setenv("HUAWEICLOUD_SDK_SECURITY_TOKEN", STS)
    monkeypatch.setenv("FABRICFLOW_AUTH_TOKEN", TOKEN)
    s = load_settings()
    assert s.ak is not None and s.ak.get_secret_value() == AK
    assert s.sk is not None and s.sk.get_secret_value() == SK
    assert s.project_id == "proj-env"
    assert s.security_token is not None and s.security_token.get_secret_value() == STS
    assert s.auth_token is not None and s.auth_token.get_secret_value() == TOKEN


def test_init_beats_env_for_credentials(monkeypatch):
    monkeypatch.setenv("HUAWEICLOUD_SDK_AK", AK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_PROJECT_ID", "proj-env")
    s = load_settings(ak="INIT-AK", project_id="proj-init")
    assert s.ak is not None and s.ak.get_secret_value() == "INIT-AK"
    assert s.project_id == "proj-init"


# --- bad config files -----------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    path = _toml(tmp_path, 'fabric_uri = "http://x"\n')
    with pytest.raises(UserError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "fabric_uri" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_nested_key(tmp_path):
    path = _toml(tmp_path, "[daemon]\nconcurency = 3\n")
    with pytest.raises(UserError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: daemon.concurency: Extra inputs are not permitted"


def test_unknown_section(tmp_path):
    path = _toml(tmp_path, "[deamon]\nconcurrency = 3\n")
    with pytest.raises(UserError, match=r"deamon: Extra inputs are not permitted"):
        load_settings(path)


def test_bad_value_in_config_file(tmp_path):
    path = _toml(tmp_path, "[daemon]\nconcurrency = 0\n")
    with pytest.raises(UserError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: daemon.concurrency: ")


def test_invalid_toml(tmp_path):
    path = _toml(tmp_path, "db = \n[daemon\n")
    with pytest.raises(UserError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: not valid TOML: ")


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(UserError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: no such config file"


def test_env_error_is_not_blamed_on_config_file(tmp_path, monkeypatch):
    path = _toml(tmp_path, 'log_level = "info"\n')
    monkeypatch.setenv("FABRICFLOW_DAEMON__CONCURRENCY", "abc")
    with pytest.raises(UserError) as info:
        load_settings(path)
    assert str(path) not in str(info.value)


# --- the official SDK's credentials file ----------------------------------------------------


CRED_FILE = f"""
[basic]
ak = {FILE_AK}
sk = {FILE_SK}
project_id = proj-file
"""


def test_sdk_credentials_file_is_read(tmp_path, monkeypatch):
    _credentials(tmp_path, monkeypatch, CRED_FILE)
    s = load_settings()
    assert s.ak is not None and s.ak.get_secret_value() == FILE_AK
    assert s.sk is not None and s.sk.get_secret_value() == FILE_SK
    assert s.project_id == "proj-file"
    assert s.security_token is None


def test_sdk_credentials_file_in_home_by_default(clean_env, monkeypatch):
    monkeypatch.delenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE")
    (clean_env / ".huaweicloud").mkdir()
    (clean_env / ".huaweicloud" / "credentials").write_text(CRED_FILE, encoding="utf-8")
    s = load_settings()
    assert s.ak is not None and s.ak.get_secret_value() == FILE_AK


def test_environment_credentials_replace_the_file_whole(tmp_path, monkeypatch):
    # Like the SDK's provider chain: environment credentials, or the file's; never a mix.
    _credentials(tmp_path, monkeypatch, CRED_FILE)
    monkeypatch.setenv("HUAWEICLOUD_SDK_AK", AK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", "SKFROMENVIRONMENT")
    monkeypatch.setenv("HUAWEICLOUD_SDK_PROJECT_ID", "proj-env")
    s = load_settings()
    assert s.ak is not None and s.ak.get_secret_value() == AK
    assert s.sk is not None and s.sk.get_secret_value() == "SKFROMENVIRONMENT"
    assert s.project_id == "proj-env"


def test_token_in_environment_is_not_overridden_by_file_keys(tmp_path, monkeypatch):
    _credentials(tmp_path, monkeypatch, CRED_FILE)
    monkeypatch.setenv("FABRICFLOW_AUTH_TOKEN", "TOKENFROMENV")
    s = load_settings()
    assert s.auth_token is not None and s.ak is None and s.sk is None


def test_config_file_beats_credentials_file(tmp_path, monkeypatch):
    _credentials(tmp_path, monkeypatch, CRED_FILE)
    path = _toml(tmp_path, 'project_id = "proj-toml"\n')
    assert load_settings(path).project_id == "proj-toml"


def test_credentials_file_without_basic_section(tmp_path, monkeypatch):
    _credentials(tmp_path, monkeypatch, "[other]\nak = x\n")
    s = load_settings()
    assert s.ak is None and s.sk is None


def test_credentials_file_empty_values_ignored(tmp_path, monkeypatch):
    _credentials(tmp_path, monkeypatch, f"[basic]\nak = {FILE_AK}\nsk =\nsecurity_token =\n")
    s = load_settings()
    assert s.ak is not None and s.sk is None and s.security_token is None


def test_broken_credentials_file(tmp_path, monkeypatch):
    path = _credentials(tmp_path, monkeypatch, "this is not ini\n[basic\n")
    with pytest.raises(UserError) as info:
        load_settings()
    assert str(path) in str(info.value)


# --- secrets stay secret --------------------------------------------------------------------


SECRETS = (AK, SK, TOKEN, STS)


@pytest.fixture
def secret_settings(monkeypatch) -> Settings:
    monkeypatch.setenv("HUAWEICLOUD_SDK_AK", AK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", SK)
    monkeypatch.setenv("HUAWEICLOUD_SDK_SECURITY_TOKEN", STS)
    monkeypatch.setenv("FABRICFLOW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("HUAWEICLOUD_SDK_PROJECT_ID", "proj-1")
    return load_settings()


def test_masked_hides_secrets(secret_settings):
    shown = secret_settings.masked()
    text = json.dumps(shown)
    for secret in SECRETS:
        assert secret not in text
    for key in ("ak", "sk", "auth_token", "security_token"):
        assert shown[key] == "********"
    assert shown["project_id"] == "proj-1"  # not a secret
    assert shown["config_files"] == [str(DEFAULT_CONFIG_FILE)]


def test_masked_shows_none_for_unset_secrets():
    shown = load_settings().masked()
    assert all(shown[k] is None for k in ("ak", "sk", "auth_token", "security_token"))
    json.dumps(shown)


def test_masked_hides_secrets_from_credentials_file(tmp_path, monkeypatch):
    _credentials(tmp_path, monkeypatch, CRED_FILE)
    text = json.dumps(load_settings().masked())
    assert FILE_AK not in text and FILE_SK not in text


def test_repr_and_str_hide_secrets(secret_settings):
    for rendered in (repr(secret_settings), str(secret_settings)):
        for secret in SECRETS:
            assert secret not in rendered


def test_model_dump_json_hides_secrets(secret_settings):
    text = secret_settings.model_dump_json()
    for secret in SECRETS:
        assert secret not in text


def test_masked_hides_database_password(monkeypatch):
    monkeypatch.setenv("FABRICFLOW_DB", "postgresql+asyncpg://fabric:DBPASSWORD123@db.example/ff")
    text = json.dumps(load_settings().masked())
    assert "DBPASSWORD123" not in text


# --- regions --------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["cn-north-4", "cn-southwest-2"])
def test_region_sets_both_hosts(region):
    s = load_settings(region=region)
    assert s.region == region
    assert s.fabric_url == f"https://fabric.{region}.myhuaweicloud.com"
    assert s.fabric_ep_url == f"https://fabric-ep.{region}.myhuaweicloud.com"
    assert s.ep_url == s.fabric_ep_url
    assert not s.is_embedded


def test_region_from_env(monkeypatch):
    monkeypatch.setenv("FABRICFLOW_REGION", "cn-north-4")
    s = load_settings()
    assert s.fabric_url == "https://fabric.cn-north-4.myhuaweicloud.com"


def test_region_keeps_explicit_ep_url():
    s = load_settings(region="cn-north-4", fabric_ep_url="http://127.0.0.1:9")
    assert s.fabric_url == "https://fabric.cn-north-4.myhuaweicloud.com"
    assert s.fabric_ep_url == "http://127.0.0.1:9"


def test_explicit_fabric_url_wins_over_region():
    s = load_settings(region="cn-north-4", fabric_url="http://127.0.0.1:8")
    assert s.fabric_url == "http://127.0.0.1:8"
    assert s.ep_url == "http://127.0.0.1:8"


def test_unknown_region():
    with pytest.raises(UserError) as info:
        load_settings(region="mars-1")
    message = str(info.value)
    assert "mars-1" in message
    assert "cn-north-4" in message


def test_fabric_ep_url_defaults_to_fabric_url():
    s = load_settings(fabric_url="http://127.0.0.1:5000")
    assert s.ep_url == "http://127.0.0.1:5000"
    assert not s.is_embedded
