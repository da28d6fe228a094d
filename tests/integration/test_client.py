"""FabricClient against the real emulator on loopback: every call, pagination, errors, faults
and both kinds of authentication."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from orchestrator.emulator.app import RunningEmulator
from orchestrator.errors import NeedsReconcileError, RetryableError, TerminalError
from orchestrator.fabric import client as client_module
from orchestrator.fabric.client import Credentials, FabricClient, _read_backoff, query_pairs
from orchestrator.fabric.models import Endpoint, ServiceInstance

REQUEST_ID = re.compile(r"[0-9a-f]{32}")
ENDPOINT_BODY = {"name": "apie_test", "description": "apie test endpoint", "type": "inference",
                 "reserved_resource": {"mu": {"spec_code": "mu.llama3.8b", "min": 0, "max": 1}}}
MODEL_BODY = {"name": "LLama3-8b", "description": "this is a apie test model", "type": "LLM_MODEL",
              "version": {"name": "v1", "description": "first",
                          "config": {"llm_model_config": {"base_model_type": "LLAMA_3_8B",
                                                          "model_path": "obs://bucket/llama3"}}}}
HELLO = {"messages": [{"role": "user", "content": "hello"}]}
AK, SK = "AKEXAMPLEAKEXAMPLE", "SKsecret-do-not-leak-0123456789"
TOKEN = "MIIToken-secret-do-not-leak-9876543210"
SECURITY_TOKEN = "STS-temporary-token-do-not-leak"
from tests.conftest import until


@asynccontextmanager
async def connect(emulator: RunningEmulator, credentials: Credentials = Credentials()
                  ) -> AsyncIterator[FabricClient]:
    async with FabricClient(emulator.url, ep_url=emulator.url, credentials=credentials) as client:
        yield client


async def control(emulator: RunningEmulator, method: str, path: str,
                  body: dict[str, Any] | None = None) -> Any:
    """A call to the emulator's own /_emulator/ routes (no auth, no faults)."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, emulator.url + path, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def running_endpoint(client: FabricClient, ws_id: str, body: dict[str, Any] = ENDPOINT_BODY
                           ) -> Endpoint:
    created = await client.create_endpoint(ws_id, body)
    assert created.status == "CREATING"
    return await until(lambda: client.show_endpoint(ws_id, created.id),
                       lambda e: e.status == "RUNNING")


async def running_instance(client: FabricClient, ws_id: str, endpoint_id: str, model_id: str,
                           name: str = "test_serviceInstanceName") -> ServiceInstance:
    created = await client.create_service_instance(
        ws_id, {"source": {"id": model_id}, "name": name, "description": "description",
                "endpoint_id": endpoint_id})
    return await until(lambda: client.show_service_instance(ws_id, created.id),
                       lambda i: i.status == "RUNNING")


async def provision(client: FabricClient, endpoint_body: dict[str, Any] = ENDPOINT_BODY
                    ) -> tuple[str, str, str, str]:
    """Workspace, RUNNING endpoint, model and RUNNING instance; returns their ids."""
    ws = await client.create_workspace({"name": "apieworkspace"})
    ep = await running_endpoint(client, ws.id, endpoint_body)
    model = await client.create_model(ws.id, MODEL_BODY)
    inst = await running_instance(client, ws.id, ep.id, model.id)
    return ws.id, ep.id, model.id, inst.id


# -- every call ---------------------------------------------------------------------------

