"""structlog setup: one function, called once by the CLI; and the loggers fabricflow's own
modules log through, which never configure anything (``get_logger``)."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

SENSITIVE = frozenset({
    "ak", "sk", "secret", "secret_key", "access_key", "token", "auth_token", "security_token",
    "authorization", "x-auth-token", "x-security-token", "password", "headers", "credentials",
})
MASK = "********"

# ``token=abc``, ``"sk": "abc"``, ``Authorization: Bearer abc`` inside a longer string.
_KEY_VALUE = re.compile(
    r"(?i)\b(ak|sk|secret(?:_key)?|access_key|(?:auth_|security_|x-auth-|x-security-)?token|authorization"
    r"|password|passwd)([\"']?\s*[:=]\s*[\"']?)(?:bearer\s+)?[^\s\"',;&}]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]+@")

_secrets: tuple[str, ...] = ()  # the configured secret values, longest first


def register_secrets(*values: object) -> None:
    """Mask these values wherever they appear in a log event, even inside a longer string.

    Called with the AK, SK, token and security token (``SecretStr`` or str) and the database
    URL's password; values shorter than four characters are ignored (they would mask too much).
    """
    global _secrets
    found = set(_secrets)
    for value in values:
        if value is not None and hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, str) and len(value) >= 4:
            found.add(value)
    _secrets = tuple(sorted(found, key=len, reverse=True))


def secrets_of(settings: Any) -> list[object]:
    """The secret values of Settings: credentials and the password in the database URL."""
    from sqlalchemy.engine import make_url

    values: list[object] = [settings.auth_token, settings.ak, settings.sk, settings.security_token]
    try:
        values.append(make_url(settings.db).password)
    except Exception:  # noqa: BLE001 - not a URL: Settings reports that itself
        pass
    return values


def scrub(text: str) -> str:
    """``text`` with configured secrets, ``key=value`` secrets, bearer tokens and URL passwords masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if "=" in text or ":" in text or "earer" in text:
        text = _KEY_VALUE.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
        text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
        text = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)
    return text


