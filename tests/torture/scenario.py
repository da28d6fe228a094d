"""The torture scenario: many jobs, a faulty emulator, daemons killed with SIGKILL many times.

``run_torture`` drives real processes, exactly as a user would run them: ``fabricflow emulator``
with fault injection, ``fabricflow submit`` for every job, and ``fabricflow daemon``, which is
killed with SIGKILL for a number of rounds (mostly a few milliseconds after a create intent is
committed, so the kill lands between a create reaching the emulator and its answer being
committed) and restarted; the last daemon runs every job to its end and is stopped with SIGTERM.

On a SQLite file there is one daemon (one per file, by design). On PostgreSQL several daemons
(``daemons=N``) share the jobs at once; each kill round SIGKILLs one of them (a seeded choice
among those holding jobs) and restarts it, and the killed daemon's jobs are taken over, by the
others or by its successor, once their leases lapse (``FABRICFLOW_DAEMON__LEASE_SECONDS``); all
N run the last phase to the end and are stopped with SIGTERM.

It then gathers the figures from the emulator (``/_emulator/stats`` and its public API) and the
database, and checks the invariants of DESIGN.md, "Exactly once, across crashes":

1. every job SUCCEEDED (or FAILED only with an error the injected faults make legitimate:
   none, since the emulator injects only transient faults here);
2. no job is lost (every job is terminal);
3. no name is created twice (``stats["created"][kind][name] == 1``);
4. every resource ID recorded in ``steps.resource_id`` exists in the emulator, and nothing live
   in the emulator is unrecorded (orphans);
5. every job's events are a legal path through ``machine.STEP_TRANSITIONS`` and
   ``JOB_TRANSITIONS`` that ends in the state the tables hold.

The summary is plain JSON-able data; ``summary["violations"]`` lists every broken invariant.
"""

from __future__ import annotations

import json
import math
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import DaemonSettings, RetrySettings
from orchestrator.machine import (
    JOB_TRANSITIONS,
    STEP_TRANSITIONS,
    JobState,
    StepName,
    StepState,
)
from tests.crash.procs import Daemon, Emulator, cli, env
from tests.torture.reader import Reader

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

#: Which emulator kind each step's ``resource_id`` names.
STEP_KIND = {
    "workspace": "workspace",
    "endpoint": "endpoint",
    "endpoint_ready": "endpoint",
    "model": "model",
    "service_instance": "service_instance",
    "service_ready": "service_instance",
    "invocation": "service_instance",
}
CREATE_STEPS = ("workspace", "endpoint", "model", "service_instance")
#: How long a killed daemon's jobs stay its own on PostgreSQL (no same-machine shortcut there).
LEASE_SECONDS = float(env()["FABRICFLOW_DAEMON__LEASE_SECONDS"])
STEP_NAMES = frozenset(name.value for name in StepName)
KINDS = CREATE_STEPS

#: Error codes that the faults injected here make a legitimate end for a job. The emulator only
#: injects transient errors (429/5xx, dropped answers, slow answers), which the engine must ride
#: out within its default retry limits, so none is legitimate.
LEGITIMATE_FAILURE_CODES: frozenset[str] = frozenset()


class Deadline:
    """A point in time that bounds a loop."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at


# --- specs and submission --------------------------------------------------------------------


def job_names(index: int, seed: int) -> dict[str, str]:
    """Unique names for job ``index``; ``tw1-1`` is a substring of ``tw1-10``, on purpose.

    The emulator's name filter is fuzzy (substring), so these names make the engine's exact-match
    filtering and its paging through several pages of fuzzy matches do real work.
    """
    return {
        "workspace": f"tw{seed}-{index}",  # 4-32 letters, digits, '_' or '-'
        "endpoint": f"tep{seed}-{index}",
        "model": f"tmodel{seed}-{index}",
        "service_instance": f"tsi{seed}-{index}",
    }


def write_specs(workdir: Path, jobs: int, seed: int) -> list[tuple[Path, dict[str, str]]]:
    """One spec file per job: the quickstart with this job's unique names."""
    base = yaml.safe_load(QUICKSTART.read_text())
    specs = []
    for index in range(1, jobs + 1):
        names = job_names(index, seed)
        data = json.loads(json.dumps(base))
        data["name"] = f"torture-{seed}-{index}"
        for key, name in names.items():
            data[key]["name"] = name
        data["invocation"]["messages"][0]["content"] = f"hello from job {index}"
        path = workdir / "specs" / f"job-{index:04d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        specs.append((path, names))
    return specs


def make_bystanders(base: str, prefix: str, count: int) -> frozenset[str]:
    """``count`` workspaces of another user whose names contain ``prefix``: a fuzzy look-up of
    that name then spans several pages, and page churn deletes some of them between pages. They
    are made with every fault off, which is put back as it was afterwards."""
    if count == 0:
        return frozenset()
    _, configured = http(f"{base}/_emulator/faults")
    knobs = ("fail_rate", "drop_rate", "slow_rate", "cut_rate", "late_create", "page_churn", "list_lag")
    http(f"{base}/_emulator/faults", method="POST", body=dict.fromkeys(knobs, 0))
    names = [f"{prefix}-by{k}" for k in range(count)]
    for name in names:
        status, body = http(f"{base}/v1/workspaces", method="POST", body={"name": name})
        assert status == 200, (status, body)
    http(f"{base}/_emulator/faults", method="POST", body={k: configured[k] for k in knobs})
    return frozenset(names)


