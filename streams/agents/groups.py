"""The group-builder agent: impressions and their follow-ups in, one GroupSample (or one GroupDrop) per impression out.

The attribution logic is :class:`streams.grouping.GroupBuilder`; this module wires one builder per partition of
``perfusion.events`` to a changelog-backed Faust table, sends samples to ``perfusion.group-samples`` keyed by
``sample_id`` and drops to ``perfusion.group-drops`` keyed the same way, waits for the broker to acknowledge them,
and only then confirms them in the table (a crash in between repeats an output under its key, never loses it).
The attribution window comes from :meth:`streams.settings.StreamSettings.grouping`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from streams.dead_letters import EventGate, MessagePosition
from streams.grouping import GroupBuilder, GroupOutput
from streams.records import GroupSample
from streams.table_store import JsonTableStore, forget_on_rebalance, raw_table, send_and_wait

if TYPE_CHECKING:
    from faust.streams import Stream
    from faust.types import AgentT, StreamT

    from streams.app import AgentContext

log = logging.getLogger(__name__)

TABLE_NAME = "group-builder"
BATCH_MAX = 2000
BATCH_WITHIN_S = 0.1


def register(context: AgentContext) -> AgentT:
    """Declare the group-builder agent and its table on ``context.app``."""
    app, settings, topics = context.app, context.settings, context.topics
    grouping = settings.grouping()
    table = raw_table(app, TABLE_NAME, settings.partitions)
    gate = EventGate(sink=None, shared=context.event_parses)
    builders: dict[int, tuple[GroupBuilder, JsonTableStore]] = {}
    forget_on_rebalance(app, builders)

    def builder_for(partition: int) -> tuple[GroupBuilder, JsonTableStore]:
        if partition not in builders:
            store = JsonTableStore(table, partition)
            builders[partition] = (GroupBuilder(grouping, store, partition), store)
        return builders[partition]

    async def groups(stream: StreamT[bytes]) -> None:
        async for batch in cast("Stream[bytes]", stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            touched: dict[int, JsonTableStore] = {}  # held here: a rebalance may clear ``builders`` meanwhile
            emitted: list[tuple[GroupBuilder, list[GroupOutput]]] = []
            for event in batch:
                message = event.message
                position = MessagePosition(message.topic, message.partition, message.offset)
                parsed = await gate.admit(event.value, position)
                if parsed is None:
                    continue
                builder, touched[message.partition] = builder_for(message.partition)
                outputs = builder.process(parsed)
                if outputs:
                    emitted.append((builder, outputs))
            if emitted:
                await deliver(emitted)
            for store in touched.values():
                store.flush_changelog()

    async def deliver(emitted: list[tuple[GroupBuilder, list[GroupOutput]]]) -> None:
        """Send the batch's samples and drops, wait for the broker, then confirm them in the builders' state."""
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

    return app.agent(topics.events, name="groups")(groups)
