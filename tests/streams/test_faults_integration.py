"""Faults from outside against `perfusion worker` on the real broker: poison messages mixed into good traffic,
follow-ups from other partitions, and demand that must fire with no other traffic.

The worker runs with short idle rules (``IDLE_S``), so that groups close and demand fires without clock events:
what a quiet loop does in production after ``--group-idle-after-s`` and ``--demand-idle-after-s``.

``test_poison_mix_keeps_every_good_event_and_dead_letters_every_poison`` is also the measurement of the closing
note; ``PERFUSION_POISON_MIX_IMPRESSIONS`` sizes it (default 60, a few thousand events at 1000) and it prints a
JSON summary: events in, samples, drops and dead letters by reason, production orders, and the seconds from the
last threshold-crossing order to its production order.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import Candidate, Click, DeadLetter, DesignCreated, Impression, Order
from streams.dead_letters import MAX_ORIGINAL_BYTES, original_bytes
from tests.streams.test_streams_integration import (
    IMPRESSIONS,
    LATENESS_S,
    PARTITIONS,
    WINDOW_S,
    Worker,
    by_key,
    clock_events,
    complete,
    create_topics,
    expected_results,
    feast_dir,
    make_log,
    produce,
    read_outputs,
    start_worker,
    twice_and_reordered,
    workers,
)

__all__ = ["feast_dir", "workers"]  # the fixtures this module's tests use

IDLE_S = 3.0
IDLE_FLAGS = [f"--group-idle-after-s={IDLE_S}", f"--demand-idle-after-s={IDLE_S}"]
# An order fires once the watermark passes it: after IDLE_S of quiet and the lateness, checked every tick.
PRODUCTION_WITHIN_S = IDLE_S + LATENESS_S + 10.0
WAIT_S = 240.0


def partition_of(key: str) -> int:
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


def user_on(partition: int, stem: str) -> str:
    return next(f"{stem}-{n}" for n in range(1000) if partition_of(f"{stem}-{n}") == partition)


def impression(event_id: str, user_id: str, design_id: str, ts: float) -> Impression:
    return Impression(
        event_id=event_id, ts=ts, user_id=user_id, design_id=design_id, prompt="a shirt", model_version="v1",
        candidates=[Candidate(image_id=f"{event_id}-{k}", position=k, descriptor=[0.25] * DESCRIPTOR_DIM)
                    for k in range(3)],
    )  # fmt: skip


def poisons(now: float) -> dict[str, tuple[bytes, bytes]]:
    """Reason fragment -> (key, message), one of each kind the loop has met."""
    nan_impression = impression("nan-imp", "nan-viewer", "design-0", now - 900).model_dump(mode="json")
    nan_impression["candidates"][0]["descriptor"] = [float("nan")] * DESCRIPTOR_DIM
    click = {"kind": "click", "event_id": "p", "ts": now - 900, "user_id": "u", "impression_id": "i", "design_id": "d",
             "image_id": "x"}  # fmt: skip
    return {
        "nested deeper": (b"u", b'{"kind": "click", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "integer of 5000 digits": (b"u", b'{"kind": "order", "quantity": ' + b"9" * 5000 + b"}"),
        "NaN is not a number": (b"u", json.dumps({**click, "ts": float("nan")}).encode()),
        "NaN is not a number JSON": (b"nan-viewer", json.dumps(nan_impression).encode()),
        "more than 65536": (b"u", json.dumps({**click, "pad": "x" * 900_000}).encode()),
        "schema_version True": (b"u", json.dumps({**click, "schema_version": True}).encode()),
    }  # fmt: skip


def produce_messages(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> list[float]:
    """Send in order; returns each message's timestamp (seconds) as the broker stored it."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=2_000_000)
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in messages]
        producer.flush()
        return [future.get(timeout=30).timestamp / 1000.0 for future in futures]
    finally:
        producer.close()