def submit_all(db_url: str, specs: list[Path], *, parallel: int = 3) -> list[str]:
    """``fabricflow submit`` every spec (a few at a time: each is a Python start-up).

    The database must be migrated first (``fabricflow db upgrade``), so the submits do not race
    to do it.
    """

    def submit(path: Path) -> str:
        job_id = cli("submit", str(path), "--db", db_url).stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{32}", job_id), job_id
        return job_id

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(submit, specs))


# --- the emulator's HTTP API -----------------------------------------------------------------


def http(url: str, *, method: str = "GET", body: Any = None, attempts: int = 5) -> tuple[int, Any]:
    """One call to the emulator; transient answers are retried a bounded number of times."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    status, doc = 0, None
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read()
            finally:
                exc.close()
            status, doc = exc.code, (json.loads(raw) if raw else None)
            if exc.code not in (429, 500, 502, 503, 504):
                return status, doc
        time.sleep(0.05 * (attempt + 1))
    return status, doc


def list_all(base: str, path: str, key: str, **params: str) -> list[dict[str, Any]]:
    """Every item of an emulator list call, across all pages (bounded)."""
    items: list[dict[str, Any]] = []
    for page in range(1000):
        qs = urllib.parse.urlencode({**params, "offset": str(page * 100), "limit": "100"})
        status, doc = http(f"{base}{path}?{qs}")
        if status != 200:
            raise AssertionError(f"GET {path}?{qs} answered {status}: {doc}")
        batch = doc.get(key) or []
        items.extend(batch)
        if not batch or len(items) >= doc.get("total", 0):
            return items
    raise AssertionError(f"GET {path}: more than 1000 pages")


def resource_exists(base: str, kind: str, workspace_id: str | None, resource_id: str) -> dict[str, Any] | None:
    """The emulator's view of one recorded resource, or None if it does not exist."""
    quoted = urllib.parse.quote
    if kind == "workspace":
        found = list_all(base, "/v1/workspaces", "workspaces", id=resource_id)
        return next((w for w in found if w["id"] == resource_id), None)
    if workspace_id is None:
        return None
    ws = f"/v1/workspaces/{quoted(workspace_id, safe='')}"
    if kind == "model":
        found = list_all(base, f"{ws}/models", "models", id=resource_id)
        return next((m for m in found if m["id"] == resource_id), None)
    path = {"endpoint": f"{ws}/endpoints/", "service_instance": f"{ws}/services/instances/"}[kind]
    status, doc = http(f"{base}{path}{quoted(resource_id, safe='')}")
    if status == 404:
        return None
    if status != 200:
        raise AssertionError(f"GET {path}{resource_id} answered {status}: {doc}")
    return doc


def live_resources(base: str) -> dict[str, dict[str, str]]:
    """Every live resource in the emulator: kind -> {id: name}."""
    live: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
    for ws in list_all(base, "/v1/workspaces", "workspaces"):
        live["workspace"][ws["id"]] = ws["name"]
        prefix = f"/v1/workspaces/{urllib.parse.quote(ws['id'], safe='')}"
        for kind, path, key in (("endpoint", "/endpoints", "endpoints"),
                                ("model", "/models", "models"),
                                ("service_instance", "/services/instances", "service_instances")):
            for item in list_all(base, prefix + path, key):
                live[kind][item["id"]] = item["name"]
    return live


# --- killing at interesting moments ----------------------------------------------------------


def last_event_id(db: Reader) -> int:
    return int(db.scalar("SELECT COALESCE(MAX(id), 0) FROM events"))


def unfinished(db: Reader) -> int:
    return int(db.scalar("SELECT COUNT(*) FROM jobs WHERE state NOT IN ('SUCCEEDED','FAILED','CANCELLED')"))


def wait_for_event(db: Reader, where: str, after: int, deadline: Deadline, every: float,
                   *params: Any) -> int | None:
    """The id of the first event after ``after`` matching ``where`` (whose ``?`` take ``params``),
    polling until ``deadline``.

    On PostgreSQL event ids are drawn when a row is inserted, so with several daemons an event
    can commit after one with a higher id and be missed here; that only shifts a kill's moment.
    """
    sql = f"SELECT id FROM events WHERE id > ? AND {where} ORDER BY id LIMIT 1"
    while not deadline.passed:
        rows = db.query(sql, after, *params)
        if rows:
            return int(rows[0][0])
        time.sleep(every)
    return None


def steps_done(db: Reader) -> int:
    return int(db.scalar("SELECT COUNT(*) FROM steps WHERE state IN ('SUCCEEDED','SKIPPED','FAILED')"))


def steps_left(db: Reader) -> int:
    return int(db.scalar("SELECT COUNT(*) FROM steps WHERE state NOT IN ('SUCCEEDED','SKIPPED','FAILED')"))


def log_owner(log: Path) -> str | None:
    """The lease owner a daemon announced in its ``daemon_started`` log line (JSON logs)."""
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        if '"daemon_started"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "daemon_started":
            return record.get("owner")
    return None


def wait_started(fleet: list[Daemon], logs: list[Path], deadline: Deadline) -> None:
    """Until every daemon of ``fleet`` logged ``daemon_started`` (or died, or ``deadline``)."""
    while not deadline.passed:
        if all(d.proc.poll() is not None or '"daemon_started"' in log.read_text(errors="replace")
               for d, log in zip(fleet, logs, strict=True)):
            return
        time.sleep(0.02)


