"""The reward-model probe: its settings refuse bad values, and a tiny run trains and scores every reward model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perfusion.errors import ConfigError
from perfusion.paths import REPO_ROOT
from simulator.probes.reward_probe import (
    REWARD_PROBE_MODELS,
    RewardProbeConfig,
    RewardProbeResults,
    render_reward_probe_markdown,
)

COMMITTED_REWARD_PROBE = REPO_ROOT / "docs" / "results" / "reward_probe_clicks.json"


def test_settings_refuse_bad_values_with_the_field() -> None:
    with pytest.raises(ConfigError, match="labels"):
        RewardProbeConfig(labels="orders")
    with pytest.raises(ConfigError, match="train_groups must be at least 1"):
        RewardProbeConfig(train_groups=0)
    with pytest.raises(ConfigError, match="train_groups must be below"):
        RewardProbeConfig(train_groups=10_000)


def test_the_committed_reward_probe_reads_back_byte_for_byte_and_renders_its_table() -> None:
    results = RewardProbeResults.read(COMMITTED_REWARD_PROBE)
    assert results.to_json() == COMMITTED_REWARD_PROBE.read_text()
    assert results.models["true_utility_ceiling"].train_gauc is None
    markdown = render_reward_probe_markdown(results)
    row = results.models["perfusion_rm_pretrained"]
    assert f"| perfusion_rm_pretrained | {row.heldout_gauc:.3f} [" in markdown
    assert f"Reproduce: `{results.command}`" in markdown and "- plugins pretrained: " in markdown


def test_the_committed_reward_probe_config_is_checked_as_a_run_checks_it(tmp_path: Path) -> None:
    payload = json.loads(COMMITTED_REWARD_PROBE.read_text())
    payload["config"]["labels"] = "orders"
    path = tmp_path / "reward_probe.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match="labels must be one of"):
        RewardProbeResults.read(path)


@pytest.mark.slow
def test_a_tiny_run_trains_and_scores_every_reward_model(tmp_path: Path) -> None:
    from ops.cli import main

    out = tmp_path / "probe"
    argv = ["eval", "reward-probe", "--users", "4", "--train-groups", "2", "--sampling-steps", "2", "--steps", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads((out / "reward_probe.json").read_text())
    # 4 users x 2 training groups; held-out: the default 8 new groups each.
    assert (result["train_groups"], result["heldout_groups"]) == (8, 32)
    assert set(result["models"]) == {name for name, _, _ in REWARD_PROBE_MODELS} | {"true_utility_ceiling"}
    for name, row in result["models"].items():
        low, high = row["heldout_gauc_ci95"]
        if result["heldout_groups_with_both_classes"]:
            assert 0.0 <= low <= row["heldout_gauc"] <= high <= 1.0, name
        assert (row["train_gauc"] is None) == (name == "true_utility_ceiling")
    assert set(result["paired_gauc_differences"]) == {
        "plugins_pretrained", "plugins_scratch", "pretraining_with_plugins", "pretraining_without_plugins"
    }  # fmt: skip
    assert result["command"].startswith("perfusion eval reward-probe")
    markdown = (out / "reward_probe.md").read_text()
    assert "| perfusion_rm_pretrained |" in markdown and "Reproduce: `perfusion eval reward-probe" in markdown


def test_probe_and_reward_probe_are_separate_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ops.cli import main

    # Each mode is a subcommand of its own, so one run is one mode; naming none is refused before anything runs.
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "MODE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "probe", "reward-probe", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
