"""DirectTopic: a raw send reaches the producer as one call with the topic's name, and its result is the producer's
acknowledgement; anything Faust's own path is for (a codec, a callback) still takes that path."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import faust
import pytest

from streams.direct_topic import DirectTopic


class RecordingProducer:
    """The producer call a DirectTopic makes: ``send`` returns a future the test resolves as the broker would."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.acks: list[asyncio.Future[str]] = []

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None, timestamp: Any, headers: Any
    ) -> asyncio.Future[str]:
        acknowledged: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, key, value, partition))
        self.acks.append(acknowledged)
        return acknowledged


def app_with_recording_producer(tmp_path: Path) -> tuple[faust.App, RecordingProducer]:
    app = faust.App("direct-topic-test", broker="kafka://localhost:9", Topic=DirectTopic, datadir=str(tmp_path))
    producer = RecordingProducer()
    app.producer = producer  # type: ignore[assignment]
    return app, producer


def test_a_raw_send_goes_to_the_producer_and_resolves_with_its_acknowledgement(tmp_path: Path) -> None:
    app, producer = app_with_recording_producer(tmp_path)
    topic = app.topic("t.events", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    assert isinstance(topic, DirectTopic)

    async def scenario() -> None:
        pending = await topic.send(key=b"u1", value=b'{"kind":"click"}', partition=2)
        tombstone = await topic.send(key=b"u2", value=None)
        assert producer.sent == [("t.events", b"u1", b'{"kind":"click"}', 2), ("t.events", b"u2", None, None)]
        producer.acks[0].set_result("metadata of u1")
        assert await pending == "metadata of u1"
        producer.acks[1].set_exception(RuntimeError("NotLeaderForPartition"))
        with pytest.raises(RuntimeError, match="NotLeaderForPartition"):
            await tombstone

    asyncio.run(scenario())


def test_a_table_changelog_sent_raw_takes_the_direct_path(tmp_path: Path) -> None:
    app, producer = app_with_recording_producer(tmp_path)
    table = app.Table("states", key_type=bytes, value_type=bytes, partitions=4)

    async def scenario() -> None:
        await table.changelog_topic.send(
            key=b"k", value=b"{}", partition=3, key_serializer="raw", value_serializer="raw"
        )

    asyncio.run(scenario())
    assert producer.sent == [(table.changelog_topic.get_topic_name(), b"k", b"{}", 3)]


def test_a_send_that_needs_a_codec_or_a_callback_takes_fausts_path(tmp_path: Path) -> None:
    app, producer = app_with_recording_producer(tmp_path)
    topic = app.topic("t.json", value_serializer="json")
    raw_topic = app.topic("t.raw", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    taken: list[str] = []

    async def fausts_send(self: faust.Topic, **kwargs: Any) -> str:
        taken.append(self.get_topic_name())
        return "faust"

    async def scenario() -> None:
        original = faust.Topic.send
        faust.Topic.send = fausts_send  # type: ignore[method-assign,assignment]
        try:
            assert await topic.send(key=b"k", value={"a": 1}) == "faust"
            assert await raw_topic.send(key=b"k", value=b"v", callback=lambda _: None) == "faust"
        finally:
            faust.Topic.send = original  # type: ignore[method-assign]

    asyncio.run(scenario())
    assert taken == ["t.json", "t.raw"] and producer.sent == []
