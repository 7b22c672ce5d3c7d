"""``GET /readyz``: whether the service can serve requests now, check by check.

``/healthz`` says only that the process answers (liveness). ``/readyz`` runs the checks of what every request
needs:

- ``kafka``: the event sink's broker answers a metadata request for the events topic
  (:meth:`service.events.KafkaEventSink.check_reachable`);
- ``feast``: the feature reader reads the online store (:meth:`service.features.FeastFeatureReader.check_reachable`);
- ``model``: the generator holds a model (the base at least) and names its version.

It answers 200 with each check's outcome when all pass, else 503 ``not-ready`` problem details whose ``detail``
names each failed check with its fix (and a ``checks`` member with every outcome). The checks run on threads of
their own, at once, each waited for at most ``timeout_s``, so ``/readyz`` neither waits on the generation pool nor
on the thread pool of the other endpoints; a check still running from an earlier call is waited for again rather
than started twice, so a hung broker cannot pile up threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from perfusion.settings import Settings

CheckName = Literal["kafka", "feast", "model"]


class ReadinessSettings(Settings):
    """How long ``/readyz`` waits for its checks."""

    timeout_s: float = Field(
        default=2.0,
        gt=0.0,
        le=30.0,
        description="seconds /readyz waits for each check (Kafka's metadata request, a Feast online read)",
    )


@runtime_checkable
class ChecksReachability(Protocol):
    """A component that can say whether its backing service answers (the Kafka sink, the Feast reader)."""

    def check_reachable(self, timeout_s: float) -> str:
        """What the service answered, or raise with the reason and the fix."""
        ...


class CheckOutcome(BaseModel):
    name: CheckName
    ok: bool
    detail: str = Field(description="what answered, or why the check failed and the fix")


class Ready(BaseModel):
    status: Literal["ready"]
    checks: list[CheckOutcome]


Check = Callable[[float], str]
"""A check: given the timeout in seconds, what answered, or raise with the reason and the fix."""


def reachability_check(component: object, what: str, fix: str) -> Check:
    """The check of a component that :class:`ChecksReachability`; one that cannot be checked always fails."""
    if isinstance(component, ChecksReachability):
        return component.check_reachable

    def cannot_check(_: float) -> str:
        raise NotReady(f"the {what} ({type(component).__name__}) cannot be checked; {fix}")

    return cannot_check


class NotReady(Exception):
    """A check failed; the message is the reason and the fix."""


class Readiness:
    """Runs the named checks at once, each on a thread of its own, each waited for at most ``timeout_s``."""

    def __init__(self, checks: Mapping[CheckName, Check], settings: ReadinessSettings | None = None) -> None:
        self.checks = dict(checks)
        self.settings = settings if settings is not None else ReadinessSettings()
        self._executor = ThreadPoolExecutor(max_workers=max(1, len(self.checks)), thread_name_prefix="readiness")
        self._running: dict[CheckName, Future[str]] = {}

    async def outcomes(self) -> list[CheckOutcome]:
        names = list(self.checks)
        return list(await asyncio.gather(*(self._outcome(name) for name in names)))

    async def _outcome(self, name: CheckName) -> CheckOutcome:
        timeout_s = self.settings.timeout_s
        future = self._running.get(name)
        if future is None or future.done():
            future = self._executor.submit(self.checks[name], timeout_s)
            self._running[name] = future
        try:
            # shield: a check that outlives the wait keeps running, and the next call waits for it again.
            answered = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
        except TimeoutError:
            return CheckOutcome(name=name, ok=False, detail=f"no answer within {timeout_s:g} s; {_FIXES[name]}")
        except Exception as exc:  # every component raises its own kinds; each message holds the reason and fix
            return CheckOutcome(name=name, ok=False, detail=str(exc) or type(exc).__name__)
        return CheckOutcome(name=name, ok=True, detail=answered)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_FIXES: Mapping[CheckName, str] = {
    "kafka": "check that the broker runs (`perfusion broker status`) and that KAFKA_BOOTSTRAP_SERVERS names it",
    "feast": "check the online store (`perfusion features apply`; for Redis, that REDIS_URL answers)",
    "model": "check the base checkpoint (PERFUSION_SERVE_BASE) and the model store's LATEST",
}
