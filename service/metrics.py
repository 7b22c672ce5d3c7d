"""Prometheus metrics of the generator service, on a registry of their own (one per app, so tests can build many).

What is exported at ``GET /metrics``:

- ``perfusion_http_requests_total{method, route, status}`` and ``perfusion_http_request_seconds{method, route}``
- ``perfusion_model_version_info{version}`` (1 for the version being served) and ``perfusion_model_reloads_total``,
  ``perfusion_model_reloads_refused_total{reason}``
- ``perfusion_kafka_errors_total{operation}``, ``perfusion_feast_errors_total``
- ``perfusion_feast_read_seconds`` (the online read inside the candidates request path)
- ``perfusion_generation_seconds{personalization}`` and ``perfusion_candidates_total{personalization}``
- ``perfusion_generation_admitted`` (requests on the generation pool now) and ``perfusion_generation_refused_total``
  (503s because it was full)
- ``perfusion_rate_limited_total{endpoint_class}`` (429s: a principal over its ``generation`` or ``events`` limit)
- ``perfusion_follower_records_handled_total{follower}``, ``perfusion_follower_records_failed_total{follower}``
  (records skipped as unusable) and ``perfusion_follower_broker_errors_total{follower}``, for the background tasks
  that follow topics (demand follower, model updates)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from perfusion.follower import TopicFollower

# Seconds. Generation on the CPU takes 0.1-10 s; Feast and Kafka calls take well under 10 ms.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FAST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """Every metric the service updates, registered on ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "perfusion_http_requests",
            "HTTP requests served, by route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "perfusion_http_request_seconds",
            "HTTP request latency in seconds, by route template",
            ["method", "route"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.model_version = Gauge(
            "perfusion_model_version_info",
            "1 for the model version being served, 0 for versions served before",
            ["version"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "perfusion_model_reloads", "Model versions loaded in place while serving", registry=self.registry
        )
        self.reloads_refused = Counter(
            "perfusion_model_reloads_refused",
            "Model versions refused (corrupt, partial or incompatible); the current version kept serving",
            ["reason"],
            registry=self.registry,
        )
        self.kafka_errors = Counter(
            "perfusion_kafka_errors",
            "Kafka operations that failed (the request answered 503 or the follower retried)",
            ["operation"],
            registry=self.registry,
        )
        self.feast_errors = Counter(
            "perfusion_feast_errors",
            "Feast online reads that failed (the request answered 503)",
            registry=self.registry,
        )
        self.feast_read_seconds = Histogram(
            "perfusion_feast_read_seconds",
            "Feast online read of one user's features inside the candidates request, seconds",
            buckets=_FAST_BUCKETS,
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "perfusion_generation_seconds",
            "Sampling of one candidate group, seconds",
            ["personalization"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.candidates = Counter(
            "perfusion_candidates",
            "Candidate images served, by personalization (personalized, cold_start, base)",
            ["personalization"],
            registry=self.registry,
        )
        self.generation_admitted = Gauge(
            "perfusion_generation_admitted",
            "Candidate requests on the generation pool now, generating or waiting for a worker",
            registry=self.registry,
        )
        self.generation_refused = Counter(
            "perfusion_generation_refused",
            "Candidate requests answered 503 because the generation pool was full",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "perfusion_rate_limited",
            "Requests answered 429 because their principal was over a rate limit, by endpoint class",
            ["endpoint_class"],
            registry=self.registry,
        )
        self._current_version: str | None = None

    def set_model_version(self, version: str) -> None:
        if self._current_version is not None and self._current_version != version:
            self.model_version.labels(version=self._current_version).set(0)
        self.model_version.labels(version=version).set(1)
        self._current_version = version

    def follow_counts_of(self, followers: Callable[[], Iterable[TopicFollower]]) -> None:
        """Export the counts of the topic followers that ``followers()`` names at each scrape (a follower may be
        built only when its task starts)."""
        self.registry.register(_FollowerCollector(followers))

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class _FollowerCollector(Collector):
    """``perfusion_follower_records_{handled,failed}_total{follower}`` and
    ``perfusion_follower_broker_errors_total{follower}``, read from the followers when scraped."""

    def __init__(self, followers: Callable[[], Iterable[TopicFollower]]) -> None:
        self.followers = followers

    def collect(self) -> Iterator[Metric]:
        handled = CounterMetricFamily(
            "perfusion_follower_records_handled", "Records a topic follower applied", labels=["follower"]
        )
        failed = CounterMetricFamily(
            "perfusion_follower_records_failed",
            "Records a topic follower could not decode or apply, logged with topic[partition]@offset and skipped",
            labels=["follower"],
        )
        broker_errors = CounterMetricFamily(
            "perfusion_follower_broker_errors", "Kafka errors a topic follower reconnected after", labels=["follower"]
        )
        for follower in self.followers():
            counts = follower.counts()
            handled.add_metric([follower.name], counts.handled)
            failed.add_metric([follower.name], counts.failed)
            broker_errors.add_metric([follower.name], counts.broker_errors)
        yield from (handled, failed, broker_errors)
