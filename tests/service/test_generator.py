"""The service's generator samples a group with its sampler: one batched forward a step (2K rows with guidance),
for the base model and with the adaptive network; the settings name the serving sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig
from perfusion.text_encoder import TextEncoder
from perfusion.user_features import USER_DIM
from service.generator import PersonalizedGenerator
from service.settings import ServiceSettings

USER = np.linspace(0.0, 1.0, USER_DIM, dtype=np.float32)
PROMPT = "a green striped skirt"


def generator(text_encoder: TextEncoder, sampler: SamplerConfig) -> PersonalizedGenerator:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    adaptive = AdaptiveNetwork(unet, AdaptiveConfig(condition_hidden=16, condition_channels=4))
    classifier = AttributeClassifier(AttributeClassifierConfig(channels=(8, 16)))
    return PersonalizedGenerator(unet, adaptive, text_encoder, classifier, QUICK_CONFIG, sampler=sampler)


def forward_rows(module: torch.nn.Module) -> list[int]:
    """Rows of every forward pass of ``module`` from now on."""
    rows: list[int] = []
    module.register_forward_hook(lambda _module, inputs, _output: rows.append(int(inputs[0].shape[0])))
    return rows


@pytest.mark.parametrize("user", [None, USER], ids=["base", "personalized"])
def test_a_group_is_one_forward_a_step_on_2k_rows(text_encoder: TextEncoder, user: np.ndarray | None) -> None:
    sampler = SamplerConfig(spacing="leading", steps=3, guidance_scale=3.0)
    serving = generator(text_encoder, sampler)
    unet_rows, adaptive_rows = forward_rows(serving.unet), forward_rows(serving._active.network)
    group = serving.generate(PROMPT, user, k=3, seed=1)
    assert group.images.shape == (3, 32, 32, 3) and len(group.descriptors) == 3
    assert unet_rows == [6, 6, 6]
    assert adaptive_rows == ([] if user is None else [6, 6, 6])


def test_trailing_skips_the_model_at_the_terminal_step(text_encoder: TextEncoder) -> None:
    serving = generator(text_encoder, SamplerConfig(spacing="trailing", steps=4))
    rows = forward_rows(serving.unet)
    serving.generate(PROMPT, None, k=2, seed=0)
    assert rows == [4, 4, 4]  # 999 is pure noise to the model: no forward there


def test_the_same_request_gives_the_same_pixels(text_encoder: TextEncoder) -> None:
    serving = generator(text_encoder, SamplerConfig(steps=2))
    first = serving.generate(PROMPT, USER, k=2, seed=4).images
    np.testing.assert_array_equal(first, serving.generate(PROMPT, USER, k=2, seed=4).images)
    assert not np.array_equal(first, serving.generate(PROMPT, USER, k=2, seed=5).images)


def test_the_default_sampler_is_the_serving_one() -> None:
    assert ServiceSettings().sampler() == SERVING_SAMPLER
    tuned = ServiceSettings(steps=9, guidance=2.0).sampler()
    assert (tuned.kind, tuned.spacing, tuned.steps, tuned.guidance_scale) == ("ddim", "trailing", 9, 2.0)
