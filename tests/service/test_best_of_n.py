"""Best-of-N on tiny seeded models: the K shown are the top K of the N drawn by the version's reward model; without
u, below the GAUC floor, without a GAUC record or with best-of-N off the group is the K draw, bit for bit; the
reward model loads and swaps with its version; the settings bound N."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from perfusion.checkpoints import ModelStore
from perfusion.errors import ConfigError
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet
from perfusion.models.reward import PerFusionRM, RewardModelConfig
from perfusion.sampler_config import SamplerConfig
from perfusion.text_encoder import TextEncoder, mean_pool
from perfusion.user_features import USER_DIM
from service.generator import (
    ADAPTIVE_COMPONENT,
    REWARD_COMPONENT,
    GeneratedGroup,
    PersonalizedGenerator,
    VersionRefused,
)
from service.settings import BestOfSettings, ServiceSettings

ADAPTIVE_CONFIG = AdaptiveConfig(condition_hidden=16, condition_channels=4)
REWARD_CONFIG = RewardModelConfig(image_size=QUICK_CONFIG.sample_size, cnn_channels=(8, 16), embed_dim=16)
BEST_OF_8 = BestOfSettings(enabled=True, n=8, max_k=4)
USER = np.linspace(0.0, 1.0, USER_DIM, dtype=np.float32)
OTHER_USER = np.linspace(1.0, 0.0, USER_DIM, dtype=np.float32)
PROMPT = "a yellow checked shirt"
ABOVE_FLOOR = {"rm_gauc": 0.64, "rm_gauc_low": 0.58, "rm_gauc_high": 0.70}
BELOW_FLOOR = {"rm_gauc": 0.60, "rm_gauc_low": 0.52, "rm_gauc_high": 0.68}


def build_generator(text_encoder: TextEncoder, best_of: BestOfSettings | None = None) -> PersonalizedGenerator:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    classifier = AttributeClassifier(AttributeClassifierConfig(channels=(8, 16)))
    adaptive = AdaptiveNetwork(unet, ADAPTIVE_CONFIG)
    return PersonalizedGenerator(
        unet, adaptive, text_encoder, classifier, QUICK_CONFIG, sampler=SamplerConfig(steps=2), best_of=best_of
    )


def trained_like_reward_model(seed: int) -> PerFusionRM:
    """A reward model whose plug-ins have left zero (as after feedback), so that u changes its scores."""
    torch.manual_seed(seed)
    reward_model = PerFusionRM(REWARD_CONFIG)
    with torch.no_grad():
        for plugin in (reward_model.text_plugin, reward_model.image_plugin):
            assert plugin is not None
            plugin.output.weight.normal_(std=0.5)
    return reward_model.eval()


def publish(
    store: ModelStore, unet: torch.nn.Module, reward_model: PerFusionRM | None, gate_metrics: dict[str, float] | None
) -> str:
    """A version as the trainer publishes one: adaptive network, reward model, and the gate's metrics."""
    torch.manual_seed(7)
    adaptive = AdaptiveNetwork(unet, ADAPTIVE_CONFIG)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, parameter in adaptive.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                parameter.normal_(std=0.05)
    components: dict[str, tuple[torch.nn.Module, dict[str, object]]] = {
        ADAPTIVE_COMPONENT: (adaptive, adaptive.config.to_dict())
    }
    if reward_model is not None:
        components[REWARD_COMPONENT] = (reward_model, reward_model.config.to_dict())
    manifest = {"metrics": gate_metrics} if gate_metrics is not None else {}
    return store.publish(components, manifest)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def scores_of(
    reward_model: PerFusionRM, text_encoder: TextEncoder, images: np.ndarray, user: np.ndarray
) -> torch.Tensor:
    """The reward model's score [N] of each image for PROMPT and ``user``, computed apart from the service."""
    states, mask = text_encoder.encode([PROMPT])
    pooled = mean_pool(states, mask).repeat(len(images), 1)  # [N, 384]
    pixels = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0  # [N, 3, H, W]
    users = torch.tensor(user).repeat(len(images), 1)  # [N, U]
    with torch.no_grad():
        return reward_model(pooled, pixels, users).reshape(-1)


