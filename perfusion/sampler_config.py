"""Which sampler draws an image: :class:`SamplerConfig`, and :data:`SERVING_SAMPLER`, the one every group uses.

The service, the simulator's evaluation and probes, the trainer's publish gate and pretraining's evaluation all
sample with a ``SamplerConfig``; the service's own is :data:`SERVING_SAMPLER`, chosen by ``perfusion eval sampler``
(``docs/sampler.md``: the rule, the measured table and the choice).

This module imports nothing heavy, so that settings and command-line flags can take their defaults from it;
:mod:`perfusion.sampling` re-exports both names beside the code that samples.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler, field_validator

from perfusion.frozen_config import FrozenConfig

SamplerKind = Literal["ddim", "dpm-solver"]
TimestepSpacing = Literal["trailing", "leading", "linspace"]
SAMPLER_KINDS: tuple[str, ...] = ("ddim", "dpm-solver")
TIMESTEP_SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")
MAX_STEPS = 1000  # the training schedule's length (BaseModelConfig.num_train_timesteps); a step per timestep at most

# The names kind and spacing may take, and what a refused value of each field is told.
_CHOICES: dict[str, tuple[str, ...]] = {"kind": SAMPLER_KINDS, "spacing": TIMESTEP_SPACINGS}
_REFUSALS: dict[str, str] = {
    "kind": f"SamplerConfig.kind must be one of {', '.join(SAMPLER_KINDS)}, got {{value!r}}; use 'ddim' (the serving "
    "sampler) or 'dpm-solver'",
    "spacing": f"SamplerConfig.spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {{value!r}}; use "
    "'trailing' (the first step at the last training timestep)",
    "steps": f"SamplerConfig.steps must be a whole number between 1 and {MAX_STEPS}, got {{value!r}}; pass the number "
    "of denoising steps, e.g. 4",
    "guidance_scale": "SamplerConfig.guidance_scale must be a finite number >= 0, got {value!r}; pass 1.0 for no "
    "guidance or e.g. 3.0",
}


class SamplerConfig(FrozenConfig):
    """A deterministic sampler over the base model's training schedule, and its classifier-free guidance."""

    saved_name: ClassVar[str] = "sampler config"

    kind: str = Field(
        default="ddim",
        description="ddim (DDIM, eta 0, x0 unclipped) or dpm-solver (DPM-Solver++ 2nd order, thresholded)",
    )
    spacing: str = Field(
        default="trailing",
        description="diffusers' timestep_spacing: trailing starts at the last training timestep (pure noise); "
        "leading starts 1/steps of the schedule earlier (the flaw of arXiv 2305.08891); linspace spans both ends",
    )
    steps: int = Field(ge=1, le=MAX_STEPS, strict=True, description="denoising steps (scheduler steps) per image")
    guidance_scale: float = Field(
        default=3.0,
        ge=0.0,
        strict=True,
        allow_inf_nan=False,
        description="classifier-free guidance scale; 1 turns guidance off (one branch)",
    )

    @field_validator("kind", "spacing", "steps", "guidance_scale", mode="wrap")
    @classmethod
    def _refuse_with_the_fix(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """The field's type and bounds (strict: no bool or float steps), kind and spacing one of their names; a
        refused value is told what to pass instead."""
        name = str(info.field_name)
        try:
            checked = handler(value)
        except ValidationError:
            raise ValueError(_REFUSALS[name].format(value=value)) from None
        if name in _CHOICES and checked not in _CHOICES[name]:
            raise ValueError(_REFUSALS[name].format(value=value))
        return checked

    def with_steps(self, steps: int | None) -> SamplerConfig:
        """The same sampler at ``steps`` steps (None: unchanged), e.g. a CI-sized run of the serving sampler."""
        return self if steps is None else self.with_overrides(steps=steps)

    def describe(self) -> str:
        """One line for reports: "DDIM, trailing spacing, 4 steps, guidance 3.0"."""
        name = {"ddim": "DDIM", "dpm-solver": "DPM-Solver++ (2nd order)"}[self.kind]
        return f"{name}, {self.spacing} spacing, {self.steps} steps, guidance {self.guidance_scale:g}"


# The sampler of every served group (docs/sampler.md): trailing DDIM at the fewest steps whose attribute accuracy
# and garment coverage are within the rule's tolerance of 25 trailing steps.
SERVING_SAMPLER = SamplerConfig(kind="ddim", spacing="trailing", steps=10, guidance_scale=3.0)
