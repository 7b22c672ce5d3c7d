"""All four agents against the real broker, run as `perfusion worker` subprocesses with short windows.

The worker gets its attribution window, lateness and training trigger from `perfusion worker` flags, its broker and
topic prefix from the environment, and a Feast repo applied once per module in a temporary folder (the preference
agent pushes there; these tests read group samples, drops, production orders and train requests from Kafka).

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from harness.loop import LoopPlace, cli_arguments
from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import (
    AnyEvent,
    Candidate,
    Click,
    DesignCreated,
    Impression,
    Order,
    Return,
    Select,
)
from perfusion.contracts.topics import TopicNames
from perfusion.settings import KafkaSecuritySettings
from streams.demand import DemandSettings, batch_production_orders
from streams.grouping import GroupingSettings, batch_group_outputs
from streams.settings import StreamSettings
from streams.training_trigger import TrainingTriggerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
WINDOW_S = 20.0
LATENESS_S = 5.0
SAMPLES_PER_REQUEST = 10
SETTINGS = StreamSettings(
    partitions=PARTITIONS,
    session_timeout_s=10.0,
    group=GroupingSettings(window_s=WINDOW_S, allowed_lateness_s=LATENESS_S, closed_retention_s=600.0),
    demand=DemandSettings(allowed_lateness_s=LATENESS_S),
    train=TrainingTriggerSettings(samples_per_request=SAMPLES_PER_REQUEST, max_wait_s=2.0, tick_s=0.5),
)
WORKER_FLAGS = [
    f"--{'-'.join(path).replace('_', '-')}={value}"
    for path, value in (
        (("partitions",), SETTINGS.partitions),
        (("session_timeout_s",), SETTINGS.session_timeout_s),
        *((("group", name), getattr(SETTINGS.group, name)) for name in ("window_s", "allowed_lateness_s",
                                                                         "closed_retention_s")),
        (("demand", "allowed_lateness_s"), SETTINGS.demand.allowed_lateness_s),
        *((("train", name), getattr(SETTINGS.train, name)) for name in ("samples_per_request", "max_wait_s", "tick_s")),
    )
]  # fmt: skip
IMPRESSIONS = 80
CLOCK_THRESHOLD = 1_000_000
OUTPUT_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------------------------- the worker


@pytest.fixture(scope="module")
def feast_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Feast repo applied once for the module's workers (their preference agent pushes to it)."""
    from perfusion.feature_store import apply_feature_repo

    path = tmp_path_factory.mktemp("feast")
    saved = {name: os.environ.get(name) for name in ("PERFUSION_FEAST_DIR", "PERFUSION_ONLINE_STORE")}
    os.environ["PERFUSION_FEAST_DIR"] = str(path)
    os.environ["PERFUSION_ONLINE_STORE"] = "sqlite"
    try:
        apply_feature_repo()
        yield path
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Worker:
    """`python -m ops worker` in a subprocess, with its own state folder (Faust data) and log."""

    def __init__(
        self, bootstrap: str, prefix: str, feast_dir: Path, state_dir: Path, log_path: Path, flags: Sequence[str] = ()
    ) -> None:
        self.log_path = log_path
        place = LoopPlace(
            bootstrap, state_dir=state_dir, topic_prefix=prefix, feast_dir=feast_dir, online_store="sqlite"
        )
        arguments = cli_arguments("worker", *WORKER_FLAGS, "--loglevel", "warning", *flags)
        self.process = subprocess.Popen(
            [sys.executable, *arguments], cwd=REPO_ROOT, env=place.environment(), stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.terminate()
        try:
            self.process.wait(timeout=timeout_s)
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


def produce(
    bootstrap: str,
    topic: str,
    events: list[AnyEvent],
    clocks: list[tuple[int, DesignCreated]],
    security: KafkaSecuritySettings | None = None,
) -> None:
    from kafka import KafkaProducer

    from perfusion.kafka_security import kafka_python_kwargs

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **kafka_python_kwargs(security))
    try:
        for event in events:
            producer.send(topic, key=event.user_id.encode(), value=event.to_bytes())
        producer.flush()
        for partition, clock in clocks:
            producer.send(topic, key=clock.user_id.encode(), value=clock.to_bytes(), partition=partition)
        producer.flush()
    finally:
        producer.close()


