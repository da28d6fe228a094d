"""Huawei's official Python SDK (3.1.219) drives the emulator over loopback with AK/SK.

The SDK signs every request itself (SDK-HMAC-SHA256), serialises the bodies, parses the
answers into its own models and raises its own exceptions, so this proves the emulator speaks
the wire format a real Fabric client expects: create, show, list and delete of every resource
of the procedure, the catalogues, and a wrong secret key rejected with our code and message.

The SDK is synchronous (requests); each call runs in a worker thread (``asyncio.to_thread``)
while the emulator serves on the test's event loop. Nothing is installed at test time: the
packages come with the ``test`` extra and the module is skipped without them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip("huaweicloudsdkcore")
pytest.importorskip("huaweicloudsdkdataartsfabric")
pytest.importorskip("huaweicloudsdkdataartsfabricep")

from orchestrator.emulator.app import RunningEmulator, running_emulator  # noqa: E402
from orchestrator.emulator.config import EmulatorConfig  # noqa: E402
from orchestrator.fabric.client import Credentials, FabricClient  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # python-dateutil is not an SDK dependency; without it the SDK keeps timestamps as the
    # strings it received and says so with an ImportWarning. The test parses them itself.
    # Any other SDK warning (e.g. a TypeConversionWarning on a malformed value) stays an error.
    "ignore:Unable to convert string to datetime due to failure to import dateutil:ImportWarning"
)

AK = "HPUAEXAMPLEACCESSKEY"
SK = "sdk-conformance-secret-key-0123456789"
PROJECT_ID = "0b5633ba2b904511ad514346f4d23d4b"
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
BAD_SIGNATURE = "Incorrect IAM authentication information: verify aksk signature fail"
from tests.conftest import until


@pytest.fixture
async def emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningEmulator]:
    """An AK/SK emulator on 127.0.0.1; HOME is the test's directory, because building an SDK
    client writes ``~/.huaweicloud/application_id``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    # requests (under the SDK) honours proxy variables; loopback traffic must never leave.
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    config = EmulatorConfig(auth="aksk", ak=AK, sk=SK, ready_after=0.2, instance_ready_after=0.2,
                            delete_after=0.2)
    async with running_emulator(config, host="127.0.0.1", port=0) as running:
        yield running


class Sdk:
    """The two official SDK clients (``fabric`` and ``fabric-ep``) pointed at one URL.

    The SDK modules are imported here, after HOME points at the test's directory: importing
    ``huaweicloudsdkcore.auth`` computes the User-Agent, which creates the application id file.
    """

    def __init__(self, url: str, *, sk: str = SK) -> None:
        from huaweicloudsdkcore.auth.credentials import BasicCredentials
        from huaweicloudsdkcore.exceptions import exceptions
        from huaweicloudsdkcore.http.http_config import HttpConfig
        from huaweicloudsdkdataartsfabric import v1 as fabric
        from huaweicloudsdkdataartsfabricep import v1 as ep

        self.m, self.ep_m, self.exceptions = fabric, ep, exceptions
        config = HttpConfig.get_default_config()
        config.timeout = (5, 10)  # loopback: fail fast instead of hanging a test

        def build(client_type: Any) -> Any:
            return (client_type.new_builder()
                    .with_http_config(config)
                    .with_credentials(BasicCredentials(AK, sk, PROJECT_ID))
                    .with_endpoint(url)
                    .build())

        self.fabric = build(fabric.DataArtsFabricClient)
        self.ep = build(ep.DataArtsFabricEpClient)

    def close(self) -> None:
        """Close both clients' HTTP sessions (their keep-alive sockets)."""
        self.fabric.close()
        self.ep.close()


async def call(method: Callable[[Any], Any], request: Any) -> Any:
    """One synchronous SDK call, off the event loop the emulator runs on."""
    return await asyncio.to_thread(method, request)


def timestamp(value: Any) -> datetime:
    """A timestamp as the SDK returns it: a datetime with dateutil, else the raw string."""
    if isinstance(value, datetime):
        return value
    assert isinstance(value, str) and value.endswith("Z"), value
    return datetime.fromisoformat(value)


def assert_enum(value: Any, allowed: type) -> None:
    """The SDK turns an enum value it does not know into an empty enum object: insist on a
    plain string that is one of the class's listed values."""
    assert isinstance(value, str), f"{value!r} was not one of the SDK's {allowed.__name__} values"
    listed = {v for k, v in vars(allowed).items() if k.isupper() and isinstance(v, str)}
    assert value in listed, (value, listed)


