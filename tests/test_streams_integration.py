"""Group, demand and training agents against the real broker, with workers run as subprocesses.

Run as a script (``python tests/test_streams_integration.py PREFIX DATA_DIR``) this module is one such worker: the
Faust app with the group, demand and training-trigger agents under short attribution windows.

Policy checked for production orders: every design that the batch recomputation fires appears on the production
topic, no other design does, and every message of one design (a crash may repeat one) has the same content; the
number of distinct keys equals the number of designs fired.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from perfusion.attributes import DESCRIPTOR_DIM
from streams.agents.groups import GROUP_DROPS
from streams.demand import DemandSettings, batch_production_orders
from streams.grouping import GroupingSettings, batch_group_outputs
from streams.records import AnyEvent, Candidate, Click, DesignCreated, Impression, Order, Return, Select
from streams.topics import TopicNames

REPO_ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
WINDOW_S = 20.0
LATENESS_S = 5.0
GROUPING = GroupingSettings(window_s=WINDOW_S, allowed_lateness_s=LATENESS_S, closed_retention_s=600.0)
DEMAND = DemandSettings(allowed_lateness_s=LATENESS_S)
CLOCK_THRESHOLD = 1_000_000
OUTPUT_TIMEOUT_S = 90.0


# ------------------------------------------------------------------------------------------------- the worker


def run_worker_process(prefix: str, data_dir: str) -> None:
    from streams.agents import demand, groups, training
    from streams.app import AgentContext, create_app, run_worker
    from streams.records import DeadLetter
    from streams.settings import StreamSettings

    settings = StreamSettings.from_env(topic_prefix=prefix, partitions=PARTITIONS, data_dir=Path(data_dir))

    async def no_features(rows: list[dict[str, Any]]) -> None:
        raise AssertionError("the preference agent does not run in this worker")

    stream_app = create_app(settings, feature_sink=no_features, agent_modules=())

    async def send_dead_letter(key: bytes, letter: DeadLetter) -> None:
        await stream_app.topics.dead_letters.send(key=key, value=letter.to_bytes())

    context = AgentContext(stream_app.app, stream_app.topics, settings, send_dead_letter, no_features)
    groups.register(context, GROUPING)
    demand.register(context, DEMAND)
    training.register(context, training.TrainingTriggerSettings(samples_per_request=10, max_wait_s=5.0))
    run_worker(stream_app, loglevel="warning")


class Worker:
    def __init__(self, prefix: str, data_dir: Path, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), prefix, str(data_dir)],
            cwd=REPO_ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


# ------------------------------------------------------------------------------------------------- traffic


def make_log(seed: int, impressions: int, base_ts: float) -> list[AnyEvent]:
    """Designs with thresholds, impressions over ~200 s of event time, and follow-ups by the same user."""
    rng = random.Random(seed)
    designs = [f"design-{index}" for index in range(6)]
    log: list[AnyEvent] = [
        DesignCreated(event_id=f"create-{d}", ts=base_ts, user_id=f"merchant-{i}", design_id=d, prompt="a shirt",
                      order_threshold=rng.randint(2, 6))
        for i, d in enumerate(designs)
    ]  # fmt: skip
    for index in range(impressions):
        user, design_id, ts = f"user-{rng.randrange(25)}", rng.choice(designs), base_ts + 1 + index * 200 / impressions
        impression_id = f"imp-{index}"
        log.append(
            Impression(event_id=impression_id, ts=ts, user_id=user, design_id=design_id, prompt="a shirt",
                       model_version="v1",
                       candidates=[Candidate(image_id=f"{impression_id}-{k}", position=k,
                                             descriptor=[0.25] * DESCRIPTOR_DIM) for k in range(4)])
        )  # fmt: skip
        common = {"user_id": user, "impression_id": impression_id, "design_id": design_id}
        for step in range(rng.randint(0, 3)):
            at, image = ts + rng.uniform(0.0, WINDOW_S * 1.1), f"{impression_id}-{rng.randrange(4)}"
            event_id = f"{impression_id}-{step}"
            roll = rng.random()
            if roll < 0.5:
                log.append(Click(event_id=event_id, ts=at, image_id=image, **common))
            elif roll < 0.6:
                log.append(Select(event_id=event_id, ts=at, image_ids=[image], **common))
            else:
                placed = Order(event_id=event_id, ts=at, image_id=image, quantity=1, **common)
                log.append(placed)
                if rng.random() < 0.3:
                    log.append(Return(event_id=f"{event_id}-r", ts=at + rng.uniform(0.0, 10.0), order_id=event_id,
                                      image_id=image, quantity=1, **common))  # fmt: skip
    return sorted(log, key=lambda event: event.ts)


def twice_and_reordered(rng: random.Random, log: list[AnyEvent]) -> list[AnyEvent]:
    """Every event twice, arrival order shuffled by less than the lateness (never behind the watermark)."""
    keyed = [(event.ts + rng.uniform(0.0, LATENESS_S * 0.9), n, event) for n, event in enumerate(log + log)]
    return [event for _, _, event in sorted(keyed)]


def clock_events(after_ts: float) -> list[tuple[int, DesignCreated]]:
    """One DesignCreated per events partition, stamped past every window, whose design ids cover every partition
    of the demand topic: they move every watermark without adding demand."""
    from aiokafka.partitioner import murmur2

    by_partition: dict[int, str] = {}
    index = 0
    while len(by_partition) < PARTITIONS:
        design_id = f"clock-{index}"
        by_partition.setdefault((murmur2(design_id.encode()) & 0x7FFFFFFF) % PARTITIONS, design_id)
        index += 1
    ts = after_ts + WINDOW_S + LATENESS_S + 5.0
    return [
        (partition, DesignCreated(event_id=f"clock-event-{design_id}", ts=ts, user_id="clock", design_id=design_id,
                                  prompt="clock", order_threshold=CLOCK_THRESHOLD))
        for partition, design_id in sorted(by_partition.items())
    ]  # fmt: skip


def produce(bootstrap: str, topic: str, events: list[AnyEvent], clocks: list[tuple[int, DesignCreated]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for event in events:
            producer.send(topic, key=event.user_id.encode(), value=event.to_bytes())
        producer.flush()
        for partition, clock in clocks:
            producer.send(topic, key=clock.user_id.encode(), value=clock.to_bytes(), partition=partition)
        producer.flush()
    finally:
        producer.close()


def read_topic(bootstrap: str, topic: str, until: Any, timeout_s: float = OUTPUT_TIMEOUT_S) -> list[tuple[str, dict]]:
    """Every (key, value) on ``topic`` from the beginning, polled until ``until(messages)`` or the timeout."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    messages: list[tuple[str, dict]] = []
    try:
        deadline = time.monotonic() + timeout_s
        partitions: set[int] | None = None
        while time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions:
                break
            time.sleep(0.5)
        if not partitions:
            return messages
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        consumer.seek_to_beginning()
        while time.monotonic() < deadline and not until(messages):
            for records in consumer.poll(timeout_ms=500).values():
                messages.extend((record.key.decode(), json.loads(record.value)) for record in records)
        return messages
    finally:
        consumer.close()


