"""The trainer against the real broker and a real Feast store: group samples and a train request in, a published
version with its manifest and a ModelUpdated event out; offsets committed only after the publish; replays and a
crash between publish and commit neither lose nor double-train samples."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from perfusion.attributes import COLOURS, Attributes
from perfusion.checkpoints import ModelStore, save_component
from perfusion.contracts.records import GradedCandidate, GroupSample, ModelUpdated, TrainRequest
from perfusion.contracts.topics import TopicNames, ensure_topics
from perfusion.image_store import catalog_image_id
from perfusion.models.base import build_unet, unet_component_config
from perfusion.models.reward import PerFusionRM, RewardModelConfig
from perfusion.text_encoder import TextEncoder
from perfusion.user_features import USER_VECTOR_SLICES
from tests import fixtures
from trainer.gate import belongs_to_heldout
from trainer.loop import Trainer, build_trainer
from trainer.reward_pretrain import save_reward_towers
from trainer.settings import TrainerSettings

TINY_BASE = fixtures.TINY_BASE.with_overrides(sample_size=16)
IMPRESSION_TS = 1_750_000_000.0
FEATURED_USER = "shopper-featured"
HELDOUT_FRACTION = 0.3


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder(max_length=TINY_BASE.text_max_length)


@pytest.fixture
def trainer_settings(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TrainerSettings]:
    import torch

    from perfusion.feature_store import apply_feature_repo

    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "state" / "feast"))
    monkeypatch.setenv("PERFUSION_ONLINE_STORE", "sqlite")
    monkeypatch.setenv("FEAST_USAGE", "False")
    apply_feature_repo()
    ensure_topics(kafka_bootstrap, TopicNames.for_prefix(topic_prefix), partitions=2)
    torch.manual_seed(0)
    unet = build_unet(TINY_BASE)
    save_component(tmp_path / "base", "unet", unet, unet_component_config(TINY_BASE, unet, built=True))
    # Reward towers of the tiny base's image size, so that every new reward model loads them as in production.
    towers = PerFusionRM(RewardModelConfig(personalized=False, image_size=TINY_BASE.sample_size))
    save_reward_towers(tmp_path / "base", towers, {})
    yield TrainerSettings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        model_root=tmp_path / "models",
        base_checkpoint=tmp_path / "base",
        image_root=tmp_path / "images",
        reward_steps=3,
        diffusion_steps=2,
        groups_per_batch=4,
        heldout_fraction=HELDOUT_FRACTION,
        # The gate has its own tests; here every candidate must pass so that publish and commit are exercised.
        gate_tolerance=1.0,
        gate_generator_tolerance=1e6,
        gate_min_groups=1,
        poll_timeout_ms=200,
    )


def group_samples(count: int, start: int = 0) -> list[GroupSample]:
    colours = list(COLOURS)
    samples = []
    for index in range(start, start + count):
        candidates = []
        for position in range(3):
            attributes = Attributes(
                "t-shirt", colours[(index + position) % len(colours)], "plain", "short-sleeve", "slim"
            )
            candidates.append(
                GradedCandidate(
                    image_id=catalog_image_id(attributes, seed=index),
                    position=position,
                    descriptor=attributes.descriptor(),
                    grade=[1, 0, 0][position] if index % 2 else [0, 2, 0][position],
                )
            )
        samples.append(
            GroupSample(
                sample_id=f"impression-{index}",
                user_id=FEATURED_USER if index % 3 == 0 else f"shopper-{index}",
                design_id="design-1",
                prompt="a t-shirt",
                model_version="base",
                impression_ts=IMPRESSION_TS + index,
                candidates=candidates,
            )
        )
    return samples


def produce(settings: TrainerSettings, samples: list[GroupSample], request_id: str) -> None:
    from kafka import KafkaProducer

    names = TopicNames.for_prefix(settings.topic_prefix)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    try:
        for sample in samples:
            producer.send(names.group_samples, key=sample.sample_id.encode(), value=sample.to_bytes())
        request = TrainRequest(
            request_id=request_id, model_version="base", new_samples=len(samples), reason="count", ts=time.time()
        )
        producer.send(names.train_requests, key=request_id.encode(), value=request.to_bytes())
        producer.flush(timeout=30)
    finally:
        producer.close()


def push_features(preference: list[float], event_ts: float) -> None:
    from datetime import UTC, datetime

    from perfusion.feature_store import FeaturePusher

    counts = {
        f"{kind}_{window}": 3
        for kind in ("impressions", "clicks", "orders", "returns")
        for window in ("1h", "1d", "total")
    }
    row = {
        "user_id": FEATURED_USER,
        **counts,
        "images_shown_total": 12,
        "images_reviewed_total": 0,
        "images_selected_total": 0,
        "ctr": 0.5,
        "cvr": 0.25,
        "preference": preference,
        "last_active_ts": event_ts,
        "event_timestamp": datetime.fromtimestamp(event_ts, tz=UTC),
    }
    FeaturePusher.open().push_user_preferences([row])


def committed_and_end_offsets(settings: TrainerSettings) -> tuple[dict[str, int], dict[str, int]]:
    from kafka import KafkaConsumer, TopicPartition

    names = TopicNames.for_prefix(settings.topic_prefix)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=settings.group_id)
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in (names.group_samples, names.train_requests)
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        # An empty partition's offset needs no commit: None there means 0.
        committed = {f"{tp.topic}[{tp.partition}]": consumer.committed(tp) or 0 for tp in partitions}
        end = {f"{tp.topic}[{tp.partition}]": offset for tp, offset in consumer.end_offsets(partitions).items()}
        return committed, end
    finally:
        consumer.close()


def model_updates(settings: TrainerSettings) -> list[ModelUpdated]:
    from kafka import KafkaConsumer

    topic = TopicNames.for_prefix(settings.topic_prefix).model_updates
    consumer = KafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest")
    try:
        events: list[ModelUpdated] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                events.extend(ModelUpdated.model_validate_json(record.value) for record in records)
            if events:
                deadline = min(deadline, time.monotonic() + 1)
        return events
    finally:
        consumer.close()


def trained_ids(samples: list[GroupSample]) -> set[str]:
    return {s.sample_id for s in samples if not belongs_to_heldout(s.sample_id, HELDOUT_FRACTION)}


def test_trainer_publishes_a_version_announces_it_and_commits_after_publish(
    trainer_settings: TrainerSettings, text_encoder: TextEncoder
) -> None:
    settings = trainer_settings
    early_preference = [1.0] * 26
    push_features(early_preference, IMPRESSION_TS - 3600)
    push_features([0.0] * 26, IMPRESSION_TS + 3600)  # after every impression: must not leak into the samples
    samples = group_samples(10)
    assert 0 < len(trained_ids(samples)) < len(samples)
    produce(settings, samples, "request-1")

    trainer = build_trainer(settings, text_encoder=text_encoder)
    summary = trainer.run(once=True)

    store = ModelStore(settings.model_root)  # type: ignore[arg-type]
    assert len(summary.versions_published) == 1
    version = summary.versions_published[0]
    assert store.latest() == version and store.versions() == [version]
    manifest = store.verify(version)
    assert set(manifest["components"]) == {"reward_model", "adaptive_network"}
    assert manifest["trainer"] == settings.arm_description
    assert manifest["metrics"]["reward_model_steps"] == 3.0
    assert set(manifest["trained_sample_ids"]) == trained_ids(samples)
    names = TopicNames.for_prefix(settings.topic_prefix)
    assert sum(manifest["sample_offsets"][names.group_samples].values()) == len(samples)
    assert summary.samples_buffered + summary.heldout_buffered == len(samples)

    # Features as of impression time: the early push, not the later one; users without features get defaults.
    vectors = {
        entry.sample.user_id: entry.user_vector for entry in trainer.buffer.entries() + trainer.heldout.entries()
    }
    featured = vectors[FEATURED_USER]
    assert list(featured[USER_VECTOR_SLICES["preference"]]) == pytest.approx(early_preference)
    assert featured[USER_VECTOR_SLICES["present"]][0] == 1.0
    cold = next(vector for user, vector in vectors.items() if user != FEATURED_USER)
    assert cold[USER_VECTOR_SLICES["present"]][0] == 0.0

    announced = model_updates(settings)
    assert [event.version for event in announced] == [version]
    assert announced[0].path == str(store.path(version))

    committed, end = committed_and_end_offsets(settings)
    assert committed == end

    # The same samples replayed (a second delivery by the worker) with a new request: nothing is trained again.
    produce(settings, samples, "request-2")
    replay = build_trainer(settings, text_encoder=text_encoder).run(once=True)
    assert replay.versions_published == [] and replay.samples_buffered == 0
    assert replay.duplicates_skipped == len(trained_ids(samples))
    assert store.versions() == [version]
    committed, end = committed_and_end_offsets(settings)
    assert committed == end


def test_a_crash_between_publish_and_commit_neither_loses_nor_double_trains(
    trainer_settings: TrainerSettings, text_encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = trainer_settings
    first = group_samples(8)
    produce(settings, first, "request-1")

    def crash(self: Trainer, consumer: object) -> None:
        raise RuntimeError("killed after publish, before commit")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_commit", crash)
        with pytest.raises(RuntimeError, match="before commit"):
            build_trainer(settings, text_encoder=text_encoder).run(once=True)
    store = ModelStore(settings.model_root)  # type: ignore[arg-type]
    assert len(store.versions()) == 1
    committed, _ = committed_and_end_offsets(settings)
    assert set(committed.values()) == {0}

    # Restart: the manifest's offsets are ahead of the (absent) commit, so nothing is trained twice.
    restarted = build_trainer(settings, text_encoder=text_encoder).run(once=True)
    assert restarted.samples_buffered == 0 and restarted.versions_published == []
    committed, end = committed_and_end_offsets(settings)
    assert committed == end

    # New samples after the restart are trained into the next version, and only they count as new.
    second = group_samples(5, start=100)
    produce(settings, second, "request-2")
    resumed = build_trainer(settings, text_encoder=text_encoder).run(once=True)
    assert len(resumed.versions_published) == 1
    manifest = store.manifest(resumed.versions_published[0])
    assert manifest["new_samples"] == len(trained_ids(second))
    assert set(manifest["trained_sample_ids"]) == trained_ids(first) | trained_ids(second)
    assert manifest["parent_version"] == store.versions()[0]