def read_topics(bootstrap: str, topics: list[str], done: object, timeout_s: float) -> dict[str, list]:
    """(key, value, timestamp s) of every record of ``topics`` from the beginning, until ``done(records)``."""
    from kafka import KafkaConsumer, TopicPartition

    records: dict[str, list] = {topic: [] for topic in topics}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=2**21)
    try:
        consumer.assign([TopicPartition(topic, p) for topic in topics for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not done(records):  # type: ignore[operator]
            for partition, batch in consumer.poll(timeout_ms=500).items():
                records[partition.topic].extend((r.key, r.value, r.timestamp / 1000.0) for r in batch)
        return records
    finally:
        consumer.close()


def test_poison_mix_keeps_every_good_event_and_dead_letters_every_poison(
    kafka_bootstrap: str, topic_prefix: str, feast_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    impressions = int(os.environ.get("PERFUSION_POISON_MIX_IMPRESSIONS", "60"))
    now = time.time()
    log = make_log(seed=21, impressions=impressions, base_ts=now - 1000.0)
    orphan_click = Click(event_id="click-on-nan", ts=now - 899, user_id="nan-viewer", impression_id="nan-imp",
                         design_id="design-0", image_id="nan-imp-0")  # fmt: skip
    log.append(orphan_click)
    bad = poisons(now)
    rng = random.Random(22)
    messages: list[tuple[bytes | None, bytes]] = [(e.user_id.encode(), e.to_bytes()) for e in log]
    rekeyed = rng.sample(range(len(messages)), 5)
    rekeyed_values = {messages[index][1] for index in rekeyed}
    for index in rekeyed:  # good events under a wrong key, or none: resent under their user id
        messages[index] = (None if index % 2 else b"someone-else", messages[index][1])
    for key, value in bad.values():
        messages.insert(rng.randrange(len(messages)), (key, value))
    messages.sort(key=lambda message: message[1] != bad["NaN is not a number JSON"][1])  # the NaN impression first
    names = create_topics(kafka_bootstrap, topic_prefix)
    worker = start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1", IDLE_FLAGS)
    stamps = produce_messages(kafka_bootstrap, names.events, messages)
    produced_at = {value: stamp for (_, value), stamp in zip(messages, stamps, strict=True)}

    expected_samples, expected_orders = expected_results(log)
    # A mis-keyed event is sent again under its user id: it comes round at the end of its partition, after the rest
    # of the backlog, and its group may have closed by then. Its impression's sample is then a counted drop (or a
    # sample without that follow-up), never silence; every group no mis-keyed event touches is exactly as the batch
    # computation says.
    rekeyed_events = [log_event for log_event in log if log_event.to_bytes() in rekeyed_values]
    touched = {getattr(e, "impression_id", None) or e.event_id for e in rekeyed_events}
    untouched_samples = {key: value for key, value in expected_samples.items() if key not in touched}

    def done(records: dict[str, list]) -> bool:
        samples = {key.decode() for key, _, _ in records[names.group_samples]}
        drops = {json.loads(value)["sample_id"] for _, value, _ in records[names.group_drops]}
        orders = {key.decode() for key, _, _ in records[names.production_orders]}
        return (samples >= set(untouched_samples) and orders >= set(expected_orders)
                and (set(expected_samples) - samples) <= drops and "nan-imp" in drops
                and len(records[names.dead_letters]) >= len(bad))  # fmt: skip

    topics = [names.group_samples, names.group_drops, names.production_orders, names.dead_letters]
    records = read_topics(kafka_bootstrap, topics, done, WAIT_S)
    assert worker.process.poll() is None, "the worker exited"
    samples = {key.decode(): json.loads(value) for key, value, _ in records[names.group_samples]}
    drops = [json.loads(value) for _, value, _ in records[names.group_drops]]
    orders = {key.decode(): (json.loads(value), stamp) for key, value, stamp in records[names.production_orders]}
    letters = [DeadLetter.model_validate_json(value) for _, value, _ in records[names.dead_letters]]

    assert {key: value for key, value in samples.items() if key not in touched} == untouched_samples
    assert set(samples) | {drop["sample_id"] for drop in drops} >= set(expected_samples)  # each impression ends
    assert {design_id: order for design_id, (order, _) in orders.items()} == expected_orders
    assert ("nan-imp", "nan-viewer", "orphan_follow_up") in [(d["sample_id"], d["user_id"], d["reason"]) for d in drops]
    assert {d["sample_id"] for d in drops} <= touched | {"nan-imp"}  # nothing else is dropped
    assert len(letters) == len(bad)
    by_size = {letter.original_size: letter for letter in letters}
    for fragment, (_, raw) in bad.items():
        letter = by_size[len(raw)]
        assert fragment in letter.reason, (fragment, letter.reason)
        assert letter.original_sha256 == hashlib.sha256(raw).hexdigest()
        assert original_bytes(letter) == raw[:MAX_ORIGINAL_BYTES] and letter.truncated == (
            len(raw) > MAX_ORIGINAL_BYTES
        )
        assert letter.topic == names.events

    # The crossing order of each design: the order whose event time the production order names.
    crossing = {e.design_id: e for e in log if isinstance(e, Order) and e.design_id in orders
                and e.ts == orders[e.design_id][0]["ts"]}  # fmt: skip
    last_design = max(crossing, key=lambda design_id: produced_at[crossing[design_id].to_bytes()])
    latency_s = orders[last_design][1] - produced_at[crossing[last_design].to_bytes()]
    summary = {
        "events_in": len(messages),
        "good_events": len(log),
        "impressions": sum(isinstance(e, Impression) for e in log),
        "samples": len(samples),
        "drops_by_reason": dict(Counter(d["reason"] for d in drops)),
        "dead_letters_by_reason": dict(Counter(letter.reason.split(";")[0][:60] for letter in letters)),
        "rekeyed": len(rekeyed),
        "rekeyed_impressions_late": sum(d["reason"] == "late_impression" for d in drops),
        "production_orders": len(orders),
        "last_crossing_order_to_production_order_s": round(latency_s, 2),
    }
    print(json.dumps(summary, indent=2))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert latency_s < PRODUCTION_WITHIN_S + 30.0  # the traffic itself takes a while to read behind it


def test_follow_ups_from_other_partitions_and_an_order_with_no_traffic_after_it(
    kafka_bootstrap: str, topic_prefix: str, feast_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    now = time.time()
    viewer, friend = user_on(0, "viewer"), user_on(1, "friend")
    stranger_a, stranger_b = user_on(2, "stranger"), user_on(3, "stranger")
    merchant = user_on(0, "merchant")
    design = DesignCreated(event_id="create-d", ts=now - 30, user_id=merchant, design_id="d-shared",
                           prompt="a shirt", order_threshold=1)  # fmt: skip
    shown = impression("imp-shared", viewer, "d-shared", now - 20)
    common = {"impression_id": "imp-shared", "design_id": "d-shared"}
    shared_click = Click(event_id="friend-click", ts=now - 19, user_id=friend, image_id="imp-shared-1", **common)
    orphan_clicks = [
        Click(event_id=f"orphan-{user}", ts=now - 18, user_id=user, impression_id="ghost", design_id="d-shared",
              image_id="ghost-0")
        for user in (stranger_a, stranger_b)
    ]  # fmt: skip
    names = create_topics(kafka_bootstrap, topic_prefix)
    worker = start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1", IDLE_FLAGS)
    produce_messages(
        kafka_bootstrap, names.events,
        [(e.user_id.encode(), e.to_bytes()) for e in (design, shown, shared_click, *orphan_clicks)],
    )  # fmt: skip
    wait_for_progress(kafka_bootstrap, topic_prefix, worker)
    # Within the impression's window in event time (so it grades the viewer's group), sent after everything else.
    crossing = Order(event_id="order-1", ts=now - 17, user_id=viewer, image_id="imp-shared-0", quantity=1, **common)
    [ordered_at] = produce_messages(kafka_bootstrap, names.events, [(viewer.encode(), crossing.to_bytes())])

    def done(records: dict[str, list]) -> bool:
        return (
            bool(records[names.production_orders])
            and len(records[names.group_drops]) >= 3
            and bool(records[names.group_samples])
        )

    topics = [names.group_samples, names.group_drops, names.production_orders]
    records = read_topics(kafka_bootstrap, topics, done, WINDOW_S + LATENESS_S + 90.0)
    assert worker.process.poll() is None, "the worker exited"
    [(_, order_value, fired_at)] = records[names.production_orders]
    assert json.loads(order_value)["design_id"] == "d-shared"
    assert fired_at - ordered_at < PRODUCTION_WITHIN_S, f"fired {fired_at - ordered_at:.1f} s after the order"
    [(sample_key, sample_value, _)] = records[names.group_samples]
    sample = json.loads(sample_value)
    assert sample_key == b"imp-shared" and sample["user_id"] == viewer
    assert [c["grade"] for c in sample["candidates"]] == [2, 0, 0]  # the viewer's order; the friend's click not
    drops = sorted(
        (json.loads(value)["sample_id"], json.loads(value)["user_id"]) for _, value, _ in records[names.group_drops]
    )
    assert drops == sorted([("imp-shared", friend), ("ghost", stranger_a), ("ghost", stranger_b)])
    assert all(json.loads(value)["reason"] == "orphan_follow_up" for _, value, _ in records[names.group_drops])
    assert len({key for key, _, _ in records[names.group_drops]}) == 3


def wait_for_progress(bootstrap: str, prefix: str, worker: Worker) -> None:
    """Wait until the worker has read the first events (their demand routed): the order that follows then comes
    alone, with no traffic after it."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.agents.demand import by_design_topic_name
    from streams.settings import StreamSettings

    topic = by_design_topic_name(StreamSettings(topic_prefix=prefix).group_id)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert worker.process.poll() is None, "the worker exited"
            partitions = consumer.partitions_for_topic(topic) or set()
            if partitions:
                ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
                if sum(ends.values()) > 0:
                    return
            time.sleep(0.5)
        raise AssertionError("the worker never routed the first demand event")
    finally:
        consumer.close()


def test_a_kill_during_live_traffic_a_broker_restart_and_a_resent_batch_lose_nothing_and_fire_nothing_twice(
    topic_prefix: str, feast_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    """The fault run an operator fears most, on a broker of this test's own (it is stopped and started again):
    the worker is killed mid-stream, the broker goes away for a few seconds while events are being read, and a
    producer sends a batch twice. Every impression ends as exactly one sample and every design fires once."""
    from harness.infra.kafka_broker import KafkaBroker, KafkaBrokerConfig

    broker = KafkaBroker(KafkaBrokerConfig(state_dir=tmp_path / "kafka"))
    address = broker.start().address
    assert address is not None
    try:
        log = make_log(seed=31, impressions=IMPRESSIONS, base_ts=time.time() - 1000.0)
        names = create_topics(address, topic_prefix)
        first = start_worker(workers, address, topic_prefix, feast_dir, tmp_path, "w1")
        arrivals = twice_and_reordered(random.Random(32), log)
        third = len(arrivals) // 3
        produce(address, names.events, arrivals[:third], [])
        before_kill = len(read_outputs(address, names, lambda outputs: len(outputs["samples"]) >= 3)["samples"])
        first.kill()  # during live traffic: its uncommitted batch is read again by the next worker
        start_worker(workers, address, topic_prefix, feast_dir, tmp_path, "w2")
        produce(address, names.events, arrivals[third : 2 * third], [])
        # The second worker is consuming (samples the first one could not have made are out) when the broker goes
        # away under it. A worker that is still starting exits instead (it cannot create its topics), for its
        # supervisor to start again.
        read_outputs(address, names, lambda outputs: len(outputs["samples"]) >= before_kill + 5)
        broker.stop(grace_s=10.0)
        time.sleep(7.0)  # the worker meets a broker that is gone, and retries
        restarted = broker.start()
        assert restarted.address == address  # the same ports, the same data
        produce(address, names.events, arrivals[2 * third :] + arrivals[:third], clock_events(log[-1].ts))
        expected_samples, expected_orders = expected_results(log)
        outputs = read_outputs(address, names, complete(expected_samples, set(), expected_orders, with_requests=False))
        assert by_key(outputs["samples"]) == expected_samples
        assert by_key(outputs["orders"]) == expected_orders
        assert len({key for key, _ in outputs["orders"]}) == len(expected_orders)
        assert workers[-1].process.poll() is None, "the worker did not survive the broker's restart"
    finally:
        for worker in workers:
            worker.stop()
        broker.stop()
