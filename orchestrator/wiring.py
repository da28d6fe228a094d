"""Builds the parts from Settings: the Fabric target (real or embedded emulator) and the client."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from orchestrator.config import Settings
from orchestrator.errors import UserError
from orchestrator.fabric.client import Credentials, FabricClient, Timeouts


@dataclass(frozen=True)
class Target:
    """Where Fabric is: both base URLs, and whether it is the embedded emulator."""

    fabric_url: str
    ep_url: str
    embedded: bool


def credentials(settings: Settings) -> Credentials:
    """Credentials from Settings; the embedded emulator needs none."""
    if settings.is_embedded:
        return Credentials()
    if bool(settings.ak) != bool(settings.sk):
        raise UserError("credentials: HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK must be set together")

    def reveal(value: object) -> str | None:
        return value.get_secret_value() if value is not None else None  # type: ignore[attr-defined]

    return Credentials(token=reveal(settings.auth_token), ak=reveal(settings.ak), sk=reveal(settings.sk),
                       project_id=settings.project_id, security_token=reveal(settings.security_token))


@asynccontextmanager
async def fabric_target(settings: Settings, *, announce: bool = True) -> AsyncIterator[Target]:
    """The Fabric to talk to; under the default configuration, an emulator in this process."""
    if not settings.is_embedded:
        for option, url in (("--fabric-url", settings.fabric_url), ("--fabric-ep-url", settings.ep_url)):
            if not url.startswith(("http://", "https://")):
                raise UserError(f"{option}: {url!r} is not an http(s) URL")
        yield Target(settings.fabric_url.rstrip("/"), settings.ep_url.rstrip("/"), embedded=False)
        return
    from orchestrator.emulator.app import running_emulator  # only here: a daemon on a real Fabric never needs it
    from orchestrator.emulator.config import EmulatorConfig

    config = EmulatorConfig(ready_after=settings.emulator.ready_after,
                            instance_ready_after=settings.emulator.instance_ready_after)
    async with running_emulator(config) as emulator:
        if announce:
            print(f"fabricflow: using the embedded Fabric emulator at {emulator.url} (its resources "
                  "vanish when this process exits; set --fabric-url or --region for a real Fabric)",
                  file=sys.stderr, flush=True)
        yield Target(emulator.url, emulator.url, embedded=True)


def client_for(settings: Settings, target: Target) -> FabricClient:
    """A FabricClient for the target, with the configured timeouts and credentials."""
    return FabricClient(
        target.fabric_url,
        ep_url=target.ep_url,
        credentials=credentials(settings),
        timeouts=Timeouts(connect=settings.http.connect_timeout, read=settings.http.read_timeout,
                          invoke=settings.http.invoke_timeout, create=settings.http.create_timeout),
    )
