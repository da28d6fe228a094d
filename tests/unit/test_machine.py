"""The state table, decide(), backoff() and the edge checks: pure, no event loop."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.machine import (
    JOB_TRANSITIONS,
    ROWS,
    STEP_ORDER,
    STEP_TRANSITIONS,
    STEPS,
    Action,
    Decision,
    IllegalTransition,
    JobState,
    OutcomeKind,
    ResourceKind,
    StepName,
    StepState,
    backoff,
    poll_interval,
    polls_made,
    check_job_edge,
    check_step_edge,
    decide,
    next_step,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
MAX = 5
FINAL_STEP_STATES = {StepState.SUCCEEDED, StepState.SKIPPED}
FAILURE_OUTCOMES = (OutcomeKind.RETRYABLE, OutcomeKind.UNKNOWN)


def _in_progress(row) -> StepState:
    return StepState.WAITING if row.action is Action.POLL else StepState.IN_FLIGHT


def _decide(row, current, outcome, **kw) -> Decision:
    kw.setdefault("attempts", 0)
    kw.setdefault("now", NOW)
    kw.setdefault("max_attempts", MAX)
    kw.setdefault("rng", random.Random(7))
    return decide(row, current, outcome, **kw)


class _TopRng:
    """An RNG whose jitter is always the top of the range, so backoff() shows its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


# --- the table is total ---------------------------------------------------------------------


def test_step_order_is_the_designed_procedure():
    assert [str(s) for s in STEP_ORDER] == [
        "workspace",
        "endpoint",
        "endpoint_ready",
        "model",
        "service_instance",
        "service_ready",
        "invocation",
    ]


def test_every_step_has_exactly_one_row():
    assert set(ROWS) == set(StepName) == set(STEP_ORDER)
    assert len(STEPS) == len(StepName)
    for name in STEP_ORDER:
        assert ROWS[name].name is name


@pytest.mark.parametrize(
    ("name", "action", "kind"),
    [
        (StepName.WORKSPACE, Action.CREATE, ResourceKind.WORKSPACE),
        (StepName.ENDPOINT, Action.CREATE, ResourceKind.ENDPOINT),
        (StepName.ENDPOINT_READY, Action.POLL, ResourceKind.ENDPOINT),
        (StepName.MODEL, Action.CREATE, ResourceKind.MODEL),
        (StepName.SERVICE_INSTANCE, Action.CREATE, ResourceKind.SERVICE_INSTANCE),
        (StepName.SERVICE_READY, Action.POLL, ResourceKind.SERVICE_INSTANCE),
        (StepName.INVOCATION, Action.INVOKE, None),
    ],
)
def test_row_action_and_kind(name, action, kind):
    assert ROWS[name].action is action
    assert ROWS[name].kind is kind
    assert ROWS[name].done_when


def test_every_non_final_step_state_has_an_outgoing_edge():
    sources = {src for src, _ in STEP_TRANSITIONS}
    for state in StepState:
        if state not in FINAL_STEP_STATES:
            assert state in sources, state
    # The done states are final: nothing leaves them.
    assert not sources & FINAL_STEP_STATES


def test_every_non_terminal_job_state_has_an_outgoing_edge():
    sources = {src for src, _ in JOB_TRANSITIONS}
    for state in JobState:
        if not state.is_terminal:
            assert state in sources, state


def test_every_edge_names_existing_states():
    for src, dst in STEP_TRANSITIONS:
        assert isinstance(src, StepState) and isinstance(dst, StepState)
    for src, dst in JOB_TRANSITIONS:
        assert isinstance(src, JobState) and isinstance(dst, JobState)


def test_every_step_state_is_reachable_from_pending():
    reached = {StepState.PENDING}
    frontier = [StepState.PENDING]
    while frontier:
        src = frontier.pop()
        for a, b in STEP_TRANSITIONS:
            if a is src and b not in reached:
                reached.add(b)
                frontier.append(b)
    assert reached == set(StepState)


def test_job_can_only_finish_from_running():
    for dst in (JobState.SUCCEEDED, JobState.FAILED):
        assert {src for src, d in JOB_TRANSITIONS if d is dst} == {JobState.RUNNING}


# --- JobState / StepState properties ------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "terminal"),
    [
        (JobState.PENDING, False),
        (JobState.RUNNING, False),
        (JobState.SUCCEEDED, True),
        (JobState.FAILED, True),
        (JobState.CANCELLED, True),
    ],
)
def test_job_state_is_terminal(state, terminal):
    assert state.is_terminal is terminal


