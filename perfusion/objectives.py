"""Training objectives over groups of K candidates with graded labels: pure torch functions on flat tensors.

Every objective takes one entry per candidate, flattened over the batch: ``labels`` (graded, 0 = negative,
> 0 = positive, higher = preferred: order > click > none) and ``group_ids`` (which impression the candidate
belongs to). Groups may have different sizes K within one batch; their candidates need not be contiguous.

Diffusion objectives take per-candidate denoising errors ``||eps - eps_model(x_t, t, c, u)||^2`` of the policy
and of the frozen reference, both on the same noised image x_t and timestep t, and define the implicit reward

    s = -beta * (policy_err - ref_err)

(callers that weight timesteps, the T * w(t) of Diffusion-DPO, fold the weight into ``beta`` or the errors).

- :func:`group_preference_loss`: Plackett-Luce over each group: every positive p against all lower-graded
  candidates n of its group, ``-log(exp s_p / (exp s_p + sum_n exp s_n))``. With one positive and one negative it
  is Diffusion-DPO's ``-log sigmoid(s_w - s_l)``.
- :func:`pairwise_dpo_loss`: Diffusion-DPO on every (p, lower-graded n) pair of each group.
- :func:`sft_loss`: the policy's denoising error on positives only (supervised fine-tuning on what users liked).
- :func:`group_ranking_loss`: the reward model's Plackett-Luce loss, the same comparisons with s = the score.
- :func:`positive_anchor_loss` and :func:`anchored`: a supervised term on the positives, ``lambda`` times their
  mean ``-s_p`` (their denoising error less the reference's, in implicit-reward units), added to a preference
  loss as RPO (arXiv 2404.19733) finds necessary: without it a preference loss can raise every candidate's error
  and still order them, and the images drift from anything users liked.

The group loss is the graded listwise Plackett-Luce of Diffusion-LPO (arXiv 2510.01540): for a ranking
order > click > none (a merchant's selection grades as a click), the likelihood of that ranking is the product,
over every position, of the softmax of the candidate placed there against all candidates placed at or below it;
with ties within a grade, each positive competes against itself and every lower grade. It is averaged over a
group's positives rather than summed, so that groups with more positives do not weigh more.

Groups without a positive or without a negative hold no comparison: the preference and ranking losses exclude
them (SFT excludes only groups without a positive) and count them in :class:`ObjectiveStats`. Each loss averages
within a group first, then over the groups it uses, so every impression weighs the same whatever its K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from perfusion.errors import PerfusionError


class ObjectiveInputError(PerfusionError):
    """The tensors handed to an objective do not describe one set of grouped candidates."""


@dataclass(frozen=True)
class ObjectiveStats:
    """What one objective call saw, for logging; every value is a plain Python number."""

    loss: float
    num_groups: int
    num_groups_used: int
    groups_without_positive: int
    groups_without_negative: int
    num_pairs: int
    implicit_accuracy: float  # share of (p, lower-graded n) pairs with s_p > s_n; NaN without pairs
    reward_margin: float  # mean of s_p - s_n over those pairs; NaN without pairs
    mean_abs_reward: float = float("nan")  # mean |s| over the candidates of used groups: of order one when healthy
    mean_group_size: float = float("nan")  # mean K of the used groups (a loss above 2 log K means saturation)
    anchor: float = float("nan")  # the supervised term's value before its weight, when one was added

    def as_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in asdict(self).items()}


@dataclass(frozen=True)
class _GroupLayout:
    """Which candidates compare with which, derived once from labels and group ids."""

    group_index: Tensor  # [N] long, dense group index 0..G-1 of each candidate
    num_groups: int
    group_used: Tensor  # [G] bool, the group has both a positive and a negative
    groups_without_positive: int
    groups_without_negative: int
    positive_used: Tensor  # [N] bool, a positive in a used group
    beats: Tensor  # [N, N] bool, beats[i, j]: i is a positive of a used group and j is lower-graded in the same group


def _check_inputs(labels: Tensor, group_ids: Tensor, *per_candidate: Tensor) -> None:
    if labels.dim() != 1:
        raise ObjectiveInputError(f"labels must be 1-d (one entry per candidate), got shape {tuple(labels.shape)}")
    for name, tensor in (("group_ids", group_ids), *(("per-candidate values", t) for t in per_candidate)):
        if tensor.shape != labels.shape:
            raise ObjectiveInputError(
                f"{name} must have the shape of labels {tuple(labels.shape)}, got {tuple(tensor.shape)}; "
                "flatten errors or scores to one value per candidate"
            )
    if labels.numel() and bool((labels < 0).any()):
        raise ObjectiveInputError(f"labels must be grades >= 0 (0 = negative), got minimum {labels.min().item()}")
    if group_ids.is_floating_point():
        raise ObjectiveInputError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


def _group_layout(labels: Tensor, group_ids: Tensor) -> _GroupLayout:
    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    is_positive = labels > 0
    positives_per_group = torch.zeros(num_groups, dtype=torch.long, device=labels.device)
    positives_per_group.index_add_(0, group_index, is_positive.long())
    negatives_per_group = torch.zeros_like(positives_per_group).index_add_(0, group_index, (~is_positive).long())
    has_positive = positives_per_group > 0
    has_negative = negatives_per_group > 0
    group_used = has_positive & has_negative
    positive_used = is_positive & group_used[group_index]
    same_group = group_index[:, None] == group_index[None, :]
    beats = same_group & (labels[None, :] < labels[:, None]) & positive_used[:, None]
    return _GroupLayout(
        group_index=group_index,
        num_groups=num_groups,
        group_used=group_used,
        groups_without_positive=int((~has_positive).sum().item()),
        groups_without_negative=int((~has_negative).sum().item()),
        positive_used=positive_used,
        beats=beats,
    )


def _mean_within_then_across_groups(values: Tensor, included: Tensor, layout: _GroupLayout) -> Tensor:
    """Mean of ``values[included]`` inside each group, then the mean of those over groups with any included value.

    ``values`` and ``included`` are [N]; returns a scalar that keeps the graph (0 with a graph when nothing is
    included, so a batch without comparisons still back-propagates harmlessly).
    """
    zeros = torch.zeros(layout.num_groups, dtype=values.dtype, device=values.device)
    sums = zeros.index_add(0, layout.group_index, torch.where(included, values, torch.zeros_like(values)))
    counts = zeros.index_add(0, layout.group_index, included.to(values.dtype))
    groups_with_values = counts > 0
    if not bool(groups_with_values.any()):
        return values.sum() * 0.0
    return (sums[groups_with_values] / counts[groups_with_values]).mean()


def _stats(loss: Tensor, implicit_rewards: Tensor, layout: _GroupLayout, num_groups_used: int) -> ObjectiveStats:
    with torch.no_grad():
        # [P] margins of every (p, n) comparison, row-major over beats.
        margins = (implicit_rewards[:, None] - implicit_rewards[None, :])[layout.beats]
        has_pairs = margins.numel() > 0
        in_used_group = layout.group_used[layout.group_index]  # [N]
        used_rewards = implicit_rewards[in_used_group]
        groups_used = int(layout.group_used.sum().item())
        return ObjectiveStats(
            loss=float(loss.detach().item()),
            num_groups=layout.num_groups,
            num_groups_used=num_groups_used,
            groups_without_positive=layout.groups_without_positive,
            groups_without_negative=layout.groups_without_negative,
            num_pairs=int(margins.numel()),
            implicit_accuracy=float((margins > 0).float().mean().item()) if has_pairs else float("nan"),
            reward_margin=float(margins.mean().item()) if has_pairs else float("nan"),
            mean_abs_reward=float(used_rewards.abs().mean().item()) if used_rewards.numel() else float("nan"),
            mean_group_size=used_rewards.numel() / groups_used if groups_used else float("nan"),
        )


def _plackett_luce_terms(implicit_rewards: Tensor, layout: _GroupLayout) -> Tensor:
    """[N] -log(exp s_p / (exp s_p + sum over lower-graded n of exp s_n)) for used positives, 0 elsewhere."""
    # Row i holds s_i itself and s_j of every j that i beats; -inf elsewhere. Rows of non-positives hold only s_i.
    competes = layout.beats | torch.eye(layout.beats.shape[0], dtype=torch.bool, device=layout.beats.device)
    logits = implicit_rewards[None, :].expand_as(competes).masked_fill(~competes, float("-inf"))
    terms = torch.logsumexp(logits, dim=1) - implicit_rewards
    return torch.where(layout.positive_used, terms, torch.zeros_like(terms))


def _implicit_rewards(policy_err: Tensor, ref_err: Tensor, beta: float) -> Tensor:
    if not beta > 0:
        raise ObjectiveInputError(f"beta must be > 0, got {beta}; Diffusion-DPO uses values around 1000-5000")
    return -beta * (policy_err - ref_err.detach())


def group_preference_loss(
    policy_err: Tensor, ref_err: Tensor, labels: Tensor, group_ids: Tensor, beta: float
) -> tuple[Tensor, ObjectiveStats]:
    """Group-level preference loss (Plackett-Luce over P against lower-graded candidates); all inputs [N]."""
    _check_inputs(labels, group_ids, policy_err, ref_err)
    layout = _group_layout(labels, group_ids)
    implicit_rewards = _implicit_rewards(policy_err, ref_err, beta)
    terms = _plackett_luce_terms(implicit_rewards, layout)
    loss = _mean_within_then_across_groups(terms, layout.positive_used, layout)
    return loss, _stats(loss, implicit_rewards, layout, int(layout.group_used.sum().item()))


def pairwise_dpo_loss(
    policy_err: Tensor, ref_err: Tensor, labels: Tensor, group_ids: Tensor, beta: float
) -> tuple[Tensor, ObjectiveStats]:
    """Diffusion-DPO, -log sigmoid(s_p - s_n), averaged over every (p, lower-graded n) pair of a group; [N] inputs."""
    _check_inputs(labels, group_ids, policy_err, ref_err)
    layout = _group_layout(labels, group_ids)
    implicit_rewards = _implicit_rewards(policy_err, ref_err, beta)
    # [N, N] pair losses; only entries where beats[i, j] count. Each pair belongs to the group of its positive i.
    pair_losses = -F.logsigmoid(implicit_rewards[:, None] - implicit_rewards[None, :])
    pair_losses = torch.where(layout.beats, pair_losses, torch.zeros_like(pair_losses))
    pairs_per_positive = layout.beats.sum(dim=1)
    group_index = layout.group_index
    zeros = torch.zeros(layout.num_groups, dtype=pair_losses.dtype, device=pair_losses.device)
    group_loss_sums = zeros.index_add(0, group_index, pair_losses.sum(dim=1))
    group_pair_counts = zeros.index_add(0, group_index, pairs_per_positive.to(pair_losses.dtype))
    used = group_pair_counts > 0
    if bool(used.any()):
        loss = (group_loss_sums[used] / group_pair_counts[used]).mean()
    else:
        loss = implicit_rewards.sum() * 0.0
    return loss, _stats(loss, implicit_rewards, layout, int(layout.group_used.sum().item()))


def sft_loss(
    policy_err: Tensor, ref_err: Tensor, labels: Tensor, group_ids: Tensor, beta: float
) -> tuple[Tensor, ObjectiveStats]:
    """Supervised fine-tuning: the policy's denoising error on positives, averaged per group then over groups.

    ``ref_err`` and ``beta`` enter only the logged implicit-reward statistics; groups with positives but no
    negative still train (there is something to imitate), so only groups without a positive are left out.
    """
    _check_inputs(labels, group_ids, policy_err, ref_err)
    layout = _group_layout(labels, group_ids)
    is_positive = labels > 0
    loss = _mean_within_then_across_groups(policy_err, is_positive, layout)
    num_groups_used = layout.num_groups - layout.groups_without_positive
    return loss, _stats(loss, _implicit_rewards(policy_err, ref_err, beta), layout, num_groups_used)


def group_ranking_loss(scores: Tensor, labels: Tensor, group_ids: Tensor) -> tuple[Tensor, ObjectiveStats]:
    """The reward model's group-wise ranking loss: Plackett-Luce on raw scores, as in the preference loss; [N]."""
    _check_inputs(labels, group_ids, scores)
    layout = _group_layout(labels, group_ids)
    terms = _plackett_luce_terms(scores, layout)
    loss = _mean_within_then_across_groups(terms, layout.positive_used, layout)
    return loss, _stats(loss, scores, layout, int(layout.group_used.sum().item()))


