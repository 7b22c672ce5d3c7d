"""What the loop writes back to Kafka, read by the demo to show it: group samples, training requests, published
model versions (ModelUpdated) and production orders.

:class:`LoopObserver` follows the four topics from their beginning on a daemon thread (kafka-python, no consumer
group, nothing committed) and keeps counts and the records worth printing; :meth:`LoopObserver.snapshot` copies
them for the caller.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from perfusion.contracts.records import GroupSample, ModelUpdated, ProductionOrder, TrainRequest
from perfusion.contracts.topics import TopicNames

log = logging.getLogger(__name__)


@dataclass
class ObservedLoop:
    """Everything the observer has read so far."""

    group_samples: int = 0
    samples_with_positives: int = 0
    train_requests: list[TrainRequest] = field(default_factory=list)
    model_updates: list[ModelUpdated] = field(default_factory=list)
    production_orders: list[ProductionOrder] = field(default_factory=list)

    def copy(self) -> ObservedLoop:
        return ObservedLoop(
            group_samples=self.group_samples,
            samples_with_positives=self.samples_with_positives,
            train_requests=list(self.train_requests),
            model_updates=list(self.model_updates),
            production_orders=list(self.production_orders),
        )

    def production_orders_by_design(self) -> dict[str, list[ProductionOrder]]:
        by_design: dict[str, list[ProductionOrder]] = {}
        for order in self.production_orders:
            by_design.setdefault(order.design_id, []).append(order)
        return by_design


class LoopObserver:
    """Follows the loop's output topics of one topic prefix into an :class:`ObservedLoop`."""

    def __init__(self, bootstrap_servers: str, topics: TopicNames, poll_timeout_s: float = 0.5) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topics = topics
        self.poll_timeout_s = poll_timeout_s
        self._observed = ObservedLoop()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-observer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def snapshot(self) -> ObservedLoop:
        with self._lock:
            return self._observed.copy()

    def apply(self, topic: str, value: bytes) -> None:
        """Fold one record of a followed topic into the observation."""
        with self._lock:
            observed = self._observed
            if topic == self.topics.group_samples:
                sample = GroupSample.model_validate_json(value)
                observed.group_samples += 1
                observed.samples_with_positives += any(c.grade > 0 for c in sample.candidates)
            elif topic == self.topics.train_requests:
                observed.train_requests.append(TrainRequest.model_validate_json(value))
            elif topic == self.topics.model_updates:
                observed.model_updates.append(ModelUpdated.model_validate_json(value))
            elif topic == self.topics.production_orders:
                observed.production_orders.append(ProductionOrder.model_validate_json(value))

    def _run(self) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        topics = (
            self.topics.group_samples,
            self.topics.train_requests,
            self.topics.model_updates,
            self.topics.production_orders,
        )
        consumer: KafkaConsumer | None = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(
                        *topics,
                        bootstrap_servers=self.bootstrap_servers,
                        group_id=None,
                        auto_offset_reset="earliest",
                        enable_auto_commit=False,
                        client_id="perfusion-demo-observer",
                        metadata_max_age_ms=2000,
                    )
                for partition, messages in consumer.poll(timeout_ms=int(self.poll_timeout_s * 1000)).items():
                    for message in messages:
                        try:
                            self.apply(partition.topic, message.value)
                        except ValueError as exc:
                            log.warning("observer skips %s[%d]@%d: %s", partition.topic, partition.partition,
                                        message.offset, exc)  # fmt: skip
            except KafkaError as exc:
                log.warning("observer lost Kafka at %s (%s); retrying in 1 s", self.bootstrap_servers, exc)
                if consumer is not None:
                    consumer.close()
                    consumer = None
                self._stop.wait(1.0)
        if consumer is not None:
            consumer.close()
