"""What the worker does when something fails that is not about one event: retry the effect, or end the process.

Two kinds of failure reach an agent. An effect that the broker or Feast could not take (a send, a changelog
flush, a push) says nothing about the events: :func:`retry_until_done` repeats it with backoff, however long the
outage, and the batch waits (its offsets stay uncommitted). Anything else that escapes an agent or a timer is a
bug or a broken invariant: Faust would restart the agent and let the batch's offsets be committed with the batch
half done. :func:`fail_worker_on_crash` ends the process instead (:func:`exit_worker_process`, exit status 70 and
the traceback in the log), so that a supervisor starts a fresh worker that reads again from the committed
offsets. Failures that are about one event never get here: the agents dead-letter that event
(:mod:`streams.dead_letters`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

EXIT_AGENT_CRASHED = 70  # EX_SOFTWARE
RETRIED_ERRORS: tuple[type[BaseException], ...] = (KafkaError, OSError, TimeoutError)
"""Errors of the broker or the network: an effect that raised one is retried, never blamed on an event."""

_Result = TypeVar("_Result")
CrashHandler = Callable[[str, BaseException], NoReturn]


def exit_worker_process(task: str, exc: BaseException) -> NoReturn:
    """End the worker with status 70 after logging why. ``os._exit``: no Faust shutdown that could commit the
    offsets of the batch that failed."""
    log.critical(
        "%s crashed (%s: %s); the worker exits so that a fresh one reads again from the committed offsets",
        task,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )
    logging.shutdown()
    os._exit(EXIT_AGENT_CRASHED)


def fail_worker_on_crash(
    task: str, body: Callable[..., Awaitable[_Result]], on_crash: CrashHandler
) -> Callable[..., Awaitable[_Result]]:
    """``body`` (an agent or a timer) that hands any exception but cancellation to ``on_crash``."""

    @functools.wraps(body)
    async def guarded(*args: Any, **kwargs: Any) -> _Result:
        try:
            return await body(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            on_crash(task, exc)

    return guarded


async def retry_until_done(
    what: str,
    attempt: Callable[[], Awaitable[_Result]],
    first_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
    errors: tuple[type[BaseException], ...] = RETRIED_ERRORS,
    on_failure: Callable[[BaseException], object] | None = None,
) -> _Result:
    """``await attempt()`` until it returns, waiting longer after each failure with one of ``errors`` (by default
    :data:`RETRIED_ERRORS`), which ``on_failure`` is told of first; any other error is raised."""
    failures = 0
    while True:
        try:
            return await attempt()
        except errors as exc:
            if on_failure is not None:
                on_failure(exc)
            failures += 1
            delay_s = min(max_delay_s, first_delay_s * 2 ** (failures - 1))
            log.warning("%s failed (%s: %s); retry %d in %.1f s", what, type(exc).__name__, exc, failures, delay_s)
            await asyncio.sleep(delay_s)
