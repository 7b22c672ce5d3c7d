"""The base UNet: config validation, shapes, checkpoint round trip, a local Stable-Diffusion-style folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.checkpoints import load_component, save_component
from perfusion.errors import ConfigError
from perfusion.models.attribute_classifier import (
    AttributeClassifier,
    AttributeClassifierConfig,
    build_attribute_classifier,
    split_blocks,
)
from perfusion.models.base import (
    QUICK_CONFIG,
    BaseModelConfig,
    build_sampling_scheduler,
    build_train_scheduler,
    build_unet,
    load_pretrained_unet,
    unet_component_config,
    unet_from_config,
)
from perfusion.sampler_config import SamplerConfig

TEXT_LENGTH = QUICK_CONFIG.text_max_length


def test_unet_predicts_noise_shaped_output_conditioned_on_text() -> None:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 500])
    states = torch.randn(2, TEXT_LENGTH, 384)
    out = unet(x, t, encoder_hidden_states=states).sample
    assert out.shape == x.shape
    other = unet(x, t, encoder_hidden_states=torch.randn(2, TEXT_LENGTH, 384)).sample
    assert not torch.allclose(out, other)


def test_default_config_matches_the_measured_size() -> None:
    parameters = sum(p.numel() for p in build_unet(BaseModelConfig()).parameters())
    assert 4.0e6 < parameters < 5.0e6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sample_size": 30}, "divisible"),
        ({"block_out_channels": (24, 48), "norm_num_groups": 16}, "norm_num_groups"),
        ({"cross_attention_from_level": 5}, "cross_attention_from_level"),
        ({"cross_attention_from_level": -1}, "cross_attention_from_level must be at least 0, got -1"),
        ({"layers_per_block": 0}, "layers_per_block"),
    ],
)
def test_invalid_configs_name_the_value(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BaseModelConfig(**overrides)  # type: ignore[arg-type]


def test_config_dict_round_trip_and_unknown_keys() -> None:
    assert BaseModelConfig.from_dict(QUICK_CONFIG.to_dict()) == QUICK_CONFIG
    with pytest.raises(ConfigError, match="unknown base model config keys"):
        BaseModelConfig.from_dict({"sample_sise": 32})


def test_schedulers() -> None:
    assert dict(build_train_scheduler(QUICK_CONFIG).config)["num_train_timesteps"] == QUICK_CONFIG.num_train_timesteps
    for kind in ("ddim", "dpm-solver"):
        scheduler = build_sampling_scheduler(QUICK_CONFIG, SamplerConfig(kind=kind, spacing="trailing", steps=10))
        assert len(scheduler.timesteps) == 10 and scheduler.config["timestep_spacing"] == "trailing"
    ddim = build_sampling_scheduler(QUICK_CONFIG, SamplerConfig(kind="ddim", steps=4))
    assert not ddim.config["clip_sample"] and not ddim.config["set_alpha_to_one"]


def test_checkpoint_round_trip_rebuilds_the_same_unet(tmp_path: Path) -> None:
    torch.manual_seed(1)
    unet = build_unet(QUICK_CONFIG)
    save_component(tmp_path, "unet", unet, unet_component_config(QUICK_CONFIG, unet, built=True))
    loaded = load_component(tmp_path, "unet", unet_from_config)
    x, t, states = torch.randn(1, 3, 32, 32), torch.tensor([3]), torch.randn(1, TEXT_LENGTH, 384)
    assert torch.equal(
        unet(x, t, encoder_hidden_states=states).sample, loaded(x, t, encoder_hidden_states=states).sample
    )


def tiny_stable_diffusion_folder(root: Path) -> UNet2DConditionModel:
    """A diffusers pipeline folder whose unet/ has Stable Diffusion's shape (4 latent channels, 32-d text)."""
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    unet.save_pretrained(str(root / "unet"))
    return unet


def test_local_stable_diffusion_unet_is_adapted_to_pixels_and_minilm(tmp_path: Path) -> None:
    original = tiny_stable_diffusion_folder(tmp_path / "sd")
    config = BaseModelConfig()
    adapted = load_pretrained_unet(tmp_path / "sd", config)
    adapted_config = dict(adapted.config)
    assert (adapted_config["in_channels"], adapted_config["out_channels"], adapted_config["sample_size"]) == (3, 3, 32)
    x = torch.randn(2, 3, 32, 32)
    states = torch.randn(2, TEXT_LENGTH, 384)
    assert adapted(x, torch.tensor([1, 2]), encoder_hidden_states=states).sample.shape == x.shape
    # The pretrained interior is kept; only conv_in/conv_out and the text projection are new.
    kept = original.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert torch.equal(adapted.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"], kept)
    # The adapted UNet is saved with its diffusers config and rebuilt from it.
    save_component(tmp_path / "ckpt", "unet", adapted, unet_component_config(config, adapted, built=False))
    reloaded = load_component(tmp_path / "ckpt", "unet", unet_from_config)
    t = torch.tensor([5, 6])
    assert torch.equal(
        adapted(x, t, encoder_hidden_states=states).sample, reloaded(x, t, encoder_hidden_states=states).sample
    )


def test_a_folder_without_unet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unet/ subfolder"):
        load_pretrained_unet(tmp_path, BaseModelConfig())


def test_attribute_classifier_descriptor_layout(tmp_path: Path) -> None:
    torch.manual_seed(3)
    classifier = AttributeClassifier(AttributeClassifierConfig())
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    descriptors = classifier.descriptors(images)
    assert descriptors.shape == (5, DESCRIPTOR_DIM)
    for block in split_blocks(descriptors):
        assert torch.allclose(block.sum(dim=-1), torch.ones(5), atol=1e-5)
    predictions = classifier.predict(images)
    assert len(predictions) == 5 and set(predictions[0]) == {"garment", "colour", "pattern", "sleeve", "fit"}
    save_component(tmp_path, "classifier", classifier, classifier.config.to_dict())
    loaded = load_component(tmp_path, "classifier", build_attribute_classifier)
    assert isinstance(loaded, AttributeClassifier)
    assert torch.allclose(loaded.descriptors(images), descriptors)
    with pytest.raises(ConfigError, match="uint8"):
        classifier.descriptors(images.astype(np.float32))
