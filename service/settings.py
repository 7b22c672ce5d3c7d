"""Settings of ``perfusion serve``: where it listens, what it serves and how much it generates at once.

Every field is a flag of ``perfusion serve`` (``--port``, ``--steps``, ``--generation-workers``, ...) and a variable
``PERFUSION_SERVE_<FIELD>`` (``PERFUSION_SERVE_GENERATION__WORKERS`` for the pool's), :mod:`perfusion.settings`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from perfusion.settings import Settings
from service.generation_pool import GenerationPoolSettings


class ServiceSettings(Settings):
    """Configuration of the generator service."""

    model_config = SettingsConfigDict(env_prefix="PERFUSION_SERVE_")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    base: Path | None = Field(default=None, description="base checkpoint folder; None = assets/base")
    models: Path | None = Field(default=None, description="model store with published versions; None = <state>/models")
    steps: int = Field(default=20, ge=1, le=1000, description="denoising steps per candidate group")
    guidance: float = Field(default=3.0, ge=0.0, le=50.0, description="classifier-free guidance scale")
    poll: float = Field(default=0.25, gt=0.0, le=60.0, description="seconds between checks of the store's LATEST")
    generation: GenerationPoolSettings = Field(
        default_factory=GenerationPoolSettings, description="the bounded pool candidate generation runs on"
    )