@pytest.mark.parametrize(
    ("state", "done"),
    [
        (StepState.PENDING, False),
        (StepState.IN_FLIGHT, False),
        (StepState.WAITING, False),
        (StepState.SUCCEEDED, True),
        (StepState.SKIPPED, True),
        (StepState.FAILED, False),
    ],
)
def test_step_state_is_done(state, done):
    assert state.is_done is done


# --- edge checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(StepState, StepState)))
def test_check_step_edge(src, dst):
    if (src, dst) in STEP_TRANSITIONS:
        check_step_edge(src, dst)
    else:
        with pytest.raises(IllegalTransition, match=f"{src}.*{dst}"):
            check_step_edge(src, dst)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(JobState, JobState)))
def test_check_job_edge(src, dst):
    if (src, dst) in JOB_TRANSITIONS:
        check_job_edge(src, dst)
    else:
        with pytest.raises(IllegalTransition, match=f"{src}.*{dst}"):
            check_job_edge(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (StepState.SUCCEEDED, StepState.PENDING),
        (StepState.SKIPPED, StepState.IN_FLIGHT),
        (StepState.PENDING, StepState.SUCCEEDED),
        (StepState.WAITING, StepState.IN_FLIGHT),
    ],
)
def test_named_illegal_step_edges(src, dst):
    with pytest.raises(IllegalTransition):
        check_step_edge(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (JobState.SUCCEEDED, JobState.RUNNING),
        (JobState.SUCCEEDED, JobState.PENDING),
        (JobState.PENDING, JobState.SUCCEEDED),
        (JobState.PENDING, JobState.FAILED),
    ],
)
def test_named_illegal_job_edges(src, dst):
    with pytest.raises(IllegalTransition):
        check_job_edge(src, dst)


def test_illegal_transition_is_outside_the_error_tree():
    from orchestrator.errors import OrchestratorError

    assert not issubclass(IllegalTransition, OrchestratorError)


# --- next_step ------------------------------------------------------------------------------


def _states(**overrides: StepState) -> dict[StepName, StepState]:
    states = {name: StepState.PENDING for name in STEP_ORDER}
    states.update({StepName(k): v for k, v in overrides.items()})
    return states


def test_next_step_starts_with_workspace():
    assert next_step(_states()) is StepName.WORKSPACE


@pytest.mark.parametrize("index", range(len(STEP_ORDER)))
def test_next_step_is_first_not_done_in_table_order(index):
    done = {name: StepState.SUCCEEDED for name in STEP_ORDER[:index]}
    states = _states(**{str(k): v for k, v in done.items()})
    assert next_step(states) is STEP_ORDER[index]


def test_next_step_treats_skipped_as_done():
    states = _states(workspace=StepState.SKIPPED, endpoint=StepState.SKIPPED)
    assert next_step(states) is StepName.ENDPOINT_READY


@pytest.mark.parametrize("state", [StepState.IN_FLIGHT, StepState.WAITING, StepState.FAILED])
def test_next_step_stops_at_unfinished_step(state):
    states = _states(workspace=StepState.SUCCEEDED, endpoint=state)
    assert next_step(states) is StepName.ENDPOINT


def test_next_step_ignores_later_done_steps():
    states = {name: StepState.SUCCEEDED for name in STEP_ORDER}
    states[StepName.MODEL] = StepState.PENDING
    assert next_step(states) is StepName.MODEL


def test_next_step_none_when_all_done():
    states = {name: StepState.SUCCEEDED for name in STEP_ORDER}
    states[StepName.WORKSPACE] = StepState.SKIPPED
    assert next_step(states) is None


# --- decide(): every outcome x every row ----------------------------------------------------


@pytest.mark.parametrize("row", STEPS, ids=lambda r: str(r.name))
def test_succeeded(row):
    decision = _decide(row, _in_progress(row), OutcomeKind.SUCCEEDED, attempts=2)
    assert decision == Decision(StepState.SUCCEEDED, 2, None, None)


@pytest.mark.parametrize("row", STEPS, ids=lambda r: str(r.name))
@pytest.mark.parametrize("current", [StepState.PENDING, StepState.WAITING])
def test_still_waiting_only_for_poll_rows(row, current):
    if row.action is Action.POLL:
        decision = _decide(row, current, OutcomeKind.STILL_WAITING, attempts=1, poll_delay=4.0)
        assert decision.state is StepState.WAITING
        assert decision.attempts == 1  # an unchanged status is not a failed attempt
        assert decision.run_after == NOW + timedelta(seconds=4)
        assert decision.job_state is None
    else:
        with pytest.raises(IllegalTransition):
            _decide(row, _in_progress(row), OutcomeKind.STILL_WAITING)


