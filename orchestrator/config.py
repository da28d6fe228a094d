"""Settings: one object, built once by the CLI and passed down.

Precedence, highest first: init arguments (command-line options), environment variables
(``FABRICFLOW_...``, ``__`` between nested names; credentials under the official SDK's names),
the ``--config`` file, ``config/default.toml``, the defaults below, and, for credentials only,
the official SDK's credentials file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

# The files Settings are read from are read without pydantic, in config_files (which the read
# commands use alone, to start quickly); these names are re-exported from here.
from orchestrator.config_files import (  # noqa: F401 - re-exported
    DEFAULT_CONFIG_FILE,
    EMBEDDED,
    REGIONS,
    config_files,
    default_db_url,
    merged_toml,
    sdk_credentials_file,
)
from orchestrator.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpSettings(_Section):
    """Timeouts for calls to Fabric, in seconds."""

    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    invoke_timeout: float = Field(default=300.0, gt=0)
    # A create request's whole time; kept below daemon.lease_seconds (checked at start-up).
    create_timeout: float = Field(default=20.0, gt=0)


class PollSettings(_Section):
    """Status polling: starts at ``initial`` seconds, doubles up to ``max``, with jitter."""

    initial: float = Field(default=1.0, gt=0)
    max: float = Field(default=30.0, gt=0)


class RetrySettings(_Section):
    """Job-level retries of one step on transient errors."""

    max_attempts: int = Field(default=8, ge=1)
    backoff_base: float = Field(default=1.0, gt=0)
    backoff_cap: float = Field(default=30.0, gt=0)
    # Per-step overrides of max_attempts, e.g. {endpoint_ready = 20, invocation = 3}.
    per_step: dict[Literal["workspace", "endpoint", "endpoint_ready", "model", "service_instance",
                           "service_ready", "invocation"], int] = Field(default_factory=dict)


class DaemonSettings(_Section):
    """How a daemon claims and holds jobs."""

    concurrency: int = Field(default=200, ge=1)
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    claim_interval: float = Field(default=0.5, gt=0)
    max_recoveries: int = Field(default=10, ge=1)
    drain_seconds: float = Field(default=20.0, gt=0)


class ReconcileSettings(_Section):
    """Exactly once against a real cloud: a create whose answer was lost may still be carried out.

    After an unknown outcome (and before re-sending the create of a step found IN_FLIGHT after a
    crash), no create leaves until look-ups over ``settle_seconds`` have found nothing: the
    longest time a request may still be carried out after it was sent. Meanwhile the engine
    looks every ``look_interval`` seconds (doubling, capped at 4x), each look an event.
    ``final_sweep`` lists each created resource's name once more at the job's end and deletes any
    extra resource that carries this job's marker (never the recorded one).
    """

    settle_seconds: float = Field(default=120.0, ge=0)
    look_interval: float = Field(default=5.0, gt=0)
    final_sweep: bool = True


class EmulatorSettings(_Section):
    """The embedded emulator used when ``fabric_url = "embedded"``."""

    ready_after: float = Field(default=3.0, ge=0)
    instance_ready_after: float = Field(default=2.0, ge=0)


class Settings(BaseSettings):
    """Every setting fabricflow reads. Secrets are ``SecretStr`` and never printed."""

    model_config = SettingsConfigDict(
        env_prefix="FABRICFLOW_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    db: str = Field(default_factory=default_db_url)
    fabric_url: str = EMBEDDED
    fabric_ep_url: str | None = None
    region: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "warning"  # unset: the daemon uses info
    log_format: Literal["auto", "json", "console"] = "auto"

    auth_token: SecretStr | None = None
    ak: SecretStr | None = Field(default=None, validation_alias="HUAWEICLOUD_SDK_AK")
    sk: SecretStr | None = Field(default=None, validation_alias="HUAWEICLOUD_SDK_SK")
    project_id: str | None = Field(
        default=None, validation_alias="HUAWEICLOUD_SDK_PROJECT_ID"
    )
    security_token: SecretStr | None = Field(
        default=None,
        validation_alias="HUAWEICLOUD_SDK_SECURITY_TOKEN",
    )

    http: HttpSettings = HttpSettings()
    poll: PollSettings = PollSettings()
    retry: RetrySettings = RetrySettings()
    daemon: DaemonSettings = DaemonSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    emulator: EmulatorSettings = EmulatorSettings()

    # Set by load_settings(); not a setting a user writes.
    config_files: tuple[str, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        files = _files_var.get(())
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, merged_toml(files)),
        )

    @property
    def is_embedded(self) -> bool:
        """True when the bundled emulator stands in for Fabric."""
        return self.fabric_url == EMBEDDED

    @property
    def ep_url(self) -> str:
        """Base URL of the ``fabric-ep`` host (service instances, invocations)."""
        return self.fabric_ep_url or self.fabric_url

    def masked(self) -> dict[str, Any]:
        """Effective settings for display: secrets shown as ``********`` when set."""
        from sqlalchemy.engine import make_url  # here: reading commands never import SQLAlchemy

        data = self.model_dump(mode="json", exclude={"config_files"})
        try:
            data["db"] = make_url(self.db).render_as_string(hide_password=True)
        except Exception:  # not a URL at all: nothing that parses as a password to hide
            pass
        for key in ("auth_token", "ak", "sk", "security_token"):
            data[key] = "********" if getattr(self, key) is not None else None
        data["config_files"] = list(self.config_files)
        data["fabric_ep_url"] = self.ep_url  # the effective host, defaulted or not
        return data


# The --config file is handed to settings_customise_sources through a context variable because
# pydantic-settings builds sources from the class, not from the call.
import contextvars  # noqa: E402

_files_var: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("config_files")


def _blame(error: Any, overrides: dict[str, Any], config_file: str | Path | None) -> str:
    """Name where a bad value came from: an option, an environment variable or a file."""
    path = ".".join(str(p) for p in error["loc"])
    env_name = "FABRICFLOW_" + "__".join(str(p) for p in error["loc"]).upper()
    if error["loc"] and error["loc"][0] in overrides:
        where = f"--{str(error['loc'][0]).replace('_', '-')}"
    elif env_name in os.environ:
        where = env_name
    else:
        where = str(config_file) if config_file else str(DEFAULT_CONFIG_FILE)
    return f"{where}: {path}: {error['msg']}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from defaults, config files, the environment and explicit overrides."""
    files = config_files(config_file)
    token = _files_var.set(files)
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise UserError("\n".join(_blame(e, overrides, config_file) for e in exc.errors())) from None
    finally:
        _files_var.reset(token)
    if settings.region is not None:
        if settings.region not in REGIONS:
            raise UserError(f"--region: unknown region {settings.region!r} (known: {', '.join(REGIONS)})")
        if "fabric_url" not in overrides:  # an explicit --fabric-url beats the region's hosts
            settings.fabric_url = f"https://fabric.{settings.region}.myhuaweicloud.com"
            if "fabric_ep_url" not in overrides:
                settings.fabric_ep_url = f"https://fabric-ep.{settings.region}.myhuaweicloud.com"
    settings.config_files = tuple(str(f) for f in files)
    if settings.ak is None and settings.sk is None and settings.auth_token is None:
        # Like the official SDK: the credentials file only when nothing else names credentials,
        # so a token in the environment is never overridden by keys from the file.
        file_values = sdk_credentials_file()
        if file_values:
            settings = settings.model_copy(update={
                "ak": SecretStr(file_values["ak"]) if "ak" in file_values else None,
                "sk": SecretStr(file_values["sk"]) if "sk" in file_values else None,
                "project_id": settings.project_id or file_values.get("project_id"),
                "security_token": SecretStr(file_values["security_token"]) if "security_token" in file_values else None,
            })
    if settings.http.create_timeout >= settings.daemon.lease_seconds:
        raise UserError(f"http.create_timeout ({settings.http.create_timeout:g}s) must be shorter than "
                        f"daemon.lease_seconds ({settings.daemon.lease_seconds:g}s): a create still in the air "
                        "when a lease lapses could be sent twice")
    if settings.reconcile.settle_seconds < settings.http.create_timeout:
        raise UserError(f"reconcile.settle_seconds ({settings.reconcile.settle_seconds:g}s) must be at least "
                        f"http.create_timeout ({settings.http.create_timeout:g}s): a create the client gave up "
                        "on may still be carried out that long after it was sent")
    return settings
