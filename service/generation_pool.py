"""A bounded pool for candidate generation, apart from everything else the service does.

Generation takes 0.1-10 s of CPU per request. Run in the event loop's default thread pool (as plain ``def``
endpoints are), enough concurrent candidate requests take every thread of it, and ``/healthz``, ``/metrics`` and
``POST /events`` then wait behind them (48 concurrent candidate requests made both time out at 30 s). So generation
runs here instead: a fixed number of worker threads and a bounded number of requests waiting for them. A request
that finds the pool full is refused at once with :class:`GenerationBusy` (HTTP 503 with ``Retry-After``) rather
than queued without bound; the health and metrics endpoints are ``async`` and never touch the pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pydantic import Field

from perfusion.errors import InfrastructureError
from perfusion.settings import Settings

Result = TypeVar("Result")


class GenerationPoolSettings(Settings):
    """How much generation the service runs and holds at once."""

    workers: int = Field(
        default=2, ge=1, description="threads that generate at the same time (each uses torch's intra-op threads)"
    )
    queue: int = Field(default=16, ge=0, description="candidate requests that may wait for a worker; more get 503")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After of a 503 answered when the pool is full")


class GenerationBusy(InfrastructureError):
    """Every worker is busy and the queue is full; retry after ``retry_after_s`` (HTTP 503)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationPool:
    """Runs blocking generation calls on ``settings.workers`` threads, at most ``workers + queue`` at once."""

    def __init__(self, settings: GenerationPoolSettings | None = None) -> None:
        self.settings = settings if settings is not None else GenerationPoolSettings()
        self.capacity = self.settings.workers + self.settings.queue
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="generation")

    @property
    def admitted(self) -> int:
        """Calls running or waiting for a worker now."""
        with self._admitted_lock:
            return self._admitted

    async def run(self, function: Callable[[], Result]) -> Result:
        """``function()`` on a worker thread, awaited without blocking the event loop; raises
        :class:`GenerationBusy` at once when ``capacity`` calls are already admitted."""
        if not self._slots.acquire(blocking=False):
            raise GenerationBusy(
                f"all {self.settings.workers} generation workers are busy and {self.settings.queue} requests are "
                f"waiting; retry in {self.settings.retry_after_s} s (an operator may raise "
                "PERFUSION_SERVE_GENERATION__QUEUE, or __WORKERS where the machine has cores to spare)",
                retry_after_s=self.settings.retry_after_s,
            )
        with self._admitted_lock:
            self._admitted += 1
        try:
            future = self._executor.submit(function)
        except BaseException:
            self._release()
            raise
        # Released when the call ends, not when the request does: a client that goes away leaves its call running,
        # and the slot stays taken until it finishes, so the bound holds for the threads' real work.
        future.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop taking calls; those waiting are cancelled, those running finish on their threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _release(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1
        self._slots.release()
