"""`fabricflow plan`: what run would create, reuse, adopt or refuse, against a real emulator
process on 127.0.0.1 that already holds resources, and writing nothing anywhere."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from tests.conftest import EXAMPLE_QUICKSTART, QUICKSTART
from tests.crash.procs import FABRICFLOW, Emulator, cli, env
from tests.integration.test_cli import _structlog_reset  # noqa: F401 - autouse fixture

ENDPOINT_SPEC_CODES = "apu.standard, dpu.standard, mu.glm4.9b, mu.llama3.8b, mu.qwen2.72b"


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An emulator process holding what one quick-start job made (workspace apieworkspace with
    endpoint apie_test, model LLama3-8b, service instance test_serviceInstanceName), and their IDs."""
    tmp = tmp_path_factory.mktemp("plan")
    emulator = Emulator("--ready-after", "0.1", "--instance-ready-after", "0.1", log=tmp / "emulator.log")
    try:
        done = cli("run", str(QUICKSTART), "--json", "--db", f"sqlite:///{tmp / 'made.db'}",
                   "--fabric-url", emulator.url)
        result = json.loads(done.stdout)["result"]
        yield {"emulator": emulator, "url": emulator.url, **result}
    finally:
        emulator.stop()


def spec_file(tmp_path: Path, **parts: Any) -> Path:
    """The fixed-names quick start with top-level parts replaced (None removes one)."""
    data = yaml.safe_load(QUICKSTART.read_text())
    for key, value in parts.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def base() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))


def plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=False)


def lines(result: Any) -> dict[str, str]:
    """The plan's step lines, by step."""
    found = {}
    for line in result.stdout.splitlines():
        step, _, rest = line.partition(" ")
        if step in ("workspace", "endpoint", "endpoint_ready", "model", "service_instance", "service_ready",
                    "invocation"):
            found[step] = rest.strip()
    return found


def test_on_the_embedded_emulator_everything_is_created(tmp_path):
    result = plan(str(EXAMPLE_QUICKSTART))

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"plan for {EXAMPLE_QUICKSTART} (job 'llama3-quickstart') against the embedded emulator, where "
        "nothing exists yet",
        "workspace         create quickstart-{job}",
        "endpoint          create apie_test",
        "endpoint_ready    wait until the endpoint is RUNNING (at most 30m)",
        "model             create LLama3-8b",
        "service_instance  create test_serviceInstanceName",
        "service_ready     wait until the service instance is RUNNING (at most 30m)",
        "invocation        stream a chat completion (1 message)",
        "{job} is the new job's ID, its first 8 hex digits",
        "run would proceed: 4 to create, 0 to reuse, 0 to adopt",
    ]
    assert result.stderr == ""


def test_a_taken_workspace_name_is_refused_when_on_existing_is_fail(fabric, tmp_path):
    result = plan(str(spec_file(tmp_path, on_existing="fail")), "--fabric-url", fabric["url"])

    assert result.exit_code == 2
    found = lines(result)
    assert found["workspace"] == f"refuse: apieworkspace already exists ({fabric['workspace_id']}) and " \
                                 "on_existing is fail"
    assert found["endpoint"] == "create apie_test"  # nothing to look in: the job stops before
    assert "run would proceed" not in result.stdout
    assert result.stderr == f"error: {tmp_path / 'spec.yaml'}: run would refuse this spec (workspace)\n"


def test_with_on_existing_adopt_every_same_named_resource_is_adopted(fabric, tmp_path):
    result = plan(str(spec_file(tmp_path, on_existing="adopt")), "--fabric-url", fabric["url"], "--json")

    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["proceeds"], shown["fabric_url"], shown["name"]) == (True, fabric["url"], "llama3-quickstart")
    assert [(s["step"], s["action"], s["id"]) for s in shown["steps"]] == [
        ("workspace", "adopt", fabric["workspace_id"]),
        ("endpoint", "adopt", fabric["endpoint_id"]),
        ("endpoint_ready", "wait", None),
        ("model", "adopt", fabric["model_id"]),
        ("service_instance", "adopt", fabric["service_instance_id"]),
        ("service_ready", "wait", None),
        ("invocation", "invoke", None),
    ]
    assert shown["steps"][0] == {"step": "workspace", "action": "adopt", "name": "apieworkspace",
                                 "id": fabric["workspace_id"],
                                 "reason": "a workspace of that name exists and on_existing is adopt"}


