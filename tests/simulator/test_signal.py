"""The group-signal report: its statistics by hand and by property, the catalog groups, and one tiny run."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from perfusion.errors import ConfigError
from simulator.probes.signal_stats import (
    STATISTICS,
    GroupTable,
    best_of_k_gain,
    bootstrap,
    choice_gap,
    expected_single_click_best_rate,
    groups_counted,
    personal_best_gain,
    single_click_best_rate,
    user_specific_share,
    within_group_sd,
)


def _table(utilities: np.ndarray, owner: list[int], clicked: np.ndarray | None = None) -> GroupTable:
    groups, _, k = utilities.shape
    own = utilities[np.arange(groups), owner]
    chosen = own == own.max(axis=1, keepdims=True) if clicked is None else clicked
    return GroupTable(
        utilities=utilities.astype(np.float64),
        owner=np.asarray(owner, dtype=np.int64),
        clicked=chosen,
        click_probabilities=np.full((groups, k), 0.5),
        picker_utilities=own.astype(np.float64),
        picked=chosen,
    )


def test_within_group_sd_by_hand() -> None:
    assert within_group_sd(np.full((3, 4), 0.7)) == 0.0
    # Divisor K - 1: [0, 2] has sd sqrt(2), [1, 1] 0; the mean over groups is sqrt(2) / 2. [0, 3, 6]: 3.
    assert within_group_sd(np.array([[0.0, 2.0], [1.0, 1.0]])) == pytest.approx(np.sqrt(2) / 2)
    assert within_group_sd(np.array([[0.0, 3.0, 6.0]])) == pytest.approx(3.0)


def test_user_specific_share_by_hand() -> None:
    shared = np.array([[[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]])  # (1 group, 2 viewers, K = 3)
    # Every viewer ranks alike, up to a viewer's own offset: nothing is specific to the viewer.
    assert user_specific_share(shared + np.array([[[0.0], [5.0]]])) == 0.0
    # Opposite tastes: the panel's mean contrast is 0, all of it is the viewer's.
    assert user_specific_share(np.array([[[1.0, -1.0], [-1.0, 1.0]]])) == 1.0
    # Viewer 0 likes candidate 0 by 2, viewer 1 is indifferent: shared [0.5, -0.5], residual +-[0.5, -0.5].
    assert user_specific_share(np.array([[[2.0, 0.0], [0.0, 0.0]]])) == pytest.approx(0.5)
    assert np.isnan(user_specific_share(np.zeros((2, 3, 4))))


def test_single_click_best_counts_only_groups_with_one_click() -> None:
    utilities = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [5.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    clicked = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=bool)
    # Group 0 clicks its best, group 1 does not; groups 2 (two clicks) and 3 (none) do not count.
    assert single_click_best_rate(utilities, clicked) == 0.5
    assert np.isnan(single_click_best_rate(utilities, np.zeros_like(clicked)))


def test_a_click_model_that_always_picks_the_best_scores_one() -> None:
    rng = np.random.default_rng(0)
    utilities = rng.normal(size=(50, 4))
    best = np.eye(4, dtype=bool)[utilities.argmax(axis=1)]
    assert single_click_best_rate(utilities, best) == 1.0
    assert expected_single_click_best_rate(utilities, best.astype(np.float64)) == 1.0
    # Clicks that ignore the images, all alike: the expected rate is chance.
    assert expected_single_click_best_rate(utilities, np.full((50, 4), 0.3)) == pytest.approx(0.25)


def test_expected_single_click_best_matches_simulated_clicks() -> None:
    rng = np.random.default_rng(1)
    utilities = rng.normal(size=(6, 4))
    probabilities = rng.uniform(0.05, 0.6, size=(6, 4))
    draws = rng.random((20_000, 6, 4)) < probabilities
    simulated = single_click_best_rate(np.tile(utilities, (20_000, 1)), draws.reshape(-1, 4))
    assert simulated == pytest.approx(expected_single_click_best_rate(utilities, probabilities), abs=0.01)


def test_choice_gap_and_best_of_k_by_hand() -> None:
    utilities = np.array([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    chosen = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]], dtype=bool)
    # Group 0: 3 - 1/3; group 1 has nothing unchosen and does not count; group 2: 2 - 0.
    assert choice_gap(utilities, chosen) == pytest.approx(((3 - 1 / 3) + 2) / 2)
    assert np.isnan(choice_gap(utilities, np.zeros_like(chosen)))
    assert best_of_k_gain(utilities) == pytest.approx((2.0 + 0.0 + 3.0) / 3)


def test_personal_best_gain_by_hand() -> None:
    # Viewer 0 likes candidate 0 by 2, viewer 1 candidate 1 by 1: the panel's best is candidate 0.
    utilities = np.array([[[2.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]]])
    assert personal_best_gain(utilities, np.array([0, 1])) == pytest.approx((0.0 + 1.0) / 2)
    # A panel of one: the panel's best is the viewer's.
    assert personal_best_gain(utilities[:, :1], np.array([0, 0])) == 0.0


def test_resampled_table_takes_each_drawn_users_groups_and_keeps_the_panel() -> None:
    utilities = np.arange(3 * 2 * 2, dtype=np.float64).reshape(3, 2, 2)  # groups 0, 1 of viewer 0; group 2 of 1
    table = _table(utilities, [0, 0, 1])
    drawn = table.resampled(np.array([1, 1]))
    assert np.array_equal(drawn.utilities, np.stack([utilities[2]] * 2))  # both viewers still value the groups
    assert np.array_equal(drawn.owner, [1, 1])
    assert drawn.viewer_weights is not None and np.array_equal(drawn.viewer_weights, [0.0, 2.0])
    with pytest.raises(ConfigError, match="owner"):
        dataclasses.replace(table, owner=np.array([0, 0, 2]))


def test_viewer_weights_count_viewers_and_leave_the_shared_part_whole() -> None:
    # Contrasts [1, -1], [0, 0], [0, 0]: shared [1/3, -1/3] (2/9 a viewer); residuals' squares 8/9, 2/9, 2/9.
    utilities = np.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    assert user_specific_share(utilities) == pytest.approx((12 / 9) / 2)  # the whole panel: over sum(c^2) = 2
    assert user_specific_share(utilities, np.array([1.0, 0.0, 0.0])) == pytest.approx((8 / 9) / (8 / 9 + 2 / 9))
    assert user_specific_share(utilities, np.array([0.0, 2.0, 0.0])) == pytest.approx(0.5)
    assert user_specific_share(utilities, np.array([2.0, 2.0, 2.0])) == pytest.approx(user_specific_share(utilities))


def test_bootstrap_gives_every_statistic_an_interval_around_its_value() -> None:
    rng = np.random.default_rng(2)
    table = _table(rng.normal(size=(24, 6, 4)), [group % 6 for group in range(24)])
    estimates = bootstrap(table, STATISTICS, samples=200, seed=0)
    assert set(estimates) == set(STATISTICS) == set(groups_counted(table))
    for name, estimate in estimates.items():
        low, high = estimate["ci95"]
        assert low <= high, name
    # The clicks here are the owner's best, so a single click is always the best, in every resampling.
    assert estimates["single_click_best"] == {"value": 1.0, "ci95": [1.0, 1.0]}
    assert estimates["click_gap"]["value"] > 0 and estimates["personal_best_gain"]["value"] >= 0


_utility_tensors = arrays(
    np.float64,
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 5)),
    elements=st.floats(-3, 3, allow_nan=False, width=32),
)


@settings(max_examples=60, deadline=None)
@given(_utility_tensors, st.floats(0.25, 4.0), st.floats(-5.0, 5.0))
def test_statistics_are_bounded_and_follow_shifts_and_scales(
    utilities: np.ndarray, scale: float, offset: float
) -> None:
    groups, viewers, _ = utilities.shape
    owner = np.arange(groups) % viewers
    share = user_specific_share(utilities)
    gain = personal_best_gain(utilities, owner)
    own = utilities[np.arange(groups), owner]
    assert np.isnan(share) or -1e-9 <= share <= 1 + 1e-9
    assert -1e-9 <= gain <= float((own.max(axis=1) - own.min(axis=1)).mean()) + 1e-9
    assert best_of_k_gain(own) >= -1e-9
    # A viewer's constant offset within a group changes no contrast; a common scale scales the spreads only.
    moved = scale * utilities + offset * np.arange(groups * viewers).reshape(groups, viewers, 1)
    moved_share = user_specific_share(moved)
    if not np.isnan(share) and (utilities.std(axis=2) > 1e-3).any():
        assert moved_share == pytest.approx(share, abs=1e-6)
    assert within_group_sd(scale * own + offset) == pytest.approx(scale * within_group_sd(own), abs=1e-9)
    assert best_of_k_gain(scale * own + offset) == pytest.approx(scale * best_of_k_gain(own), abs=1e-9)


def test_catalog_groups_render_k_items_of_the_prompts_garment() -> None:
    from perfusion.attributes import ATTRIBUTE_KINDS
    from simulator.probes.signal import CatalogGroups, prompt_labels

    assert prompt_labels("a t-shirt") == {"garment": "t-shirt"}
    assert prompt_labels("a red striped dress") == {"garment": "dress", "colour": "red", "pattern": "striped"}
    with pytest.raises(ConfigError, match="names no garment"):
        prompt_labels("a red thing")
    group = CatalogGroups().generate("a red hoodie", None, 5, seed=3)
    assert group.images.shape == (5, 32, 32, 3) and group.model_version == "catalog"
    garments = ATTRIBUTE_KINDS["garment"]
    assert all(descriptor[garments.index("hoodie")] == 1.0 for descriptor in group.descriptors)
    assert len({tuple(descriptor) for descriptor in group.descriptors}) == 5  # no item twice
    again = CatalogGroups().generate("a red hoodie", None, 5, seed=3)
    assert np.array_equal(group.images, again.images)


def test_config_refuses_bad_sizes_and_every_field_has_a_flag() -> None:
    from ops.commands.eval_signal import register
    from perfusion.config_flags import config_flags
    from simulator.probes.signal import SignalConfig

    with pytest.raises(ConfigError, match="users"):
        SignalConfig(users=1)
    with pytest.raises(ConfigError, match="k must be"):
        SignalConfig(k=1)
    with pytest.raises(ConfigError, match="sampling_steps"):
        SignalConfig(sampling_steps=0)
    with pytest.raises(ConfigError, match="bootstrap_samples must be at least 100, got 10"):
        SignalConfig(bootstrap_samples=10)
    with pytest.raises(ConfigError, match="groups_per_user must be at least 1, got 0"):
        SignalConfig(groups_per_user=0)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="mode"))
    flags = config_flags(parser.parse_args(["signal"])).flags
    assert {flag.field for flag in flags} == set(SignalConfig.model_fields)


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    """A base folder of the tiny U-Net (8x8 pixels) and a tiny attribute classifier, both untrained."""
    import torch

    from perfusion.checkpoints import save_component
    from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
    from perfusion.models.base import build_unet, unet_component_config
    from tests.fixtures import TINY_BASE

    torch.manual_seed(0)
    unet = build_unet(TINY_BASE)
    save_component(tmp_path / "base", "unet", unet, unet_component_config(TINY_BASE, unet, built=True))
    classifier = AttributeClassifier(AttributeClassifierConfig(image_size=8, channels=(8,)))
    save_component(tmp_path / "base", "attribute_classifier", classifier, classifier.config.to_dict())
    return tmp_path / "base"


def test_the_reproduction_command_holds_every_option_but_the_outputs() -> None:
    from ops.commands.eval_signal import command_line, register
    from perfusion.config_flags import given_values

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="mode"))
    argv = ["signal", "--users", "6", "--sampling-steps", "3", "--base-checkpoint", "a b", "--out", "o", "--docs", "d"]
    args = parser.parse_args(argv)
    assert command_line(args) == "perfusion eval signal --users 6 --sampling-steps 3 --base-checkpoint 'a b'"
    assert given_values(args) == {"users": 6, "sampling_steps": 3, "base_checkpoint": Path("a b")}


@pytest.mark.slow
def test_signal_report_on_a_tiny_base_writes_valid_json_and_markdown(tmp_path: Path, tiny_base: Path) -> None:
    from ops.commands.eval_signal import JSON_NAME, register
    from simulator.probes.signal import SignalResults

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="mode"))
    out = tmp_path / "out"
    # The serving generator's own sampler: the report samples as the service does unless --sampling-steps asks.
    argv = ["signal", "--users", "4", "--groups-per-user", "2", "--bootstrap-samples", "100", "--torch-threads", "1"]
    argv += ["--base-checkpoint", str(tiny_base)]
    args = parser.parse_args([*argv, "--out", str(out), "--docs", str(tmp_path / "g.md")])
    assert args.handler(args) == 0
    results = SignalResults.read(out / JSON_NAME)
    assert results.command == " ".join(["perfusion", "eval", *argv])
    assert results.config.sampling_steps is None and results.generation.sampler
    assert set(results.sources) == {"base", "catalog"}
    for source in results.sources.values():
        assert source.groups == 8 and source.chance == 0.25
        assert source.within_group_sd.value >= 0 and 0 <= source.user_specific_share.value <= 1
        low, high = source.best_of_k_gain.ci95
        assert low <= source.best_of_k_gain.value <= high
    assert results.generation.image_size == 8 and len(results.generation.unet_sha256) == 16
    assert set(results.acceptance) == {"within_group_sd", "single_click_best"}
    markdown = (tmp_path / "g.md").read_text()
    assert f"Reproduce: `{results.command}`" in markdown
    assert markdown.count("PASS") + markdown.count("FAIL") == 2 and "| within-group sd of true utility |" in markdown
