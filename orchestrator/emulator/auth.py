"""Authentication as the Fabric API gateway checks it (REFERENCE.md §3, §4.4)."""

from __future__ import annotations

import hmac
from datetime import datetime, UTC

from aiohttp import web

from orchestrator.fabric import signing

from .config import EmulatorConfig
from .errors import AUTH, ApiError

BAD_TOKEN = "Incorrect IAM authentication information: decrypt token fail"
BAD_SIGNATURE = "Incorrect IAM authentication information: verify aksk signature fail"


async def authenticate(request: web.Request, config: EmulatorConfig) -> None:
    """Raise a 401 APIGW.0301 unless the request carries what ``config.auth`` demands."""
    if config.auth == "token":
        sent = request.headers.get("X-Auth-Token", "")
        expected = config.token or ""
        # Constant-time, so the emulator does not teach clients a timing side channel.
        if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise ApiError(401, AUTH, BAD_TOKEN, gateway=True)
    elif config.auth == "aksk":
        body = await request.read()  # aiohttp caches it, so handlers can read it again
        try:
            signing.verify(
                method=request.method,
                raw_path=request.rel_url.raw_path,
                raw_query=request.rel_url.raw_query_string,
                headers=request.headers,
                body=body,
                secret_for=lambda ak: config.sk if ak == config.ak else None,
                now=datetime.now(UTC),
                max_clock_skew=config.max_clock_skew,  # <= 0 turns the check off (DESIGN)
            )
        except signing.SignatureError:
            raise ApiError(401, AUTH, BAD_SIGNATURE, gateway=True) from None
