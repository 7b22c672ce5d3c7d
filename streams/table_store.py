"""Faust table helpers shared by the group, demand and training-trigger agents.

:class:`JsonTableStore` is the ``MutableMapping`` view of a raw-bytes Faust table that the pure logic
(:mod:`streams.grouping`, :mod:`streams.demand`, the training trigger) reads and writes: values are JSON, and
changes go to the changelog partition the caller names (the partition of the events being processed), so state
stays co-partitioned with the topic it was computed from. A key written many times in one micro-batch is logged
once: the agent calls :meth:`JsonTableStore.flush_changelog` at the end of each batch, before its events are
acknowledged, so the changelog still runs ahead of the committed offsets exactly as when every write was logged.
:func:`send_and_wait` is the first half of the agents' two-phase delivery: an output is confirmed in its table
only after the broker acknowledged it.

Faust is not imported here at runtime: the app is passed in.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import faust
    from faust.types import TableT, TopicT
    from mode.types.signals import BaseSignalT


class JsonTableStore(MutableMapping[str, Any]):
    """One partition's view of a raw-bytes Faust table as a mapping of str keys to JSON values.

    Reads see every key the worker holds; writes and deletes change the table at once and are logged to changelog
    ``partition`` by :meth:`flush_changelog`, once per key however often it changed. Decoded values are cached per
    key: callers replace values, never mutate them in place.
    """

    def __init__(self, table: TableT, partition: int) -> None:
        self.table = table
        self.partition = partition
        self._decoded: dict[str, Any] = {}
        self._unlogged: dict[bytes, None] = {}  # keys changed since the last flush, in order of first change

    def __getitem__(self, key: str) -> Any:
        if key in self._decoded:
            return self._decoded[key]
        raw = self.table.data[key.encode()]
        value = json.loads(raw)
        self._decoded[key] = value
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        encoded = key.encode()
        self.table.data[encoded] = json.dumps(value, separators=(",", ":")).encode()
        self._decoded[key] = value
        self._unlogged[encoded] = None

    def __delitem__(self, key: str) -> None:
        encoded = key.encode()
        del self.table.data[encoded]
        self._decoded.pop(key, None)
        self._unlogged[encoded] = None

    def flush_changelog(self) -> int:
        """Log each key changed since the last flush with its current value (None, a tombstone, once deleted);
        returns how many. Faust's producer buffer sends them; the events are committed only after that."""
        keys, self._unlogged = self._unlogged, {}
        for key in keys:
            self.table.send_changelog(
                self.partition, key, self.table.data.get(key), key_serializer="raw", value_serializer="raw"
            )
        return len(keys)

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in list(self.table.data.keys()))

    def __len__(self) -> int:
        return len(self.table.data)


def raw_table(app: faust.App, name: str, partitions: int) -> TableT:
    """A changelog-backed table whose keys and values travel as raw bytes (the agents encode JSON themselves)."""
    return app.Table(name, key_type=bytes, value_type=bytes, partitions=partitions)


def internal_topic(app: faust.App, name: str, partitions: int) -> TopicT:
    """A raw-bytes topic the app creates itself (a repartition topic); one object per name and app, so that the
    stage that writes it and the agent that reads it share it."""
    declared = _INTERNAL_TOPICS.setdefault(app, {})
    if name not in declared:
        declared[name] = app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=partitions,
            internal=True,
        )
    return declared[name]


_INTERNAL_TOPICS: weakref.WeakKeyDictionary[Any, dict[str, TopicT]] = weakref.WeakKeyDictionary()


def forget_on_rebalance(app: faust.App, per_partition: MutableMapping[Any, Any]) -> None:
    """Drop the per-partition objects (or caches of table values) whenever partitions move: the next owner rebuilds
    them from the table."""

    def forget(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        per_partition.clear()

    app.on_partitions_revoked.connect(forget)
    app.on_partitions_assigned.connect(forget)


async def send_and_wait(sends: list[tuple[TopicT, bytes, bytes]]) -> None:
    """Send every (topic, key, value) and wait until the broker has acknowledged all of them."""
    pending = [await topic.send(key=key, value=value) for topic, key, value in sends]
    await asyncio.gather(*pending)