async def test_official_sdk_drives_every_resource(emulator: RunningEmulator) -> None:
    sdk = Sdk(emulator.url)
    try:
        await _drive(sdk, emulator.url)
    finally:
        sdk.close()
    stats = await _control(emulator.url, "/_emulator/stats")
    assert stats["created"] == {"workspace": {"sdkworkspace": 1}, "endpoint": {"sdk endpoint": 1},
                                "model": {"sdk-model": 1},
                                "service_instance": {"sdk_instance": 1}}
    assert stats["live"] == {"workspace": 0, "endpoint": 0, "model": 0, "service_instance": 0}


async def _drive(sdk: Sdk, url: str) -> None:
    m, em, fabric, ep = sdk.m, sdk.ep_m, sdk.fabric, sdk.ep

    # -- workspace ---------------------------------------------------------------------------
    ws = await call(fabric.create_workspace, m.CreateWorkspaceRequest(
        body=m.CreateWorkspaceRequestInput(name="sdkworkspace", description="from the SDK")))
    assert ws.status_code == 200 and ws.name == "sdkworkspace"
    assert ws.description == "from the SDK" and ws.enterprise_project_id == "0"
    assert ws.x_request_id and REQUEST_ID.fullmatch(ws.x_request_id)
    timestamp(ws.create_time)
    listed = await call(fabric.list_workspaces, m.ListWorkspacesRequest(name="sdkwork", limit=5))
    assert listed.total == 1 and [w.id for w in listed.workspaces] == [ws.id]
    assert listed.x_request_id
    by_id = await call(fabric.list_workspaces, m.ListWorkspacesRequest(id=ws.id))
    assert [w.name for w in by_id.workspaces] == ["sdkworkspace"]

    # -- catalogues ----------------------------------------------------------------------------
    bases = await call(fabric.list_base_models, m.ListBaseModelsRequest(limit=100))
    assert bases.total == len(bases.models) > 0
    base_type = bases.models[0].base_model_type
    assert all(isinstance(b.max_tokens, int) and isinstance(b.num_of_mu, int) for b in bases.models)
    specs = await call(fabric.list_specs, m.ListSpecsRequest(scenario="ENDPOINT",
                                                             spec_types=["MU", "APU"]))
    assert specs.total == len(specs.spec_codes) > 0
    assert "mu.llama3.8b" in {s.spec_code for s in specs.spec_codes}
    for spec in specs.spec_codes:
        assert_enum(spec.spec_type, m.SpecType)
        assert spec.spec_type in ("MU", "APU") and spec.resource_type == "ENDPOINT"

    # -- endpoint ------------------------------------------------------------------------------
    created = await call(fabric.create_endpoint, m.CreateEndpointRequest(
        workspace_id=ws.id, body=m.EndpointInput(
            name="sdk endpoint", description="apie test endpoint", type="inference",
            reserved_resource=m.ReservedResource(
                mu=m.ResourceDemand(spec_code="mu.llama3.8b", min=0, max=1)))))
    assert created.status == "CREATING" and created.type == "inference"
    assert_enum(created.status, m.EndpointStatus)
    assert_enum(created.type, m.EndpointType)
    assert created.x_request_id and created.owner.domain_name
    assert created.reserved_resource.mu.spec_code == "mu.llama3.8b"
    assert (created.reserved_resource.mu.min, created.reserved_resource.mu.max) == (0, 1)
    timestamp(created.create_time), timestamp(created.update_time)
    show = m.ShowEndpointRequest(workspace_id=ws.id, endpoint_id=created.id)
    endpoint = await until(lambda: call(fabric.show_endpoint, show),
                           lambda e: e.status == "RUNNING")
    assert_enum(endpoint.runtime_env_type, m.RuntimeEnvType)
    endpoints = await call(fabric.list_endpoints, m.ListEndpointsRequest(
        workspace_id=ws.id, name="sdk endpoint", type="inference"))  # a space in the query
    assert endpoints.total == 1 and endpoints.endpoints[0].id == created.id
    assert_enum(endpoints.endpoints[0].status, m.EndpointStatus)
    none = await call(fabric.list_endpoints, m.ListEndpointsRequest(workspace_id=ws.id,
                                                                    name="端点"))  # UTF-8 query
    assert none.total == 0 and none.endpoints == []

    # -- model ---------------------------------------------------------------------------------
    model = await call(fabric.create_model_definition, m.CreateModelDefinitionRequest(
        workspace_id=ws.id, body=m.CreateModelInput(
            name="sdk-model", description="this is a apie test model", type="LLM_MODEL",
            version=m.ModelVersionInput(name="v1", description="first", config=m.ModelConfig(
                llm_model_config=m.LlmModelConfig(base_model_type=base_type,
                                                  model_path="obs://bucket/model"))))))
    assert model.id and model.version_id
    models = await call(fabric.list_models, m.ListModelsRequest(workspace_id=ws.id, id=model.id))
    assert models.total == 1
    info = models.models[0]
    assert (info.id, info.name, info.current_version.id) == (model.id, "sdk-model", model.version_id)
    assert_enum(info.type, m.ModelType)
    assert info.current_version.config.llm_model_config.base_model_type == base_type
    timestamp(info.create_time), timestamp(info.current_version.create_time)
    versions = await call(fabric.list_model_versions, m.ListModelVersionsRequest(
        workspace_id=ws.id, model_id=model.id))
    assert versions.total == 1 and [(v.id, v.name) for v in versions.versions] == \
        [(model.version_id, "v1")]

    # -- service instance (fabric-ep) -------------------------------------------------------------
    deployed = await call(ep.deploy_service_instance, em.DeployServiceInstanceRequest(
        workspace_id=ws.id, body=em.ServiceInstanceInput(
            source=em.SourceRef(id=model.id), name="sdk_instance", description="description",
            endpoint_id=created.id)))
    assert deployed.id
    show_instance = em.ShowServiceInstanceDetailRequest(workspace_id=ws.id, instance_id=deployed.id)
    instance = await until(lambda: call(ep.show_service_instance_detail, show_instance),
                           lambda i: i.status == "RUNNING")
    assert_enum(instance.status, em.StatusEnum)
    assert_enum(instance.type, em.ServiceType)
    assert (instance.source.id, instance.source.version_id) == (model.id, model.version_id)
    assert instance.endpoint_id == created.id and instance.url.address
    instances = await call(ep.list_services_instances, em.ListServicesInstancesRequest(
        workspace_id=ws.id, endpoint_id=created.id, name="sdk_"))
    assert instances.total == 1 and instances.service_instances[0].id == deployed.id
    assert_enum(instances.service_instances[0].status, em.StatusEnum)

    # -- our client reads what the SDK created, under the same AK/SK -----------------------------
    credentials = Credentials(ak=AK, sk=SK, project_id=PROJECT_ID)
    async with FabricClient(url, ep_url=url, credentials=credentials) as ours:
        assert [w.id for w in await ours.find_workspaces("sdkworkspace")] == [ws.id]
        [found_ep] = await ours.find_endpoints(ws.id, "sdk endpoint")
        assert (found_ep.id, found_ep.status) == (created.id, "RUNNING")
        found_model = await ours.get_model(ws.id, model.id)
        assert found_model is not None and found_model.current_version is not None
        assert found_model.current_version.id == model.version_id
        [found_instance] = await ours.find_service_instances(ws.id, "sdk_instance")
        assert (found_instance.id, found_instance.status) == (deployed.id, "RUNNING")
        reply = await ours.invoke(ws.id, deployed.id, {"messages": [{"role": "user",
                                                                     "content": "hi"}]})
        assert reply.reply.endswith("You said: hi")  # invocations are not in the Python SDK

    # -- teardown: instance, model, endpoint, workspace ------------------------------------------
    await call(ep.delete_service_instance, em.DeleteServiceInstanceRequest(
        workspace_id=ws.id, instance_id=deployed.id))
    assert (await call(ep.show_service_instance_detail, show_instance)).status == "DELETING"
    await until(lambda: _status_or_404(sdk, ep.show_service_instance_detail, show_instance),
                lambda status: status == 404)

    await call(fabric.cleanup_model, m.CleanupModelRequest(workspace_id=ws.id, model_id=model.id))
    models = await call(fabric.list_models, m.ListModelsRequest(workspace_id=ws.id))
    assert models.total == 0 and models.models == []

    deleted = await call(fabric.delete_endpoint, m.DeleteEndpointRequest(
        workspace_id=ws.id, endpoint_id=created.id))
    assert deleted.id == created.id and deleted.x_request_id
    assert (await call(fabric.show_endpoint, show)).status == "DELETING"
    await until(lambda: _status_or_404(sdk, fabric.show_endpoint, show),
                lambda status: status == 404)

    gone = await call(fabric.delete_workspace, m.DeleteWorkspaceRequest(workspace_id=ws.id))
    assert gone.status_code == 200 and gone.x_request_id
    listed = await call(fabric.list_workspaces, m.ListWorkspacesRequest())
    assert listed.total == 0 and listed.workspaces == []

    # -- a Fabric error, as the SDK reads it -----------------------------------------------------
    with pytest.raises(sdk.exceptions.ClientRequestException) as missing:
        await call(fabric.delete_workspace, m.DeleteWorkspaceRequest(workspace_id=ws.id))
    assert (missing.value.status_code, missing.value.error_code) == (404, "FABRIC.0404")
    assert ws.id in missing.value.error_msg
    assert REQUEST_ID.fullmatch(missing.value.request_id)