def redact_value(value: Any, depth: int = 0) -> Any:
    """``value`` with secrets masked, walking dicts, lists, tuples, sets and exceptions."""
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, (bool, int, float)) or depth > 8:
        return value
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and k.lower() in SENSITIVE else redact_value(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(redact_value(v, depth + 1) for v in value) if not hasattr(value, "_fields") \
            else [redact_value(v, depth + 1) for v in value]
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {scrub(str(value))}" if str(value) else type(value).__name__
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The one redaction processor: secret-looking keys and configured secret values are
    masked at any depth, in strings, containers and exception messages, whoever logged them.
    Runs after exceptions are formatted, so a traceback's text is scrubbed too."""
    for key in list(event_dict):
        if key.lower() in SENSITIVE:
            event_dict[key] = MASK
        elif key != "exc_info":
            event_dict[key] = redact_value(event_dict[key])
    return event_dict


drop_secrets = redact  # the name older code imported


def configure(level: str = "warning", fmt: str = "auto", *, color: bool | None = None,
              lines: Callable[[str], None] | None = None) -> None:
    """Log to stderr: console lines on a terminal, JSON lines otherwise.

    ``color``: ANSI colours in console lines (default: when stderr is a terminal; the CLI passes
    False under NO_COLOR). ``lines``: where a command prints its own progress for a person to
    read (``fabricflow run``), log events become short lines through this function instead,
    so that no log record lands in the middle of that output; ``fmt="json"`` still gets JSON.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty() and lines is None)
    colors = sys.stderr.isatty() if color is None else color
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer()
    elif lines is not None:
        renderer = _as_lines(lines)
    else:
        # show_locals off: a traceback's locals can hold the signing key.
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors,
            exception_formatter=structlog.dev.RichTracebackFormatter(
                show_locals=False, color_system="truecolor" if colors else None)
            if _has_rich() else structlog.dev.plain_traceback,
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            # Tracebacks become text before redaction: an exception's message may hold a secret.
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


# Keys every event carries that a progress line has no room for (the job is the run's own).
_CONTEXT = ("timestamp", "level", "job_id", "logger", "exc_info", "stack")


def as_line(event_dict: MutableMapping[str, Any]) -> str:
    """One progress line for a log event: the step, then what happened, briefly."""
    data = dict(event_dict)
    event = str(data.pop("event", ""))
    step = str(data.pop("step", None) or "")
    level = str(data.get("level", ""))
    for key in _CONTEXT:
        data.pop(key, None)
    if event == "stamina.retry_scheduled":  # an idempotent read retried within one attempt
        return (f"{step:<17} retrying in {data.get('wait_for')}s (retry {data.get('retry_num')}): "
                f"{_reason(str(data.get('caused_by', '')))}")
    details = " ".join(f"{key}={value}" for key, value in data.items())
    return f"{step:<17} {level}: {event} {details}".rstrip()


def _reason(caused_by: str) -> str:
    """``RetryableError('list workspaces: HTTP 429 ...')`` -> ``list workspaces: HTTP 429 ...``."""
    head, sep, rest = caused_by.partition("(")
    if sep and head.isidentifier() and rest.endswith(")") and rest[:1] in "'\"" and rest[-2:-1] == rest[:1]:
        return rest[1:-2]
    return caused_by


def _as_lines(line: Callable[[str], None]) -> Callable[..., Any]:
    def render(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        line(as_line(event_dict))
        raise structlog.DropEvent

    return render


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


# --- the library's loggers ----------------------------------------------------------------


class bound:  # noqa: N801 - used as ``with bound(job_id=...)``, like structlog's own
    """Bind context variables (``job_id``, ``step``) to every event logged inside the block.

    structlog's ``bound_contextvars`` does the same as a generator-based context manager, which
    keeps a suspended generator frame alive for the whole block: per waiting job, for hours.
    """

    __slots__ = ("_values", "_tokens")

    def __init__(self, **values: Any) -> None:
        self._values = values
        self._tokens: dict[str, Any] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._values)

    def __exit__(self, *exc_info: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)


def get_logger(name: str) -> LibraryLogger:
    """The logger a fabricflow module logs through (``log = get_logger(__name__)``)."""
    return LibraryLogger(name)


class LibraryLogger:
    """Logs through structlog once someone has configured it, else through the standard library.

    Unconfigured structlog prints every event to stdout, which a program that embeds fabricflow
    (the Python API) never asked for. So until structlog is configured (by the CLI's
    ``configure``, or by the host application itself), each event goes to the standard library
    logger of the same name as one line (``step_transitioned step=workspace ...``): the host's
    logging configuration decides what is shown, and with none, INFO is dropped and warnings
    reach stderr as Python's last-resort handler prints them. Nothing is configured here.
    """

    __slots__ = ("_bound", "_bound_for", "_stdlib", "_structlog")

    def __init__(self, name: str) -> None:
        self._structlog = structlog.get_logger(name)
        self._bound: Any = None
        self._bound_for: tuple[Any, ...] = ()
        self._stdlib = structlog.wrap_logger(
            logging.getLogger(name),
            processors=[structlog.stdlib.filter_by_level, structlog.contextvars.merge_contextvars,
                        structlog.processors.format_exc_info, redact, _stdlib_call],
            wrapper_class=structlog.stdlib.BoundLogger, cache_logger_on_first_use=True)

    def _target(self) -> Any:
        if not structlog.is_configured():
            return self._stdlib
        # structlog's lazy proxy builds a new bound logger on every call (we configure it without
        # caching, so that configuring again takes effect): build one per configuration instead.
        config = structlog.get_config()
        made_of = (config["processors"], config["wrapper_class"], config["logger_factory"], config["context_class"])
        if len(self._bound_for) != len(made_of) or any(a is not b for a, b in zip(made_of, self._bound_for)):
            self._bound, self._bound_for = self._structlog.bind(), made_of
        return self._bound

    def debug(self, event: str, **fields: Any) -> None:
        """Log a debug event."""
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log an info event."""
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log a warning event."""
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log an error event (``exc_info=True`` adds the traceback being handled)."""
        self._target().error(event, **fields)


def _stdlib_call(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the standard library call: one line, the traceback apart."""
    data = dict(event_dict)
    exception = data.pop("exception", None)  # the traceback, formatted and redacted
    event = str(data.pop("event", ""))
    fields = " ".join(f"{key}={value!r}" if isinstance(value, str) and (not value or " " in value)
                      else f"{key}={value}" for key, value in data.items())
    call: dict[str, Any] = {"msg": f"{event} {fields}".rstrip()}
    if exception:
        call["msg"] += f"\n{exception}"
    return call
