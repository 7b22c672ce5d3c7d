"""Sampling from any noise predictor: the sampler's configuration and timesteps, batched guidance, determinism per
seed and per noise, and the base generator on a checkpoint."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perfusion.checkpoints import save_component
from perfusion.errors import ConfigError
from perfusion.models.base import QUICK_CONFIG, build_sampling_scheduler, build_unet, unet_component_config
from perfusion.sampling import (
    SERVING_SAMPLER,
    TERMINAL_ALPHA_BAR,
    BaseGenerator,
    SamplerConfig,
    denoise,
    initial_noise,
    model_timesteps,
    sample_images,
    unet_noise_fn,
)

LENGTH, WIDTH = QUICK_CONFIG.text_max_length, 384
LAST_TIMESTEP = QUICK_CONFIG.num_train_timesteps - 1


def text(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, LENGTH, WIDTH, generator=torch.Generator().manual_seed(seed))


def text_aware_noise(x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """A toy predictor whose output depends on the sample, the timestep and the text."""
    return 0.5 * x_t + states.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-4 * t.view(-1, 1, 1, 1)


def timesteps(sampler: SamplerConfig) -> list[int]:
    return [int(t) for t in build_sampling_scheduler(QUICK_CONFIG, sampler).timesteps]


# ------------------------------------------------------------------------------------------------- configuration


def test_serving_sampler_is_trailing_ddim_with_guidance() -> None:
    assert SERVING_SAMPLER.kind == "ddim" and SERVING_SAMPLER.spacing == "trailing"
    assert SERVING_SAMPLER.guidance_scale == 3.0 and SERVING_SAMPLER.steps >= 1
    assert SERVING_SAMPLER.with_steps(2) == SERVING_SAMPLER.model_copy(update={"steps": 2})
    assert SERVING_SAMPLER.with_steps(None) is SERVING_SAMPLER
    assert "trailing" in SERVING_SAMPLER.describe()


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"kind": "euler"}, "SamplerConfig.kind must be one of ddim, dpm-solver, got 'euler'"),
        ({"spacing": "uniform"}, "SamplerConfig.spacing must be one of trailing, leading, linspace"),
        ({"steps": 0}, "SamplerConfig.steps must be a whole number between 1 and 1000, got 0"),
        ({"steps": 1001}, "SamplerConfig.steps must be a whole number between 1 and 1000, got 1001"),
        ({"steps": 4.0}, "SamplerConfig.steps must be a whole number"),
        ({"steps": True}, "SamplerConfig.steps"),
        ({"guidance_scale": -1.0}, "SamplerConfig.guidance_scale must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": float("nan")}, "SamplerConfig.guidance_scale"),
        ({"guidance_scale": float("inf")}, "SamplerConfig.guidance_scale must be a finite number >= 0, got inf"),
    ],
)
def test_bad_sampler_values_name_the_field(values: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"steps": 4, **values}
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        SamplerConfig(**arguments)  # type: ignore[arg-type]


def test_sampler_bounds_are_inclusive_and_a_copy_is_checked_again() -> None:
    assert SamplerConfig(steps=1, guidance_scale=0.0).steps == 1
    assert SamplerConfig(steps=1000).steps == 1000
    with pytest.raises(ConfigError, match=r"SamplerConfig\.steps must be a whole number between 1 and 1000, got 0"):
        SERVING_SAMPLER.with_steps(0)


def test_more_steps_than_the_schedule_are_refused() -> None:
    short = QUICK_CONFIG.with_overrides(num_train_timesteps=100)
    with pytest.raises(ConfigError, match="num_train_timesteps=100"):
        build_sampling_scheduler(short, SamplerConfig(steps=200))


# ------------------------------------------------------------------------------------------------------ timesteps


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (2, [999, 499]),
        (3, [999, 666, 332]),
        (4, [999, 749, 499, 249]),
        (6, [999, 832, 666, 499, 332, 166]),
        (10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
@pytest.mark.parametrize("kind", ["ddim", "dpm-solver"])
def test_trailing_spacing_starts_at_the_last_timestep(kind: str, steps: int, expected: list[int]) -> None:
    assert timesteps(SamplerConfig(kind=kind, spacing="trailing", steps=steps)) == expected


@pytest.mark.parametrize("kind", ["ddim", "dpm-solver"])
def test_trailing_has_no_spurious_last_timestep(kind: str) -> None:
    # diffusers' float arange gives 62 timesteps for 61 steps, the last one -1 (alpha-bar[-1]: pure noise).
    schedule = timesteps(SamplerConfig(kind=kind, spacing="trailing", steps=61))
    assert len(schedule) == 61 and schedule[:3] == [999, 983, 966] and schedule[-2:] == [32, 15]


def test_leading_spacing_at_four_steps_starts_at_750() -> None:
    # The flaw of arXiv 2305.08891: the pure noise drawn at the start is treated as x_750, where alpha-bar is 0.14.
    sampler = SamplerConfig(spacing="leading", steps=4)
    assert timesteps(sampler) == [750, 500, 250, 0]
    alpha_bar = float(build_sampling_scheduler(QUICK_CONFIG, sampler).alphas_cumprod[750])
    assert alpha_bar == pytest.approx(0.143, abs=1e-3)


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(min_value=1, max_value=1000), kind=st.sampled_from(["ddim", "dpm-solver"]))
def test_trailing_schedules_start_at_the_end_and_strictly_decrease(steps: int, kind: str) -> None:
    schedule = timesteps(SamplerConfig(kind=kind, spacing="trailing", steps=steps))
    assert schedule[0] == LAST_TIMESTEP
    assert len(schedule) == steps
    assert all(later < earlier for earlier, later in itertools.pairwise(schedule))
    assert schedule[-1] >= 0


def test_only_the_last_timestep_is_terminal() -> None:
    alphas = build_sampling_scheduler(QUICK_CONFIG, SERVING_SAMPLER).alphas_cumprod
    assert float(alphas[LAST_TIMESTEP]) < TERMINAL_ALPHA_BAR <= float(alphas[LAST_TIMESTEP - 1])


# -------------------------------------------------------------------------------------------------------- denoise


class Counting:
    """A noise predictor that records the rows of every call."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.timesteps: list[int] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        assert x_t.shape[0] == t.shape[0] == states.shape[0]
        self.rows.append(x_t.shape[0])
        self.timesteps.append(int(t[0]))
        return text_aware_noise(x_t, t, states)


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["ddim", "dpm-solver"])
def test_guidance_is_one_call_a_step_on_both_branches(kind: str) -> None:
    sampler = SamplerConfig(kind=kind, spacing="leading", steps=3, guidance_scale=4.0)
    counting = Counting()
    denoise(counting, noise(2), text(2), sampler, QUICK_CONFIG, uncond_states=torch.zeros(1, LENGTH, WIDTH))
    assert counting.rows == [4, 4, 4]
    counting = Counting()
    denoise(counting, noise(2), text(2), sampler.with_overrides(guidance_scale=1.0), QUICK_CONFIG, text(1))
    assert counting.rows == [2, 2, 2]  # guidance 1: the conditional branch alone


