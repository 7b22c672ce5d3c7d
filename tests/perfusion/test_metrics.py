"""GAUC and MAP against hand-computed cases, against sklearn per group, and under score transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from perfusion.metrics import MetricInputError, gauc, gauc_interval, mean_average_precision


def test_gauc_hand_computed_weighted_by_group_size() -> None:
    # Group a (size 3): positive 0.9 beats 0.5, loses to 0.95 -> AUC 1/2.
    # Group b (size 2): positive 0.7 beats 0.1 -> AUC 1.
    # Group c (size 2): both negative -> skipped.
    scores = [0.9, 0.5, 0.95, 0.7, 0.1, 0.3, 0.2]
    labels = [1, 0, 0, 2, 0, 0, 0]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    assert gauc(scores, labels, groups) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)


def test_gauc_counts_ties_as_one_half() -> None:
    assert gauc([0.4, 0.4], [1, 0], [7, 7]) == pytest.approx(0.5)


def test_map_hand_computed() -> None:
    # Group a ranked: 0.95(neg) 0.9(pos) 0.5(neg) -> AP = 1/2.
    # Group b ranked: 0.8(pos) 0.6(neg) 0.4(pos) -> AP = (1/1 + 2/3) / 2 = 5/6.
    scores = [0.9, 0.5, 0.95, 0.8, 0.6, 0.4]
    labels = [1, 0, 0, 1, 0, 2]
    groups = [0, 0, 0, 1, 1, 1]
    assert mean_average_precision(scores, labels, groups) == pytest.approx((0.5 + 5 / 6) / 2)


def test_no_group_with_both_classes_gives_nan() -> None:
    assert math.isnan(gauc([0.1, 0.2], [1, 1], [0, 0]))
    assert math.isnan(mean_average_precision([0.1, 0.2], [0, 0], [0, 0]))


def test_mismatched_lengths_raise_with_the_lengths() -> None:
    with pytest.raises(MetricInputError, match="got lengths 2, 3, 2"):
        gauc([0.1, 0.2], [0, 1, 0], [0, 0])


def test_non_finite_scores_raise() -> None:
    with pytest.raises(MetricInputError, match="finite"):
        mean_average_precision([float("nan"), 0.2], [0, 1], [0, 0])


def _sklearn_reference(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    aucs, sizes, precisions = [], [], []
    for group in np.unique(groups):
        member = groups == group
        binary = (labels[member] > 0).astype(int)
        if binary.min() == binary.max():
            continue
        aucs.append(roc_auc_score(binary, scores[member]))
        sizes.append(member.sum())
        precisions.append(average_precision_score(binary, scores[member]))
    if not aucs:
        return float("nan"), float("nan")
    return float(np.average(aucs, weights=sizes)), float(np.mean(precisions))


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_per_group_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    groups = rng.integers(0, 60, size=n)
    labels = rng.integers(0, 3, size=n) * (rng.random(n) < 0.4)
    # Rounded scores produce ties, which both implementations must treat the same way.
    scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)
    expected_gauc, expected_map = _sklearn_reference(scores, labels, groups)
    assert gauc(scores, labels, groups) == pytest.approx(expected_gauc, abs=1e-12)
    assert mean_average_precision(scores, labels, groups) == pytest.approx(expected_map, abs=1e-12)


group_samples = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-20, 20), min_size=n, max_size=n),
        st.lists(st.integers(0, 2), min_size=n, max_size=n),
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(group_samples)
def test_invariant_to_strictly_increasing_score_transforms(sample: tuple[list[int], list[int], list[int]]) -> None:
    raw_scores, labels, groups = (np.asarray(values) for values in sample)
    transformed = np.exp(raw_scores / 4.0) * 3.0 + 1.0
    for metric in (gauc, mean_average_precision):
        before = metric(raw_scores.astype(float), labels, groups)
        after = metric(transformed, labels, groups)
        assert (math.isnan(before) and math.isnan(after)) or before == pytest.approx(after)


@settings(max_examples=60, deadline=None)
@given(group_samples)
def test_bounded_and_perfect_ranking_scores_one(sample: tuple[list[int], list[int], list[int]]) -> None:
    raw_scores, labels, groups = (np.asarray(values) for values in sample)
    value = gauc(raw_scores.astype(float), labels, groups)
    assert math.isnan(value) or 0.0 <= value <= 1.0
    perfect_scores = labels + np.linspace(0.0, 0.1, labels.size)  # positives always above negatives
    perfect = gauc(perfect_scores, labels, groups)
    perfect_map = mean_average_precision(perfect_scores, labels, groups)
    assert math.isnan(perfect) or perfect == pytest.approx(1.0)
    assert math.isnan(perfect_map) or perfect_map == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(group_samples)
def test_reversed_scores_mirror_the_auc(sample: tuple[list[int], list[int], list[int]]) -> None:
    raw_scores, labels, groups = (np.asarray(values, dtype=float) for values in sample)
    forward = gauc(raw_scores, labels, groups)
    backward = gauc(-raw_scores, labels, groups)
    assert (math.isnan(forward) and math.isnan(backward)) or forward + backward == pytest.approx(1.0)


def test_gauc_interval_of_one_kind_of_group_is_that_group_s_auc() -> None:
    # Two identical groups ranked half right: every resample has GAUC 0.5.
    scores, labels, groups = [2, 1, 3, 2, 3, 1], [1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]
    assert gauc(scores, labels, groups) == pytest.approx(0.5)
    assert gauc_interval(scores, labels, groups, resamples=50) == pytest.approx((0.5, 0.5))


def test_gauc_interval_covers_the_estimate_and_widens_with_fewer_groups() -> None:
    rng = np.random.default_rng(0)

    def sample(num_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups = np.repeat(np.arange(num_groups), 4)
        labels = np.tile([1, 0, 0, 0], num_groups)
        scores = labels * 0.5 + rng.normal(size=labels.size)  # a weak ranker, GAUC about 0.64
        return scores, labels, groups

    few, many = sample(8), sample(400)
    low_few, high_few = gauc_interval(*few)
    low_many, high_many = gauc_interval(*many)
    assert low_few <= gauc(*few) <= high_few and low_many <= gauc(*many) <= high_many
    assert high_many - low_many < high_few - low_few
    assert low_many > 0.5  # 400 groups tell a weak ranker from chance


def test_gauc_interval_without_a_usable_group_is_nan_and_refuses_bad_settings() -> None:
    assert all(math.isnan(v) for v in gauc_interval([1, 2], [0, 0], [0, 0]))
    with pytest.raises(MetricInputError, match="confidence"):
        gauc_interval([1, 2], [1, 0], [0, 0], confidence=1.5)
