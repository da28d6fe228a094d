"""The job spec: a YAML or JSON file, validated before anything is written."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from orchestrator.errors import UserError

#: Bumped when the spec format changes meaning; stored on every job.
SPEC_VERSION = 1

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"1.5h"`` or ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 30m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 45s, 30m, 1h)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
_WORKSPACE_NAME = r"^[A-Za-z0-9_-]{4,32}$"
_RESOURCE_NAME = r"^[\w\-. ]{1,64}$"  # \w covers Chinese characters, letters, digits, _
_ENDPOINT_NAME = r"^[\w\-. ]{1,128}$"
_ID = r"^[A-Za-z0-9-]{1,36}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")


class Reuse(_Strict):
    """Reuse an existing resource by its ID instead of creating one."""

    id: str = Field(pattern=_ID)


class ModelReuse(Reuse):
    """Reuse an existing model, optionally pinning one of its versions (default: its current one)."""

    version_id: str | None = Field(default=None, pattern=_ID)


class WorkspaceSpec(_Strict):
    """CreateWorkspace body."""

    name: str = Field(pattern=_WORKSPACE_NAME)
    description: str = Field(default="", max_length=200)  # 255 minus room for the marker
    enterprise_project_id: str | None = None


class ResourceSize(_Strict):
    """A ``{spec_code, min, max}`` resource definition."""

    spec_code: str = Field(min_length=1)
    min: int = Field(ge=0)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _min_within_max(self) -> ResourceSize:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class EndpointSpec(_Strict):
    """CreateEndpoint body."""

    name: str = Field(pattern=_ENDPOINT_NAME)
    description: str = Field(default="", max_length=1000)
    type: Literal[
        "service", "ray", "inference", "job", "ray_service", "sql", "container_job", "notebook"
    ] = "inference"
    reserved_resource: dict[str, ResourceSize] | None = None
    public_access: bool | None = None


class LlmModelConfig(_Strict):
    """Where the model files are and which base model they derive from."""

    base_model_type: str = ""
    model_path: str = ""


class ModelVersionConfig(_Strict):
    """``version.config`` of CreateModelDefinition."""

    llm_model_config: LlmModelConfig


class ModelVersionSpec(_Strict):
    """The first version of a model."""

    name: str = Field(pattern=_RESOURCE_NAME)
    description: str = Field(default="", max_length=1024)
    config: ModelVersionConfig | None = None


class ModelSpec(_Strict):
    """CreateModelDefinition body."""

    name: str = Field(pattern=_RESOURCE_NAME)
    description: str = Field(default="", max_length=1000)
    type: Literal["LLM_MODEL"] = "LLM_MODEL"
    version: ModelVersionSpec


class ServiceInstanceSpec(_Strict):
    """DeployServiceInstance body, less the IDs the earlier steps provide."""

    name: str = Field(pattern=_RESOURCE_NAME)
    description: str = Field(default="", max_length=1000, pattern=r"^[^!<>=&\"']*$")
    config: dict[str, Any] | None = None


class Message(_Strict):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


class InvocationSpec(_Strict):
    """The chat completion sent once the service is RUNNING."""

    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=0)


class Timeouts(_Strict):
    """How long each wait, and the whole job, may last."""

    endpoint_ready: Duration = 30 * 60.0
    service_ready: Duration = 30 * 60.0
    job: Duration | None = None  # from the job's first claim; unset means no limit


class Polling(_Strict):
    """Status polling for this job: starts at ``initial``, doubles (with jitter) up to ``max``."""

    initial: Duration | None = None
    max: Duration | None = None


def _create_or_reuse(value: Any) -> str:
    # A mapping with an ``id`` is the reuse form; anything else is validated as a create body,
    # so a bad field yields its own error and not every failure of the other form too.
    # (Serialization calls this with the model instance itself.)
    if isinstance(value, Reuse) or (isinstance(value, dict) and "id" in value):
        return "reuse"
    return "create"


def _either(create: type[BaseModel], reuse: type[Reuse] = Reuse) -> Any:
    return Annotated[
        Annotated[create, Tag("create")] | Annotated[reuse, Tag("reuse")],
        Discriminator(_create_or_reuse),
    ]


class JobSpec(_Strict):
    """A whole job: what to create (or reuse), and what to ask the model."""

    name: str = Field(min_length=1, max_length=200)
    workspace: _either(WorkspaceSpec)  # type: ignore[valid-type]
    endpoint: _either(EndpointSpec)  # type: ignore[valid-type]
    model: _either(ModelSpec, ModelReuse)  # type: ignore[valid-type]
    service_instance: ServiceInstanceSpec
    invocation: InvocationSpec
    timeouts: Timeouts = Timeouts()
    polling: Polling | None = None
    on_existing: Literal["fail", "adopt"] = "fail"

    @model_validator(mode="after")
    def _reused_children_need_their_workspace(self) -> JobSpec:
        for key in ("endpoint", "model"):
            if isinstance(getattr(self, key), Reuse) and not isinstance(self.workspace, Reuse):
                article = "an" if key[0] in "aeiou" else "a"
                raise ValueError(f"{key}.id: reusing {article} {key} needs workspace: {{id: ...}} too "
                                 f"(a {key} lives in the workspace it was created in)")
        return self


_UNION_TAGS = frozenset({"create", "reuse"})


def format_validation_error(exc: ValidationError, source: str, template: Any = None) -> str:
    """One line per problem: ``source: field.path: reason``.

    ``template`` is the data before ``{index}`` and ``{job}`` were replaced: a bad value made
    from one says what it became (a name too long once ``{job}`` is 8 characters, say).
    """
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        # pydantic names the union member it validated against (loc[1]); users never wrote it.
        parts = [p for i, p in enumerate(loc) if not (i == 1 and p in _UNION_TAGS)]
        path = ".".join(str(p) for p in parts) or "(top level)"
        message = err["msg"]
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            # Our validators' messages are sentences already; pydantic prefixes "Value error, ".
            message = str(err["ctx"]["error"])
        raw = _value_at(template, parts)
        if isinstance(raw, str) and is_templated(raw) and isinstance(err.get("input"), str):
            message += f" ({err['input']!r} here, made from {raw!r}{_JOB_NOTE if JOB in raw else ''})"
        lines.append(f"{source}: {path}: {message}")
    return "\n".join(dict.fromkeys(lines))


def _value_at(data: Any, path: Sequence[Any]) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def parse_spec(data: Any, source: str = "spec", *, template: Any = None) -> JobSpec:
    """Validate already-parsed data as a JobSpec, raising UserError with every problem.

    ``template``: the data before its ``{index}``/``{job}`` were replaced, for the messages.
    """
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source, template)) from None


#: The largest spec file read, in bytes. Real specs are a few hundred bytes; a YAML parser
#: takes minutes and hundreds of MB over a file of tens of MB, so a bigger one is refused unread.
MAX_SPEC_BYTES = 1024 * 1024


def read_spec_data(path: str | Path) -> Any:
    """Read a YAML or JSON spec file as plain data, not yet validated (see ``parse_spec``)."""
    import yaml

    path = Path(path)
    try:
        with path.open("rb") as handle:
            # At most one byte past the limit, whatever the file claims its size is (a pipe).
            raw = handle.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            size = f"{path.stat().st_size:,} bytes, more" if path.is_file() else "more"
            raise UserError(f"{path}: too large for a job spec: {size} than the limit of 1 MB "
                            f"({MAX_SPEC_BYTES:,} bytes)")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys) if path.suffix == ".json" else \
            yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{_first_line(exc)}") from None
    except _DuplicateKey as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key comes twice (json keeps the last one silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"duplicate key {key!r}: a spec names each field once")
        seen[key] = value
    return seen


@functools.cache
def _strict_loader() -> type:
    """yaml.SafeLoader refusing a key given twice in one mapping (it keeps the last one
    silently: ``name: a`` then ``name: b`` would make ``b``); merge keys (``<<``) still override."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: SafeLoader says so itself
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} on line {key_node.start_mark.line + 1} (first on "
                        f"line {first}): a spec names each field once")
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def load_spec(path: str | Path, *, job_id: str | None = None) -> JobSpec:
    """Read a YAML or JSON spec file and validate it as one job's spec: ``{index}`` is 0, as for
    the only job of a submit; with ``job_id``, ``{job}`` is replaced too (see ``with_job``)."""
    data = read_spec_data(path)
    one = with_index(data, 0)
    if job_id is None:
        return parse_spec(one, str(path), template=data)
    return parse_spec(with_job(one, job_id), str(path), template=data)


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


