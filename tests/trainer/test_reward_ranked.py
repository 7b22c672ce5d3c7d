"""Reward-ranked groups: grades from the reward model's ranking, the reliability that scales their share, and an
update that trains on them."""

from __future__ import annotations

import numpy as np
import torch

from perfusion.text_encoder import TextEncoder
from tests.fixtures import tiny_group_batch, tiny_training_models
from trainer.batches import GroupBatch
from trainer.reward_ranked import MixedGeneratorBatches, grades_by_rank, reliability_of, reward_ranked_batch
from trainer.settings import TrainerSettings
from trainer.updates import encode_prompts, reward_scores, run_update


def settings(**overrides: object) -> TrainerSettings:
    values: dict[str, object] = {"reward_steps": 1, "diffusion_steps": 2, "groups_per_batch": 2, "beta": 500.0}
    values.update(pretrained_reward_towers=False, draws_per_group=1, **overrides)
    return TrainerSettings(**values)  # type: ignore[arg-type]


def batch() -> GroupBatch:
    return tiny_group_batch(
        2, 0, lambda group: [1, 0, 0], lambda rng, grade: rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    )


def test_grades_follow_the_scores_best_two_then_one() -> None:
    assert grades_by_rank(torch.tensor([0.1, 0.9, -2.0, 0.5])).tolist() == [0, 2, 0, 1]
    assert grades_by_rank(torch.tensor([3.0, 1.0])).tolist() == [2, 1]


def test_reliability_is_the_interval_low_end_above_chance() -> None:
    assert reliability_of(0.5) == 0.0 and reliability_of(0.4) == 0.0 and reliability_of(float("nan")) == 0.0
    assert reliability_of(0.75) == 0.5 and reliability_of(1.0) == 1.0


def test_a_ranked_batch_grades_fresh_candidates_by_the_reward_model(text_encoder: TextEncoder) -> None:
    models = tiny_training_models(settings())
    logged = batch()
    ranked = reward_ranked_batch(models, text_encoder, logged, 3, torch.Generator().manual_seed(0))
    assert ranked.num_groups == logged.num_groups and ranked.num_candidates == 3 * logged.num_groups
    assert ranked.images.shape[1:] == logged.images.shape[1:] and float(ranked.images.abs().max()) <= 1.0
    _, pooled = encode_prompts(text_encoder, ranked)
    with torch.no_grad():
        scores = reward_scores(models.reward_model, pooled, ranked).reshape(logged.num_groups, 3)
    for group in range(logged.num_groups):
        assert ranked.labels[ranked.group_ids == group].tolist() == grades_by_rank(scores[group]).tolist()


def test_without_a_reliable_reward_model_every_batch_is_logged(text_encoder: TextEncoder) -> None:
    values = settings(reward_ranked_share=1.0)
    models = tiny_training_models(values)
    mixed = MixedGeneratorBatches(models, text_encoder, batch, None, values)
    assert mixed() is not None and mixed.reliability == 0.0 and mixed.ranked_batches == 0


def test_an_update_on_ranked_batches_moves_the_adaptive_network_only(text_encoder: TextEncoder) -> None:
    values = settings(reward_ranked_share=1.0, reward_ranked_candidates=3)
    models = tiny_training_models(values)
    assert models.adaptive_network is not None
    mixed = MixedGeneratorBatches(models, text_encoder, batch, None, values)
    mixed.reliability = 1.0  # as a reward model whose held-out interval lies wholly at GAUC 1 would give
    adaptive_before = {k: v.clone() for k, v in models.adaptive_network.state_dict().items()}
    base_before = {k: v.clone() for k, v in models.base_unet.state_dict().items()}
    run_update(models, text_encoder, batch, values, show_progress=False, generator_batches=mixed)
    assert mixed.ranked_batches == values.diffusion_steps
    after = models.adaptive_network.state_dict()
    assert any(not torch.equal(adaptive_before[k], after[k]) for k in after)
    assert all(torch.equal(base_before[k], v) for k, v in models.base_unet.state_dict().items())