def produce_raw(bootstrap: str, topic: str, value: bytes) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        producer.send(topic, key=b"broken", value=value).get(timeout=30)
    finally:
        producer.close()


def read_outputs(
    bootstrap: str, names: TopicNames, done: Callable[[dict[str, list[tuple[str, dict]]]], bool]
) -> dict[str, list[tuple[str, dict]]]:
    """Every (key, value) of the four output topics from the beginning, polled until ``done`` or the timeout."""
    from kafka import KafkaConsumer, TopicPartition

    topics = {
        names.group_samples: "samples",
        names.group_drops: "drops",
        names.production_orders: "orders",
        names.train_requests: "requests",
    }
    outputs: dict[str, list[tuple[str, dict]]] = {kind: [] for kind in topics.values()}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, p) for topic in topics for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + OUTPUT_TIMEOUT_S
        while time.monotonic() < deadline and not done(outputs):
            for partition, records in consumer.poll(timeout_ms=500).items():
                outputs[topics[partition.topic]].extend((r.key.decode(), json.loads(r.value)) for r in records)
        return outputs
    finally:
        consumer.close()


def complete(
    samples: dict[str, dict], drops: set[str], orders: dict[str, dict], with_requests: bool
) -> Callable[[dict[str, list[tuple[str, dict]]]], bool]:
    """True once every expected key is out (and, with ``with_requests``, every sample is in a TrainRequest)."""

    def keys(messages: list[tuple[str, dict]]) -> set[str]:
        return {key for key, _ in messages}

    def done(outputs: dict[str, list[tuple[str, dict]]]) -> bool:
        if keys(outputs["samples"]) < set(samples) or keys(outputs["drops"]) < drops:
            return False
        if keys(outputs["orders"]) < set(orders):
            return False
        return not with_requests or requested_samples(outputs["requests"]) >= len(samples)

    return done


def requested_samples(requests: list[tuple[str, dict]]) -> int:
    return sum(request["new_samples"] for request in dict(requests).values())


def by_key(messages: list[tuple[str, dict]]) -> dict[str, dict]:
    result: dict[str, dict] = {}
    for key, value in messages:
        assert result.setdefault(key, value) == value, f"two different records under key {key}"
    return result


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:  # all at once: a worker stopping alone waits for its group to rebalance
        worker.terminate()
    for worker in started:
        worker.stop(timeout_s=15.0)
    for worker in started:
        if worker.process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            print(worker.log_path.read_text(errors="replace")[-4000:])


def start_worker(
    workers: list[Worker],
    bootstrap: str,
    prefix: str,
    feast_dir: Path,
    tmp_path: Path,
    name: str,
    flags: Sequence[str] = (),
) -> Worker:
    worker = Worker(bootstrap, prefix, feast_dir, tmp_path / name, tmp_path / f"{name}.log", flags)
    workers.append(worker)
    return worker


def create_topics(bootstrap: str, prefix: str) -> TopicNames:
    """The loop's topics, created before anything produces (a producer would auto-create one partition)."""
    from perfusion.contracts.topics import ensure_topics

    names = TopicNames.for_prefix(prefix)
    ensure_topics(bootstrap, names, PARTITIONS)
    return names


def expected_results(log: list[AnyEvent]) -> tuple[dict[str, dict], dict[str, dict]]:
    samples = {key: json.loads(s.to_bytes()) for key, s in batch_group_outputs(log, SETTINGS.group).items()}
    orders = {key: json.loads(o.to_bytes()) for key, o in batch_production_orders(log, SETTINGS.demand).items()}
    return samples, orders


