"""The publish gate on tiny seeded models: held-out split, RM GAUC regression refused, generators compared fairly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from perfusion.sampling import SERVING_SAMPLER
from perfusion.text_encoder import TextEncoder
from perfusion.user_features import USER_DIM
from tests.fixtures import tiny_group_batch, tiny_training_models
from trainer.batches import GroupBatch
from trainer.gate import belongs_to_heldout, draw_images, evaluate_reward_model, run_gate
from trainer.settings import TrainerSettings
from trainer.updates import TrainingModels, run_update


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
        "gate_max_groups": 3,
        "gate_min_groups": 1,  # heldout_batch() holds 6 groups
        "pretrained_reward_towers": False,  # the tiny base has none; test_reward_pretrain.py tests loading them
    }
    values.update(overrides)
    return TrainerSettings(**values)  # type: ignore[arg-type]


def judged_serving(settings: TrainerSettings, text_encoder: TextEncoder) -> TrainingModels:
    """A serving version whose RM ranks the held-out groups (bright over dark), so the gate may use it as a judge."""
    serving = tiny_training_models(settings)
    run_update(serving, text_encoder, heldout_batch, settings, show_progress=False)
    return serving


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
    serving = judged_serving(settings, text_encoder)
    decision = run_gate(serving.candidate(), serving, text_encoder, heldout_batch(), settings)
    assert decision.publish and decision.metrics["gate_voted"] == 1.0
    assert decision.metrics["rm_gauc_low"] > 0.5
    assert decision.metrics["generator_rm_score"] == decision.metrics["serving_generator_rm_score"]
    assert decision.metrics["generator_shortfall_std"] == 0.0
    assert decision.metrics["generator_prompts"] == 3.0


def test_generator_decision_follows_the_scores_at_zero_tolerance(text_encoder: TextEncoder) -> None:
    settings = gate_settings(gate_generator_tolerance=0.0)
    serving = judged_serving(settings, text_encoder)
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
    uncond, _ = text_encoder.encode([""])
    first = draw_images(models, states, users, noise, uncond)
    second = draw_images(models, states, users, noise, uncond)
    assert first.shape == (2, 3, 8, 8)
    assert torch.equal(first, second)
    assert float(first.abs().max()) <= 1.0


def test_draw_images_samples_as_the_service_does_with_guidance_on_both_branches(text_encoder: TextEncoder) -> None:
    models = tiny_training_models(gate_settings())
    seen: list[tuple[int, int]] = []
    predict = models.predict_noise

    def recording(x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        seen.append((x_t.shape[0], users.shape[0]))
        return predict(x_t, t, states, users)

    models.predict_noise = recording  # type: ignore[method-assign,assignment]
    states, _ = text_encoder.encode(["a red t-shirt", "a blue dress", "a t-shirt"])
    uncond, _ = text_encoder.encode([""])
    draw_images(models, states, torch.rand(3, USER_DIM), torch.randn(3, 3, 8, 8), uncond)
    assert seen and all(rows == (6, 6) for rows in seen)  # 3 conditional + 3 unconditional rows, each with its user
    assert SERVING_SAMPLER.guidance_scale != 1.0


def test_with_too_few_heldout_groups_the_gate_abstains_and_publishes(text_encoder: TextEncoder) -> None:
    settings = gate_settings(objective="none", gate_min_groups=7)
    batch = heldout_batch()  # 6 groups
    serving = judged_serving(settings, text_encoder)
    candidate = serving.candidate()
    inverted = dataclasses.replace(batch, labels=(batch.labels == 0).long())
    run_update(candidate, text_encoder, lambda: inverted, gate_settings(objective="none", reward_steps=20), False)
    decision = run_gate(candidate, serving, text_encoder, batch, settings)
    assert decision.publish  # a worse RM, but 6 groups are too few to vote on
    assert decision.reasons == (
        "gate abstained: 6 held-out groups, fewer than the 7 (gate_min_groups) it needs to vote; published without "
        "a comparison",
    )
    assert decision.metrics["gate_voted"] == 0.0 and "serving_rm_gauc" not in decision.metrics


def test_a_judge_that_ranks_no_better_than_chance_does_not_vote_on_generators(text_encoder: TextEncoder) -> None:
    settings = gate_settings(gate_generator_tolerance=0.0)
    serving = tiny_training_models(settings)  # an untrained RM: its held-out interval reaches below 0.5
    candidate = serving.candidate()
    assert candidate.adaptive_network is not None
    with torch.no_grad():
        for parameter in candidate.adaptive_network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    decision = run_gate(candidate, serving, text_encoder, heldout_batch(), settings)
    assert decision.metrics["rm_gauc_low"] <= 0.5
    assert decision.publish and "generator_rm_score" not in decision.metrics
    assert any(reason.startswith("generator check abstained: the judging RM") for reason in decision.reasons)
