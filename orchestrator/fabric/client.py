"""FabricClient: the Fabric calls the procedure needs, over one aiohttp session.

HTTP statuses and aiohttp exceptions become ``orchestrator.errors`` only through
``fabric.classify.classify``. Request headers, bodies and signed URLs are never logged or put into exceptions.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
import stamina
from pydantic import ValidationError
from yarl import URL

from orchestrator.errors import FabricError, RetryableError, TerminalError
from orchestrator.fabric import signing
from orchestrator.fabric.classify import (
    CallKind,
    classify,
)
from orchestrator.fabric.models import (
    BaseModelInfo,
    ChatResult,
    Created,
    Endpoint,
    Model,
    ModelCreated,
    ModelVersion,
    Page,
    ServiceInstance,
    Spec,
    Wire,
    Workspace,
)
from orchestrator.fabric.stream import ChatAccumulator, SSEParser, StreamProtocolError

T = TypeVar("T")

Host = Literal["fabric", "fabric-ep"]
"""Which of the two Fabric hosts serves a path (REFERENCE §1)."""
FilterValue = str | int | bool | Sequence[str] | None
"""A list filter: None is dropped, booleans become ``true``/``false``, a sequence of strings
becomes a repeated key (the SDK's ``multi`` collection format)."""

PAGE_LIMIT = 100
"""Page size of every list call (the largest Fabric allows)."""
MAX_LIST_PASSES = 6
"""Passes over a listing before ``list_all`` gives up on getting a consistent one."""
OLDEST_FIRST: Mapping[str, FilterValue] = {"sort_by": "CREATE_TIME", "order_by": "ASC"}
"""The stable order ListModels and ListServicesInstances offer: new items land on the last page,
so a create during a listing cannot shift the pages before it (the default, newest first, does)."""
MAX_INCALL_RETRY_AFTER = 5.0
"""Longest Retry-After (seconds) an in-call read retry sleeps; longer ones go to the engine."""

last_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("fabric_request_id", default=None)
"""Fabric's X-Request-Id of the last create or invocation this task sent that succeeded (the
runner logs it with the step transition that records its result, then clears it)."""


class RequestObserver(Protocol):
    """Told of every request (for metrics); called on the event loop, so it must be cheap."""

    def on_request(self, operation: str, status: int | None, seconds: float) -> None: ...

    def on_retry(self, kind: str, reason: str) -> None: ...


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
    """Connect and read timeouts in seconds; creates and invocations get their own totals.

    A create's total must stay below the job lease: a create still in the air when another
    daemon takes the job over could otherwise land after that daemon's look-up.
    """

    connect: float = 10.0
    read: float = 60.0
    invoke: float = 300.0
    create: float = 20.0


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
        max_in_flight: int = 100,
        observer: RequestObserver | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ep_url = (ep_url or base_url).rstrip("/")
        self._credentials = credentials
        self.timeouts = timeouts
        self.read_attempts = read_attempts
        self._session: aiohttp.ClientSession | None = None
        self._cache: dict[str, tuple[float, asyncio.Future[Any]]] = {}
        # Requests in flight at once (aiohttp's own connection limit is 100 too). Waiting for a
        # slot costs a future; a request built and queued inside aiohttp costs kilobytes, which
        # 10,000 jobs all polling after a restart would otherwise hold at the same moment.
        self._slots = asyncio.Semaphore(max_in_flight)
        self.observer = observer  # a daemon's metrics; settable after construction
        from orchestrator.logs import register_secrets

        register_secrets(credentials.token, credentials.ak, credentials.sk, credentials.security_token)

    def __repr__(self) -> str:
        # Never the credentials themselves: only which kind is configured.
        return (f"FabricClient(base_url={self.base_url!r}, ep_url={self.ep_url!r}, "
                f"auth={self._credentials.mode!r})")

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

    async def list_workspaces(self, **filters: FilterValue) -> list[Workspace]:
        """ListWorkspaces across all pages; filters: ``name`` (fuzzy), ``id``,
        ``enterprise_project_id``."""
        items = await self.list_all("/v1/workspaces", "workspaces", filters=filters)
        return [_parse(Workspace, i, "list workspaces") for i in items]

    async def find_workspaces(self, name: str, *, confirm: bool = False) -> list[Workspace]:
        """Workspaces whose name is exactly ``name`` (the server's filter is fuzzy); ``confirm``
        as in ``list_all``."""
        items = await self.list_all("/v1/workspaces", "workspaces", filters={"name": name}, confirm=confirm,
                                    match=_named(name))
        return [_parse(Workspace, i, "list workspaces") for i in items]

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        """The workspace with this ID, or None (there is no show call: list with ``id=``)."""
        items = await self.list_all("/v1/workspaces", "workspaces", filters={"id": workspace_id})
        found = [i for i in items if i.get("id") == workspace_id]
        return _parse(Workspace, found[0], "list workspaces") if found else None

    async def delete_workspace(self, workspace_id: str) -> None:
        """DeleteWorkspace; a workspace that is already gone raises TerminalError 404."""
        await self._json("DELETE", self.base_url, f"/v1/workspaces/{_seg(workspace_id)}",
                         kind="delete", what="delete workspace")

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

    async def list_endpoints(self, workspace_id: str, **filters: FilterValue) -> list[Endpoint]:
        """ListEndpoints across all pages (brief items); filters: ``name`` (fuzzy),
        ``endpoint_id``, ``model_id``, ``type``, ``visibility``."""
        items = await self.list_all(self._endpoints(workspace_id), "endpoints", filters=filters)
        return [_parse(Endpoint, i, "list endpoints") for i in items]

    async def find_endpoints(self, workspace_id: str, name: str, *, confirm: bool = False) -> list[Endpoint]:
        """Endpoints in the workspace named exactly ``name``; ``confirm`` as in ``list_all``."""
        items = await self.list_all(self._endpoints(workspace_id), "endpoints", filters={"name": name},
                                    confirm=confirm, match=_named(name))
        return [_parse(Endpoint, i, "list endpoints") for i in items]

    async def delete_endpoint(self, workspace_id: str, endpoint_id: str) -> None:
        """DeleteEndpoint: the endpoint goes DELETING, then DELETED (404 from then on)."""
        await self._json("DELETE", self.base_url, f"{self._endpoints(workspace_id)}/{_seg(endpoint_id)}",
                         kind="delete", what="delete endpoint")

    def _endpoints(self, workspace_id: str) -> str:
        return f"/v1/workspaces/{_seg(workspace_id)}/endpoints"

    # --- models -----------------------------------------------------------------------------

    async def create_model(self, workspace_id: str, body: dict[str, Any]) -> ModelCreated:
        """CreateModelDefinition: returns the model ID and its first version's ID."""
        data = await self._json("POST", self.base_url, f"/v1/workspaces/{_seg(workspace_id)}/models",
                                body=body, kind="create", what="create model")
        return _parse(ModelCreated, data, "create model")

    async def list_models(self, workspace_id: str, **filters: FilterValue) -> list[Model]:
        """ListModels across all pages; filters: ``name`` (fuzzy), ``id``, ``type``,
        ``visibility``, ``sort_by``, ``order_by``."""
        items = await self.list_all(self._models(workspace_id), "models", filters=filters)
        return [_parse(Model, i, "list models") for i in items]

    async def find_models(self, workspace_id: str, name: str, *, confirm: bool = False) -> list[Model]:
        """Models in the workspace named exactly ``name``, oldest first; ``confirm`` as in
        ``list_all``."""
        items = await self.list_all(self._models(workspace_id), "models",
                                    filters={"name": name, **OLDEST_FIRST}, confirm=confirm,
                                    match=_named(name))
        return [_parse(Model, i, "list models") for i in items]

    async def get_model(self, workspace_id: str, model_id: str) -> Model | None:
        """The model with this ID, or None (there is no show call: list with ``id=``)."""
        items = await self.list_all(self._models(workspace_id), "models", filters={"id": model_id})
        found = [i for i in items if i.get("id") == model_id]
        return _parse(Model, found[0], "list models") if found else None

    async def list_model_versions(
        self, workspace_id: str, model_id: str, **filters: FilterValue
    ) -> list[ModelVersion]:
        """ListModelVersions across all pages; filters: ``version_id``, ``name`` (fuzzy)."""
        path = f"{self._models(workspace_id)}/{_seg(model_id)}/versions"
        items = await self.list_all(path, "versions", filters=filters)
        return [_parse(ModelVersion, i, "list model versions") for i in items]

    async def delete_model(self, workspace_id: str, model_id: str) -> None:
        """CleanupModel: delete a model no service instance uses (at once; 404 afterwards)."""
        await self._json("DELETE", self.base_url, f"{self._models(workspace_id)}/{_seg(model_id)}",
                         kind="delete", what="delete model")

    def _models(self, workspace_id: str) -> str:
        return f"/v1/workspaces/{_seg(workspace_id)}/models"

    # --- catalogues -------------------------------------------------------------------------

    async def cached(self, key: str, load: Callable[[], Awaitable[T]], *, ttl: float = 300.0) -> T:
        """``load()`` at most once per ``ttl`` seconds for this client, for catalogues that change
        rarely (specs, base models); concurrent callers share one request, failures are not kept."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is None or (hit[0] <= now and hit[1].done()):
            hit = self._cache[key] = (now + ttl, asyncio.ensure_future(load()))
        try:
            return await asyncio.shield(hit[1])  # type: ignore[no-any-return]
        except Exception:
            if self._cache.get(key) is hit:
                del self._cache[key]
            raise

    async def list_base_models(self) -> list[BaseModelInfo]:
        """ListBaseModels: the ``base_model_type`` values a model version may name."""
        items = await self.list_all("/v1/base-models", "models")
        return [_parse(BaseModelInfo, i, "list base models") for i in items]

    async def list_specs(
        self, scenario: str | None = None, spec_code: str | None = None, *,
        spec_types: Sequence[str] = (),
    ) -> list[Spec]:
        """ListSpecs: resource specs; ``scenario`` is ``ENDPOINT`` or ``COMPUTE``, ``spec_types``
        any of ``MU``, ``APU``, ``DPU``, ... (sent as a repeated key)."""
        filters: dict[str, FilterValue] = {"scenario": scenario, "spec_code": spec_code,
                                           "spec_types": list(spec_types) or None}
        items = await self.list_all("/v1/specs", "spec_codes", filters=filters)
        return [_parse(Spec, i, "list specs") for i in items]

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

    async def list_service_instances(
        self, workspace_id: str, **filters: FilterValue
    ) -> list[ServiceInstance]:
        """ListServicesInstances across all pages (brief items); filters: ``id``, ``name``
        (fuzzy), ``endpoint_id``, ``source_id``, ``version_id``, ``type``, ``visibility``,
        ``sort_by``, ``order_by``."""
        items = await self.list_all(self._instances(workspace_id), "service_instances",
                                    filters=filters, host="fabric-ep")
        return [_parse(ServiceInstance, i, "list service instances") for i in items]

    async def find_service_instances(
        self, workspace_id: str, name: str, *, confirm: bool = False
    ) -> list[ServiceInstance]:
        """Service instances in the workspace named exactly ``name``, oldest first; ``confirm``
        as in ``list_all``."""
        items = await self.list_all(self._instances(workspace_id), "service_instances",
                                    filters={"name": name, **OLDEST_FIRST}, host="fabric-ep",
                                    confirm=confirm, match=_named(name))
        return [_parse(ServiceInstance, i, "list service instances") for i in items]

    async def delete_service_instance(self, workspace_id: str, instance_id: str) -> None:
        """DeleteServiceInstance: the instance goes DELETING, then DELETED (404 from then on)."""
        await self._json("DELETE", self.ep_url, f"{self._instances(workspace_id)}/{_seg(instance_id)}",
                         kind="delete", what="delete service instance")

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
        observer, started = self.observer, time.perf_counter()
        try:
            async with self._slots, self._send("POST", self.ep_url, path, body=payload, timeout=timeout) as resp:
                if observer is not None:
                    observer.on_request("invoke_service_instance", resp.status, time.perf_counter() - started)
                if resp.status < 400:
                    last_request_id.set(resp.headers.get("X-Request-Id"))
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
            if observer is not None and acc.chunk_count == 0:
                observer.on_request("invoke_service_instance", None, time.perf_counter() - started)
            raise RetryableError(f"{what}: stream interrupted after {acc.chunk_count} chunks "
                                 f"({type(exc).__name__})") from None
        if not acc.done and acc.finish_reason is None:
            raise RetryableError(f"{what}: stream ended after {acc.chunk_count} chunks without "
                                 "a finish_reason or [DONE]")
        return ChatResult(reply=acc.reply, finish_reason=acc.finish_reason, usage=acc.usage,
                          chunks=acc.chunk_count, model=acc.model)

    # --- plumbing ---------------------------------------------------------------------------

    async def iter_pages(
        self, path: str, key: str, *, filters: Mapping[str, FilterValue] | None = None,
        host: Host = "fabric", page_size: int | None = None,
    ) -> AsyncIterator[Page]:
        """Every page of a list call, in order, ``page_size`` (default `PAGE_LIMIT`) at a time.

        ``key`` names the items in the answer (``workspaces``, ``endpoints``, ...). Stops once
        ``total`` items have been seen (or, without a total, at a short page), or at an empty one.
        """
        limit = page_size or PAGE_LIMIT
        if not 1 <= limit <= 100:
            raise ValueError(f"page_size must be between 1 and 100, got {limit}")
        base_query = query_pairs(filters or {})
        if any(name in ("offset", "limit") for name, _ in base_query):
            raise ValueError("offset and limit are set by the pager, not by filters")
        base = self.ep_url if host == "fabric-ep" else self.base_url
        offset = 0
        while True:
            query = [*base_query, ("offset", str(offset)), ("limit", str(limit))]
            data = await self._json("GET", base, path, query=query, kind="read", what=f"list {key}")
            if not isinstance(data, dict) or not isinstance(data.get(key) or [], list):
                raise TerminalError(f"list {key}: unexpected response shape")
            items = [i for i in data.get(key) or [] if isinstance(i, dict)]
            total = data.get("total")
            page = Page(total=total if isinstance(total, int) else None, items=items)
            yield page
            offset += len(items)
            # With a total, trust it (a gateway may cap pages below `limit`); without one, a short
            # page is the last. An empty page always ends the listing.
            if not items or (offset >= page.total if page.total is not None else len(items) < limit):
                return

    async def list_all(
        self, path: str, key: str, *, filters: Mapping[str, FilterValue] | None = None,
        host: Host = "fabric", confirm: bool = False,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Every item of a list call across all pages, as raw dicts, from a consistent listing.

        Fabric pages by offset, so a resource deleted (or created) by someone else between two
        pages shifts the later ones: an item can be skipped or seen twice. A pass is accepted
        only when every page reported the same ``total``; otherwise the listing is read again.
        With ``confirm``, a second consistent pass must also find exactly the same items (what
        a look-up needs before it concludes that nothing exists and a create may go ahead).
        ``match`` keeps only the items it accepts (and only those must agree between passes:
        strangers coming and going in a busy listing do not matter). Items are de-duplicated by
        ``id``. Raises RetryableError when the listing keeps changing.
        """
        previous: list[dict[str, Any]] | None = None
        for _ in range(MAX_LIST_PASSES):
            items = await self._one_pass(path, key, filters=filters, host=host)
            if items is None:
                continue  # the total moved while paging: read it again
            if match is not None:
                items = [i for i in items if match(i)]
            if not confirm or (previous is not None and _ids(previous) == _ids(items)):
                return items
            previous = items
        raise RetryableError(f"list {key}: the listing kept changing while it was read "
                             f"({MAX_LIST_PASSES} passes)")

    async def _one_pass(
        self, path: str, key: str, *, filters: Mapping[str, FilterValue] | None, host: Host,
    ) -> list[dict[str, Any]] | None:
        """One pass over every page; None when the pages disagree on ``total``."""
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        totals: set[int | None] = set()
        async for page in self.iter_pages(path, key, filters=filters, host=host):
            totals.add(page.total)
            for item in page.items:
                item_id = item.get("id")
                if isinstance(item_id, str):
                    if item_id in seen:
                        continue
                    seen.add(item_id)
                items.append(item)
        if len(totals) > 1:
            return None
        return items

    async def _json(
        self, method: str, base: str, path: str, *, kind: CallKind, what: str,
        query: Sequence[tuple[str, str]] = (), body: dict[str, Any] | None = None,
    ) -> Any:
        if kind != "read":
            return await self._json_once(method, base, path, kind=kind, what=what, query=query, body=body)
        # Reads are retried in the call, with stamina's backoff. Entering its retry context costs
        # more CPU than the request itself (about 90 us against 120), and nearly every read
        # succeeds at once, so the first attempt goes without it; only a retryable failure enters
        # the context, which replays that failure as its own first attempt: the same attempts,
        # backoff and `stamina.retry_scheduled` log line as if it had been there from the start.
        try:
            return await self._json_once(method, base, path, kind=kind, what=what, query=query, body=body)
        except FabricError as exc:
            if self.read_attempts <= 1 or _read_backoff(exc) is False:
                raise
            failed: FabricError = exc
        replay: FabricError | None = failed
        async for attempt in stamina.retry_context(
            on=_read_backoff, attempts=self.read_attempts, wait_initial=0.2, wait_max=2.0, timeout=None,
        ):
            if attempt.num > 1 and self.observer is not None:
                self.observer.on_retry("read", retry_reason(failed))
            with attempt:
                if replay is not None:
                    replay, first = None, replay
                    raise first
                try:
                    return await self._json_once(method, base, path, kind=kind, what=what,
                                                 query=query, body=body)
                except FabricError as exc:
                    failed = exc
                    raise
        raise AssertionError("unreachable: stamina returns or raises")  # pragma: no cover

    async def _json_once(
        self, method: str, base: str, path: str, *, kind: CallKind, what: str,
        query: Sequence[tuple[str, str]], body: dict[str, Any] | None,
    ) -> Any:
        timeout = None
        if kind == "create":
            timeout = aiohttp.ClientTimeout(total=self.timeouts.create, sock_connect=self.timeouts.connect)
        observer, started = self.observer, time.perf_counter()
        try:
            async with self._slots, self._send(method, base, path, query=query, body=body,
                                               timeout=timeout) as resp:
                raw = await resp.read()
                if observer is not None:
                    observer.on_request(_operation(what), resp.status, time.perf_counter() - started)
                if resp.status >= 400:
                    raise classify(kind=kind, status=resp.status, body=raw, headers=resp.headers, what=what)
                if kind == "create":
                    last_request_id.set(resp.headers.get("X-Request-Id"))
        except FabricError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            if observer is not None:
                observer.on_request(_operation(what), None, time.perf_counter() - started)
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


_OPERATIONS: dict[str, str] = {}


def _operation(what: str) -> str:
    """The metrics label of a call: ``list workspaces`` -> ``list_workspaces`` (memoised)."""
    op = _OPERATIONS.get(what)
    if op is None:
        op = _OPERATIONS[what] = what.replace(" ", "_")
    return op


def retry_reason(exc: FabricError) -> str:
    """A short, low-cardinality reason for a retry: ``http_429``, ``connection`` or ``unknown_outcome``."""
    from orchestrator.errors import NeedsReconcileError

    if isinstance(exc, NeedsReconcileError):
        return "unknown_outcome"
    status = getattr(exc, "status", None)
    return f"http_{status}" if status else "connection"


def _named(name: str) -> Callable[[dict[str, Any]], bool]:
    """Exact-name matches only: Fabric's name filter is fuzzy."""
    return lambda item: item.get("name") == name


def _ids(items: list[dict[str, Any]]) -> list[Any]:
    return sorted(str(i.get("id")) for i in items)


def query_pairs(filters: Mapping[str, FilterValue]) -> list[tuple[str, str]]:
    """Query pairs from list filters, as the SDK sends them (see `FilterValue`)."""
    pairs: list[tuple[str, str]] = []
    for name, value in filters.items():
        if value is None:
            continue
        if isinstance(value, bool):
            pairs.append((name, "true" if value else "false"))
        elif isinstance(value, (str, int)):
            pairs.append((name, str(value)))
        else:
            pairs.extend((name, str(v)) for v in value)
    return pairs


def _read_backoff(exc: Exception) -> bool | float:
    """stamina backoff hook for reads: retry RetryableError, sleeping its Retry-After if any.

    A Retry-After longer than `MAX_INCALL_RETRY_AFTER` is not waited for here: the error goes
    up with ``retry_after`` set, and the engine schedules the step that much later.
    """
    if not isinstance(exc, RetryableError):
        return False
    if exc.retry_after is None:
        return True
    if exc.retry_after > MAX_INCALL_RETRY_AFTER:
        return False
    return exc.retry_after


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