# --- templating: many jobs from one spec --------------------------------------------------------

#: Replaced, in every string of a spec, by the job's index among those one command submits.
INDEX = "{index}"
#: Replaced, in every string of a spec, by the first JOB_LENGTH hexadecimal digits of the new
#: job's ID, so that every job gets names of its own (a spec can be run again and again).
JOB = "{job}"
JOB_LENGTH = 8
_JOB_NOTE = f"; {JOB} is the job ID's first {JOB_LENGTH} hex digits"

#: The parts of a spec naming a resource the job creates (unless it reuses one by ``id``).
RESOURCE_PARTS = ("workspace", "endpoint", "model", "service_instance")


def _replaced(data: Any, token: str, value: str) -> Any:
    """``data`` with ``token`` replaced by ``value`` in every string value (not in keys).

    Pure: ``data`` is not changed, and parts without ``token`` are shared, not copied.
    """
    if isinstance(data, str):
        return data.replace(token, value) if token in data else data
    if isinstance(data, dict):
        return {key: _replaced(item, token, value) for key, item in data.items()}
    if isinstance(data, list):
        return [_replaced(item, token, value) for item in data]
    return data


def _contains(data: Any, tokens: tuple[str, ...]) -> bool:
    """True when some string value in ``data`` contains one of ``tokens``."""
    if isinstance(data, str):
        return any(token in data for token in tokens)
    if isinstance(data, dict):
        return any(_contains(value, tokens) for value in data.values())
    if isinstance(data, list):
        return any(_contains(value, tokens) for value in data)
    return False


