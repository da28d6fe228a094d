"""The official SDK's signed requests, sent byte for byte to the emulator over loopback.

Each vector is accepted by the gateway check (any answer but 401: the paths are not all Fabric
routes, so a 404 after authentication is fine), and rejected with 401 once one signed byte changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from yarl import URL

VECTORS = json.loads((Path(__file__).parent.parent / "data" / "signing-vectors.json").read_text())["vectors"]


async def send(session: aiohttp.ClientSession, base: str, vector: dict, *, path: str | None = None,
               body: bytes | None = None) -> int:
    target = urlsplit(vector["expected"]["final_url"])
    raw = (path or target.path) + (f"?{target.query}" if target.query else "")
    data = vector["input"]["body"].encode() if body is None else body
    headers = dict(vector["expected"]["final_headers"])
    async with session.request(vector["input"]["method"], URL(base + raw, encoded=True), data=data or None,
                               headers=headers, skip_auto_headers=["Content-Type", "User-Agent"]) as resp:
        await resp.read()
        return resp.status


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
async def test_emulator_accepts_vector_and_rejects_one_changed_byte(emulator_factory, vector):
    ak, sk = vector["input"]["ak"], vector["input"]["sk"]
    emu = await emulator_factory(auth="aksk", ak=ak, sk=sk, max_clock_skew=0)  # vectors are dated in the past
    async with aiohttp.ClientSession() as session:
        assert await send(session, emu.url, vector) != 401
        path = urlsplit(vector["expected"]["final_url"]).path
        changed = path[:-1] + ("x" if path[-1] != "x" else "y") if path.rstrip("/") else path + "x"
        assert await send(session, emu.url, vector, path=changed) == 401
        body = vector["input"]["body"].encode()
        unsigned = "X-Sdk-Content-Sha256" in vector["expected"]["final_headers"]
        if body and not unsigned:
            assert await send(session, emu.url, vector, body=body[:-1] + bytes([body[-1] ^ 1])) == 401
