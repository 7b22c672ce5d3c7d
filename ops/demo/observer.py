"""What the loop writes back to Kafka, read by the demo to show it: group samples, training requests, published
model versions (ModelUpdated) and production orders.

:class:`LoopObserver` follows the four topics from their beginning with a :class:`~perfusion.follower.TopicFollower`
(no consumer group, nothing committed; a record it cannot read is logged with its offset and skipped) and keeps
counts and the records worth printing; :meth:`LoopObserver.snapshot` copies them for the caller.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from perfusion.contracts.records import GroupSample, ModelUpdated, ProductionOrder, TrainRequest
from perfusion.contracts.topics import TopicNames
from perfusion.follower import FollowedRecord, TopicFollower


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
        self.follower = TopicFollower(
            "loop-observer",
            bootstrap_servers,
            (topics.group_samples, topics.train_requests, topics.model_updates, topics.production_orders),
            self._handle,
            start_at="earliest",
            poll_timeout_s=poll_timeout_s,
            # The worker creates its topics after the observer starts: look for new partitions every 2 s.
            consumer_options={"metadata_max_age_ms": 2000},
        )

    def start(self) -> None:
        self.follower.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.follower.stop(timeout_s)

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

    def _handle(self, record: FollowedRecord) -> None:
        self.apply(record.topic, record.value)
