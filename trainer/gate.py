"""The publish gate: a candidate version goes live only if it is not worse than the serving one on held-out groups.

The held-out slice is chosen by a hash of each sample's id (:func:`belongs_to_heldout`), so a sample is held out
on every replay and by every trainer process, and the update never trains on it. Two checks:

1. **Reward model.** GAUC (and MAP, logged) of the candidate RM and of the serving RM on the held-out groups.
   Fails when the candidate's GAUC is below the serving one's by more than ``gate_tolerance``.
2. **Generator.** For up to ``gate_max_groups`` held-out impressions, candidate and serving generators each draw
   one image for the impression's prompt and user from the *same* initial noise, with the sampler and guidance the
   service serves with (:data:`perfusion.sampling.SERVING_SAMPLER`); the candidate's reward model, the RM that goes
   live with the version, scores both. Fails when the candidate's mean score is below the serving one's by more
   than ``gate_generator_tolerance`` standard deviations of that RM's scores on the real held-out candidates (RM
   scores have no fixed scale, so the tolerance is relative).

The gate votes only when it can tell: with fewer than ``gate_min_groups`` held-out groups it abstains from both
checks, and it abstains from the generator check when the judging RM's held-out GAUC interval
(``gate_confidence``, bootstrap over groups) does not lie above chance (0.5): a judge that cannot rank real groups
says nothing about generated ones. An abstaining gate publishes and states why it did not vote, as does a check
that cannot run (no serving version yet, no held-out group with both classes, an untrained generator). Every
decision carries the reasons, so a refusal is logged with why.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from perfusion.metrics import gauc, gauc_interval, mean_average_precision
from perfusion.sampling import SERVING_SAMPLER, SamplerConfig, denoise
from perfusion.text_encoder import TextEncoder
from trainer.batches import GroupBatch
from trainer.settings import TrainerSettings
from trainer.updates import TrainingModels, encode_prompts, reward_scores

log = logging.getLogger(__name__)


def belongs_to_heldout(sample_id: str, fraction: float) -> bool:
    """Whether ``sample_id`` is in the held-out slice: a stable hash of the id, uniform in [0, 1), below fraction."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclass(frozen=True)
class RewardModelMetrics:
    gauc: float  # NaN without a held-out group that has both a positive and a negative
    gauc_low: float  # the GAUC's bootstrap interval over groups (NaN as gauc)
    gauc_high: float
    mean_average_precision: float
    score_std: float  # standard deviation of the RM's scores over the held-out candidates


@torch.no_grad()
def evaluate_reward_model(
    models: TrainingModels, text_encoder: TextEncoder, heldout: GroupBatch, confidence: float = 0.95
) -> RewardModelMetrics:
    models.reward_model.eval()
    _, pooled_text = encode_prompts(text_encoder, heldout)
    scores = reward_scores(models.reward_model, pooled_text, heldout).double().numpy()
    labels = heldout.labels.numpy()
    groups = heldout.group_ids.numpy()
    low, high = gauc_interval(scores, labels, groups, confidence=confidence)
    return RewardModelMetrics(
        gauc=gauc(scores, labels, groups),
        gauc_low=low,
        gauc_high=high,
        mean_average_precision=mean_average_precision(scores, labels, groups),
        score_std=float(scores.std()) if scores.size > 1 else float("nan"),
    )


@torch.no_grad()
def draw_images(
    models: TrainingModels,
    text_states: Tensor,
    user_vectors: Tensor,
    noise: Tensor,
    uncond_states: Tensor,
    sampler: SamplerConfig = SERVING_SAMPLER,
) -> Tensor:
    """The policy's images as the service draws them: [B, C, H, W] in [-1, 1] from ``noise`` [B, C, H, W].

    text_states [B, L, D] and user_vectors [B, U] condition the policy as in training; ``uncond_states`` [1, L, D]
    (the empty prompt) is guidance's other branch, which sees the same users, as in the service.
    """

    def noise_fn(x_t: Tensor, t: Tensor, states: Tensor) -> Tensor:
        # With guidance x_t holds 2B rows: the B conditional ones, then the B unconditional ones.
        users = user_vectors.repeat(x_t.shape[0] // user_vectors.shape[0], 1)
        return models.predict_noise(x_t, t, states, users)

    return denoise(noise_fn, noise, text_states, sampler, models.base_config, uncond_states=uncond_states)


@dataclass(frozen=True)
class GeneratorComparison:
    candidate_score: float  # mean RM score of the candidate generator's images
    serving_score: float
    num_prompts: int


@torch.no_grad()
def compare_generators(
    candidate: TrainingModels,
    serving: TrainingModels,
    text_encoder: TextEncoder,
    heldout: GroupBatch,
    settings: TrainerSettings,
) -> GeneratorComparison:
    """Both generators draw for the same held-out (prompt, user) pairs from the same noise; the candidate RM scores."""
    num_groups = min(heldout.num_groups, settings.gate_max_groups)
    # First candidate row of each of the first num_groups impressions: its user vector is the impression's.
    first_rows = torch.stack([torch.nonzero(heldout.group_ids == g)[0, 0] for g in range(num_groups)])
    states, _ = text_encoder.encode([*heldout.prompts[:num_groups], ""])  # [G + 1, L, D]: the prompts, then ""
    states, uncond_states = states[:num_groups], states[num_groups:]
    pooled = encode_prompts(text_encoder, heldout)[1][first_rows]  # [G, D]
    user_vectors = heldout.user_vectors[first_rows]
    image_shape = tuple(heldout.images.shape[1:])
    noise = torch.randn((num_groups, *image_shape), generator=torch.Generator().manual_seed(settings.seed))
    candidate.reward_model.eval()
    scores = {}
    for name, models in (("candidate", candidate), ("serving", serving)):
        images = draw_images(models, states, user_vectors, noise, uncond_states)
        scores[name] = float(candidate.reward_model(pooled, images, user_vectors).reshape(-1).mean().item())
    return GeneratorComparison(scores["candidate"], scores["serving"], num_groups)


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)


