"""Prometheus metrics of the stream worker, on a registry of their own (one per app, so tests can build many).

Names follow the generator service's (:mod:`service.metrics`): ``perfusion_`` and then the process, ``worker_``.
What the worker's ``GET /metrics`` exports (:mod:`streams.web`):

- ``perfusion_worker_events_total{outcome}``: messages of ``perfusion.events`` the events agent finished, by
  ``folded`` (in every stage's state), ``dead_letter`` or ``rekeyed`` (sent again under the event's user id);
  ``rate()`` of it is the worker's events per second
- ``perfusion_worker_consumer_lag{topic, partition}``: per partition of ``perfusion.events`` this worker owns,
  messages on the broker that the events agent has not finished yet (refreshed every few seconds)
- ``perfusion_worker_dead_letters_total{topic, reason}``: letters sent to ``perfusion.dlq``, by the topic the
  message was read from and a short, bounded form of the reason (:func:`reason_label`)
- ``perfusion_worker_group_samples_total`` and ``perfusion_worker_group_drops_total{reason}``: group builder
  outputs acknowledged by the broker
- ``perfusion_worker_production_orders_total``: production orders acknowledged by the broker
- ``perfusion_worker_train_requests_total{reason}``: train requests acknowledged by the broker
- ``perfusion_worker_feast_push_seconds``: a batch's Feast push, from handing the rows over until Feast took
  them (retries after an outage included), and ``perfusion_worker_feast_push_rows_total``,
  ``perfusion_worker_feast_push_failures_total`` (attempts that failed and were retried)
- ``perfusion_worker_batch_events``: messages per micro-batch of the events agent, and
  ``perfusion_worker_batch_age_seconds``: when a micro-batch is finished (every effect done, features in Feast),
  seconds since its oldest message's Kafka timestamp: the worker's part of an event's way to its features
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds. A Feast push of one micro-batch takes milliseconds to a second on this machine; an outage, much longer.
_PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Seconds from a batch's oldest message to the batch finished: the micro-batch window (0.2 s) and up when caught up.
_BATCH_AGE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 120.0, 600.0)
_BATCH_EVENTS_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000)

MAX_REASON_LABELS = 50
"""Distinct reason labels of the dead-letter counter; any further reason is counted as ``other``."""
OTHER_REASON = "other"
_MAX_REASON_LABEL_CHARS = 48
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)


def reason_label(reason: str) -> str:
    """A dead letter's reason as a label value of few distinct values: the part before the first colon (the field
    or the rule that refused the message), with quoted text and numbers, which come from the message, left out."""
    head = reason.split(":", 1)[0]
    head = _NUMBER.sub("N", _QUOTED.sub("_", head)).strip()
    if len(head) > _MAX_REASON_LABEL_CHARS:
        head = " ".join(head.split()[:3])[:_MAX_REASON_LABEL_CHARS]
    return head or OTHER_REASON


class WorkerMetrics:
    """Every metric the worker updates, registered on ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.events = Counter(
            "perfusion_worker_events",
            "Messages of perfusion.events the events agent finished, by outcome (folded, dead_letter, rekeyed)",
            ["outcome"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "perfusion_worker_consumer_lag",
            "Messages of a partition of perfusion.events on the broker that this worker has not finished yet",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "perfusion_worker_dead_letters",
            "Dead letters sent to perfusion.dlq, by the topic the message was read from and a short reason",
            ["topic", "reason"],
            registry=self.registry,
        )
        self.group_samples = Counter(
            "perfusion_worker_group_samples",
            "Group samples sent to perfusion.group-samples and acknowledged by the broker",
            registry=self.registry,
        )
        self.group_drops = Counter(
            "perfusion_worker_group_drops",
            "Impressions and follow-ups that ended without a group sample, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.production_orders = Counter(
            "perfusion_worker_production_orders",
            "Production orders sent to perfusion.production-orders and acknowledged by the broker",
            registry=self.registry,
        )
        self.train_requests = Counter(
            "perfusion_worker_train_requests",
            "Train requests sent to perfusion.train-requests and acknowledged by the broker, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.feast_push_seconds = Histogram(
            "perfusion_worker_feast_push_seconds",
            "Feast push of one micro-batch's rows, until Feast took them (retries included), seconds",
            buckets=_PUSH_BUCKETS,
            registry=self.registry,
        )
        self.feast_push_rows = Counter(
            "perfusion_worker_feast_push_rows",
            "user_preferences rows pushed to Feast",
            registry=self.registry,
        )
        self.feast_push_failures = Counter(
            "perfusion_worker_feast_push_failures",
            "Feast push attempts that failed and were retried",
            registry=self.registry,
        )
        self.batch_events = Histogram(
            "perfusion_worker_batch_events",
            "Messages in one micro-batch of the events agent",
            buckets=_BATCH_EVENTS_BUCKETS,
            registry=self.registry,
        )
        self.batch_age_seconds = Histogram(
            "perfusion_worker_batch_age_seconds",
            "Seconds from a micro-batch's oldest message (its Kafka timestamp) until the batch was finished",
            buckets=_BATCH_AGE_BUCKETS,
            registry=self.registry,
        )
        self._reason_labels: set[str] = set()
        self._reason_labels_lock = threading.Lock()
        self._lag_partitions: set[tuple[str, str]] = set()

    def count_dead_letter(self, topic: str, reason: str) -> None:
        label = reason_label(reason)
        with self._reason_labels_lock:
            if label not in self._reason_labels:
                if len(self._reason_labels) >= MAX_REASON_LABELS:
                    label = OTHER_REASON
                else:
                    self._reason_labels.add(label)
        self.dead_letters.labels(topic=topic, reason=label).inc()

    def observe_batch(self, events: int, oldest_timestamp_s: float | None, now_s: float) -> None:
        """One finished micro-batch of ``events`` messages, the oldest stamped ``oldest_timestamp_s`` (seconds since
        the epoch; None when no message had a timestamp)."""
        self.batch_events.observe(events)
        if oldest_timestamp_s is not None:
            self.batch_age_seconds.observe(max(0.0, now_s - oldest_timestamp_s))

    def set_consumer_lag(self, lag_by_partition: Iterable[tuple[str, int, int]]) -> None:
        """The lag of every partition owned now, as ``(topic, partition, lag)``; partitions owned before and not
        now are removed."""
        owned: set[tuple[str, str]] = set()
        for topic, partition, lag in lag_by_partition:
            labels = (topic, str(partition))
            owned.add(labels)
            self.consumer_lag.labels(*labels).set(lag)
        for labels in self._lag_partitions - owned:
            self.consumer_lag.remove(*labels)
        self._lag_partitions = owned

    def render(self, names: Iterable[str] = ()) -> bytes:
        """The registry in the Prometheus text exposition format; only the samples ``names`` lists when it lists
        any (``GET /metrics?name[]=...``, as Prometheus's own exposition filters: a poller of one counter does not
        make the worker render every histogram)."""
        names = list(names)
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)
