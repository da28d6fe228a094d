"""Server-Sent Events parser and chat-completion assembly (REFERENCE.md §11), pure.

`SSEParser` turns bytes, split anywhere, into `SSEEvent` objects following the
WHATWG event-stream rules (UTF-8, ``\\n`` / ``\\r\\n`` / ``\\r`` line endings, ``:``
comments, multi-line ``data``), with one deliberate difference: `SSEParser.close`
dispatches a final event that lacks its terminating blank line, because the
invocation API's end of stream is unconfirmed. `ChatAccumulator` folds the events of
a streamed ``chat.completion.chunk`` response into the reply text.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DONE", "ChatAccumulator", "SSEEvent", "SSEParser", "StreamProtocolError"]

DONE = "[DONE]"
"""Data payload that ends an OpenAI-style stream."""

_LINE_END = re.compile(r"\r\n|\r|\n")
_EXCERPT = 120


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched server-sent event.

    ``event`` is the ``event:`` field (None when absent). ``id`` is the last event id
    seen on the stream so far, as in the WHATWG ``lastEventId``, so it carries over to
    later events that have no ``id:`` line of their own.
    """

    data: str
    event: str | None = None
    id: str | None = None


class SSEParser:
    """Incremental event-stream parser: feed it chunks, get the completed events."""

    def __init__(self) -> None:
        """Start a parser at the beginning of a stream."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial: list[str] = []  # text of the current, unterminated line
        self._skip_lf = False  # the previous chunk ended in '\r'; a leading '\n' pairs with it
        self._at_start = True  # a byte-order mark is only skipped at the very start
        self._data: list[str] = []
        self._event: str | None = None
        self._last_id: str | None = None
        self._closed = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completed, in order."""
        if self._closed:
            raise RuntimeError("SSEParser.feed() after close()")
        return self._consume(self._decoder.decode(chunk))

    def close(self) -> list[SSEEvent]:
        """End the stream; return any event still pending (no trailing blank line needed)."""
        if self._closed:
            return []
        events = self._consume(self._decoder.decode(b"", final=True))
        self._closed = True
        if self._partial:
            line = "".join(self._partial)
            self._partial = []
            self._line(line)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _consume(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        events: list[SSEEvent] = []
        start = 0
        for match in _LINE_END.finditer(text):
            self._partial.append(text[start : match.start()])
            start = match.end()
            line = "".join(self._partial)
            self._partial = []
            event = self._line(line) if line else self._dispatch()
            if event is not None:
                events.append(event)
        if start < len(text):
            self._partial.append(text[start:])
        # A '\r' at the very end may be the first half of '\r\n' split across chunks.
        self._skip_lf = text.endswith("\r")
        return events

    def _line(self, line: str) -> None:
        """Apply one non-empty line to the pending event."""
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        # "retry" and unknown fields are ignored, as the specification says.

    def _dispatch(self) -> SSEEvent | None:
        """Emit the pending event, if it has any data, and reset for the next one."""
        data, event = self._data, self._event
        self._data, self._event = [], None
        if not data:
            return None
        return SSEEvent(data="\n".join(data), event=event, id=self._last_id)


class StreamProtocolError(ValueError):
    """A streamed data payload is not JSON or not a ``chat.completion.chunk``."""


def _excerpt(text: str) -> str:
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def _optional(obj: dict[str, Any], key: str, *, kind: type, where: str) -> Any:
    """Return ``obj[key]`` if it is None or of ``kind``; otherwise reject the chunk."""
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise StreamProtocolError(f"{where}.{key} is not a {kind.__name__}")
    return value


def _first_choice(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """Validate ``choices`` and return the choice with index 0, if present."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise StreamProtocolError("chunk has no choices list")
    found = None
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise StreamProtocolError("choice is not an object")
        if choice.get("index", position) == 0 and found is None:
            found = choice
    return found


@dataclass
class ChatAccumulator:
    """Assembles a streamed chat completion from `SSEEvent` objects.

    The reply is the concatenation of ``choices[0].delta.content`` (choice index 0
    only); ``finish_reason``, ``usage``, ``model`` and ``completion_id`` keep the last
    non-null value seen. ``done`` becomes True on ``data: [DONE]``; a stream that just
    ends leaves it False, and the caller decides whether a ``finish_reason`` suffices.
    """

    reply: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    chunk_count: int = 0
    model: str | None = None
    completion_id: str | None = None

    def add(self, event: SSEEvent) -> str:
        """Fold one event in and return the text it added ("" if none).

        Raises StreamProtocolError for a payload that is not a chunk, or for any data
        after ``[DONE]``. Whitespace-only data (a keep-alive) is ignored.
        """
        data = event.data.strip()
        if not data:
            return ""
        if self.done:
            raise StreamProtocolError(f"data after [DONE]: {_excerpt(data)!r}")
        if data == DONE:
            self.done = True
            return ""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise StreamProtocolError(f"data is not JSON: {_excerpt(data)!r}") from None
        if not isinstance(chunk, dict):
            raise StreamProtocolError(f"data is not a JSON object: {_excerpt(data)!r}")
        kind = chunk.get("object")
        if kind is not None and kind != "chat.completion.chunk":
            raise StreamProtocolError(f"unexpected object type {_excerpt(str(kind))!r}")
        if "choices" not in chunk:
            raise StreamProtocolError(f"not a chat.completion.chunk: {_excerpt(data)!r}")
        choice = _first_choice(chunk)
        usage = _optional(chunk, "usage", kind=dict, where="chunk")
        model = _optional(chunk, "model", kind=str, where="chunk")
        completion_id = _optional(chunk, "id", kind=str, where="chunk")
        text, finish_reason = "", None
        if choice is not None:
            delta = _optional(choice, "delta", kind=dict, where="choice") or {}
            text = _optional(delta, "content", kind=str, where="delta") or ""
            finish_reason = _optional(choice, "finish_reason", kind=str, where="choice")
        # Validation is complete: only now mutate, so a rejected chunk changes nothing.
        self.reply += text
        self.chunk_count += 1
        self.finish_reason = finish_reason or self.finish_reason
        self.usage = usage if usage is not None else self.usage
        self.model = model or self.model
        self.completion_id = completion_id or self.completion_id
        return text
