"""The one topic follower: records in offset order to the handler, any failure of one record logged with its
topic[partition]@offset and skipped, broker errors retried with backoff; against the real broker."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import pytest
from kafka import KafkaProducer

from perfusion.contracts.topics import TopicNames, ensure_topics
from perfusion.errors import ConfigError
from perfusion.follower import FollowedRecord, ReconnectBackoff, TopicFollower

DEEP_NESTING = b'{"kind": "order", "quantity": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
HUGE_INTEGER = b'{"kind": "order", "quantity": ' + b"9" * 5_000 + b"}"


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def produce(bootstrap: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    """Each value under a key of its own: compacted topics (production orders, model updates) refuse a record
    without a key."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for index, value in enumerate(values):
            producer.send(topic, key=f"{partition}-{index}".encode(), value=value, partition=partition)
        producer.flush(timeout=10)
    finally:
        producer.close()


class JsonCounter:
    """A handler that decodes each record as JSON and keeps the ``n`` of the good ones, as a real follower would."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, record: FollowedRecord) -> None:
        payload = json.loads(record.value)
        value = payload["n"]
        with self._lock:
            self.seen.append(value)


def test_poison_records_are_logged_with_their_offset_and_the_follower_goes_on(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=1)
    good_before = [json.dumps({"n": n}).encode() for n in range(3)]
    poison = [DEEP_NESTING, HUGE_INTEGER, b"\x80 not utf-8", b'{"no_n": 1}']
    good_after = [json.dumps({"n": n}).encode() for n in range(3, 12)]
    produce(kafka_bootstrap, topics.events, good_before + poison + good_after)

    handler = JsonCounter()
    follower = TopicFollower("test-follower", kafka_bootstrap, [topics.events], handler, poll_timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="perfusion.follower"):
        follower.start()
        try:
            assert wait_for(lambda: len(handler.seen) == 12), f"handled only {handler.seen}"
            assert follower.running
        finally:
            follower.stop()
    assert handler.seen == list(range(12))
    counts = follower.counts()
    assert (counts.handled, counts.failed, counts.broker_errors) == (12, 4, 0)
    # Each poison record is named by topic[partition]@offset, with the exception's type.
    for offset, error in ((3, "RecursionError"), (4, "ValueError"), (5, "UnicodeDecodeError"), (6, "KeyError")):
        where = f"{topics.events}[0]@{offset}"
        assert any(where in message and error in message for message in caplog.messages), (where, caplog.messages)
    assert follower.last_failure is not None and follower.last_failure.where == f"{topics.events}[0]@6"
    # The 5,000-digit number is not copied whole into the log.
    assert all(len(message) < 1_000 for message in caplog.messages)


def test_records_of_several_topics_and_partitions_each_reach_the_handler_once(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=2)
    for partition in (0, 1):
        values = [json.dumps({"n": 100 * partition + n}).encode() for n in range(5)]
        produce(kafka_bootstrap, topics.events, values, partition=partition)
    produce(kafka_bootstrap, topics.production_orders, [json.dumps({"n": 1_000}).encode()])

    received: list[tuple[str, int, int]] = []
    follower = TopicFollower(
        "test-follower",
        kafka_bootstrap,
        [topics.events, topics.production_orders],
        lambda record: received.append((record.topic, record.partition, json.loads(record.value)["n"])),
        poll_timeout_s=0.2,
    )
    follower.start()
    try:
        assert wait_for(lambda: len(received) == 11), received
    finally:
        follower.stop()
    expected = [(topics.events, p, 100 * p + n) for p in (0, 1) for n in range(5)]
    expected.append((topics.production_orders, 0, 1_000))
    assert sorted(received) == sorted(expected)
    # Offset order within each partition.
    for partition in (0, 1):
        in_partition = [n for topic, p, n in received if topic == topics.events and p == partition]
        assert in_partition == sorted(in_partition)


def test_latest_sees_only_records_produced_once_positioned(kafka_bootstrap: str, topic_prefix: str) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=1)
    produce(kafka_bootstrap, topics.model_updates, [json.dumps({"n": 0}).encode()])
    handler = JsonCounter()
    follower = TopicFollower(
        "test-follower", kafka_bootstrap, [topics.model_updates], handler, start_at="latest", poll_timeout_s=0.2
    )
    follower.start()
    try:
        assert follower.wait_positioned(30)
        produce(kafka_bootstrap, topics.model_updates, [json.dumps({"n": 1}).encode()])
        assert wait_for(lambda: handler.seen == [1])
    finally:
        follower.stop()


def test_an_unreachable_broker_is_retried_with_backoff_and_never_ends_the_thread() -> None:
    errors: list[Exception] = []
    follower = TopicFollower(
        "test-follower",
        "127.0.0.1:1",  # nothing listens on port 1
        ["nowhere"],
        JsonCounter(),
        backoff=ReconnectBackoff(initial_s=0.05, max_s=0.1),
        on_broker_error=errors.append,
        consumer_options={"api_version_auto_timeout_ms": 200},
    )
    follower.start()
    try:
        assert wait_for(lambda: follower.counts().broker_errors >= 2, timeout_s=60)
        assert follower.running
    finally:
        follower.stop()
    assert not follower.running
    assert len(errors) >= 2 and follower.counts().handled == 0


def test_backoff_grows_to_its_ceiling_and_is_validated() -> None:
    backoff = ReconnectBackoff(initial_s=0.5, factor=2.0, max_s=3.0)
    assert [backoff.delay_s(n) for n in (1, 2, 3, 4, 10)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ConfigError, match="initial_s"):
        ReconnectBackoff(initial_s=5.0, max_s=1.0)
    with pytest.raises(ConfigError, match="factor"):
        ReconnectBackoff(factor=0.5)
    with pytest.raises(ConfigError, match="no topics"):
        TopicFollower("test-follower", "127.0.0.1:1", [], JsonCounter())
