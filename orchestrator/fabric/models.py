"""Wire models of the Fabric responses fabricflow reads (REFERENCE.md §6–§10).

Every field the reference lists is accepted; unknown keys are ignored and absent keys become
None, as the official SDK's deserializer does. Timestamps stay the strings Fabric sent
(ISO-8601 UTC), so a format change on the server cannot turn a good answer into an error.
Free-form objects (``config``, ``ray_resource``) stay plain dicts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENDPOINT_FAILED = frozenset({"CREATE_FAILED", "DELETING", "DELETED", "DELETE_FAILED", "FROZEN", "INACTIVE"})
"""Endpoint statuses that end a wait for RUNNING with a failure."""

INSTANCE_FAILED = frozenset({"FAILED", "STOPPING", "STOPPED", "DELETING", "DELETED", "SUCCEEDED"})
"""Service-instance statuses that end a wait for RUNNING with a failure."""

RUNNING = "RUNNING"
"""The status a created endpoint or service instance is waited for."""

Timestamp = str | int | float | None
"""``create_time`` and friends: ISO-8601 text from Fabric; epoch numbers are tolerated."""


class Wire(BaseModel):
    """Base of response models: extra keys are ignored, as the official SDK does."""

    model_config = ConfigDict(extra="ignore", frozen=True)


# --- small shared objects -------------------------------------------------------------------


class Owner(Wire):
    """Who owns an endpoint (``owner``)."""

    domain_name: str | None = None
    domain_id: str | None = None
    user_name: str | None = None
    user_id: str | None = None


class User(Wire):
    """A user reference (``create_user``, ``update_user``)."""

    domain_name: str | None = None
    user_name: str | None = None


class Url(Wire):
    """An address of an endpoint or service instance; ``ApiInvoke`` is the REST API."""

    name: str | None = None
    address: str | None = None
    type: str | None = None
    token: str | None = Field(default=None, repr=False)


class ResourceDemand(Wire):
    """``{spec_code, min, max}``: the MU reservation of an endpoint or instance."""

    spec_code: str | None = None
    min: int | None = None
    max: int | None = None


class ResourceDef(Wire):
    """``{spec_code, warm_up_num, max_num}``: an APU or DPU reservation."""

    spec_code: str | None = None
    warm_up_num: int | None = None
    max_num: int | None = None


class ReservedResource(Wire):
    """``reserved_resource`` of an endpoint."""

    mu: ResourceDemand | None = None
    apu: ResourceDef | None = None
    dpu: ResourceDef | None = None


class CapRef(Wire):
    """``cap``: a reference to a capability and its version."""

    cap_id: str | None = None
    version_id: str | None = None


class TokensQuota(Wire):
    """``tokens_quota`` of an endpoint."""

    total: int | None = None
    used: int | None = None
    expire_time: Timestamp = None


class SourceRef(Wire):
    """``source`` of a service instance: the model (or service) and its version."""

    id: str | None = None
    version_id: str | None = None


# --- resources ------------------------------------------------------------------------------


class Workspace(Wire):
    """A workspace (CreateWorkspace response, ListWorkspaces item)."""

    id: str
    name: str | None = None
    description: str | None = None
    create_time: Timestamp = None
    create_domain_name: str | None = None
    create_user_name: str | None = None
    metastore_id: str | None = None
    access_url: str | None = None
    enterprise_project_id: str | None = None


class Endpoint(Wire):
    """An endpoint (CreateEndpoint/ShowEndpoint response; ListEndpoints items stop at
    ``error_msg``)."""

    id: str
    name: str | None = None
    description: str | None = None
    type: str | None = None
    status: str | None = None
    visibility: str | None = None
    create_time: Timestamp = None
    update_time: Timestamp = None
    owner: Owner | None = None
    cap: CapRef | None = None
    custom_image_id: str | None = None
    reserved_resource: ReservedResource | None = None
    ray_resource: dict[str, Any] | None = None
    error_code: str | None = None
    error_msg: str | None = None
    urls: list[Url] | None = None
    business_engine_instance_ids: list[str] | None = None
    tokens_quota: TokensQuota | None = None
    runtime_env_type: str | None = None
    config: dict[str, Any] | None = None


class ModelVersion(Wire):
    """A model version (ModelInfo.current_version, ListModelVersions item)."""

    id: str | None = None
    name: str | None = None
    description: str | None = None
    cap_white_list: list[str] | None = None
    config: dict[str, Any] | None = None
    create_time: Timestamp = None
    create_user: User | None = None

    @property
    def base_model_type(self) -> str | None:
        """``config.llm_model_config.base_model_type``, if set."""
        llm = (self.config or {}).get("llm_model_config") or {}
        return llm.get("base_model_type") if isinstance(llm, dict) else None


class Model(Wire):
    """A model definition (ListModels item; there is no show call and no status)."""

    id: str
    name: str | None = None
    description: str | None = None
    type: str | None = None
    visibility: str | None = None
    create_time: Timestamp = None
    update_time: Timestamp = None
    current_version: ModelVersion | None = None
    create_user: User | None = None
    update_user: User | None = None


class ModelCreated(Wire):
    """CreateModelDefinition response."""

    id: str
    version_id: str | None = None


class ServiceInstance(Wire):
    """A service instance (ShowServiceInstanceDetail response; list items stop at ``type``)."""

    id: str
    name: str | None = None
    description: str | None = None
    endpoint_id: str | None = None
    status: str | None = None
    visibility: str | None = None
    source: SourceRef | None = None
    create_time: Timestamp = None
    update_time: Timestamp = None
    duration: int | None = None
    create_user: User | None = None
    type: str | None = None
    update_user: User | None = None
    url: Url | None = None
    config: dict[str, Any] | None = None
    error_code: str | None = None
    error_msg: str | None = None


class Created(Wire):
    """A create response that carries only the new ID."""

    id: str


# --- catalogues -----------------------------------------------------------------------------


class BaseModelInfo(Wire):
    """A ListBaseModels item: a ``base_model_type`` a model version may name."""

    base_model_type: str
    max_tokens: int | None = None
    num_of_mu: int | None = None


class Spec(Wire):
    """A ListSpecs item: a ``spec_code`` an endpoint or instance may reserve."""

    spec_code: str
    spec_type: str | None = None
    resource_type: str | None = None
    stride: int | None = None
    unit: str | None = None
    min_stride_num: int | None = None
    max_stride_num: int | None = None
    usage_measure_id: int | None = None
    usage_factor: str | int | float | None = None
    stride_num_whitelist: list[int] | None = None


# --- lists and invocations ------------------------------------------------------------------


class Page(Wire):
    """One page of a list call: ``total`` (all matches) and the items under the kind's key."""

    total: int | None = None
    items: list[dict[str, Any]] = Field(default_factory=list)


class ChatResult(Wire):
    """What an invocation produced."""

    reply: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0
    model: str | None = None
