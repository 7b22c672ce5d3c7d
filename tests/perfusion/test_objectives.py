"""The group-level preference loss and its baselines on toy tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perfusion.objectives import (
    DiffusionObjective,
    ObjectiveInputError,
    anchored,
    group_preference_loss,
    group_ranking_loss,
    pairwise_dpo_loss,
    positive_anchor_loss,
    sft_loss,
)

BETA = 5.0


def diffusion_dpo_reference(e_w: float, e_ref_w: float, e_l: float, e_ref_l: float, beta: float) -> float:
    """Diffusion-DPO written out for one pair, independently of the module under test."""
    inside = -beta * ((e_w - e_ref_w) - (e_l - e_ref_l))
    return -math.log(1.0 / (1.0 + math.exp(-inside)))


def plackett_luce_reference(s: list[float], labels: list[int]) -> float:
    """One group's loss by explicit loops: mean over positives of -log softmax against lower-graded candidates."""
    terms = []
    for p, label_p in enumerate(labels):
        if label_p == 0:
            continue
        lower = [s[n] for n, label_n in enumerate(labels) if label_n < label_p]
        denominator = math.exp(s[p]) + sum(math.exp(value) for value in lower)
        terms.append(-math.log(math.exp(s[p]) / denominator))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("loss_fn", [group_preference_loss, pairwise_dpo_loss])
@pytest.mark.parametrize(
    ("e_w", "e_ref_w", "e_l", "e_ref_l"), [(0.3, 0.5, 0.4, 0.2), (0.1, 0.1, 0.1, 0.1), (2.0, 0.0, 0.0, 1.0)]
)
def test_one_positive_one_negative_equals_diffusion_dpo(
    loss_fn: object, e_w: float, e_ref_w: float, e_l: float, e_ref_l: float
) -> None:
    policy_err = torch.tensor([e_w, e_l], dtype=torch.float64)
    ref_err = torch.tensor([e_ref_w, e_ref_l], dtype=torch.float64)
    loss, _ = loss_fn(policy_err, ref_err, torch.tensor([1, 0]), torch.tensor([0, 0]), 0.7)  # type: ignore[operator]
    assert loss.item() == pytest.approx(diffusion_dpo_reference(e_w, e_ref_w, e_l, e_ref_l, 0.7), rel=1e-12)


def test_many_pairs_batch_equals_mean_of_diffusion_dpo() -> None:
    generator = torch.Generator().manual_seed(0)
    policy_err = torch.rand(8, generator=generator, dtype=torch.float64)
    ref_err = torch.rand(8, generator=generator, dtype=torch.float64)
    # Four groups of two, winner placed second in some of them.
    labels = torch.tensor([1, 0, 0, 2, 1, 0, 0, 1])
    group_ids = torch.tensor([10, 10, 11, 11, 12, 12, 13, 13])
    expected = []
    for first in range(0, 8, 2):
        w, lo = (first, first + 1) if labels[first] > 0 else (first + 1, first)
        expected.append(
            diffusion_dpo_reference(*(float(v) for v in (policy_err[w], ref_err[w], policy_err[lo], ref_err[lo])), BETA)
        )
    loss, stats = group_preference_loss(policy_err, ref_err, labels, group_ids, BETA)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-12)
    assert stats.num_pairs == 4 and stats.num_groups_used == 4


def test_group_loss_hand_checked_against_loops_with_grades() -> None:
    policy_err = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.3], dtype=torch.float64)
    ref_err = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    labels = [2, 1, 0, 0, 1]
    s = [-BETA * (p - r) for p, r in zip(policy_err.tolist(), ref_err.tolist(), strict=True)]
    loss, stats = group_preference_loss(
        policy_err, ref_err, torch.tensor(labels), torch.zeros(5, dtype=torch.long), BETA
    )
    assert loss.item() == pytest.approx(plackett_luce_reference(s, labels), rel=1e-12)
    # Order (label 2) beats the two clicks and two negatives; each click beats the two negatives.
    assert stats.num_pairs == 4 + 2 + 2


