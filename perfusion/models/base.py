"""The base text-to-image model: a pixel-space diffusers ``UNet2DConditionModel`` that cross-attends to MiniLM.

Configuration is a frozen pydantic model (:class:`BaseModelConfig`) stored beside the weights in config.json. A
diffusers Stable-Diffusion-style UNet can stand in for the built one (:func:`adapt_pretrained_unet`); its
checkpoint then records the diffusers config instead, and :func:`unet_from_config` rebuilds either kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from pydantic import Field, model_validator

from perfusion.errors import ConfigError
from perfusion.frozen_config import FrozenConfig
from perfusion.sampler_config import SamplerConfig
from perfusion.text_encoder import DEFAULT_MAX_LENGTH, HIDDEN_SIZE


class BaseModelConfig(FrozenConfig):
    """Shape of the base UNet and its noise schedule."""

    saved_name: ClassVar[str] = "base model config"

    sample_size: int = Field(default=32, description="image side in pixels (the UNet works in pixel space)")
    channels: int = Field(default=3, description="image channels (RGB)")
    block_out_channels: tuple[int, ...] = Field(
        default=(32, 64, 128), description="channels of each resolution level, highest resolution first"
    )
    layers_per_block: int = Field(default=1, ge=1, description="ResNet layers in each down block")
    cross_attention_from_level: int = Field(
        default=1, ge=0, description="first resolution level with cross-attention (0 = all levels)"
    )
    cross_attention_dim: int = Field(default=HIDDEN_SIZE, description="width of the text token states")
    text_max_length: int = Field(default=DEFAULT_MAX_LENGTH, description="text tokens cross-attended to")
    attention_heads: int = Field(default=4, description="attention heads in every transformer block")
    norm_num_groups: int = Field(default=16, description="GroupNorm groups; divides every channel count")
    num_train_timesteps: int = Field(default=1000, description="diffusion steps of the training schedule")
    beta_schedule: str = Field(
        default="squaredcos_cap_v2", description="diffusers beta schedule (squaredcos_cap_v2, linear, ...)"
    )

    @model_validator(mode="after")
    def _levels_fit(self) -> Self:
        """The sample halves cleanly at every level, GroupNorm divides every level's channels, and cross-attention
        starts at a level the UNet has."""
        if self.sample_size % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(
                f"sample_size {self.sample_size} must be divisible by 2^(levels-1) = "
                f"{2 ** (len(self.block_out_channels) - 1)}; pick 32 or 64, or fewer block_out_channels"
            )
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"every block_out_channels value must be divisible by norm_num_groups={self.norm_num_groups}; "
                    f"got {channels}"
                )
        if self.cross_attention_from_level >= len(self.block_out_channels):
            raise ValueError(
                f"cross_attention_from_level must be in [0, {len(self.block_out_channels) - 1}], "
                f"got {self.cross_attention_from_level}"
            )
        return self


QUICK_CONFIG = BaseModelConfig(block_out_channels=(16, 32), layers_per_block=1, attention_heads=2, norm_num_groups=8)


def build_unet(config: BaseModelConfig) -> UNet2DConditionModel:
    """A freshly initialised pixel-space UNet; cross-attention on (B, text_max_length, cross_attention_dim)."""
    levels = len(config.block_out_channels)
    attends = [level >= config.cross_attention_from_level for level in range(levels)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    return UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=config.channels,
        out_channels=config.channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        # diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads.
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_num_groups,
    )


def adapt_pretrained_unet(unet: UNet2DConditionModel, config: BaseModelConfig, seed: int = 0) -> UNet2DConditionModel:
    """Make a Stable-Diffusion-style UNet (latent channels, CLIP-width cross-attention) work on our data.

    The pretrained interior is kept. New, freshly initialised layers replace what does not fit: conv_in/conv_out
    for ``config.channels`` pixel channels, and a linear projection from the text encoder's width to the UNet's
    cross_attention_dim (diffusers' ``encoder_hid_proj``, type "text_proj"). The result round-trips through
    ``UNet2DConditionModel.from_config(unet.config)``.
    """
    pretrained_config = dict(unet.config)
    if pretrained_config.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ConfigError(
            f"the base model's encoder_hid_dim_type is {pretrained_config['encoder_hid_dim_type']!r}; only "
            "Stable-Diffusion-style UNets (no image or text-image projection) can be used with --base-model"
        )
    overrides: dict[str, Any] = {"sample_size": config.sample_size}
    if pretrained_config["in_channels"] != config.channels or pretrained_config["out_channels"] != config.channels:
        overrides.update(in_channels=config.channels, out_channels=config.channels)
    if pretrained_config["cross_attention_dim"] != config.cross_attention_dim:
        overrides.update(encoder_hid_dim=config.cross_attention_dim, encoder_hid_dim_type="text_proj")
    if len(overrides) == 1:
        unet.register_to_config(**overrides)
        return unet
    torch.manual_seed(seed)
    adapted = UNet2DConditionModel.from_config({**pretrained_config, **overrides})
    pretrained = unet.state_dict()
    fitting = {
        name: tensor
        for name, tensor in pretrained.items()
        if name in adapted.state_dict() and adapted.state_dict()[name].shape == tensor.shape
    }
    adapted.load_state_dict(fitting, strict=False)
    return adapted


def load_pretrained_unet(folder: Path, config: BaseModelConfig) -> UNet2DConditionModel:
    """Load ``folder/unet`` of a local diffusers pipeline folder and adapt it (no download)."""
    if not (folder / "unet" / "config.json").is_file():
        raise ConfigError(
            f"--base-model {folder} must be a diffusers pipeline folder with a unet/ subfolder "
            "(unet/config.json and its weights)"
        )
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
    return adapt_pretrained_unet(unet, config)


def unet_component_config(config: BaseModelConfig, unet: UNet2DConditionModel, built: bool) -> dict[str, Any]:
    """What config.json records for a UNet: our config, plus the diffusers config when not built from ours."""
    return {"base_model": config.to_dict(), "diffusers_unet": None if built else _jsonable(dict(unet.config))}


def unet_from_config(component_config: dict[str, Any]) -> UNet2DConditionModel:
    """Rebuild the (uninitialised) UNet that :func:`unet_component_config` described."""
    if "base_model" not in component_config:
        raise ConfigError(f"a UNet config.json needs a 'base_model' entry; got keys {sorted(component_config)}")
    diffusers_config = component_config.get("diffusers_unet")
    if diffusers_config:
        return UNet2DConditionModel.from_config(diffusers_config)
    return build_unet(BaseModelConfig.from_dict(component_config["base_model"]))


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if not k.startswith("_")}


def build_train_scheduler(config: BaseModelConfig) -> DDPMScheduler:
    """DDPM noise schedule for training (epsilon prediction; samples clipped to [-1, 1]).

    diffusers is imported from its defining modules throughout: its top-level lazy names are opaque to mypy.
    """
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def build_sampling_scheduler(
    config: BaseModelConfig, sampler: SamplerConfig
) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """The deterministic scheduler ``sampler`` names over the training schedule, its timesteps set.

    ``sampler.spacing`` is diffusers' ``timestep_spacing``. With "trailing" the first timestep is
    ``num_train_timesteps - 1`` and the schedule strictly decreases (4 steps: 999, 749, 499, 249); "leading" starts
    one step's span earlier (4 steps: 750, 500, 250, 0), where the squared-cosine schedule's alpha-bar is still 0.14,
    so the pure noise drawn at the start holds too much noise for its timestep and few-step samples stay noisy.

    DDIM does not clip its x0 estimates: near t = T they are noise amplified ~100x, and clipping them to [-1, 1]
    pushes whole images towards saturated colours that later steps do not undo (worse with guidance). At t = T - 1
    itself the estimate is meaningless (alpha-bar 2.4e-9: the model's eps error times 20,000), which
    :func:`perfusion.sampling.denoise` handles. ``set_alpha_to_one=False``: the last step lands on alpha-bar[0]
    (0.99996, noise std 0.006 in [-1, 1], under one uint8 level), whatever the step count; diffusers computes the
    previous timestep as t - T // steps, which is 0 for some counts (6 steps end at 166 -> 0) and -1 for others (4
    steps end at 249 -> -1), so ``set_alpha_to_one=True`` would end at alpha 1 for some counts only.
    DPM-Solver++ extrapolates from x0 estimates, so it needs dynamic thresholding to stay bounded.

    diffusers is imported from its defining modules throughout: its top-level lazy names are opaque to mypy.
    """
    if sampler.steps > config.num_train_timesteps:
        raise ConfigError(
            f"SamplerConfig.steps must be at most the model's num_train_timesteps={config.num_train_timesteps}, got "
            f"{sampler.steps}; sample with fewer steps"
        )
    train_config = build_train_scheduler(config).config
    scheduler: DDIMScheduler | DPMSolverMultistepScheduler
    if sampler.kind == "ddim":
        scheduler = DDIMScheduler.from_config(
            train_config, clip_sample=False, set_alpha_to_one=False, timestep_spacing=sampler.spacing
        )
    else:  # "dpm-solver"; SamplerConfig refuses any other kind
        scheduler = DPMSolverMultistepScheduler.from_config(
            train_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=True,
            sample_max_value=1.0,
            timestep_spacing=sampler.spacing,
        )
    scheduler.set_timesteps(sampler.steps)
    if len(scheduler.timesteps) != sampler.steps:
        # diffusers' trailing grid is a float arange that, for 62 step counts (61, 103, 121, ...), gains a spurious
        # last timestep of -1 (alpha-bar[-1] is the last, pure-noise one): use the same grid in exact arithmetic.
        exact = trailing_timesteps(config.num_train_timesteps, sampler.steps)
        if isinstance(scheduler, DPMSolverMultistepScheduler):
            scheduler.set_timesteps(timesteps=exact.tolist())  # also its sigmas
        else:
            scheduler.timesteps = torch.from_numpy(exact)  # DDIM's step reads only its step count
    return scheduler


def trailing_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """diffusers' "trailing" grid without its float arange: round(T * k / steps) - 1 for k = steps, ..., 1."""
    return (np.round(num_train_timesteps * np.arange(steps, 0, -1) / steps) - 1).astype(np.int64)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
