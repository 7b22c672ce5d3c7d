"""`perfusion bench streams` on the real broker with tiny numbers: the report's shape, targets and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.bench import write_report
from ops.bench.streams import StreamBenchConfig, run_stream_benchmark, summary
from perfusion.errors import ConfigError


def test_report_has_every_figure_and_the_targets(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    config = StreamBenchConfig(
        events=400, rate=100.0, freshness_s=1.0, warmup_s=0.5, sampled_users=8, shoppers=20, timeout_s=180
    )
    report = run_stream_benchmark(config)
    write_report(report, tmp_path / "streams.json")
    written = json.loads((tmp_path / "streams.json").read_text())
    assert written["config"]["events"] == 400
    assert written["ceiling"]["events"] >= 400 and written["ceiling"]["events_per_s"] > 0
    assert written["worker"]["events"] > 0
    assert written["freshness"]["samples"] > 0 and written["freshness"]["unseen_after_30s"] == 0
    assert written["freshness"]["warmup_events"] == 50 and 0 <= written["freshness"]["drain_after_warmup_s"] < 180
    assert 0 < written["freshness"]["p50_ms"] <= written["freshness"]["p99_ms"] <= written["freshness"]["max_ms"]
    assert set(written["targets"]) == {"worker_events_per_s", "worker_to_ceiling", "freshness_p99_ms"}
    assert all(isinstance(target["met"], bool) for target in written["targets"].values())
    assert written["targets"]["freshness_p99_ms"]["met"] is False  # offered 100 events/s, the target asks 1,000
    assert set(written["stage_costs"]["per_event_us"]) >= {"parse_and_validate", "feast_push_one_row_per_user"}
    assert "raw aiokafka ceiling" in summary(written)


def test_config_refuses_too_few_events() -> None:
    with pytest.raises(ConfigError, match="events must be at least 100, got 5"):
        StreamBenchConfig(events=5)
