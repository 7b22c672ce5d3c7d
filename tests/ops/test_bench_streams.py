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
