"""Exit codes as a table: every failure a command can meet, by what classify() makes of it;
and the retry helper of the commands that call Fabric themselves (retries.persist)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
import stamina

from orchestrator.domain import Invocation, Job
from orchestrator.errors import (
    EXIT_FABRIC,
    DatabaseError,
    InvocationFailedError,
    JobFailedError,
    NeedsReconcileError,
    NotFoundError,
    ResourceFailedError,
    RetryableError,
    TerminalError,
    UserError,
)
from orchestrator.fabric.classify import classify
from orchestrator.machine import MAX_RETRY_AFTER, JobState, backoff
from orchestrator.retries import RetryPolicy, delay_after, persist
from tests.unit.test_classify import _connector_error

#: HTTP status -> exit code, for a read and for a create (an unknown outcome is 4 as well).
BY_STATUS = {
    400: 2,  # a field or value Fabric rejects: the user's to fix
    401: 2,  # credentials Fabric does not accept
    403: 2,  # credentials without the permission
    404: 3,  # what the command named does not exist
    408: 4,
    409: 2,
    412: 2,
    429: 4,
    500: 4,
    501: 4,  # a 5xx classify leaves terminal is still Fabric failing, not the user
    502: 4,
    503: 4,
    504: 4,
    505: 4,
}


@pytest.mark.parametrize("kind", ["read", "create", "delete", "invoke"])
@pytest.mark.parametrize(("status", "code"), BY_STATUS.items())
def test_a_fabric_answer_exits_by_whose_fault_it_is(status: int, code: int, kind: str) -> None:
    exc = classify(kind=kind, status=status, body=b'{"error_code": "X.1", "error_msg": "m"}',  # type: ignore[arg-type]
                   what="list workspaces")
    assert exc.exit_code == code, (status, kind, type(exc).__name__)


@pytest.mark.parametrize("kind", ["read", "create", "delete", "invoke"])
@pytest.mark.parametrize("failure", [_connector_error(), TimeoutError(), ConnectionResetError()])
def test_no_answer_at_all_is_exit_4(kind: str, failure: BaseException) -> None:
    exc = classify(kind=kind, exc=failure, what="list workspaces")  # type: ignore[arg-type]
    assert isinstance(exc, RetryableError | NeedsReconcileError)
    assert exc.exit_code == EXIT_FABRIC == 4


def test_errors_raised_outside_classify() -> None:
    # An answer that is not what the API documents (schema, shape, not JSON): Fabric's fault.
    assert TerminalError("list workspaces: unexpected response (id: missing)").exit_code == 4
    assert TerminalError("list workspaces: response is not JSON", status=200).exit_code == 4
    assert RetryableError("list workspaces: the listing kept changing while it was read").exit_code == 4
    assert ResourceFailedError("endpoint e is CREATE_FAILED", code="FABRIC.4001").exit_code == 4
    # fabricflow's own refusals of a spec are the user's to fix.
    assert TerminalError("endpoint: unknown spec_code x", code="fabricflow.invalid_spec").exit_code == 2
    assert TerminalError("a workspace named 'w' already exists", code="fabricflow.conflict").exit_code == 2
    # The rest of the tree keeps its codes.
    assert UserError("bad").exit_code == 2
    assert DatabaseError("locked").exit_code == 2
    assert NotFoundError("no job").exit_code == 3
    now = datetime.now(UTC)
    job = Job(id="a" * 32, name="j", state=JobState.FAILED, spec={}, created_at=now, updated_at=now, steps={})
    assert JobFailedError(job).exit_code == 1


def test_a_failed_invocation_exits_with_its_errors_code() -> None:
    record = Invocation(id=1, job_id="a" * 32, at=datetime.now(UTC), service_instance_id="i", request={},
                        reply=None, finish_reason=None, usage=None, ttft_ms=None, duration_ms=3,
                        error={"code": None, "message": "m", "request_id": None})
    down = classify(kind="invoke", exc=_connector_error(), what="invoke service instance")
    refused = classify(kind="invoke", status=400, what="invoke service instance")
    gone = classify(kind="invoke", status=404, what="invoke service instance")
    assert [InvocationFailedError(record, e).exit_code for e in (down, refused, gone)] == [4, 2, 3]
    assert str(InvocationFailedError(record, down)) == down.message


# --- retries.persist -------------------------------------------------------------------------------


@pytest.fixture
def real_stamina() -> None:
    """stamina as in production (the autouse fixture caps it at 3 attempts); waits are tiny here."""
    stamina.set_testing(False)


TINY = RetryPolicy(attempts=5, backoff_base=0.001, backoff_cap=0.002)


def failing(times: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "listed"

    return calls, call


async def test_persist_retries_transient_errors_up_to_the_limit(real_stamina: None) -> None:
    calls, call = failing(4, RetryableError("list workspaces: HTTP 503", status=503))
    assert await persist(call, TINY) == "listed"  # type: ignore[arg-type]
    assert len(calls) == 5

    calls, call = failing(99, RetryableError("list workspaces: HTTP 503 APIGW.0503: down", status=503,
                                             code="APIGW.0503", request_id="r1"))
    with pytest.raises(RetryableError) as raised:
        await persist(call, TINY)  # type: ignore[arg-type]
    assert len(calls) == 5
    assert raised.value.message == "gave up after 5 attempts: list workspaces: HTTP 503 APIGW.0503: down"
    assert (raised.value.status, raised.value.code, raised.value.request_id) == (503, "APIGW.0503", "r1")
    assert raised.value.exit_code == 4


@pytest.mark.parametrize("error", [TerminalError("list workspaces: HTTP 401", status=401),
                                   NeedsReconcileError("create workspace: no complete response"),
                                   ValueError("a bug")])
async def test_persist_does_not_retry_anything_else(real_stamina: None, error: Exception) -> None:
    calls, call = failing(99, error)
    with pytest.raises(type(error)) as raised:
        await persist(call, TINY)  # type: ignore[arg-type]
    assert raised.value is error and len(calls) == 1


async def test_without_a_policy_one_call() -> None:
    calls, call = failing(99, RetryableError("list workspaces: HTTP 503"))
    with pytest.raises(RetryableError, match=r"^list workspaces: HTTP 503$"):
        await persist(call, None)  # type: ignore[arg-type]
    assert len(calls) == 1


def test_the_wait_is_the_engines_backoff_or_retry_after_when_longer() -> None:
    policy = RetryPolicy(attempts=8, backoff_base=1.0, backoff_cap=30.0)
    for failures in range(1, 9):
        seed = random.getstate()
        expected = backoff(failures, base=1.0, cap=30.0)
        random.setstate(seed)
        assert delay_after(RetryableError("x"), failures, policy) == expected
    assert delay_after(RetryableError("x", retry_after=45.0), 1, policy) == 45.0
    assert delay_after(RetryableError("x", retry_after=86400.0), 1, policy) == MAX_RETRY_AFTER
    assert 0.5 <= delay_after(RetryableError("x", retry_after=0.0), 1, policy) <= 1.0


def test_the_policy_is_the_engines_retry_settings_with_fewer_attempts() -> None:
    from orchestrator.config import Settings

    # A step tries 8 times; a command someone waits on, 4.
    assert Settings().retry.max_attempts == 8
    assert RetryPolicy.from_settings(Settings()) == RetryPolicy(attempts=4, backoff_base=1.0, backoff_cap=30.0)
    tuned = Settings(retry={"max_attempts": 3, "backoff_base": 0.5, "backoff_cap": 4.0})
    assert RetryPolicy.from_settings(tuned) == RetryPolicy(attempts=3, backoff_base=0.5, backoff_cap=4.0)
