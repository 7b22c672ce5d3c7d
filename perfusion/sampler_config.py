"""Which sampler draws an image: :class:`SamplerConfig`, and :data:`SERVING_SAMPLER`, the one every group uses.

The service, the simulator's evaluation and probes, the trainer's publish gate and pretraining's evaluation all
sample with a ``SamplerConfig``; the service's own is :data:`SERVING_SAMPLER`, chosen by ``perfusion eval sampler``
(``docs/sampler.md``: the rule, the measured table and the choice).

This module imports nothing heavy, so that settings and command-line flags can take their defaults from it;
:mod:`perfusion.sampling` re-exports both names beside the code that samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from perfusion.errors import ConfigError

SamplerKind = Literal["ddim", "dpm-solver"]
TimestepSpacing = Literal["trailing", "leading", "linspace"]
SAMPLER_KINDS: tuple[str, ...] = ("ddim", "dpm-solver")
TIMESTEP_SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")
MAX_STEPS = 1000  # the training schedule's length (BaseModelConfig.num_train_timesteps); a step per timestep at most


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """A deterministic sampler over the base model's training schedule, and its classifier-free guidance."""

    kind: str = field(
        default="ddim",
        metadata={"help": "ddim (DDIM, eta 0, x0 unclipped) or dpm-solver (DPM-Solver++ 2nd order, thresholded)"},
    )
    spacing: str = field(
        default="trailing",
        metadata={
            "help": "diffusers' timestep_spacing: trailing starts at the last training timestep (pure noise); "
            "leading starts 1/steps of the schedule earlier (the flaw of arXiv 2305.08891); linspace spans both ends"
        },
    )
    steps: int = field(metadata={"help": "denoising steps (scheduler steps) per image"})
    guidance_scale: float = field(
        default=3.0, metadata={"help": "classifier-free guidance scale; 1 turns guidance off (one branch)"}
    )

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ConfigError(
                f"SamplerConfig.kind must be one of {', '.join(SAMPLER_KINDS)}, got {self.kind!r}; use 'ddim' (the "
                "serving sampler) or 'dpm-solver'"
            )
        if self.spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(
                f"SamplerConfig.spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {self.spacing!r}; use "
                "'trailing' (the first step at the last training timestep)"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(
                f"SamplerConfig.steps must be a whole number between 1 and {MAX_STEPS}, got {self.steps!r}; pass the "
                "number of denoising steps, e.g. 4"
            )
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
            raise ConfigError(
                f"SamplerConfig.guidance_scale must be a finite number >= 0, got {scale!r}; pass 1.0 for no guidance "
                "or e.g. 3.0"
            )

    def with_steps(self, steps: int | None) -> SamplerConfig:
        """The same sampler at ``steps`` steps (None: unchanged), e.g. a CI-sized run of the serving sampler."""
        return self if steps is None else dataclasses.replace(self, steps=steps)

    def describe(self) -> str:
        """One line for reports: "DDIM, trailing spacing, 4 steps, guidance 3.0"."""
        name = {"ddim": "DDIM", "dpm-solver": "DPM-Solver++ (2nd order)"}[self.kind]
        return f"{name}, {self.spacing} spacing, {self.steps} steps, guidance {self.guidance_scale:g}"


# The sampler of every served group (docs/sampler.md): trailing DDIM at the fewest steps whose attribute accuracy
# and garment coverage are within the rule's tolerance of 25 trailing steps.
SERVING_SAMPLER = SamplerConfig(kind="ddim", spacing="trailing", steps=10, guidance_scale=3.0)