def read_results(bootstrap: str, names: TopicNames, prefix: str, impressions: int, designs: int) -> dict[str, Any]:
    samples = read_topic(bootstrap, names.group_samples, lambda m: len({k for k, _ in m}) >= impressions)
    drops = read_topic(bootstrap, prefix + GROUP_DROPS, lambda m: False, timeout_s=3.0) if samples else []
    orders = read_topic(bootstrap, names.production_orders, lambda m: len({k for k, _ in m}) >= designs, 30.0)
    return {"samples": samples, "drops": drops, "orders": orders}


def by_key(messages: list[tuple[str, dict]]) -> dict[str, dict]:
    result: dict[str, dict] = {}
    for key, value in messages:
        assert result.setdefault(key, value) == value, f"two different records under key {key}"
    return result


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()
    for worker in started:
        if worker.process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            print(worker.log_path.read_text()[-4000:])


def start_worker(workers: list[Worker], prefix: str, tmp_path: Path, name: str) -> Worker:
    worker = Worker(prefix, tmp_path / name, tmp_path / f"{name}.log")
    workers.append(worker)
    return worker


def expected_results(log: list[AnyEvent]) -> tuple[dict[str, dict], dict[str, dict]]:
    samples = {key: json.loads(s.to_bytes()) for key, s in batch_group_outputs(log, GROUPING).items()}
    orders = {key: json.loads(o.to_bytes()) for key, o in batch_production_orders(log, DEMAND).items()}
    return samples, orders


