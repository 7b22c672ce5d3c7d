"""Prometheus metrics of the trainer, on a registry of their own (one per trainer, so tests can build many), served
at ``/metrics`` on ``metrics_port`` by :func:`serve_metrics` while :meth:`trainer.loop.Trainer.run` runs.

Names follow the generator service's (:mod:`service.metrics`): ``perfusion_`` and then the process, ``trainer_``.

- ``perfusion_trainer_updates_total{outcome}``: updates that were due (a train request, or caught up with
  ``--once``), by ``published``, ``refused`` (the gate kept the serving version) or ``skipped`` (fewer than
  ``min_new_samples`` new samples, so no update ran)
- ``perfusion_trainer_update_seconds{outcome}``: one update and its gate (and, when published, the publish and
  its announcement), seconds
- ``perfusion_trainer_model_version_info{version}``: 1 for the version the trainer trains on from now on (the one
  it published last, or LATEST when it moved), 0 for versions before
- ``perfusion_trainer_samples_buffered{buffer}``: group samples held in the ``training`` buffer and the ``heldout``
  slice; ``perfusion_trainer_samples_pending``: buffered samples no published version was trained on yet
- ``perfusion_trainer_samples_total{outcome}``: group-sample records read, by ``buffered``, ``heldout``,
  ``duplicate`` or ``malformed``; ``perfusion_trainer_train_requests_total``: train requests read
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

# Seconds. One update on the CPU takes seconds to minutes with the defaults, longer with more steps.
_UPDATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class TrainerMetrics:
    """Every metric the trainer updates, registered on ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.updates = Counter(
            "perfusion_trainer_updates",
            "Updates that were due, by outcome (published, refused by the gate, skipped for too few new samples)",
            ["outcome"],
            registry=self.registry,
        )
        self.update_seconds = Histogram(
            "perfusion_trainer_update_seconds",
            "One update and its gate (and publish, when published), seconds",
            ["outcome"],
            buckets=_UPDATE_BUCKETS,
            registry=self.registry,
        )
        self.model_version = Gauge(
            "perfusion_trainer_model_version_info",
            "1 for the model version the trainer trains on from now on, 0 for versions before",
            ["version"],
            registry=self.registry,
        )
        self.samples_buffered = Gauge(
            "perfusion_trainer_samples_buffered",
            "Group samples held in the training buffer and in the held-out slice",
            ["buffer"],
            registry=self.registry,
        )
        self.samples_pending = Gauge(
            "perfusion_trainer_samples_pending",
            "Buffered group samples that no published version was trained on yet",
            registry=self.registry,
        )
        self.samples = Counter(
            "perfusion_trainer_samples",
            "Group-sample records read, by outcome (buffered, heldout, duplicate, malformed)",
            ["outcome"],
            registry=self.registry,
        )
        self.train_requests = Counter("perfusion_trainer_train_requests", "Train requests read", registry=self.registry)
        self._current_version: str | None = None

    def set_model_version(self, version: str) -> None:
        if self._current_version is not None and self._current_version != version:
            self.model_version.labels(version=self._current_version).set(0)
        self.model_version.labels(version=version).set(1)
        self._current_version = version

    def set_buffers(self, training: int, heldout: int, pending: int) -> None:
        self.samples_buffered.labels(buffer="training").set(training)
        self.samples_buffered.labels(buffer="heldout").set(heldout)
        self.samples_pending.set(pending)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


def serve_metrics(metrics: TrainerMetrics, host: str, port: int) -> WSGIServer:
    """Serve ``metrics`` over HTTP in a daemon thread (port 0: a free port, ``server.server_port``); stop with
    ``server.shutdown()`` and ``server.server_close()``."""
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return server
