"""The offline generator probe: one update per arm on logged base-model groups, scored against base per segment."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from perfusion.errors import ConfigError
from perfusion.paths import REPO_ROOT
from simulator.probes.generator_probe import (
    ProbeConfig,
    ProbeResults,
    partner_from_another_segment,
    render_probe_markdown,
    segment_separability,
)

COMMITTED_PROBE = REPO_ROOT / "docs" / "results" / "probe.json"


def _vectors(values: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {user: np.asarray(vector, dtype=np.float32) for user, vector in values.items()}


def test_segment_separability_by_hand() -> None:
    segments = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    # Clustered: each held-out user is nearest its own segment's other user.
    assert segment_separability(_vectors({"a1": [0], "a2": [1], "b1": [10], "b2": [11]}), segments) == 1.0
    # Interleaved: A = {0, 10}, B = {1, 11}; holding out 0 leaves A's centroid at 10 and B's at 6, and so on: all miss.
    assert segment_separability(_vectors({"a1": [0], "a2": [10], "b1": [1], "b2": [11]}), segments) == 0.0
    # Only the chosen columns count: column 0 separates, column 1 interleaves.
    both = _vectors({"a1": [0, 0], "a2": [1, 10], "b1": [10, 1], "b2": [11, 11]})
    assert segment_separability(both, segments, slice(0, 1)) == 1.0
    assert segment_separability(both, segments, slice(1, 2)) == 0.0


def test_a_segment_with_one_user_cannot_be_guessed_for_that_user() -> None:
    segments = {"a1": "A", "b1": "B", "b2": "B"}
    assert segment_separability(_vectors({"a1": [0], "b1": [10], "b2": [11]}), segments) == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="at least 2 users"):
        segment_separability(_vectors({"a1": [0]}), {"a1": "A"})


# Integers, power-of-two scales, integer offsets and four users: every step of the standardisation is exact in
# floating point, so the moved column standardises to the very same numbers and even exact ties break alike.
# (With arbitrary floats, float32 rounding can merge two values, 1 + 2e-16 == 1, which is a different column.)
@given(st.lists(st.integers(-100, 100), min_size=4, max_size=4), st.integers(0, 6), st.integers(-1000, 1000))
def test_segment_separability_ignores_the_scale_and_offset_of_a_column(
    values: list[int], scale_exponent: int, offset: int
) -> None:
    users = [f"u{index}" for index in range(4)]
    segments = {user: "AB"[index % 2] for index, user in enumerate(users)}
    raw = _vectors({user: [value] for user, value in zip(users, values, strict=True)})
    moved = _vectors({user: [value * 2**scale_exponent + offset] for user, value in zip(users, values, strict=True)})
    assert segment_separability(raw, segments) == segment_separability(moved, segments)


def test_partners_come_from_another_segment() -> None:
    segments = {"a1": "A", "a2": "A", "b1": "B"}
    assert partner_from_another_segment(["a1", "a2", "b1"], segments) == {"a1": "b1", "a2": "b1", "b1": "a1"}
    with pytest.raises(ConfigError, match="two segments"):
        partner_from_another_segment(["a1", "a2"], segments)


def test_probe_refuses_arms_without_a_generator_update() -> None:
    with pytest.raises(ConfigError, match="probe arms"):
        ProbeConfig(arms=("base",))
    with pytest.raises(ConfigError, match="groups_per_user"):
        ProbeConfig(groups_per_user=0)


def test_the_committed_probe_reads_back_byte_for_byte_and_renders_its_table() -> None:
    results = ProbeResults.read(COMMITTED_PROBE)
    assert results.to_json() == COMMITTED_PROBE.read_text()
    assert results.arms["pairwise_dpo"].own_u_over_other_segment_u is None  # no u: no personalisation check
    markdown = render_probe_markdown(results)
    perfusion = results.arms["perfusion"]
    assert f"Reproduce: `{results.command}`" in markdown
    assert f"| perfusion | {perfusion.utility_vs_base.value:+.3f} [" in markdown
    assert f"{results.segment_from_u_accuracy.whole_u:.2f} for the whole vector" in markdown


def test_a_probe_file_that_drifts_from_the_records_is_refused(tmp_path: Path) -> None:
    payload = json.loads(COMMITTED_PROBE.read_text())
    payload["arms"]["perfusion"]["utility_vs_base"].pop("users")
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValidationError):
        ProbeResults.read(path)


@pytest.mark.slow
def test_probe_trains_each_arm_and_scores_every_segment(tmp_path: Path) -> None:
    from ops.cli import main

    out = tmp_path / "probe"
    argv = ["eval", "probe", "--arms", "perfusion", "pairwise_dpo", "--train-users", "4", "--groups-per-user", "2"]
    # A large U-Net learning rate, so that two steps visibly move the fine-tuned copy's images.
    argv += ["--sampling-steps", "3", "--diffusion-steps", "2", "--unet-learning-rate", "1e-2", "--out", str(out)]
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
    # Only the arm with the adaptive network takes u, so only it is checked for personalisation.
    assert result["arms"]["perfusion"]["own_u_over_other_segment_u"]["users"] == 4
    assert result["arms"]["pairwise_dpo"]["own_u_over_other_segment_u"] is None
    accuracy = result["segment_from_u_accuracy"]
    assert set(accuracy) == {"whole_u", "profile", "preference", "chance"} and accuracy["chance"] == 0.25
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    # The update reaches the images the probe scores (trained generator, not base, draws them).
    assert result["arms"]["pairwise_dpo"]["mean_abs_pixel_diff"] > 0.0
    markdown = (out / "probe.md").read_text()
    assert "Reproduce: `perfusion eval probe" in markdown and "| pairwise_dpo |" in markdown
    assert "What u tells apart" in markdown


class _RandomImages:
    """Stands in for the generator service's ``generate``: seeded random pixels, neutral descriptors."""

    def generate(self, prompt: str, user_vector: object, k: int, seed: int) -> SimpleNamespace:
        from perfusion.attributes import one_hot_descriptor

        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(k, 32, 32, 3), dtype=np.uint8)
        return SimpleNamespace(images=images, descriptors=[one_hot_descriptor({})] * k, model_version="base")


def test_true_utility_labels_mark_each_groups_best_image_and_leave_u_to_the_clicks() -> None:
    from simulator.ground_truth import PixelPreferencePanel
    from simulator.probes.logged_groups import log_base_groups

    panel = PixelPreferencePanel(n_users=4, seed=0)
    users = panel.user_ids()
    by_label = {
        labels: log_base_groups(ProbeConfig(groups_per_user=3, labels=labels), panel, users, _RandomImages())
        for labels in ("clicks", "true-utility")
    }
    clicks, truth = by_label["clicks"], by_label["true-utility"]
    for click_sample, truth_sample in zip(clicks.samples, truth.samples, strict=True):
        images = np.stack([truth.pixels[candidate.image_id] for candidate in truth_sample.candidates])
        best = int(np.argmax(panel.utilities(truth_sample.user_id, images)))
        assert [candidate.grade for candidate in truth_sample.candidates] == [int(p == best) for p in range(4)]
        # Same images and responses either way; only the training labels differ.
        assert [c.image_id for c in click_sample.candidates] == [c.image_id for c in truth_sample.candidates]
    assert all(np.array_equal(clicks.user_vectors[user], truth.user_vectors[user]) for user in users)
    with pytest.raises(ConfigError, match="probe labels"):
        ProbeConfig(labels="orders")