def test_the_terminal_step_does_not_call_the_model() -> None:
    counting = Counting()
    sampler = SamplerConfig(spacing="trailing", steps=4)
    denoise(counting, noise(2), text(2), sampler, QUICK_CONFIG, uncond_states=torch.zeros(1, LENGTH, WIDTH))
    assert counting.timesteps == [749, 499, 249] == model_timesteps(sampler, QUICK_CONFIG)
    assert counting.rows == [4, 4, 4]
    assert model_timesteps(SamplerConfig(spacing="leading", steps=4), QUICK_CONFIG) == [750, 500, 250, 0]


def unbatched_guidance(
    sampler: SamplerConfig, x: torch.Tensor, states: torch.Tensor, uncond: torch.Tensor
) -> np.ndarray:
    """The guided sampler written as two predictor calls a step, as this module did before batching."""
    scheduler = build_sampling_scheduler(QUICK_CONFIG, sampler)
    sample = x.clone()
    for timestep in scheduler.timesteps:
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
        if alpha_bar < TERMINAL_ALPHA_BAR:
            eps = sample / (1 - alpha_bar) ** 0.5
        else:
            t = torch.full((x.shape[0],), int(timestep), dtype=torch.long)
            eps_cond = text_aware_noise(sample, t, states)
            eps_uncond = text_aware_noise(sample, t, uncond.expand(x.shape[0], -1, -1))
            eps = eps_uncond + sampler.guidance_scale * (eps_cond - eps_uncond)
        sample = scheduler.step(eps, timestep, sample, return_dict=False)[0]
    return sample.clamp(-1, 1).numpy()


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_batched_guidance_equals_two_calls(spacing: str) -> None:
    sampler = SamplerConfig(spacing=spacing, steps=5, guidance_scale=3.0)
    x, states, uncond = noise(3), text(3), text(1, seed=9)
    batched = denoise(text_aware_noise, x, states, sampler, QUICK_CONFIG, uncond_states=uncond).numpy()
    np.testing.assert_allclose(batched, unbatched_guidance(sampler, x, states, uncond), atol=1e-5)


