"""Reward-ranked groups: fresh candidates the trainer draws for the viewers it trains on, ranked by the reward
model, and trained on with the listwise objective beside the logged groups.

For an impression of a logged batch (its prompt and its viewer's u), the policy being trained draws
``reward_ranked_candidates`` images from fresh noise with the serving sampler; PerFusionRM scores them for that
viewer, and the ranking becomes grades: the best 2, the second 1, the rest 0 (order > click > none, as the
logged groups are graded). The loop's groups say what a viewer chose among what was shown; these say what the
reward model expects the viewer to choose among what the policy can draw now, so the update also sees choices the
base model never offered.

How much the trainer trusts them is the reward model's held-out reliability: ``clip((low - 0.5) / 0.5, 0, 1)``
with ``low`` the lower end of its held-out GAUC interval (``gate_confidence``), so a model not shown to rank better
than chance contributes nothing. Each generator step draws its batch from reward-ranked groups with probability
``reward_ranked_share`` x reliability, else from the logged groups. The reliability is measured once, on the first
generator step, after the update's reward-model steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from perfusion.text_encoder import TextEncoder
from trainer.batches import GroupBatch
from trainer.gate import draw_images, evaluate_reward_model
from trainer.settings import TrainerSettings
from trainer.updates import TrainingModels, encode_prompts, reward_scores

log = logging.getLogger(__name__)

RANKED_GRADES = (2, 1)  # the best candidate's grade, the second's; the rest 0


def reliability_of(gauc_low: float) -> float:
    """How far the lower end of the reward model's held-out GAUC interval lies above chance, in [0, 1]."""
    if math.isnan(gauc_low):
        return 0.0
    return float(min(1.0, max(0.0, (gauc_low - 0.5) / 0.5)))


def grades_by_rank(scores: torch.Tensor) -> torch.Tensor:
    """[N] long grades of one group's [N] scores: the best 2, the second 1, the rest 0 (ties: the first listed)."""
    grades = torch.zeros(scores.shape[0], dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True)
    for rank, grade in enumerate(RANKED_GRADES[: scores.shape[0]]):
        grades[order[rank]] = grade
    return grades


@torch.no_grad()
def reward_ranked_batch(
    models: TrainingModels, text_encoder: TextEncoder, batch: GroupBatch, candidates: int, generator: torch.Generator
) -> GroupBatch:
    """For each impression of ``batch``, ``candidates`` fresh images of the policy graded by the RM's ranking."""
    first_rows = torch.stack([torch.nonzero(batch.group_ids == g)[0, 0] for g in range(batch.num_groups)])
    users = batch.user_vectors[first_rows].repeat_interleave(candidates, dim=0)  # [G * n, U]
    states, _ = text_encoder.encode([*batch.prompts, ""])  # [G + 1, L, D]: the prompts, then ""
    text_states = states[: batch.num_groups].repeat_interleave(candidates, dim=0)
    noise = torch.randn((batch.num_groups * candidates, *batch.images.shape[1:]), generator=generator)
    trainable = models.generator
    if trainable is not None:
        trainable.eval()
    images = draw_images(models, text_states, users, noise, states[batch.num_groups :])  # [G * n, C, H, W]
    if trainable is not None:
        trainable.train()
    group_ids = torch.arange(batch.num_groups).repeat_interleave(candidates)
    ranked = GroupBatch(
        sample_ids=[f"reward-ranked-{sample_id}" for sample_id in batch.sample_ids],
        prompts=list(batch.prompts),
        image_ids=[f"reward-ranked-{g}-{p}" for g in range(batch.num_groups) for p in range(candidates)],
        images=images.float(),
        user_vectors=users,
        labels=torch.zeros(batch.num_groups * candidates, dtype=torch.long),
        group_ids=group_ids,
        positions=torch.arange(candidates).repeat(batch.num_groups),
    )
    models.reward_model.eval()
    _, pooled = encode_prompts(text_encoder, ranked)
    scores = reward_scores(models.reward_model, pooled, ranked).reshape(batch.num_groups, candidates)
    ranked.labels[:] = torch.cat([grades_by_rank(row) for row in scores])
    return ranked


class MixedGeneratorBatches:
    """The generator phase's batches: logged ones, or with probability share x reliability reward-ranked ones."""

    def __init__(
        self,
        models: TrainingModels,
        text_encoder: TextEncoder,
        logged_batches: Callable[[], GroupBatch],
        heldout: GroupBatch | None,
        settings: TrainerSettings,
    ) -> None:
        self.models = models
        self.text_encoder = text_encoder
        self.logged_batches = logged_batches
        self.heldout = heldout
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed + 1)
        self.reliability: float | None = None  # measured on the first call, after the reward-model steps
        self.ranked_batches = 0

    def measure_reliability(self) -> float:
        if self.heldout is None or self.heldout.num_groups == 0:
            return 0.0
        metrics = evaluate_reward_model(self.models, self.text_encoder, self.heldout, self.settings.gate_confidence)
        return reliability_of(metrics.gauc_low)

    def __call__(self) -> GroupBatch:
        if self.reliability is None:
            self.reliability = self.measure_reliability()
            log.info(
                "reward-ranked groups: reliability %.3f, share %.2f of the generator's batches",
                self.reliability,
                self.settings.reward_ranked_share * self.reliability,
            )
        batch = self.logged_batches()
        if self.rng.random() < self.settings.reward_ranked_share * self.reliability:
            self.ranked_batches += 1
            return reward_ranked_batch(
                self.models, self.text_encoder, batch, self.settings.reward_ranked_candidates, self.generator
            )
        return batch
