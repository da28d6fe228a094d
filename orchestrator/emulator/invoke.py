"""Invocations (REFERENCE.md §11): a deterministic chat completion, streamed as SSE.

The reply is fixed and mentions the last user message, so tests can assert on it. A
request without ``stream`` streams too: the official example omits the field and the docs
say the API answers in streaming mode.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from .common import child_of
from .errors import invalid, wrong_state
from .keys import CONFIG, FAULTS
from .resources import Resource, Store
from .validation import json_body

ROLES = ("system", "user", "assistant", "tool", "developer")
WORDS_PER_CHUNK = 3
DEFAULT_MAX_TOKENS = 4096  # [DOC] max_tokens 0 means the default
# Per service instance id: the monotonic time its scaled-to-zero endpoint is warm again.
WARM_AT = web.AppKey("warm_at", dict)


def _content_text(content: Any) -> str:
    """Message content as text: a string, or OpenAI-style parts ``[{type, text}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return " ".join(str(p.get("text", "")) for p in content)
    raise invalid("messages[].content must be a string or a list of content parts")


def _check_number(body: dict[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(f"{key} must be a number between {low:g} and {high:g}")


def parse_request(body: dict[str, Any]) -> tuple[str, int, int, bool]:
    """Validate a ChatCompletionRequest.

    Returns (last user message, prompt tokens, max tokens, stream?).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages is required and must be a non-empty list")
    if len(messages) > 100000:
        raise invalid("messages must hold at most 100000 items")
    texts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise invalid(f"messages[{index}] must be an object with role and content")
        if message["role"] not in ROLES:
            raise invalid(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        texts.append((message["role"], _content_text(message["content"])))
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise invalid("max_tokens must not be combined with max_completion_tokens")
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise invalid("max_tokens must be a non-negative integer")
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "frequency_penalty", -2, 2)
    _check_number(body, "presence_penalty", -2, 2)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean")
    last_user = next((t for role, t in reversed(texts) if role == "user"), texts[-1][1])
    prompt_tokens = sum(len(t.split()) for _, t in texts)
    return last_user, prompt_tokens, limit or DEFAULT_MAX_TOKENS, stream


def reply_words(last_user: str, max_tokens: int) -> tuple[list[str], str]:
    """The reply as words (one word = one token here) and its finish_reason."""
    words = f"Hello from the fabricflow emulator. You said: {last_user}".split()
    if len(words) > max_tokens:
        return words[:max_tokens], "length"
    return words, "stop"


async def invoke(request: web.Request) -> web.StreamResponse:
    store, res = child_of(request, "service_instance", "instance_id")
    status = store.status(res)
    if status != "RUNNING":
        raise wrong_state(f"The service instance {res.id} is {status}; only a RUNNING "
                          "instance can be invoked")
    body = await json_body(request)
    last_user, prompt_tokens, max_tokens, stream = parse_request(body)
    words, finish = reply_words(last_user, max_tokens)
    await _cold_start(request, store, res)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
             "total_tokens": prompt_tokens + len(words)}
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.get("model") or res.name, "system_fingerprint": "fabricflow-emulator"}
    if not stream:
        return web.json_response({
            **base, "object": "chat.completion", "usage": usage,
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": " ".join(words)}}]})
    return await _stream(request, base, words, finish, usage)


def _scales_to_zero(store: Store, res: Resource) -> bool:
    """Whether the instance's endpoint reserves ``min: 0`` MU (nothing kept warm)."""
    endpoint = store.resources.get(res.fields["endpoint_id"])
    if endpoint is None:
        return False
    mu = (endpoint.fields.get("reserved_resource") or {}).get("mu") or {}
    return mu.get("min") == 0


async def _cold_start(request: web.Request, store: Store, res: Resource) -> None:
    """Delay the first invocation of a scaled-to-zero instance by ``cold_start`` seconds.

    The first call fixes when the instance is warm; calls that arrive during the start wait
    for the same moment, as they would behind a real scale-up, and later calls not at all.
    """
    delay = request.app[CONFIG].cold_start
    if delay <= 0 or not _scales_to_zero(store, res):
        return
    warm_at: dict[str, float] = request.app[WARM_AT]
    ready = warm_at.setdefault(res.id, store.clock() + delay)
    wait = ready - store.clock()
    if wait > 0:
        await asyncio.sleep(wait)


def _chunks(base: dict[str, Any], words: list[str], finish: str,
            usage: dict[str, int]) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], reason: str | None = None,
              used: dict[str, int] | None = None) -> dict[str, Any]:
        return {**base, "object": "chat.completion.chunk", "usage": used,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    pieces = [" ".join(words[i:i + WORDS_PER_CHUNK]) for i in range(0, len(words),
                                                                     WORDS_PER_CHUNK)]
    # Leading spaces on later pieces, so concatenating the deltas gives the reply exactly.
    contents = [piece if i == 0 else f" {piece}" for i, piece in enumerate(pieces)]
    return [chunk({"role": "assistant", "content": ""}),
            *(chunk({"content": content}) for content in contents),
            chunk({}, finish, usage)]


async def _stream(request: web.Request, base: dict[str, Any], words: list[str], finish: str,
                  usage: dict[str, int]) -> web.StreamResponse:
    events = _chunks(base, words, finish, usage)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    cut = request.app[FAULTS].take_cut(len(events))
    delay = request.app[CONFIG].stream_chunk_delay
    try:
        for index, event in enumerate(events):
            if index == cut:
                # Closing mid-body leaves the chunked encoding unfinished: the client sees
                # a payload error and no [DONE], as when a gateway drops a long stream.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            if delay > 0:
                await asyncio.sleep(delay)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; nothing left to tell it
    return response


def add_routes(app: web.Application) -> None:
    """Register the invocation route (and the cold-start bookkeeping it needs)."""
    app[WARM_AT] = {}
    app.router.add_post(
        "/v1/workspaces/{workspace_id}/services/instances/{instance_id}/invocations", invoke)