def test_excluded_groups_are_counted_and_do_not_change_the_loss() -> None:
    policy_err = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.3, 0.4, 0.6], dtype=torch.float64)
    ref_err = torch.full((7,), 0.4, dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 0, 1, 2, 1])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 2])  # group 1: no positive; group 2: no negative
    loss, stats = group_preference_loss(policy_err, ref_err, labels, group_ids, BETA)
    only_used, _ = group_preference_loss(policy_err[:2], ref_err[:2], labels[:2], group_ids[:2], BETA)
    assert loss.item() == pytest.approx(only_used.item())
    assert (stats.num_groups, stats.num_groups_used) == (3, 1)
    assert (stats.groups_without_positive, stats.groups_without_negative) == (1, 1)


def test_no_usable_group_gives_zero_loss_that_still_backpropagates() -> None:
    policy_err = torch.tensor([0.2, 0.5], requires_grad=True)
    loss, stats = group_preference_loss(policy_err, torch.zeros(2), torch.tensor([0, 0]), torch.tensor([3, 3]), BETA)
    loss.backward()
    assert loss.item() == 0.0 and stats.num_groups_used == 0 and math.isnan(stats.implicit_accuracy)
    assert policy_err.grad is not None and torch.all(policy_err.grad == 0)


def test_variable_k_equals_average_of_separate_groups() -> None:
    generator = torch.Generator().manual_seed(1)
    sizes_and_labels = [[1, 0], [0, 2, 1, 0], [1, 1, 0, 0, 0, 2]]
    losses, all_labels, all_ids = [], [], []
    policy_err = torch.rand(12, generator=generator, dtype=torch.float64)
    ref_err = torch.rand(12, generator=generator, dtype=torch.float64)
    start = 0
    for group, labels in enumerate(sizes_and_labels):
        end = start + len(labels)
        ids = torch.full((len(labels),), group)
        single, _ = group_preference_loss(policy_err[start:end], ref_err[start:end], torch.tensor(labels), ids, BETA)
        losses.append(single.item())
        all_labels += labels
        all_ids.append(ids)
        start = end
    # Interleave candidates of different groups: grouping goes by id, not position.
    permutation = torch.randperm(12, generator=generator)
    labels_tensor, ids_tensor = torch.tensor(all_labels), torch.cat(all_ids)
    loss, stats = group_preference_loss(
        policy_err[permutation], ref_err[permutation], labels_tensor[permutation], ids_tensor[permutation], BETA
    )
    assert loss.item() == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert stats.num_groups == 3


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_invariant_to_permutation_within_positives_and_within_negatives(
    num_positive: int, num_negative: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    size = num_positive + num_negative
    policy_err = torch.rand(size, generator=generator, dtype=torch.float64)
    ref_err = torch.rand(size, generator=generator, dtype=torch.float64)
    labels = torch.tensor([1] * num_positive + [0] * num_negative)
    group_ids = torch.zeros(size, dtype=torch.long)
    permutation = torch.cat(
        [
            torch.randperm(num_positive, generator=generator),
            num_positive + torch.randperm(num_negative, generator=generator),
        ]
    )
    for loss_fn in (group_preference_loss, pairwise_dpo_loss, sft_loss):
        loss, _ = loss_fn(policy_err, ref_err, labels, group_ids, BETA)
        permuted, _ = loss_fn(policy_err[permutation], ref_err[permutation], labels, group_ids, BETA)
        assert permuted.item() == pytest.approx(loss.item(), rel=1e-12)
    s = (-BETA * (policy_err - ref_err)).tolist()
    expected = plackett_luce_reference(s, labels.tolist())
    assert group_preference_loss(policy_err, ref_err, labels, group_ids, BETA)[0].item() == pytest.approx(expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=8), st.integers(0, 2**31 - 1))
