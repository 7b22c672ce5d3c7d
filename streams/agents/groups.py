"""The group-builder agent: impressions and their follow-ups in, one GroupSample (or one GroupDrop) per impression out.

The attribution logic is :class:`streams.grouping.GroupBuilder`; this module wires one builder per partition of
``perfusion.events`` to a changelog-backed Faust table, sends samples to ``perfusion.group-samples`` keyed by
``sample_id`` and drops to ``perfusion.group-drops`` keyed the same way, waits for the broker to acknowledge them,
and only then confirms them in the table (a crash in between repeats an output under its key, never loses it).

:class:`JsonTableStore` is the ``MutableMapping`` view of a raw-bytes Faust table that the demand and training
agents use too: values are JSON, and every write goes to the changelog partition the caller names (the partition
of the events being processed), so state stays co-partitioned with the topic it was computed from.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, cast

from streams.dead_letters import EventGate, MessagePosition
from streams.grouping import GroupBuilder, GroupingSettings, GroupOutput
from streams.records import GroupSample

if TYPE_CHECKING:
    import faust
    from faust.streams import Stream
    from faust.types import AgentT, StreamT, TableT, TopicT
    from mode.types.signals import BaseSignalT

    from streams.app import AgentContext

log = logging.getLogger(__name__)

GROUP_DROPS = "perfusion.group-drops"
TABLE_NAME = "group-builder"
BATCH_MAX = 2000
BATCH_WITHIN_S = 0.1


class JsonTableStore(MutableMapping[str, Any]):
    """One partition's view of a raw-bytes Faust table as a mapping of str keys to JSON values.

    Reads see every key the worker holds; writes and deletes are logged to changelog ``partition``. Decoded values
    are cached per key: callers replace values, never mutate them in place.
    """

    def __init__(self, table: TableT, partition: int) -> None:
        self.table = table
        self.partition = partition
        self._decoded: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key in self._decoded:
            return self._decoded[key]
        raw = self.table.data[key.encode()]
        value = json.loads(raw)
        self._decoded[key] = value
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        raw = json.dumps(value, separators=(",", ":")).encode()
        self.table.data[key.encode()] = raw
        self._decoded[key] = value
        self.table.send_changelog(self.partition, key.encode(), raw, key_serializer="raw", value_serializer="raw")

    def __delitem__(self, key: str) -> None:
        del self.table.data[key.encode()]
        self._decoded.pop(key, None)
        self.table.send_changelog(self.partition, key.encode(), None, key_serializer="raw", value_serializer="raw")

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in list(self.table.data.keys()))

    def __len__(self) -> int:
        return len(self.table.data)


def raw_table(app: faust.App, name: str, partitions: int) -> TableT:
    return app.Table(name, key_type=bytes, value_type=bytes, partitions=partitions)


def forget_on_rebalance(app: faust.App, per_partition: dict[int, Any]) -> None:
    """Drop the per-partition objects whenever partitions move: the next owner rebuilds them from the table."""

    def forget(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        per_partition.clear()

    app.on_partitions_revoked.connect(forget)
    app.on_partitions_assigned.connect(forget)


def group_drops_topic(context: AgentContext) -> TopicT:
    return context.app.topic(
        context.settings.topic_prefix + GROUP_DROPS,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=context.settings.partitions,
    )


async def send_and_wait(sends: list[tuple[TopicT, bytes, bytes]]) -> None:
    """Send every (topic, key, value) and wait until the broker has acknowledged all of them."""
    pending = [await topic.send(key=key, value=value) for topic, key, value in sends]
    await asyncio.gather(*pending)


def register(context: AgentContext, grouping: GroupingSettings | None = None) -> AgentT:
    """Declare the group-builder agent and its table on ``context.app``."""
    app, settings, topics = context.app, context.settings, context.topics
    grouping = grouping if grouping is not None else GroupingSettings()
    table = raw_table(app, TABLE_NAME, settings.partitions)
    drops = group_drops_topic(context)
    gate = EventGate(sink=None)
    builders: dict[int, GroupBuilder] = {}
    forget_on_rebalance(app, builders)

    def builder_for(partition: int) -> GroupBuilder:
        if partition not in builders:
            builders[partition] = GroupBuilder(grouping, JsonTableStore(table, partition), partition)
        return builders[partition]

    @app.task
    async def declare_drops_topic() -> None:
        await drops.maybe_declare()

    async def groups(stream: StreamT[bytes]) -> None:
        async for batch in cast("Stream[bytes]", stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            emitted: list[tuple[GroupBuilder, list[GroupOutput]]] = []
            for event in batch:
                message = event.message
                position = MessagePosition(message.topic, message.partition, message.offset)
                parsed = await gate.admit(event.value, position)
                if parsed is None:
                    continue
                builder = builder_for(message.partition)
                outputs = builder.process(parsed)
                if outputs:
                    emitted.append((builder, outputs))
            if not emitted:
                continue
            await send_and_wait(
                [
                    (topics.group_samples if isinstance(output, GroupSample) else drops, output.sample_id.encode(),
                     output.to_bytes())
                    for _, outputs in emitted
                    for output in outputs
                ]
            )  # fmt: skip
            for builder, outputs in emitted:
                builder.confirm(outputs)

    return app.agent(topics.events, name="groups")(groups)
