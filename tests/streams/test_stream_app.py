"""The worker's consumer starts a partition without a committed offset at its beginning, whatever its position."""

from __future__ import annotations

import asyncio
from typing import Any

from streams.app import seek_uncommitted_partitions_to_beginning


class RecordingConsumer:
    """Stands in for aiokafka's consumer: answers committed offsets and records the seeks asked of it."""

    def __init__(self, committed: dict[str, int | None]) -> None:
        self.committed = committed
        self.seeks: list[tuple[str, ...]] = []

    async def seek_to_committed(self) -> dict[str, int | None]:
        for partition, offset in self.committed.items():
            if offset and offset > 0:  # what aiokafka does: only offsets above 0 are sought
                self.seeks.append(("committed", partition, str(offset)))
        return self.committed

    def seek(self, partition: str, offset: int) -> None:
        self.seeks.append(("offset", partition, str(offset)))

    async def seek_to_beginning(self, *partitions: str) -> None:
        self.seeks.append(("beginning", *partitions))


class ConsumerThreadStandIn:
    def __init__(self, consumer: RecordingConsumer) -> None:
        self.consumer = consumer

    def _ensure_consumer(self) -> RecordingConsumer:
        return self.consumer

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        result = fun(*args)
        return await result if asyncio.iscoroutine(result) else result


def test_partitions_never_committed_or_at_zero_are_sought_to_their_start_and_the_patch_applies_once() -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    seek_uncommitted_partitions_to_beginning()
    patched = AIOKafkaConsumerThread.seek_to_committed
    seek_uncommitted_partitions_to_beginning()
    assert AIOKafkaConsumerThread.seek_to_committed is patched

    consumer = RecordingConsumer({"events-0": 42, "events-1": None, "events-2": 0, "events-3": -1})
    committed = asyncio.run(patched(ConsumerThreadStandIn(consumer)))  # type: ignore[arg-type]
    assert committed == consumer.committed
    assert consumer.seeks == [
        ("committed", "events-0", "42"),
        ("offset", "events-2", "0"),
        ("beginning", "events-1", "events-3"),
    ]