def run_gate(
    candidate: TrainingModels,
    serving: TrainingModels | None,
    text_encoder: TextEncoder,
    heldout: GroupBatch | None,
    settings: TrainerSettings,
) -> GateDecision:
    """Decide whether ``candidate`` may replace ``serving``; the metrics go into the published manifest."""
    if heldout is None or heldout.num_groups == 0:
        return GateDecision(True, ("no held-out groups yet: published without a comparison",))
    reasons: list[str] = []
    publish = True
    candidate_rm = evaluate_reward_model(candidate, text_encoder, heldout, settings.gate_confidence)
    metrics: dict[str, float] = {
        "heldout_groups": float(heldout.num_groups),
        "rm_gauc": candidate_rm.gauc,
        "rm_gauc_low": candidate_rm.gauc_low,
        "rm_gauc_high": candidate_rm.gauc_high,
        "rm_map": candidate_rm.mean_average_precision,
        "gate_voted": 0.0,
    }
    if serving is None:
        return GateDecision(True, ("no serving version: the first version is published",), metrics)
    if heldout.num_groups < settings.gate_min_groups:
        reason = (
            f"gate abstained: {heldout.num_groups} held-out groups, fewer than the {settings.gate_min_groups} "
            "(gate_min_groups) it needs to vote; published without a comparison"
        )
        return GateDecision(True, (reason,), metrics)
    metrics["gate_voted"] = 1.0

    serving_rm = evaluate_reward_model(serving, text_encoder, heldout, settings.gate_confidence)
    metrics.update(serving_rm_gauc=serving_rm.gauc, serving_rm_map=serving_rm.mean_average_precision)
    if math.isnan(candidate_rm.gauc) or math.isnan(serving_rm.gauc):
        reasons.append("RM check skipped: no held-out group has both a positive and a negative")
    elif candidate_rm.gauc < serving_rm.gauc - settings.gate_tolerance:
        publish = False
        reasons.append(
            f"RM GAUC {candidate_rm.gauc:.4f} is below the serving {serving_rm.gauc:.4f} by more than the "
            f"tolerance {settings.gate_tolerance}"
        )
    else:
        reasons.append(f"RM GAUC {candidate_rm.gauc:.4f} vs serving {serving_rm.gauc:.4f}: within tolerance")

    judge_above_chance = candidate_rm.gauc_low > 0.5  # False for NaN too
    if candidate.generator is None and serving.generator is None:
        reasons.append("generator check skipped: both versions generate with the base model")
    elif not judge_above_chance:
        reasons.append(
            f"generator check abstained: the judging RM's held-out GAUC {candidate_rm.gauc:.3f} has the "
            f"{settings.gate_confidence:.0%} interval [{candidate_rm.gauc_low:.3f}, {candidate_rm.gauc_high:.3f}], "
            "not above chance (0.5), so its scores of generated images say nothing"
        )
    else:
        comparison = compare_generators(candidate, serving, text_encoder, heldout, settings)
        metrics.update(
            generator_rm_score=comparison.candidate_score,
            serving_generator_rm_score=comparison.serving_score,
            generator_prompts=float(comparison.num_prompts),
        )
        spread = candidate_rm.score_std if candidate_rm.score_std > 0 else 1.0
        shortfall = (comparison.serving_score - comparison.candidate_score) / spread
        metrics["generator_shortfall_std"] = shortfall
        if shortfall > settings.gate_generator_tolerance:
            publish = False
            reasons.append(
                f"generator mean RM score {comparison.candidate_score:.4f} is below the serving "
                f"{comparison.serving_score:.4f} by {shortfall:.3f} score std, more than the tolerance "
                f"{settings.gate_generator_tolerance}"
            )
        else:
            reasons.append(
                f"generator mean RM score {comparison.candidate_score:.4f} vs serving "
                f"{comparison.serving_score:.4f}: within tolerance"
            )
    return GateDecision(publish, tuple(reasons), metrics)
