"""The trainer's Kafka side: consume group samples and training requests, update, gate, publish, then commit.

Delivery guarantees, in the order things happen:

1. The consumer (kafka-python, auto-commit off) is assigned every partition of ``perfusion.group-samples`` and
   ``perfusion.train-requests``. Each partition starts at the later of the group's committed offset and the offset
   recorded in the serving version's manifest (a crash between publish and commit leaves the manifest ahead).
2. A group sample is parsed, checked against the ids already trained (the buffer's dedupe window, restored from
   the manifest), given its user's Feast features as of its impression time and its pixels, and buffered; a
   hash of its id sends it to the held-out slice instead (never trained on; the gate's data).
3. An update runs on a TrainRequest (or, with ``once``, when the consumer has caught up), if new samples arrived.
   The candidate is gated; if it passes, :meth:`ModelStore.publish` writes the version with a manifest holding the
   metrics, the sample offsets it was trained to and the trained sample ids, switches LATEST atomically, and a
   ModelUpdated event goes to ``perfusion.model-updates``. Only then are the consumed offsets committed.

So a crash before the commit replays samples the manifest already covers: the restart seeks past them, and
their ids are refused anyway. Nothing is committed while buffered samples wait for a publish, so a crash then
re-reads them. Malformed records are logged with topic[partition]@offset and skipped (they come from our own
worker, which validates what it writes).
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from perfusion.contracts.records import GroupSample, ModelUpdated, TrainRequest
from perfusion.contracts.topics import TopicNames
from perfusion.errors import InfrastructureError, PerfusionError
from perfusion.feature_store import USER_VECTOR_SERVICE, merged_history
from perfusion.image_store import ImageStore, UnknownImage
from perfusion.kafka_security import kafka_python_kwargs
from perfusion.user_features import user_vector
from trainer.batches import GroupBatch, collate_groups
from trainer.gate import GateDecision, belongs_to_heldout, run_gate
from trainer.metrics import TrainerMetrics, serve_metrics
from trainer.replay_buffer import BufferedSample, ReplayBuffer
from trainer.reward_ranked import MixedGeneratorBatches
from trainer.settings import TrainerSettings
from trainer.updates import TrainingModels, UpdateReport, build_training_models, run_update

if TYPE_CHECKING:
    from feast import FeatureStore
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from perfusion.checkpoints import ModelStore
    from perfusion.text_encoder import TextEncoder

log = logging.getLogger(__name__)

MANIFEST_OFFSETS_KEY = "sample_offsets"
MANIFEST_TRAINED_IDS_KEY = "trained_sample_ids"


class TrainerError(PerfusionError):
    """The trainer cannot start with what it was given."""


class UserVectorSource(Protocol):
    def vectors(self, samples: Sequence[GroupSample]) -> list[NDArray[np.float32]]:
        """u of each sample's user as of its impression time, float32 [USER_DIM] each."""


class FeastUserVectors:
    """User vectors from Feast's offline store: the ``user_vector`` feature service, joined point in time at each
    sample's impression_ts."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def vectors(self, samples: Sequence[GroupSample]) -> list[NDArray[np.float32]]:
        import pandas as pd

        if not samples:
            return []
        # Feast's file offline store drops entity rows that repeat a (user, timestamp) pair, so each distinct
        # pair is asked for once and its row is shared by every sample that has it.
        keys = list(dict.fromkeys((sample.user_id, sample.impression_ts) for sample in samples))
        entity_df = pd.DataFrame(
            {
                "user_id": [user_id for user_id, _ in keys],
                "event_timestamp": [datetime.fromtimestamp(ts, tz=UTC) for _, ts in keys],
                "key_row": range(len(keys)),
            }
        )
        with merged_history(self.store):
            service = self.store.get_feature_service(USER_VECTOR_SERVICE)
            frame = self.store.get_historical_features(entity_df=entity_df, features=service).to_df()
        rows_by_key: dict[tuple[str, float], dict[str, Any]] = {}
        for row in frame.to_dict("records"):
            key = keys[int(row.pop("key_row"))]
            rows_by_key[key] = {name: _missing_to_none(value) for name, value in row.items()}
        if len(rows_by_key) != len(keys):
            log.warning(
                "Feast returned features for %d of %d (user, impression time) pairs; the others get cold-start "
                "defaults",
                len(rows_by_key),
                len(keys),
            )
        # A user without features at impression time (cold start) gets user_vector's neutral defaults.
        return [
            user_vector(rows_by_key.get((sample.user_id, sample.impression_ts), {}), as_of=sample.impression_ts)
            for sample in samples
        ]


def _missing_to_none(value: Any) -> Any:
    """Feast's missing values (NaN, pd.NA, NaT) as None; arrays and present values unchanged."""
    import pandas as pd

    if isinstance(value, list | tuple | np.ndarray):
        return value
    return None if pd.isna(value) else value