def stop_round(rng: random.Random, db: Reader, fleet: list[Daemon], fleet_logs: list[Path]) -> dict[str, Any]:
    """Freeze one daemon holding RUNNING jobs (seeded choice) with SIGSTOP for 1.5 leases, so the
    others take its jobs over, then SIGCONT it: its runners wake up believing they still hold
    those jobs, and fencing must keep them from creating or recording anything."""
    owners = {log_owner(log): n for n, log in enumerate(fleet_logs)}
    held = [r[0] for r in db.query("SELECT DISTINCT lease_owner FROM jobs WHERE state = 'RUNNING'")]
    candidates = sorted(owners[o] for o in held if o in owners) or list(range(len(fleet)))
    victim = rng.choice(candidates)
    holding = int(db.scalar(f"SELECT COUNT(*) FROM jobs WHERE state = 'RUNNING' AND lease_owner = "
                            f"'{log_owner(fleet_logs[victim])}'"))
    fleet[victim].proc.send_signal(signal.SIGSTOP)
    time.sleep(LEASE_SECONDS * 1.5)
    fleet[victim].proc.send_signal(signal.SIGCONT)
    return {"daemon": victim, "held_running_jobs": holding, "frozen_seconds": LEASE_SECONDS * 1.5}


def db_scalar_takeovers(url: str, owners: set[str]) -> int:
    """Recovery (takeover) events recorded by ``owners``: jobs they took from another daemon."""
    db = Reader(url)
    try:
        rows = db.query("SELECT detail FROM events WHERE detail LIKE 'recovered by %'")
        return sum(1 for (detail,) in rows if any((detail or "").startswith(f"recovered by {o} ") for o in owners))
    finally:
        db.close()


def kill_round(rng: random.Random, db: Reader, fleet: list[Daemon], fleet_logs: list[Path],
               emulator: Emulator, *, rounds_after: int) -> dict[str, Any]:
    """Let the daemons live a (seeded) 0.3-1.2 s and make a random share of the remaining
    progress, then SIGKILL one of them at a moment biased towards creates in flight; returns
    what it interrupted, with the killed daemon's index in ``fleet`` as ``"daemon"``.

    The share is about ``1 / (rounds_after + 2)`` of the steps still to do, so the kills spread
    over the whole run instead of all landing at start-up (or after every job has finished).
    With several daemons the victim is a seeded choice among those holding RUNNING jobs (any,
    when none does), and the moments below are its own jobs' events. Then, by a seeded roll:
    - ``intent`` (60%): the next create intent (PENDING -> IN_FLIGHT) is committed; kill 0-50 ms
      later, while the lookup or the create request is on the wire;
    - ``in_flight`` (20%): the next IN_FLIGHT transition (retries, invocations); kill 0-50 ms later;
    - ``random`` (20%): 0-0.5 s later, whatever the daemon is doing.
    If the awaited transition does not come within a bounded time, the daemon is killed anyway.
    """
    roll = rng.random()
    mode = "intent" if roll < 0.6 else "in_flight" if roll < 0.8 else "random"
    jitter = rng.uniform(0.0, 0.05) if mode != "random" else rng.uniform(0.0, 0.5)
    budget = int(steps_left(db) * rng.uniform(0.1, 0.7) / (rounds_after + 2))
    # A daemon killed again and again within a second of starting never reaches most of its
    # jobs; each takeover counts towards the poison-job limit (``max_recoveries`` in a row), so a
    # cadence that fast fails jobs by design. Give every life a seeded 0.3-1.2 s first.
    min_life = rng.uniform(0.3, 1.2)
    start = steps_done(db)
    deadline = Deadline(30.0)

    def all_alive() -> bool:
        return all(d.proc.poll() is None for d in fleet)

    if len(fleet) == 1:
        wait_started(fleet, fleet_logs, deadline)
    # With several daemons the others work on while a victim restarts: waiting for it too would
    # let them finish most jobs between rounds; the victim is chosen below among those with jobs.
    alive_until = Deadline(min_life)
    while not deadline.passed and all_alive() and \
            (steps_done(db) - start < budget or not alive_until.passed):
        time.sleep(0.01)
    progress = steps_done(db) - start
    busy = unfinished(db) > 0
    owners = [log_owner(log) for log in fleet_logs]
    if len(fleet) == 1:
        slot, scope, scope_params = 0, "", ()
    else:
        held = dict(db.query("SELECT lease_owner, COUNT(*) FROM jobs WHERE state = 'RUNNING' "
                             "GROUP BY lease_owner"))
        holders = [i for i, owner in enumerate(owners) if owner is not None and held.get(owner)]
        slot = rng.choice(holders or list(range(len(fleet))))
        # Only the victim's jobs: the moment to aim at is one of its creates in the air.
        scope = " AND job_id IN (SELECT id FROM jobs WHERE lease_owner = ?)"
        scope_params = (owners[slot] or "",)
    victim = fleet[slot]
    mark = last_event_id(db)
    seen = None
    if mode != "random" and busy:
        where = ("from_state = 'PENDING' AND to_state = 'IN_FLIGHT' AND step IN "
                 "('workspace','endpoint','model','service_instance')" if mode == "intent"
                 else "to_state = 'IN_FLIGHT'")
        seen = wait_for_event(db, where + scope, mark, Deadline(3.0), 0.005, *scope_params)
        if seen is None and mode == "intent":
            seen = wait_for_event(db, "to_state = 'IN_FLIGHT'" + scope, mark, Deadline(2.0), 0.005,
                                  *scope_params)
            mode = "intent->in_flight" if seen is not None else mode
        mode = mode if seen is not None else f"{mode}:not_seen"
    event = db.query("SELECT step, from_state, to_state FROM events WHERE id = ?", seen) if seen else []
    for index, daemon in enumerate(fleet):
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon {index} ({fleet_logs[index].name}) died by itself "
                                 f"with exit code {daemon.proc.returncode}")
    time.sleep(jitter)  # the random offset of the kill, not a synchronisation
    victim.kill()
    # What the kill interrupted: create steps left IN_FLIGHT (of the victim's jobs: they keep
    # its name as lease owner until taken over), and among them the ones whose resource already
    # exists in the emulator (the create landed, its answer was not committed).
    in_flight = db.query("SELECT job_id, name, request_name FROM steps WHERE state = 'IN_FLIGHT' "
                         "AND name IN ('workspace','endpoint','model','service_instance')" + scope,
                         *scope_params)
    victim_jobs = (len(db.query("SELECT id FROM jobs WHERE state = 'RUNNING' AND lease_owner = ?", owners[slot]))
                   if owners[slot] else 0)
    created = emulator.stats()["created"]
    landed = [(j, s) for j, s, n in in_flight if n and created.get(s, {}).get(n, 0) > 0]
    return {"moment": mode, "after_event": list(event[0]) if event else None,
            "daemon": slot, "log": fleet_logs[slot].name, "victim_running_jobs": victim_jobs,
            "life_s": round(min_life, 2), "steps_done_before": progress, "jitter_ms": round(jitter * 1000, 1),
            "creates_in_flight": len(in_flight), "creates_landed_not_committed": len(landed),
            "unfinished_jobs": unfinished(db)}


