"""SDK-HMAC-SHA256 request signing and verification (REFERENCE.md §4), pure.

`sign` reproduces what ``huaweicloudsdkcore`` 3.1.219 does for every request
(``BasicCredentials.sign_request``): it adds the credential headers, the date,
the host and the ``Authorization`` header, and returns the URL to send, whose
query is the canonical query string. `verify` is the server half used by the
emulator. Both are pure: no clock unless `sign` is given none, no I/O.

The secret key is only ever an argument; it never appears in a return value,
an exception message or a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, UTC
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

__all__ = [
    "ALGORITHM",
    "EMPTY_BODY_SHA256",
    "SignatureError",
    "SignedRequest",
    "canonical_query",
    "canonical_uri",
    "parse_query",
    "sign",
    "verify",
]

ALGORITHM = "SDK-HMAC-SHA256"
"""Name of the only signing algorithm supported (the SDK default)."""

EMPTY_BODY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
"""Payload hash used whenever the body is empty, even with UNSIGNED-PAYLOAD."""

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
"""Value of ``X-Sdk-Content-Sha256`` added for non-JSON content types."""

DATE_FORMAT = "%Y%m%dT%H%M%SZ"
"""Format of the ``X-Sdk-Date`` header."""

_AUTHORIZATION = re.compile(
    r"^SDK-HMAC-SHA256 Access=([^,]+), SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$"
)
# Content types whose body the SDK hashes; anything else is sent UNSIGNED-PAYLOAD.
_HASHED_CONTENT_TYPES = ("application/json", "application/bson")


class SignatureError(Exception):
    """Signature verification failed; str() is a short reason (never contains the secret)."""


@dataclass(frozen=True)
class SignedRequest:
    """A signed request: what to send, plus the intermediate strings for debugging."""

    url: str
    """The URL to send: original path unchanged, query replaced by the canonical query."""
    headers: dict[str, str] = field(repr=False)
    """Every header after signing (input headers, values stripped, plus the added ones)."""
    canonical_request: str = field(repr=False)
    """The exact string that was hashed into the string to sign."""
    string_to_sign: str = field(repr=False)
    """``SDK-HMAC-SHA256\\n<date>\\n<hex sha256 of canonical_request>``."""


def _encode(text: str) -> str:
    """Percent-encode everything but ``A-Z a-z 0-9 - _ . ~`` (UTF-8, upper-case hex)."""
    return quote(text, safe="~")


def canonical_uri(raw_path: str) -> str:
    """Canonical URI of a path as sent on the wire (REFERENCE §4.2).

    The path is percent-decoded completely (so ``%2F`` becomes a separator), split on
    ``/``, each segment re-encoded, and a trailing ``/`` appended if missing.
    """
    segments = unquote(raw_path).split("/")
    path = "/".join(_encode(segment) for segment in segments)
    return path if path.endswith("/") else path + "/"


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Decode a raw query string into ``(key, value)`` pairs, in order.

    Semantics are exactly ``urllib.parse.parse_qsl(raw_query, keep_blank_values=True)``,
    which is how the signing vectors define the pairs the SDK signer received: ``%XX``
    escapes are decoded as UTF-8, a bare key gives ``(key, "")``, empty segments
    (``a=1&&b=2``) are skipped and a raw ``+`` decodes to a space (form encoding). A
    literal plus must therefore be sent as ``%2B``; `sign` always emits the canonical
    query, which writes ``%20`` and ``%2B``, so its own URLs never contain a raw ``+``.
    """
    return parse_qsl(raw_query, keep_blank_values=True)


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Canonical query string: pairs sorted on the decoded strings, then encoded.

    Sorting before encoding is an SDK quirk (``zeta`` < ``é``, ``a.b`` < ``a/b``).
    """
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in sorted(pairs))


def _find(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works on plain dicts and multidicts."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _put(headers: dict[str, str], name: str, value: str) -> None:
    """Set ``name``, dropping any differently-cased duplicate first."""
    for key in [k for k in headers if k.lower() == name.lower() and k != name]:
        del headers[key]
    headers[name] = value


def _payload_hash(body: bytes, content_sha256: str | None) -> str:
    """Payload rule of §4.2: empty body, else the declared marker, else SHA-256."""
    if not body:
        return EMPTY_BODY_SHA256
    if content_sha256 is not None:
        return content_sha256
    return hashlib.sha256(body).hexdigest()


def _hex_sha256(text: str) -> str:
    # surrogateescape: a server that decoded undecodable header bytes with
    # surrogateescape (aiohttp does) gets the original wire bytes back here.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _canonical_request(
    *,
    method: str,
    raw_path: str,
    pairs: Iterable[tuple[str, str]],
    signed: list[tuple[str, str]],
    payload_hash: str,
) -> str:
    """Assemble the canonical request from (lower-case name, stripped value) pairs."""
    headers_block = "".join(f"{name}:{value}\n" for name, value in signed)
    names = ";".join(name for name, _ in signed)
    return "\n".join(
        (method.upper(), canonical_uri(raw_path), canonical_query(pairs), headers_block,
         names, payload_hash)
    )


def _string_to_sign(date: str, canonical_request: str) -> str:
    return f"{ALGORITHM}\n{date}\n{_hex_sha256(canonical_request)}"


def _signature(sk: str, string_to_sign: str) -> str:
    return hmac.new(sk.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _format_now(now: datetime | None) -> str:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is not None:
        now = now.astimezone(UTC)
    return now.strftime(DATE_FORMAT)


def sign(
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    ak: str,
    sk: str,
    project_id: str | None = None,
    security_token: str | None = None,
    now: datetime | None = None,
) -> SignedRequest:
    """Sign a request the way the Huawei Cloud Python SDK does (REFERENCE §3.2, §4).

    ``url`` is absolute with the path exactly as it will go on the wire; its query is
    decoded with `parse_query`. ``now`` (naive means UTC) defaults to the current time
    and is ignored when ``headers`` already carry ``X-Sdk-Date``. Raises ValueError when
    the headers already contain ``Authorization``, repeat a name in different case, or
    carry a malformed ``X-Sdk-Date``.
    """
    names = [name.lower() for name in headers]
    if len(set(names)) != len(names):
        raise ValueError("header names must be unique, case-insensitively")
    if "authorization" in names:
        raise ValueError("request already carries an Authorization header")
    parts = urlsplit(url)
    pairs = parse_query(parts.query)
    out = {name: value.strip() for name, value in headers.items()}
    if project_id is not None:
        _put(out, "X-Project-Id", project_id.strip())
    if security_token is not None:
        _put(out, "X-Security-Token", security_token.strip())
    # Case-sensitive on purpose: the SDK looks up exactly "Content-Type" here.
    content_type = out.get("Content-Type")
    if content_type is not None and not content_type.startswith(_HASHED_CONTENT_TYPES):
        _put(out, "X-Sdk-Content-Sha256", UNSIGNED_PAYLOAD)
    date = _find(out, "X-Sdk-Date")
    if date is None:
        date = _format_now(now)
        out["X-Sdk-Date"] = date
    else:
        datetime.strptime(date, DATE_FORMAT)  # ValueError on a malformed caller value
    if _find(out, "Host") is None:
        out["Host"] = parts.netloc.rpartition("@")[2]
    signed = sorted((name.lower(), value) for name, value in out.items() if "_" not in name)
    canonical = _canonical_request(
        method=method,
        raw_path=parts.path,
        pairs=pairs,
        signed=signed,
        payload_hash=_payload_hash(body, _find(out, "X-Sdk-Content-Sha256")),
    )
    to_sign = _string_to_sign(date, canonical)
    signed_names = ";".join(name for name, _ in signed)
    out["Authorization"] = (
        f"{ALGORITHM} Access={ak}, SignedHeaders={signed_names}, "
        f"Signature={_signature(sk, to_sign)}"
    )
    final_url = urlunsplit((parts.scheme, parts.netloc, parts.path, canonical_query(pairs), ""))
    return SignedRequest(
        url=final_url, headers=out, canonical_request=canonical, string_to_sign=to_sign
    )


def _parse_date(value: str | None, *, now: datetime, max_clock_skew: float) -> str:
    """Check ``X-Sdk-Date`` is present, well formed and (optionally) close to ``now``."""
    if value is None:
        raise SignatureError("missing X-Sdk-Date header")
    value = value.strip()
    try:
        date = datetime.strptime(value, DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise SignatureError("malformed X-Sdk-Date header") from None
    if max_clock_skew > 0:
        current = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        if abs((current - date).total_seconds()) > max_clock_skew:
            raise SignatureError("X-Sdk-Date outside the allowed clock skew")
    return value


def verify(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    body: bytes,
    secret_for: Callable[[str], str | None],
    now: datetime,
    max_clock_skew: float,
) -> str:
    """Verify a received request (REFERENCE §4.4) and return its access key.

    ``raw_path`` and ``raw_query`` are the undecoded request target; ``headers`` may be
    any mapping (lookups are case-insensitive; with repeated names the first wins) whose
    values are the wire bytes decoded as UTF-8. ``now`` (naive means UTC) is compared
    with ``X-Sdk-Date`` unless ``max_clock_skew`` <= 0. Raises SignatureError with a
    short reason when the request is not correctly signed by a known key.
    """
    authorization = _find(headers, "Authorization")
    if authorization is None:
        raise SignatureError("missing Authorization header")
    match = _AUTHORIZATION.fullmatch(authorization.strip())
    if match is None:
        raise SignatureError("malformed Authorization header")
    ak, signed_names, signature = match.groups()
    sk = secret_for(ak)
    if sk is None:
        raise SignatureError("unknown access key")
    date = _parse_date(_find(headers, "X-Sdk-Date"), now=now, max_clock_skew=max_clock_skew)
    signed: list[tuple[str, str]] = []
    for name in signed_names.split(";"):
        value = _find(headers, name)
        if value is None:
            raise SignatureError("a signed header is missing")
        signed.append((name, value.strip()))
    content_sha256 = _find(headers, "X-Sdk-Content-Sha256")
    if content_sha256 is not None:
        content_sha256 = content_sha256.strip()
    canonical = _canonical_request(
        method=method,
        raw_path=raw_path,
        pairs=parse_query(raw_query),
        signed=signed,
        payload_hash=_payload_hash(body, content_sha256),
    )
    expected = _signature(sk, _string_to_sign(date, canonical))
    if not hmac.compare_digest(expected, signature):
        raise SignatureError("signature mismatch")
    return ak
