"""Contrastive pretraining of PerFusionRM's towers: the loss by hand, loading into a personalized model, and a short
run on the real catalog that learns to name held-out captions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perfusion.errors import ConfigError
from perfusion.models.reward import PerFusionRM, RewardModelConfig
from trainer.reward_pretrain import (
    REWARD_TOWERS_COMPONENT,
    RewardPretrainConfig,
    clip_loss,
    has_reward_towers,
    load_pretrained_towers,
    pretrain_reward_towers,
    save_reward_towers,
)

PLUGIN_PREFIXES = ("user_tower", "text_plugin", "image_plugin")
SMALL = {"image_size": 16, "cnn_channels": (8, 16), "embed_dim": 12, "user_embed_dim": 6}


def test_clip_loss_by_hand() -> None:
    # Two matching pairs on orthogonal axes: each row's softmax puts e^s on its match and e^0 on the other,
    # so both directions lose log(1 + e^-s).
    eye = torch.eye(2)
    scale = torch.tensor(3.0)
    assert clip_loss(eye, eye, scale).item() == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)
    # Swapped images: each row's match now scores 0 against e^s for the wrong one.
    assert clip_loss(eye, eye.flip(0), scale).item() == pytest.approx(math.log(1 + math.exp(3.0)), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=2, max_value=9), st.integers(min_value=0, max_value=10_000))
def test_clip_loss_ignores_the_order_of_pairs_and_is_at_least_zero(batch: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(batch, 5, generator=generator), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(batch, 5, generator=generator), dim=-1)
    order = torch.randperm(batch, generator=generator)
    scale = torch.tensor(10.0)
    assert clip_loss(text[order], image[order], scale).item() == pytest.approx(clip_loss(text, image, scale).item())
    assert clip_loss(text, image, scale).item() >= 0.0


def test_loaded_towers_score_as_the_saved_model_whoever_looks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    towers = PerFusionRM(RewardModelConfig(personalized=False, **SMALL))
    with torch.no_grad():
        towers.logit_scale.fill_(1.7)
    save_reward_towers(tmp_path, towers, {"steps": 0.0})
    assert has_reward_towers(tmp_path) and not has_reward_towers(tmp_path / "elsewhere")

    torch.manual_seed(1)  # another initialisation, so that equality below comes from the loaded weights
    model = PerFusionRM(RewardModelConfig(personalized=True, **SMALL))
    plugins_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(PLUGIN_PREFIXES)}
    load_pretrained_towers(model, tmp_path)
    text, images = torch.randn(3, 384), torch.rand(3, 3, 16, 16) * 2 - 1
    users = torch.randn(3, model.config.user_dim)
    with torch.no_grad():
        assert torch.allclose(model(text, images, users), towers(text, images))
        assert torch.allclose(model(text, images, users.flip(0)), towers(text, images))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plugins_before.items())


def test_towers_of_another_shape_are_refused_with_the_fix(tmp_path: Path) -> None:
    save_reward_towers(tmp_path, PerFusionRM(RewardModelConfig(personalized=False, **SMALL)), {})
    other = PerFusionRM(RewardModelConfig(personalized=True, **{**SMALL, "embed_dim": 16}))
    with pytest.raises(ConfigError, match=r"embed_dim.*--reward-towers-only"):
        load_pretrained_towers(other, tmp_path)
    with pytest.raises(ConfigError, match="without plug-ins"):
        save_reward_towers(tmp_path, other, {})
    with pytest.raises(ConfigError, match="batch_size"):
        RewardPretrainConfig(batch_size=1)


@pytest.mark.parametrize(("field", "lowest"), [("steps", 1), ("variants", 1), ("batch_size", 2)])
def test_config_counts_have_a_floor(field: str, lowest: int) -> None:
    assert getattr(RewardPretrainConfig(**{field: lowest}), field) == lowest
    with pytest.raises(ConfigError, match=f"{field} must be at least {lowest}, got {lowest - 1}"):
        RewardPretrainConfig(**{field: lowest - 1})


def test_the_trainer_names_the_command_when_the_base_checkpoint_has_no_towers(tmp_path: Path) -> None:
    from perfusion.models.base import QUICK_CONFIG, build_train_scheduler, build_unet
    from trainer.settings import TrainerSettings
    from trainer.updates import build_training_models

    settings_without = TrainerSettings(base_checkpoint=tmp_path)
    unet = build_unet(QUICK_CONFIG)
    with pytest.raises(ConfigError, match=f"no {REWARD_TOWERS_COMPONENT}/.*perfusion pretrain --reward-towers-only"):
        build_training_models(unet, QUICK_CONFIG, build_train_scheduler(QUICK_CONFIG), settings_without)
    scratch = TrainerSettings(base_checkpoint=tmp_path, pretrained_reward_towers=False)
    assert build_training_models(unet, QUICK_CONFIG, build_train_scheduler(QUICK_CONFIG), scratch).reward_model


@pytest.mark.slow
def test_a_short_run_on_the_catalog_names_held_out_captions_far_above_chance() -> None:
    from perfusion.sampling import base_text_encoder

    config = RewardPretrainConfig(steps=40, batch_size=64, variants=1)
    model, figures = pretrain_reward_towers(config, base_text_encoder())
    chance_top5 = 5 / figures["heldout_captions"]
    assert figures["heldout_retrieval_top5"] > 3 * chance_top5
    assert not model.config.personalized and not model.training
