"""Wire models of the Fabric responses fabricflow reads. Unknown fields are ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENDPOINT_FAILED = frozenset({"CREATE_FAILED", "DELETING", "DELETED", "DELETE_FAILED", "FROZEN", "INACTIVE"})
"""Endpoint statuses that end a wait for RUNNING with a failure."""

INSTANCE_FAILED = frozenset({"FAILED", "STOPPING", "STOPPED", "DELETING", "DELETED", "SUCCEEDED"})
"""Service-instance statuses that end a wait for RUNNING with a failure."""

RUNNING = "RUNNING"


class Wire(BaseModel):
    """Base of response models: extra keys are ignored, as the official SDK does."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Workspace(Wire):
    """A workspace (CreateWorkspace response, ListWorkspaces item)."""

    id: str
    name: str | None = None
    description: str | None = None
    create_time: str | None = None


class Endpoint(Wire):
    """An endpoint (CreateEndpoint/ShowEndpoint response, ListEndpoints item)."""

    id: str
    name: str | None = None
    description: str | None = None
    type: str | None = None
    status: str | None = None
    error_code: str | None = None
    error_msg: str | None = None


class ModelVersion(Wire):
    """A model version (ModelInfo.current_version)."""

    id: str | None = None
    name: str | None = None


class Model(Wire):
    """A model (ListModels item)."""

    id: str
    name: str | None = None
    description: str | None = None
    type: str | None = None
    current_version: ModelVersion | None = None


class ModelCreated(Wire):
    """CreateModelDefinition response."""

    id: str
    version_id: str | None = None


class ServiceInstance(Wire):
    """A service instance (ShowServiceInstanceDetail response, list item)."""

    id: str
    name: str | None = None
    description: str | None = None
    endpoint_id: str | None = None
    status: str | None = None
    error_code: str | None = None
    error_msg: str | None = None


class Created(Wire):
    """A create response that carries only the new ID."""

    id: str


class Page(Wire):
    """One page of a list call: ``total`` and the items under the kind's key."""

    total: int = 0
    items: list[dict[str, Any]] = Field(default_factory=list)


class ChatResult(Wire):
    """What an invocation produced."""

    reply: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0
    model: str | None = None