def positive_anchor_loss(
    policy_err: Tensor, ref_err: Tensor, labels: Tensor, group_ids: Tensor, beta: float
) -> tuple[Tensor, ObjectiveStats]:
    """The supervised term on positives in implicit-reward units: mean -s_p = beta * (policy_err - ref_err) over a
    group's positives, then over groups with a positive; 0 at the reference, lower as the policy fits positives.

    Its gradient is :func:`sft_loss`'s times beta (the reference error is a constant), so ``lambda`` in
    :func:`anchored` weighs it against the preference loss in the same units as s.
    """
    _check_inputs(labels, group_ids, policy_err, ref_err)
    layout = _group_layout(labels, group_ids)
    implicit_rewards = _implicit_rewards(policy_err, ref_err, beta)
    loss = _mean_within_then_across_groups(-implicit_rewards, labels > 0, layout)
    num_groups_used = layout.num_groups - layout.groups_without_positive
    return loss, _stats(loss, implicit_rewards, layout, num_groups_used)


DiffusionObjective = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, ObjectiveStats]]


def anchored(objective: DiffusionObjective, weight: float) -> DiffusionObjective:
    """``objective`` plus ``weight`` x :func:`positive_anchor_loss`; its stats are the objective's (loss: the
    preference part alone, comparable with log K) with the anchor's value in ``anchor``. ``weight`` 0: unchanged."""
    if weight < 0:
        raise ObjectiveInputError(f"the supervised weight must be >= 0, got {weight}")
    if weight == 0:
        return objective

    def with_anchor(
        policy_err: Tensor, ref_err: Tensor, labels: Tensor, group_ids: Tensor, beta: float
    ) -> tuple[Tensor, ObjectiveStats]:
        loss, stats = objective(policy_err, ref_err, labels, group_ids, beta)
        anchor, _ = positive_anchor_loss(policy_err, ref_err, labels, group_ids, beta)
        return loss + weight * anchor, replace(stats, anchor=float(anchor.detach().item()))

    return with_anchor
