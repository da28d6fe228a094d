"""FabricClient: the Fabric calls the procedure needs, over one aiohttp session.

Only this module turns HTTP statuses and aiohttp exceptions into ``orchestrator.errors``, through
``classify``. Request headers, bodies and signed URLs are never logged or put into exceptions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
import stamina
from pydantic import ValidationError
from yarl import URL

from orchestrator.errors import FabricError, NeedsReconcileError, RetryableError, TerminalError
from orchestrator.fabric import signing
from orchestrator.fabric.models import (
    ChatResult,
    Created,
    Endpoint,
    Model,
    ModelCreated,
    ServiceInstance,
    Wire,
    Workspace,
)
from orchestrator.fabric.stream import ChatAccumulator, SSEParser, StreamProtocolError

CallKind = Literal["read", "create", "delete", "invoke"]
PAGE_LIMIT = 100
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Credentials:
    """How to authenticate: an IAM token, AK/SK, or nothing (the local emulator)."""

    token: str | None = field(default=None, repr=False)
    ak: str | None = field(default=None, repr=False)
    sk: str | None = field(default=None, repr=False)
    project_id: str | None = None
    security_token: str | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        """``token``, ``aksk`` or ``none``."""
        if self.ak and self.sk:
            return "aksk"
        return "token" if self.token else "none"


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts in seconds; invocations get their own total."""

    connect: float = 10.0
    read: float = 60.0
    invoke: float = 300.0


