"""`perfusion bench streams` on the real broker with tiny numbers: the report's shape, both ceilings measured in the
same run, the targets and the summary (never the timings themselves)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from ops.bench import write_report
from ops.bench.bare_faust import event_parser
from ops.bench.streams import StreamBenchSettings, add_arguments, run_stream_benchmark, summary
from perfusion.contracts.records import InvalidEvent
from perfusion.errors import ConfigError
from perfusion.settings import flag_overrides
from streams.settings import StreamSettings


def test_report_has_every_figure_both_ceilings_and_the_targets(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    settings = StreamBenchSettings(
        events=400, rate=100.0, freshness_s=1.0, warmup_s=0.5, sampled_users=8, shoppers=20, timeout_s=180
    )
    report = run_stream_benchmark(settings)
    write_report(report, tmp_path / "streams.json")
    written = json.loads((tmp_path / "streams.json").read_text())
    assert written["config"]["events"] == 400 and written["config"]["bare_parse"] == "event"
    assert written["raw_consumer"]["events"] >= 400 and written["raw_consumer"]["events_per_s"] > 0
    # The bare Faust agent ran as its own process, under its own consumer group, and finished every event.
    bare = written["bare_faust"]
    # CPU time over a span of a few hundred events can round to 0 (the clock ticks in 10 ms): measured, not timed.
    assert bare["events"] > 0 and bare["cpu_seconds"] >= 0 and bare["parse"] == "parse_event"
    assert bare["group_id"].endswith("perfusion-bare-faust") and bare["group_id"] != written["worker"]["group_id"]
    worker_settings = StreamSettings()
    assert (bare["take_max"], bare["take_within_s"]) == (
        worker_settings.push_batch_max,
        worker_settings.push_batch_within_s,
    )
    assert written["worker"]["events"] > 0 and written["worker"]["cpu_seconds"] >= 0
    shares = written["worker_share"]
    assert set(shares) == {"of_bare_faust", "of_raw_consumer"}
    if written["worker"]["events_per_s"] is not None:
        assert math.isclose(
            shares["of_raw_consumer"], written["worker"]["events_per_s"] / written["raw_consumer"]["events_per_s"]
        )
    assert written["freshness"]["samples"] > 0 and written["freshness"]["unseen_after_30s"] == 0
    assert written["freshness"]["warmup_events"] == 50 and 0 <= written["freshness"]["drain_after_warmup_s"] < 180
    assert 0 < written["freshness"]["p50_ms"] <= written["freshness"]["p99_ms"] <= written["freshness"]["max_ms"]
    batches = written["freshness"]["worker_batches"]  # the worker's own part of the measured phase
    assert batches["batches"] > 0 and batches["events_per_batch_mean"] >= 1 and batches["age_mean_s"] >= 0
    targets = written["targets"]
    assert set(targets) == {"worker_events_per_s", "worker_to_bare_faust", "freshness_p99_ms"}
    assert all(isinstance(target["met"], bool) for target in targets.values())
    assert "at the offered 100 events/s" in targets["freshness_p99_ms"]["target"]  # judged at --rate
    if targets["freshness_p99_ms"]["met"]:
        assert written["freshness"]["p99_ms"] < 500
    cpu = written["cpu_per_event_us"]
    assert cpu["bare_faust_process"] == bare["cpu_us_per_event"]
    assert cpu["worker_process"] == written["worker"]["cpu_us_per_event"]
    assert math.isclose(cpu["worker_beyond_bare_faust"], cpu["worker_process"] - cpu["bare_faust_process"])
    assert set(written["stage_costs"]["per_event_us"]) >= {"parse_and_validate", "feast_push_one_row_per_user"}
    assert cpu["stages"] == written["stage_costs"]["per_event_us"]
    assert set(written["phase_seconds"]) >= {
        "prefill",
        "raw_consumer",
        "bare_faust",
        "worker",
        "freshness",
        "stage_costs",
        "total",
    }
    text = summary(written)
    assert "raw aiokafka consumer" in text and "bare Faust agent (parse_event per message" in text


def test_settings_refuse_too_few_events_and_unknown_settings() -> None:
    with pytest.raises(ConfigError, match="events must be at least 100, got 5"):
        StreamBenchSettings(events=5)
    with pytest.raises(ConfigError, match="unknown"):
        StreamBenchSettings(event=500)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="bare_parse"):
        StreamBenchSettings(bare_parse="yaml")  # type: ignore[arg-type]


def test_flags_are_the_settings_fields_over_the_bench_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFUSION_BENCH_STREAMS_FRESHNESS_S", "20")
    monkeypatch.setenv("PERFUSION_BENCH_STREAMS_RATE", "750")
    monkeypatch.setenv("PERFUSION_PARTITIONS", "8")  # the worker's variable: not the bench's
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--rate", "2000", "--bare-parse", "json"])
    assert "PERFUSION_BENCH_STREAMS_RATE" in parser.format_help()
    settings = StreamBenchSettings.from_env(**flag_overrides(args, StreamBenchSettings))
    assert settings.partitions == 4
    assert (settings.rate, settings.bare_parse, settings.freshness_s, settings.events) == (2000.0, "json", 20.0, 50_000)


def test_bare_agent_parses_as_the_worker_gate_does() -> None:
    parse = event_parser("event")
    with pytest.raises(InvalidEvent):
        parse(b'{"kind": "click"}')
    assert event_parser("json")(b'{"kind": "click"}') == {"kind": "click"}
    with pytest.raises(ValueError, match="parse must be one of"):
        event_parser("yaml")


WORKER_PAGE = """# HELP perfusion_worker_batch_age_seconds Seconds from a micro-batch's oldest message
# TYPE perfusion_worker_batch_age_seconds histogram
perfusion_worker_batch_age_seconds_bucket{le="0.2"} 1.0
perfusion_worker_batch_age_seconds_bucket{le="0.5"} 3.0
perfusion_worker_batch_age_seconds_bucket{le="1.0"} 9.0
perfusion_worker_batch_age_seconds_bucket{le="+Inf"} 10.0
perfusion_worker_batch_age_seconds_count 10.0
perfusion_worker_batch_age_seconds_sum 6.5
perfusion_worker_batch_events_bucket{le="100.0"} 8.0
perfusion_worker_batch_events_bucket{le="+Inf"} 10.0
perfusion_worker_batch_events_count 10.0
perfusion_worker_batch_events_sum 900.0
perfusion_worker_events_total{outcome="folded"} 900.0
"""


def test_the_measured_phases_batches_are_the_difference_of_two_readings() -> None:
    from ops.bench.stream_freshness import BATCH_HISTOGRAMS, bucket_quantile, parse_histograms, worker_batches

    after = parse_histograms(WORKER_PAGE, BATCH_HISTOGRAMS)
    assert after["perfusion_worker_batch_age_seconds"] == {
        "le=0.2": 1.0, "le=0.5": 3.0, "le=1.0": 9.0, "le=+Inf": 10.0, "count": 10.0, "sum": 6.5,
    }  # fmt: skip
    before = {
        "perfusion_worker_batch_age_seconds": {"le=0.2": 1.0, "le=0.5": 1.0, "le=1.0": 1.0, "le=+Inf": 2.0,
                                               "count": 2.0, "sum": 4.5},
        "perfusion_worker_batch_events": {"le=100.0": 0.0, "le=+Inf": 2.0, "count": 2.0, "sum": 500.0},
    }  # fmt: skip
    measured = worker_batches(before, after)
    # 8 batches: 2 in (0.2, 0.5], 6 in (0.5, 1.0]; 400 events; ages summing to 2.0 s.
    assert measured["batches"] == 8 and measured["events_per_batch_mean"] == 50.0 and measured["age_mean_s"] == 0.25
    assert measured["age_p50_s_at_most"] == 1.0 and measured["age_p99_s_at_most"] == 1.0
    assert bucket_quantile({"le=0.2": 1.0, "le=0.5": 3.0, "le=+Inf": 4.0, "count": 4.0}, 0.5) == 0.5
    assert bucket_quantile({"le=0.2": 0.0, "le=+Inf": 4.0, "count": 4.0}, 0.5) is None  # beyond the last bound
    assert bucket_quantile({"count": 0.0}, 0.5) is None
