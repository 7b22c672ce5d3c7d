"""The closed-loop evaluation: metrics and paired bootstrap on hand-made outcomes, and ``perfusion eval --quick``
end to end on the real broker (every arm runs, every metric is computed; no thresholds)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from perfusion.errors import ConfigError
from simulator.eval.arm import ArmRun, Outcome
from simulator.eval.config import BASELINE_ARM, EvaluationConfig
from simulator.eval.plan import COLD_START, LIVE, SLICES, Population, plan_round
from simulator.eval.results import EvaluationResults
from simulator.eval.stats import (
    METRICS,
    bootstrap_gauc,
    generator_shift,
    metrics_of,
    summarize,
    user_totals,
    utility_by_segment,
)


def outcome(arm: str, user: str, clicks: int, orders: int, returns: int, slice_name: str = LIVE) -> Outcome:
    return Outcome(arm, 0, slice_name, user, "a dress", clicks, orders, returns, 4, float(clicks), "v")


def test_bootstrap_gauc_resamples_whole_groups_and_brackets_the_point_value() -> None:
    # Three groups of two: the "perfect" scores rank every positive first, "reversed" last, "mixed" one of three.
    labels = np.array([1, 0, 0, 1, 1, 0])
    groups = np.array([0, 0, 1, 1, 2, 2])
    scores = {
        "perfect": np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3]),
        "reversed": np.array([0.1, 0.9, 0.8, 0.2, 0.3, 0.7]),
        "mixed": np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.7]),
    }
    boot = bootstrap_gauc(scores, labels, groups, seed=0, samples=200)
    assert np.all(boot["perfect"] == 1.0) and np.all(boot["reversed"] == 0.0)
    # Each resampling's mixed GAUC is the share of draws of group 0, a multiple of 1/3, and all of them occur.
    assert set(np.round(boot["mixed"] * 3).astype(int)) == {0, 1, 2, 3}
    assert np.all(np.isclose(boot["mixed"] * 3, np.round(boot["mixed"] * 3)))


def test_generator_shift_compares_the_same_showing_of_each_arm_with_base() -> None:
    zeros = np.zeros((4, 2, 2, 3), np.uint8)
    base, moved, still = ArmRun(BASELINE_ARM), ArmRun("perfusion"), ArmRun("sft")
    for run, level in ((base, 0), (moved, 10), (still, 0)):
        run.final_images[(LIVE, "u1", "a dress", 0)] = zeros + level
        run.final_images[(COLD_START, "c1", "a dress", 5)] = zeros + 2 * level
    moved.final_images[(LIVE, "u2", "a coat", 1)] = zeros + 200  # base never showed it: not compared
    shift = generator_shift({BASELINE_ARM: base, "perfusion": moved, "sft": still})
    assert shift["perfusion"]["mean_abs_pixel_diff"] == pytest.approx(15.0) and shift["perfusion"]["showings"] == 2
    assert shift["perfusion"]["live_mean_abs_pixel_diff"] == pytest.approx(10.0)
    assert shift["perfusion"]["cold_start_mean_abs_pixel_diff"] == pytest.approx(20.0)
    assert shift["sft"]["mean_abs_pixel_diff"] == 0.0 and set(shift) == {"perfusion", "sft"}


def test_metrics_are_ratios_of_sums_over_users() -> None:
    totals = user_totals(
        [outcome("a", "u1", 2, 1, 0), outcome("a", "u2", 0, 0, 0), outcome("a", "u2", 2, 2, 1)], ["u1", "u2"]
    )
    values = metrics_of(totals)
    assert values["ctr"] == pytest.approx(4 / 12)
    assert values["conversion"] == pytest.approx(3 / 4)
    assert values["return_rate"] == pytest.approx(1 / 3)
    assert values["utility"] == pytest.approx(4 / 12)


def test_summary_gives_intervals_and_paired_lifts() -> None:
    config = EvaluationConfig(
        arms=(BASELINE_ARM, "perfusion"), rounds=1, train_users=20, cold_users=2, bootstrap_samples=200
    )
    users = [f"u{i}" for i in range(20)]
    population = Population(users, ["c0", "c1"], ["m0"])
    runs = {arm: ArmRun(arm) for arm in config.arms}
    for round_index in (0, 1):
        for user in [*users, "c0", "c1"]:
            slices = (COLD_START,) if user.startswith("c") else (LIVE, "heldout_prompt")
            for slice_name in slices:
                base = outcome(BASELINE_ARM, user, 1, 1, 1, slice_name)
                better = outcome("perfusion", user, 2, 2, 0, slice_name)
                base.round = better.round = round_index
                runs[BASELINE_ARM].outcomes.append(base)
                runs["perfusion"].outcomes.append(better)
    summary = summarize(runs, config, population)
    assert set(summary) == set(SLICES)
    entry = summary[LIVE]["1"]["perfusion"]
    assert entry["ctr"]["lift_vs_base"]["value"] == pytest.approx(1.0)
    assert entry["ctr"]["lift_vs_base"]["ci95"] == pytest.approx([1.0, 1.0])  # paired: same users, same lift
    assert entry["return_rate"]["lift_vs_base"]["value"] == pytest.approx(-1.0)
    low, high = summary[LIVE]["1"][BASELINE_ARM]["ctr"]["ci95"]
    assert low <= 0.25 <= high


def test_utility_by_segment_separates_a_shift_for_everyone_from_personalisation() -> None:
    config = EvaluationConfig(arms=(BASELINE_ARM, "perfusion"), rounds=1, bootstrap_samples=200)
    users = ["d1", "d2", "b1", "b2"]
    segments = {"d1": "dark", "d2": "dark", "b1": "bright", "b2": "bright"}
    runs = {arm: ArmRun(arm) for arm in config.arms}
    # Utility per image: base 0 for everyone; perfusion +1 for dark users, -0.5 for bright users (4 images shown).
    for arm, gains in ((BASELINE_ARM, {"dark": 0.0, "bright": 0.0}), ("perfusion", {"dark": 1.0, "bright": -0.5})):
        for user in users:
            for round_index, slice_name in ((1, LIVE), (1, "heldout_prompt"), (0, LIVE), (1, COLD_START)):
                gain = gains[segments[user]] if (round_index, slice_name) != (1, COLD_START) else 9.0
                row = Outcome(arm, round_index, slice_name, user, "a dress", 0, 0, 0, 4, 4 * gain, "v")
                runs[arm].outcomes.append(row)
    result = utility_by_segment(runs, config, users, segments)
    assert set(result) == {"perfusion"}
    assert result["perfusion"]["dark"]["value"] == pytest.approx(1.0)
    assert result["perfusion"]["dark"]["ci95"] == pytest.approx([1.0, 1.0])
    assert result["perfusion"]["bright"]["value"] == pytest.approx(-0.5)
    assert result["perfusion"]["bright"]["users"] == 2


def test_every_arm_sees_the_same_plan_and_cold_users_only_in_their_slice() -> None:
    config = EvaluationConfig.quick()
    population = Population(["u0", "u1", "u2", "u3"], ["c0", "c1"], ["m0"])
    first, again = plan_round(config, population, 1, 1000.0), plan_round(config, population, 1, 1000.0)
    assert first == again
    assert {s.viewer_id for s in first if s.slice == COLD_START} == {"c0", "c1"}
    assert not {"c0", "c1"} & {s.viewer_id for s in first if s.slice == LIVE}
    assert len({s.ts for s in first}) == len(first)


def test_config_refuses_unknown_arms_and_a_missing_baseline() -> None:
    with pytest.raises(ConfigError, match="subset"):
        EvaluationConfig(arms=("base", "nonsense"))
    with pytest.raises(ConfigError, match="base"):
        EvaluationConfig(arms=("perfusion",))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rounds": 0}, "rounds must be at least 1, got 0"),
        ({"impressions_per_user": 0}, "impressions_per_user must be at least 1, got 0"),
        ({"k": 1}, "k must be between 2 and 16, got 1"),
        ({"bootstrap_samples": 99}, "bootstrap_samples must be at least 100, got 99"),
    ],
)
def test_config_refuses_sizes_out_of_bounds_naming_the_field(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EvaluationConfig(**overrides)


def test_quick_eval_runs_every_arm_and_computes_every_metric(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ops.cli import main

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "results"
    # One arm per generator code path (none, fine-tuned U-Net, adaptive network) keeps the test within minutes;
    # `perfusion eval loop --quick` without --arms runs all six.
    arms = ("base", "group_without_adaptive", "perfusion")
    # Two arms at a time, each in a process of its own (the --parallel-arms path).
    argv = [
        "eval",
        "loop",
        "--quick",
        "--arms",
        *arms,
        "--parallel-arms",
        "2",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    # The file is what the records say, to the byte (docs/schemas/results.schema.json is their schema).
    assert EvaluationResults.read(out / "results.json").to_json() == (out / "results.json").read_text()
    config = EvaluationConfig.quick(arms=arms)
    assert set(results["arms"]) == set(config.arms)
    for arm, info in results["arms"].items():
        assert len(info["versions"]) == config.rounds + 1, arm
    for slice_name in SLICES:
        for round_index in range(config.rounds + 1):
            for arm in config.arms:
                entry = results["metrics"][slice_name][str(round_index)][arm]
                assert entry["impressions"] > 0
                for metric in METRICS:
                    assert isinstance(entry[metric]["value"], float)
                    assert len(entry[metric]["ci95"]) == 2
                assert math.isfinite(entry["ctr"]["value"]) and math.isfinite(entry["utility"]["value"])
    for model in ("perfusion_rm", "rm_without_plugins", "true_utility_ceiling"):
        assert set(results["reward_models"][model]) >= {"gauc", "gauc_ci95", "map"}
    assert set(results["generator_shift_vs_base"]) == set(config.arms) - {BASELINE_ARM}
    assert set(results["utility_vs_base_by_segment"]) == set(config.arms) - {BASELINE_ARM}
    for plot in ("metrics_per_round.png", "reward_models.png", "segment_grid.png"):
        assert (out / plot).stat().st_size > 0
    assert "Reproduce: `perfusion eval loop --quick" in (out / "results.md").read_text()
    assert np.isfinite(results["wall_seconds"])


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))


@pytest.mark.parametrize("mode", ["loop", "probe", "reward-probe"])
def test_reproduction_command_names_every_setting_given(mode: str) -> None:
    from ops.cli import build_parser
    from ops.commands.eval import command_line

    args = build_parser().parse_args(["eval", "loop", "--quick", "--arms", "base", "perfusion", "--out", "/tmp/x"])
    assert command_line(args) == "perfusion eval loop --quick --arms base perfusion"
    # Every option but the output folders changes the numbers, so every one must reach the command.
    parser = build_parser()
    mode_parser = _subcommands(_subcommands(parser)["eval"])[mode]
    mode_parser.load_config_flags()  # a mode's config flags are added when its parser is first used
    settings = [
        action
        for action in mode_parser._actions
        if action.option_strings and action.dest not in {"help", "out", "docs", "notes", "work_dir"}
    ]
    argv = ["eval", mode]
    for action in settings:
        flag = action.option_strings[0]
        argv += [flag] if action.nargs == 0 else [flag, "base"] if action.dest == "arms" else [flag, "3"]
    command = command_line(parser.parse_args(argv))
    assert command.startswith(f"perfusion eval {mode} ")
    for action in settings:
        assert action.option_strings[0] in command.split(), action.option_strings[0]


def test_missing_notes_file_is_refused_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ops.cli import main

    assert (
        main(["eval", "loop", "--quick", "--notes", str(tmp_path / "absent.md"), "--out", str(tmp_path / "out")]) == 2
    )
    assert "--notes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_arms_run_one_per_two_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from simulator.eval.runner import arms_at_once

    six_arms = EvaluationConfig()
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert arms_at_once(six_arms) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert arms_at_once(six_arms) == 6  # never more processes than arms
    assert arms_at_once(EvaluationConfig(parallel_arms=2)) == 2
    with pytest.raises(ConfigError, match="parallel_arms"):
        EvaluationConfig(parallel_arms=-1)
