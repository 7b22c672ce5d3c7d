"""One incremental update on tiny seeded models: trainable parts change, the frozen base and text encoder do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from perfusion.errors import ConfigError
from perfusion.text_encoder import TextEncoder
from tests.fixtures import tiny_group_batch, tiny_training_models
from trainer.batches import GroupBatch
from trainer.settings import TrainerSettings
from trainer.updates import (
    denoising_errors,
    encode_prompts,
    noised_inputs,
    run_update,
)


def tiny_batch(num_groups: int = 4, seed: int = 0) -> GroupBatch:
    return tiny_group_batch(
        num_groups,
        seed,
        lambda group: [2, 0, 1, 0] if group % 2 == 0 else [0, 1, 0],
        lambda rng, grade: rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
        lambda group: ["a red t-shirt", "a navy striped dress"][group % 2],
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)]


def small_settings(**overrides: object) -> TrainerSettings:
    values: dict[str, object] = {"reward_steps": 2, "diffusion_steps": 2, "groups_per_batch": 4, "beta": 500.0}
    # The tiny base has no pretrained reward towers; loading them is tested in test_reward_pretrain.py.
    values["pretrained_reward_towers"] = False
    values.update(overrides)
    return TrainerSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("objective", "use_adaptive_network"),
    [("group", True), ("pairwise_dpo", True), ("group", False), ("sft", False), ("pairwise_dpo", False)],
)
def test_update_changes_trainable_parameters_and_no_frozen_one(
    text_encoder: TextEncoder, objective: str, use_adaptive_network: bool
) -> None:
    settings = small_settings(objective=objective, use_adaptive_network=use_adaptive_network)
    models = tiny_training_models(settings)
    trainable = models.generator
    assert trainable is not None
    base_before = snapshot(models.base_unet)
    text_before = snapshot(text_encoder.model)
    reward_before = snapshot(models.reward_model)
    generator_before = snapshot(trainable)
    batch = tiny_batch()

    report = run_update(models, text_encoder, lambda: batch, settings, show_progress=False)

    assert changed(reward_before, models.reward_model), "the reward model did not change"
    assert changed(generator_before, trainable), "the generator's trainable part did not change"
    assert changed(base_before, models.base_unet) == [], "the frozen base U-Net changed"
    assert changed(text_before, text_encoder.model) == [], "the frozen text encoder changed"
    assert report.reward_model.steps == 2 and report.generator.steps == 2
    assert np.isfinite(report.reward_model.loss) and np.isfinite(report.generator.loss)
    assert 0.0 <= report.generator.implicit_accuracy <= 1.0


def test_objective_none_trains_only_the_reward_model(text_encoder: TextEncoder) -> None:
    settings = small_settings(objective="none")
    models = tiny_training_models(settings)
    assert models.generator is None
    base_before = snapshot(models.base_unet)
    reward_before = snapshot(models.reward_model)
    report = run_update(models, text_encoder, lambda: tiny_batch(), settings, show_progress=False)
    assert changed(reward_before, models.reward_model)
    assert changed(base_before, models.base_unet) == []
    assert report.generator.steps == 0
    assert set(models.components()) == {"reward_model"}


def test_reward_model_learns_to_rank_a_fixed_batch(text_encoder: TextEncoder) -> None:
    settings = small_settings(objective="none", reward_steps=20, reward_learning_rate=3e-3)
    models = tiny_training_models(settings)
    batch = tiny_batch()
    report_first = run_update(
        models, text_encoder, lambda: batch, small_settings(objective="none", reward_steps=1), show_progress=False
    )
    report = run_update(models, text_encoder, lambda: batch, settings, show_progress=False)
    assert report.reward_model.loss < report_first.reward_model.loss


def test_a_fresh_adaptive_network_has_the_reference_errors(text_encoder: TextEncoder) -> None:
    # Zero-initialised, the policy equals the reference; equal errors show both saw the same x_t and t.
    models = tiny_training_models(small_settings())
    batch = tiny_batch()
    text_states, _ = encode_prompts(text_encoder, batch)
    policy_err, reference_err = denoising_errors(models, batch, text_states, torch.Generator().manual_seed(3))
    assert torch.equal(policy_err.detach(), reference_err)
    assert policy_err.requires_grad and not reference_err.requires_grad


def test_candidates_of_one_impression_share_noise_and_timestep() -> None:
    models = tiny_training_models(small_settings())
    batch = tiny_batch()
    x_t, noise, timesteps = noised_inputs(models, batch, torch.Generator().manual_seed(0))
    assert x_t.shape == batch.images.shape
    for group in range(batch.num_groups):
        rows = batch.group_ids == group
        assert timesteps[rows].unique().numel() == 1
        assert torch.equal(noise[rows], noise[rows][:1].expand_as(noise[rows]))
    assert timesteps.unique().numel() > 1


def test_each_draw_shares_noise_and_timestep_within_an_impression_and_uses_serving_timesteps() -> None:
    models = tiny_training_models(small_settings())
    assert models.train_timesteps is not None
    batch = tiny_batch()
    n, draws = batch.num_candidates, 3
    x_t, noise, timesteps = noised_inputs(models, batch, torch.Generator().manual_seed(0), draws)
    assert x_t.shape == (draws * n, *batch.images.shape[1:])
    assert set(timesteps.tolist()) <= set(models.train_timesteps.tolist())
    for draw in range(draws):
        rows = slice(draw * n, (draw + 1) * n)
        for group in range(batch.num_groups):
            in_group = batch.group_ids == group
            assert timesteps[rows][in_group].unique().numel() == 1
            assert torch.equal(noise[rows][in_group], noise[rows][in_group][:1].expand_as(noise[rows][in_group]))
    assert not torch.equal(noise[:n], noise[n : 2 * n])
    with pytest.raises(ConfigError, match="draws per group must be at least 1"):
        noised_inputs(models, batch, torch.Generator().manual_seed(0), 0)


def test_errors_are_the_mean_over_draws_of_single_draw_errors(text_encoder: TextEncoder) -> None:
    models = tiny_training_models(small_settings(train_timesteps="all"))
    assert models.train_timesteps is None
    batch = tiny_batch()
    text_states, _ = encode_prompts(text_encoder, batch)
    x_t, noise, timesteps = noised_inputs(models, batch, torch.Generator().manual_seed(5), 2)
    with torch.no_grad():
        policy_err, reference_err = denoising_errors(models, batch, text_states, torch.Generator().manual_seed(5), 2)
        eps = models.reference_noise(x_t, timesteps, text_states.repeat(2, 1, 1))
    per_draw = (eps - noise).pow(2).mean(dim=(1, 2, 3)).view(2, -1)
    assert torch.allclose(reference_err, per_draw.mean(dim=0))
    assert torch.equal(policy_err, reference_err)  # a fresh network is the reference


def test_the_update_reports_the_reward_scale_and_counts_saturated_steps(text_encoder: TextEncoder) -> None:
    # A learning rate far too high for beta: the implicit rewards blow up and the loss passes 2 log K.
    settings = small_settings(diffusion_steps=6, adaptive_learning_rate=0.5, beta=1e5, draws_per_group=1)
    models = tiny_training_models(settings)
    report = run_update(models, text_encoder, lambda: tiny_batch(), settings, show_progress=False)
    assert report.generator.mean_abs_reward > 1.0
    assert report.generator.saturated_steps >= 1
    assert report.as_dict()["generator_saturated_steps"] == report.generator.saturated_steps


def test_candidate_copy_trains_without_touching_the_serving_version(text_encoder: TextEncoder) -> None:
    settings = small_settings()
    serving = tiny_training_models(settings)
    serving_reward = snapshot(serving.reward_model)
    assert serving.adaptive_network is not None
    serving_adaptive = snapshot(serving.adaptive_network)
    candidate = serving.candidate()
    assert candidate.base_unet is serving.base_unet
    run_update(candidate, text_encoder, lambda: tiny_batch(), settings, show_progress=False)
    assert changed(serving_reward, serving.reward_model) == []
    assert changed(serving_adaptive, serving.adaptive_network) == []
    assert set(candidate.components()) == {"reward_model", "adaptive_network"}


def test_a_candidate_of_a_version_frozen_for_serving_trains() -> None:
    serving = tiny_training_models(small_settings())
    assert serving.adaptive_network is not None
    serving.adaptive_network.requires_grad_(False)  # as the service freezes the network it serves
    candidate = serving.candidate()
    assert candidate.adaptive_network is not None
    assert all(p.requires_grad for p in candidate.adaptive_network.parameters())
    assert not any(p.requires_grad for p in serving.adaptive_network.parameters())


def test_without_the_adaptive_network_the_version_holds_a_fine_tuned_unet() -> None:
    models = tiny_training_models(small_settings(use_adaptive_network=False))
    assert models.adaptive_network is None and models.finetuned_unet is not None
    assert models.finetuned_unet is not models.base_unet
    assert set(models.components()) == {"reward_model", "unet"}
    assert TrainerSettings.for_arm("group_without_adaptive").model_dump()["use_adaptive_network"] is False


def test_the_cli_offers_exactly_the_arms_and_objectives_of_the_settings() -> None:
    from ops.commands.train import ARM_NAMES, OBJECTIVE_NAMES
    from trainer.settings import ARMS, OBJECTIVES

    assert tuple(ARMS) == ARM_NAMES
    assert OBJECTIVE_NAMES == OBJECTIVES


def test_settings_refuse_values_that_would_break_the_guarantees() -> None:
    from perfusion.errors import ConfigError

    with pytest.raises(ConfigError, match="dedupe_window"):
        TrainerSettings(buffer_capacity=100, dedupe_window=10)
    with pytest.raises(ConfigError, match="objective"):
        TrainerSettings(objective="contrastive")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown arm"):
        TrainerSettings.for_arm("everything")
    with pytest.raises(ConfigError, match="unknown trainer settings"):
        TrainerSettings.from_env(learning_rate=1.0)
    assert TrainerSettings.for_arm("adaptive_with_pairwise_dpo", reward_steps=3).arm_description == {
        "objective": "pairwise_dpo",
        "use_adaptive_network": True,
        "personalized_reward_model": True,
    }


def test_each_generator_trains_at_its_own_learning_rate() -> None:
    adaptive = TrainerSettings.for_arm("perfusion", adaptive_learning_rate=3e-3, unet_learning_rate=2e-5)
    unet_copy = TrainerSettings.for_arm("pairwise_dpo", adaptive_learning_rate=3e-3, unet_learning_rate=2e-5)
    assert adaptive.generator_learning_rate == 3e-3
    assert unet_copy.generator_learning_rate == 2e-5
    defaults = TrainerSettings()
    # The adaptive network's residuals start at 0 and must grow within one update: it gets the larger default.
    assert defaults.adaptive_learning_rate > defaults.unet_learning_rate


def test_the_trainer_reads_images_from_the_store_the_service_writes_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERFUSION_IMAGES_URL", "memory://shared-images")
    assert TrainerSettings().resolved_image_root() == "memory://shared-images"
    assert TrainerSettings(image_root=tmp_path).resolved_image_root() == tmp_path  # a folder given wins
    monkeypatch.delenv("PERFUSION_IMAGES_URL")
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    assert TrainerSettings().resolved_image_root() == str((tmp_path / "state" / "images").resolve())