@dataclass
class LoopSummary:
    """What one run of the loop did."""

    samples_buffered: int = 0
    heldout_buffered: int = 0
    duplicates_skipped: int = 0
    malformed_skipped: int = 0
    train_requests: int = 0
    updates_run: int = 0
    versions_published: list[str] = field(default_factory=list)
    refusals: list[tuple[str, ...]] = field(default_factory=list)


class Trainer:
    """Holds the serving version in memory, the buffers and the Kafka clients of one trainer process."""

    def __init__(
        self,
        settings: TrainerSettings,
        serving: TrainingModels,
        serving_version: str | None,
        text_encoder: TextEncoder,
        model_store: ModelStore,
        user_vectors: UserVectorSource,
        image_store: ImageStore,
        manifest_extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.serving = serving
        self.serving_version = serving_version
        self.text_encoder = text_encoder
        self.model_store = model_store
        self.user_vectors = user_vectors
        self.image_store = image_store
        self.manifest_extra = dict(manifest_extra or {})
        self.topics = TopicNames.for_prefix(settings.topic_prefix)
        self.buffer = ReplayBuffer(settings.buffer_capacity, settings.recency_half_life, settings.dedupe_window)
        self.heldout = ReplayBuffer(settings.heldout_capacity, settings.recency_half_life, settings.dedupe_window)
        self.rng = random.Random(settings.seed)
        self.summary = LoopSummary()
        self.metrics = TrainerMetrics()
        self._pixels: OrderedDict[str, NDArray[np.uint8]] = OrderedDict()
        self._pixel_cache_size = (settings.buffer_capacity + settings.heldout_capacity) * 8
        self._consumed: dict[TopicPartition, int] = {}
        self._manifest_offsets: dict[tuple[str, int], int] = {}
        self._update_requested = False
        if serving_version is not None:
            self._restore_from_manifest(model_store.manifest(serving_version))
            self.metrics.set_model_version(serving_version)

    # ------------------------------------------------------------------------------------------ restore and state

    def _restore_from_manifest(self, manifest: Mapping[str, Any]) -> None:
        self.buffer.remember(manifest.get(MANIFEST_TRAINED_IDS_KEY, []))
        for topic, partitions in manifest.get(MANIFEST_OFFSETS_KEY, {}).items():
            for partition, offset in partitions.items():
                self._manifest_offsets[(topic, int(partition))] = int(offset)

    def _offsets_for_manifest(self) -> dict[str, dict[str, int]]:
        offsets: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in self._manifest_offsets.items():
            offsets.setdefault(topic, {})[str(partition)] = offset
        for tp, offset in self._consumed.items():
            offsets.setdefault(tp.topic, {})[str(tp.partition)] = offset
        return offsets

    # -------------------------------------------------------------------------------------------- ingesting

    def _pixels_of(self, image_id: str) -> NDArray[np.uint8]:
        if image_id in self._pixels:
            self._pixels.move_to_end(image_id)
            return self._pixels[image_id]
        pixels = self.image_store.get(image_id)
        self._pixels[image_id] = pixels
        while len(self._pixels) > self._pixel_cache_size:
            self._pixels.popitem(last=False)
        return pixels

    def ingest_samples(self, records: Sequence[tuple[str, int, int, bytes]]) -> int:
        """Buffer (topic, partition, offset, value) group-sample records; returns how many were new."""
        fresh: list[tuple[GroupSample, str, int, int]] = []
        fresh_ids: set[str] = set()
        for topic, partition, offset, value in records:
            try:
                sample = GroupSample.model_validate_json(value)
            except ValidationError as exc:
                self.summary.malformed_skipped += 1
                self.metrics.samples.labels(outcome="malformed").inc()
                log.warning("skipping malformed group sample at %s[%d]@%d: %s", topic, partition, offset, exc)
                continue
            target = (
                self.heldout if belongs_to_heldout(sample.sample_id, self.settings.heldout_fraction) else self.buffer
            )
            if target.has_seen(sample.sample_id) or sample.sample_id in fresh_ids:
                self.summary.duplicates_skipped += 1
                self.metrics.samples.labels(outcome="duplicate").inc()
                continue
            try:
                for candidate in sample.candidates:
                    self._pixels_of(candidate.image_id)
            except UnknownImage as exc:
                self.summary.malformed_skipped += 1
                self.metrics.samples.labels(outcome="malformed").inc()
                log.warning(
                    "skipping group sample %s at %s[%d]@%d: %s", sample.sample_id, topic, partition, offset, exc
                )
                continue
            fresh.append((sample, topic, partition, offset))
            fresh_ids.add(sample.sample_id)
        vectors = self.user_vectors.vectors([sample for sample, *_ in fresh])
        for (sample, topic, partition, offset), vector in zip(fresh, vectors, strict=True):
            if belongs_to_heldout(sample.sample_id, self.settings.heldout_fraction):
                self.heldout.add(sample, vector.tolist(), topic, partition, offset)
                self.heldout.mark_trained()  # held-out samples never wait for a publish
                self.summary.heldout_buffered += 1
                self.metrics.samples.labels(outcome="heldout").inc()
            else:
                self.buffer.add(sample, vector.tolist(), topic, partition, offset)
                self.summary.samples_buffered += 1
                self.metrics.samples.labels(outcome="buffered").inc()
        self._measure_buffers()
        return len(fresh)

    def ingest_requests(self, records: Sequence[tuple[str, int, int, bytes]]) -> None:
        for topic, partition, offset, value in records:
            try:
                request = TrainRequest.model_validate_json(value)
            except ValidationError as exc:
                self.summary.malformed_skipped += 1
                log.warning("skipping malformed train request at %s[%d]@%d: %s", topic, partition, offset, exc)
                continue
            self.summary.train_requests += 1
            self.metrics.train_requests.inc()
            self._update_requested = True
            log.info("train request %s (%s, %d new samples)", request.request_id, request.reason, request.new_samples)

    @property
    def pending_samples(self) -> int:
        return len(self.buffer.new_sample_ids)

    def _measure_buffers(self) -> None:
        self.metrics.set_buffers(len(self.buffer), len(self.heldout), self.pending_samples)

    # ---------------------------------------------------------------------------------------- update and publish

    def collate(self, entries: Sequence[BufferedSample]) -> GroupBatch:
        samples = [entry.sample for entry in entries]
        pixels = {c.image_id: self._pixels_of(c.image_id) for sample in samples for c in sample.candidates}
        return collate_groups(samples, [entry.user_vector for entry in entries], pixels)

    def next_batch(self) -> GroupBatch:
        return self.collate(self.buffer.draw(self.settings.groups_per_batch, self.rng))

    def heldout_batch(self) -> GroupBatch | None:
        entries = self.heldout.entries()
        return self.collate(entries) if entries else None

    def follow_latest(self) -> None:
        """Serve what LATEST names if it moved under us (``perfusion models rollback``, another publisher)."""
        latest = self.model_store.latest()
        if latest is None or latest == self.serving_version:
            return
        log.info("LATEST moved from %s to %s: training on from %s", self.serving_version, latest, latest)
        models = self.serving.candidate()
        load_version_into(models, self.model_store, latest, self.settings)
        self.serving, self.serving_version = models, latest
        self.metrics.set_model_version(latest)

    def train_candidate(self) -> tuple[TrainingModels, UpdateReport, GateDecision]:
        """One update of a copy of the serving version, and the gate's decision on it (nothing published)."""
        self.follow_latest()
        candidate = self.serving.candidate()
        generator_batches = None
        if self.settings.reward_ranked_share > 0:
            generator_batches = MixedGeneratorBatches(
                candidate, self.text_encoder, self.next_batch, self.heldout_batch(), self.settings
            )
        report = run_update(candidate, self.text_encoder, self.next_batch, self.settings, True, generator_batches)
        self.summary.updates_run += 1
        decision = run_gate(candidate, self.serving, self.text_encoder, self.heldout_batch(), self.settings)
        return candidate, report, decision

    def publish(self, candidate: TrainingModels, report: UpdateReport, decision: GateDecision) -> str:
        metrics = {**report.as_dict(), **decision.metrics}
        manifest = {
            **self.manifest_extra,
            "parent_version": self.serving_version,
            "trainer": self.settings.arm_description,
            "metrics": metrics,
            "gate": list(decision.reasons),
            "new_samples": len(self.buffer.new_sample_ids),
            "buffered_samples": len(self.buffer),
            "heldout_samples": len(self.heldout),
            MANIFEST_OFFSETS_KEY: self._offsets_for_manifest(),
            MANIFEST_TRAINED_IDS_KEY: self.buffer.remembered_ids(),
        }
        version = self.model_store.publish(candidate.components(), manifest)
        self.serving, self.serving_version = candidate, version
        self.buffer.mark_trained()
        self.summary.versions_published.append(version)
        self.metrics.set_model_version(version)
        self._measure_buffers()
        return version

    # --------------------------------------------------------------------------------------------- Kafka

    def _records(self, messages: Sequence[Any]) -> list[tuple[str, int, int, bytes]]:
        return [(m.topic, m.partition, m.offset, m.value) for m in messages]

    def _open_consumer(self) -> tuple[KafkaConsumer, list[TopicPartition]]:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        bootstrap = self.settings.resolved_bootstrap_servers()
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=self.settings.group_id,
                client_id="perfusion-trainer",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                **kafka_python_kwargs(self.settings.kafka_security),
            )
        except KafkaError as exc:
            raise InfrastructureError(
                f"cannot reach Kafka at {bootstrap!r} ({exc}); start it with `perfusion broker up`"
            ) from exc
        partitions: list[TopicPartition] = []
        for topic in (self.topics.group_samples, self.topics.train_requests):
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                consumer.close()
                raise InfrastructureError(
                    f"topic {topic!r} does not exist on {bootstrap}; start the stream worker (`perfusion worker`) "
                    "with the same topic prefix, which creates the topics"
                )
            partitions += [TopicPartition(topic, partition) for partition in sorted(ids)]
        consumer.assign(partitions)
        for tp in partitions:
            committed = consumer.committed(tp)
            start = max(committed or 0, self._manifest_offsets.get((tp.topic, tp.partition), 0))
            if start > 0:
                consumer.seek(tp, start)
                # Committed with the next commit, so a manifest ahead of the commit (a crash before it) catches up.
                self._consumed[tp] = start
            else:
                consumer.seek_to_beginning(tp)
        return consumer, partitions

    def _commit(self, consumer: KafkaConsumer) -> None:
        from kafka import OffsetAndMetadata

        if not self._consumed:
            return
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._consumed.items()})
        log.info("committed offsets %s", {f"{tp.topic}[{tp.partition}]": o for tp, o in self._consumed.items()})

    def _announce(self, producer: KafkaProducer, version: str, metrics: Mapping[str, float]) -> None:
        event = ModelUpdated(
            version=version,
            path=str(self.model_store.path(version)),
            ts=time.time(),
            metrics={key: float(value) for key, value in metrics.items() if np.isfinite(value)},
        )
        producer.send(self.topics.model_updates, key=version.encode(), value=event.to_bytes()).get(
            timeout=self.settings.publish_timeout_s
        )

    def _update_and_publish(self, consumer: KafkaConsumer, producer: KafkaProducer) -> str | None:
        started = time.monotonic()
        candidate, report, decision = self.train_candidate()
        if not decision.publish:
            self.summary.refusals.append(decision.reasons)
            self._count_update("refused", time.monotonic() - started)
            log.warning("candidate not published: %s", "; ".join(decision.reasons))
            return None
        version = self.publish(candidate, report, decision)
        self._announce(producer, version, {**report.as_dict(), **decision.metrics})
        self._commit(consumer)
        self._count_update("published", time.monotonic() - started)
        log.info("published %s (%s)", version, "; ".join(decision.reasons))
        return version

    def _count_update(self, outcome: str, seconds: float | None = None) -> None:
        self.metrics.updates.labels(outcome=outcome).inc()
        if seconds is not None:
            self.metrics.update_seconds.labels(outcome=outcome).observe(seconds)

    def run(self, once: bool = False, max_updates: int | None = None) -> LoopSummary:
        """Consume and train until stopped (Ctrl-C), ``max_updates`` updates ran, or, with ``once``, until the
        consumer has caught up with what was on the topics at start and that has been trained on. With
        ``metrics_port`` set, the trainer's metrics are served meanwhile."""
        metrics_server = None
        if self.settings.metrics_port > 0:
            metrics_server = serve_metrics(self.metrics, self.settings.metrics_host, self.settings.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics_host, self.settings.metrics_port)
        try:
            return self._consume_and_train(once, max_updates)
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()

    def _consume_and_train(self, once: bool, max_updates: int | None) -> LoopSummary:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        consumer, partitions = self._open_consumer()
        producer = KafkaProducer(
            bootstrap_servers=self.settings.resolved_bootstrap_servers(),
            acks="all",
            client_id="perfusion-trainer",
            **kafka_python_kwargs(self.settings.kafka_security),
        )
        try:
            end_offsets = consumer.end_offsets(partitions) if once else {}
            while True:
                batches = consumer.poll(timeout_ms=self.settings.poll_timeout_ms)
                for tp, messages in batches.items():
                    if tp.topic == self.topics.group_samples:
                        self.ingest_samples(self._records(messages))
                    else:
                        self.ingest_requests(self._records(messages))
                    self._consumed[tp] = messages[-1].offset + 1
                caught_up = once and all(consumer.position(tp) >= end_offsets[tp] for tp in partitions)
                if (self._update_requested and not once) or caught_up:
                    self._update_requested = False
                    if self.pending_samples >= self.settings.min_new_samples:
                        self._update_and_publish(consumer, producer)
                    else:
                        self._count_update("skipped")
                        if self.pending_samples == 0:
                            self._commit(consumer)  # only duplicates, held-out samples or requests: nothing to train
                if caught_up or (max_updates is not None and self.summary.updates_run >= max_updates):
                    return self.summary
        except KafkaError as exc:
            raise InfrastructureError(f"Kafka failed under the trainer: {type(exc).__name__}: {exc}") from exc
        finally:
            producer.close(timeout=self.settings.publish_timeout_s)
            consumer.close(autocommit=False)


