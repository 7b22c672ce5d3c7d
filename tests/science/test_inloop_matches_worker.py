"""The in-process loop (simulator.science.inloop) against `perfusion worker` on the real broker: one simulated event
log through both gives the same group samples, and every viewer the same user vector u.

The worker runs with its default settings and the in-process loop with the same ones (both from the environment),
so the comparison holds for the configuration the loop runs with. The worker closes a group once its partition's
watermark passes the impression's window; one clock event per partition, stamped past every window, closes the last
ones. The worker has folded and pushed everything once its consumer group's committed offsets reach the end of the
events topic: it acknowledges a micro-batch only after its Feast push and its group samples were taken.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from perfusion.contracts.records import AnyEvent, DesignCreated, GroupSample
from perfusion.contracts.topics import TopicNames, ensure_topics
from perfusion.user_features import USER_VECTOR_SLICES, push_sign_up_profiles, user_vector
from simulator.science.inloop import InProcessLoop
from simulator.traffic import TrafficConfig, TrafficSimulator, encode, produce_events
from streams.settings import StreamSettings

if TYPE_CHECKING:
    from harness.processes import SupervisedProcess

EVENTS = 300
KINDS = ("design", "impression", "click", "order", "return", "select")
COLD_SHOPPER = "shopper-cold"  # a profile, no events: u from the profile alone
UNKNOWN_VIEWER = "nobody"  # neither a profile nor events: the cold u
WAIT_S = 180.0  # from the first event sent; the worker takes from seconds to a minute to start
PARTS = 3  # the log is sent in this many parts


def traffic(start_ts: float) -> tuple[TrafficSimulator, list[AnyEvent]]:
    simulator = TrafficSimulator(TrafficConfig(seed=2, shoppers=4, merchants=2, designs=4, start_ts=start_ts))
    return simulator, simulator.events(EVENTS)


def profiles_of(simulator: TrafficSimulator) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Every shopper's user_profile (and the cold shopper's), every merchant's store region."""
    shoppers = [user.user_id for user in simulator.shoppers] + [COLD_SHOPPER]
    profiles = {user: {"age_group": index % 5, "region": index % 4} for index, user in enumerate(shoppers)}
    store_regions = {merchant.user_id: (index + 1) % 4 for index, merchant in enumerate(simulator.merchants)}
    return profiles, store_regions


def clock_events(after_ts: float, settings: StreamSettings) -> list[DesignCreated]:
    """One DesignCreated per events partition, stamped past every window, each by a user whose key lands on that
    partition (the producer's murmur2 partitioner): they move every partition's watermark past every group."""
    from kafka.partitioner.default import murmur2

    users: dict[int, str] = {}
    index = 0
    while len(users) < settings.partitions:
        user = f"clock-{index}"
        users.setdefault((murmur2(user.encode()) & 0x7FFFFFFF) % settings.partitions, user)
        index += 1
    ts = after_ts + settings.group.window_s + settings.group.allowed_lateness_s + 5.0
    return [
        DesignCreated(event_id=f"clock-event-{user}", ts=ts, user_id=user, design_id=f"clock-design-{user}",
                      prompt="clock", order_threshold=1_000_000)
        for _, user in sorted(users.items())
    ]  # fmt: skip


def wait_until_committed(bootstrap: str, group_id: str, topic: str, deadline: float, worker: SupervisedProcess) -> None:
    """Until the consumer group's committed offsets reach the end of every partition of ``topic``."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = consumer.end_offsets(partitions)
        committed: dict[Any, Any] = {}
        while time.monotonic() < deadline:
            assert worker.process.poll() is None, f"the worker exited:\n{worker.log_tail()}"
            try:
                committed = admin.list_group_offsets(group_id).get(group_id, {})
            except KafkaError:  # the group's coordinator is not elected before the worker first asks for it
                committed = {}
            if all(ends[p] == 0 or (p in committed and committed[p].offset >= ends[p]) for p in partitions):
                return
            time.sleep(1.0)
        progress = {p.partition: (committed[p].offset if p in committed else None, ends[p]) for p in partitions}
        raise AssertionError(
            f"the worker did not commit the events topic's end within {WAIT_S:.0f} s (partition: (committed, end)"
            f" {progress}); its log ends with:\n{worker.log_tail()}"
        )
    finally:
        admin.close()
        consumer.close()


def read_outputs(
    bootstrap: str, names: TopicNames, expected: set[str], deadline: float
) -> tuple[dict[str, GroupSample], list[bytes]]:
    """The group samples by sample_id (one record per id, or repeats with the same content) and the raw group drops,
    from the beginning, read until every ``expected`` sample is in or the deadline."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    samples: dict[str, GroupSample] = {}
    drops: list[bytes] = []
    try:
        topics = (names.group_samples, names.group_drops)
        consumer.assign([TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())])
        consumer.seek_to_beginning()
        while time.monotonic() < deadline and not expected <= set(samples):
            for partition, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    if partition.topic == names.group_drops:
                        drops.append(record.value)
                        continue
                    sample = GroupSample.model_validate_json(record.value)
                    earlier = samples.setdefault(sample.sample_id, sample)
                    assert earlier == sample, f"two different samples under {sample.sample_id}"
        return samples, drops
    finally:
        consumer.close()


