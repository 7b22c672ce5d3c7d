"""The publish gate on tiny seeded models: held-out split, RM GAUC regression refused, generators compared fairly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from perfusion.text_encoder import TextEncoder
from perfusion.user_features import USER_DIM
from tests.fixtures import tiny_group_batch, tiny_training_models
from trainer.batches import GroupBatch
from trainer.gate import belongs_to_heldout, draw_images, evaluate_reward_model, run_gate
from trainer.settings import TrainerSettings
from trainer.updates import run_update


def heldout_batch(num_groups: int = 6) -> GroupBatch:
    """Positives are bright images, negatives dark ones: a ranking an RM learns in a few steps."""

    def pixels_of(rng: np.random.Generator, grade: int) -> NDArray[np.uint8]:
        low, high = (150, 256) if grade else (0, 100)
        return rng.integers(low, high, size=(8, 8, 3), dtype=np.uint8)

    return tiny_group_batch(num_groups, 1, lambda group: [1, 0, 0, 2] if group % 2 else [0, 1, 0], pixels_of)


def gate_settings(**overrides: object) -> TrainerSettings:
    values: dict[str, object] = {
        "reward_steps": 10,
        "diffusion_steps": 0,
        "groups_per_batch": 6,
        "reward_learning_rate": 3e-3,
        "gate_generation_steps": 2,
        "gate_max_groups": 3,
        "pretrained_reward_towers": False,  # the tiny base has none; test_reward_pretrain.py tests loading them
    }
    values.update(overrides)
    return TrainerSettings(**values)  # type: ignore[arg-type]


def test_heldout_split_is_stable_and_has_the_requested_share() -> None:
    ids = [f"impression-{index}" for index in range(5000)]
    held = [sample_id for sample_id in ids if belongs_to_heldout(sample_id, 0.1)]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [sample_id for sample_id in ids if belongs_to_heldout(sample_id, 0.1)]
    assert not any(belongs_to_heldout(sample_id, 0.0) for sample_id in ids)
    assert set(held) <= {sample_id for sample_id in ids if belongs_to_heldout(sample_id, 0.3)}


def test_without_heldout_groups_the_candidate_is_published_with_the_reason(text_encoder: TextEncoder) -> None:
    settings = gate_settings(objective="none")
    models = tiny_training_models(settings)
    decision = run_gate(models.candidate(), models, text_encoder, None, settings)
    assert decision.publish
    assert "no held-out groups" in decision.reasons[0]


def test_a_reward_model_that_ranks_worse_is_refused(text_encoder: TextEncoder) -> None:
    settings = gate_settings(objective="none", gate_tolerance=0.05)
    batch = heldout_batch()
    serving = tiny_training_models(settings)
    run_update(serving, text_encoder, lambda: batch, settings, show_progress=False)
    candidate = serving.candidate()
    inverted = dataclasses.replace(batch, labels=(batch.labels == 0).long())
    run_update(candidate, text_encoder, lambda: inverted, gate_settings(objective="none", reward_steps=20), False)
    serving_gauc = evaluate_reward_model(serving, text_encoder, batch).gauc
    candidate_gauc = evaluate_reward_model(candidate, text_encoder, batch).gauc
    assert serving_gauc > candidate_gauc + settings.gate_tolerance  # the premise of the test

    decision = run_gate(candidate, serving, text_encoder, batch, settings)

    assert not decision.publish
    assert any("RM GAUC" in reason and "below the serving" in reason for reason in decision.reasons)
    assert decision.metrics["rm_gauc"] == pytest.approx(candidate_gauc)
    assert decision.metrics["serving_rm_gauc"] == pytest.approx(serving_gauc)
    # The serving RM is not worse than itself: the same check lets an unchanged copy through.
    assert run_gate(serving.candidate(), serving, text_encoder, batch, settings).publish


def test_generators_are_compared_on_the_same_noise_and_an_unchanged_one_passes(text_encoder: TextEncoder) -> None:
    settings = gate_settings(gate_generator_tolerance=0.0)
    serving = tiny_training_models(settings)
    decision = run_gate(serving.candidate(), serving, text_encoder, heldout_batch(), settings)
    assert decision.publish
    assert decision.metrics["generator_rm_score"] == decision.metrics["serving_generator_rm_score"]
    assert decision.metrics["generator_shortfall_std"] == 0.0
    assert decision.metrics["generator_prompts"] == 3.0


def test_generator_decision_follows_the_scores_at_zero_tolerance(text_encoder: TextEncoder) -> None:
    settings = gate_settings(gate_generator_tolerance=0.0)
    serving = tiny_training_models(settings)
    candidate = serving.candidate()
    assert candidate.adaptive_network is not None
    with torch.no_grad():  # move the zero convolutions so that the candidate draws different images
        for name, parameter in candidate.adaptive_network.named_parameters():
            if "zero" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    decision = run_gate(candidate, serving, text_encoder, heldout_batch(), settings)
    candidate_score = decision.metrics["generator_rm_score"]
    serving_score = decision.metrics["serving_generator_rm_score"]
    assert candidate_score != serving_score
    assert decision.publish == (candidate_score >= serving_score)


def test_draw_images_is_deterministic_in_the_noise_and_bounded(text_encoder: TextEncoder) -> None:
    models = tiny_training_models(gate_settings())
    states, _ = text_encoder.encode(["a red t-shirt", "a blue dress"])
    users = torch.rand(2, USER_DIM)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    first = draw_images(models, states, users, 3, noise)
    second = draw_images(models, states, users, 3, noise)
    assert first.shape == (2, 3, 8, 8)
    assert torch.equal(first, second)
    assert float(first.abs().max()) <= 1.0