def test_batched_guidance_on_a_unet_matches_two_calls() -> None:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG).eval()
    predict = unet_noise_fn(unet)
    sampler = SamplerConfig(spacing="trailing", steps=3, guidance_scale=3.0)
    x, states, uncond = noise(2), text(2), text(1, seed=4)
    with torch.no_grad():
        batched = denoise(predict, x, states, sampler, QUICK_CONFIG, uncond_states=uncond)

        def two_calls(x_t: torch.Tensor, t: torch.Tensor, both: torch.Tensor) -> torch.Tensor:
            half = x_t.shape[0] // 2
            return torch.cat([predict(x_t[:half], t[:half], both[:half]), predict(x_t[half:], t[half:], both[half:])])

        separate = denoise(two_calls, x, states, sampler, QUICK_CONFIG, uncond_states=uncond)
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["ddim", "dpm-solver"])
def test_denoise_from_given_noise_is_deterministic_and_bounded(kind: str) -> None:
    sampler = SamplerConfig(kind=kind, steps=4)
    x, states, uncond = noise(2), text(2), text(1, seed=3)
    first = denoise(text_aware_noise, x, states, sampler, QUICK_CONFIG, uncond_states=uncond)
    again = denoise(text_aware_noise, x.clone(), states, sampler, QUICK_CONFIG, uncond_states=uncond)
    assert torch.equal(first, again)
    assert first.shape == (2, 3, 32, 32) and first.dtype == torch.float32
    assert float(first.abs().max()) <= 1.0
    assert not torch.equal(first, denoise(text_aware_noise, noise(2, seed=1), states, sampler, QUICK_CONFIG, uncond))


def test_denoise_refuses_mismatched_rows_and_a_schedule_without_a_model_call() -> None:
    with pytest.raises(ConfigError, match="same B"):
        denoise(text_aware_noise, noise(2), text(3), SERVING_SAMPLER, QUICK_CONFIG)
    with pytest.raises(ConfigError, match=r"SamplerConfig\.steps=1 with trailing spacing is the terminal step alone"):
        denoise(text_aware_noise, noise(1), text(1), SamplerConfig(steps=1), QUICK_CONFIG)
    leading = denoise(text_aware_noise, noise(1), text(1), SamplerConfig(spacing="leading", steps=1), QUICK_CONFIG)
    assert leading.shape == (1, 3, 32, 32)


# -------------------------------------------------------------------------------------------------- sample_images


def test_output_is_uint8_images() -> None:
    images = sample_images(text_aware_noise, text(3), SamplerConfig(steps=4), seed=0, config=QUICK_CONFIG)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8