async def _status_or_404(sdk: Sdk, method: Callable[[Any], Any], request: Any) -> Any:
    """The resource's status, or 404 once it is gone."""
    try:
        return (await call(method, request)).status
    except sdk.exceptions.ClientRequestException as exc:
        assert exc.error_code == "FABRIC.0404", exc
        return exc.status_code


async def _control(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A call to the emulator's own ``/_emulator/`` routes (no auth, no faults)."""
    async with aiohttp.ClientSession() as session:  # ignores proxy variables: loopback only
        async with session.request("POST" if body is not None else "GET", url + path,
                                   json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def test_wrong_secret_key_is_rejected_with_our_code_and_message(
        emulator: RunningEmulator) -> None:
    wrong = Sdk(emulator.url, sk=SK + "-wrong")
    try:
        for method, request in (
                (wrong.fabric.list_workspaces, wrong.m.ListWorkspacesRequest()),
                (wrong.fabric.create_workspace, wrong.m.CreateWorkspaceRequest(
                    body=wrong.m.CreateWorkspaceRequestInput(name="intruder"))),
                (wrong.ep.list_services_instances,
                 wrong.ep_m.ListServicesInstancesRequest(workspace_id="0" * 36))):
            with pytest.raises(wrong.exceptions.ClientRequestException) as denied:
                await call(method, request)
            err = denied.value
            assert (err.status_code, err.error_code, err.error_msg) == \
                (401, "APIGW.0301", BAD_SIGNATURE)
            assert REQUEST_ID.fullmatch(err.request_id)
            assert SK not in str(err)
    finally:
        wrong.close()

    right = Sdk(emulator.url)
    try:
        listed = await call(right.fabric.list_workspaces, right.m.ListWorkspacesRequest())
        assert listed.total == 0  # the intruder's create never happened
    finally:
        right.close()


async def test_injected_faults_reach_the_sdk_as_gateway_errors(emulator: RunningEmulator) -> None:
    sdk = Sdk(emulator.url)
    m, exceptions = sdk.m, sdk.exceptions
    create = m.CreateWorkspaceRequest(body=m.CreateWorkspaceRequestInput(name="faulty"))
    try:
        await _control(emulator.url, "/_emulator/faults", {"fail_next": 1, "status": 503})
        with pytest.raises(exceptions.ServerResponseException) as unavailable:
            await call(sdk.fabric.list_workspaces, m.ListWorkspacesRequest())
        assert (unavailable.value.status_code, unavailable.value.error_code) == (503, "APIGW.0503")
        assert REQUEST_ID.fullmatch(unavailable.value.request_id)

        # A 429 on POST is parsed like any error (REFERENCE §5)...
        await _control(emulator.url, "/_emulator/faults", {"fail_next": 1, "status": 429})
        with pytest.raises(exceptions.ClientRequestException) as throttled:
            await call(sdk.fabric.create_workspace, create)
        assert (throttled.value.status_code, throttled.value.error_code) == (429, "APIGW.0308")
        assert REQUEST_ID.fullmatch(throttled.value.request_id)
        # ...while urllib3's retry machinery swallows a 429 on GET, body and request id too.
        await _control(emulator.url, "/_emulator/faults", {"fail_next": 1, "status": 429})
        with pytest.raises(exceptions.ClientRequestException) as swallowed:
            await call(sdk.fabric.list_workspaces, m.ListWorkspacesRequest())
        assert (swallowed.value.status_code, swallowed.value.error_code) == (429, "429")

        ws = await call(sdk.fabric.create_workspace, create)  # nothing was created before
        assert ws.name == "faulty"
    finally:
        sdk.close()

