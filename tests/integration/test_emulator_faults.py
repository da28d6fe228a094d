"""The emulator's cloud faults over real HTTP: late creates, lagging lists, churn between pages.

Each fault is proven by what a client sees and by the emulator's counters, never by how fast
the machine is: late creates wait on ``late_by`` (set to an hour, then to 0 through the
runtime knob, which carries the pending ones out at once), lists are compared item by item.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from orchestrator.emulator.config import EmulatorConfig
from tests.conftest import until
from tests.integration.test_emulator import ENDPOINT_BODY, MODEL_BODY, Api, provision

HOUR = 3600.0
MARKER = "[fabricflow:3f9c2a1e5b7d4c11]"


async def dropped(api: Api, path: str, body: dict[str, Any]) -> None:
    """Send a create whose connection the emulator closes without an answer."""
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.call("POST", path, body)


async def names(api: Api, path: str, key: str, **params: Any) -> list[str]:
    """The names one list page shows."""
    return [item["name"] for item in (await api.ok("GET", path, params=params))[key]]


def late_counters(stats: dict[str, Any]) -> tuple[int, int]:
    return stats["late_created"], stats["late_pending"]


# -- late creates ----------------------------------------------------------------------------

async def test_late_creates_of_every_kind_are_invisible_until_carried_out_as_asked(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(ready_after=0.1, instance_ready_after=0.1,
                                                   late_by=HOUR))
    ids = await provision(api, instance=False)
    base = ids["base"]
    before = await api.stats()
    await api.ok("POST", "/_emulator/faults", {"late_next": 4})

    ep_body = {**ENDPOINT_BODY, "name": "late ep", "description": "asked late"}
    model_body = {**MODEL_BODY, "name": "late-model", "description": "late model"}
    inst_body = {"source": {"id": ids["model"]}, "name": "late_instance",
                 "description": "late instance", "endpoint_id": ids["ep"]}
    await dropped(api, "/v1/workspaces", {"name": "late-ws", "description": "late workspace"})
    await dropped(api, f"{base}/endpoints", ep_body)
    await dropped(api, f"{base}/models", model_body)
    await dropped(api, f"{base}/services/instances", inst_body)

    # Not created yet: no list shows them, nothing counts them but late_pending.
    assert await names(api, "/v1/workspaces", "workspaces") == ["apieworkspace"]
    assert await names(api, f"{base}/endpoints", "endpoints") == ["apie_test"]
    assert await names(api, f"{base}/models", "models") == ["LLama3-8b"]
    assert (await api.ok("GET", f"{base}/services/instances"))["total"] == 0
    stats = await api.stats()
    assert stats["created"] == before["created"]
    assert late_counters(stats) == (0, 4)
    assert (await api.ok("GET", "/_emulator/faults"))["late_next"] == 0

    # The runtime knob moves the pending creates too: late_by 0 carries them out now.
    knobs = await api.ok("POST", "/_emulator/faults", {"late_by": 0})
    assert knobs["late_by"] == 0
    workspaces = (await api.ok("GET", "/v1/workspaces", params={"name": "late-ws"}))["workspaces"]
    assert [(w["name"], w["description"]) for w in workspaces] == [("late-ws", "late workspace")]
    [ep] = (await api.ok("GET", f"{base}/endpoints", params={"name": "late ep"}))["endpoints"]
    shown = await api.ok("GET", f"{base}/endpoints/{ep['id']}")
    assert (shown["description"], shown["type"], shown["reserved_resource"]) == \
        ("asked late", "inference", ENDPOINT_BODY["reserved_resource"])
    [model] = (await api.ok("GET", f"{base}/models", params={"name": "late-model"}))["models"]
    assert model["description"] == "late model"
    assert model["current_version"]["name"] == "v1"
    assert model["current_version"]["create_time"] == model["create_time"]
    [inst] = (await api.ok("GET", f"{base}/services/instances"))["service_instances"]
    assert (inst["name"], inst["endpoint_id"], inst["source"]["id"]) == \
        ("late_instance", ids["ep"], ids["model"])

    stats = await api.stats()
    assert late_counters(stats) == (4, 0)
    assert stats["created"] == {
        "workspace": {"apieworkspace": 1, "late-ws": 1},
        "endpoint": {"apie_test": 1, "late ep": 1},
        "model": {"LLama3-8b": 1, "late-model": 1},
        "service_instance": {"late_instance": 1}}


async def test_a_late_create_appears_late_by_seconds_after_its_request(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(late_create=1.0, late_by=0.3))
    asked_at = datetime.now(UTC)
    await dropped(api, "/v1/workspaces", {"name": "eventually"})

    listed = await until(lambda: api.ok("GET", "/v1/workspaces"), lambda doc: doc["total"] == 1,
                         timeout=30)
    [ws] = listed["workspaces"]
    assert ws["name"] == "eventually"
    created = datetime.fromisoformat(ws["create_time"].replace("Z", "+00:00"))
    assert (created - asked_at).total_seconds() >= 0.3 - 0.001  # create_time has milliseconds
    stats = await api.stats()
    assert stats["created"]["workspace"] == {"eventually": 1}
    assert late_counters(stats) == (1, 0)
    assert stats["live"]["workspace"] == 1


async def test_a_late_create_that_fabric_would_refuse_by_then_is_not_created(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(late_by=HOUR))
    await api.ok("POST", "/_emulator/faults", {"late_next": 1})
    await dropped(api, "/v1/workspaces", {"name": "taken", "description": "the late one"})
    # The late create is not carried out yet, so the same name is still free.
    mine = await api.ok("POST", "/v1/workspaces", {"name": "taken", "description": "mine"})
    gone = await api.ok("POST", "/v1/workspaces", {"name": "short-lived"})
    ws = await api.ok("POST", "/v1/workspaces", {"name": "holder"})
    models = f"/v1/workspaces/{ws['id']}/models"
    await api.ok("POST", "/_emulator/faults", {"late_next": 2})
    await dropped(api, models, {**MODEL_BODY, "name": "twin"})
    await dropped(api, f"/v1/workspaces/{gone['id']}/endpoints", ENDPOINT_BODY)
    twin = await api.ok("POST", models, {**MODEL_BODY, "name": "twin"})
    assert await api.ok("DELETE", f"/v1/workspaces/{gone['id']}") is None
    assert late_counters(await api.stats()) == (0, 3)

    await api.ok("POST", "/_emulator/faults", {"late_by": 0})
    stats = await api.stats()
    assert late_counters(stats) == (0, 0)  # all three were due, none could be created
    assert stats["created"]["workspace"] == {"taken": 1, "short-lived": 1, "holder": 1}
    assert stats["created"]["model"] == {"twin": 1}
    assert stats["created"]["endpoint"] == {}
    listed = await api.ok("GET", "/v1/workspaces", params={"name": "taken"})
    assert [(w["id"], w["description"]) for w in listed["workspaces"]] == [(mine["id"], "mine")]
    assert [m["id"] for m in (await api.ok("GET", models))["models"]] == [twin["id"]]


async def test_a_pending_late_create_survives_an_emulator_restart_on_its_state_file(
        tmp_path: Any, emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    state = str(tmp_path / "emulator.json")
    first = Api(http_session, await emulator_factory(late_create=1.0, late_by=HOUR,
                                                     state_file=state))
    await dropped(first, "/v1/workspaces", {"name": "in-transit", "description": "kept"})

    second = Api(http_session, await emulator_factory(late_by=HOUR, state_file=state))
    assert late_counters(await second.stats()) == (0, 1)
    await second.ok("POST", "/_emulator/faults", {"late_by": 0})
    listed = await second.ok("GET", "/v1/workspaces")
    assert [(w["name"], w["description"]) for w in listed["workspaces"]] == [("in-transit", "kept")]
    stats = await second.stats()
    assert (late_counters(stats), stats["created"]["workspace"]) == ((1, 0), {"in-transit": 1})


async def test_the_same_seed_makes_the_same_creates_late(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    async def outcomes(seed: int) -> list[str]:
        api = Api(http_session, await emulator_factory(late_create=0.5, late_by=HOUR, seed=seed))
        seen = []
        for n in range(24):
            try:
                await api.ok("POST", "/v1/workspaces", {"name": f"ws-{n:02d}"})
                seen.append("answered")
            except aiohttp.ServerDisconnectedError:
                seen.append("late")
        stats = await api.stats()
        assert late_counters(stats) == (0, seen.count("late"))
        assert sum(stats["created"]["workspace"].values()) == seen.count("answered")
        return seen

    first, again, other = await outcomes(11), await outcomes(11), await outcomes(12)
    assert first == again and first != other
    assert {"late", "answered"} == set(first)


# -- lagging lists ---------------------------------------------------------------------------

async def test_list_lag_hides_new_resources_from_lists_but_not_from_get(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(ready_after=0.1, instance_ready_after=0.1,
                                                   list_lag=HOUR))
    ids = await provision(api)  # creates in a workspace that no list shows yet
    base = ids["base"]
    lists = [("/v1/workspaces", "workspaces"), (f"{base}/endpoints", "endpoints"),
             (f"{base}/models", "models"), (f"{base}/services/instances", "service_instances")]
    for path, key in lists:
        assert await api.ok("GET", path) == {"total": 0, key: []}, path
        assert (await api.ok("GET", path, params={"name": "a"}))["total"] == 0, path
    assert (await api.ok("GET", f"{base}/endpoints/{ids['ep']}"))["status"] == "RUNNING"
    assert (await api.ok("GET", f"{base}/services/instances/{ids['inst']}"))["id"] == ids["inst"]
    assert (await api.ok("GET", f"{base}/models/{ids['model']}/versions"))["total"] == 1
    stats = await api.stats()
    assert stats["live"] == {"workspace": 1, "endpoint": 1, "model": 1, "service_instance": 1}

    await api.ok("POST", "/_emulator/faults", {"list_lag": 0})
    for path, key in lists:
        assert (await api.ok("GET", path))["total"] == 1, path


async def test_list_lag_shows_a_resource_once_old_enough_and_deletes_at_once(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(list_lag=0.2))
    ws = await api.ok("POST", "/v1/workspaces", {"name": "lagging"})
    models = f"/v1/workspaces/{ws['id']}/models"
    model = await api.ok("POST", models, {**MODEL_BODY, "name": "old-enough"})
    listed = await until(lambda: api.ok("GET", models), lambda doc: doc["total"] == 1, timeout=30)
    assert [m["id"] for m in listed["models"]] == [model["id"]]
    assert await api.ok("DELETE", f"{models}/{model['id']}") is None
    assert await api.ok("GET", models) == {"total": 0, "models": []}


# -- churn between pages ---------------------------------------------------------------------

async def test_page_churn_deletes_a_bystander_so_page_two_misses_a_survivor(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(page_churn=1.0, seed=3))
    ws = await api.ok("POST", "/v1/workspaces", {"name": "crowded"})
    path = f"/v1/workspaces/{ws['id']}/endpoints"
    created = []
    for n in range(150):  # the first five are fabricflow's, the other 145 someone else's
        description = f"ours {MARKER}" if n < 5 else "a bystander"
        created.append((await api.ok("POST", path, {**ENDPOINT_BODY, "name": f"ep {n:03d}",
                                                    "description": description}))["id"])

    first = await api.ok("GET", path, params={"limit": 100})
    assert (first["total"], len(first["endpoints"])) == (150, 100)
    assert (await api.stats())["churn_deleted"] == 0  # the first page is never churned
    second = await api.ok("GET", path, params={"offset": 100, "limit": 100})
    assert (second["total"], len(second["endpoints"])) == (149, 49)

    churned, missed = created[5], created[100]  # the first bystander; the item shifted left
    seen = {ep["id"] for ep in first["endpoints"] + second["endpoints"]}
    still_there = set(created) - {churned}
    assert still_there - seen == {missed}  # page two skipped a survivor...
    assert seen - still_there == {churned}  # ...and page one showed what is gone now
    assert (await api.call("GET", f"{path}/{churned}"))[0] == 404
    assert (await api.ok("GET", f"{path}/{missed}"))["id"] == missed  # there all along
    stats = await api.stats()
    assert (stats["churn_deleted"], stats["live"]["endpoint"]) == (1, 149)
    assert stats["created"]["endpoint"][f"ep {5:03d}"] == 1

    # Every later page churns while bystanders remain; fabricflow's endpoints are never taken.
    for _ in range(3):
        await api.ok("GET", path, params={"offset": 10, "limit": 100})
    assert (await api.stats())["churn_deleted"] == 4
    everything = (await api.ok("GET", path, params={"limit": 100}))["endpoints"]
    assert [ep["id"] for ep in everything[:6]] == created[:5] + [created[9]]


async def test_page_churn_spares_markers_and_what_fabric_would_refuse_to_delete(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(ready_after=0.1, instance_ready_after=0.1,
                                                   page_churn=1.0))
    ids = await provision(api)  # a workspace holding an endpoint serving an instance
    ours = [await api.ok("POST", "/v1/workspaces", {"name": f"ours-{n}",
                                                     "description": f"job {MARKER}"})
            for n in range(3)]
    # Before offset 4: a workspace that holds resources, then three marked ones.
    assert await names(api, "/v1/workspaces", "workspaces", offset=4) == []
    eps = f"{ids['base']}/endpoints"
    await api.ok("POST", eps, {**ENDPOINT_BODY, "name": "second"})
    assert await names(api, eps, "endpoints", offset=1) == ["second"]  # apie_test serves
    assert (await api.stats())["churn_deleted"] == 0
    assert await names(api, "/v1/workspaces", "workspaces") == \
        ["apieworkspace"] + [w["name"] for w in ours]

    # A plain bystander before the offset goes, so last-one slips back onto the first page.
    await api.ok("POST", "/v1/workspaces", {"name": "lonely"})
    await api.ok("POST", "/v1/workspaces", {"name": "last-one"})
    assert await api.ok("GET", "/v1/workspaces", params={"offset": 5}) == \
        {"total": 5, "workspaces": []}
    stats = await api.stats()
    assert (stats["churn_deleted"], stats["live"]["workspace"]) == (1, 5)
    assert await names(api, "/v1/workspaces", "workspaces") == \
        ["apieworkspace"] + [w["name"] for w in ours] + ["last-one"]


async def test_churn_next_scripts_churn_and_the_seed_repeats_it(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory())
    ws = await api.ok("POST", "/v1/workspaces", {"name": "scripted"})
    models = f"/v1/workspaces/{ws['id']}/models"
    for n in range(6):
        await api.ok("POST", models, {**MODEL_BODY, "name": f"m{n}"})
    await api.ok("POST", "/_emulator/faults", {"churn_next": 1})
    by_name = {"sort_by": "NAME", "order_by": "ASC"}  # m0 .. m5
    # The first page churns nothing and does not spend the scripted churn; the later page
    # goes after m0 is deleted, so m3 has slipped onto the first page and is never seen.
    assert await names(api, models, "models", limit=3, **by_name) == ["m0", "m1", "m2"]
    assert await names(api, models, "models", offset=3, limit=3, **by_name) == ["m4", "m5"]
    assert (await api.ok("GET", "/_emulator/faults"))["churn_next"] == 0
    assert await names(api, models, "models", offset=3, limit=3, **by_name) == ["m4", "m5"]
    assert (await api.stats())["churn_deleted"] == 1

    async def churned_pages(seed: int) -> list[int]:
        api = Api(http_session, await emulator_factory(page_churn=0.5, seed=seed))
        ws = await api.ok("POST", "/v1/workspaces", {"name": "seeded"})
        models = f"/v1/workspaces/{ws['id']}/models"
        for n in range(30):
            await api.ok("POST", models, {**MODEL_BODY, "name": f"m{n:02d}"})
        totals = [(await api.ok("GET", models, params={"offset": 1}))["total"] for _ in range(20)]
        assert (await api.stats())["churn_deleted"] == 30 - totals[-1]
        return totals

    first, again, other = await churned_pages(5), await churned_pages(5), await churned_pages(6)
    assert first == again and first != other
    assert 10 < first[-1] < 30  # some pages churned, some did not


# -- knobs, validation, configuration --------------------------------------------------------

async def test_fault_knobs_are_shown_validated_and_reset_to_the_config(
        emulator_factory: Any, http_session: aiohttp.ClientSession) -> None:
    api = Api(http_session, await emulator_factory(late_create=0.25, late_by=5, list_lag=1.5,
                                                   page_churn=0.125))
    configured = {"late_create": 0.25, "late_by": 5.0, "list_lag": 1.5, "page_churn": 0.125,
                  "late_next": 0, "churn_next": 0}
    knobs = await api.ok("GET", "/_emulator/faults")
    assert {key: knobs[key] for key in configured} == configured

    for doc, message in [
        ({"late_create": 1.5}, "late_create must be a number between 0 and 1"),
        ({"page_churn": True}, "page_churn must be a number between 0 and 1"),
        ({"late_by": -1}, "late_by must be a number of seconds >= 0"),
        ({"list_lag": "2"}, "list_lag must be a number of seconds >= 0"),
        ({"late_next": 1.5}, "late_next must be a non-negative integer"),
        ({"churn_next": -1}, "churn_next must be a non-negative integer"),
        ({"page_churn": 0.5, "list_lag": -1}, "list_lag must be a number of seconds >= 0"),
        ({"late_rate": 0.5}, "Unknown fault settings: late_rate"),
    ]:
        status, _, err = await api.call("POST", "/_emulator/faults", doc)
        assert (status, err) == (400, {"error_code": "FABRIC.0400", "error_msg": message}), doc
    assert await api.ok("GET", "/_emulator/faults") == knobs  # a refused document changes nothing

    changed = {"late_create": 1, "late_by": 0.5, "list_lag": 0, "page_churn": 0,
               "late_next": 2, "churn_next": 3}
    knobs = await api.ok("POST", "/_emulator/faults", changed)
    assert {key: knobs[key] for key in changed} == changed
    await api.ok("POST", "/_emulator/reset")
    knobs = await api.ok("GET", "/_emulator/faults")
    assert {key: knobs[key] for key in configured} == configured


@pytest.mark.parametrize(("settings", "message"), [
    ({"late_create": 1.5}, "late_create must be between 0 and 1, got 1.5"),
    ({"page_churn": -0.1}, "page_churn must be between 0 and 1, got -0.1"),
    ({"late_by": -1}, "late_by must be >= 0, got -1"),
    ({"list_lag": -0.5}, "list_lag must be >= 0, got -0.5"),
])
def test_emulator_config_refuses_out_of_range_faults(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EmulatorConfig(**settings)


def emulator_command(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "emulator", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_the_emulator_command_takes_the_fault_flags() -> None:
    proc = emulator_command("--host", "127.0.0.1", "--port", "0", "--late-create", "1",
                            "--late-by", "7.5", "--list-lag", "2", "--page-churn", "0.25",
                            "--seed", "3")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ", 1)[1].split()[0]
        with urllib.request.urlopen(f"{url}/_emulator/faults", timeout=10) as resp:
            knobs = json.load(resp)
        assert {key: knobs[key] for key in ("late_create", "late_by", "list_lag", "page_churn")} \
            == {"late_create": 1.0, "late_by": 7.5, "list_lag": 2.0, "page_churn": 0.25}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(("flag", "value", "complaint"), [
    ("--late-create", "2", "Invalid value for '--late-create': 2.0 is not in the range 0<=x<=1."),
    ("--page-churn", "-1", "Invalid value for '--page-churn': -1.0 is not in the range 0<=x<=1."),
    ("--late-by", "-3", "Invalid value for '--late-by': -3.0 is not in the range x>=0."),
    ("--list-lag", "soon", "Invalid value for '--list-lag': 'soon' is not a valid float range."),
])
def test_the_emulator_command_refuses_bad_fault_flags(flag: str, value: str, complaint: str) -> None:
    proc = emulator_command("--port", "0", flag, value)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert complaint in err
