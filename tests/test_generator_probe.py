"""The offline generator probe: one update per arm on logged base-model groups, scored against base per segment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perfusion.errors import ConfigError
from simulator.generator_probe import ProbeConfig


def test_probe_refuses_arms_without_a_generator_update() -> None:
    with pytest.raises(ConfigError, match="probe arms"):
        ProbeConfig(arms=("base",))
    with pytest.raises(ConfigError, match="groups_per_user"):
        ProbeConfig(groups_per_user=0)


@pytest.mark.slow
def test_probe_trains_each_arm_and_scores_every_segment(tmp_path: Path) -> None:
    from perfusion.cli import main

    out = tmp_path / "probe"
    argv = ["eval", "--probe", "--arms", "perfusion", "pairwise_dpo", "--users", "4", "--probe-groups", "2"]
    # A large U-Net learning rate, so that two steps visibly move the fine-tuned copy's images.
    argv += ["--steps", "3", "--generator-steps", "2", "--unet-lr", "1e-2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["logged_groups"] == 8
    assert set(result["arms"]) == {"perfusion", "pairwise_dpo"}
    for values in result["arms"].values():
        # 4 users, one per segment of the default panel: every segment is scored, by its one user.
        assert len(values["by_segment"]) == 4
        assert all(entry["users"] == 1 for entry in values["by_segment"].values())
        assert values["utility_vs_base"]["users"] == 4
        assert values["mean_abs_pixel_diff"] >= 0.0
    # The update reaches the images the probe scores (trained generator, not base, draws them).
    assert result["arms"]["pairwise_dpo"]["mean_abs_pixel_diff"] > 0.0
    markdown = (out / "probe.md").read_text()
    assert "Reproduce: `perfusion eval --probe" in markdown and "| pairwise_dpo |" in markdown
