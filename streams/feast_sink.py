"""The worker's Feast writes: :class:`FeastSink`, the default feature sink of the events agent's preference stage.

A push (DataFrame, Arrow, protobuf, one sqlite upsert per feature and row, a parquet part of offline history) is
about a third of the worker's CPU. In a thread of the worker it holds the GIL most of that time, so the event loop,
the other agents and Faust's consumer thread wait for it even though they have other work. ``writer="process"`` (the
default) runs the pushes in one child process with a Feast store of its own (:class:`WriterProcess`), so they run on
another core; the agent still waits for each push before its batch is acknowledged, so nothing about delivery
changes. ``writer="thread"`` keeps them in the worker's process (a machine with one core, or a debugger).

The child is bound to the worker: it ignores the terminal's and the supervisor's stop signals (the worker ends it when
it stops) and is killed by the kernel when the worker dies, even by SIGKILL (``PR_SET_PDEATHSIG``). A child that dies,
reports a failure, or does not answer within :data:`PUSH_TIMEOUT_S` is killed and replaced, and the push retried.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Literal

from streams.liveness import retry_until_done

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from perfusion.feature_store import FeaturePusher, FeatureStoreSettings
    from streams.metrics import WorkerMetrics

log = logging.getLogger(__name__)

FeastWriter = Literal["process", "thread"]

OPEN_TIMEOUT_S = 600.0
"""Seconds a new writer process may take to import Feast and open the store (tens of seconds on a loaded machine)."""
PUSH_TIMEOUT_S = 120.0
"""Seconds a push may take before its writer counts as stuck (a push of a thousand rows takes well under one)."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WriterFailed(RuntimeError):
    """The writer process died, failed the push, or did not answer in time."""


def _writer_main(connection: Connection, parent_pid: int, feature_store: FeatureStoreSettings | None) -> None:
    """The writer process: open Feast, say ready, then push each list of rows received and answer None, or the
    failure as text (an exception may not pickle), until the worker closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the worker decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the worker died before the line above took effect
        os._exit(1)
    from perfusion.feature_store import FeaturePusher

    pusher = FeaturePusher.open(feature_store)
    connection.send(os.getpid())
    while True:
        try:
            rows = connection.recv()
        except EOFError:  # the worker closed the pipe: it is stopping
            return
        try:
            pusher.push_user_preferences(rows, merge_due_history=False)
        except Exception as exc:
            connection.send(f"{type(exc).__name__}: {exc}")
            continue
        connection.send(None)
        # After the answer: the worker folds its next batch while the history is merged (a few tenths of a second
        # once a minute, which a batch waiting on it would add to the freshness of every event in it).
        try:
            pusher.merge_due_history()
        except Exception as exc:  # its parts stay pending: merged next time, or by a reader before it reads
            log.warning("merging the offline history failed (%s: %s); its parts stay pending", type(exc).__name__, exc)


class WriterProcess:
    """One Feast writer child and the worker's end of the pipe to it; its methods block (the sink calls them in a
    thread)."""

    def __init__(self, feature_store: FeatureStoreSettings | None) -> None:
        # spawn, not fork: the worker has threads (Faust's consumer, the producer's), which fork would copy mid-state.
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self.process = context.Process(
            target=_writer_main,
            args=(child_end, os.getpid(), feature_store),
            name="perfusion-feast-writer",
            daemon=True,  # ended by multiprocessing when the worker exits
        )
        self.process.start()
        child_end.close()
        # Before multiprocessing's own exit handler, which would wait for the writer to end (it ignores SIGTERM):
        # closing the pipe is what ends it.
        atexit.register(self.close)
        self.pid: int = self._reply(OPEN_TIMEOUT_S, "open the Feast store")

    def push(self, rows: list[dict[str, Any]]) -> None:
        try:
            self._connection.send(rows)
        except OSError as exc:  # the pipe is broken: the writer is gone
            raise WriterFailed(f"the Feast writer (pid {self.process.pid}) ended: {exc}") from exc
        failure = self._reply(PUSH_TIMEOUT_S, f"push {len(rows)} rows")
        if failure is not None:
            raise WriterFailed(f"the Feast writer failed to push {len(rows)} rows: {failure}")

    def _reply(self, timeout_s: float, doing: str) -> Any:
        try:
            if not self._connection.poll(timeout_s):
                raise WriterFailed(f"the Feast writer (pid {self.process.pid}) did not {doing} in {timeout_s:.0f} s")
            return self._connection.recv()
        except (EOFError, OSError) as exc:
            raise WriterFailed(
                f"the Feast writer (pid {self.process.pid}) ended (exit code {self.process.exitcode}) before it could "
                f"{doing}"
            ) from exc

    def kill(self) -> None:
        self.close(grace_s=0.0)

    def close(self, grace_s: float = 30.0) -> None:
        """Close the pipe (the writer returns once it has answered the push in hand), give it ``grace_s`` seconds
        to end, then kill it."""
        atexit.unregister(self.close)
        self._connection.close()
        self.process.join(timeout=grace_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


class FeastSink:
    """Pushes rows to Feast (online, and offline as history) off the event loop: in a child process (``writer=
    "process"``) or a thread; see the module docstring.

    The store (``feature_store``; default: from the environment) is opened on first use, or beforehand by
    :meth:`open`: importing Feast takes seconds, which the worker spends before it starts consuming rather than with a
    batch of events waiting on it.
    """

    def __init__(
        self,
        metrics: WorkerMetrics | None = None,
        writer: FeastWriter = "process",
        feature_store: FeatureStoreSettings | None = None,
    ) -> None:
        self._metrics = metrics
        self._writer = writer
        self._feature_store = feature_store
        self._lock = threading.Lock()  # one push, or one open, at a time
        self._pusher: FeaturePusher | None = None  # writer="thread"
        self._process: WriterProcess | None = None  # writer="process"

    @property
    def writer(self) -> FeastWriter:
        return self._writer

    def open(self) -> int:
        """Open the store now, blocking until it is open; returns the pid of the process that writes."""
        with self._lock:
            if self._writer == "thread":
                self._thread_pusher()
                return os.getpid()
            return self._writer_process().pid

    def _thread_pusher(self) -> FeaturePusher:
        if self._pusher is None:
            from perfusion.feature_store import FeaturePusher

            self._pusher = FeaturePusher.open(self._feature_store)
        return self._pusher

    def _writer_process(self) -> WriterProcess:
        if self._process is None:
            self._process = WriterProcess(self._feature_store)
            log.info("Feast writer process %d started", self._process.pid)
        return self._process

    def _push_blocking(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            if self._writer == "thread":
                self._thread_pusher().push_user_preferences(rows)
                return
            writer = self._writer_process()
            try:
                writer.push(rows)
            except WriterFailed:
                self._process = None  # the next attempt starts a new writer
                writer.kill()
                raise

    async def __call__(self, rows: list[dict[str, Any]]) -> None:
        """Push, retrying with backoff until Feast takes the rows: the batch's events are acknowledged only after
        this returns, so a Feast outage (or a writer process that died) delays features but neither loses them nor
        crashes the agent."""

        def push() -> Awaitable[None]:
            return asyncio.get_running_loop().run_in_executor(None, self._push_blocking, rows)

        await retry_until_done(
            f"Feast push of {len(rows)} rows", push, first_delay_s=1.0, errors=(Exception,), on_failure=self._failed
        )

    def _failed(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.feast_push_failures.inc()

    def close(self) -> None:
        """End the writer process, if any, once it has answered the push in hand."""
        with self._lock:
            writer, self._process = self._process, None
        if writer is not None:
            writer.close()