def assert_same_group(actual: GeneratedGroup, expected: GeneratedGroup) -> None:
    np.testing.assert_array_equal(actual.images, expected.images)
    assert actual.descriptors == expected.descriptors
    assert (actual.model_version, actual.drawn, actual.ranked_by) == (
        expected.model_version,
        expected.drawn,
        expected.ranked_by,
    )


def test_the_k_shown_are_the_top_k_of_the_n_by_the_reward_model(text_encoder: TextEncoder, store: ModelStore) -> None:
    generator = build_generator(text_encoder, BEST_OF_8)
    reward_model = trained_like_reward_model(seed=3)
    version = publish(store, generator.unet, reward_model, ABOVE_FLOOR)
    generator.load_version(version, store.path(version))

    for user in (USER, OTHER_USER):
        ranked = generator.generate(PROMPT, user, k=3, seed=11)
        assert (ranked.drawn, ranked.ranked_by, ranked.model_version) == (8, version, version)

        # The N drawn: with best-of-N off, a K = N request is the same one sampling call (seeds 11..18).
        generator.best_of = BestOfSettings()
        all_drawn = generator.generate(PROMPT, user, k=8, seed=11)
        generator.best_of = BEST_OF_8
        assert all_drawn.ranked_by is None and all_drawn.drawn == 8

        scores = scores_of(reward_model, text_encoder, all_drawn.images, user)
        top = torch.argsort(scores, descending=True)[:3].tolist()
        assert top != [0, 1, 2]  # the ranking chose, not only the first K drawn
        assert scores[top].tolist() == sorted(scores.tolist(), reverse=True)[:3]  # best first
        np.testing.assert_array_equal(ranked.images, all_drawn.images[top])
        expected_descriptors = generator.classifier.descriptors(all_drawn.images[top]).tolist()
        np.testing.assert_allclose(ranked.descriptors, expected_descriptors, rtol=1e-5, atol=1e-6)
        # The same request shows the same K in the same order.
        np.testing.assert_array_equal(generator.generate(PROMPT, user, k=3, seed=11).images, ranked.images)


def test_one_sampling_call_of_n_rows_for_a_ranked_group(text_encoder: TextEncoder, store: ModelStore) -> None:
    generator = build_generator(text_encoder, BEST_OF_8)
    version = publish(store, generator.unet, trained_like_reward_model(seed=4), ABOVE_FLOOR)
    generator.load_version(version, store.path(version))
    rows: list[int] = []
    generator.unet.register_forward_hook(lambda _module, inputs, _output: rows.append(int(inputs[0].shape[0])))
    generator.generate(PROMPT, USER, k=2, seed=0)
    assert rows == [16]  # 2 steps with trailing spacing: one model-evaluated step, 2N rows (both guidance branches)


@pytest.mark.parametrize(
    ("gate_metrics", "user", "k", "best_of"),
    [
        (BELOW_FLOOR, USER, 3, BEST_OF_8),
        (ABOVE_FLOOR, None, 3, BEST_OF_8),
        (None, USER, 3, BEST_OF_8),
        ({"rm_gauc": math.nan, "rm_gauc_low": math.nan, "rm_gauc_high": math.nan}, USER, 3, BEST_OF_8),
        (ABOVE_FLOOR, USER, 5, BEST_OF_8),
        (ABOVE_FLOOR, USER, 3, BestOfSettings()),
    ],
    ids=["below-floor", "no-u", "no-gauc-record", "gauc-nan", "k-above-max-k", "best-of-off"],
)
def test_otherwise_the_group_is_the_k_draw_bit_for_bit(
    text_encoder: TextEncoder,
    store: ModelStore,
    gate_metrics: dict[str, float] | None,
    user: np.ndarray | None,
    k: int,
    best_of: BestOfSettings,
) -> None:
    generator = build_generator(text_encoder, best_of)
    version = publish(store, generator.unet, trained_like_reward_model(seed=5), gate_metrics)
    generator.load_version(version, store.path(version))
    # Today's draw: the same version without a reward model, on a generator without best-of-N.
    unranked = build_generator(text_encoder)
    plain = publish(store, unranked.unet, None, None)
    unranked.load_version(plain, store.path(plain))

    group = generator.generate(PROMPT, user, k=k, seed=21)
    expected = unranked.generate(PROMPT, user, k=k, seed=21)
    assert (group.drawn, group.ranked_by) == (k, None)
    np.testing.assert_array_equal(group.images, expected.images)
    assert group.descriptors == expected.descriptors