def test_gradients_lower_positive_errors_and_raise_negative_errors(labels: list[int], seed: int) -> None:
    if 0 not in labels or max(labels) == 0:
        labels = [1, 0, *labels]
    generator = torch.Generator().manual_seed(seed)
    policy_err = torch.rand(len(labels), generator=generator, dtype=torch.float64).requires_grad_()
    ref_err = torch.rand(len(labels), generator=generator, dtype=torch.float64)
    label_tensor = torch.tensor(labels)
    for loss_fn in (group_preference_loss, pairwise_dpo_loss):
        policy_err.grad = None
        loss, _ = loss_fn(policy_err, ref_err, label_tensor, torch.zeros(len(labels), dtype=torch.long), BETA)
        loss.backward()
        assert policy_err.grad is not None
        gradient = policy_err.grad
        # Gradient descent moves policy_err against the gradient: down for the top grade, up for negatives.
        top = label_tensor == label_tensor.max()
        assert torch.all(gradient[top] > 0)
        assert torch.all(gradient[label_tensor == 0] < 0)


def test_sft_is_the_mean_policy_error_of_positives_per_group() -> None:
    policy_err = torch.tensor([0.2, 0.6, 0.9, 0.4, 0.8, 0.5])
    labels = torch.tensor([1, 2, 0, 1, 1, 0])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2])  # group 1 has no negative (still used), group 2 no positive
    loss, stats = sft_loss(policy_err, torch.zeros(6), labels, group_ids, BETA)
    assert loss.item() == pytest.approx(((0.2 + 0.6) / 2 + (0.4 + 0.8) / 2) / 2)
    assert stats.num_groups_used == 2


def test_group_ranking_loss_matches_loops_and_stats() -> None:
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    labels = [1, 0, 0, 2, 0]
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    loss, stats = group_ranking_loss(scores, torch.tensor(labels), group_ids)
    expected = (plackett_luce_reference([3.0, 1.0, 2.0], [1, 0, 0]) + plackett_luce_reference([0.5, -1.0], [2, 0])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats.implicit_accuracy == 1.0
    assert stats.reward_margin == pytest.approx((2.0 + 1.0 + 1.5) / 3)


def test_ranking_loss_gradient_raises_positive_scores() -> None:
    scores = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    loss, _ = group_ranking_loss(scores, torch.tensor([0, 1, 0]), torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert scores.grad is not None
    assert scores.grad[1] < 0 and scores.grad[0] > 0 and scores.grad[2] > 0


def test_implicit_accuracy_counts_pairs_won() -> None:
    # s = -beta * (policy - ref); positive has lower policy error than one negative and higher than the other.
    policy_err = torch.tensor([0.5, 0.9, 0.3])
    _, stats = group_preference_loss(
        policy_err, torch.zeros(3), torch.tensor([1, 0, 0]), torch.zeros(3, dtype=torch.long), 1.0
    )
    assert stats.implicit_accuracy == pytest.approx(0.5)
    assert stats.reward_margin == pytest.approx(((-0.5 + 0.9) + (-0.5 + 0.3)) / 2)
    assert set(stats.as_dict()) >= {"loss", "implicit_accuracy", "reward_margin", "groups_without_negative"}


@pytest.mark.parametrize(
    ("labels", "group_ids", "beta", "message"),
    [
        (torch.tensor([1, 0]), torch.tensor([0, 0, 0]), 1.0, "group_ids must have the shape"),
        (torch.tensor([1, -1]), torch.tensor([0, 0]), 1.0, "grades >= 0"),
        (torch.tensor([1, 0]), torch.tensor([0.0, 0.0]), 1.0, "integer tensor"),
        (torch.tensor([1, 0]), torch.tensor([0, 0]), 0.0, "beta must be > 0"),
    ],
)
def test_bad_inputs_raise_with_the_bad_value(
    labels: torch.Tensor, group_ids: torch.Tensor, beta: float, message: str
) -> None:
    with pytest.raises(ObjectiveInputError, match=message):
        group_preference_loss(torch.zeros(2), torch.zeros(2), labels, group_ids, beta)


def test_reference_errors_receive_no_gradient_and_a_tie_costs_log_two() -> None:
    ref_err = torch.tensor([0.3, 0.4], requires_grad=True)
    loss, _ = group_preference_loss(
        torch.tensor([0.1, 0.2], requires_grad=True), ref_err, torch.tensor([1, 0]), torch.tensor([0, 0]), BETA
    )
    loss.backward()
    assert ref_err.grad is None
    equal, _ = group_preference_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), torch.tensor([0, 0]), BETA)
    assert equal.item() == pytest.approx(math.log(2.0))


