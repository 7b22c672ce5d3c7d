"""Inference: draw images from any noise predictor with a diffusers scheduler and classifier-free guidance.

:func:`sample_images` only needs ``noise_fn(x_t, t, text_states) -> eps``, so the base UNet and any
personalized model built around it sample through the same code. :class:`BaseGenerator` loads the committed base
checkpoint and the text encoder and samples images for prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from perfusion.checkpoints import load_component, read_component_config
from perfusion.errors import ConfigError
from perfusion.models.base import BaseModelConfig, build_sampling_scheduler, unet_from_config
from perfusion.paths import ASSETS_DIR
from perfusion.text_encoder import TextEncoder

# noise_fn(x_t (B, C, H, W), t (B,) long, text_states (B, L, D)) -> predicted noise (B, C, H, W)
NoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BASE_CHECKPOINT_DIR = ASSETS_DIR / "base"
UNET_COMPONENT = "unet"
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_NUM_STEPS = 25


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
def sample_images(
    noise_fn: NoiseFn,
    text_states: torch.Tensor,
    num_steps: int = DEFAULT_NUM_STEPS,
    seed: int | Sequence[int] = 0,
    size: int = 32,
    *,
    config: BaseModelConfig | None = None,
    uncond_states: torch.Tensor | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    sampler: str = "ddim",
    channels: int = 3,
) -> np.ndarray:
    """Sample one image per row of ``text_states`` (B, L, D): uint8 (B, size, size, channels).

    ``seed`` is either one int (row i uses seed + i) or one seed per row. With ``uncond_states`` (the empty
    prompt's states, (1, L, D) or (B, L, D)) and ``guidance_scale`` != 1, classifier-free guidance mixes the
    unconditional and conditional predictions; ``noise_fn`` is then called twice a step, each time with B rows
    in the prompts' order. ``config`` gives the noise schedule (default: BaseModelConfig()).
    """
    batch = text_states.shape[0]
    seeds = [seed + row for row in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != batch:
        raise ConfigError(f"got {len(seeds)} seeds for {batch} prompts; pass one seed per prompt or a single int")
    if num_steps < 1:
        raise ConfigError(f"num_steps must be at least 1, got {num_steps}")
    scheduler = build_sampling_scheduler(config or BaseModelConfig(), sampler)
    scheduler.set_timesteps(num_steps)
    device = text_states.device
    guided = uncond_states is not None and guidance_scale != 1.0
    if guided:
        assert uncond_states is not None
        uncond = uncond_states.to(device=device, dtype=text_states.dtype).expand(batch, -1, -1)
    sample = initial_noise(seeds, channels, size, device) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        t = torch.full((batch,), int(timestep), device=device, dtype=torch.long)
        model_input = scheduler.scale_model_input(sample, timestep)
        eps = noise_fn(model_input, t, text_states)
        if guided:
            eps_uncond = noise_fn(model_input, t, uncond)
            eps = eps_uncond + guidance_scale * (eps - eps_uncond)
        sample = scheduler.step(eps, timestep, sample, return_dict=False)[0]
    return to_uint8(sample)


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
    """The base text-to-image model ready to sample: UNet + frozen MiniLM + guidance defaults."""

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
        num_steps: int = DEFAULT_NUM_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        sampler: str = "ddim",
        noise_fn: NoiseFn | None = None,
    ) -> np.ndarray:
        """One image per prompt: uint8 (B, H, W, 3). ``noise_fn`` replaces the base UNet (e.g. personalized)."""
        return sample_images(
            noise_fn or unet_noise_fn(self.unet),
            self.text_states(prompts),
            num_steps=num_steps,
            seed=seeds,
            size=self.config.sample_size,
            config=self.config,
            uncond_states=self.uncond_states(),
            guidance_scale=guidance_scale,
            sampler=sampler,
            channels=self.config.channels,
        )