def test_names_are_matched_exactly_not_as_fabrics_fuzzy_filter_does(fabric, tmp_path):
    # Fabric's name filter is a substring match: "apiework" lists apieworkspace, which is not it.
    result = plan(str(spec_file(tmp_path, workspace={"name": "apiework"})), "--fabric-url", fabric["url"])

    assert result.exit_code == 0, result.stderr
    assert lines(result)["workspace"] == "create apiework"


def test_reused_ids_that_exist_are_reused_and_names_inside_them_are_checked(fabric, tmp_path):
    reused = {"workspace": {"id": fabric["workspace_id"]}, "endpoint": {"id": fabric["endpoint_id"]},
              "model": {"id": fabric["model_id"], "version_id": fabric["model_version_id"]}}
    fresh = plan(str(spec_file(tmp_path, **reused, service_instance={"name": "plan-si-new"})),
                 "--fabric-url", fabric["url"])
    assert fresh.exit_code == 0, fresh.stderr
    assert lines(fresh) == {
        "workspace": f"reuse {fabric['workspace_id']}",
        "endpoint": f"reuse {fabric['endpoint_id']}",
        "endpoint_ready": "wait until the endpoint is RUNNING (at most 30m)",
        "model": f"reuse {fabric['model_id']}",
        "service_instance": "create plan-si-new",
        "service_ready": "wait until the service instance is RUNNING (at most 30m)",
        "invocation": "stream a chat completion (1 message)",
    }
    assert fresh.stdout.splitlines()[-1] == "run would proceed: 1 to create, 3 to reuse, 0 to adopt"

    # Inside a reused workspace the instance's name is looked up: there it is taken.
    taken = plan(str(spec_file(tmp_path, **reused)), "--fabric-url", fabric["url"])
    assert taken.exit_code == 2
    assert lines(taken)["service_instance"] == (f"refuse: test_serviceInstanceName already exists "
                                                f"({fabric['service_instance_id']}) and on_existing is fail")


def test_reused_ids_that_do_not_exist_are_refused(fabric, tmp_path):
    gone = "0" * 32
    missing_workspace = plan(str(spec_file(tmp_path, workspace={"id": gone}, endpoint={"id": fabric["endpoint_id"]})),
                             "--fabric-url", fabric["url"])
    assert missing_workspace.exit_code == 2
    assert lines(missing_workspace)["workspace"] == f"refuse: reused {gone} does not exist"
    assert lines(missing_workspace)["endpoint"] == f"reuse {fabric['endpoint_id']}"
    assert "not checked: the workspace is refused" in json.loads(
        plan(str(tmp_path / "spec.yaml"), "--fabric-url", fabric["url"], "--json").stdout)["steps"][1]["reason"]

    missing_endpoint = plan(str(spec_file(tmp_path, workspace={"id": fabric["workspace_id"]}, endpoint={"id": gone},
                                          on_existing="adopt")), "--fabric-url", fabric["url"], "--json")
    assert missing_endpoint.exit_code == 2
    shown = json.loads(missing_endpoint.stdout)
    assert shown["proceeds"] is False
    assert shown["steps"][1] == {"step": "endpoint", "action": "refuse", "name": None, "id": gone,
                                 "reason": f"reused {gone} does not exist"}
    assert missing_endpoint.stderr.endswith("run would refuse this spec (endpoint)\n")


def test_catalogue_values_fabric_does_not_offer_are_refused(fabric, tmp_path):
    endpoint = {**base()["endpoint"], "reserved_resource": {"mu": {"spec_code": "mu.nope", "min": 0, "max": 1}}}
    model = base()["model"]
    model["version"]["config"]["llm_model_config"]["base_model_type"] = "GPT_9"
    result = plan(str(spec_file(tmp_path, endpoint=endpoint, model=model, workspace={"name": "plan-new-ws"})),
                  "--fabric-url", fabric["url"])

    assert result.exit_code == 2
    found = lines(result)
    assert found["workspace"] == "create plan-new-ws"
    assert found["endpoint"] == f"refuse: unknown spec_code mu.nope; Fabric offers {ENDPOINT_SPEC_CODES}"
    assert found["model"].startswith("refuse: unknown base_model_type GPT_9; Fabric offers ")
    assert "LLAMA_3_8B" in found["model"]
    assert result.stderr.endswith("run would refuse this spec (endpoint, model)\n")