def test_positive_anchor_is_minus_the_mean_implicit_reward_of_positives_per_group() -> None:
    policy_err = torch.tensor([0.2, 0.6, 0.9, 0.4, 0.8, 0.5], dtype=torch.float64)
    ref_err = torch.tensor([0.3, 0.3, 0.3, 0.5, 0.5, 0.5], dtype=torch.float64)
    labels = torch.tensor([1, 2, 0, 1, 1, 0])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2])  # group 1 has no negative (still anchored), group 2 no positive
    loss, stats = positive_anchor_loss(policy_err, ref_err, labels, group_ids, 2.0)
    # -s = beta * (policy - ref): group 0 (-0.2, +0.6) / 2 = 0.2; group 1 (-0.2, +0.6) / 2 = 0.2.
    assert loss.item() == pytest.approx(((2 * -0.1 + 2 * 0.3) / 2 + (2 * -0.1 + 2 * 0.3) / 2) / 2, rel=1e-12)
    assert stats.num_groups_used == 2


@pytest.mark.parametrize("objective", [group_preference_loss, pairwise_dpo_loss])
def test_anchored_adds_the_weighted_anchor_and_keeps_the_preference_stats(objective: DiffusionObjective) -> None:
    generator = torch.Generator().manual_seed(4)
    policy_err = torch.rand(6, generator=generator, dtype=torch.float64)
    ref_err = torch.rand(6, generator=generator, dtype=torch.float64)
    labels, group_ids = torch.tensor([1, 0, 0, 2, 1, 0]), torch.tensor([0, 0, 0, 1, 1, 1])
    plain, plain_stats = objective(policy_err, ref_err, labels, group_ids, BETA)
    anchor, _ = positive_anchor_loss(policy_err, ref_err, labels, group_ids, BETA)
    loss, stats = anchored(objective, 0.3)(policy_err, ref_err, labels, group_ids, BETA)
    assert loss.item() == pytest.approx(plain.item() + 0.3 * anchor.item(), rel=1e-12)
    assert stats.loss == plain_stats.loss and stats.anchor == pytest.approx(anchor.item())
    assert anchored(objective, 0.0) is objective
    with pytest.raises(ObjectiveInputError, match="supervised weight must be >= 0"):
        anchored(objective, -1.0)


def test_anchor_gradient_lowers_every_positive_error() -> None:
    policy_err = torch.tensor([0.3, 0.3, 0.3], requires_grad=True)
    loss, _ = anchored(group_preference_loss, 1.0)(
        policy_err, torch.tensor([0.3, 0.3, 0.3]), torch.tensor([1, 0, 0]), torch.zeros(3, dtype=torch.long), 1.0
    )
    loss.backward()
    assert policy_err.grad is not None
    # At a tie of K = 3, Plackett-Luce gives the positive's error beta * (1 - 1/3) and each negative's -beta / 3;
    # the anchor adds lambda * beta to the positive's only.
    assert policy_err.grad[0].item() == pytest.approx(2.0 / 3.0 + 1.0)
    assert policy_err.grad[1].item() == pytest.approx(-1.0 / 3.0)


def test_stats_report_the_scale_of_the_implicit_rewards_and_the_group_size() -> None:
    policy_err = torch.tensor([0.1, 0.3, 0.2, 0.5, 0.5])
    _, stats = group_preference_loss(
        policy_err, torch.zeros(5), torch.tensor([1, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 1, 1]), 10.0
    )
    # Group 1 has no positive: only group 0's |s| = 1, 3, 2 count.
    assert stats.mean_abs_reward == pytest.approx(2.0)
    assert stats.mean_group_size == pytest.approx(3.0)
