"""What the worker does with a failure that is not about one event: retry a broker effect, end the process on a
crash (never Faust's silent agent restart), and exit with status 70 and the reason in the log."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from typing import NoReturn

import pytest
from aiokafka.errors import KafkaConnectionError

from streams.liveness import EXIT_AGENT_CRASHED, fail_worker_on_crash, retry_until_done


class Crashed(Exception):
    """What the test's crash handler raises instead of ending the test process."""


def record_crash(crashes: list[tuple[str, BaseException]]) -> Callable[[str, BaseException], NoReturn]:
    def on_crash(task: str, exc: BaseException) -> NoReturn:
        crashes.append((task, exc))
        raise Crashed(task)

    return on_crash


def test_a_crashing_agent_goes_to_the_crash_handler_with_its_name_and_error() -> None:
    crashes: list[tuple[str, BaseException]] = []

    async def agent() -> None:
        raise KeyError("impression-7")

    guarded = fail_worker_on_crash("the events agent", agent, record_crash(crashes))
    with pytest.raises(Crashed):
        asyncio.run(guarded())
    [(task, error)] = crashes
    assert task == "the events agent" and isinstance(error, KeyError)


def test_cancellation_is_a_stop_not_a_crash_and_a_result_passes_through() -> None:
    crashes: list[tuple[str, BaseException]] = []

    async def cancelled() -> None:
        raise asyncio.CancelledError

    async def answers() -> int:
        return 42

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(fail_worker_on_crash("a timer", cancelled, record_crash(crashes))())
    assert asyncio.run(fail_worker_on_crash("a timer", answers, record_crash(crashes))()) == 42
    assert crashes == []


def test_broker_errors_are_retried_until_the_effect_is_done_and_other_errors_are_raised() -> None:
    attempts: list[int] = []

    async def flaky_send() -> str:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise KafkaConnectionError("broker restarting")
        return "acknowledged"

    assert asyncio.run(retry_until_done("a send", flaky_send, first_delay_s=0.001)) == "acknowledged"
    assert len(attempts) == 3

    async def buggy() -> None:
        raise ValueError("not about the broker")

    with pytest.raises(ValueError, match="not about the broker"):
        asyncio.run(retry_until_done("a send", buggy, first_delay_s=0.001))


def test_the_errors_retried_are_the_callers_and_each_failure_is_reported_before_the_retry() -> None:
    failures: list[str] = []

    async def flaky_push() -> str:
        if len(failures) < 2:
            raise ValueError(f"writer gone {len(failures)}")
        return "pushed"

    result = asyncio.run(
        retry_until_done(
            "a push",
            flaky_push,
            first_delay_s=0.001,
            errors=(ValueError,),
            on_failure=lambda exc: failures.append(str(exc)),
        )
    )
    assert result == "pushed" and failures == ["writer gone 0", "writer gone 1"]
    with pytest.raises(KafkaConnectionError):  # not among the caller's errors: raised, though retried by default

        async def broker_down() -> None:
            raise KafkaConnectionError("down")

        asyncio.run(retry_until_done("a push", broker_down, first_delay_s=0.001, errors=(ValueError,)))


def test_the_worker_process_exits_with_status_70_and_says_why() -> None:
    code = (
        "import asyncio, logging; logging.basicConfig();"
        "from streams.liveness import exit_worker_process, fail_worker_on_crash\n"
        "async def agent():\n    raise RuntimeError('broken invariant')\n"
        "asyncio.run(fail_worker_on_crash('the demand agent', agent, exit_worker_process)())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_AGENT_CRASHED == 70
    assert "the demand agent crashed (RuntimeError: broken invariant)" in result.stderr
