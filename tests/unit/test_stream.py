"""Server-Sent Events parsing and chat-completion assembly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.fabric.stream import (
    DONE,
    ChatAccumulator,
    SSEEvent,
    SSEParser,
    StreamProtocolError,
)


def _parse(stream: bytes, cuts: list[int] | None = None) -> list[SSEEvent]:
    """Feed ``stream`` split at ``cuts`` (byte offsets), then close."""
    parser, events, start = SSEParser(), [], 0
    for cut in sorted(cuts or []):
        events += parser.feed(stream[start:cut])
        start = cut
    events += parser.feed(stream[start:])
    return events + parser.close()


def _chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    usage: dict | None = None,
    index: int = 0,
) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1735689600,
        "model": "llama3-8b",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
        "usage": usage,
    }


def _sse(*payloads: dict | str, eol: str = "\n") -> bytes:
    parts = [
        f"data: {p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)}{eol}{eol}"
        for p in payloads
    ]
    return "".join(parts).encode("utf-8")


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
CHAT_STREAM = _sse(
    _chunk(role="assistant"),
    _chunk("Hello"),
    _chunk(", 世界"),
    _chunk("!", finish_reason="stop"),
    _chunk(usage=USAGE) | {"choices": []},
    DONE,
)


# --- parser ---------------------------------------------------------------------------


def test_single_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: hello\n\n") == [SSEEvent(data="hello")]
    assert parser.close() == []


def test_event_waits_for_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [SSEEvent(data="a")]


def test_multiple_data_lines_joined_with_newline() -> None:
    assert _parse(b"data: a\ndata:b\ndata:  c\ndata\n\n") == [SSEEvent(data="a\nb\n c\n")]


def test_comments_and_extra_blank_lines_ignored() -> None:
    stream = b": keep-alive\n\n\n:another\ndata: x\n: inside\n\n\n\n: trailing\n"
    assert _parse(stream) == [SSEEvent(data="x")]


def test_event_without_data_is_not_dispatched() -> None:
    assert _parse(b"event: ping\n\ndata: x\n\n") == [SSEEvent(data="x")]


def test_empty_data_field_dispatches_empty_event() -> None:
    assert _parse(b"data:\n\n") == [SSEEvent(data="")]


def test_event_and_id_fields() -> None:
    stream = b"event: delta\nid: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"
    assert _parse(stream) == [
        SSEEvent(data="a", event="delta", id="7"),
        SSEEvent(data="b", event=None, id="7"),  # last event id carries over (WHATWG)
        SSEEvent(data="c", event=None, id=""),
    ]


def test_unknown_fields_and_retry_ignored() -> None:
    assert _parse(b"retry: 1000\nfoo: bar\ndata: x\n\n") == [SSEEvent(data="x")]


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_line_endings(eol: str) -> None:
    stream = f": c{eol}data: a{eol}data: b{eol}{eol}data: c{eol}{eol}".encode()
    assert _parse(stream) == [SSEEvent(data="a\nb"), SSEEvent(data="c")]


def test_crlf_split_between_cr_and_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == [SSEEvent(data="a")]
    assert parser.feed(b"\ndata: b\r\n\r\n") == [SSEEvent(data="b")]


def test_cr_then_blank_line_across_chunks() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [SSEEvent(data="a")]


def test_multibyte_character_split_across_chunks() -> None:
    data = "data: 世界\n\n".encode()
    parser = SSEParser()
    assert parser.feed(data[:7]) == []
    assert parser.feed(data[7:]) == [SSEEvent(data="世界")]


def test_byte_order_mark_skipped_at_start_only() -> None:
    assert _parse(b"\xef\xbb\xbfdata: x\n\n") == [SSEEvent(data="x")]
    assert _parse(b"\xef\xbb\xbf", [1, 2]) == []


def test_invalid_utf8_replaced() -> None:
    assert _parse(b"data: a\xffb\n\n") == [SSEEvent(data="a\ufffdb")]


def test_close_flushes_unterminated_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b") == [SSEEvent(data="a")]
    assert parser.close() == [SSEEvent(data="b")]
    assert parser.close() == []


def test_close_flushes_event_missing_only_blank_line() -> None:
    assert _parse(b"data: b\n") == [SSEEvent(data="b")]


def test_close_with_dangling_partial_character() -> None:
    assert _parse("data: 世".encode()[:-1]) == [SSEEvent(data="\ufffd")]


def test_feed_after_close_is_an_error() -> None:
    parser = SSEParser()
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed(b"data: x\n\n")


STREAM_PIECES = st.lists(
    st.one_of(
        st.builds(lambda s: f"data: {s}", st.text(max_size=6)),
        st.builds(lambda s: f": {s}", st.text(max_size=6)),
        st.builds(lambda s: f"event: {s}", st.text(max_size=6)),
        st.builds(lambda s: f"id: {s}", st.text(max_size=6)),
        st.just(""),
    ),
    max_size=12,
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    lines = draw(STREAM_PIECES)
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    # Field values must not contain line terminators themselves.
    lines = [line.replace("\r", "").replace("\n", "") for line in lines]
    return "".join(line + eol for line in lines).encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(stream=sse_streams(), data=st.data())
def test_chunk_boundaries_do_not_matter(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10))
    assert _parse(stream, cuts) == _parse(stream)


@settings(max_examples=100, deadline=None)
@given(stream=sse_streams())
def test_byte_at_a_time_equals_whole(stream: bytes) -> None:
    assert _parse(stream, list(range(len(stream)))) == _parse(stream)


@settings(max_examples=100, deadline=None)
@given(stream=sse_streams())
def test_line_ending_style_does_not_matter(stream: bytes) -> None:
    text = stream.decode().replace("\r\n", "\n").replace("\r", "\n")
    assert _parse(text.replace("\n", "\r\n").encode()) == _parse(text.encode())


# --- accumulator ----------------------------------------------------------------------


def _accumulate(stream: bytes, cuts: list[int] | None = None) -> tuple[ChatAccumulator, list[str]]:
    chat = ChatAccumulator()
    deltas = [chat.add(event) for event in _parse(stream, cuts)]
    return chat, deltas


def test_chat_stream_assembled() -> None:
    chat, deltas = _accumulate(CHAT_STREAM)
    assert deltas == ["", "Hello", ", 世界", "!", "", ""]
    assert chat.reply == "Hello, 世界!"
    assert chat.finish_reason == "stop"
    assert chat.usage == USAGE
    assert chat.done is True
    assert chat.chunk_count == 5
    assert chat.model == "llama3-8b"
    assert chat.completion_id == "chatcmpl-1"


def test_chat_stream_with_crlf() -> None:
    stream = CHAT_STREAM.replace(b"\n", b"\r\n")
    chat, _ = _accumulate(stream)
    assert (chat.reply, chat.done) == ("Hello, 世界!", True)


def test_plain_end_of_stream_without_done() -> None:
    stream = _sse(_chunk("Hi"), _chunk(" there", finish_reason="length")).rstrip(b"\n")
    chat, _ = _accumulate(stream)  # last event has no blank line; close() flushes it
    assert chat.reply == "Hi there"
    assert chat.finish_reason == "length"
    assert chat.done is False
    assert chat.usage is None


def test_last_non_null_finish_reason_and_usage_kept() -> None:
    later_usage = {"total_tokens": 9}
    stream = _sse(
        _chunk("a", finish_reason="stop", usage=USAGE),
        _chunk("b", usage=later_usage),
        _chunk("c"),
    )
    chat, _ = _accumulate(stream)
    assert (chat.reply, chat.finish_reason, chat.usage) == ("abc", "stop", later_usage)


def test_only_choice_index_zero_counts() -> None:
    chunk = _chunk("zero")
    chunk["choices"] = [
        {"index": 1, "delta": {"content": "one"}, "finish_reason": "length"},
        *chunk["choices"],
    ]
    chat, _ = _accumulate(_sse(chunk, _chunk("x", index=1)))
    assert chat.reply == "zero"
    assert chat.finish_reason is None
    assert chat.chunk_count == 2


def test_null_content_and_missing_fields_tolerated() -> None:
    chunk = {"choices": [{"delta": {"content": None}, "finish_reason": None}]}
    chat, deltas = _accumulate(_sse(chunk, {"choices": [{"index": 0}]}))
    assert deltas == ["", ""]
    assert (chat.reply, chat.model, chat.completion_id) == ("", None, None)


def test_keep_alive_data_ignored() -> None:
    chat, deltas = _accumulate(b"data:\n\ndata:  \n\n" + _sse(_chunk("a")))
    assert deltas == ["", "", "a"]
    assert chat.chunk_count == 1


def test_done_marker_with_surrounding_whitespace() -> None:
    chat, _ = _accumulate(b"data:  [DONE] \n\n")
    assert chat.done is True


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "{",
        "[1, 2]",
        '"text"',
        "{}",
        '{"error_code": "FABRIC.0500", "error_msg": "boom"}',
        '{"object": "chat.completion", "choices": []}',
        '{"choices": {}}',
        '{"choices": ["x"]}',
        '{"choices": [{"index": 0, "delta": "x"}]}',
        '{"choices": [{"index": 0, "delta": {"content": 5}}]}',
        '{"choices": [{"index": 0, "finish_reason": 1}]}',
        '{"choices": [], "usage": 3}',
    ],
)
def test_bad_payload_raises(payload: str) -> None:
    chat = ChatAccumulator()
    chat.add(SSEEvent(data=json.dumps(_chunk("kept"))))
    with pytest.raises(StreamProtocolError):
        chat.add(SSEEvent(data=payload))
    assert (chat.reply, chat.chunk_count) == ("kept", 1)  # a rejected chunk changes nothing


def test_error_message_is_short() -> None:
    with pytest.raises(StreamProtocolError) as caught:
        ChatAccumulator().add(SSEEvent(data="x" * 10_000))
    assert len(str(caught.value)) < 300


def test_data_after_done_raises() -> None:
    chat = ChatAccumulator()
    chat.add(SSEEvent(data=DONE))
    with pytest.raises(StreamProtocolError):
        chat.add(SSEEvent(data=json.dumps(_chunk("late"))))


def test_stream_protocol_error_is_value_error() -> None:
    assert issubclass(StreamProtocolError, ValueError)


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.text(max_size=8), max_size=8),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    done=st.booleans(),
    data=st.data(),
)
def test_reply_survives_any_chunking(
    pieces: list[str], eol: str, done: bool, data: st.DataObject
) -> None:
    payloads: list[dict | str] = [_chunk(p) for p in pieces]
    payloads.append(_chunk(finish_reason="stop", usage=USAGE))
    if done:
        payloads.append(DONE)
    stream = b": open" + eol.encode() + _sse(*payloads, eol=eol)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12))
    chat, deltas = _accumulate(stream, cuts)
    assert chat.reply == "".join(pieces) == "".join(deltas)
    assert (chat.finish_reason, chat.usage, chat.done) == ("stop", USAGE, done)
    assert chat.chunk_count == len(pieces) + 1
