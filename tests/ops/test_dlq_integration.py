"""``perfusion dlq list|replay`` against the real broker and `perfusion worker`.

The case: a worker from before tolerant readers dead-lettered an order of a newer minor version
("order.gift_wrap: Extra inputs are not permitted"; the test writes that letter as such a worker wrote it). After
the upgrade the operator lists the dead letters, finds it by its reason, and replays it, twice by mistake: the order
counts once (the demand stage drops a seen event_id), so the design's third unit is the next genuine order. An event
of the next major, dead-lettered by this worker, is replayed too: it is dead-lettered again, carrying the replay
header.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ops.cli import main
from ops.commands.dlq import read_dead_letters
from perfusion.contracts.records import DesignCreated, Order
from streams.dead_letters import REPLAY_HEADER, MessagePosition, dead_letter
from tests.streams.test_faults_integration import (
    IDLE_FLAGS,
    PRODUCTION_WITHIN_S,
    impression,
    partition_of,
    produce_messages,
    read_topics,
    user_on,
)
from tests.streams.test_streams_integration import Worker, create_topics, feast_dir, start_worker, workers

__all__ = ["feast_dir", "workers"]  # the fixtures this module's tests use

OLD_WORKER_REASON = "order.gift_wrap: Extra inputs are not permitted"


def wait_for_letters(bootstrap: str, topic: str, count: int, worker: Worker, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(read_dead_letters(bootstrap, topic)[0]) < count:
        assert worker.process.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, f"fewer than {count} dead letters on {topic}"
        time.sleep(1.0)


def test_a_dead_letter_replayed_twice_counts_once_and_an_invalid_one_comes_back_with_the_replay_header(
    kafka_bootstrap: str,
    topic_prefix: str,
    feast_dir: Path,
    tmp_path: Path,
    workers: list[Worker],
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = time.time()
    merchant, shopper = user_on(0, "merchant"), user_on(1, "shopper")
    design = DesignCreated(event_id="create-dlq", ts=now - 30, user_id=merchant, design_id="d-dlq",
                           prompt="a shirt", order_threshold=3)  # fmt: skip
    shown = impression("imp-dlq", shopper, "d-dlq", now - 20)
    common = {"user_id": shopper, "impression_id": "imp-dlq", "design_id": "d-dlq", "quantity": 1}
    first = Order(event_id="order-a", ts=now - 18, image_id="imp-dlq-0", **common)
    replayed = Order(event_id="order-b", ts=now - 17, image_id="imp-dlq-1", **common)
    last = Order(event_id="order-c", ts=now - 16, image_id="imp-dlq-2", **common)
    newer_raw = json.dumps({**json.loads(replayed.to_bytes()), "schema_version": "1.1", "gift_wrap": True}).encode()
    next_major_raw = json.dumps({**json.loads(first.to_bytes()), "event_id": "order-v2", "schema_version": "2.0"})
    names = create_topics(kafka_bootstrap, topic_prefix)
    old_letter = dead_letter(
        newer_raw, OLD_WORKER_REASON, MessagePosition(names.events, partition_of(shopper), 4_000), now=now - 600,
        key=shopper.encode(), headers=[("trace", b"trace-b")],
    )  # fmt: skip
    produce_messages(kafka_bootstrap, names.dead_letters, [(b"old-worker-letter", old_letter.to_bytes())])
    worker = start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1", IDLE_FLAGS)
    produce_messages(
        kafka_bootstrap, names.events,
        [(merchant.encode(), design.to_bytes()), (shopper.encode(), shown.to_bytes()),
         (shopper.encode(), first.to_bytes()), (shopper.encode(), next_major_raw.encode())],
    )  # fmt: skip
    wait_for_letters(kafka_bootstrap, names.dead_letters, 2, worker)

    prefix = ["dlq", "--topic-prefix", topic_prefix]
    capsys.readouterr()
    assert main([*prefix, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"2 of 2 dead letters on {names.dead_letters}"
    assert OLD_WORKER_REASON in lines[0] and f"key={shopper}" in lines[0] and f"{len(newer_raw)}B" in lines[0]
    assert "unknown schema_version '2.0'" in lines[1] and f"from {names.events}[{partition_of(shopper)}]@" in lines[1]
    assert main([*prefix, "list", "--reason", "extra inputs", "--until", str(now)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"1 of 2 dead letters on {names.dead_letters}"

    for _ in range(2):  # the operator replays the old worker's letter twice
        assert main([*prefix, "replay", "--reason", "Extra inputs"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "replayed 1 of 1 dead letters"
    assert main([*prefix, "replay", "--reason", "schema_version", "--limit", "1"]) == 0
    produce_messages(kafka_bootstrap, names.events, [(shopper.encode(), last.to_bytes())])

    def done(records: dict[str, list]) -> bool:
        return bool(records[names.production_orders]) and len(records[names.dead_letters]) >= 3

    topics = [names.production_orders, names.dead_letters, names.events]
    records = read_topics(kafka_bootstrap, topics, done, PRODUCTION_WITHIN_S + 120.0)
    assert worker.process.poll() is None, "the worker exited"
    time.sleep(5.0)  # a second production order (a double count) would come in this while
    records = read_topics(kafka_bootstrap, topics, done, 30.0)
    [(_, production_value, _)] = records[names.production_orders]
    production = json.loads(production_value)
    # A, B once and C: the third unit is C's. Counted twice, B would have crossed the threshold at its own time.
    assert (production["net_orders"], production["ts"]) == (3, last.ts)

    replays = read_replays(kafka_bootstrap, names.events)
    assert [(key, value) for key, value, _ in replays[:2]] == [(shopper.encode(), newer_raw)] * 2
    assert all(("trace", b"trace-b") in headers for _, _, headers in replays[:2])
    letters, _ = read_dead_letters(kafka_bootstrap, names.dead_letters)
    [again] = [read.letter for read in letters if read.letter.reason.startswith("unknown") and read.letter.headers]
    assert REPLAY_HEADER in [name for name, _ in again.headers]


def read_replays(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers) of the messages of ``topic`` that carry the replay header, in offset order."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    found: list[tuple[int, bytes | None, bytes, list[tuple[str, bytes]]]] = []
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for records in consumer.poll(timeout_ms=500).values():
                found.extend(
                    (r.offset, r.key, r.value, list(r.headers))
                    for r in records
                    if any(name == REPLAY_HEADER for name, _ in r.headers)
                )
    finally:
        consumer.close()
    return [(key, value, headers) for _, key, value, headers in sorted(found, key=lambda item: item[0])]
