"""{job} in a spec: replaced by the first 8 hex digits of the new job's ID, in every string."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.spec import has_job, is_templated, load_spec, parse_copies, parse_spec, with_index, with_job
from tests.conftest import EXAMPLE_QUICKSTART, QUICKSTART

JOB_ID = "3f9c2a1e5b7d4c11a0b1c2d3e4f50617"


@pytest.fixture
def base() -> dict[str, Any]:
    return yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))


def test_with_job_replaces_in_string_values_only_and_changes_nothing_in_place():
    data = {"name": "a-{job}-{job}", "{job}": ["x{job}", 3, None, True], "n": {"deep": "{job}", "i": "{index}"}}
    before = json.dumps(data)

    assert with_job(data, JOB_ID) == {"name": "a-3f9c2a1e-3f9c2a1e", "{job}": ["x3f9c2a1e", 3, None, True],
                                      "n": {"deep": "3f9c2a1e", "i": "{index}"}}
    assert json.dumps(data) == before


def test_has_job_and_is_templated():
    assert has_job({"a": ["{job}"]}) and not has_job({"a": "{index}", "{job}": 1})
    assert is_templated("{index}") and is_templated(["x-{job}"]) and not is_templated({"job": "job"})


def test_the_example_becomes_the_fixed_one_with_a_workspace_named_after_the_job():
    spec = load_spec(EXAMPLE_QUICKSTART, job_id=JOB_ID)

    assert spec.workspace.name == "quickstart-3f9c2a1e"
    assert spec.model_copy(update={"workspace": load_spec(QUICKSTART).workspace}) == load_spec(QUICKSTART)


def test_the_example_without_a_job_id_is_not_a_spec():
    with pytest.raises(UserError, match="workspace.name: String should match pattern"):
        load_spec(EXAMPLE_QUICKSTART)


def test_parse_copies_replaces_index_and_job_in_each_copy(base):
    base["workspace"]["name"] = "ws-{index}-{job}"
    base["service_instance"]["name"] = "si {job}"
    ids = [f"{n:08x}" + "0" * 24 for n in range(5)]

    copies = parse_copies(base, range(10, 15), "spec.yaml", ids)

    assert [c.workspace.name for c in copies] == [f"ws-{10 + n}-{n:08x}" for n in range(5)]
    assert [c.service_instance.name for c in copies] == [f"si {n:08x}" for n in range(5)]
    assert copies == [parse_spec(with_job(with_index(base, 10 + n), ids[n])) for n in range(5)]
    assert copies[0].invocation is copies[1].invocation  # untemplated parts are validated once


def test_parse_copies_with_only_job_in_a_name_validates_every_copy(base):
    base["workspace"]["name"] = "w{job}"
    ids = ["0123abcd" + "0" * 24, "ffffffff" + "0" * 24]

    assert [c.workspace.name for c in parse_copies(base, range(2), "s", ids)] == ["w0123abcd", "wffffffff"]


def test_parse_copies_wants_one_job_id_per_copy(base):
    with pytest.raises(ValueError, match="3 indices but 1 job IDs"):
        parse_copies(base, range(3), "s", [JOB_ID])


def test_a_templated_value_that_fails_says_what_it_became(base):
    base["workspace"]["name"] = "{index}-{job}"
    base["model"]["version"]["name"] = "v1!{index}"

    with pytest.raises(UserError) as info:
        parse_copies(base, [7], "job.yaml", [JOB_ID])

    assert str(info.value).splitlines() == [
        "job.yaml: model.version.name: String should match pattern '^[\\w\\-. ]{1,64}$' ('v1!7' here, made from "
        "'v1!{index}')",
    ]
    base["workspace"]["name"] = "x" * 25 + "{job}"
    base["model"]["version"]["name"] = "v1"
    with pytest.raises(UserError) as info:
        parse_spec(with_job(base, JOB_ID), "job.yaml", template=base)
    assert str(info.value) == (
        "job.yaml: workspace.name: String should match pattern '^[A-Za-z0-9_-]{4,32}$' "
        f"('{'x' * 25}3f9c2a1e' here, made from '{'x' * 25}{{job}}'; {{job}} is the job ID's first 8 hex digits)")


def test_one_job_of_run_or_plan_numbers_index_zero_as_submit_does(tmp_path):
    from orchestrator.plan import read_draft
    from orchestrator.submission import specs_for

    path = tmp_path / "idx.yaml"
    data = yaml.safe_load(QUICKSTART.read_text())
    data["workspace"]["name"] = "ws-{index}"
    path.write_text(yaml.safe_dump(data))

    _, (submitted,) = specs_for([str(path)], count=1)
    assert submitted.workspace.name == "ws-0"
    assert load_spec(path, job_id="0123456789abcdef").workspace.name == "ws-0"  # fabricflow run
    assert read_draft(path)[0].workspace.name == "ws-0"  # fabricflow plan
