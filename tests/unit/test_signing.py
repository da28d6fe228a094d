"""SDK-HMAC-SHA256 signing against the SDK-produced vectors, plus properties."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from orchestrator.fabric.signing import (
    ALGORITHM,
    EMPTY_BODY_SHA256,
    SignatureError,
    canonical_query,
    canonical_uri,
    parse_query,
    sign,
    verify,
)

VECTORS = json.loads(
    (Path(__file__).parent.parent / "data" / "signing-vectors.json").read_text(encoding="utf-8")
)["vectors"]
SKEW = 900.0


def _when(sdk_date: str) -> datetime:
    return datetime.strptime(sdk_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def _secrets(vector: dict) -> dict[str, str]:
    return {vector["input"]["ak"]: vector["input"]["sk"]}


def _verify(vector: dict, **changes) -> str:
    """Verify the vector's signed request, with some parts replaced by ``changes``."""
    target = urlsplit(vector["expected"]["final_url"])
    request = {
        "method": vector["input"]["method"],
        "raw_path": target.path,
        "raw_query": target.query,
        "headers": dict(vector["expected"]["final_headers"]),
        "body": vector["input"]["body"].encode("utf-8"),
        "secret_for": _secrets(vector).get,
        "now": _when(vector["input"]["sdk_date"]),
        "max_clock_skew": SKEW,
    }
    request.update(changes)
    return verify(**request)


def _header_name(vector: dict, lower: str) -> str:
    return next(k for k in vector["expected"]["final_headers"] if k.lower() == lower)


def _signed_names(vector: dict) -> list[str]:
    return vector["expected"]["signed_headers"].split(";")


def _ids(vectors: list[dict]) -> list[str]:
    return [v["name"] for v in vectors]


def _is_unsigned_payload(vector: dict) -> bool:
    return vector["expected"]["canonical_request"].endswith("\nUNSIGNED-PAYLOAD")


vector_params = pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))


def test_vectors_loaded() -> None:
    assert len(VECTORS) == 25


@vector_params
def test_sign_reproduces_vector(vector: dict) -> None:
    given_, expected = vector["input"], vector["expected"]
    signed = sign(
        method=given_["method"],
        url=given_["url"],
        headers=given_["headers"],
        body=given_["body"].encode("utf-8"),
        ak=given_["ak"],
        sk=given_["sk"],
        project_id=given_["project_id"],
        security_token=given_["security_token"],
        now=_when(given_["sdk_date"]),
    )
    assert signed.canonical_request == expected["canonical_request"]
    assert signed.string_to_sign == expected["string_to_sign"]
    assert signed.headers["Authorization"] == expected["authorization"]
    assert signed.url == expected["final_url"]
    assert signed.headers == expected["final_headers"]
    assert list(signed.headers) == list(expected["final_headers"])  # same order as the SDK


@vector_params
def test_parse_query_matches_vector_pairs(vector: dict) -> None:
    raw_query = urlsplit(vector["input"]["url"]).query
    assert parse_query(raw_query) == [tuple(p) for p in vector["input"]["query_params"]]


@vector_params
def test_verify_accepts_vector(vector: dict) -> None:
    assert _verify(vector) == vector["input"]["ak"]


@vector_params
def test_verify_accepts_original_url(vector: dict) -> None:
    original = urlsplit(vector["input"]["url"])
    assert _verify(vector, raw_path=original.path, raw_query=original.query)


@vector_params
def test_verify_accepts_case_insensitive_lower_cased_header_names(vector: dict) -> None:
    headers = {k.lower(): v for k, v in vector["expected"]["final_headers"].items()}
    assert _verify(vector, headers=headers)


@vector_params
def test_verify_accepts_multidict_headers(vector: dict) -> None:
    headers = CIMultiDict(vector["expected"]["final_headers"])
    headers.add("Accept", "*/*")  # unsigned extra header added by the HTTP library
    assert _verify(vector, headers=CIMultiDictProxy(headers))


def test_non_ascii_header_value_roundtrip() -> None:
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    signed = sign(
        method="GET", url="https://h/v1/x", headers={"X-Name": " 推理 "}, body=b"",
        ak="AK", sk="SK", now=now,
    )
    assert "x-name:推理\n" in signed.canonical_request
    # What a server sees after decoding the raw UTF-8 header bytes.
    wire = {k: v.encode("utf-8").decode("utf-8") for k, v in signed.headers.items()}
    assert verify(
        method="GET", raw_path="/v1/x", raw_query="", headers=wire, body=b"",
        secret_for={"AK": "SK"}.get, now=now, max_clock_skew=SKEW,
    ) == "AK"


