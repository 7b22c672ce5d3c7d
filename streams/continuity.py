"""Offset continuity: notice when the consumer skipped records of a partition, and restart rather than lose them.

The events topic is neither compacted nor written by transactional producers, so the offsets of one partition are
contiguous: after offset n the consumer must deliver n + 1, or an offset it delivered before (a replay after a
seek back). A forward jump means records were skipped. Faust can do that when a restarted worker's fetcher runs
ahead of table recovery: it processes records fetched before the recovery's seek, drops others from its queues,
and the seek does not reposition every partition (docs/streams-performance.md, "Records skipped when a restarted
worker's recovery races the fetcher"; faust-streaming issue 596). The skipped records are never acknowledged, so
Faust's committed offset stays in front of the gap, and a fresh process resumes from there.

So every agent checks each micro-batch before processing it (their input topics are contiguous too). On a jump it
neither processes nor acknowledges the batch and calls ``on_skipped_records``. The worker's handler replaces the
process with a fresh copy of the same command (:func:`restart_worker_process`), which recovers its tables and
reads again from the committed offsets.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from streams.table_store import forget_on_rebalance

if TYPE_CHECKING:
    import faust
    from faust.types import EventT

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SkippedRecords:
    """Offsets ``first`` to ``last`` of ``partition`` were never delivered."""

    partition: int
    first: int
    last: int

    def describe(self) -> str:
        return f"partition {self.partition}: offsets {self.first} to {self.last} were skipped by the consumer"


class OffsetContinuity:
    """The next offset expected on each partition, from the records delivered since the last rebalance.

    ``expected`` is a plain dict, cleared when partitions move (a reassigned partition restarts at its committed
    offset, which may lie anywhere): build it with :meth:`for_app`.
    """

    def __init__(self) -> None:
        self.expected: dict[int, int] = {}

    @classmethod
    def for_app(cls, app: faust.App) -> OffsetContinuity:
        """A check for one agent of ``app`` whose expectations are forgotten whenever partitions move."""
        continuity = cls()
        forget_on_rebalance(app, continuity.expected)
        return continuity

    def first_gap(self, positions: Iterable[tuple[int, int]]) -> SkippedRecords | None:
        """Check ``(partition, offset)`` pairs in delivery order; returns the first gap, or None and remembers the
        next offset of every partition. After a gap nothing is remembered from this batch."""
        batch_next: dict[int, int] = {}
        for partition, offset in positions:
            next_offset = batch_next.get(partition, self.expected.get(partition))
            if next_offset is not None and offset > next_offset:
                return SkippedRecords(partition, next_offset, offset - 1)
            batch_next[partition] = offset + 1  # a replay (offset below next_offset) moves the expectation back
        self.expected.update(batch_next)  # in place: the agent's rebalance handler clears this very dict
        return None

    def check(self, batch: Sequence[EventT], on_skipped: Callable[[SkippedRecords], NoReturn]) -> None:
        """:meth:`first_gap` over a Faust micro-batch; on a gap hand over to ``on_skipped``, which must not return
        (Faust would acknowledge the batch)."""
        skipped = self.first_gap((event.message.partition, event.message.offset) for event in batch)
        if skipped is not None:
            on_skipped(skipped)


def restart_worker_process(skipped: SkippedRecords) -> NoReturn:
    """Replace this process with a fresh run of the same command line (same PID, so a supervisor or a test that
    started it still sees it). Nothing of the current batch has been processed or acknowledged. Returning, or
    raising into the agent, would let Faust acknowledge the batch; so if the exec itself fails, the process exits."""
    log.error("%s; restarting the worker to read them again from the committed offsets", skipped.describe())
    logging.shutdown()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    finally:
        os._exit(70)  # EX_SOFTWARE; reached only if the exec failed