def graded(sample: GroupSample) -> tuple[Any, ...]:
    """What a sample says: who saw which design's candidates in which slots, and how each was graded."""
    candidates = tuple((c.image_id, c.position, c.grade) for c in sample.candidates)
    return sample.sample_id, sample.user_id, sample.design_id, sample.prompt, candidates


def vector_difference(worker: np.ndarray, inloop: np.ndarray) -> str:
    return ", ".join(
        f"{name}: worker {worker[block].tolist()} in-loop {inloop[block].tolist()}"
        for name, block in USER_VECTOR_SLICES.items()
        if not np.allclose(worker[block], inloop[block], atol=1e-6)
    )


def test_one_event_log_gives_the_workers_samples_and_user_vectors_in_process(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.loop import LoopPlace, cli_arguments, loop_process
    from perfusion.feature_store import apply_feature_repo, open_feature_store
    from service.features import FeastFeatureReader

    state_dir, feast_dir = tmp_path / "state", tmp_path / "state" / "feast"
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(state_dir))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(feast_dir))
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "sqlite")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("PERFUSION_TOPIC_PREFIX", topic_prefix)
    settings = StreamSettings.from_env()  # what the worker reads from the same environment
    names = TopicNames.for_prefix(settings.topic_prefix)

    start_ts = time.time() - 3 * 3600
    simulator, log = traffic(start_ts)
    kinds: Counter[str] = Counter(event.kind for event in log)
    assert all(kinds[kind] >= 1 for kind in KINDS), f"the log lacks a kind of event: {dict(kinds)}"
    clocks = clock_events(max(event.ts for event in log), settings)
    assert max(clock.ts for clock in clocks) < time.time(), "a clock event in the future would be dead-lettered"
    profiles, store_regions = profiles_of(simulator)

    inloop = InProcessLoop(profiles, store_regions, stream_settings=settings, grouping_settings=settings.group)
    inloop.apply([*log, *clocks])

    apply_feature_repo()
    push_sign_up_profiles(profiles, store_regions, start_ts - 86_400.0)
    ensure_topics(kafka_bootstrap, names, settings.partitions)
    place = LoopPlace(
        kafka_bootstrap, state_dir=state_dir, topic_prefix=topic_prefix, feast_dir=feast_dir, online_store="sqlite"
    )
    arguments = cli_arguments("worker", "--loglevel", "warning")
    with loop_process(place, "worker", arguments, tmp_path, stop_grace_s=30.0) as worker:
        deadline = time.monotonic() + WAIT_S
        # In parts, each folded before the next is sent: a viewer's state and the impressions' descriptors carry
        # over between micro-batches through the worker's tables. The clocks come last on every partition.
        parts: list[list[AnyEvent]] = [log[len(log) * n // PARTS : len(log) * (n + 1) // PARTS] for n in range(PARTS)]
        parts.append([*clocks])
        for events in parts:
            assert produce_events([encode(event) for event in events], kafka_bootstrap, names.events) == len(events)
            wait_until_committed(kafka_bootstrap, settings.group_id, names.events, deadline, worker)
        expected = {sample.sample_id: sample for sample in inloop.group_samples()}
        samples, drops = read_outputs(kafka_bootstrap, names, set(expected), deadline)
        reader = FeastFeatureReader(open_feature_store())
        viewers = sorted({event.user_id for event in log} | set(profiles) | {UNKNOWN_VIEWER})
        served = {viewer: reader.read(viewer) for viewer in viewers}

    # Every impression is one graded sample, none a drop, and both paths grade them alike.
    assert len(expected) == kinds["impression"]
    assert drops == []
    assert {graded(sample) for sample in samples.values()} == {graded(sample) for sample in expected.values()}
    assert samples == expected  # the rest too: model version, impression time, descriptors

    # Every viewer's u from what Feast serves after the worker's pushes equals the in-process one.
    vectors = {viewer: user_vector(features) for viewer, features in served.items()}
    for viewer in viewers:
        expected_u = inloop.user_vector(viewer)
        assert np.allclose(vectors[viewer], expected_u, atol=1e-6), (
            f"u of {viewer} differs: {vector_difference(vectors[viewer], expected_u)}"
        )
    # The comparison covers every kind of viewer: shoppers and merchants with behaviour, a profile only, nothing.
    present = {viewer: tuple(vector[USER_VECTOR_SLICES["present"]]) for viewer, vector in vectors.items()}
    assert {present[user.user_id] for user in simulator.shoppers} == {(1.0, 1.0, 0.0)}
    assert {present[user.user_id] for user in simulator.merchants} == {(1.0, 0.0, 1.0)}
    assert present[COLD_SHOPPER] == (0.0, 1.0, 0.0)
    assert present[UNKNOWN_VIEWER] == (0.0, 0.0, 0.0)
    assert len({vectors[user.user_id].tobytes() for user in simulator.shoppers}) == len(simulator.shoppers)