# --- edits that change signed content -----------------------------------------------


@vector_params
def test_verify_rejects_changed_method(vector: dict) -> None:
    other = "PATCH" if vector["input"]["method"] != "PATCH" else "GET"
    with pytest.raises(SignatureError, match="signature mismatch"):
        _verify(vector, method=other)


@vector_params
@pytest.mark.parametrize("edit", ["append", "replace"])
def test_verify_rejects_changed_path_character(vector: dict, edit: str) -> None:
    path = urlsplit(vector["expected"]["final_url"]).path
    if edit == "append":
        changed = path.rstrip("/") + "x"
    else:
        assert path.startswith("/v1/")
        changed = "/v2/" + path[4:]
    with pytest.raises(SignatureError, match="signature mismatch"):
        _verify(vector, raw_path=changed)


@vector_params
def test_verify_rejects_changed_query(vector: dict) -> None:
    query = urlsplit(vector["expected"]["final_url"]).query
    pairs = parse_query(query)
    if pairs:
        key, value = pairs[0]
        changed = canonical_query([(key, value + "x"), *pairs[1:]])
    else:
        changed = "extra=1"
    with pytest.raises(SignatureError, match="signature mismatch"):
        _verify(vector, raw_query=changed)


def _signed_header_cases() -> list:
    return [
        pytest.param(v, name, id=f"{v['name']}-{name}")
        for v in VECTORS
        for name in _signed_names(v)
    ]


@pytest.mark.parametrize(("vector", "lower"), _signed_header_cases())
def test_verify_rejects_changed_signed_header(vector: dict, lower: str) -> None:
    headers = dict(vector["expected"]["final_headers"])
    name = _header_name(vector, lower)
    if lower == "x-sdk-date":  # still well formed and within the skew, just different
        later = _when(headers[name]) + timedelta(seconds=1)
        headers[name] = later.strftime("%Y%m%dT%H%M%SZ")
    else:
        headers[name] = headers[name] + "x"
    with pytest.raises(SignatureError, match="signature mismatch"):
        _verify(vector, headers=headers)


@pytest.mark.parametrize(("vector", "lower"), _signed_header_cases())
def test_verify_rejects_missing_signed_header(vector: dict, lower: str) -> None:
    headers = dict(vector["expected"]["final_headers"])
    del headers[_header_name(vector, lower)]
    with pytest.raises(SignatureError):
        _verify(vector, headers=headers)


BODY_VECTORS = [v for v in VECTORS if v["input"]["body"]]