def with_index(data: Any, index: int) -> Any:
    """``data`` with ``{index}`` replaced by ``index`` in every string value (not in keys).

    Pure: ``data`` is not changed, and parts without ``{index}`` are shared, not copied.
    """
    return _replaced(data, INDEX, str(index))


def with_job(data: Any, job_id: str) -> Any:
    """``data`` with ``{job}`` replaced by the first JOB_LENGTH characters of ``job_id`` in every
    string value (not in keys); pure, like ``with_index``. Hex digits are valid in every kind of
    name, but they lengthen it: a workspace name of at most 32 characters leaves 24 around ``{job}``."""
    return _replaced(data, JOB, job_id[:JOB_LENGTH])


def has_index(data: Any) -> bool:
    """True when some string value in ``data`` contains ``{index}``."""
    return _contains(data, (INDEX,))


def has_job(data: Any) -> bool:
    """True when some string value in ``data`` contains ``{job}``."""
    return _contains(data, (JOB,))


def is_templated(data: Any) -> bool:
    """True when some string value in ``data`` contains ``{index}`` or ``{job}``."""
    return _contains(data, (INDEX, JOB))


def resource_names(data: Any) -> dict[str, Any]:
    """``{"workspace.name": value, ...}`` for each resource raw spec data creates by name.

    Parts reused by ``id``, missing or malformed are left out (validation reports the latter).
    """
    parts = data if isinstance(data, dict) else {}
    return {f"{key}.name": part["name"] for key in RESOURCE_PARTS
            if isinstance(part := parts.get(key), dict) and "id" not in part and "name" in part}


def parse_copies(data: Any, indices: Sequence[int], source: str = "spec",
                 job_ids: Sequence[str] | None = None) -> list[JobSpec]:
    """Validate each copy of ``data`` as ``parse_spec`` would, but quicker: copy ``n`` with
    ``{index}`` replaced by ``indices[n]`` and, given ``job_ids``, ``{job}`` by ``job_ids[n]``.

    The first copy is validated in full. The parts of ``data`` without a template token are the
    same in every copy, so their validated models from the first copy stand in for them in the
    others (pydantic accepts a model instance as it is); only the templated parts are validated
    again. Errors name the copy: ``source (index 7): workspace.name: ...``.
    """
    if job_ids is not None and len(job_ids) != len(indices):
        raise ValueError(f"{len(indices)} indices but {len(job_ids)} job IDs")
    if not indices:
        return []
    label = (lambda i: f"{source} (index {i})") if len(indices) > 1 else (lambda i: source)

    def copy(frame: Any, n: int) -> Any:
        frame = with_index(frame, indices[n])
        return frame if job_ids is None else with_job(frame, job_ids[n])

    first = parse_spec(copy(data, 0), label(indices[0]), template=data)
    if not is_templated(data):
        return [first] * len(indices)  # frozen models: one instance can stand for every copy
    frame = _share_validated(data, first)
    return [first, *(parse_spec(copy(frame, n), label(indices[n]), template=data)
                     for n in range(1, len(indices)))]


def _share_validated(raw: Any, done: Any) -> Any:
    """``raw`` with each part that has no template token replaced by its validated model from
    ``done`` (the validated first copy); sound because a part's validation depends only on it."""
    if isinstance(done, BaseModel) and not is_templated(raw):
        return done
    if isinstance(raw, dict) and isinstance(done, BaseModel):
        fields = type(done).model_fields
        return {key: _share_validated(value, getattr(done, key) if key in fields else None)
                for key, value in raw.items()}
    if isinstance(raw, dict) and isinstance(done, dict):
        return {key: _share_validated(value, done.get(key)) for key, value in raw.items()}
    if isinstance(raw, list) and isinstance(done, list) and len(raw) == len(done):
        return [_share_validated(value, item) for value, item in zip(raw, done, strict=True)]
    return raw
