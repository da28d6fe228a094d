"""Job spec loading and validation: one clear line per problem, field path and reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.spec import (
    EndpointSpec,
    JobSpec,
    ModelSpec,
    Reuse,
    WorkspaceSpec,
    load_spec,
    parse_duration,
    parse_spec,
    read_spec_data,
)

QUICKSTART = Path(__file__).resolve().parents[2] / "tests" / "data" / "quickstart-fixed.yaml"  # fixed names


@pytest.fixture
def base() -> dict[str, Any]:
    return yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(data: Any, source: str = "job.yaml") -> list[str]:
    with pytest.raises(UserError) as info:
        parse_spec(data, source)
    assert info.value.exit_code == 2
    lines = str(info.value).splitlines()
    assert lines, "a UserError must say something"
    for line in lines:
        assert line.startswith(f"{source}: "), line
    return lines


def _line_for(lines: list[str], path: str) -> str:
    found = [line for line in lines if line.startswith(f"job.yaml: {path}: ")]
    assert found, f"no line for {path!r} in {lines}"
    return found[0]


# --- good specs -----------------------------------------------------------------------------


def test_quickstart_loads():
    spec = load_spec(QUICKSTART)
    assert isinstance(spec, JobSpec)
    assert spec.name == "llama3-quickstart"
    assert isinstance(spec.workspace, WorkspaceSpec) and spec.workspace.name == "apieworkspace"
    assert isinstance(spec.endpoint, EndpointSpec)
    assert spec.endpoint.reserved_resource is not None
    assert spec.endpoint.reserved_resource["mu"].spec_code == "mu.llama3.8b"
    assert spec.endpoint.reserved_resource["mu"].max == 1
    assert isinstance(spec.model, ModelSpec) and spec.model.version.name == "v1"
    assert spec.service_instance.name == "test_serviceInstanceName"
    assert spec.invocation.messages[0].content == "hello"
    assert spec.timeouts.endpoint_ready == 1800.0
    assert spec.timeouts.service_ready == 1800.0
    assert spec.on_existing == "fail"


def test_quickstart_loads_from_str_path():
    assert load_spec(str(QUICKSTART)).name == "llama3-quickstart"


def test_json_spec_loads(tmp_path, base):
    path = _write(tmp_path, "job.json", json.dumps(base))
    spec = load_spec(path)
    assert spec == load_spec(QUICKSTART)


def test_yml_suffix_is_yaml(tmp_path, base):
    path = _write(tmp_path, "job.yml", yaml.safe_dump(base))
    assert load_spec(path).name == "llama3-quickstart"


def test_defaults(base):
    for key in ("timeouts", "on_existing"):
        base.pop(key)
    spec = parse_spec(base)
    assert spec.on_existing == "fail"
    assert spec.timeouts.endpoint_ready == 30 * 60
    assert spec.timeouts.service_ready == 30 * 60


def test_on_existing_adopt(base):
    base["on_existing"] = "adopt"
    assert parse_spec(base).on_existing == "adopt"


@pytest.mark.parametrize("field", ["workspace", "endpoint", "model"])
def test_reuse_by_id(base, field):
    base["workspace"] = {"id": "a935d0ef-1234-4abc-9def-0123456789ab"}  # children live in one
    base[field] = {"id": "e935d0ef-1234-4abc-9def-0123456789ab"}
    spec = parse_spec(base)
    value = getattr(spec, field)
    assert isinstance(value, Reuse)
    assert value.id == "e935d0ef-1234-4abc-9def-0123456789ab"


def test_reuse_everything_reusable(tmp_path, base):
    for field in ("workspace", "endpoint", "model"):
        base[field] = {"id": f"{field}-id-1"}
    path = _write(tmp_path, "job.yaml", yaml.safe_dump(base))
    spec = load_spec(path)
    assert all(isinstance(getattr(spec, f), Reuse) for f in ("workspace", "endpoint", "model"))


def test_spec_is_frozen(base):
    spec = parse_spec(base)
    with pytest.raises(Exception):
        spec.name = "other"  # type: ignore[misc]


# --- bad files ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: no such file"


def test_malformed_yaml(tmp_path):
    path = _write(tmp_path, "job.yaml", "name: [unclosed\nworkspace: {name: x\n")
    with pytest.raises(UserError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert len(message.splitlines()) == 1


def test_malformed_json(tmp_path):
    path = _write(tmp_path, "job.json", '{"name": "x", ')
    with pytest.raises(UserError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid JSON: ")
    assert "line 1" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(("name", "text", "why"), [
    ("job.yaml", "name: a\nworkspace:\n  name: ws-one\n  name: ws-two\n",
     "not valid YAML: duplicate key 'name' on line 4 (first on line 3): a spec names each field once"),
    ("job.json", '{"name": "a", "name": "b"}', "not valid JSON: duplicate key 'name': a spec names each field once"),
])
def test_a_key_given_twice_is_refused_not_overwritten(tmp_path, name, text, why):
    path = _write(tmp_path, name, text)
    with pytest.raises(UserError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {why}"


def test_yaml_merge_keys_still_override(tmp_path):
    path = _write(tmp_path, "data.yaml", "base: &b {x: 1, y: 1}\nm:\n  <<: *b\n  x: 2\n")
    assert read_spec_data(path) == {"base": {"x": 1, "y": 1}, "m": {"x": 2, "y": 1}}


@pytest.mark.parametrize(("name", "text"), [("job.yaml", "- a\n- b\n"), ("job.json", "[1, 2]")])
def test_top_level_list(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    with pytest.raises(UserError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: expected a mapping of fields, got list"


def test_empty_file(tmp_path):
    path = _write(tmp_path, "job.yaml", "")
    with pytest.raises(UserError, match="expected a mapping"):
        load_spec(path)


def test_problems_name_the_file(tmp_path, base):
    del base["invocation"]
    path = _write(tmp_path, "job.yaml", yaml.safe_dump(base))
    with pytest.raises(UserError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: invocation: Field required"


# --- bad fields -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["name", "workspace", "endpoint", "model", "service_instance", "invocation"]
)
def test_missing_required_field(base, field):
    del base[field]
    assert _problems(base) == [f"job.yaml: {field}: Field required"]


def test_unknown_field_typo(base):
    base["endpont"] = base.pop("endpoint")
    lines = _problems(base)
    assert sorted(lines) == sorted(
        ["job.yaml: endpoint: Field required", "job.yaml: endpont: Extra inputs are not permitted"]
    )


def test_unknown_nested_field(base):
    base["service_instance"]["descripton"] = "typo"
    assert _problems(base) == ["job.yaml: service_instance.descripton: Extra inputs are not permitted"]


def test_several_problems_one_line_each(base):
    del base["name"]
    base["on_existing"] = "maybe"
    base["invocation"]["messages"] = []
    lines = _problems(base)
    assert len(lines) == 3
    _line_for(lines, "name")
    assert "'fail' or 'adopt'" in _line_for(lines, "on_existing")
    assert "at least 1" in _line_for(lines, "invocation.messages")


def test_wrong_type_min_names_field_path(base):
    base["endpoint"]["reserved_resource"]["mu"]["min"] = "x"
    lines = _problems(base)
    assert "valid integer" in _line_for(lines, "endpoint.reserved_resource.mu.min")


def test_wrong_type_min_is_one_line(base):
    base["endpoint"]["reserved_resource"]["mu"]["min"] = "x"
    assert _problems(base) == [
        "job.yaml: endpoint.reserved_resource.mu.min: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


@pytest.mark.parametrize("name", ["ab", "abc", "a" * 33, "bad name", "bad!name", "名字名字", "ws.dot"])
def test_workspace_name_rejected(base, name):
    base["workspace"]["name"] = name
    line = _line_for(_problems(base), "workspace.name")
    assert "should match pattern" in line


@pytest.mark.parametrize("name", ["abcd", "a" * 32, "my-ws_01"])
def test_workspace_name_accepted(base, name):
    base["workspace"]["name"] = name
    assert parse_spec(base).workspace.name == name  # type: ignore[union-attr]


def test_workspace_name_rejected_is_one_line(base):
    base["workspace"]["name"] = "ab"
    assert _problems(base) == [
        "job.yaml: workspace.name: String should match pattern '^[A-Za-z0-9_-]{4,32}$'"
    ]


@pytest.mark.parametrize("char", list("<>!=&\"'"))
def test_service_instance_description_forbidden_chars(base, char):
    base["service_instance"]["description"] = f"a {char} b"
    lines = _problems(base)
    assert len(lines) == 1
    assert "should match pattern" in _line_for(lines, "service_instance.description")


def test_service_instance_description_ok(base):
    base["service_instance"]["description"] = "plain text, with: punctuation (fine) [ok]"
    assert parse_spec(base).service_instance.description.startswith("plain")


def test_bad_duration(base):
    base["timeouts"] = {"endpoint_ready": "soon"}
    lines = _problems(base)
    assert len(lines) == 1
    line = _line_for(lines, "timeouts.endpoint_ready")
    assert "'soon' is not a duration" in line


def test_unknown_timeout_key(base):
    base["timeouts"] = {"endpoint_redy": "5m"}
    assert _problems(base) == ["job.yaml: timeouts.endpoint_redy: Extra inputs are not permitted"]


def test_timeouts_parse_units(base):
    base["timeouts"] = {"endpoint_ready": "1.5h", "service_ready": 90}
    spec = parse_spec(base)
    assert spec.timeouts.endpoint_ready == 5400.0
    assert spec.timeouts.service_ready == 90.0


def test_bad_reuse_id(base):
    base["model"] = {"id": "not a valid id!"}
    lines = _problems(base)
    assert any(
        line.startswith("job.yaml: model.id: ") and "should match pattern" in line for line in lines
    ), lines


def test_message_role_literal(base):
    base["invocation"]["messages"] = [{"role": "robot", "content": "hi"}]
    line = _line_for(_problems(base), "invocation.messages.0.role")
    assert "'system', 'user' or 'assistant'" in line


def test_parse_spec_default_source(base):
    del base["name"]
    with pytest.raises(UserError, match=r"^spec: name: Field required$"):
        parse_spec(base)


def test_input_is_not_mutated(base):
    before = copy.deepcopy(base)
    parse_spec(base)
    assert base == before


# --- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        (" 45s ", 45.0),
        ("2 m", 120.0),
        ("1h", 3600.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["soon", "", "5d", "1h30m", "-5s", "-5", "s", "1.5.2h", "30M", "0", 0, -1, 0.0, "0s", True, False, None],
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_reused_endpoint_needs_reused_workspace(base):
    base["endpoint"] = {"id": "e" * 32}
    lines = _problems(base)
    assert any("reusing an endpoint needs workspace: {id: ...} too" in line for line in lines), lines