def test_sample_images_is_denoise_from_the_seeds_noise() -> None:
    sampler, states, uncond = SamplerConfig(steps=3), text(2), text(1, seed=5)
    images = sample_images(text_aware_noise, states, sampler, seed=[4, 7], config=QUICK_CONFIG, uncond_states=uncond)
    x = initial_noise([4, 7], 3, 32, torch.device("cpu"))
    direct = denoise(text_aware_noise, x, states, sampler, QUICK_CONFIG, uncond_states=uncond)
    assert np.array_equal(images, ((direct + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_same_seed_same_image_regardless_of_batch() -> None:
    states, sampler = text(3), SamplerConfig(steps=4)
    batch = sample_images(text_aware_noise, states, sampler, seed=[7, 8, 9], config=QUICK_CONFIG)
    alone = sample_images(text_aware_noise, states[1:2], sampler, seed=[8], config=QUICK_CONFIG)
    assert np.array_equal(batch[1], alone[0])
    other = sample_images(text_aware_noise, states[1:2], sampler, seed=[9], config=QUICK_CONFIG)
    assert not np.array_equal(alone[0], other[0])
    assert torch.equal(initial_noise([5], 3, 8, torch.device("cpu")), initial_noise([5], 3, 8, torch.device("cpu")))


def test_guidance_changes_images() -> None:
    sampler = SamplerConfig(steps=3, guidance_scale=4.0)
    plain = sample_images(text_aware_noise, text(2), sampler, seed=0, config=QUICK_CONFIG)
    guided = sample_images(
        text_aware_noise, text(2), sampler, seed=0, config=QUICK_CONFIG, uncond_states=torch.zeros(1, LENGTH, WIDTH)
    )
    assert not np.array_equal(plain, guided)


@pytest.mark.parametrize("kind", ["ddim", "dpm-solver"])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_every_sampler_runs(kind: str, spacing: str) -> None:
    sampler = SamplerConfig(kind=kind, spacing=spacing, steps=5)
    images = sample_images(text_aware_noise, text(1), sampler, config=QUICK_CONFIG)
    assert images.shape == (1, 32, 32, 3)


def test_bad_seeds_are_refused() -> None:
    with pytest.raises(ConfigError, match="seeds"):
        sample_images(text_aware_noise, text(2), seed=[1], config=QUICK_CONFIG)


# ------------------------------------------------------------------------------------------------ base generator


class FixedTextEncoder:
    """Stands in for MiniLM: a deterministic random encoding per prompt."""

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states = torch.stack([text(1, seed=len(p))[0] for p in prompts])
        return states, torch.ones(len(prompts), LENGTH, dtype=torch.long)


def test_base_generator_samples_from_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    save_component(tmp_path, "unet", unet, unet_component_config(QUICK_CONFIG, unet, built=True))
    generator = BaseGenerator(tmp_path, text_encoder=FixedTextEncoder())  # type: ignore[arg-type]
    assert generator.config == QUICK_CONFIG
    assert not any(p.requires_grad for p in generator.unet.parameters())
    sampler = SamplerConfig(steps=3)
    images = generator.generate(["a red dress", "a blue hoodie"], seeds=[1, 2], sampler=sampler)
    assert images.shape == (2, 32, 32, 3)
    again = generator.generate(["a red dress"], seeds=[1], sampler=sampler)
    # An untrained UNet amplifies float rounding that differs between batch sizes: nearly all pixels agree.
    assert np.mean(np.abs(images[0].astype(int) - again[0].astype(int)) <= 2) > 0.95
    direct = sample_images(
        unet_noise_fn(generator.unet),
        generator.text_states(["a red dress"]),
        sampler,
        seed=[1],
        config=QUICK_CONFIG,
        uncond_states=generator.uncond_states(),
    )
    assert np.array_equal(direct[0], again[0])


def test_missing_checkpoint_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no base checkpoint"):
        BaseGenerator(tmp_path, text_encoder=FixedTextEncoder())  # type: ignore[arg-type]