def test_the_reward_model_loads_and_swaps_with_its_version(text_encoder: TextEncoder, store: ModelStore) -> None:
    generator = build_generator(text_encoder, BEST_OF_8)
    ranked_version = publish(store, generator.unet, trained_like_reward_model(seed=6), ABOVE_FLOOR)
    generator.load_version(ranked_version, store.path(ranked_version))
    assert generator.generate(PROMPT, USER, k=2, seed=1).ranked_by == ranked_version

    # A version whose reward model has no GAUC record serves unranked; the previous one's model is not kept.
    unrecorded = publish(store, generator.unet, trained_like_reward_model(seed=7), None)
    generator.load_version(unrecorded, store.path(unrecorded))
    assert generator.generate(PROMPT, USER, k=2, seed=1).ranked_by is None

    # A reward model that diverged refuses its version; the serving one is untouched.
    diverged = trained_like_reward_model(seed=8)
    with torch.no_grad():
        diverged.logit_scale.fill_(math.inf)
    bad = publish(store, generator.unet, diverged, ABOVE_FLOOR)
    with pytest.raises(VersionRefused, match="reward_model holds non-finite weights"):
        generator.load_version(bad, store.path(bad))
    assert generator.model_version == unrecorded
    # With best-of-N off the reward model is not loaded, and the version serves as it did before ranking existed.
    unranked = build_generator(text_encoder)
    unranked.load_version(bad, store.path(bad))
    assert unranked.model_version == bad and unranked._active.ranking is None

    # One for images of another size does not fit what the service draws.
    small = PerFusionRM(RewardModelConfig(image_size=16, cnn_channels=(8, 16), embed_dim=16))
    misfit = publish(store, generator.unet, small, ABOVE_FLOOR)
    with pytest.raises(VersionRefused, match="image_size 16 \\(the service's 32\\)"):
        generator.load_version(misfit, store.path(misfit))

    generator.load_version(ranked_version, store.path(ranked_version))  # a rollback brings its ranking back
    assert generator.generate(PROMPT, USER, k=2, seed=1).ranked_by == ranked_version


def test_the_settings_bound_n_and_name_the_field() -> None:
    defaults = ServiceSettings().best_of
    assert (defaults.enabled, defaults.n, defaults.max_k, defaults.gauc_floor) == (False, 16, 8, 0.55)
    with pytest.raises(ConfigError, match=r"^best_of\.n must be between 8 and 16, got 17$"):
        ServiceSettings.from_env(best_of={"n": 17})
    with pytest.raises(ConfigError, match=r"^best_of\.n must be between 8 and 16, got 4$"):
        ServiceSettings.from_env(best_of={"n": 4})
    with pytest.raises(
        ConfigError, match=r"best_of\.n \(10\) must be at least max_k \(12\).*PERFUSION_SERVE_BEST_OF__N"
    ):
        ServiceSettings.from_env(best_of={"n": 10, "max_k": 12})


def test_the_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFUSION_SERVE_BEST_OF__ENABLED", "true")
    monkeypatch.setenv("PERFUSION_SERVE_BEST_OF__N", "12")
    monkeypatch.setenv("PERFUSION_SERVE_BEST_OF__GAUC_FLOOR", "0.6")
    assert ServiceSettings.from_env().best_of == BestOfSettings(enabled=True, n=12, gauc_floor=0.6)
    monkeypatch.setenv("PERFUSION_SERVE_BEST_OF__N", "20")
    with pytest.raises(ConfigError, match=r"best_of\.n must be between 8 and 16, got 20"):
        ServiceSettings.from_env()
