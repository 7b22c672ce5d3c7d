"""The offline reward-model comparison: PerFusionRM and the same towers without plug-ins, fitted on live groups
and scored on held-out ones, with the simulator's true utilities as the ceiling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulator.eval import EvaluationError
from simulator.eval.arm import RewardExample
from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import LIVE
from simulator.eval.stats import bootstrap_gauc, interval

TRUE_UTILITY_CEILING = "true_utility_ceiling"


def compare_reward_models(
    examples: Sequence[RewardExample],
    config: EvaluationConfig,
    text_encoder: Any,
    groups_per_step: int | None = None,
) -> dict[str, dict[str, Any]]:
    """PerFusionRM and the same towers without plug-ins, both from the pretrained towers and trained alike on live
    groups, scored on held-out groups.

    Each model's GAUC comes with a 95% bootstrap interval over held-out groups, and the paired difference
    (PerFusionRM less the model without plug-ins) with its own. A reference row, ``true_utility_ceiling``, scores the
    same groups by the simulator's true utilities: the GAUC an oracle of each shopper's taste would reach on these
    noisy clicks and orders, so the ceiling of any reward model here (no model ever reads those utilities).

    ``groups_per_step``: each step fits a draw of this many live groups, as the trainer's batches are (None: every
    live group every step, which a round of hundreds of groups makes the slowest part of a run).
    """

    from perfusion.metrics import gauc, mean_average_precision

    train = [example for example in examples if example.slice == LIVE]
    heldout = [example for example in examples if example.slice != LIVE]
    if not train or not heldout:
        raise EvaluationError("the offline reward-model comparison needs live and held-out groups; run a round")
    train_batch, heldout_batch = _reward_batch(train), _reward_batch(heldout)
    labels, groups = heldout_batch.labels.numpy(), heldout_batch.group_ids.numpy()
    scores: dict[str, NDArray[np.float64]] = {}
    rng = np.random.default_rng([config.seed, 6])

    def batches() -> Any:
        if groups_per_step is None or groups_per_step >= len(train):
            return train_batch
        return _reward_batch([train[i] for i in rng.choice(len(train), size=groups_per_step, replace=False)])

    for name, personalized in (("perfusion_rm", True), ("rm_without_plugins", False)):
        # From the pretrained towers, as the trainer starts every new reward model.
        model = fit_reward_model(
            personalized,
            config.base_checkpoint,
            batches,
            config.offline_rm_steps,
            text_encoder,
            config.seed,
        )
        scores[name] = reward_model_scores(model, text_encoder, heldout_batch)
    # Candidates are collated group by group in slot order, as the utilities are listed.
    scores[TRUE_UTILITY_CEILING] = np.concatenate([np.asarray(e.true_utilities, np.float64) for e in heldout])
    boot = bootstrap_gauc(scores, labels, groups, config.seed, config.bootstrap_samples)
    results: dict[str, dict[str, Any]] = {}
    for name, model_scores in scores.items():
        results[name] = {
            "gauc": float(gauc(model_scores, labels, groups)),
            "gauc_ci95": interval(boot[name]),
            "map": float(mean_average_precision(model_scores, labels, groups)),
            "train_groups": float(0 if name == TRUE_UTILITY_CEILING else len(train)),
            "heldout_groups": float(len(heldout)),
        }
    difference = results["perfusion_rm"]["gauc"] - results["rm_without_plugins"]["gauc"]
    results["perfusion_rm"]["gauc_lift_vs_without_plugins"] = {
        "value": difference,
        "ci95": interval(boot["perfusion_rm"] - boot["rm_without_plugins"]),
    }
    return results


def fit_reward_model(
    personalized: bool,
    towers: Path | None,
    next_batch: Callable[[], Any],
    steps: int,
    text_encoder: Any,
    seed: int,
    learning_rate: float = 1e-3,
) -> Any:
    """A PerFusionRM (``personalized=False``: the same towers without plug-ins) from the pretrained towers in
    ``towers`` (None: random towers), after ``steps`` of the trainer's reward step on ``next_batch()`` batches."""
    import torch

    from perfusion.models.reward import PerFusionRM, RewardModelConfig
    from perfusion.user_features import USER_DIM
    from trainer.reward_pretrain import load_pretrained_towers
    from trainer.updates import encode_prompts, reward_model_step

    torch.manual_seed(seed)
    model = PerFusionRM(RewardModelConfig(personalized=personalized, user_dim=USER_DIM))
    if towers is not None:
        load_pretrained_towers(model, towers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        batch = next_batch()
        _, pooled = encode_prompts(text_encoder, batch)
        reward_model_step(model, optimizer, pooled, batch, max_norm=1.0)
    return model.eval()


def reward_model_scores(model: Any, text_encoder: Any, batch: Any) -> NDArray[np.float64]:
    """The model's score of every candidate of a collated batch: [N] float64."""
    import torch

    from trainer.updates import encode_prompts, reward_scores

    with torch.no_grad():
        _, pooled = encode_prompts(text_encoder, batch)
        return reward_scores(model, pooled, batch).double().numpy()


def _reward_batch(examples: Sequence[RewardExample]) -> Any:
    from perfusion.attributes import DESCRIPTOR_DIM
    from perfusion.contracts.records import GradedCandidate, GroupSample
    from perfusion.image_store import GENERATED_PREFIX
    from trainer.batches import collate_groups

    samples, pixels = [], {}
    for index, example in enumerate(examples):
        candidates = []
        for position, (image, grade) in enumerate(zip(example.images, example.grades, strict=True)):
            image_id = f"{GENERATED_PREFIX}{index}-{position}"
            pixels[image_id] = image
            candidates.append(
                GradedCandidate(image_id=image_id, position=position, descriptor=[0.0] * DESCRIPTOR_DIM, grade=grade)
            )
        samples.append(
            GroupSample(
                sample_id=f"offline-{index}",
                user_id="offline",
                design_id="offline",
                prompt=example.prompt,
                model_version="offline",
                impression_ts=0.0,
                candidates=candidates,
            )
        )
    return collate_groups(samples, [example.user_vector for example in examples], pixels)