# ------------------------------------------------------------------------------------------------- tests


def test_duplicated_reordered_stream_gives_the_batch_results_and_conserves_impressions(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, workers: list[Worker]
) -> None:
    base_ts = time.time() - 1000.0
    log = make_log(seed=1, impressions=120, base_ts=base_ts)
    late = make_log(seed=2, impressions=3, base_ts=base_ts)[-3:]  # impressions older than the watermark at the end
    late = [event for event in late if isinstance(event, Impression)]
    late = [event.model_copy(update={"event_id": f"late-{event.event_id}"}) for event in late]
    names = TopicNames.for_prefix(topic_prefix)
    start_worker(workers, topic_prefix, tmp_path, "w1")
    arrivals = twice_and_reordered(random.Random(3), log)
    produce(kafka_bootstrap, names.events, arrivals, [])
    produce(kafka_bootstrap, names.events, late, clock_events(max(event.ts for event in log)))
    expected_samples, expected_orders = expected_results(log)
    results = read_results(kafka_bootstrap, names, topic_prefix, len(expected_samples), len(expected_orders))
    samples, drops = by_key(results["samples"]), by_key(results["drops"])
    # Conservation: every impression is one sample or one counted drop, never both.
    assert set(samples) | set(drops) == {e.event_id for e in [*log, *late] if isinstance(e, Impression)}
    assert not set(samples) & set(drops)
    assert {drop["reason"] for drop in drops.values()} <= {"late_impression"}
    assert samples == expected_samples
    assert by_key(results["orders"]) == expected_orders


def test_sigkill_mid_stream_loses_nothing_and_fires_no_design_twice(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, workers: list[Worker]
) -> None:
    base_ts = time.time() - 1000.0
    log = make_log(seed=4, impressions=120, base_ts=base_ts)
    names = TopicNames.for_prefix(topic_prefix)
    first = start_worker(workers, topic_prefix, tmp_path, "w1")
    arrivals = twice_and_reordered(random.Random(5), log)
    half = len(arrivals) // 2
    produce(kafka_bootstrap, names.events, arrivals[:half], [])
    read_topic(kafka_bootstrap, names.group_samples, lambda m: len(m) >= 5)  # mid-stream: some outputs exist
    first.kill()
    start_worker(workers, topic_prefix, tmp_path, "w1")  # same data dir, state from the changelogs
    produce(kafka_bootstrap, names.events, arrivals[half:], clock_events(max(event.ts for event in log)))
    expected_samples, expected_orders = expected_results(log)
    results = read_results(kafka_bootstrap, names, topic_prefix, len(expected_samples), len(expected_orders))
    assert by_key(results["samples"]) == expected_samples
    orders = by_key(results["orders"])
    assert orders == expected_orders
    # A crash may repeat a production order's message, under the same key with the same content (checked by
    # by_key); the distinct keys are exactly the designs fired.
    assert len({key for key, _ in results["orders"]}) == len(expected_orders)


def test_two_workers_in_one_group_share_partitions_and_produce_the_same_results(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, workers: list[Worker]
) -> None:
    base_ts = time.time() - 1000.0
    log = make_log(seed=6, impressions=120, base_ts=base_ts)
    names = TopicNames.for_prefix(topic_prefix)
    start_worker(workers, topic_prefix, tmp_path, "w1")
    start_worker(workers, topic_prefix, tmp_path, "w2")
    time.sleep(10.0)  # let both join the group before traffic starts
    produce(kafka_bootstrap, names.events, twice_and_reordered(random.Random(7), log), clock_events(log[-1].ts))
    expected_samples, expected_orders = expected_results(log)
    results = read_results(kafka_bootstrap, names, topic_prefix, len(expected_samples), len(expected_orders))
    assert by_key(results["samples"]) == expected_samples
    assert by_key(results["orders"]) == expected_orders
    assert all(worker.process.poll() is None for worker in workers), "a worker died"


if __name__ == "__main__":
    run_worker_process(sys.argv[1], sys.argv[2])
