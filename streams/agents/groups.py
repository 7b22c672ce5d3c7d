"""The group-builder stage: impressions and their follow-ups in, one GroupSample (or one GroupDrop) per impression out.

The attribution logic is :class:`streams.grouping.GroupBuilder`; this stage of the events agent
(:mod:`streams.agents.events`) wires one builder per partition of ``perfusion.events`` to a changelog-backed Faust
table, sends samples to ``perfusion.group-samples`` keyed by
``sample_id`` and drops to ``perfusion.group-drops`` keyed the same way, and each sample's ``(sample_id,
model_version)`` to the training trigger (:func:`streams.agents.training.by_version_topic`), waits for the broker to
acknowledge them all, and only then confirms them in the table (a crash in between repeats an output under its key,
never loses it; the trigger counts a repeated sample once).
The attribution window comes from :meth:`streams.settings.StreamSettings.grouping`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from perfusion.contracts.records import GroupSample
from streams.agents.training import by_version_topic
from streams.grouping import GroupBuilder, GroupOutput, idle_watermark
from streams.liveness import fail_worker_on_crash
from streams.table_store import JsonTableStore, Send, flush_changelogs, forget_on_rebalance, raw_table, send_and_wait
from streams.training_trigger import routed_sample

if TYPE_CHECKING:
    from streams.agents.events import AdmittedEvent
    from streams.context import AgentContext

log = logging.getLogger(__name__)

TABLE_NAME = "group-builder"


class GroupStage:
    """The group-builder stage of the events agent: one :class:`GroupBuilder` per partition over the table."""

    def __init__(self, context: AgentContext) -> None:
        self._grouping = context.settings.group
        self._topics = context.topics
        self._by_version = by_version_topic(context)
        self._metrics = context.metrics
        self._lock = context.event_state_lock
        self._table = raw_table(context.app, TABLE_NAME, context.settings.partitions)
        self._builders: dict[int, tuple[GroupBuilder, JsonTableStore]] = {}
        forget_on_rebalance(context.app, self._builders)
        # partition -> (wall-clock time of its latest event, the watermark that event left)
        self._last_event: dict[int, tuple[float, float]] = {}
        forget_on_rebalance(context.app, self._last_event)
        # Folded, not yet committed: held here, since a rebalance may clear the builders meanwhile.
        self._touched: dict[int, JsonTableStore] = {}
        self._emitted: list[tuple[GroupBuilder, list[GroupOutput]]] = []
        self._progress: dict[int, tuple[float, float]] = {}
        if self._grouping.idle_after_s > 0.0:
            interval_s = max(1.0, self._grouping.idle_after_s / 4)
            timer = fail_worker_on_crash("the group builder's idle timer", self.close_idle_partitions, context.on_crash)
            context.app.timer(interval=interval_s)(timer)

    async def close_idle_partitions(self) -> None:
        """Move the watermark of every idle partition this worker owns with the wall clock; deliver what closes."""
        async with self._lock:
            now = time.time()
            emitted: list[tuple[GroupBuilder, list[GroupOutput]]] = []
            touched: list[JsonTableStore] = []
            for partition, (wall_time, event_watermark) in list(self._last_event.items()):
                watermark = idle_watermark(event_watermark, now - wall_time, self._grouping)
                if watermark is None:
                    continue
                builder, store = self._builder_for(partition)
                outputs = builder.advance(watermark)
                touched.append(store)
                if outputs:
                    log.info("partition %d idle for %.0f s: %d groups closed", partition, now - wall_time, len(outputs))
                    emitted.append((builder, outputs))
            if emitted:
                await self._deliver(emitted)
            await flush_changelogs(touched)

    def _builder_for(self, partition: int) -> tuple[GroupBuilder, JsonTableStore]:
        if partition not in self._builders:
            store = JsonTableStore(self._table, partition)
            self._builders[partition] = (GroupBuilder(self._grouping, store, partition), store)
        return self._builders[partition]

    async def fold(self, batch: Sequence[AdmittedEvent]) -> None:
        now = time.time()
        for admitted in batch:
            builder, self._touched[admitted.partition] = self._builder_for(admitted.partition)
            outputs = builder.process(admitted.event)
            if outputs:
                self._emitted.append((builder, outputs))
            self._progress[admitted.partition] = (now, builder.watermark)

    async def commit(self) -> None:
        touched, emitted, progress = self._touched, self._emitted, self._progress
        self._touched, self._emitted, self._progress = {}, [], {}
        if emitted:
            await self._deliver(emitted)
        await flush_changelogs(touched.values())
        self._last_event.update(progress)

    def discard(self) -> None:
        for store in self._touched.values():
            store.rollback()
        # The builders' in-memory index and watermark may hold what was rolled back: rebuilt from the table.
        self._builders.clear()
        self._touched, self._emitted, self._progress = {}, [], {}

    async def _deliver(self, emitted: list[tuple[GroupBuilder, list[GroupOutput]]]) -> None:
        """Send the batch's samples (each to the trainer and to the training trigger) and drops, wait for the broker,
        then confirm them in the builders' state."""
        topics = self._topics
        sends: list[Send] = []
        for _, outputs in emitted:
            for output in outputs:
                if isinstance(output, GroupSample):
                    sends.append((topics.group_samples, output.sample_id.encode(), output.to_bytes()))
                    sends.append((self._by_version, output.model_version.encode(), routed_sample(output)))
                else:
                    sends.append((topics.group_drops, output.key(), output.to_bytes()))
        await send_and_wait(sends)
        for builder, outputs in emitted:
            builder.confirm(outputs)
            for output in outputs:
                if isinstance(output, GroupSample):
                    self._metrics.group_samples.inc()
                else:
                    self._metrics.group_drops.labels(reason=output.reason).inc()


def stage(context: AgentContext) -> GroupStage:
    return GroupStage(context)