def build_trainer(
    settings: TrainerSettings,
    text_encoder: TextEncoder | None = None,
    user_vectors: UserVectorSource | None = None,
) -> Trainer:
    """A trainer for ``settings``: the base checkpoint, the serving version (LATEST) if any, Feast and images."""
    from perfusion.checkpoints import ModelStore
    from perfusion.models.base import build_train_scheduler
    from perfusion.sampling import base_model_config, load_base_unet
    from perfusion.text_encoder import TextEncoder

    base_folder = settings.resolved_base_checkpoint()
    base_config = base_model_config(base_folder)
    base_unet = load_base_unet(base_folder)
    models = build_training_models(base_unet, base_config, build_train_scheduler(base_config), settings)
    store = ModelStore(settings.resolved_model_root())
    version = store.latest()
    if version is not None:
        load_version_into(models, store, version, settings)
    if user_vectors is None:
        from perfusion.feature_store import open_feature_store

        user_vectors = FeastUserVectors(open_feature_store())
    return Trainer(
        settings,
        models,
        version,
        text_encoder or TextEncoder(max_length=base_config.text_max_length),
        store,
        user_vectors,
        ImageStore(settings.resolved_image_root(), catalog_size=base_config.sample_size),
        manifest_extra={"base_checkpoint": str(base_folder)},
    )


def load_version_into(models: TrainingModels, store: ModelStore, version: str, settings: TrainerSettings) -> None:
    """Load a published version's weights into ``models`` in place, after checking it was made by this arm."""
    from perfusion.checkpoints import load_state_into

    manifest = store.verify(version)
    if manifest.get("trainer") != settings.arm_description:
        raise TrainerError(
            f"version {version} under {store.root} was trained as {manifest.get('trainer')}, this trainer is "
            f"{settings.arm_description}; give each arm its own --model-root"
        )
    for name, (module, _) in models.components().items():
        load_state_into(store.path(version), name, module)
        module.eval()


def describe_summary(summary: LoopSummary) -> str:
    published = ", ".join(summary.versions_published) or "none"
    return (
        f"buffered {summary.samples_buffered} samples (+{summary.heldout_buffered} held out), skipped "
        f"{summary.duplicates_skipped} duplicates and {summary.malformed_skipped} malformed, "
        f"{summary.train_requests} train requests, {summary.updates_run} updates, published: {published}, "
        f"refused: {len(summary.refusals)}"
    )