async def test_every_call_from_create_to_teardown(emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        assert "apieworkspace" not in [w.name for w in await client.list_workspaces()]
        ws = await client.create_workspace({"name": "apieworkspace", "description": "apie ws"})
        assert (ws.name, ws.description, ws.enterprise_project_id) == ("apieworkspace", "apie ws", "0")
        assert ws.create_time and ws.access_url
        assert await client.get_workspace(ws.id) == ws
        assert [w.id for w in await client.list_workspaces(id=ws.id)] == [ws.id]
        assert await client.find_workspaces("apieworkspace") == [ws]

        # Catalogues validate what the bodies name.
        base_types = {m.base_model_type for m in await client.list_base_models()}
        assert "LLAMA_3_8B" in base_types
        assert all(m.max_tokens and m.num_of_mu for m in await client.list_base_models())
        endpoint_specs = await client.list_specs(scenario="ENDPOINT")
        assert "mu.llama3.8b" in {s.spec_code for s in endpoint_specs}
        assert {s.resource_type for s in endpoint_specs} == {"ENDPOINT"}
        [mu] = await client.list_specs(spec_code="mu.llama3.8b")
        assert (mu.spec_type, mu.unit) == ("MU", "MU")
        assert {s.spec_type for s in await client.list_specs(spec_types=["APU", "DPU"])} \
            == {"APU", "DPU"}

        ep = await running_endpoint(client, ws.id)
        assert ep.reserved_resource is not None and ep.reserved_resource.mu is not None
        assert (ep.reserved_resource.mu.spec_code, ep.reserved_resource.mu.min) == ("mu.llama3.8b", 0)
        assert ep.owner is not None and ep.create_time and ep.update_time
        assert [e.id for e in await client.list_endpoints(ws.id)] == [ep.id]
        assert [e.id for e in await client.list_endpoints(ws.id, type="inference")] == [ep.id]
        assert await client.list_endpoints(ws.id, type="ray") == []
        assert [e.status for e in await client.find_endpoints(ws.id, "apie_test")] == ["RUNNING"]

        created = await client.create_model(ws.id, MODEL_BODY)
        assert created.version_id
        model = await client.get_model(ws.id, created.id)
        assert model is not None and model.current_version is not None
        assert (model.name, model.type, model.current_version.id) == \
            ("LLama3-8b", "LLM_MODEL", created.version_id)
        assert model.current_version.base_model_type == "LLAMA_3_8B"
        assert [m.id for m in await client.find_models(ws.id, "LLama3-8b")] == [created.id]
        assert [m.id for m in await client.list_models(ws.id, sort_by="NAME", order_by="ASC")] \
            == [created.id]
        versions = await client.list_model_versions(ws.id, created.id)
        assert [(v.id, v.name) for v in versions] == [(created.version_id, "v1")]
        assert await client.list_model_versions(ws.id, created.id, name="nomatch") == []
        assert await client.get_model(ws.id, "0" * 36) is None

        inst = await running_instance(client, ws.id, ep.id, created.id)
        assert inst.source is not None and inst.source.id == created.id
        assert inst.source.version_id == created.version_id
        assert inst.url is not None and inst.url.address and inst.url.address.endswith("/invocations")
        assert inst.endpoint_id == ep.id and inst.type == "LLM_MODEL"
        listed = await client.list_service_instances(ws.id, endpoint_id=ep.id)
        assert [(i.id, i.status) for i in listed] == [(inst.id, "RUNNING")]
        assert await client.list_service_instances(ws.id, source_id="nomatch") == []
        assert [i.id for i in await client.find_service_instances(ws.id, inst.name or "")] \
            == [inst.id]

        seen: list[str] = []
        result = await client.invoke(ws.id, inst.id, HELLO, on_text=seen.append)
        assert result.reply == "Hello from the fabricflow emulator. You said: hello"
        assert "".join(seen) == result.reply and result.finish_reason == "stop"

        # Teardown in the reference's order; every delete then answers 404 ("already gone").
        await client.delete_service_instance(ws.id, inst.id)
        assert (await client.show_service_instance(ws.id, inst.id)).status == "DELETING"
        await until(lambda: client.list_service_instances(ws.id), lambda items: items == [])
        with pytest.raises(TerminalError) as gone:
            await client.show_service_instance(ws.id, inst.id)
        assert gone.value.status == 404
        with pytest.raises(TerminalError) as gone:
            await client.delete_service_instance(ws.id, inst.id)
        assert (gone.value.status, gone.value.code) == (404, "FABRIC.0404")

        await client.delete_model(ws.id, created.id)
        assert await client.get_model(ws.id, created.id) is None
        with pytest.raises(TerminalError) as gone:
            await client.delete_model(ws.id, created.id)
        assert gone.value.status == 404

        await client.delete_endpoint(ws.id, ep.id)
        assert (await client.show_endpoint(ws.id, ep.id)).status == "DELETING"
        await until(lambda: client.list_endpoints(ws.id), lambda items: items == [])
        with pytest.raises(TerminalError) as gone:
            await client.delete_endpoint(ws.id, ep.id)
        assert gone.value.status == 404

        await client.delete_workspace(ws.id)
        assert await client.get_workspace(ws.id) is None
        with pytest.raises(TerminalError) as gone:
            await client.delete_workspace(ws.id)
        assert gone.value.status == 404
    stats = await control(emulator, "GET", "/_emulator/stats")
    assert stats["live"] == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}


