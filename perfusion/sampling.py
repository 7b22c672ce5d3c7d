"""Inference: draw images from any noise predictor with a diffusers scheduler and classifier-free guidance.

:func:`denoise` only needs ``noise_fn(x_t, t, text_states) -> eps``, so the base UNet and any personalized model
built around it sample through the same code, from given initial noise; :func:`sample_images` draws that noise
from seeds and returns uint8 images. Both take a :class:`SamplerConfig` (re-exported from
:mod:`perfusion.sampler_config`); :data:`SERVING_SAMPLER` is the one every served group uses.
:class:`BaseGenerator` loads the committed base checkpoint and the text encoder and samples images for prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from perfusion.checkpoints import load_component, read_component_config
from perfusion.errors import ConfigError
from perfusion.models.base import BaseModelConfig, build_sampling_scheduler, unet_from_config
from perfusion.paths import ASSETS_DIR
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig
from perfusion.text_encoder import TextEncoder

__all__ = [
    "BASE_CHECKPOINT_DIR",
    "SERVING_SAMPLER",
    "TERMINAL_ALPHA_BAR",
    "UNET_COMPONENT",
    "BaseGenerator",
    "NoiseFn",
    "SamplerConfig",
    "base_model_config",
    "base_text_encoder",
    "denoise",
    "initial_noise",
    "load_base_unet",
    "model_timesteps",
    "sample_images",
    "to_uint8",
    "unet_noise_fn",
]

# noise_fn(x_t (B, C, H, W), t (B,) long, text_states (B, L, D)) -> predicted noise (B, C, H, W)
NoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BASE_CHECKPOINT_DIR = ASSETS_DIR / "base"
UNET_COMPONENT = "unet"
# Below this alpha-bar a timestep is pure noise to an epsilon-predicting model (signal scale < 0.001): its x0
# estimate (x_t - sqrt(1 - a) eps) / sqrt(a) is its eps error amplified over 1,000x. Only t = 999 of the capped
# squared-cosine schedule (alpha-bar 2.4e-9; 998 has 2.4e-6), where trailing spacing starts.
TERMINAL_ALPHA_BAR = 1e-6


def initial_noise(seeds: Sequence[int], channels: int, size: int, device: torch.device) -> torch.Tensor:
    """(B, C, size, size) standard normal noise; row i depends only on seeds[i]."""
    rows = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.randn(channels, size, size, generator=generator))
    return torch.stack(rows).to(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8."""
    scaled = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def denoise(
    noise_fn: NoiseFn,
    noise: torch.Tensor,
    text_states: torch.Tensor,
    sampler: SamplerConfig,
    model_config: BaseModelConfig,
    uncond_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (B, C, H, W) conditioned on ``text_states`` (B, L, D): float (B, C, H, W) in [-1, 1].

    With ``uncond_states`` (the empty prompt's states, (1, L, D) or (B, L, D)) and a guidance scale other than 1,
    classifier-free guidance mixes the conditional and unconditional predictions; both branches go through ONE
    ``noise_fn`` call a step, on 2B rows: the B conditional rows first, then the B unconditional ones (same x_t and
    t). Without guidance each call has the B rows. Deterministic: the same noise gives the same images.

    A step at a terminal timestep (alpha-bar below :data:`TERMINAL_ALPHA_BAR`: trailing and linspace spacing start
    there) does not call ``noise_fn``: there the model's x0 estimate is its eps error times 20,000 (std ~600
    measured on the base model), so the step takes x0 = 0, the prior mean, and only brings the noise to the next
    timestep's level. DPM-Solver++ then restarts its multistep history, so that no later step extrapolates from
    that stand-in x0.
    """
    if noise.dim() != 4 or text_states.shape[0] != noise.shape[0]:
        raise ConfigError(
            f"noise must be (B, C, H, W) and text_states (B, L, D) with the same B; got {tuple(noise.shape)} and "
            f"{tuple(text_states.shape)}"
        )
    scheduler = build_sampling_scheduler(model_config, sampler)
    alphas_cumprod = scheduler.alphas_cumprod
    if all(float(alphas_cumprod[int(t)]) < TERMINAL_ALPHA_BAR for t in scheduler.timesteps):
        raise ConfigError(
            f"SamplerConfig.steps={sampler.steps} with {sampler.spacing} spacing is the terminal step alone, where "
            "the model is not called; sample with at least 2 steps"
        )
    batch, device = noise.shape[0], noise.device
    guided = uncond_states is not None and sampler.guidance_scale != 1.0
    states = text_states
    if guided:
        assert uncond_states is not None
        uncond = uncond_states.to(device=text_states.device, dtype=text_states.dtype).expand(batch, -1, -1)
        states = torch.cat([text_states, uncond])  # (2B, L, D): conditional rows, then unconditional
    rows = states.shape[0]
    sample = noise * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        alpha_bar = float(alphas_cumprod[int(timestep)])
        terminal = alpha_bar < TERMINAL_ALPHA_BAR
        if terminal:
            eps = sample / (1.0 - alpha_bar) ** 0.5  # the eps for which the scheduler's x0 estimate is 0
        else:
            model_input = scheduler.scale_model_input(sample, timestep)
            t = torch.full((rows,), int(timestep), device=device, dtype=torch.long)
            if guided:
                both = noise_fn(torch.cat([model_input, model_input]), t, states)
                eps_cond, eps_uncond = both[:batch], both[batch:]
                eps = eps_uncond + sampler.guidance_scale * (eps_cond - eps_uncond)
            else:
                eps = noise_fn(model_input, t, states)
        sample = scheduler.step(eps, timestep, sample, return_dict=False)[0]
        if terminal and isinstance(scheduler, DPMSolverMultistepScheduler):
            scheduler.lower_order_nums = 0  # the next step is first order, from its own x0 estimate alone
    return sample.clamp(-1.0, 1.0)


def model_timesteps(sampler: SamplerConfig, model_config: BaseModelConfig) -> list[int]:
    """The timesteps at which :func:`denoise` calls the model (every step but a terminal one), first to last."""
    scheduler = build_sampling_scheduler(model_config, sampler)
    alphas_cumprod = scheduler.alphas_cumprod
    return [int(t) for t in scheduler.timesteps if float(alphas_cumprod[int(t)]) >= TERMINAL_ALPHA_BAR]


def sample_images(
    noise_fn: NoiseFn,
    text_states: torch.Tensor,
    sampler: SamplerConfig = SERVING_SAMPLER,
    seed: int | Sequence[int] = 0,
    *,
    config: BaseModelConfig | None = None,
    uncond_states: torch.Tensor | None = None,
    size: int | None = None,
    channels: int | None = None,
) -> np.ndarray:
    """Sample one image per row of ``text_states`` (B, L, D): uint8 (B, size, size, channels).

    ``seed`` is either one int (row i uses seed + i) or one seed per row (:func:`initial_noise`); ``config`` gives
    the noise schedule and, unless ``size`` / ``channels`` are given, the image shape (default: BaseModelConfig()).
    Guidance and batching as :func:`denoise`.
    """
    batch = text_states.shape[0]
    seeds = [seed + row for row in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != batch:
        raise ConfigError(f"got {len(seeds)} seeds for {batch} prompts; pass one seed per prompt or a single int")
    model_config = config or BaseModelConfig()
    noise = initial_noise(
        seeds, channels or model_config.channels, size or model_config.sample_size, text_states.device
    )
    return to_uint8(denoise(noise_fn, noise, text_states, sampler, model_config, uncond_states))


def unet_noise_fn(unet: UNet2DConditionModel) -> NoiseFn:
    """The plain base model as a noise predictor."""

    def predict(x_t: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, encoder_hidden_states=text_states).sample

    return predict


def load_base_unet(folder: Path = BASE_CHECKPOINT_DIR, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """The base UNet of a checkpoint folder (default: the committed assets/base), in eval mode, frozen."""
    _require_checkpoint(Path(folder))
    unet = load_component(Path(folder), UNET_COMPONENT, unet_from_config, device=device)
    if not isinstance(unet, UNet2DConditionModel):
        raise ConfigError(f"{folder}/{UNET_COMPONENT} did not build a UNet2DConditionModel")
    unet.eval().requires_grad_(False)
    return unet


def _require_checkpoint(folder: Path) -> None:
    if not (folder / UNET_COMPONENT).is_dir():
        raise ConfigError(
            f"no base checkpoint at {folder} (expected {folder}/{UNET_COMPONENT}/); run `perfusion pretrain --out "
            f"{folder}` or pass the folder of one"
        )


def base_model_config(folder: Path = BASE_CHECKPOINT_DIR) -> BaseModelConfig:
    _require_checkpoint(Path(folder))
    return BaseModelConfig.from_dict(read_component_config(Path(folder), UNET_COMPONENT)["base_model"])


def base_text_encoder(folder: Path = BASE_CHECKPOINT_DIR) -> TextEncoder:
    """The frozen text encoder at the token length the base model in ``folder`` was trained with."""
    return TextEncoder(max_length=base_model_config(folder).text_max_length)


class BaseGenerator:
    """The base text-to-image model ready to sample: UNet + frozen MiniLM."""

    def __init__(
        self,
        folder: Path = BASE_CHECKPOINT_DIR,
        device: str | torch.device = "cpu",
        text_encoder: TextEncoder | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.config = base_model_config(self.folder)
        self.unet = load_base_unet(self.folder, self.device)
        self.text_encoder = text_encoder or TextEncoder(max_length=self.config.text_max_length, device=self.device)

    def text_states(self, prompts: Sequence[str]) -> torch.Tensor:
        states, _mask = self.text_encoder.encode(prompts)
        return states.to(self.device)

    def uncond_states(self) -> torch.Tensor:
        return self.text_states([""])

    def generate(
        self,
        prompts: Sequence[str],
        seeds: int | Sequence[int] = 0,
        sampler: SamplerConfig = SERVING_SAMPLER,
        noise_fn: NoiseFn | None = None,
    ) -> np.ndarray:
        """One image per prompt: uint8 (B, H, W, 3). ``noise_fn`` replaces the base UNet (e.g. personalized)."""
        return sample_images(
            noise_fn or unet_noise_fn(self.unet),
            self.text_states(prompts),
            sampler,
            seeds,
            config=self.config,
            uncond_states=self.uncond_states(),
        )
