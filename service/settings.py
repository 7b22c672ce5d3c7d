"""Settings of ``perfusion serve``: where it listens, what it serves and how much it generates at once.

The sampler is :data:`perfusion.sampler_config.SERVING_SAMPLER` (``docs/sampler.md``); ``steps`` and ``guidance``
default to its fields. Every field is a flag of ``perfusion serve`` (``--port``, ``--steps``, ``--generation-workers``,
...) and a variable ``PERFUSION_SERVE_<FIELD>`` (``PERFUSION_SERVE_GENERATION__WORKERS`` for the pool's),
:mod:`perfusion.settings`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from perfusion.sampler_config import MAX_STEPS, SERVING_SAMPLER, SamplerConfig
from perfusion.settings import Settings
from service.generation_pool import GenerationPoolSettings


class ServiceSettings(Settings):
    """Configuration of the generator service."""

    model_config = SettingsConfigDict(env_prefix="PERFUSION_SERVE_")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    base: Path | None = Field(default=None, description="base checkpoint folder; None = assets/base")
    models: Path | None = Field(default=None, description="model store with published versions; None = <state>/models")
    steps: int = Field(
        default=SERVING_SAMPLER.steps,
        ge=1,
        le=MAX_STEPS,
        description=f"denoising steps per candidate group ({SERVING_SAMPLER.kind}, {SERVING_SAMPLER.spacing} spacing)",
    )
    guidance: float = Field(
        default=SERVING_SAMPLER.guidance_scale, ge=0.0, le=50.0, description="classifier-free guidance scale"
    )
    poll: float = Field(default=0.25, gt=0.0, le=60.0, description="seconds between checks of the store's LATEST")
    generation: GenerationPoolSettings = Field(
        default_factory=GenerationPoolSettings, description="the bounded pool candidate generation runs on"
    )

    def sampler(self) -> SamplerConfig:
        """The serving sampler (:data:`SERVING_SAMPLER`) at this service's steps and guidance."""
        return SamplerConfig(
            kind=SERVING_SAMPLER.kind, spacing=SERVING_SAMPLER.spacing, steps=self.steps, guidance_scale=self.guidance
        )