@pytest.mark.parametrize("row", STEPS, ids=lambda r: str(r.name))
@pytest.mark.parametrize("outcome", FAILURE_OUTCOMES)
def test_retryable_and_unknown_keep_state_and_bump_attempts(row, outcome):
    current = _in_progress(row)
    decision = _decide(row, current, outcome, attempts=1)
    assert decision.state is current
    assert decision.attempts == 2
    assert decision.run_after is not None and decision.run_after > NOW
    assert decision.job_state is None


@pytest.mark.parametrize("row", STEPS, ids=lambda r: str(r.name))
@pytest.mark.parametrize("outcome", FAILURE_OUTCOMES)
def test_failure_before_start_moves_to_in_progress_state(row, outcome):
    decision = _decide(row, StepState.PENDING, outcome)
    assert decision.state is _in_progress(row)
    assert decision.attempts == 1
    assert decision.run_after is not None and decision.run_after > NOW


@pytest.mark.parametrize("row", STEPS, ids=lambda r: str(r.name))
@pytest.mark.parametrize("outcome", FAILURE_OUTCOMES)
def test_hitting_max_attempts_fails_step_and_job(row, outcome):
    decision = _decide(row, _in_progress(row), outcome, attempts=MAX - 1, retry_after=60.0)
    assert decision == Decision(StepState.FAILED, MAX, None, JobState.FAILED)


@pytest.mark.parametrize("outcome", FAILURE_OUTCOMES)
def test_attempts_below_max_keep_retrying(outcome):
    row = ROWS[StepName.ENDPOINT]
    for attempts in range(MAX - 1):
        decision = _decide(row, StepState.IN_FLIGHT, outcome, attempts=attempts)
        assert decision.state is StepState.IN_FLIGHT
        assert decision.attempts == attempts + 1
        assert decision.job_state is None


def test_max_attempts_one_fails_on_first_failure():
    row = ROWS[StepName.WORKSPACE]
    decision = _decide(row, StepState.IN_FLIGHT, OutcomeKind.RETRYABLE, attempts=0, max_attempts=1)
    assert decision.state is StepState.FAILED
    assert decision.job_state is JobState.FAILED


@pytest.mark.parametrize("row", STEPS, ids=lambda r: str(r.name))
@pytest.mark.parametrize("current", [StepState.PENDING, StepState.IN_FLIGHT, StepState.WAITING])
def test_terminal_fails_step_and_job(row, current):
    decision = _decide(row, current, OutcomeKind.TERMINAL, attempts=3)
    assert decision == Decision(StepState.FAILED, 3, None, JobState.FAILED)


@pytest.mark.parametrize("outcome", FAILURE_OUTCOMES)
def test_retry_after_raises_the_delay_floor(outcome):
    row = ROWS[StepName.MODEL]
    decision = _decide(row, StepState.IN_FLIGHT, outcome, attempts=0, retry_after=120.0)
    assert decision.run_after == NOW + timedelta(seconds=120)


def test_small_retry_after_does_not_lower_the_backoff():
    row = ROWS[StepName.MODEL]
    attempts = 5  # backoff ceiling 2**5 = 32 -> capped 30, so the jittered delay is >= 15 s
    expected = backoff(attempts + 1, rng=random.Random(3))
    decision = _decide(row, StepState.IN_FLIGHT, OutcomeKind.RETRYABLE, attempts=attempts,
                       max_attempts=100, retry_after=0.1, rng=random.Random(3))
    assert decision.run_after == NOW + timedelta(seconds=expected)
    assert expected >= 15.0


def test_decide_delay_is_the_backoff_of_the_new_attempt():
    row = ROWS[StepName.ENDPOINT]
    for attempts in range(6):
        decision = _decide(row, StepState.IN_FLIGHT, OutcomeKind.RETRYABLE, attempts=attempts,
                           max_attempts=100, rng=random.Random(attempts))
        delay = (decision.run_after - NOW).total_seconds()
        assert delay == pytest.approx(backoff(attempts + 1, rng=random.Random(attempts)))


# --- decide() only produces legal edges (exhaustive over valid inputs) ---------------------


def _valid_inputs():
    """(row, current, outcome) triples the engine may hand to decide()."""
    for row in STEPS:
        for outcome in OutcomeKind:
            if outcome is OutcomeKind.STILL_WAITING and row.action is not Action.POLL:
                continue
            # Work happens in the row's in-progress state; failures can also arrive before the
            # intent was recorded (PENDING), which decide() handles explicitly.
            currents = [_in_progress(row)]
            if outcome is not OutcomeKind.SUCCEEDED:
                currents.append(StepState.PENDING)
            for current in currents:
                yield row, current, outcome


