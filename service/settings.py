"""Settings of ``perfusion serve``: where it listens, what it serves and how much it generates at once.

The sampler is :data:`perfusion.sampler_config.SERVING_SAMPLER` (``docs/sampler.md``); ``steps`` and ``guidance``
default to its fields. Every field is a flag of ``perfusion serve`` (``--port``, ``--steps``, ``--generation-workers``,
``--best-of-n``, ``--limits-generation-per-minute``, ...) and a variable ``PERFUSION_SERVE_<FIELD>``
(``PERFUSION_SERVE_GENERATION__WORKERS`` for the pool's, ``PERFUSION_SERVE_BEST_OF__N`` for best-of-N's,
``PERFUSION_SERVE_LIMITS__GENERATION_PER_MINUTE`` for the rate limits'), :mod:`perfusion.settings`.

Replicas: every ``perfusion serve`` process given the same ``store_url`` (designs, the ledger, the demand view; the
API key file beside it unless ``auth.keys_file`` names one) and the same image store (``PERFUSION_IMAGES_URL``,
:mod:`perfusion.image_store`) serves the same truth.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from perfusion.contracts.records import MAX_K
from perfusion.paths import state_dir
from perfusion.sampler_config import MAX_STEPS, SERVING_SAMPLER, SamplerConfig
from perfusion.settings import Settings
from service.auth import AuthSettings
from service.generation_pool import GenerationPoolSettings
from service.limits import RateLimitSettings
from service.readiness import ReadinessSettings
from service.sqlite_store import sqlite_path, sqlite_url

MIN_BEST_OF_N = 8
# One sampling call of N rows (2N with guidance): 16 keeps a group's forward passes within the bench's budget.
MAX_BEST_OF_N = 16


class BestOfSettings(Settings):
    """Best-of-N: draw N candidates for the viewer, show the K the serving version's reward model scores highest."""

    enabled: bool = Field(
        default=False,
        description="rank by the reward model: draw n candidates and show the k best (only for a viewer with a user "
        "vector, on a version whose reward model's held-out GAUC interval starts at gauc_floor or above)",
    )
    n: int = Field(
        default=MAX_BEST_OF_N,
        ge=MIN_BEST_OF_N,
        le=MAX_BEST_OF_N,
        description="candidates drawn in the one sampling call of a ranked group (candidate i uses seed + i)",
    )
    max_k: int = Field(
        default=8,
        ge=1,
        le=MAX_K,
        description="largest K a group is ranked for (n must be at least it); a request for more draws K unranked",
    )
    gauc_floor: float = Field(
        default=0.55,
        ge=0.5,
        le=1.0,
        description="lowest lower bound of the reward model's held-out GAUC interval (the trainer's gate records "
        "rm_gauc_low in the version's manifest) at which its scores rank candidates",
    )

    @model_validator(mode="after")
    def _draws_at_least_k(self) -> BestOfSettings:
        if self.n < self.max_k:
            raise ValueError(
                f"n ({self.n}) must be at least max_k ({self.max_k}): the K shown are chosen from the N drawn; "
                "raise PERFUSION_SERVE_BEST_OF__N or lower PERFUSION_SERVE_BEST_OF__MAX_K"
            )
        return self

    def ranks(self, k: int) -> bool:
        """Whether a group of ``k`` candidates is drawn best-of-N (given a reward model above the floor and u)."""
        return self.enabled and k <= self.max_k


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
    store_url: str | None = Field(
        default=None,
        min_length=1,
        description="the store of designs, the ledger and the demand view, shared by every replica given the same "
        "URL: sqlite:///<path> (sqlite:////abs/path.sqlite); the API key file lives beside it unless auth.keys_file "
        "names one; None = sqlite:///<state>/service/service.sqlite",
    )
    generation: GenerationPoolSettings = Field(
        default_factory=GenerationPoolSettings, description="the bounded pool candidate generation runs on"
    )
    best_of: BestOfSettings = Field(
        default_factory=BestOfSettings, description="best-of-N: candidates ranked by the version's reward model"
    )
    limits: RateLimitSettings = Field(
        default_factory=RateLimitSettings,
        description="rate limits per principal on generation and on posted events (429 with Retry-After)",
    )
    readiness: ReadinessSettings = Field(
        default_factory=ReadinessSettings, description="the checks of GET /readyz (Kafka, Feast, the model)"
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings,
        description="the API key store and how far clients' events are trusted (clock skew, order quantities)",
    )

    @model_validator(mode="after")
    def _supported_store(self) -> ServiceSettings:
        if self.store_url is not None:
            sqlite_path(self.store_url, "store_url (PERFUSION_SERVE_STORE_URL)")  # a ConfigError when not supported
        return self

    def resolved_store_url(self) -> str:
        """``store_url``, or the default store under the state folder."""
        return self.store_url if self.store_url is not None else sqlite_url(state_dir() / "service" / "service.sqlite")

    def sampler(self) -> SamplerConfig:
        """The serving sampler (:data:`SERVING_SAMPLER`) at this service's steps and guidance."""
        return SamplerConfig(
            kind=SERVING_SAMPLER.kind, spacing=SERVING_SAMPLER.spacing, steps=self.steps, guidance_scale=self.guidance
        )
