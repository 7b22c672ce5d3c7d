"""The science evaluation: arm names, hand-checked lifts on made-up totals, and ``perfusion eval science --quick``
end to end (every arm kind runs, every metric is computed; no thresholds)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from perfusion.errors import ConfigError
from simulator.science.config import ArmSpec, ScienceConfig
from simulator.science.scoring import CLICKS, IMAGES, ORDERS, RETURNS, UTILITY, lifts


def test_arm_names_parse_into_trainer_arms_pathways_and_best_of_n() -> None:
    assert ArmSpec.parse("perfusion@base_tokens") == ArmSpec("perfusion@base_tokens", "perfusion", "base_tokens", False)
    best = ArmSpec.parse("base_best_of_n")
    assert best.trainer_arm == "base" and best.best_of_n and not best.takes_u and not best.trains_generator
    assert ArmSpec.parse("perfusion").takes_u and not ArmSpec.parse("sft").takes_u
    with pytest.raises(ConfigError, match="no adaptive network"):
        ArmSpec.parse("sft@copy_tokens")
    with pytest.raises(ConfigError, match="pathway must be one of"):
        ArmSpec.parse("perfusion@sideways")
    with pytest.raises(ConfigError, match="must include 'base'"):
        ScienceConfig(arms=("perfusion",))
    with pytest.raises(ConfigError, match="k <= best_of"):
        ScienceConfig(k=4, best_of=3)
    with pytest.raises(ConfigError, match=r"best_of in 8\.\.16"):
        ScienceConfig(k=4, best_of=6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arms": ("base", "sft", "sft")}, "arms must be distinct"),
        ({"panel": "simulator.ground_truth"}, "panel must be 'module:Class'"),
        ({"shoppers_per_segment": 0}, "shoppers_per_segment must be at least 1, got 0"),
        ({"cold_shoppers": -1}, "cold_shoppers must be at least 0, got -1"),
        ({"k": 1}, "k must be between 2 and 16, got 1"),
        ({"bootstrap_samples": 50}, "bootstrap_samples must be at least 100, got 50"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ScienceConfig(**overrides)


def test_the_config_in_the_results_is_every_field_with_paths_as_text() -> None:
    config = ScienceConfig.quick(arms=("base", "perfusion@base_tokens"), beta=500.0)
    dumped = config.model_dump(mode="json")
    assert list(dumped) == list(ScienceConfig.model_fields)
    assert dumped["arms"] == ["base", "perfusion@base_tokens"] and dumped["beta"] == 500.0
    assert dumped["base_checkpoint"] == str(config.base_checkpoint) and dumped["diffusion_steps"] == 2
    assert ScienceConfig(**dumped) == config  # a seed's JSON reads back as its config
    assert [spec.user_pathway for spec in config.specs] == [None, "base_tokens"]
    assert config.trainer_overrides()["beta"] == 500.0 and config.sampler.steps == 2


def _totals(images: float, utility: float, clicks: float, orders: float, returns: float) -> list[float]:
    row = [0.0] * 8
    row[IMAGES], row[UTILITY], row[CLICKS], row[ORDERS], row[RETURNS] = images, utility, clicks, orders, returns
    row[5:] = [clicks, orders, returns]  # realised as expected
    return row


def test_lifts_are_pooled_ratios_over_viewers_and_utility_a_mean_difference() -> None:
    base = np.array([_totals(8, 0.0, 1.0, 0.5, 0.1), _totals(8, 8.0, 3.0, 1.5, 0.3)])
    arm = np.array([_totals(8, 4.0, 2.0, 0.5, 0.05), _totals(8, 8.0, 4.0, 1.5, 0.15)])
    result = lifts(arm, base, np.random.default_rng(0), 200)
    assert result["expected_ctr"]["value"] == pytest.approx(6.0 / 4.0 - 1.0)  # clicks 6 vs 4 on 16 images each
    assert result["expected_conversion"]["value"] == pytest.approx((2.0 / 6.0) / (2.0 / 4.0) - 1.0)
    assert result["expected_return_rate"]["value"] == pytest.approx((0.2 / 2.0) / (0.4 / 2.0) - 1.0)
    assert result["utility"]["value"] == pytest.approx(((4 / 8 - 0) + (8 / 8 - 8 / 8)) / 2)
    low, high = result["expected_ctr"]["ci95"]
    assert low <= result["expected_ctr"]["value"] <= high
    assert result["realised_ctr"]["value"] == pytest.approx(result["expected_ctr"]["value"])


@pytest.mark.slow
def test_quick_science_runs_every_kind_of_arm_and_writes_its_report(tmp_path: Path) -> None:
    from ops.cli import main

    out = tmp_path / "science"
    arms = ["base", "group_without_adaptive", "perfusion@base_tokens", "base_best_of_n", "perfusion_reward_ranked"]
    argv = ["eval", "science", "--quick", "--seed", "7", "--parallel-arms", "1", "--arms", *arms, "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "science_seed7.json").read_text())
    assert set(result["arms"]) == set(arms)
    assert result["round_zero"]["group_samples"] > 0 and result["round_zero"]["merchant_samples"] > 0
    for name, entry in result["arms"].items():
        shoppers = entry["by_viewers"]["shoppers"]
        assert math.isfinite(shoppers["levels"]["expected_ctr"])
        assert set(entry["by_viewers"]) == {"shoppers", "cold", "merchants"}
        takes_u = name.startswith("perfusion")
        assert (shoppers["own_u_over_other_segment_u"] is not None) == takes_u
        assert len(entry["robustness_expected_ctr_lift"]) == 9
    # base against itself: every lift is exactly 0.
    assert result["arms"]["base"]["by_viewers"]["shoppers"]["vs_base"]["expected_ctr"]["value"] == 0.0
    markdown = (out / "science-seed7.md").read_text()
    assert "perfusion eval science --quick --arms" in markdown and "## Integrity" in markdown
    assert (
        result["grid"]["arms"] == ["base"] and (out / result["grid"]["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    )
    assert f"]({result['grid']['file']})" in markdown
    # The same seed twice stands in for three test seeds: pooling and the rule run, figures as the one seed's.
    pooled_dir = tmp_path / "pooled"
    seed_json = str(out / "science_seed7.json")
    assert main(["eval", "science", "--pool", seed_json, seed_json, "--out", str(pooled_dir)]) == 0
    pooled = json.loads((pooled_dir / "science_pooled.json").read_text())
    assert set(pooled["pooled"]) == set(arms) - {"base"}
    assert pooled["verdicts"]["7"].keys() == pooled["holds_on_every_seed"].keys()
    pooled_markdown = (pooled_dir / "science-pooled.md").read_text()
    assert "## The claims, per seed" in pooled_markdown
    assert (pooled_dir / "science-lifts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](science-lifts.png)" in pooled_markdown


def test_the_grid_shows_the_held_out_prompt_most_segments_saw_a_row_per_segment() -> None:
    from simulator.science.grid import grid_showings, image_grid

    def shown(viewer: str, prompt: str, heldout: bool = True, role: str = "shopper") -> SimpleNamespace:
        return SimpleNamespace(viewer=viewer, prompt=prompt, heldout_prompt=heldout, role=role)

    segments = {"a1": "a", "a2": "a", "b1": "b", "c1": "c", "m": "c"}
    showings = [
        shown("a1", "coat"),
        shown("a1", "dress", heldout=False),  # a training prompt: never in the grid
        shown("a2", "shirt"),
        shown("b1", "shirt"),
        shown("c1", "shirt"),
        shown("b1", "coat"),
        shown("m", "shirt", role="merchant"),  # a merchant's showing: never a row
    ]
    prompt, rows = grid_showings(showings, segments)
    assert prompt == "shirt" and rows == [("a", 2), ("b", 3), ("c", 4)]
    k, size = 3, 2
    draws = {
        arm: SimpleNamespace(images=[np.full((k, size, size, 3), 10 * i + j, np.uint8) for i in range(len(showings))])
        for j, arm in enumerate(["base", "perfusion"])
    }
    png, caption = image_grid(showings, draws, segments)
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)))
    assert pixels.shape == (3 * size, 2 * k * size + 4, 3)
    assert pixels[0, 0, 0] == 20 and pixels[0, -1, 0] == 21  # row a is showing 2: base left, perfusion right
    assert caption["rows"][1] == {"segment": "b", "viewer": "b1"} and caption["arms"] == ["base", "perfusion"]


@pytest.mark.slow
def test_a_closed_loop_arm_logs_its_own_rounds_and_updates_each_time(tmp_path: Path) -> None:
    from ops.cli import main

    out = tmp_path / "loop"
    argv = ["eval", "science", "--quick", "--seed", "3", "--parallel-arms", "1", "--rounds", "2"]
    assert main([*argv, "--closed-loop-groups", "1", "--arms", "base", "perfusion", "--out", str(out)]) == 0
    result = json.loads((out / "science_seed3.json").read_text())
    assert result["config"]["rounds"] == 2
    for entry in result["arms"].values():
        assert len(entry["rounds"]) == 2  # two updates, the second after the arm's own round 1
    assert result["arms"]["perfusion"]["rounds"][1]["update"]["generator_steps"] == 2.0


def _estimate(value: float, low: float, high: float) -> dict[str, object]:
    return {"value": value, "ci95": [low, high]}


def test_verdicts_apply_the_preregistered_rule() -> None:
    from simulator.science.pooled import verdicts

    def arm(ctr: tuple[float, float, float], personal: dict[str, object] | None) -> dict[str, object]:
        vs_base = {
            "expected_ctr": _estimate(*ctr),
            "expected_conversion": _estimate(0.2, 0.05, 0.3),
            "expected_return_rate": _estimate(-0.1, -0.2, -0.01),
        }
        return {
            "by_viewers": {"shoppers": {"vs_base": vs_base, "own_u_over_other_segment_u": personal}},
            "by_segment": {"a": {"utility": _estimate(0.1, -0.1, 0.3)}, "b": {"utility": _estimate(0.2, 0.1, 0.3)}},
        }

    result = {
        "arms": {
            "perfusion": arm((0.15, 0.02, 0.3), _estimate(0.1, 0.01, 0.2)),
            "sft": arm((0.05, -0.1, 0.2), None),
            "base_best_of_n": arm((0.2, 0.1, 0.3), None),
        }
    }
    assert verdicts(result) == {
        "beats_base": True,
        "personalises": True,
        "no_segment_worse": True,
        "above_arms_without_u": False,  # best-of-N's CTR lift is higher
    }
    result["arms"]["perfusion"] = arm((0.15, -0.01, 0.3), _estimate(0.1, -0.01, 0.2))
    assert not verdicts(result)["beats_base"] and not verdicts(result)["personalises"]


def test_best_of_n_is_served_by_the_service_when_the_reward_model_clears_the_floor(text_encoder: object) -> None:
    import torch

    from perfusion.models.base import build_train_scheduler
    from perfusion.sampling import base_model_config, load_base_unet
    from simulator.science.arms import published_with_best_of_n
    from trainer.settings import TrainerSettings
    from trainer.updates import build_training_models

    config = ScienceConfig.quick(arms=("base", "base_best_of_n"))
    unet = load_base_unet(config.base_checkpoint)
    base_config = base_model_config(config.base_checkpoint)
    settings = TrainerSettings.for_arm("base", base_checkpoint=config.base_checkpoint)
    models = build_training_models(unet, base_config, build_train_scheduler(base_config), settings)
    u = np.full(42, 0.5, dtype=np.float32)
    above = published_with_best_of_n(models, {"rm_gauc_low": 0.7, "rm_gauc_high": 0.8}, text_encoder, config)
    below = published_with_best_of_n(models, {"rm_gauc_low": 0.5, "rm_gauc_high": 0.8}, text_encoder, config)
    with torch.no_grad():
        ranked = above.generate("a dress", u, config.k, 11)
        plain = below.generate("a dress", u, config.k, 11)
    assert ranked.drawn == config.best_of and ranked.ranked_by is not None
    assert plain.drawn == config.k and plain.ranked_by is None
