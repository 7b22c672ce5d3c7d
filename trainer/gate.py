"""The publish gate: a candidate version goes live only if it is not worse than the serving one on held-out groups.

The held-out slice is chosen by a hash of each sample's id (:func:`belongs_to_heldout`), so a sample is held out
on every replay and by every trainer process, and the update never trains on it. Two checks:

1. **Reward model.** GAUC (and MAP, logged) of the candidate RM and of the serving RM on the held-out groups.
   Fails when the candidate's GAUC is below the serving one's by more than ``gate_tolerance``.
2. **Generator.** For up to ``gate_max_groups`` held-out impressions, candidate and serving generators each draw
   one image for the impression's prompt and user from the *same* initial noise (DDIM, ``gate_generation_steps``);
   the candidate's reward model, the RM that goes live with the version, scores both. Fails when the candidate's
   mean score is below the serving one's by more than ``gate_generator_tolerance`` standard deviations of that
   RM's scores on the real held-out candidates (RM scores have no fixed scale, so the tolerance is relative).

A check that cannot run (no serving version yet, no held-out group with both classes, an untrained generator)
passes with its reason stated. Every decision carries the reasons, so a refusal is logged with why.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from perfusion.metrics import gauc, mean_average_precision
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
    mean_average_precision: float
    score_std: float  # standard deviation of the RM's scores over the held-out candidates


@torch.no_grad()
def evaluate_reward_model(models: TrainingModels, text_encoder: TextEncoder, heldout: GroupBatch) -> RewardModelMetrics:
    models.reward_model.eval()
    _, pooled_text = encode_prompts(text_encoder, heldout)
    scores = reward_scores(models.reward_model, pooled_text, heldout).double().numpy()
    labels = heldout.labels.numpy()
    groups = heldout.group_ids.numpy()
    return RewardModelMetrics(
        gauc=gauc(scores, labels, groups),
        mean_average_precision=mean_average_precision(scores, labels, groups),
        score_std=float(scores.std()) if scores.size > 1 else float("nan"),
    )


@torch.no_grad()
def draw_images(
    models: TrainingModels,
    text_states: Tensor,
    user_vectors: Tensor,
    steps: int,
    noise: Tensor,
) -> Tensor:
    """Deterministic DDIM samples of the policy: [B, C, H, W] in [-1, 1] from ``noise`` [B, C, H, W].

    text_states [B, L, D] and user_vectors [B, U] condition the policy as in training.
    """
    # As perfusion.models.base.build_sampling_scheduler: no clipping of the noisy early x0 estimates.
    scheduler = DDIMScheduler.from_config(models.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    sample = noise.clone()
    batch_size = sample.shape[0]
    for timestep in scheduler.timesteps:
        timesteps = torch.full((batch_size,), int(timestep), dtype=torch.long)
        eps = models.predict_noise(sample, timesteps, text_states, user_vectors)
        sample = scheduler.step(eps, timestep, sample).prev_sample
    return sample.clamp(-1.0, 1.0)


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
    states, _ = text_encoder.encode(heldout.prompts[:num_groups])  # [G, L, D]
    pooled = encode_prompts(text_encoder, heldout)[1][first_rows]  # [G, D]
    user_vectors = heldout.user_vectors[first_rows]
    image_shape = tuple(heldout.images.shape[1:])
    noise = torch.randn((num_groups, *image_shape), generator=torch.Generator().manual_seed(settings.seed))
    candidate.reward_model.eval()
    scores = {}
    for name, models in (("candidate", candidate), ("serving", serving)):
        images = draw_images(models, states, user_vectors, settings.gate_generation_steps, noise)
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
    candidate_rm = evaluate_reward_model(candidate, text_encoder, heldout)
    metrics: dict[str, float] = {
        "heldout_groups": float(heldout.num_groups),
        "rm_gauc": candidate_rm.gauc,
        "rm_map": candidate_rm.mean_average_precision,
    }
    if serving is None:
        return GateDecision(True, ("no serving version: the first version is published",), metrics)

    serving_rm = evaluate_reward_model(serving, text_encoder, heldout)
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

    if candidate.generator is None and serving.generator is None:
        reasons.append("generator check skipped: both versions generate with the base model")
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