# --- checking --------------------------------------------------------------------------------


def check_events(job_id: str, events: list[tuple[Any, ...]], job_state: str,
                 step_states: dict[str, str]) -> list[str]:
    """Problems with one job's event log as a path through the state tables (empty if legal)."""
    problems: list[str] = []
    job: str | None = None
    steps: dict[str, str] = {}  # every step starts PENDING (create and teardown jobs alike)
    for event_id, step, src, dst, detail in events:
        if dst is None:
            continue  # a note: no transition
        where = f"job {job_id[:8]} event {event_id} ({detail!r})"
        if step is None:
            if job is None:
                if (src, dst) != (None, JobState.PENDING.value):
                    problems.append(f"{where}: first job event is {src} -> {dst}, not None -> PENDING")
            elif src != job:
                problems.append(f"{where}: job moves from {src} but was {job}")
            elif (JobState(src), JobState(dst)) not in JOB_TRANSITIONS:
                problems.append(f"{where}: job {src} -> {dst} is not in JOB_TRANSITIONS")
            job = dst
            continue
        if step not in STEP_NAMES:
            problems.append(f"{where}: unknown step {step}")
            continue
        steps.setdefault(step, StepState.PENDING.value)
        if job != JobState.RUNNING.value:
            problems.append(f"{where}: step {step} moved while the job was {job}")
        if src != steps[step]:
            problems.append(f"{where}: step {step} moves from {src} but was {steps[step]}")
        elif (StepState(src), StepState(dst)) not in STEP_TRANSITIONS:
            problems.append(f"{where}: step {step} {src} -> {dst} is not in STEP_TRANSITIONS")
        steps[step] = dst
    if job != job_state:
        problems.append(f"job {job_id[:8]}: events end in job state {job}, the jobs table says {job_state}")
    for name, state in step_states.items():
        if steps.get(name, StepState.PENDING.value) != state:
            problems.append(f"job {job_id[:8]}: events end step {name} in {steps.get(name, 'PENDING')}, "
                            f"the steps table says {state}")
    return problems


def engine_observations(db: Reader, logs: list[Path]) -> dict[str, int]:
    """What the engine saw of the faults: its event log (job-level retries, reconciliations)
    and its logs (in-call retries of reads, which stamina absorbs without an event)."""
    count: Counter[str] = Counter()
    for (detail,) in db.query("SELECT detail FROM events WHERE detail IS NOT NULL"):
        if "failed (transient)" in detail:
            count["step_retries_transient"] += 1
        elif "outcome unknown" in detail:
            count["step_retries_unknown_outcome"] += 1
            if "no complete response" in detail:
                count["create_answers_lost"] += 1
        if "created earlier by this job; adopted" in detail:
            count["adopted_by_reconciliation"] += 1
        if detail.startswith("recovered by"):
            count["job_recoveries_after_kill"] += 1
        match = re.search(r"HTTP (\d{3})", detail) if "failed (" in detail else None
        if match:
            count[f"http_{match.group(1)}"] += 1
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if '"stamina.retry_scheduled"' in line:
                count["read_retries_in_call"] += 1
                match = re.search(r"HTTP (\d{3})", line)
                count[f"http_{match.group(1)}" if match else "read_retry_other"] += 1
    return dict(sorted(count.items()))


def daemon_log_problems(logs: list[Path], expected: frozenset[str] = frozenset()) -> list[str]:
    """Error-level lines and tracebacks in the daemons' logs (but ``expected`` events)."""
    problems = []
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if any(f'"event": "{event}"' in line for event in expected):
                continue
            if "Traceback" in line or '"level": "error"' in line or "job_crashed" in line:
                problems.append(f"{path.name}: {line[:400]}")
    return problems