@pytest.mark.parametrize("vector", BODY_VECTORS, ids=_ids(BODY_VECTORS))
def test_verify_rejects_changed_body_byte(vector: dict) -> None:
    body = bytearray(vector["input"]["body"].encode("utf-8"))
    body[len(body) // 2] ^= 0x01
    if _is_unsigned_payload(vector):
        # UNSIGNED-PAYLOAD: by design the body is not covered by the signature.
        assert _verify(vector, body=bytes(body))
    else:
        with pytest.raises(SignatureError, match="signature mismatch"):
            _verify(vector, body=bytes(body))


EMPTY_BODY_VECTORS = [v for v in VECTORS if not v["input"]["body"]]


@pytest.mark.parametrize("vector", EMPTY_BODY_VECTORS, ids=_ids(EMPTY_BODY_VECTORS))
def test_verify_rejects_added_body(vector: dict) -> None:
    with pytest.raises(SignatureError, match="signature mismatch"):
        _verify(vector, body=b"{}")


# --- edits that do not change signed content ----------------------------------------


@vector_params
def test_verify_accepts_reordered_query(vector: dict) -> None:
    query = urlsplit(vector["expected"]["final_url"]).query
    reordered = "&".join(reversed(query.split("&")))
    assert _verify(vector, raw_query=reordered)


@vector_params
def test_verify_accepts_trailing_slash_toggled(vector: dict) -> None:
    path = urlsplit(vector["expected"]["final_url"]).path
    toggled = path.rstrip("/") if path.endswith("/") else path + "/"
    assert _verify(vector, raw_path=toggled)


def _swap_hex_case(text: str) -> str:
    """Flip upper/lower case of the hex digits inside every %XX escape."""
    return re.sub(r"%[0-9A-Fa-f]{2}", lambda m: m.group().swapcase(), text)


def _has_hex_letters(vector: dict) -> bool:
    escape_with_letter = r"%([A-Fa-f][0-9A-Fa-f]|[0-9][A-Fa-f])"
    return re.search(escape_with_letter, vector["expected"]["final_url"]) is not None


ESCAPED_VECTORS = [v for v in VECTORS if _has_hex_letters(v)]


def test_hex_case_cases_exist() -> None:
    assert len(ESCAPED_VECTORS) >= 5


@pytest.mark.parametrize("vector", ESCAPED_VECTORS, ids=_ids(ESCAPED_VECTORS))
def test_verify_accepts_other_hex_case(vector: dict) -> None:
    target = urlsplit(vector["expected"]["final_url"])
    raw_path, raw_query = _swap_hex_case(target.path), _swap_hex_case(target.query)
    assert (raw_path, raw_query) != (target.path, target.query)
    assert _verify(vector, raw_path=raw_path, raw_query=raw_query)


@vector_params
def test_verify_accepts_changed_underscore_header(vector: dict) -> None:
    headers = dict(vector["expected"]["final_headers"])
    headers["X_Trace_Id"] = headers.get("X_Trace_Id", "") + "changed"
    assert _verify(vector, headers=headers)


@vector_params
def test_verify_accepts_whitespace_around_header_values(vector: dict) -> None:
    headers = {k: f" \t{v}  " for k, v in vector["expected"]["final_headers"].items()}
    assert _verify(vector, headers=headers)


# --- clock, keys, messages ------------------------------------------------------------

VECTOR = VECTORS[0]
SK = VECTOR["input"]["sk"]


@pytest.mark.parametrize("offset", [-SKEW, SKEW, 0.0])
def test_verify_accepts_at_the_skew_limit(offset: float) -> None:
    now = _when(VECTOR["input"]["sdk_date"]) + timedelta(seconds=offset)
    assert _verify(VECTOR, now=now)


@pytest.mark.parametrize("offset", [-SKEW - 1, SKEW + 1, 86400.0])
def test_verify_rejects_beyond_skew(offset: float) -> None:
    now = _when(VECTOR["input"]["sdk_date"]) + timedelta(seconds=offset)
    with pytest.raises(SignatureError, match="clock skew") as caught:
        _verify(VECTOR, now=now)
    assert SK not in str(caught.value)


def test_verify_skew_check_disabled_when_not_positive() -> None:
    now = _when(VECTOR["input"]["sdk_date"]) + timedelta(days=365)
    assert _verify(VECTOR, now=now, max_clock_skew=0)


def test_verify_naive_now_is_utc() -> None:
    assert _verify(VECTOR, now=_when(VECTOR["input"]["sdk_date"]).replace(tzinfo=None))


def test_verify_rejects_unknown_access_key() -> None:
    with pytest.raises(SignatureError, match="unknown access key"):
        _verify(VECTOR, secret_for={}.get)


def test_verify_rejects_wrong_secret() -> None:
    with pytest.raises(SignatureError, match="signature mismatch") as caught:
        _verify(VECTOR, secret_for=lambda ak: SK + "x")
    assert SK not in str(caught.value)


def _break_header(name: str, value: str | None) -> dict[str, str]:
    headers = dict(VECTOR["expected"]["final_headers"])
    if value is None:
        del headers[name]
    else:
        headers[name] = value
    return headers


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("Authorization", None, "missing Authorization"),
        ("Authorization", "Bearer abc", "malformed Authorization"),
        ("Authorization", VECTOR["expected"]["authorization"].upper(), "malformed Authorization"),
        ("Authorization", VECTOR["expected"]["authorization"] + ", X=1", "malformed Authorization"),
        ("X-Sdk-Date", None, "missing X-Sdk-Date"),
        ("X-Sdk-Date", "2019-11-15T03:36:55Z", "malformed X-Sdk-Date"),
    ],
)
def test_verify_rejects_bad_auth_headers(name: str, value: str | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason) as caught:
        _verify(VECTOR, headers=_break_header(name, value))
    assert SK not in str(caught.value) and SK not in repr(caught.value)


def test_sign_does_not_expose_secret() -> None:
    signed = sign(
        method="GET", url="https://h/v1/x", headers={}, body=b"", ak="AK", sk="TOPSECRET-SK"
    )
    assert "TOPSECRET-SK" not in repr(signed)
    assert "TOPSECRET-SK" not in json.dumps([signed.url, signed.headers, signed.canonical_request])
    assert signed.headers["Authorization"].startswith(f"{ALGORITHM} Access=AK, ")


