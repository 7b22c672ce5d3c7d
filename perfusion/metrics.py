"""Ranking metrics of the reward model, computed per group (one group = one user's impression of K candidates).

Both metrics take three aligned 1-d arrays: ``scores`` (higher = preferred), ``labels`` (graded; > 0 counts as
positive) and ``groups`` (any hashable ids, one per candidate). Groups that hold only positives or only
negatives say nothing about ranking and are skipped; a call where every group is skipped returns NaN.

- :func:`gauc`: AUC inside each group, averaged over groups weighted by group size (the GAUC of recommendation).
- :func:`mean_average_precision`: average precision inside each group, averaged over groups (unweighted).
- :func:`gauc_interval`: a percentile bootstrap interval of the GAUC, resampling groups.

Ties in score count one half in the AUC (the Mann-Whitney convention, as sklearn); in average precision tied
candidates are ranked together (sklearn's ``average_precision_score`` convention).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike, NDArray

from perfusion.errors import PerfusionError


class MetricInputError(PerfusionError):
    """Scores, labels and groups do not describe the same candidates."""


def _as_arrays(
    scores: ArrayLike, labels: ArrayLike, groups: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.int64]]:
    """Validated float scores, boolean positives and dense group codes 0..G-1."""
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    label_array = np.asarray(labels, dtype=np.float64).reshape(-1)
    group_array = np.asarray(groups).reshape(-1)
    if not (score_array.shape == label_array.shape == group_array.shape):
        raise MetricInputError(
            "scores, labels and groups must have one entry per candidate; got lengths "
            f"{score_array.size}, {label_array.size}, {group_array.size}"
        )
    if not np.all(np.isfinite(score_array)):
        raise MetricInputError("scores must be finite; replace NaN/inf scores before computing ranking metrics")
    _, group_codes = np.unique(group_array, return_inverse=True)
    return score_array, label_array > 0, group_codes.astype(np.int64).reshape(-1)


def _groups_with_both_classes(
    scores: NDArray[np.float64], positives: NDArray[np.bool_], group_codes: NDArray[np.int64]
) -> Iterator[tuple[NDArray[np.float64], NDArray[np.bool_]]]:
    order = np.argsort(group_codes, kind="stable")
    boundaries = np.flatnonzero(np.diff(group_codes[order])) + 1
    for member_indices in np.split(order, boundaries):
        if member_indices.size == 0:
            continue
        group_positives = positives[member_indices]
        if group_positives.all() or not group_positives.any():
            continue
        yield scores[member_indices], group_positives


def _average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks of ``values`` in ascending order; tied values share their mean rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    run_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run_ends = np.r_[run_starts[1:], values.size]
    run_of_position = np.repeat(np.arange(run_starts.size), run_ends - run_starts)
    mean_rank_of_run = (run_starts + run_ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank_of_run[run_of_position]
    return ranks


def group_auc(scores: NDArray[np.float64], positives: NDArray[np.bool_]) -> float:
    """AUC of one group with both classes: P(score of a random positive > that of a random negative)."""
    n_positive = int(positives.sum())
    n_negative = positives.size - n_positive
    rank_sum = float(_average_ranks(scores)[positives].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative)


def group_average_precision(scores: NDArray[np.float64], positives: NDArray[np.bool_]) -> float:
    """Average precision of one group: sum over score thresholds of (recall step) x (precision at threshold)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_positives = positives[order].astype(np.float64)
    # Thresholds are the distinct scores; the last index of each run of ties closes that threshold.
    threshold_ends = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1]
    true_positives = np.cumsum(sorted_positives)[threshold_ends]
    precision = true_positives / (threshold_ends + 1)
    recall = true_positives / true_positives[-1]
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * precision))


def gauc(scores: ArrayLike, labels: ArrayLike, groups: ArrayLike) -> float:
    """Group AUC: per-group AUC averaged over groups with both classes, weighted by group size (NaN if none)."""
    score_array, positives, group_codes = _as_arrays(scores, labels, groups)
    weighted_sum = 0.0
    total_weight = 0
    for group_scores, group_positives in _groups_with_both_classes(score_array, positives, group_codes):
        weighted_sum += group_scores.size * group_auc(group_scores, group_positives)
        total_weight += group_scores.size
    return weighted_sum / total_weight if total_weight else float("nan")


def gauc_interval(
    scores: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`gauc`, resampling the groups that have both classes.

    Returns (low, high); (NaN, NaN) when no group has both classes.
    """
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise MetricInputError(f"need resamples >= 1 and confidence in (0, 1); got {resamples}, {confidence}")
    score_array, positives, group_codes = _as_arrays(scores, labels, groups)
    per_group = [
        (group_scores.size, group_auc(group_scores, group_positives))
        for group_scores, group_positives in _groups_with_both_classes(score_array, positives, group_codes)
    ]
    if not per_group:
        return float("nan"), float("nan")
    sizes = np.array([size for size, _ in per_group], dtype=np.float64)
    aucs = np.array([auc for _, auc in per_group], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(per_group), size=(resamples, len(per_group)))
    estimates = (sizes[picks] * aucs[picks]).sum(axis=1) / sizes[picks].sum(axis=1)  # (resamples,)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(estimates, tail)), float(np.quantile(estimates, 1.0 - tail))


def mean_average_precision(scores: ArrayLike, labels: ArrayLike, groups: ArrayLike) -> float:
    """Mean over groups with both classes of the group's average precision (NaN if there is none)."""
    score_array, positives, group_codes = _as_arrays(scores, labels, groups)
    precisions = [
        group_average_precision(group_scores, group_positives)
        for group_scores, group_positives in _groups_with_both_classes(score_array, positives, group_codes)
    ]
    return float(np.mean(precisions)) if precisions else float("nan")