def gather(db: Reader, emulator: Emulator, jobs_submitted: list[str],
           names: dict[str, dict[str, str]], logs: list[Path],
           bystanders: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Figures and invariant checks after the run (faults are switched off first).
    ``bystanders``: workspace names another user made; they are nobody's to record."""
    base = emulator.url
    http(f"{base}/_emulator/faults", method="POST",
         body={"fail_rate": 0, "drop_rate": 0, "slow_rate": 0, "cut_rate": 0, "late_create": 0,
               "page_churn": 0, "list_lag": 0})
    stats = emulator.stats()
    stats["created"]["workspace"] = {n: c for n, c in stats["created"].get("workspace", {}).items()
                                     if n not in bystanders}

    job_rows = {row[0]: row for row in db.query("SELECT id, name, state, error FROM jobs")}
    step_rows: dict[str, dict[str, tuple[Any, ...]]] = defaultdict(dict)
    for row in db.query("SELECT job_id, name, state, resource_id, resource_status, request_name, "
                        "error, extra FROM steps"):
        step_rows[row[0]][row[1]] = row
    events: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in db.query("SELECT job_id, id, step, from_state, to_state, detail FROM events ORDER BY id"):
        events[row[0]].append(row[1:])

    violations: list[str] = []
    missing_jobs = [j for j in jobs_submitted if j not in job_rows]
    violations += [f"job {j} was submitted but is not in the database" for j in missing_jobs]

    # 1 and 2: outcomes.
    succeeded = [j for j, r in job_rows.items() if r[2] == JobState.SUCCEEDED.value]
    failed = []
    for job_id, row in job_rows.items():
        if row[2] != JobState.FAILED.value:
            continue
        error = json.loads(row[3]) if row[3] else {}
        bad_steps = [n for n, s in step_rows[job_id].items() if s[2] == StepState.FAILED.value]
        entry = {"job": job_id, "name": row[1], "step": bad_steps[0] if bad_steps else None,
                 "code": error.get("code"), "message": error.get("message")}
        if error.get("code") == "fabricflow.poison":
            entry.update(poison_evidence(events[job_id], step_rows[job_id]))
        failed.append(entry)
    for f in failed:
        if f["code"] not in LEGITIMATE_FAILURE_CODES:
            violations.append(f"job {f['job']} FAILED at step {f['step']}: {f['code']}: {f['message']}")
    lost = [j for j, r in job_rows.items() if not JobState(r[2]).is_terminal] + missing_jobs
    violations += [f"job {j} is lost: still {job_rows[j][2] if j in job_rows else 'missing'}" for j in lost]

    # 3: nothing created twice; nothing created under a name no job asked for.
    duplicates = {kind: {n: c for n, c in stats["created"].get(kind, {}).items() if c != 1} for kind in KINDS}
    duplicates = {k: v for k, v in duplicates.items() if v}
    for kind, counts in duplicates.items():
        violations += [f"{kind} {n!r} was created {c} times" for n, c in counts.items()]
    asked = {kind: {n[kind] for n in names.values()} for kind in KINDS}
    strays = {kind: sorted(set(stats["created"].get(kind, {})) - asked[kind]) for kind in KINDS}
    strays = {k: v for k, v in strays.items() if v}
    violations += [f"{kind} {n!r} was created but no job asked for it" for kind, ns in strays.items() for n in ns]
    for job_id in succeeded:  # a job that succeeded created each of its four names exactly once
        spec_names = names.get(job_id, {})
        for kind in KINDS:
            if stats["created"].get(kind, {}).get(spec_names.get(kind, ""), 0) != 1:
                violations.append(f"job {job_id[:8]} SUCCEEDED but {kind} {spec_names.get(kind)!r} was created "
                                  f"{stats['created'].get(kind, {}).get(spec_names.get(kind, ''), 0)} times")

    # 4: every recorded ID exists; everything live was recorded; a finished job's IDs agree.
    missing_resources: list[str] = []
    recorded: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for job_id, steps in step_rows.items():
        ws_id = steps.get("workspace", (None,) * 8)[3]
        for name, row in steps.items():
            resource_id = row[3]
            if resource_id is None:
                continue
            kind = STEP_KIND[name]
            recorded[kind].add(resource_id)
            found = resource_exists(base, kind, ws_id, resource_id)
            if found is None:
                missing_resources.append(f"job {job_id[:8]} step {name}: {kind} {resource_id} does not exist")
            elif name in CREATE_STEPS and row[5] and found.get("name") != row[5]:
                missing_resources.append(f"job {job_id[:8]} step {name}: {kind} {resource_id} is named "
                                         f"{found.get('name')!r}, the intent said {row[5]!r}")
        if job_rows.get(job_id, (None,) * 3)[2] == JobState.SUCCEEDED.value:
            violations += _check_wiring(base, job_id, steps)
    violations += missing_resources
    live = live_resources(base)
    live["workspace"] = {rid: name for rid, name in live["workspace"].items() if name not in bystanders}
    intents = {(STEP_KIND[n], r[5]): (job_id, n) for job_id, steps in step_rows.items()
               for n, r in steps.items() if r[2] == StepState.IN_FLIGHT.value and r[5]}
    orphans = []
    for kind in KINDS:
        for rid, name in live[kind].items():
            if rid in recorded[kind]:
                continue
            text = f"{kind} {rid} ({name!r})"
            if (kind, name) in intents:
                owner, step = intents[(kind, name)]
                text += (f", left by job {owner[:8]} ({job_rows[owner][2]}) whose step {step} ended "
                         "IN_FLIGHT: its create landed and was never reconciled")
            orphans.append(text)
    violations += [f"orphan: {o} is live in the emulator but no job recorded it" for o in orphans]

    # 5: event logs are legal paths ending where the tables are.
    illegal: list[str] = []
    for job_id, row in job_rows.items():
        illegal += check_events(job_id, events[job_id], row[2],
                                {n: s[2] for n, s in step_rows[job_id].items()})
    violations += illegal

    return {
        "succeeded": len(succeeded),
        "failed": len(failed),
        "failed_reasons": failed,
        "lost": len(lost),
        "lost_jobs": lost,
        "duplicates": sum(c - 1 for counts in duplicates.values() for c in counts.values()),
        "duplicate_names": duplicates,
        "orphans": len(orphans),
        "orphan_resources": orphans,
        "missing_resources": len(missing_resources),
        "illegal_event_paths": len(illegal),
        "created": {kind: sum(stats["created"].get(kind, {}).values()) for kind in KINDS},
        "live": stats["live"],
        "requests": stats["requests"],
        "cloud_faults": {"late_created": stats.get("late_created", 0), "late_pending": stats.get("late_pending", 0),
                         "churn_deleted": stats.get("churn_deleted", 0), "bystanders": len(bystanders)},
        "events": sum(len(e) for e in events.values()),
        # Extra resources with a job's marker that the engine found and deleted (a late create
        # beyond the settle window, a create carried out twice): repaired, not left standing.
        "duplicates_repaired": sum(1 for evs in events.values() for e in evs
                                   if (e[4] or "").startswith("deleted duplicate ")),
        "engine_saw": engine_observations(db, logs),
        "violations": violations,
    }


def poison_evidence(events: list[tuple[Any, ...]], steps: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """For a job failed as poison: how many times in a row it was taken over without a step
    finishing, and which steps it left in progress (from its event log and steps)."""
    streak = 0
    for _, step, src, dst, detail in events:
        if step is not None and dst in (StepState.SUCCEEDED.value, StepState.SKIPPED.value):
            streak = 0
        elif step is None and src == JobState.RUNNING.value and dst in (JobState.RUNNING.value,
                                                                         JobState.FAILED.value):
            streak += 1 if (detail or "").startswith(("recovered by", "interrupted")) else 0
    return {"takeovers_without_a_step_finishing": streak,
            "steps_left_in_progress": sorted(n for n, r in steps.items()
                                             if r[2] in (StepState.IN_FLIGHT.value, StepState.WAITING.value))}


def _check_wiring(base: str, job_id: str, steps: dict[str, tuple[Any, ...]]) -> list[str]:
    """A succeeded job's steps agree with each other and with the emulator."""
    problems = []
    rid = {name: row[3] for name, row in steps.items()}
    for name, row in steps.items():
        if row[2] != StepState.SUCCEEDED.value:
            problems.append(f"job {job_id[:8]} SUCCEEDED but step {name} is {row[2]}")
    for waiter, source in (("endpoint_ready", "endpoint"), ("service_ready", "service_instance"),
                           ("invocation", "service_instance")):
        if rid.get(waiter) != rid.get(source):
            problems.append(f"job {job_id[:8]}: {waiter} names {rid.get(waiter)}, {source} recorded {rid.get(source)}")
    instance = resource_exists(base, "service_instance", rid.get("workspace"), rid.get("service_instance") or "")
    if instance is not None:
        if instance.get("endpoint_id") != rid.get("endpoint"):
            problems.append(f"job {job_id[:8]}: its instance serves endpoint {instance.get('endpoint_id')}, "
                            f"the job recorded {rid.get('endpoint')}")
        if (instance.get("source") or {}).get("id") != rid.get("model"):
            problems.append(f"job {job_id[:8]}: its instance serves model {(instance.get('source') or {}).get('id')}, "
                            f"the job recorded {rid.get('model')}")
        if instance.get("status") != "RUNNING":
            problems.append(f"job {job_id[:8]}: its instance is {instance.get('status')}")
    return problems


# --- the driver ------------------------------------------------------------------------------


def takeovers(db: Reader, logs: list[Path], slots: dict[Path, int]) -> dict[str, Any]:
    """Who ran and who took over jobs, from the claim and recovery events; ``slots`` maps each
    daemon log to the place in the fleet its process held (a restarted daemon keeps its place)."""
    slot_of = {owner: slots[log] for log in logs if (owner := log_owner(log)) is not None}
    ran: set[int] = set()
    count: Counter[str] = Counter()
    for (detail,) in db.query("SELECT detail FROM events WHERE step IS NULL AND to_state = 'RUNNING' "
                              "AND detail IS NOT NULL"):
        claimed = re.match(r"claimed by (\S+)$", detail)
        recovered = re.match(r"recovered by (\S+) \(previous owner (\S+)\)$", detail)
        owner = (claimed or recovered).group(1) if (claimed or recovered) else None
        if owner in slot_of:
            ran.add(slot_of[owner])
        if recovered:
            new, old = slot_of.get(recovered.group(1)), slot_of.get(recovered.group(2))
            count["recoveries"] += 1
            if new is None or old is None:
                count["by_an_unknown_owner"] += 1
            elif new == old:
                count["by_the_restarted_daemon"] += 1
            else:
                count["by_another_daemon"] += 1
    return {**dict(sorted(count.items())), "daemons_that_ran_jobs": len(ran)}


def stop_fleet(fleet: list[Daemon], timeout: float = 40.0) -> list[int | None]:
    """SIGTERM every daemon at once, then wait for each drain; exit codes (None: did not stop)."""
    for daemon in fleet:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for daemon in fleet:
        try:
            codes.append(daemon.proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(timeout=10)
            codes.append(None)
        finally:
            daemon.log_file.close()
    return codes


def run_torture(
    *,
    jobs: int,
    kill_rounds: int,
    fail_rate: float,
    drop_rate: float,
    slow_rate: float,
    seed: int,
    workdir: Path,
    cut_rate: float = 0.0,
    ready_after: float = 1.5,
    instance_ready_after: float = 0.5,
    finish_timeout: float = 120.0,
    max_recoveries: int | None = None,
    db_url: str | None = None,
    daemons: int = 1,
    concurrency: int | None = None,
    late_create: float = 0.0,
    late_first: int = 0,
    late_by: float = 1.0,
    list_lag: float = 0.0,
    page_churn: float = 0.0,
    bystanders: int = 0,
    stop_rounds: int = 0,
    skew_seconds: float = 0.0,
) -> dict[str, Any]:
    """Run the torture scenario in ``workdir`` and return its JSON-able summary.

    ``db_url`` is the jobs database (default: a SQLite file in ``workdir``); it must hold no
    jobs yet (it is migrated here). ``daemons`` above 1 needs PostgreSQL. ``concurrency`` is each
    daemon's ``FABRICFLOW_DAEMON__CONCURRENCY``; with several daemons it defaults to a little
    more than an even share of the jobs, so that they all get work (otherwise the first to
    start claims everything) and the survivors of a kill have room for the victim's jobs.
    ``finish_timeout`` bounds the last phase; with several daemons it is extended by two lease
    periods, the time the last victim's jobs wait to be taken over.

    What a real cloud does on top (issue 9): ``late_create`` (share of creates carried out
    ``late_by`` seconds after their connection was dropped, and the first ``late_first`` creates
    to succeed besides, so that a short run is sure to see one; the daemons' settle window,
    FABRICFLOW_RECONCILE__SETTLE_SECONDS in procs.env, must be longer), ``list_lag`` (seconds new
    resources stay out of lists) and ``page_churn`` (share of later list pages before which another
    user's resource of an earlier page is deleted). ``bystanders`` such workspaces, named after the
    first job's workspace so that its fuzzy look-ups span several pages, are created first.

    With several daemons on PostgreSQL: ``stop_rounds`` times after the kills, one daemon holding
    jobs is frozen with SIGSTOP for 1.5 leases (the others take its jobs over) and then let go on
    with SIGCONT, its runners still believing they hold those jobs; and ``skew_seconds`` sets the
    store clock of the first daemon that far off the database's (``tests/torture/skewed.py``): it
    must say ``clock_skew`` and take no job over.

    ``summary["violations"]`` is empty when every invariant holds. Every child process is
    stopped before this returns, whatever happens.
    """
    started = time.monotonic()
    if daemons < 1:
        raise ValueError("daemons must be at least 1")
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    url = db_url or f"sqlite+aiosqlite:///{workdir / 'jobs.db'}"
    db = Reader(url)
    if (stop_rounds or skew_seconds) and daemons < 2:
        db.close()
        raise ValueError("stop_rounds and skew_seconds need several daemons (on PostgreSQL)")
    if daemons > 1 and db.is_sqlite:
        db.close()
        raise ValueError(f"{daemons} daemons need PostgreSQL: fabricflow allows one daemon per SQLite "
                         "file (pass a postgresql+asyncpg:// URL)")
    daemon_env = {"FABRICFLOW_LOG_LEVEL": "info", "FABRICFLOW_LOG_FORMAT": "json"}
    if max_recoveries is not None:
        daemon_env["FABRICFLOW_DAEMON__MAX_RECOVERIES"] = str(max_recoveries)
    if concurrency is None and daemons > 1:
        concurrency = math.ceil(jobs / daemons) + 1
    if concurrency is not None:
        daemon_env["FABRICFLOW_DAEMON__CONCURRENCY"] = str(concurrency)
    logs: list[Path] = []
    slots: dict[Path, int] = {}
    kills: list[dict[str, Any]] = []
    fleet: list[Daemon] = []
    fleet_logs: list[Path] = []
    emulator: Emulator | None = None
    try:
        emulator = Emulator(
            "--ready-after", str(ready_after), "--instance-ready-after", str(instance_ready_after),
            "--fail-rate", str(fail_rate), "--drop-rate", str(drop_rate), "--slow-rate", str(slow_rate),
            "--cut-rate", str(cut_rate), "--late-create", str(late_create), "--late-by", str(late_by),
            "--list-lag", str(list_lag), "--page-churn", str(page_churn),
            "--seed", str(seed), log=workdir / "emulator.log",
        )
        assert urllib.parse.urlsplit(emulator.url).hostname in ("127.0.0.1", "::1", "localhost")
        _, faults_configured = http(f"{emulator.url}/_emulator/faults")
        specs = write_specs(workdir, jobs, seed)
        bystander_names = make_bystanders(emulator.url, job_names(1, seed)["workspace"], bystanders)
        if late_first:
            http(f"{emulator.url}/_emulator/faults", method="POST", body={"late_next": late_first})
        cli("db", "upgrade", "--db", url)
        already = int(db.scalar("SELECT COUNT(*) FROM jobs"))
        if already:
            raise ValueError(f"{db.described} already holds {already} jobs; the torture scenario "
                             "checks every job in the database, so it needs an empty one")
        job_ids = submit_all(url, [path for path, _ in specs])
        names = {job_id: spec_names for job_id, (_, spec_names) in zip(job_ids, specs, strict=True)}
        submitted_at = time.monotonic()

        def start_daemon(slot: int) -> Daemon:
            log = workdir / f"daemon-{len(logs) + 1:02d}.log"
            logs.append(log)
            slots[log] = slot
            if slot == 0 and skew_seconds:
                skewed = [sys.executable, "-m", "tests.torture.skewed", str(skew_seconds)]
                return Daemon(url, emulator.url, log, command=skewed, **daemon_env)
            return Daemon(url, emulator.url, log, **daemon_env)

        for slot in range(daemons):
            fleet.append(start_daemon(slot))
            fleet_logs.append(logs[-1])
        for index in range(kill_rounds):
            kills.append(kill_round(rng, db, fleet, fleet_logs, emulator,
                                    rounds_after=kill_rounds - index - 1))
            slot = kills[-1]["daemon"]
            fleet[slot] = start_daemon(slot)
            fleet_logs[slot] = logs[-1]

        stops = [stop_round(rng, db, fleet, fleet_logs) for _ in range(stop_rounds)]
        # Several daemons on PostgreSQL: the last victim's jobs wait for their leases to lapse.
        deadline = Deadline(finish_timeout + (0.0 if db.is_sqlite else 2 * LEASE_SECONDS))
        # Signal handlers are installed once a daemon says daemon_started; a SIGTERM during
        # Python's start-up would kill it like any process that has not started yet.
        wait_started(fleet, fleet_logs, deadline)
        while not deadline.passed and unfinished(db) > 0:
            if any(daemon.proc.poll() is not None for daemon in fleet):
                break  # one died by itself: reported below as lost jobs and a bad exit code
            time.sleep(0.1)
        finished_in = round(time.monotonic() - submitted_at, 2)
        stopping, fleet = fleet, []
        exit_codes = stop_fleet(stopping)

        figures = gather(db, emulator, job_ids, names, logs, bystander_names)
        figures["takeovers"] = takeovers(db, logs, slots)
    finally:
        for daemon in fleet:
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGKILL)
                try:
                    daemon.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            daemon.log_file.close()
        if emulator is not None:
            emulator.stop()
        db.close()

    violations = figures.pop("violations")
    for log, code in zip(fleet_logs, exit_codes, strict=True):
        if code != 0:
            violations.append(f"the daemon of {log.name} exited {'without stopping' if code is None else code} "
                              "after SIGTERM (expected 0)")
    skewed_logs = [log for log in logs if slots[log] == 0] if skew_seconds else []
    skew_said = sum(log.read_text(errors="replace").count('"event": "clock_skew"') for log in skewed_logs)
    if skew_seconds and skew_said == 0:
        violations.append(f"the daemon with its clock {skew_seconds:g}s off never logged clock_skew")
    skewed_owners = {o for log in skewed_logs if (o := log_owner(log))}
    skewed_takeovers = int(db_scalar_takeovers(url, skewed_owners)) if skewed_owners else 0
    if skewed_takeovers:
        violations.append(f"the daemon with its clock off took {skewed_takeovers} job(s) over")
    log_problems = daemon_log_problems(logs, frozenset({"clock_skew"}) if skew_seconds else frozenset())
    violations += [f"daemon log: {p}" for p in log_problems]
    return {
        "jobs": jobs,
        "database": db.backend,
        "daemons": daemons,
        "kills": len(kills),
        "kills_by_moment": dict(sorted(Counter(k["moment"] for k in kills).items())),
        "kills_by_daemon": dict(sorted(Counter(k["daemon"] for k in kills).items())),
        "kills_after_step_event": dict(sorted(Counter(
            f"{k['after_event'][0] or 'job'}:{k['after_event'][1]}->{k['after_event'][2]}"
            for k in kills if k["after_event"]).items())),
        "kills_while_jobs_unfinished": sum(1 for k in kills if k["unfinished_jobs"]),
        "kills_of_a_daemon_running_jobs": sum(1 for k in kills if k["victim_running_jobs"]),
        "kills_with_creates_in_flight": sum(1 for k in kills if k["creates_in_flight"]),
        "kills_between_create_and_commit": sum(1 for k in kills if k["creates_landed_not_committed"]),
        "faults": {
            "configured": {k: v for k, v in (faults_configured or {}).items()
                           if k.endswith("_rate") or k in ("late_create", "late_by", "list_lag", "page_churn")},
            "seed": seed,
            "requests": figures.pop("requests"),
            "seen_by_engine": figures.pop("engine_saw"),
            "note": "the emulator counts requests, not injected faults; seen_by_engine counts the "
                    "retries (by HTTP status) and reconciliations that faults and kills caused, "
                    "from the event log and the daemons' logs",
        },
        **figures,
        "daemon_settings": {"max_recoveries": max_recoveries or DaemonSettings().max_recoveries,
                            "retry_max_attempts": RetrySettings().max_attempts,
                            "concurrency": concurrency or DaemonSettings().concurrency,
                            "lease_seconds": LEASE_SECONDS},
        "last_daemon_exit_code": next((code for code in exit_codes if code != 0), 0),
        "daemon_exit_codes": exit_codes,
        "seconds_to_finish_after_submit": finished_in,
        "seconds": round(time.monotonic() - started, 2),
        "stops": stops,
        "clock_skew": {"seconds": skew_seconds, "clock_skew_lines": skew_said, "takeovers": skewed_takeovers},
        "kill_log": kills,
        "violations": violations,
    }
