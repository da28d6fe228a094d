"""Where Settings come from, read without pydantic: the TOML config files, the official SDK's
credentials file, and, for the read commands, the one setting they need (``db``).

config.py builds Settings from these files. ``quick_db`` answers ``db`` for `list`, `show` and
`events` without building Settings (pydantic-settings alone costs about 0.1-0.2 s of CPU to
import), but only when it is sure that Settings would give the same answer, or fail with the
same message. When it is not, it returns None and the caller builds Settings, so both paths
agree on every input (tests/unit/test_quick_settings.py compares them):
- ``db`` with Settings' precedence: ``--db``, then ``FABRICFLOW_DB`` (any case, as
  pydantic-settings matches names), then the ``--config`` file, then config/default.toml, then
  ``default_db_url()``;
- the config files read here and by Settings alike, so a missing file or bad TOML is the same
  message, and the SDK's credentials file too (when nothing else names credentials);
- everything else that Settings would validate is known to be valid: any string where any
  string will do, a choice among the values Settings allows, or a value of the shipped
  config/default.toml left as it is. Anything else (a region, a number, a section changed,
  an unknown key or variable) means: build Settings.
"""

from __future__ import annotations

import configparser
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

EMBEDDED = "embedded"  # fabric_url value meaning "start the bundled emulator in-process"
# Installed from a wheel, config/ is inside the package (pyproject.toml maps it there); in a
# checkout, installed editable or not, it is at the repository's top level.
_PACKAGE = Path(__file__).resolve().parent
DEFAULT_CONFIG_FILE = _PACKAGE / "_config" / "default.toml"
if not DEFAULT_CONFIG_FILE.is_file():
    DEFAULT_CONFIG_FILE = _PACKAGE.parent / "config" / "default.toml"
REGIONS = ("cn-north-4", "cn-southwest-2")

#: The values Settings allows for its Literal fields (tests/unit/test_quick_settings.py checks
#: that these are Settings' own).
CHOICES: dict[str, tuple[str, ...]] = {
    "log_level": ("debug", "info", "warning", "error"),
    "log_format": ("auto", "json", "console"),
}
#: Top-level settings of type ``str`` (or ``str | None``): any string is valid.
_ANY_STRING = ("db", "fabric_url", "fabric_ep_url")
#: Environment variables (lower-cased, as pydantic-settings compares them) that hold such
#: settings, or credentials, whose every value is valid.
_SAFE_ENV = frozenset({f"fabricflow_{key}" for key in (*_ANY_STRING, "auth_token")})
_CREDENTIAL_ENV = ("huaweicloud_sdk_ak", "huaweicloud_sdk_sk", "fabricflow_auth_token")


def default_db_url() -> str:
    """A SQLite file under the user's data directory (XDG), shared by the CLI and the daemon."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite+aiosqlite:///{base / 'fabricflow' / 'fabricflow.db'}"


def merged_toml(files: tuple[Path, ...]) -> dict[str, Any]:
    """The config files merged in order (later files win, tables merged key by key)."""
    merged: dict[str, Any] = {}
    for path in files:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: not valid TOML: {exc}") from None
        deep_merge(merged, data)
    return merged


def deep_merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    """Merge ``data`` into ``into``: tables key by key, anything else replaced."""
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


def sdk_credentials_file() -> dict[str, Any]:
    """Keys from the official SDK's credentials file (INI, section [basic]), if there is one."""
    path = Path(
        os.environ.get("HUAWEICLOUD_SDK_CREDENTIALS_FILE")
        or Path.home() / ".huaweicloud" / "credentials"
    )
    if not path.is_file():
        return {}
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        raise UserError(f"{path}: not a valid credentials file: {exc.__class__.__name__}") from None
    if not parser.has_section("basic"):
        return {}
    keys = ("ak", "sk", "project_id", "security_token")
    return {k: parser.get("basic", k) for k in keys if parser.get("basic", k, fallback="")}


def config_files(config_file: str | Path | None) -> tuple[Path, ...]:
    """The files Settings are read from, in order: the shipped defaults, then ``--config``."""
    files = [DEFAULT_CONFIG_FILE] if DEFAULT_CONFIG_FILE.is_file() else []
    if config_file is not None:
        files.append(Path(config_file))
    return tuple(files)


def quick_db(config_file: str | Path | None, given: Mapping[str, Any]) -> str | None:
    """``db`` as ``load_settings(config_file, **given).db`` would resolve it, or None when only
    building Settings can tell (see the module's docstring). Raises the UserError Settings
    would raise for a missing or malformed config or credentials file."""
    files = config_files(config_file)
    shipped = merged_toml(files[:1]) if files and files[0] == DEFAULT_CONFIG_FILE else {}
    merged = merged_toml(files)  # the shipped file again: errors in the order Settings meets them
    env = {name.lower(): value for name, value in os.environ.items()}  # as pydantic-settings does
    given = {key: value for key, value in given.items() if value is not None}
    if not _sure(given, env, merged, shipped):
        return None
    credentials = (any(name in env for name in _CREDENTIAL_ENV)
                   or any(key in merged for key in ("ak", "sk", "auth_token", "HUAWEICLOUD_SDK_AK",
                                                    "HUAWEICLOUD_SDK_SK")))
    if not credentials:
        sdk_credentials_file()  # Settings reads it then, and a malformed one is an error
    if "db" in given:
        return str(given["db"])
    if "fabricflow_db" in env:
        return env["fabricflow_db"]
    return merged["db"] if "db" in merged else default_db_url()


def _sure(given: Mapping[str, Any], env: Mapping[str, str], merged: Mapping[str, Any],
          shipped: Mapping[str, Any]) -> bool:
    """True when every input is one Settings is known to accept (and so gives ``db`` from)."""
    if not all(_valid(key, value) for key, value in given.items()):  # --region: let Settings judge
        return False
    for name, value in env.items():
        if name.startswith("fabricflow_") and name not in _SAFE_ENV \
                and not _valid(name.removeprefix("fabricflow_"), value, strings=False):
            return False
    return all(key != "region" and (_valid(key, value) or (key in shipped and _same(shipped[key], value)))
               for key, value in merged.items())


def _valid(key: str, value: Any, *, strings: bool = True) -> bool:
    """A value Settings accepts for a top-level key: any string, or one of its choices."""
    if strings and key in _ANY_STRING:
        return isinstance(value, str)
    return isinstance(value, str) and value in CHOICES.get(key, ())


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``1`` is not ``1.0``, nor ``true``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
