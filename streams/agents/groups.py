"""The group-builder stage: impressions and their follow-ups in, one GroupSample (or one GroupDrop) per impression out.

The attribution logic is :class:`streams.grouping.GroupBuilder`; this stage of the events agent
(:mod:`streams.agents.events`) wires one builder per partition of ``perfusion.events`` to a changelog-backed Faust
table, sends samples to ``perfusion.group-samples`` keyed by
``sample_id`` and drops to ``perfusion.group-drops`` keyed the same way, waits for the broker to acknowledge them,
and only then confirms them in the table (a crash in between repeats an output under its key, never loses it).
The attribution window comes from :meth:`streams.settings.StreamSettings.grouping`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from perfusion.contracts.records import GroupSample
from streams.grouping import GroupBuilder, GroupOutput, idle_watermark
from streams.table_store import JsonTableStore, flush_changelogs, forget_on_rebalance, raw_table, send_and_wait

if TYPE_CHECKING:
    from streams.agents.events import AdmittedEvent
    from streams.context import AgentContext

log = logging.getLogger(__name__)

TABLE_NAME = "group-builder"


class GroupStage:
    """The group-builder stage of the events agent: one :class:`GroupBuilder` per partition over the table."""

    def __init__(self, context: AgentContext) -> None:
        self._grouping = context.settings.grouping()
        self._topics = context.topics
        self._table = raw_table(context.app, TABLE_NAME, context.settings.partitions)
        self._builders: dict[int, tuple[GroupBuilder, JsonTableStore]] = {}
        forget_on_rebalance(context.app, self._builders)
        # partition -> (wall-clock time of its latest event, the watermark that event left)
        self._last_event: dict[int, tuple[float, float]] = {}
        forget_on_rebalance(context.app, self._last_event)
        if self._grouping.idle_after_s > 0.0:
            context.app.timer(interval=max(1.0, self._grouping.idle_after_s / 4))(self.close_idle_partitions)

    async def close_idle_partitions(self) -> None:
        """Move the watermark of every idle partition this worker owns with the wall clock; deliver what closes."""
        now = time.time()
        emitted: list[tuple[GroupBuilder, list[GroupOutput]]] = []
        touched: list[JsonTableStore] = []
        for partition, (wall_time, event_watermark) in list(self._last_event.items()):
            watermark = idle_watermark(event_watermark, now - wall_time, self._grouping)
            if watermark is None or partition not in self._builders:
                continue
            builder, store = self._builders[partition]
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

    async def process(self, batch: Sequence[AdmittedEvent]) -> None:
        touched: dict[int, JsonTableStore] = {}  # held here: a rebalance may clear the builders meanwhile
        emitted: list[tuple[GroupBuilder, list[GroupOutput]]] = []
        now = time.time()
        for admitted in batch:
            builder, touched[admitted.partition] = self._builder_for(admitted.partition)
            outputs = builder.process(admitted.event)
            if outputs:
                emitted.append((builder, outputs))
            self._last_event[admitted.partition] = (now, builder.watermark)
        if emitted:
            await self._deliver(emitted)
        await flush_changelogs(touched.values())

    async def _deliver(self, emitted: list[tuple[GroupBuilder, list[GroupOutput]]]) -> None:
        """Send the batch's samples and drops, wait for the broker, then confirm them in the builders' state."""
        topics = self._topics
        await send_and_wait(
            [
                (topics.group_samples if isinstance(output, GroupSample) else topics.group_drops,
                 output.sample_id.encode(), output.to_bytes())
                for _, outputs in emitted
                for output in outputs
            ]
        )  # fmt: skip
        for builder, outputs in emitted:
            builder.confirm(outputs)


def stage(context: AgentContext) -> GroupStage:
    return GroupStage(context)
