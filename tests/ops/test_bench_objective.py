"""``perfusion bench objective`` on a tiny UNet: the JSON report's shape, never its timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench import BENCHMARK_MODULES, median_seconds
from ops.bench.objective import ObjectiveBenchConfig, run_objective_benchmark, summary
from ops.cli import main
from perfusion.errors import ConfigError

TINY_FLAGS = [
    "--block-out-channels", "16", "32",
    "--sample-size", "16",
    "--layers-per-block", "1",
    "--norm-num-groups", "8",
    "--attention-heads", "2",
    "--text-length", "4",
    "--repeats", "1",
    "--warmup", "0",
]  # fmt: skip


def check_report_shape(report: dict[str, object], group_size: int, num_positives: int) -> None:
    assert report["benchmark"] == "objective"
    seconds = report["seconds_per_group"]
    ratios = report["ratios"]
    passes = report["unet_passes_per_group"]
    assert isinstance(seconds, dict) and isinstance(ratios, dict) and isinstance(passes, dict)
    assert set(seconds) == {"group", "pairwise", "floor"}
    assert all(isinstance(value, float) and value > 0 for value in seconds.values())
    assert ratios["group_over_pairwise"] == pytest.approx(seconds["group"] / seconds["pairwise"])
    assert ratios["group_over_floor"] == pytest.approx(seconds["group"] / seconds["floor"])
    pairs = num_positives * (group_size - num_positives)
    assert passes == {"group": 2 * group_size, "pairwise": 4 * pairs, "floor": 2 * group_size}
    assert isinstance(report["unet_parameters"], int) and isinstance(report["adaptive_parameters"], int)


def test_cli_writes_the_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "objective.json"
    assert main(["bench", "objective", *TINY_FLAGS, "--group-size", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_report_shape(report, group_size=3, num_positives=1)
    assert report["config"]["block_out_channels"] == [16, 32]
    assert "group / pairwise" in capsys.readouterr().out


def test_function_report_with_two_positives_and_its_summary() -> None:
    config = ObjectiveBenchConfig(
        block_out_channels=(16, 32),
        sample_size=16,
        layers_per_block=1,
        norm_num_groups=8,
        attention_heads=2,
        text_length=4,
        group_size=4,
        num_positives=2,
        repeats=1,
        warmup=0,
    )
    report = run_objective_benchmark(config)
    check_report_shape(report, group_size=4, num_positives=2)
    assert json.loads(json.dumps(report)) == report
    assert "8 UNet passes" in summary(report) and "16 UNet passes" in summary(report)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_size": 1}, "group_size must be at least 2"),
        ({"num_positives": 4}, "num_positives must be between 1 and group_size - 1 = 3, got 4"),
        ({"repeats": 0}, "repeats must be at least 1, got 0"),
        ({"warmup": -1}, "warmup must be at least 0, got -1"),
    ],
)
def test_config_rejects_groups_without_comparisons(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ObjectiveBenchConfig(**overrides)  # type: ignore[arg-type]


def test_median_seconds_counts_only_timed_repeats() -> None:
    calls: list[int] = []
    synchronized: list[int] = []
    seconds = median_seconds(lambda: calls.append(1), repeats=3, warmup=2, synchronize=lambda: synchronized.append(1))
    assert len(calls) == 5 and len(synchronized) == 4 and seconds >= 0


def test_registry_and_parser_need_no_torch() -> None:
    assert "objective" in BENCHMARK_MODULES
    probe = (
        "import argparse, sys; from ops.commands import bench; "
        "bench.register(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert result.stdout.strip() == "False"