async def test_delete_refused_while_in_use_is_terminal_400(emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        ws_id, ep_id, model_id, _ = await provision(client)
        for delete in (lambda: client.delete_model(ws_id, model_id),
                       lambda: client.delete_endpoint(ws_id, ep_id),
                       lambda: client.delete_workspace(ws_id)):
            with pytest.raises(TerminalError) as refused:
                await delete()
            assert (refused.value.status, refused.value.code) == (400, "FABRIC.0412")


# -- pagination and exact names -----------------------------------------------------------

async def test_lists_gather_every_page_of_more_than_100(emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        names = [f"ws-{n:03d}" for n in range(120)]
        for name in names:
            await client.create_workspace({"name": name})
        before = (await control(emulator, "GET", "/_emulator/stats"))["requests"]
        listed = await client.list_workspaces()
        assert [w.name for w in listed] == names
        after = (await control(emulator, "GET", "/_emulator/stats"))["requests"]
        assert after - before == 2  # pages of 100 and 20

        pages = [page async for page in client.iter_pages("/v1/workspaces", "workspaces",
                                                          filters={"name": "ws-1"}, page_size=8)]
        assert [len(p.items) for p in pages] == [8, 8, 4]  # ws-100 .. ws-119
        assert {p.total for p in pages} == {20}


async def test_small_pages_dedupe_and_filter_encoding(
        emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "PAGE_LIMIT", 3)
    async with connect(emulator) as client:
        ws = await client.create_workspace({"name": "paging"})
        for n in range(7):
            await client.create_model(ws.id, {**MODEL_BODY, "name": f"model {n}"})
        # Newest first (the default sort): a model created between two pages shifts the
        # second page by one. The pages disagree on the total, so list_all reads the listing
        # again rather than trust it, and reports every model once, the new one included.
        real_json = client._json
        received: list[int] = []

        async def json_then_create(*args: Any, **kwargs: Any) -> Any:
            answer = await real_json(*args, **kwargs)
            received.append(len(answer["models"]))
            if len(received) == 1:
                await asyncio.sleep(0.002)  # a later create_time (milliseconds) than the rest
                await real_json("POST", client.base_url, f"/v1/workspaces/{ws.id}/models",
                                kind="create", what="create model",
                                body={**MODEL_BODY, "name": "model late"})
            return answer

        monkeypatch.setattr(client, "_json", json_then_create)
        listed = await client.list_models(ws.id)
        assert received == [3, 3, 2, 3, 3, 2]  # a pass with totals 7, 8, 8; then a consistent one
        assert len(listed) == len({m.id for m in listed}) == 8
        assert {m.name for m in listed} == {f"model {n}" for n in range(7)} | {"model late"}
        monkeypatch.undo()

        with pytest.raises(ValueError):
            [p async for p in client.iter_pages("/v1/workspaces", "workspaces", page_size=101)]
        with pytest.raises(ValueError):
            await client.list_all("/v1/workspaces", "workspaces", filters={"limit": 5})
    assert query_pairs({"a": None, "b": True, "c": False, "d": 3, "e": ["x", "y"], "f": "z"}) == \
        [("b", "true"), ("c", "false"), ("d", "3"), ("e", "x"), ("e", "y"), ("f", "z")]


async def test_find_keeps_exact_names_when_the_server_filter_is_fuzzy(
        emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        for name in ("alpha", "alpha-2", "xalpha", "beta"):
            await client.create_workspace({"name": name})
        assert {w.name for w in await client.list_workspaces(name="alpha")} == \
            {"alpha", "alpha-2", "xalpha"}
        assert [w.name for w in await client.find_workspaces("alpha")] == ["alpha"]
        assert await client.find_workspaces("alph") == []

        ws = (await client.find_workspaces("alpha"))[0]
        for name in ("apie_test", "apie_test 2", "my apie_test"):
            await client.create_endpoint(ws.id, {**ENDPOINT_BODY, "name": name})
        assert len(await client.list_endpoints(ws.id, name="apie_test")) == 3
        assert [e.name for e in await client.find_endpoints(ws.id, "apie_test")] == ["apie_test"]

        for name in ("LLama3-8b", "LLama3-8b-v2"):
            await client.create_model(ws.id, {**MODEL_BODY, "name": name})
        assert [m.name for m in await client.find_models(ws.id, "LLama3-8b")] == ["LLama3-8b"]

        ep = await running_endpoint(client, ws.id, {**ENDPOINT_BODY, "name": "serving"})
        model = (await client.find_models(ws.id, "LLama3-8b"))[0]
        for name in ("svc", "svc-b"):
            await running_instance(client, ws.id, ep.id, model.id, name=name)
        assert len(await client.list_service_instances(ws.id, name="svc")) == 2
        assert [i.name for i in await client.find_service_instances(ws.id, "svc")] == ["svc"]


# -- errors -------------------------------------------------------------------------------

async def test_errors_carry_status_code_message_and_request_id(emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        with pytest.raises(TerminalError) as bad:
            await client.create_workspace({"name": "no!"})
        err = bad.value
        assert (err.status, err.code) == (400, "FABRIC.0400")
        assert "Invalid workspace name" in err.message and "HTTP 400" in str(err)
        assert err.request_id and REQUEST_ID.fullmatch(err.request_id)
        assert err.as_dict() == {"code": "FABRIC.0400", "message": err.message,
                                 "request_id": err.request_id}

        with pytest.raises(TerminalError) as missing:
            await client.show_endpoint("0" * 36, "1" * 32)
        err404 = missing.value
        assert (err404.status, err404.code) == (404, "FABRIC.0404")
        assert "does not exist" in err404.message
        assert err404.request_id and REQUEST_ID.fullmatch(err404.request_id)
        assert err404.request_id != err.request_id

        ws = await client.create_workspace({"name": "errors"})
        with pytest.raises(TerminalError) as dup:
            await client.create_workspace({"name": "errors"})
        assert (dup.value.status, dup.value.code) == (400, "FABRIC.0409")
        with pytest.raises(TerminalError) as not_running:
            ep = await client.create_endpoint(ws.id, ENDPOINT_BODY)
            model = await client.create_model(ws.id, MODEL_BODY)
            await client.create_service_instance(ws.id, {"source": {"id": model.id}, "name": "x",
                                                         "endpoint_id": ep.id})
        assert (not_running.value.status, not_running.value.code) == (400, "FABRIC.0412")


async def test_reads_retry_503_and_429_creates_do_not(emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        await client.create_workspace({"name": "retried"})
        await control(emulator, "POST", "/_emulator/faults", {"fail_next": 2, "status": 503})
        assert [w.name for w in await client.list_workspaces()] == ["retried"]
        await control(emulator, "POST", "/_emulator/faults", {"fail_next": 1, "status": 429})
        assert await client.get_workspace("nope") is None

        await control(emulator, "POST", "/_emulator/faults", {"fail_next": 3, "status": 503})
        with pytest.raises(RetryableError) as exhausted:
            await client.list_workspaces()  # read_attempts=3: all three fail
        assert (exhausted.value.status, exhausted.value.code) == (503, "APIGW.0503")

        await control(emulator, "POST", "/_emulator/faults", {"fail_next": 1, "status": 429})
        with pytest.raises(RetryableError) as throttled:
            await client.create_workspace({"name": "throttled"})
        assert (throttled.value.status, throttled.value.code) == (429, "APIGW.0308")
        assert throttled.value.retry_after == 1.0
        assert await client.find_workspaces("throttled") == []  # nothing was created


def test_read_backoff_honours_short_retry_after_only() -> None:
    assert _read_backoff(RetryableError("x")) is True
    assert _read_backoff(RetryableError("x", retry_after=1.5)) == 1.5
    assert _read_backoff(RetryableError("x", retry_after=0.0)) == 0.0
    assert _read_backoff(RetryableError("x", retry_after=60)) is False  # the engine waits
    assert _read_backoff(TerminalError("x", status=400)) is False
    assert _read_backoff(NeedsReconcileError("x")) is False


async def test_dropped_create_needs_reconcile_and_exists(emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        await control(emulator, "POST", "/_emulator/faults", {"drop_next": 1})
        with pytest.raises(NeedsReconcileError):
            await client.create_workspace({"name": "dropped"})
        [found] = await client.find_workspaces("dropped")
        assert found.name == "dropped"


async def test_cut_stream_is_retryable(emulator: RunningEmulator) -> None:
    async with connect(emulator) as client:
        ws_id, _, _, inst_id = await provision(client)
        await control(emulator, "POST", "/_emulator/faults", {"cut_next": 1, "cut_after": 2})
        seen: list[str] = []
        with pytest.raises(RetryableError):
            await client.invoke(ws_id, inst_id, HELLO, on_text=seen.append)
        assert "".join(seen) == "Hello from the"  # the role chunk, then one piece of the reply
        result = await client.invoke(ws_id, inst_id, HELLO)
        assert result.finish_reason == "stop"


async def test_cold_start_delays_only_the_first_invocation_of_a_min_0_endpoint(
        emulator_factory: Any) -> None:
    emulator = await emulator_factory(ready_after=0.05, instance_ready_after=0.05, cold_start=0.5)
    async with connect(emulator) as client:
        ws_id, _, model_id, inst_id = await provision(client)

        async def timed() -> float:
            started = time.monotonic()
            await client.invoke(ws_id, inst_id, HELLO)
            return time.monotonic() - started

        first, again = await asyncio.gather(timed(), timed())  # both wait behind one start
        assert first >= 0.45 and again >= 0.45
        assert await timed() < 0.45

        warm_body = {**ENDPOINT_BODY, "name": "always warm",
                     "reserved_resource": {"mu": {"spec_code": "mu.llama3.8b", "min": 1,
                                                  "max": 1}}}
        warm = await running_endpoint(client, ws_id, warm_body)
        inst = await running_instance(client, ws_id, warm.id, model_id, name="warm instance")
        started = time.monotonic()
        await client.invoke(ws_id, inst.id, HELLO)
        assert time.monotonic() - started < 0.45


# -- authentication -----------------------------------------------------------------------

def _assert_secret_free(*objects: object, secrets: tuple[str, ...]) -> None:
    for obj in objects:
        for text in (str(obj), repr(obj)):
            for secret in secrets:
                assert secret not in text, f"secret leaked in {text!r}"


async def test_token_auth(emulator_factory: Any) -> None:
    emulator = await emulator_factory(auth="token", token=TOKEN)
    good = Credentials(token=TOKEN)
    async with connect(emulator, good) as client:
        ws = await client.create_workspace({"name": "with-token"})
        assert await client.get_workspace(ws.id) is not None
        _assert_secret_free(client, good, secrets=(TOKEN,))
    wrong = Credentials(token=TOKEN + "x")
    async with connect(emulator, wrong) as client:
        with pytest.raises(TerminalError) as denied:
            await client.list_workspaces()
        err = denied.value
        assert (err.status, err.code) == (401, "APIGW.0301")
        assert "decrypt token fail" in err.message
        assert err.request_id and REQUEST_ID.fullmatch(err.request_id)
        _assert_secret_free(err, client, wrong, secrets=(TOKEN,))


@pytest.mark.parametrize("security_token", [None, SECURITY_TOKEN])
async def test_aksk_auth(emulator_factory: Any, security_token: str | None) -> None:
    emulator = await emulator_factory(auth="aksk", ak=AK, sk=SK, ready_after=0.05,
                                      instance_ready_after=0.05)
    good = Credentials(ak=AK, sk=SK, project_id="0" * 32, security_token=security_token)
    async with connect(emulator, good) as client:
        ws_id, _, _, inst_id = await provision(client)
        # Non-ASCII bodies and queries with spaces are signed over the bytes actually sent.
        await client.create_endpoint(ws_id, {**ENDPOINT_BODY, "name": "端点 one"})
        assert [e.name for e in await client.find_endpoints(ws_id, "端点 one")] == ["端点 one"]
        assert (await client.invoke(ws_id, inst_id, HELLO)).finish_reason == "stop"
        await client.delete_service_instance(ws_id, inst_id)
        _assert_secret_free(client, good, secrets=(SK, SECURITY_TOKEN))

    without_project = Credentials(ak=AK, sk=SK)
    async with connect(emulator, without_project) as client:
        assert [w.name for w in await client.list_workspaces()] == ["apieworkspace"]

    wrong = Credentials(ak=AK, sk=SK[:-1] + "X", project_id="0" * 32,
                        security_token=security_token)
    async with connect(emulator, wrong) as client:
        for call in (client.list_workspaces, lambda: client.create_workspace({"name": "nope"})):
            with pytest.raises(TerminalError) as denied:
                await call()
            err = denied.value
            assert (err.status, err.code) == (401, "APIGW.0301")
            assert err.message.endswith("verify aksk signature fail")
            _assert_secret_free(err, client, wrong, secrets=(SK, SK[:-1] + "X", SECURITY_TOKEN))
    stats = await control(emulator, "GET", "/_emulator/stats")
    assert "nope" not in stats["created"]["workspace"]
