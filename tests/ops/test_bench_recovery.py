"""`perfusion bench recovery`: the changelog it fills is the demand table a worker would leave (read back into
counters, it fires the probe from the restored state), each key on the partition the worker logs it to; the probe
moves every source partition; the settings and flags; and, on the real broker with a tiny table, a real worker
restores it and fires the probe (the report's shape, never the timings themselves)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from ops.bench import BENCHMARK_MODULES
from ops.bench.recovery import (
    CHANGELOG_SUFFIX,
    PROBE_DESIGN,
    RecoveryBenchSettings,
    _report,
    add_arguments,
    by_design_partition,
    changelog_records,
    extrapolated_report,
    fill_demand_state,
    probe_events,
    run_recovery_benchmark,
    store_backends,
    summary,
)
from perfusion.contracts.records import parse_event
from perfusion.errors import ConfigError
from perfusion.settings import flag_overrides
from streams.demand import DemandCounter, DemandSettings, order_key
from streams.settings import StreamSettings

NOW = time.time()  # events parse only when stamped near the wall clock
PARTITIONS = 4


def test_the_filled_changelog_restores_a_state_that_fires_the_probe_from_its_one_net_order() -> None:
    demand = DemandSettings()
    records = changelog_records(fill_demand_state(500, 7, PARTITIONS, demand, NOW, seed=3))
    restored: dict[str, Any] = {}
    for partition, key, value in records:  # as Faust replays a changelog into the table, each key on its partition
        decoded = json.loads(value)
        text = key.decode()
        if text.startswith("o:"):
            assert partition == int(text.split(":")[1])
        elif text.startswith("d:"):
            assert partition == decoded["p"] == by_design_partition(text[2:], PARTITIONS)
        else:
            assert text in {f"{kind}:{partition}" for kind in "ws"}
        restored[text] = decoded
    assert sum(key.startswith("o:") for key in restored) == 500
    assert sum(key.startswith("d:") for key in restored) == 8 and len(restored) == 500 + 8 + 2 * PARTITIONS
    assert all(state["pending"] == [] and state["fired"] is None for key, state in restored.items() if key[0] == "d")
    probe_partition = by_design_partition(PROBE_DESIGN, PARTITIONS)
    assert restored[order_key(probe_partition, "bench-order-499")]["quantity"] == 1
    assert restored[f"d:{PROBE_DESIGN}"]["net"] == 1 and restored[f"d:{PROBE_DESIGN}"]["threshold"] == 2

    counter = DemandCounter(demand, restored, probe_partition, source_partitions=PARTITIONS, clock=lambda: 0.0)
    probe, *clocks = [parse_event(value) for _, _, value in probe_events(PARTITIONS, NOW, with_design=False)]
    assert counter.process(probe) == []
    fired = [order for clock in clocks for order in counter.observe_source(probe_events_source(clock), clock.ts)]
    assert [(order.design_id, order.net_orders, order.threshold) for order in fired] == [(PROBE_DESIGN, 2, 2)]


def probe_events_source(event: Any) -> int:
    return int(event.design_id.rsplit("-", 1)[1])


def test_the_probe_puts_a_clock_on_every_source_partition_keyed_by_its_user() -> None:
    from aiokafka.partitioner import murmur2

    for with_design in (False, True):
        events = probe_events(PARTITIONS, NOW, with_design=with_design)
        parsed = [parse_event(value) for _, _, value in events]
        for partition, key, _ in events:
            assert (murmur2(key) & 0x7FFFFFFF) % PARTITIONS == partition
        clocks = [event for event in parsed if event.design_id.startswith("bench-clock-")]
        clock_partitions = [events[index][0] for index, event in enumerate(parsed) if event in clocks]
        assert sorted(clock_partitions) == list(range(PARTITIONS))
        assert all(clock.ts > event.ts for clock in clocks for event in parsed if event not in clocks)
        assert [event.kind for event in parsed].count("design") == PARTITIONS + with_design
    assert fill_demand_state(0, 7, PARTITIONS, DemandSettings(), NOW, seed=0) == {}


def test_settings_flags_and_the_benchmark_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BENCHMARK_MODULES["recovery"] == "ops.bench.recovery"
    with pytest.raises(ConfigError, match="keys must be between 1 and 10000000, got 0"):
        RecoveryBenchSettings(keys=0)
    with pytest.raises(ConfigError, match="unknown"):
        RecoveryBenchSettings(key=5)  # type: ignore[call-arg]
    monkeypatch.setenv("PERFUSION_BENCH_RECOVERY_DESIGNS", "30")
    monkeypatch.setenv("PERFUSION_PARTITIONS", "8")  # the worker's variable: not the bench's
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "PERFUSION_BENCH_RECOVERY_KEYS" in parser.format_help()
    settings = RecoveryBenchSettings.from_env(**flag_overrides(parser.parse_args(["--keys", "1000000"]),
                                                               RecoveryBenchSettings))  # fmt: skip
    assert (settings.keys, settings.designs, settings.partitions, settings.baseline) == (1_000_000, 30, 4, True)
    found = store_backends()
    assert found["used"] == "memory://" and set(found["rocksdb_packages"]) == {"rocksdict", "rocksdb"}


def test_the_filled_topic_is_the_demand_tables_changelog(tmp_path: Path) -> None:
    from streams.agents.demand import TABLE_NAME
    from streams.app import create_app

    settings = StreamSettings(bootstrap_servers="localhost:9", topic_prefix="bench-recovery-x.", data_dir=tmp_path)
    app = create_app(settings, agent_modules=("streams.agents.demand",), event_stage_modules=()).app
    assert app.tables[TABLE_NAME].changelog_topic.get_topic_name() == settings.group_id + CHANGELOG_SUFFIX
    assert app.tables[TABLE_NAME].changelog_topic.partitions == settings.partitions


def test_the_restore_is_the_filled_run_less_the_empty_one() -> None:
    def run(web_up: float, ready: float, fired: float, cpu: tuple[float, float, float], rss: float) -> dict:
        return {"order_records": 0, "changelog": {"records": 0}, "worker": {
            "web_up_s": web_up, "ready_s": ready, "fired_s": fired, "web_up_to_ready_s": ready - web_up,
            "web_up_to_ready_cpu_s": cpu[1] - cpu[0],
            "cpu_s": dict(zip(("at_web_up", "at_ready", "at_fired"), cpu, strict=True)),
            "rss_mb": {"settled": rss}}}  # fmt: skip

    runs = {"empty": run(100.0, 110.0, 111.0, (10.0, 11.0, 11.5), 700.0),
            "filled": run(90.0, 130.0, 135.0, (10.0, 30.0, 33.0), 900.0)}  # fmt: skip
    restore = _report(RecoveryBenchSettings(keys=5000), runs, {})["restore"]
    assert (restore["wall_s"], restore["cpu_s"], restore["ready_to_fired_s"]) == (30.0, 19.0, 5.0)
    assert (restore["cpu_to_fired_s"], restore["rss_mb"], restore["order_records"]) == (21.5, 200.0, 5000)


def test_a_real_worker_restores_a_small_table_and_fires_the_probe_from_it(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    report = run_recovery_benchmark(RecoveryBenchSettings(keys=300, designs=5, baseline=False, timeout_s=600))
    filled = report["runs"]["filled"]
    assert set(report["runs"]) == {"filled"} and "restore" not in report
    assert filled["restored_state_used"] and filled["order_records"] == 300 and filled["design_keys"] == 6
    assert filled["changelog"]["records"] == 300 + 6 + 2 * PARTITIONS and filled["changelog"]["bytes"] > 0
    worker = filled["worker"]
    assert 0 < worker["web_up_s"] <= worker["ready_s"] <= worker["first_event_s"] <= worker["fired_s"]
    assert worker["cpu_s"]["at_web_up"] <= worker["cpu_s"]["at_ready"] <= worker["cpu_s"]["at_fired"]
    assert all(rss > 0 for rss in worker["rss_mb"].values()) and math.isclose(
        worker["web_up_to_ready_s"], worker["ready_s"] - worker["web_up_s"], abs_tol=1e-3
    )
    assert report["store"]["used"] == "memory://"
    assert "filled (300 order records" in summary(report)


def test_an_extrapolation_is_a_line_through_the_two_largest_sizes_and_says_it_was_not_measured() -> None:
    def measured(keys: int, wall_s: float, rss_mb: float) -> dict[str, Any]:
        restore = {"order_records": keys, "wall_s": wall_s, "cpu_s": wall_s / 2, "ready_to_fired_s": 1.0,
                   "cpu_to_fired_s": wall_s, "rss_mb": rss_mb}  # fmt: skip
        return {"config": {"keys": keys}, "restore": restore, "store": store_backends()}

    reports = [measured(100_000, 30.0, 200.0), measured(10_000, 3.0, 20.0), measured(1_000, 99.0, 99.0)]
    extrapolated = extrapolated_report(reports, 1_000_000)
    assert extrapolated["measured"] is False and "NOT MEASURED" in extrapolated["note"]
    assert sorted(extrapolated["extrapolated_from"]) == [10_000, 100_000]
    assert extrapolated["restore"]["wall_s"] == 300.0 and extrapolated["restore"]["rss_mb"] == 2000.0
    assert extrapolated["restore"]["ready_to_fired_s"] == 1.0
    assert extrapolated["per_1000_order_records"]["cpu_s"] == 0.15
    with pytest.raises(ValueError, match="two reports"):
        extrapolated_report(reports[:1], 1_000_000)