def wait_for_members(bootstrap: str, group_id: str, members: int, workers: list[Worker]) -> None:
    """Wait until the consumer group has ``members`` members (every worker joined and got partitions)."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + OUTPUT_TIMEOUT_S
        while time.monotonic() < deadline:
            assert all(worker.process.poll() is None for worker in workers), "a worker exited while joining"
            try:
                description = admin.describe_groups([group_id]).get(group_id, {})
            except KafkaError:  # the group's coordinator is not elected before the first member asks for it
                description = {}
            if description.get("group_state") == "Stable" and len(description.get("members", [])) >= members:
                return
            time.sleep(0.5)
        raise AssertionError(f"the consumer group {group_id} never had {members} stable members")
    finally:
        admin.close()


# ------------------------------------------------------------------------------------------------- tests


def test_duplicated_reordered_stream_gives_the_batch_results_conserves_impressions_and_requests_training(
    kafka_bootstrap: str, topic_prefix: str, feast_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    base_ts = time.time() - 1000.0
    log = make_log(seed=1, impressions=IMPRESSIONS, base_ts=base_ts)
    late = make_log(seed=2, impressions=3, base_ts=base_ts)[-3:]  # impressions older than the watermark at the end
    late = [event for event in late if isinstance(event, Impression)]
    late = [event.model_copy(update={"event_id": f"late-{event.event_id}"}) for event in late]
    names = create_topics(kafka_bootstrap, topic_prefix)
    start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1")
    arrivals = twice_and_reordered(random.Random(3), log)
    produce(kafka_bootstrap, names.events, arrivals, [])
    produce(kafka_bootstrap, names.events, late, clock_events(max(event.ts for event in log)))
    expected_samples, expected_orders = expected_results(log)
    late_ids = {event.event_id for event in late}
    outputs = read_outputs(
        kafka_bootstrap, names, complete(expected_samples, late_ids, expected_orders, with_requests=True)
    )
    samples, drops = by_key(outputs["samples"]), by_key(outputs["drops"])
    # Conservation: every impression is one sample or one counted drop, never both.
    assert set(samples) | set(drops) == {e.event_id for e in [*log, *late] if isinstance(e, Impression)}
    assert not set(samples) & set(drops)
    assert {drop["reason"] for drop in drops.values()} <= {"late_impression"}
    assert samples == expected_samples
    assert by_key(outputs["orders"]) == expected_orders
    # Training: every sample counted in exactly one TrainRequest of its model version, numbered 1, 2, ...
    requests = by_key(outputs["requests"])
    assert requested_samples(outputs["requests"]) == len(expected_samples)
    assert sorted(requests) == [f"v1-{n:06d}" for n in range(1, len(requests) + 1)]
    assert all(r["new_samples"] == SAMPLES_PER_REQUEST for r in requests.values() if r["reason"] == "count")


def test_sigkill_mid_stream_loses_nothing_and_fires_no_design_twice(
    kafka_bootstrap: str, topic_prefix: str, feast_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    base_ts = time.time() - 1000.0
    log = make_log(seed=4, impressions=IMPRESSIONS, base_ts=base_ts)
    names = create_topics(kafka_bootstrap, topic_prefix)
    first = start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1")
    arrivals = twice_and_reordered(random.Random(5), log)
    half = len(arrivals) // 2
    produce(kafka_bootstrap, names.events, arrivals[:half], [])
    read_outputs(kafka_bootstrap, names, lambda outputs: len(outputs["samples"]) >= 5)  # mid-stream: some outputs
    first.kill()
    start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1")  # state from the changelogs
    produce(kafka_bootstrap, names.events, arrivals[half:], clock_events(max(event.ts for event in log)))
    expected_samples, expected_orders = expected_results(log)
    outputs = read_outputs(
        kafka_bootstrap, names, complete(expected_samples, set(), expected_orders, with_requests=False)
    )
    assert by_key(outputs["samples"]) == expected_samples
    assert by_key(outputs["orders"]) == expected_orders
    # A crash may repeat a production order's message, under the same key with the same content (checked by
    # by_key); the distinct keys are exactly the designs fired.
    assert len({key for key, _ in outputs["orders"]}) == len(expected_orders)


def test_two_workers_in_one_group_share_partitions_and_produce_the_same_results(
    kafka_bootstrap: str, topic_prefix: str, feast_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    base_ts = time.time() - 1000.0
    log = make_log(seed=6, impressions=IMPRESSIONS, base_ts=base_ts)
    names = create_topics(kafka_bootstrap, topic_prefix)
    start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1")
    start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w2")
    wait_for_members(kafka_bootstrap, StreamSettings(topic_prefix=topic_prefix).group_id, 2, workers)
    produce(kafka_bootstrap, names.events, twice_and_reordered(random.Random(7), log), clock_events(log[-1].ts))
    expected_samples, expected_orders = expected_results(log)
    outputs = read_outputs(
        kafka_bootstrap, names, complete(expected_samples, set(), expected_orders, with_requests=False)
    )
    assert by_key(outputs["samples"]) == expected_samples
    assert by_key(outputs["orders"]) == expected_orders
    assert all(worker.process.poll() is None for worker in workers), "a worker died"
