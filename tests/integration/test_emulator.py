"""The Fabric API emulator over real HTTP: the procedure, lists, errors, auth and faults."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
import yarl

from orchestrator.emulator.app import RunningEmulator
from orchestrator.fabric import signing

HEX_ID = re.compile(r"[0-9a-f]{32}")
ENDPOINT_BODY = {"name": "apie_test", "description": "apie test endpoint", "type": "inference",
                 "reserved_resource": {"mu": {"spec_code": "mu.llama3.8b", "min": 0, "max": 1}}}
MODEL_BODY = {"name": "LLama3-8b", "description": "this is a apie test model", "type": "LLM_MODEL",
              "version": {"name": "v1", "description": "test description",
                          "config": {"llm_model_config": {"base_model_type": "",
                                                          "model_path": ""}}}}


class Api:
    """Raw HTTP against one emulator: returns (status, headers, parsed JSON or None)."""

    def __init__(self, session: aiohttp.ClientSession, emulator: RunningEmulator,
                 headers: dict[str, str] | None = None) -> None:
        self.session, self.base, self.headers = session, emulator.url, headers or {}

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
                   ) -> tuple[int, Any, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        async with self.session.request(
                method, self.base + path, data=data, params=params,
                headers={"Content-Type": "application/json", **self.headers, **(headers or {})}
        ) as resp:
            text = await resp.text()
            return resp.status, resp.headers, json.loads(text) if text else None

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, _, doc = await self.call(method, path, body, **kw)
        assert status == 200, (status, doc)
        return doc

    async def wait_status(self, path: str, wanted: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = await self.ok("GET", path)
            if doc["status"] == wanted or time.monotonic() > deadline:
                assert doc["status"] == wanted, doc
                return doc
            await asyncio.sleep(0.02)

    async def stats(self) -> dict[str, Any]:
        return await self.ok("GET", "/_emulator/stats")


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    return [line[len("data: "):] for block in text.split("\n\n") for line in block.splitlines()
            if line.startswith("data: ")]


async def provision(api: Api, *, instance: bool = True) -> dict[str, str]:
    """Steps 1–4 of the procedure, waiting for RUNNING; returns the ids."""
    ws = await api.ok("POST", "/v1/workspaces", {"name": "apieworkspace",
                                                 "description": "apie test workspace"})
    base = f"/v1/workspaces/{ws['id']}"
    ep = await api.ok("POST", f"{base}/endpoints", ENDPOINT_BODY)
    await api.wait_status(f"{base}/endpoints/{ep['id']}", "RUNNING")
    model = await api.ok("POST", f"{base}/models", MODEL_BODY)
    ids = {"ws": ws["id"], "base": base, "ep": ep["id"], "model": model["id"]}
    if instance:
        inst = await api.ok("POST", f"{base}/services/instances", {
            "source": {"id": model["id"]}, "name": "test_serviceInstanceName",
            "description": "description", "endpoint_id": ep["id"]})
        await api.wait_status(f"{base}/services/instances/{inst['id']}", "RUNNING")
        ids["inst"] = inst["id"]
    return ids


async def test_whole_procedure_over_raw_http(emulator: RunningEmulator,
                                             http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    status, headers, ws = await api.call("POST", "/v1/workspaces",
                                         {"name": "apieworkspace", "description": "d"})
    assert status == 200 and HEX_ID.fullmatch(headers["X-Request-Id"])
    assert ws["name"] == "apieworkspace" and ws["create_time"].endswith("Z")
    base = f"/v1/workspaces/{ws['id']}"

    started = time.monotonic()
    ep = await api.ok("POST", f"{base}/endpoints", ENDPOINT_BODY)
    assert ep["status"] == "CREATING" and re.fullmatch(r"[0-9a-f]{32}", ep["id"])
    assert ep["reserved_resource"] == ENDPOINT_BODY["reserved_resource"]
    assert (await api.ok("GET", f"{base}/endpoints/{ep['id']}"))["status"] == "CREATING"
    running = await api.wait_status(f"{base}/endpoints/{ep['id']}", "RUNNING")
    assert time.monotonic() - started >= 0.2
    assert running["update_time"] > running["create_time"]

    model = await api.ok("POST", f"{base}/models", MODEL_BODY)
    assert set(model) == {"id", "version_id"}
    listed = await api.ok("GET", f"{base}/models", params={"id": model["id"]})
    assert listed["total"] == 1
    assert listed["models"][0]["current_version"]["id"] == model["version_id"]

    inst = await api.ok("POST", f"{base}/services/instances", {
        "source": {"id": model["id"]}, "name": "test_serviceInstanceName",
        "description": "description", "endpoint_id": ep["id"]})
    shown = await api.ok("GET", f"{base}/services/instances/{inst['id']}")
    assert shown["status"] == "CREATING"
    assert shown["source"] == {"id": model["id"], "version_id": model["version_id"]}
    await api.wait_status(f"{base}/services/instances/{inst['id']}", "RUNNING")

    async with http_session.post(
            f"{emulator.url}{base}/services/instances/{inst['id']}/invocations",
            json={"messages": [{"role": "user", "content": "hello"}], "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert HEX_ID.fullmatch(resp.headers["X-Request-Id"])
        events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    reply = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert reply == "Hello from the fabricflow emulator. You said: hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    stats = await api.stats()
    # Polling makes the exact request count timing-dependent: compare it with a floor.
    assert stats.pop("requests") >= 9
    operations = stats.pop("operations")
    creates = ("create_workspace", "create_endpoint", "create_model", "create_instance")
    assert {op: operations[op] for op in creates} == dict.fromkeys(creates, 1)
    assert (stats.pop("late_created"), stats.pop("late_pending"), stats.pop("churn_deleted")) == (0, 0, 0)
    assert stats == {
        "created": {"workspace": {"apieworkspace": 1}, "endpoint": {"apie_test": 1},
                    "model": {"LLama3-8b": 1},
                    "service_instance": {"test_serviceInstanceName": 1}},
        "live": {"workspace": 1, "endpoint": 1, "model": 1, "service_instance": 1}}


async def test_invocation_defaults_to_stream_and_honours_stream_false_and_max_tokens(
        emulator: RunningEmulator, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    ids = await provision(api)
    path = f"{ids['base']}/services/instances/{ids['inst']}/invocations"
    async with http_session.post(emulator.url + path, json={
            "messages": [{"role": "system", "content": "be nice"},
                         {"role": "user", "content": "ping"}]}) as resp:
        assert resp.content_type == "text/event-stream"
        assert sse_events(await resp.text())[-1] == "[DONE]"

    doc = await api.ok("POST", path, {"messages": [{"role": "user", "content": "hi there"}],
                                      "stream": False})
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"] == {
        "role": "assistant", "content": "Hello from the fabricflow emulator. You said: hi there"}
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"] == {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11}

    cut = await api.ok("POST", path, {"messages": [{"role": "user", "content": "hi"}],
                                      "stream": False, "max_tokens": 3})
    assert cut["choices"][0]["message"]["content"] == "Hello from the"
    assert cut["choices"][0]["finish_reason"] == "length"

    status, _, err = await api.call("POST", path, {"messages": []})
    assert (status, err["error_code"]) == (400, "FABRIC.0400")

    fresh = await api.ok("POST", f"{ids['base']}/services/instances", {
        "source": {"id": ids["model"]}, "name": "second", "endpoint_id": ids["ep"]})
    status, _, err = await api.call(
        "POST", f"{ids['base']}/services/instances/{fresh['id']}/invocations",
        {"messages": [{"role": "user", "content": "too early"}]})
    assert (status, err["error_code"]) == (400, "FABRIC.0412") and "CREATING" in err["error_msg"]


async def test_list_pagination_fuzzy_name_and_total(emulator: RunningEmulator,
                                                    http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    for i in range(12):
        await api.ok("POST", "/v1/workspaces", {"name": f"team-a-{i:02d}"})
    other = await api.ok("POST", "/v1/workspaces", {"name": "other_ws"})

    first = await api.ok("GET", "/v1/workspaces", params={"name": "team-a"})
    assert first["total"] == 12 and len(first["workspaces"]) == 10  # default limit 10
    last = await api.ok("GET", "/v1/workspaces",
                        params={"name": "team-a", "offset": 10, "limit": 5})
    assert [w["name"] for w in last["workspaces"]] == ["team-a-10", "team-a-11"]
    assert (await api.ok("GET", "/v1/workspaces", params={"name": "a-1"}))["total"] == 2
    assert (await api.ok("GET", "/v1/workspaces", params={"name": "TEAM"}))["total"] == 0
    by_id = await api.ok("GET", "/v1/workspaces", params={"id": other["id"]})
    assert [w["name"] for w in by_id["workspaces"]] == ["other_ws"]
    ids_seen = {(await api.call("GET", "/v1/workspaces"))[1]["X-Request-Id"] for _ in range(3)}
    assert len(ids_seen) == 3  # a fresh request id per response
    renamed = await api.ok("PUT", f"/v1/workspaces/{other['id']}", {"name": "other-ws2"})
    assert renamed["name"] == "other-ws2"
    status, _, err = await api.call("PUT", f"/v1/workspaces/{other['id']}", {"name": "team-a-00"})
    assert (status, err["error_code"]) == (400, "FABRIC.0409")
    everything = await api.ok("GET", "/v1/workspaces", params={"limit": 100})
    assert everything["total"] == 13 and len(everything["workspaces"]) == 13

    for params in ({"offset": -1}, {"limit": 0}, {"limit": 101}, {"limit": "ten"}):
        status, headers, err = await api.call("GET", "/v1/workspaces", params=params)
        assert status == 400 and err["error_code"] == "FABRIC.0400", params
        assert HEX_ID.fullmatch(headers["X-Request-Id"])

    base = f"/v1/workspaces/{other['id']}"
    for name in ("alpha one", "alpha two", "beta"):
        await api.ok("POST", f"{base}/endpoints", {**ENDPOINT_BODY, "name": name})
    eps = await api.ok("GET", f"{base}/endpoints", params={"name": "alpha", "limit": 1})
    assert eps["total"] == 2 and len(eps["endpoints"]) == 1
    assert "owner" in eps["endpoints"][0] and "urls" not in eps["endpoints"][0]


async def test_catalogues(emulator: RunningEmulator, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    specs = await api.ok("GET", "/v1/specs", params={"scenario": "ENDPOINT", "limit": 100})
    assert "mu.llama3.8b" in {s["spec_code"] for s in specs["spec_codes"]}
    one = await api.ok("GET", "/v1/specs", params={"spec_code": "mu.llama3.8b"})
    assert one["total"] == 1 and one["spec_codes"][0]["spec_type"] == "MU"
    models = await api.ok("GET", "/v1/base-models")
    assert models["total"] == len(models["models"]) > 0
    assert {"base_model_type", "max_tokens", "num_of_mu"} <= set(models["models"][0])


async def test_validation_errors_have_status_code_body_and_request_id(
        emulator: RunningEmulator, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    ids = await provision(api, instance=False)
    base, creating = ids["base"], await api.ok("POST", f"{ids['base']}/endpoints",
                                               {**ENDPOINT_BODY, "name": "slow"})
    missing = "00000000-0000-4000-8000-000000000000"
    cases: list[tuple[str, str, Any, int, str, str]] = [
        ("POST", "/v1/workspaces", {"name": "ab"}, 400, "FABRIC.0400", "workspace name"),
        ("POST", "/v1/workspaces", {"name": "bad name!"}, 400, "FABRIC.0400", "workspace name"),
        ("POST", "/v1/workspaces", {"name": "apieworkspace"}, 400, "FABRIC.0409",
         "already exists"),
        ("POST", "/v1/workspaces", b"{not json", 400, "FABRIC.0400", "not valid JSON"),
        ("POST", f"{base}/endpoints", {**ENDPOINT_BODY, "type": "gpu"}, 400, "FABRIC.0400",
         "endpoint type"),
        ("POST", f"{base}/endpoints", {**ENDPOINT_BODY, "name": "a/b"}, 400, "FABRIC.0400",
         "endpoint name"),
        ("POST", f"{base}/endpoints", {**ENDPOINT_BODY, "reserved_resource": {
            "mu": {"spec_code": "mu.llama3.8b", "min": 2, "max": 1}}}, 400, "FABRIC.0400",
         "must not exceed"),
        ("POST", f"{base}/endpoints", {**ENDPOINT_BODY, "reserved_resource": {
            "mu": {"spec_code": "mu.llama3.8b", "min": 0, "max": "1"}}}, 400, "FABRIC.0400",
         "integer"),
        ("POST", f"/v1/workspaces/{missing}/endpoints", ENDPOINT_BODY, 404, "FABRIC.0404",
         "does not exist"),
        ("GET", f"{base}/endpoints/{'f' * 32}", None, 404, "FABRIC.0404", "does not exist"),
        ("POST", f"{base}/models", {**MODEL_BODY, "name": "m2", "type": "CV_MODEL"}, 400,
         "FABRIC.0400", "LLM_MODEL"),
        ("POST", f"{base}/models", {**MODEL_BODY, "name": "m3", "version": {}}, 400,
         "FABRIC.0400", "version.name"),
        ("POST", f"{base}/models", MODEL_BODY, 400, "FABRIC.0409", "already exists"),
        ("POST", f"{base}/services/instances", {
            "source": {"id": ids["model"]}, "name": "x", "description": "a <b>",
            "endpoint_id": ids["ep"]}, 400, "FABRIC.0400", "must not contain"),
        ("POST", f"{base}/services/instances", {
            "source": {"id": missing}, "name": "x", "endpoint_id": ids["ep"]},
         404, "FABRIC.0404", "model"),
        ("POST", f"{base}/services/instances", {
            "source": {"id": ids["model"]}, "name": "x", "endpoint_id": creating["id"]},
         400, "FABRIC.0412", "RUNNING"),
        ("POST", f"{base}/services/instances", {
            "source": {"id": ids["model"]}, "name": "x", "endpoint_id": "nope"},
         400, "FABRIC.0400", "does not exist"),
        ("DELETE", base, None, 400, "FABRIC.0412", "still holds"),
    ]
    for method, path, body, want_status, want_code, want_text in cases:
        raw = body if isinstance(body, bytes) else None
        status, headers, err = await api.call(method, path, None if raw else body, raw=raw)
        assert (status, err["error_code"]) == (want_status, want_code), (path, body, err)
        assert want_text in err["error_msg"], (path, err)
        assert HEX_ID.fullmatch(headers["X-Request-Id"])
        assert "request_id" not in err  # only gateway errors carry it

    status, headers, err = await api.call("PATCH", "/v1/workspaces")
    assert (status, err["error_code"]) == (404, "APIGW.0101")
    assert err["request_id"] == headers["X-Request-Id"]
    assert (await api.stats())["created"]["workspace"] == {"apieworkspace": 1}


async def test_deletes_go_deleting_then_deleted_then_404(
        emulator: RunningEmulator, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    ids = await provision(api)
    base = ids["base"]
    inst_path, ep_path = f"{base}/services/instances/{ids['inst']}", f"{base}/endpoints/{ids['ep']}"

    status, _, err = await api.call("DELETE", ep_path)
    assert (status, err["error_code"]) == (400, "FABRIC.0412")  # instance still on it
    assert await api.ok("DELETE", inst_path) is None
    assert (await api.ok("GET", inst_path))["status"] == "DELETING"
    assert await api.ok("DELETE", f"{base}/models/{ids['model']}") is None
    assert await api.ok("DELETE", ep_path) == {"id": ids["ep"]}
    assert (await api.ok("GET", ep_path))["status"] == "DELETING"
    assert (await api.ok("GET", f"{base}/endpoints"))["total"] == 1

    await asyncio.sleep(0.55)  # delete_after defaults to 0.5 s
    for path in (ep_path, inst_path):
        status, _, err = await api.call("GET", path)
        assert (status, err["error_code"]) == (404, "FABRIC.0404")
    assert (await api.ok("GET", f"{base}/endpoints"))["total"] == 0
    assert (await api.ok("GET", f"{base}/services/instances"))["total"] == 0
    assert (await api.ok("GET", f"{base}/models"))["total"] == 0
    assert await api.ok("DELETE", base) is None
    status, _, err = await api.call("GET", f"{base}/endpoints")
    assert (status, err["error_code"]) == (404, "FABRIC.0404")

    stats = await api.stats()
    assert stats["live"] == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}
    assert stats["created"]["endpoint"] == {"apie_test": 1}


async def test_token_auth(emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    emulator = await emulator_factory(auth="token", token="s3cret")
    api = Api(http_session, emulator)
    for headers in ({}, {"X-Auth-Token": "wrong"}):
        status, resp_headers, err = await api.call("GET", "/v1/workspaces", headers=headers)
        assert status == 401
        assert err == {"error_code": "APIGW.0301",
                       "error_msg": "Incorrect IAM authentication information: decrypt token fail",
                       "request_id": resp_headers["X-Request-Id"]}
    listed = await api.ok("GET", "/v1/workspaces", headers={"X-Auth-Token": "s3cret"})
    assert listed == {"total": 0, "workspaces": []}
    assert (await api.stats())["requests"] == 3  # control routes need no token


async def test_aksk_auth(emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    emulator = await emulator_factory(auth="aksk", ak="AKEXAMPLE", sk="SKEXAMPLE")
    api = Api(http_session, emulator)
    status, _, err = await api.call("POST", "/v1/workspaces", {"name": "unsigned"})
    assert (status, err["error_code"]) == (401, "APIGW.0301")
    assert err["error_msg"] == ("Incorrect IAM authentication information: "
                                "verify aksk signature fail")

    async def signed(method: str, path: str, body: bytes, *, sk: str = "SKEXAMPLE",
                     now: datetime | None = None) -> tuple[int, Any]:
        req = signing.sign(method=method, url=emulator.url + path, body=body, ak="AKEXAMPLE",
                           sk=sk, headers={"Content-Type": "application/json"},
                           project_id="p" * 32, now=now)
        async with http_session.request(method, yarl.URL(req.url, encoded=True),
                                        headers=req.headers, data=body or None) as resp:
            return resp.status, await resp.json()

    status, doc = await signed("POST", "/v1/workspaces", b'{"name": "signed_ws"}')
    assert status == 200 and doc["name"] == "signed_ws"
    status, doc = await signed("GET", "/v1/workspaces?name=signed&limit=5", b"")
    assert status == 200 and doc["total"] == 1
    status, doc = await signed("GET", "/v1/workspaces", b"", sk="wrong")
    assert (status, doc["error_code"]) == (401, "APIGW.0301")
    stale = datetime.now(timezone.utc) - timedelta(hours=1)
    status, doc = await signed("GET", "/v1/workspaces", b"", now=stale)
    assert (status, doc["error_code"]) == (401, "APIGW.0301")


async def test_fail_next_fails_before_doing_anything(
        emulator: RunningEmulator, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    await api.ok("POST", "/_emulator/faults", {"fail_next": 2, "status": 503})
    for _ in range(2):
        status, _, err = await api.call("POST", "/v1/workspaces", {"name": "wanted"})
        assert (status, err["error_code"]) == (503, "APIGW.0503")
    assert (await api.stats())["created"]["workspace"] == {}
    await api.ok("POST", "/v1/workspaces", {"name": "wanted"})

    await api.ok("POST", "/_emulator/faults", {"fail_next": 1, "status": 429})
    status, headers, err = await api.call("GET", "/v1/workspaces")
    assert (status, headers["Retry-After"], err["error_code"]) == (429, "1", "APIGW.0308")
    assert err["request_id"] == headers["X-Request-Id"]
    status, _, err = await api.call("POST", "/_emulator/faults", {"fail_rate": 2})
    assert (status, err["error_code"]) == (400, "FABRIC.0400")

    await api.ok("POST", "/_emulator/faults", {"drop_next": 1})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.call("POST", "/v1/workspaces", {"name": "dropped"})
    await api.ok("POST", "/v1/workspaces", {"name": "answered"})
    assert set((await api.stats())["created"]["workspace"]) == {"wanted", "dropped", "answered"}


async def test_drop_creates_but_never_answers(emulator_factory: Any,
                                              http_session: aiohttp.ClientSession) -> None:
    emulator = await emulator_factory(drop_rate=1.0)
    api = Api(http_session, emulator)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.call("POST", "/v1/workspaces", {"name": "lost_answer"})
    listed = await api.ok("GET", "/v1/workspaces", params={"name": "lost_answer"})
    assert listed["total"] == 1  # reads are never dropped; the create did happen
    stats = await api.stats()
    assert stats["created"]["workspace"] == {"lost_answer": 1}
    assert stats["live"]["workspace"] == 1
    status, _, err = await api.call("POST", "/v1/workspaces", {"name": "lost_answer"})
    assert (status, err["error_code"]) == (400, "FABRIC.0409")  # failed creates answer


async def test_create_fail_regex_ends_in_create_failed(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    emulator = await emulator_factory(ready_after=0.1, create_fail="^doomed")
    api = Api(http_session, emulator)
    ws = await api.ok("POST", "/v1/workspaces", {"name": "failing"})
    base = f"/v1/workspaces/{ws['id']}/endpoints"
    bad = await api.ok("POST", base, {**ENDPOINT_BODY, "name": "doomed-ep"})
    good = await api.ok("POST", base, {**ENDPOINT_BODY, "name": "fine-ep"})
    assert bad["status"] == "CREATING" and "error_code" not in bad
    failed = await api.wait_status(f"{base}/{bad['id']}", "CREATE_FAILED")
    assert failed["error_code"] == "FABRIC.4001" and "doomed-ep" in failed["error_msg"]
    await api.wait_status(f"{base}/{good['id']}", "RUNNING")


async def test_seed_makes_fault_decisions_reproducible(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    async def statuses(seed: int) -> list[int]:
        emulator = await emulator_factory(fail_rate=0.5, seed=seed)
        api = Api(http_session, emulator)
        return [(await api.call("GET", "/v1/workspaces"))[0] for _ in range(30)]

    first, again, other = await statuses(7), await statuses(7), await statuses(8)
    assert first == again and first != other
    assert {200} < set(first) <= {200, 429, 500, 502, 503, 504}


async def test_stream_cut_midway_has_no_done(emulator: RunningEmulator,
                                             http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, emulator)
    ids = await provision(api)
    await api.ok("POST", "/_emulator/faults", {"cut_next": 1, "cut_after": 2})
    url = f"{emulator.url}{ids['base']}/services/instances/{ids['inst']}/invocations"
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http_session.post(url, json={"messages": [
                {"role": "user", "content": "hello"}]}) as resp:
            assert resp.status == 200
            async for line in resp.content:
                received += line
    assert len(sse_events(received.decode())) == 2 and b"[DONE]" not in received


async def test_slow_requests_and_reset(emulator_factory: Any,
                                       http_session: aiohttp.ClientSession) -> None:
    emulator = await emulator_factory(slow_rate=1.0, slow_seconds=0.3)
    api = Api(http_session, emulator)
    started = time.monotonic()
    await api.ok("POST", "/v1/workspaces", {"name": "patient"})
    assert time.monotonic() - started >= 0.3
    await api.ok("POST", "/_emulator/faults", {"slow_rate": 0})
    started = time.monotonic()
    await api.ok("GET", "/v1/workspaces")
    assert time.monotonic() - started < 0.3
    after = await api.ok("POST", "/_emulator/reset")
    assert after["live"]["workspace"] == 0 and after["requests"] == 0
    assert (await api.ok("GET", "/_emulator/faults"))["slow_rate"] == 1.0  # back to config


async def test_state_file_survives_restart(tmp_path: Any, emulator_factory: Any,
                                           http_session: aiohttp.ClientSession) -> None:
    state = str(tmp_path / "emulator.json")
    first = Api(http_session, await emulator_factory(ready_after=0.2, state_file=state))
    ws = await first.ok("POST", "/v1/workspaces", {"name": "durable"})
    ep = await first.ok("POST", f"/v1/workspaces/{ws['id']}/endpoints", ENDPOINT_BODY)

    second = Api(http_session, await emulator_factory(ready_after=0.2, state_file=state))
    path = f"/v1/workspaces/{ws['id']}/endpoints/{ep['id']}"
    assert (await second.ok("GET", path))["create_time"] == ep["create_time"]
    await second.wait_status(path, "RUNNING")
    assert (await second.stats())["created"]["workspace"] == {"durable": 1}


def test_serve_runs_until_sigterm(tmp_path: Any) -> None:
    script = ("import sys\n"
              "from orchestrator.emulator.app import serve\n"
              "from orchestrator.emulator.config import EmulatorConfig\n"
              "serve(EmulatorConfig(), '127.0.0.1', 0,"
              " on_ready=lambda url: print(url, flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        with urllib.request.urlopen(url + "/_emulator/stats", timeout=5) as resp:
            assert json.load(resp)["requests"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