def test_sign_defaults_now_to_current_utc_time() -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    signed = sign(method="GET", url="https://h/", headers={}, body=b"", ak="AK", sk="SK")
    after = datetime.now(timezone.utc)
    assert before <= _when(signed.headers["X-Sdk-Date"]) <= after
    assert verify(
        method="GET", raw_path="/", raw_query="", headers=signed.headers, body=b"",
        secret_for={"AK": "SK"}.get, now=after, max_clock_skew=SKEW,
    ) == "AK"


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "x"}, {"a": "1", "A": "2"}, {"X-Sdk-Date": "yesterday"}],
)
def test_sign_rejects_bad_input_headers(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        sign(method="GET", url="https://h/", headers=headers, body=b"", ak="AK", sk="SK")


def test_empty_body_hash_constant() -> None:
    assert hashlib.sha256(b"").hexdigest() == EMPTY_BODY_SHA256


def test_parse_query_plus_is_a_space() -> None:
    assert parse_query("a=1+2&b=1%2B2&flag&=v&&c=") == [
        ("a", "1 2"), ("b", "1+2"), ("flag", ""), ("", "v"), ("c", ""),
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        ("//a//", "//a//"),
        ("/a b/%7e~/%2f", "/a%20b/~~//"),
        ("/%zz/100%", "/%25zz/100%25/"),
    ],
)
def test_canonical_uri_edge_cases(raw: str, expected: str) -> None:
    assert canonical_uri(raw) == expected


# --- properties -----------------------------------------------------------------------

PAIRS = st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=8)
SEGMENT_SAFE = st.sampled_from(["", "@:+!*'(),;=$&", "~-._"])


@st.composite
def raw_paths(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.text(max_size=8), max_size=5))
    safe = draw(SEGMENT_SAFE)
    path = "/" + "/".join(quote(segment, safe=safe) for segment in segments)
    return path + "/" if draw(st.booleans()) else path


def _raw_query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


@settings(max_examples=150, deadline=None)
@given(pairs=PAIRS, data=st.data())
def test_canonical_query_is_order_invariant(
    pairs: list[tuple[str, str]], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(pairs))
    assert canonical_query(shuffled) == canonical_query(pairs)


@settings(max_examples=150, deadline=None)
@given(pairs=PAIRS)
def test_canonical_query_roundtrips_through_parse_query(pairs: list[tuple[str, str]]) -> None:
    assert parse_query(canonical_query(pairs)) == sorted(pairs)


@settings(max_examples=150, deadline=None)
@given(raw=st.one_of(raw_paths(), st.text(max_size=20)))
def test_canonical_uri_is_idempotent_and_ends_with_slash(raw: str) -> None:
    once = canonical_uri(raw)
    assert once.endswith("/")
    assert canonical_uri(once) == once


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=raw_paths(),
    pairs=PAIRS,
    body=st.binary(max_size=64),
    content_type=st.sampled_from(["application/json", "application/json;charset=UTF-8"]),
    extra=st.dictionaries(
        st.sampled_from(["X-Custom", "X-Other_Name", "User-Agent"]), st.text(max_size=10)
    ),
    index=st.integers(min_value=0),
)
def test_sign_verify_roundtrip(
    method: str,
    path: str,
    pairs: list[tuple[str, str]],
    body: bytes,
    content_type: str,
    extra: dict[str, str],
    index: int,
) -> None:
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    query = _raw_query(pairs)
    url = "http://127.0.0.1:8080" + path + (f"?{query}" if query else "")
    signed = sign(
        method=method, url=url, headers={"Content-Type": content_type, **extra}, body=body,
        ak="AK", sk="SK", project_id="p1", now=now,
    )
    sent = urlsplit(signed.url)
    assert sent.path == path
    request = {
        "method": method, "raw_path": sent.path, "raw_query": sent.query,
        "headers": signed.headers, "secret_for": {"AK": "SK"}.get, "now": now,
        "max_clock_skew": SKEW,
    }
    assert verify(body=body, **request) == "AK"
    assert verify(body=body, **{**request, "raw_query": query}) == "AK"
    mutated = bytearray(body or b"\0")
    mutated[index % len(mutated)] ^= 0x80
    with pytest.raises(SignatureError, match="signature mismatch"):
        verify(body=bytes(mutated), **request)