def test_a_bad_spec_is_refused_before_any_request(fabric, tmp_path):
    before = fabric["emulator"].stats()["requests"]
    result = plan(str(spec_file(tmp_path, workspace={"name": "ws!"})), "--fabric-url", fabric["url"])

    assert result.exit_code == 2
    assert "workspace.name: String should match pattern" in result.stderr
    assert fabric["emulator"].stats()["requests"] == before


def test_plan_writes_nothing_and_sends_only_reads(fabric, tmp_path):
    home = tmp_path / "home"
    work = tmp_path / "work"
    for directory in (home, work):
        directory.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(QUICKSTART.read_text().replace("on_existing: fail", "on_existing: adopt"))
    before = fabric["emulator"].stats()

    done = subprocess.run([*FABRICFLOW, "plan", str(spec), "--fabric-url", fabric["url"]], cwd=work,
                          capture_output=True, text=True, timeout=60,
                          env=env(HOME=str(home), XDG_DATA_HOME=str(home / "xdg")))

    assert done.returncode == 0, done.stderr
    assert "workspace         adopt " in done.stdout
    after = fabric["emulator"].stats()
    assert after["created"] == before["created"] and after["live"] == before["live"]
    sent = {op: n - before["operations"].get(op, 0) for op, n in after["operations"].items()
            if n != before["operations"].get(op, 0)}
    assert sent and all(op.startswith(("list_", "show_")) for op in sent), sent
    assert [p for p in (*home.rglob("*"), *work.rglob("*"))] == []  # no database, no file at all


# --- the same checks, for the engine before a job's first create ---------------------------------


def job_in(workspace_id: str | None):
    """A job about to make its first create: its workspace reused (or adopted) when given."""
    from datetime import UTC, datetime

    from orchestrator.domain import Job, Step
    from orchestrator.machine import JobState, StepName, StepState

    now = datetime.now(UTC)
    state = StepState.SKIPPED if workspace_id else StepState.PENDING
    return Job(id="1" * 32, name="j", state=JobState.RUNNING, spec={}, created_at=now, updated_at=now,
               steps={StepName.WORKSPACE: Step(StepName.WORKSPACE, state, resource_id=workspace_id)})


async def test_check_first_create_names_every_later_refusal_in_a_reused_workspace(fabric):
    from orchestrator.errors import TerminalError
    from orchestrator.fabric.client import FabricClient
    from orchestrator.machine import StepName
    from orchestrator.plan import check_first_create
    from orchestrator.spec import parse_spec

    data = base()
    data["workspace"] = {"id": fabric["workspace_id"]}
    data["endpoint"]["name"] = "plan-new-endpoint"
    data["endpoint"]["reserved_resource"]["mu"]["spec_code"] = "mu.nope"
    async with FabricClient(fabric["url"]) as client:
        with pytest.raises(TerminalError) as info:
            await check_first_create(client, parse_spec(data), job_in(fabric["workspace_id"]),
                                     first=StepName.ENDPOINT)
        assert info.value.code == "fabricflow.invalid_spec"
        assert str(info.value) == (
            f"endpoint: unknown spec_code mu.nope; Fabric offers {ENDPOINT_SPEC_CODES}; "
            f"model: LLama3-8b already exists ({fabric['model_id']}) and on_existing is fail; "
            f"service_instance: test_serviceInstanceName already exists ({fabric['service_instance_id']}) "
            "and on_existing is fail")

        data["endpoint"]["reserved_resource"]["mu"]["spec_code"] = "mu.llama3.8b"
        await check_first_create(client, parse_spec({**data, "on_existing": "adopt"}),
                                 job_in(fabric["workspace_id"]), first=StepName.ENDPOINT)


async def test_check_first_create_of_a_new_workspace_reads_only_the_catalogues(fabric):
    from orchestrator.fabric.client import FabricClient
    from orchestrator.machine import StepName
    from orchestrator.plan import check_first_create
    from orchestrator.spec import parse_spec

    before = fabric["emulator"].stats()["operations"]
    async with FabricClient(fabric["url"]) as client:
        # Inside a workspace the job creates itself nothing can exist: the names taken in
        # apieworkspace do not matter, and nothing is looked up.
        await check_first_create(client, parse_spec(base()), job_in(None), first=StepName.WORKSPACE)
    after = fabric["emulator"].stats()["operations"]
    sent = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
    assert sent == {"list_specs": 1}  # the quick start names no base_model_type
