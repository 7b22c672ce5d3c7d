"""``perfusion bench serve`` on a tiny configuration: the JSON report has every figure, each of the right kind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ops.bench.serve import ServeBenchConfig, quantile, run_serve_benchmark, summary
from perfusion.errors import ConfigError


def test_quantile_interpolates_and_is_nan_when_empty():
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(2.5)
    assert quantile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    assert math.isnan(quantile([], 0.5))


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="k must be between 1 and 16, got 0"):
        ServeBenchConfig(k=0)
    with pytest.raises(ConfigError, match="publishes"):
        ServeBenchConfig(publishes=0)
    with pytest.raises(ConfigError, match=r"poll must be positive, got 0\.0"):
        ServeBenchConfig(poll=0.0)
    with pytest.raises(ConfigError, match="warmup must be at least 0, got -1"):
        ServeBenchConfig(warmup=-1)
    with pytest.raises(ConfigError, match=r"--best-of-n 17 with --k 4: best-of-N.s n must be between 8 and 16, got 17"):
        ServeBenchConfig(best_of_n=17)
    with pytest.raises(
        ConfigError, match=r"--best-of-n 8 with --k 12: best-of-N.s n \(8\) must be at least max_k \(12\)"
    ):
        ServeBenchConfig(k=12, best_of_n=8)


def test_report_shape_on_a_tiny_config(kafka_bootstrap: str, tmp_path: Path):
    config = ServeBenchConfig(k=2, best_of_n=8, steps=2, repeats=2, warmup=0, publishes=1, poll=0.05)
    report = run_serve_benchmark(config, bootstrap_servers=kafka_bootstrap)
    report = json.loads(json.dumps(report))  # JSON-serialisable as written by --out

    assert report["benchmark"] == "serve" and report["config"]["k"] == 2
    latency = report["candidates_latency_seconds"]
    for arm in ("base", "personalized", "best_of_n"):
        assert len(latency[arm]["samples"]) == 2 and latency[arm]["median"] > 0
    assert report["personalization_kinds"] == {
        "base": ["base"],
        "personalized": ["cold_start"],
        "best_of_n": ["cold_start"],
    }
    best_of = report["best_of_n"]
    assert (best_of["n"], best_of["k"], best_of["ranked"]) == (8, 2, True)
    assert best_of["over_personalized"] == pytest.approx(
        latency["best_of_n"]["median"] / latency["personalized"]["median"]
    )
    assert report["personalized_over_base"] == pytest.approx(
        latency["personalized"]["median"] / latency["base"]["median"]
    )
    for measure in ("swap", "first_response"):
        assert len(report["publish_to_serve_seconds"][measure]["samples"]) == 1
    swap, first = (report["publish_to_serve_seconds"][m]["median"] for m in ("swap", "first_response"))
    assert 0 <= swap <= first
    feast = report["feast_read_seconds"]
    assert feast["count"] >= 4 and 0 < feast["p50"] <= feast["p99"] <= feast["max"]
    assert report["service_metrics"]["perfusion_feast_read_seconds"]["count"] == feast["count"]
    assert report["failed_requests"] == []
    # One U-Net forward a model-evaluated step (2 trailing steps: 999 is terminal and calls no model, then 499),
    # both guidance branches of the K candidates in it (of the N for best-of-N); the floor times those forwards alone.
    assert report["forwards"] == {
        "base": {"count": 1, "rows": [4]},
        "personalized": {"count": 1, "rows": [4]},
        "best_of_n": {"count": 1, "rows": [16]},
    }
    assert report["floor_forwards"] == {"count": 1, "rows": 4, "rows_best_of_n": 16}
    arms = {"base", "personalized", "best_of_n"}
    assert set(report["floor_seconds"]) == set(report["latency_over_floor"]) == arms
    assert set(report["targets"]) == {"base_group_seconds", "personalized_group_seconds", "personalized_over_base"}
    assert all(isinstance(target["met"], bool) for target in report["targets"].values())
    assert "ratio" in summary(report) and "Feast read" in summary(report) and "floor" in summary(report)
    assert "best-of-8" in summary(report) and "NOT RANKED" not in summary(report)


def test_forwards_are_batched_at_two_steps(kafka_bootstrap: str) -> None:
    config = ServeBenchConfig(k=3, best_of_n=8, steps=3, repeats=1, warmup=0, publishes=1, poll=0.05)
    report = run_serve_benchmark(config, bootstrap_servers=kafka_bootstrap)
    for arm in ("base", "personalized"):
        assert report["forwards"][arm] == {"count": 2, "rows": [6]}  # 999 is terminal; 666 and 332: 2K rows each
    assert report["forwards"]["best_of_n"] == {"count": 2, "rows": [16]}  # 2N rows
    assert report["floor_forwards"] == {"count": 2, "rows": 6, "rows_best_of_n": 16}
