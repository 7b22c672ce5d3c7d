"""The sampler probe: the rule on hand-made rows, the garment mask's coverage by hand, and a whole run on a tiny
checkpoint through ``perfusion eval sampler``'s command (JSON and markdown)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ops.commands import eval_sampler
from perfusion.checkpoints import save_component
from perfusion.config_flags import given_values
from perfusion.errors import ConfigError
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet, unet_component_config
from perfusion.sampler_config import SamplerConfig
from simulator.probes import sampler_probe
from simulator.probes.sampler_probe import (
    CANDIDATES,
    REFERENCE,
    SamplerProbeConfig,
    SamplerProbeResults,
    SamplerRow,
    choose,
    mask_coverage,
    qualifies,
)


def row(kind: str, spacing: str, steps: int, accuracy: float, coverage: float, role: str = "candidate") -> SamplerRow:
    return SamplerRow(
        role=role,  # type: ignore[arg-type]
        kind=kind,
        spacing=spacing,
        steps=steps,
        guidance_scale=3.0,
        first_timestep=999,
        model_evaluations=steps - 1,
        accuracy={"garment": accuracy},
        mean_accuracy=accuracy,
        coverage=coverage,
        seconds_per_group=0.1 * steps,
        qualifies=None,
    )


REFERENCE_ROW = row("ddim", "trailing", 25, accuracy=0.80, coverage=0.30, role="reference")


def judged(*rows: SamplerRow) -> list[SamplerRow]:
    return [r.model_copy(update={"qualifies": qualifies(r, REFERENCE_ROW)}) for r in rows] + [REFERENCE_ROW]


def test_candidates_are_the_ones_the_rule_names() -> None:
    described = [(s.kind, s.spacing, s.steps) for s in CANDIDATES]
    assert described[0] == ("ddim", "leading", 4)
    trailing_ddim = [steps for kind, spacing, steps in described if kind == "ddim" and spacing == "trailing"]
    assert trailing_ddim == [2, 3, 4, 6, 8, 10]
    assert [steps for kind, _, steps in described if kind == "dpm-solver"] == [4, 6]
    assert SamplerConfig(kind="ddim", spacing="trailing", steps=25, guidance_scale=3.0) == REFERENCE


def test_tolerances_are_three_points_of_accuracy_below_and_five_of_coverage_either_way() -> None:
    assert qualifies(row("ddim", "trailing", 4, 0.771, 0.30), REFERENCE_ROW)
    assert not qualifies(row("ddim", "trailing", 4, 0.769, 0.30), REFERENCE_ROW)
    assert qualifies(row("ddim", "trailing", 4, 0.90, 0.30), REFERENCE_ROW)  # better than the reference passes
    assert qualifies(row("ddim", "trailing", 4, 0.80, 0.349), REFERENCE_ROW)
    assert not qualifies(row("ddim", "trailing", 4, 0.80, 0.351), REFERENCE_ROW)
    assert not qualifies(row("ddim", "trailing", 4, 0.80, 0.249), REFERENCE_ROW)


def test_the_fewest_qualifying_trailing_steps_win_ddim_first() -> None:
    rows = judged(
        row("ddim", "leading", 2, 0.80, 0.30, role="today"),  # passes, but today's sampler is never chosen
        row("ddim", "trailing", 3, 0.70, 0.30),
        row("dpm-solver", "trailing", 4, 0.80, 0.30),
        row("ddim", "trailing", 4, 0.79, 0.31),
        row("ddim", "trailing", 6, 0.80, 0.30),
    )
    chosen = choose(rows)
    assert chosen is not None and (chosen.kind, chosen.steps) == ("ddim", 4)
    assert choose(judged(row("ddim", "trailing", 3, 0.5, 0.30))) is None


def test_mask_coverage_by_hand() -> None:
    images = np.full((2, 8, 8, 3), 200, dtype=np.uint8)  # a light background
    images[0, 2:6, 2:6] = 40  # a dark 4 x 4 garment: a quarter of the image
    images[1, 1:7, 1:5] = 90  # 6 x 4: three eighths
    assert mask_coverage(images) == pytest.approx((16 / 64 + 24 / 64) / 2)


def test_config_refuses_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="seeds_per_prompt must be at least 1, got 0"):
        SamplerProbeConfig(seeds_per_prompt=0)
    with pytest.raises(ConfigError, match="k must be between 1 and 16"):
        SamplerProbeConfig(k=0)
    with pytest.raises(ConfigError, match="batch_size must be at least 1, got 0"):
        SamplerProbeConfig(batch_size=0)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "base"
    unet = build_unet(QUICK_CONFIG)
    save_component(folder, "unet", unet, unet_component_config(QUICK_CONFIG, unet, built=True))
    config = AttributeClassifierConfig(channels=(8, 16))
    save_component(folder, "attribute_classifier", AttributeClassifier(config), config.to_dict())
    return folder


def test_a_run_on_a_tiny_checkpoint_writes_json_and_markdown(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two candidates and a short reference keep the run to seconds; the code path is the real one.
    monkeypatch.setattr(sampler_probe, "CANDIDATES", CANDIDATES[:2])
    monkeypatch.setattr(sampler_probe, "REFERENCE", REFERENCE.with_steps(3))
    parser = argparse.ArgumentParser()
    eval_sampler.register(parser.add_subparsers())
    out = tmp_path / "out"
    argv = ["sampler", "--seeds-per-prompt", "1", "--coverage-seeds", "1", "--timing-groups", "1", "--k", "2"]
    args = parser.parse_args(
        [*argv, "--torch-threads", "1", "--base-checkpoint", str(tiny_checkpoint), "--out", str(out)]
    )
    assert args.handler(args) == 0

    results = SamplerProbeResults.read(out / "sampler.json")
    assert [(r.role, r.spacing, r.steps) for r in results.rows] == [
        ("today", "leading", 4),
        ("candidate", "trailing", 2),
        ("reference", "trailing", 3),
    ]
    assert results.heldout_prompts == 115 and results.rows[1].first_timestep == 999
    assert results.rows[1].model_evaluations == 1 and results.rows[0].model_evaluations == 4
    for r in results.rows:
        assert set(r.accuracy) == {"garment", "colour", "pattern", "sleeve", "fit"}
        assert 0 <= r.coverage <= 1 and r.seconds_per_group > 0
    assert 0 < results.catalog_coverage < 1
    assert results.command.startswith("perfusion eval sampler --seeds-per-prompt 1 --coverage-seeds 1")
    markdown = (out / "sampler.md").read_text()
    assert "## The rule (fixed before the measurement)" in markdown and "| DDIM trailing | 2 | 999 | 1 |" in markdown
    assert "catalog renders" in markdown and f"Reproduce: `{results.command}`" in markdown


def test_given_options_name_config_fields() -> None:
    parser = argparse.ArgumentParser()
    eval_sampler.register(parser.add_subparsers())
    args: Any = parser.parse_args(["sampler", "--seeds-per-prompt", "3", "--batch-size", "64"])
    assert given_values(args) == {"seeds_per_prompt": 3, "batch_size": 64}
    assert eval_sampler.command_line(args) == "perfusion eval sampler --seeds-per-prompt 3 --batch-size 64"
    SamplerProbeConfig(**given_values(args))