def parse_error_body(body: bytes) -> tuple[str | None, str | None]:
    """Fabric's ``(error_code, error_msg)`` from an error body, as the official SDK reads it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return None, text[:500] or None
    return _find_error(data)


def _find_error(data: Any) -> tuple[str | None, str | None]:
    if not isinstance(data, dict):
        return None, None
    for code_key, msg_key in (("error_code", "error_msg"), ("errorCode", "errorMsg"), ("code", "message")):
        if code_key in data and msg_key in data:
            return str(data[code_key]), str(data[msg_key])
    for value in data.values():
        if isinstance(value, dict):
            found = _find_error(value)
            if found != (None, None):
                return found
    return None, None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify(
    *,
    kind: CallKind,
    status: int | None = None,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    exc: BaseException | None = None,
    what: str = "request",
) -> FabricError:
    """Map one failed call to the error tree: the single place that knows statuses."""
    sent_create = kind in ("create", "invoke")
    if exc is not None:
        if isinstance(exc, aiohttp.ClientConnectorError):
            # The connection was never made, so the request never reached Fabric.
            return RetryableError(f"{what}: cannot connect: {exc.os_error or exc}")
        reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        cls = NeedsReconcileError if sent_create else RetryableError
        return cls(f"{what}: no complete response ({reason})")
    assert status is not None
    headers = headers or {}
    code, message = parse_error_body(body)
    request_id = headers.get("X-Request-Id") or headers.get("x-request-id")
    text = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    common = dict(status=status, code=code or str(status), request_id=request_id)
    if status == 429 or status in (502, 503, 504):
        return RetryableError(text, retry_after=parse_retry_after(headers.get("Retry-After")), **common)
    if status in (500, 408):
        # The server may have acted before failing: a create must be reconciled, a read retried.
        cls = NeedsReconcileError if sent_create else RetryableError
        return cls(text, retry_after=parse_retry_after(headers.get("Retry-After")), **common)
    return TerminalError(text, **common)


class FabricClient:
    """Async client for the Fabric (``fabric``) and Fabric-EP (``fabric-ep``) hosts.

    Use as an async context manager; it owns one ``ClientSession`` for its life.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ep_url: str | None = None,
        credentials: Credentials = Credentials(),
        timeouts: Timeouts = Timeouts(),
        read_attempts: int = 3,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ep_url = (ep_url or base_url).rstrip("/")
        self._credentials = credentials
        self.timeouts = timeouts
        self.read_attempts = read_attempts
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FabricClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeouts.connect, sock_read=self.timeouts.read
            ),
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- workspaces -------------------------------------------------------------------------

    async def create_workspace(self, body: dict[str, Any]) -> Workspace:
        """CreateWorkspace."""
        data = await self._json("POST", self.base_url, "/v1/workspaces", body=body, kind="create",
                                what="create workspace")
        return _parse(Workspace, data, "create workspace")

    async def find_workspaces(self, name: str) -> list[Workspace]:
        """Workspaces whose name is exactly ``name`` (the server's filter is fuzzy)."""
        items = await self._list_all("/v1/workspaces", "workspaces", {"name": name}, base=self.base_url)
        return [_parse(Workspace, i, "list workspaces") for i in items if i.get("name") == name]

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        """The workspace with this ID, or None (there is no show call: list with ``id=``)."""
        items = await self._list_all("/v1/workspaces", "workspaces", {"id": workspace_id}, base=self.base_url)
        found = [i for i in items if i.get("id") == workspace_id]
        return _parse(Workspace, found[0], "list workspaces") if found else None

    # --- endpoints --------------------------------------------------------------------------

    async def create_endpoint(self, workspace_id: str, body: dict[str, Any]) -> Endpoint:
        """CreateEndpoint (asynchronous: the endpoint starts CREATING)."""
        data = await self._json("POST", self.base_url, f"/v1/workspaces/{_seg(workspace_id)}/endpoints",
                                body=body, kind="create", what="create endpoint")
        return _parse(Endpoint, data, "create endpoint")

    async def show_endpoint(self, workspace_id: str, endpoint_id: str) -> Endpoint:
        """ShowEndpoint."""
        path = f"/v1/workspaces/{_seg(workspace_id)}/endpoints/{_seg(endpoint_id)}"
        data = await self._json("GET", self.base_url, path, kind="read", what="show endpoint")
        return _parse(Endpoint, data, "show endpoint")

    async def find_endpoints(self, workspace_id: str, name: str) -> list[Endpoint]:
        """Endpoints in the workspace named exactly ``name``."""
        items = await self._list_all(f"/v1/workspaces/{_seg(workspace_id)}/endpoints", "endpoints",
                                     {"name": name}, base=self.base_url)
        return [_parse(Endpoint, i, "list endpoints") for i in items if i.get("name") == name]

    # --- models -----------------------------------------------------------------------------

    async def create_model(self, workspace_id: str, body: dict[str, Any]) -> ModelCreated:
        """CreateModelDefinition: returns the model ID and its first version's ID."""
        data = await self._json("POST", self.base_url, f"/v1/workspaces/{_seg(workspace_id)}/models",
                                body=body, kind="create", what="create model")
        return _parse(ModelCreated, data, "create model")

    async def find_models(self, workspace_id: str, name: str) -> list[Model]:
        """Models in the workspace named exactly ``name``."""
        items = await self._list_all(f"/v1/workspaces/{_seg(workspace_id)}/models", "models",
                                     {"name": name}, base=self.base_url)
        return [_parse(Model, i, "list models") for i in items if i.get("name") == name]

    # --- service instances ------------------------------------------------------------------

    def _instances(self, workspace_id: str) -> str:
        return f"/v1/workspaces/{_seg(workspace_id)}/services/instances"

    async def create_service_instance(self, workspace_id: str, body: dict[str, Any]) -> Created:
        """DeployServiceInstance on the fabric-ep host."""
        data = await self._json("POST", self.ep_url, self._instances(workspace_id), body=body,
                                kind="create", what="create service instance")
        return _parse(Created, data, "create service instance")

    async def show_service_instance(self, workspace_id: str, instance_id: str) -> ServiceInstance:
        """ShowServiceInstanceDetail."""
        path = f"{self._instances(workspace_id)}/{_seg(instance_id)}"
        data = await self._json("GET", self.ep_url, path, kind="read", what="show service instance")
        return _parse(ServiceInstance, data, "show service instance")

    async def find_service_instances(self, workspace_id: str, name: str) -> list[ServiceInstance]:
        """Service instances in the workspace named exactly ``name``."""
        items = await self._list_all(self._instances(workspace_id), "service_instances",
                                     {"name": name}, base=self.ep_url)
        return [_parse(ServiceInstance, i, "list service instances") for i in items if i.get("name") == name]

    # --- invocation -------------------------------------------------------------------------

    async def invoke(
        self,
        workspace_id: str,
        instance_id: str,
        body: dict[str, Any],
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> ChatResult:
        """A streamed chat completion; ``on_text`` sees each piece of the reply as it arrives."""
        what = "invoke service instance"
        path = f"{self._instances(workspace_id)}/{_seg(instance_id)}/invocations"
        payload = {**body, "stream": True}
        timeout = aiohttp.ClientTimeout(total=self.timeouts.invoke, sock_connect=self.timeouts.connect,
                                        sock_read=self.timeouts.read)
        acc = ChatAccumulator()
        try:
            async with self._send("POST", self.ep_url, path, body=payload, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise classify(kind="invoke", status=resp.status, body=await resp.read(),
                                   headers=resp.headers, what=what)
                if resp.content_type == "application/json":
                    return _completion(await resp.read(), on_text)
                parser = SSEParser()
                async for chunk in resp.content.iter_any():
                    for event in parser.feed(chunk):
                        _feed(acc, event, on_text)
                try:
                    for event in parser.close():
                        _feed(acc, event, on_text)
                except StreamProtocolError:
                    # An unterminated last event means the connection closed mid-line.
                    raise RetryableError(f"{what}: stream cut mid-event after {acc.chunk_count} "
                                         "chunks") from None
        except FabricError:
            raise
        except StreamProtocolError as exc:
            raise TerminalError(f"{what}: malformed stream: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(f"{what}: stream interrupted after {acc.chunk_count} chunks "
                                 f"({type(exc).__name__})") from None
        if not acc.done and acc.finish_reason is None:
            raise RetryableError(f"{what}: stream ended after {acc.chunk_count} chunks without "
                                 "a finish_reason or [DONE]")
        return ChatResult(reply=acc.reply, finish_reason=acc.finish_reason, usage=acc.usage,
                          chunks=acc.chunk_count, model=acc.model)

    # --- plumbing ---------------------------------------------------------------------------

    async def _list_all(
        self, path: str, key: str, query: dict[str, str], *, base: str
    ) -> list[dict[str, Any]]:
        """Every item of a list call, across all pages."""
        items: list[dict[str, Any]] = []
        offset = 0
        while True:
            page_query = [*query.items(), ("offset", str(offset)), ("limit", str(PAGE_LIMIT))]
            data = await self._json("GET", base, path, query=page_query, kind="read", what=f"list {key}")
            if not isinstance(data, dict) or not isinstance(data.get(key, []), list):
                raise TerminalError(f"list {key}: unexpected response shape")
            page = data.get(key) or []
            items.extend(i for i in page if isinstance(i, dict))
            offset += len(page)
            total = data.get("total")
            if not page or (isinstance(total, int) and offset >= total):
                return items

    async def _json(
        self, method: str, base: str, path: str, *, kind: CallKind, what: str,
        query: Sequence[tuple[str, str]] = (), body: dict[str, Any] | None = None,
    ) -> Any:
        if kind == "read":
            async for attempt in stamina.retry_context(
                on=RetryableError, attempts=self.read_attempts, wait_initial=0.2, wait_max=2.0,
                timeout=None,
            ):
                with attempt:
                    return await self._json_once(method, base, path, kind=kind, what=what,
                                                 query=query, body=body)
        return await self._json_once(method, base, path, kind=kind, what=what, query=query, body=body)

    async def _json_once(
        self, method: str, base: str, path: str, *, kind: CallKind, what: str,
        query: Sequence[tuple[str, str]], body: dict[str, Any] | None,
    ) -> Any:
        try:
            async with self._send(method, base, path, query=query, body=body) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise classify(kind=kind, status=resp.status, body=raw, headers=resp.headers, what=what)
        except FabricError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise classify(kind=kind, exc=exc, what=what) from None
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise TerminalError(f"{what}: response is not JSON", status=resp.status,
                                request_id=resp.headers.get("X-Request-Id")) from None

    def _send(
        self, method: str, base: str, path: str, *, query: Sequence[tuple[str, str]] = (),
        body: dict[str, Any] | None = None, timeout: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("FabricClient used outside 'async with'")
        data = b"" if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        qs = signing.canonical_query(query)
        url = base + path + (f"?{qs}" if qs else "")
        headers = {"Content-Type": "application/json"}
        creds = self._credentials
        if creds.mode == "aksk":
            signed = signing.sign(method=method, url=url, headers=headers, body=data, ak=creds.ak or "",
                                  sk=creds.sk or "", project_id=creds.project_id,
                                  security_token=creds.security_token)
            url, headers = signed.url, dict(signed.headers)
        elif creds.mode == "token":
            headers["X-Auth-Token"] = creds.token or ""
        kwargs: dict[str, Any] = {"data": data or None, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        return self._session.request(method, URL(url, encoded=True), **kwargs)


def _seg(value: str) -> str:
    """A path segment, percent-encoded with no safe characters (as the SDK does)."""
    from urllib.parse import quote

    return quote(value, safe="")


def _parse(model: type[Wire], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise TerminalError(f"{what}: unexpected response ({problems})") from None


def _feed(acc: ChatAccumulator, event: Any, on_text: Callable[[str], None] | None) -> None:
    text = acc.add(event)
    if text and on_text is not None:
        on_text(text)


def _completion(raw: bytes, on_text: Callable[[str], None] | None) -> ChatResult:
    """A non-streamed ``chat.completion`` answer."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        reply = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise TerminalError("invoke service instance: unexpected completion shape") from None
    if on_text is not None and reply:
        on_text(reply)
    return ChatResult(reply=reply, finish_reason=choice.get("finish_reason"), usage=data.get("usage"),
                      chunks=1, model=data.get("model"))
