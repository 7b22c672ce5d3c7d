"""The trainer's Prometheus metrics: one update against the real broker moves the update counter, the update
duration and the published version; a due update without new samples is counted as skipped, one the gate refuses
as refused, publishing nothing; ``serve_metrics`` serves the registry over HTTP."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import trainer.loop
from perfusion.checkpoints import ModelStore
from perfusion.text_encoder import TextEncoder
from tests.trainer import test_trainer_integration as integration
from trainer.gate import GateDecision
from trainer.loop import build_trainer
from trainer.metrics import TrainerMetrics, serve_metrics
from trainer.settings import TrainerSettings

# The broker, Feast and tiny base model of the trainer's integration tests.
trainer_settings = integration.trainer_settings
text_encoder = integration.text_encoder


def value(metrics: TrainerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_one_update_is_counted_with_its_duration_and_the_published_version(
    trainer_settings: TrainerSettings, text_encoder: TextEncoder
) -> None:
    samples = integration.group_samples(10)
    trained = integration.trained_ids(samples)
    integration.produce(trainer_settings, samples, "request-1")

    trainer = build_trainer(trainer_settings, text_encoder=text_encoder)
    summary = trainer.run(once=True)

    [version] = summary.versions_published
    metrics = trainer.metrics
    assert value(metrics, "perfusion_trainer_updates_total", outcome="published") == 1
    assert value(metrics, "perfusion_trainer_updates_total", outcome="refused") is None
    assert value(metrics, "perfusion_trainer_update_seconds_count", outcome="published") == 1
    assert value(metrics, "perfusion_trainer_model_version_info", version=version) == 1
    assert value(metrics, "perfusion_trainer_samples_total", outcome="buffered") == len(trained)
    assert value(metrics, "perfusion_trainer_samples_total", outcome="heldout") == len(samples) - len(trained)
    assert value(metrics, "perfusion_trainer_samples_buffered", buffer="training") == len(trained)
    assert value(metrics, "perfusion_trainer_samples_buffered", buffer="heldout") == len(samples) - len(trained)
    assert value(metrics, "perfusion_trainer_samples_pending") == 0
    assert value(metrics, "perfusion_trainer_train_requests_total") == 1

    # The same samples again: every one a duplicate, so the due update is skipped; the version is LATEST's.
    integration.produce(trainer_settings, samples, "request-2")
    replay = build_trainer(trainer_settings, text_encoder=text_encoder)
    assert value(replay.metrics, "perfusion_trainer_model_version_info", version=version) == 1
    replay.run(once=True)
    assert value(replay.metrics, "perfusion_trainer_updates_total", outcome="skipped") == 1
    assert value(replay.metrics, "perfusion_trainer_updates_total", outcome="published") is None
    assert value(replay.metrics, "perfusion_trainer_samples_total", outcome="duplicate") == len(trained)
    assert ModelStore(trainer_settings.resolved_model_root()).versions() == [version]


def test_serve_metrics_answers_with_the_registry() -> None:
    metrics = TrainerMetrics()
    metrics.set_model_version("v1")
    metrics.set_model_version("v2")
    metrics.updates.labels(outcome="published").inc()
    server = serve_metrics(metrics, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples[("perfusion_trainer_updates_total", (("outcome", "published"),))] == 1
    assert samples[("perfusion_trainer_model_version_info", (("version", "v2"),))] == 1
    assert samples[("perfusion_trainer_model_version_info", (("version", "v1"),))] == 0


def test_a_refused_update_is_counted_with_its_duration_and_publishes_nothing(
    trainer_settings: TrainerSettings, text_encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    integration.produce(trainer_settings, integration.group_samples(10), "request-1")
    # The gate's own tests cover when it refuses; here it refuses whatever the candidate, to see the refusal counted.
    refusal = GateDecision(False, ("candidate RM's held-out GAUC is below the serving RM's",), {})
    monkeypatch.setattr(trainer.loop, "run_gate", lambda *args, **kwargs: refusal)

    refusing = build_trainer(trainer_settings, text_encoder=text_encoder)
    summary = refusing.run(once=True)

    assert summary.versions_published == [] and summary.refusals == [refusal.reasons]
    metrics = refusing.metrics
    assert value(metrics, "perfusion_trainer_updates_total", outcome="refused") == 1
    assert value(metrics, "perfusion_trainer_update_seconds_count", outcome="refused") == 1
    assert value(metrics, "perfusion_trainer_updates_total", outcome="published") is None
    assert ModelStore(trainer_settings.resolved_model_root()).versions() == []