@pytest.mark.parametrize("attempts", [0, 1, MAX - 2, MAX - 1])
@pytest.mark.parametrize("retry_after", [None, 0.0, 5.0, 3600.0])
def test_decide_only_produces_legal_edges(attempts, retry_after):
    count = 0
    for row, current, outcome in _valid_inputs():
        decision = _decide(row, current, outcome, attempts=attempts, retry_after=retry_after,
                           poll_delay=2.0)
        check_step_edge(current, decision.state)
        if decision.job_state is not None:
            check_job_edge(JobState.RUNNING, decision.job_state)
            assert decision.state is StepState.FAILED
        if decision.state is StepState.FAILED:
            assert decision.job_state is JobState.FAILED
            assert decision.run_after is None
        assert decision.attempts in (attempts, attempts + 1)
        count += 1
    # 5 create/invoke rows x 7 (row, state, outcome) inputs + 2 poll rows x 9 (with STILL_WAITING)
    assert count == 5 * 7 + 2 * 9


def test_decide_from_the_in_progress_state_is_legal_for_every_outcome():
    """Whatever decide() accepts without raising is a legal edge (or the input is nonsense)."""
    for row, current, outcome in itertools.product(
        STEPS, (StepState.IN_FLIGHT, StepState.WAITING), OutcomeKind
    ):
        if current is not _in_progress(row):
            continue
        try:
            decision = _decide(row, current, outcome)
        except IllegalTransition:
            assert outcome is OutcomeKind.STILL_WAITING and row.action is not Action.POLL
            continue
        assert (current, decision.state) in STEP_TRANSITIONS


@pytest.mark.parametrize("row", STEPS, ids=lambda r: str(r.name))
def test_decide_succeeded_from_pending_is_legal_or_refused(row):
    try:
        decision = _decide(row, StepState.PENDING, OutcomeKind.SUCCEEDED)
    except IllegalTransition:
        return
    check_step_edge(StepState.PENDING, decision.state)


# --- backoff() ------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_then_caps():
    rng = _TopRng()
    ceilings = [backoff(n, rng=rng) for n in range(1, 9)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_respects_base_and_cap():
    rng = _TopRng()
    assert [backoff(n, base=0.5, cap=3.0, rng=rng) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_attempt_zero_or_negative_is_base():
    rng = _TopRng()
    assert backoff(0, rng=rng) == 1.0
    assert backoff(-3, rng=rng) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_backoff_jitter_stays_in_upper_half(seed):
    rng = random.Random(seed)
    for attempt in range(1, 40):
        ceiling = min(30.0, 2.0 ** (attempt - 1))
        delay = backoff(attempt, rng=rng)
        assert 0.5 * ceiling <= delay <= ceiling


def test_backoff_is_reproducible_with_a_seed():
    a = [backoff(n, rng=random.Random(42)) for n in range(1, 10)]
    b = [backoff(n, rng=random.Random(42)) for n in range(1, 10)]
    assert a == b


def test_backoff_grows_on_average():
    rng = random.Random(1)
    means = [sum(backoff(n, rng=rng) for _ in range(200)) / 200 for n in range(1, 6)]
    assert means == sorted(means)
    assert means[-1] > 2 * means[0]


def test_backoff_capped_for_large_attempts():
    rng = random.Random(0)
    for attempt in (10, 50, 500, 1000):
        assert 15.0 <= backoff(attempt, rng=rng) <= 30.0


def test_backoff_capped_for_huge_attempts():
    assert 15.0 <= backoff(1100, rng=random.Random(0)) <= 30.0


# --- a resumed wait goes on with its polling schedule ------------------------------------------


def test_polls_made_follows_the_schedule_to_its_cap():
    # Polls at 1, 2, 4, 8, 16, 32 s, then every 30 s (initial 1 s doubling, cap 30 s).
    times, t = [], 0.0
    for polls in range(10):
        t += poll_interval(polls, initial=1, cap=30)
        times.append(t)
    assert times == [1, 2, 4, 8, 16, 32, 62, 92, 122, 152]
    for polls, at in enumerate(times, start=1):
        assert polls_made(at, initial=1, cap=30) == polls
        assert polls_made(at - 0.01, initial=1, cap=30) == polls - 1
    assert polls_made(0, initial=1, cap=30) == 0
    assert polls_made(3600, initial=1, cap=30) == 6 + (3600 - 32) // 30
    # An hour into a wait, the next poll comes at the cap's pace, not after one second.
    assert poll_interval(polls_made(3600, initial=1, cap=30), initial=1, cap=30) == 30
