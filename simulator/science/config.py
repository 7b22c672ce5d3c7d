"""Size and settings of one seed of the science evaluation, and the arms it compares.

An arm is a name of :data:`trainer.settings.ARMS`, or ``base_best_of_n`` (the base generator, its K candidates the
best of N by the arm's reward model), optionally with ``@<user pathway>`` for the arms with an adaptive network
(``perfusion@base_tokens``): the validation panel compares pathways that way. ``perfusion_reward_ranked`` is
``perfusion`` whose update also trains on reward-ranked groups (at most :data:`REWARD_RANKED_SHARE` of its steps).
Every trainer setting the config leaves at None is the trainer's own default (trainer.settings.TrainerSettings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from perfusion.errors import ConfigError
from perfusion.models.user_pathways import USER_PATHWAYS
from perfusion.paths import ASSETS_DIR
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig
from perfusion.settings import Settings

BASELINE = "base"
BEST_OF_N = "base_best_of_n"
REWARD_RANKED = "perfusion_reward_ranked"  # perfusion, plus reward-ranked groups (trainer.reward_ranked)
REWARD_RANKED_SHARE = 0.5  # the largest share of its generator steps on them, before the reliability
SCIENCE_ARMS: tuple[str, ...] = (
    BASELINE,
    "sft",
    "pairwise_dpo",
    "group_without_adaptive",
    "adaptive_with_pairwise_dpo",
    "perfusion",
    BEST_OF_N,
    REWARD_RANKED,
)
VALIDATION_SEED = 100
TEST_SEEDS: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class ArmSpec:
    """One arm: the trainer arm it trains as, and the user pathway when it has an adaptive network."""

    name: str  # as given: "perfusion", "perfusion@base_tokens", "base_best_of_n"
    trainer_arm: str
    user_pathway: str | None  # None: the trainer's default
    best_of_n: bool
    reward_ranked: bool = False

    @classmethod
    def parse(cls, name: str) -> ArmSpec:
        from trainer.settings import ARMS

        trainer_arm, _, pathway = name.partition("@")
        best_of_n = trainer_arm == BEST_OF_N
        reward_ranked = trainer_arm == REWARD_RANKED
        if best_of_n:
            trainer_arm = BASELINE  # base generator; its reward model trains as every arm's does
        if reward_ranked:
            trainer_arm = "perfusion"
        if trainer_arm not in ARMS:
            raise ConfigError(f"unknown arm {name!r}; choose from {', '.join((*ARMS, BEST_OF_N, REWARD_RANKED))}")
        if pathway:
            if pathway not in USER_PATHWAYS:
                raise ConfigError(f"arm {name!r}: the pathway must be one of {', '.join(USER_PATHWAYS)}")
            if not ARMS[trainer_arm][1]:
                raise ConfigError(f"arm {name!r}: {trainer_arm} has no adaptive network, so no user pathway")
        return cls(name, trainer_arm, pathway or None, best_of_n, reward_ranked)

    @property
    def takes_u(self) -> bool:
        """Whether the arm's generator reads the user vector (an adaptive network)."""
        from trainer.settings import ARMS

        return bool(ARMS[self.trainer_arm][1]) and ARMS[self.trainer_arm][0] != "none"

    @property
    def trains_generator(self) -> bool:
        from trainer.settings import ARMS

        return ARMS[self.trainer_arm][0] != "none"


class ScienceConfig(Settings):
    """One seed of the science evaluation."""

    arms: tuple[str, ...] = Field(default=SCIENCE_ARMS, description="arms (see the module docstring)")
    seed: int = Field(
        default=VALIDATION_SEED,
        description="seed of the panel, logs, training noise and plan (validation: 100; test seeds: 0, 1, 2)",
    )
    shoppers_per_segment: int = Field(default=10, ge=1, description="training shoppers of each of the 4 segments")
    cold_shoppers: int = Field(default=8, ge=0, description="shoppers with a profile and no behaviour")
    merchants_per_segment: int = Field(default=2, ge=1, description="merchants of each segment, with profiles")
    logged_groups: int = Field(
        default=12, ge=1, description="round-0 base groups each training shopper sees (chosen on seed 100)"
    )
    merchant_groups: int = Field(default=4, ge=0, description="round-0 groups of their designs each merchant sees")
    eval_showings: int = Field(
        default=2, ge=1, description="showings per training shopper after the update (train and held-out prompts)"
    )
    k: int = Field(default=4, ge=2, le=16, description="candidates per group")
    best_of: int = Field(
        default=16, ge=2, le=16, description="N of base_best_of_n: candidates drawn, the K best shown (8 to 16)"
    )
    sampling_steps: int = Field(default=SERVING_SAMPLER.steps, ge=1, description="serving sampler steps")
    reward_steps: int = Field(default=150, ge=0, description="reward-model steps of the update")
    diffusion_steps: int | None = Field(default=None, description="generator steps of the update (None: the trainer's)")
    groups_per_batch: int | None = Field(default=None, description="groups per generator step (None: the trainer's)")
    draws_per_group: int | None = Field(default=None, description="(t, noise) draws per group (None: the trainer's)")
    beta: float | None = Field(default=None, description="implicit-reward scale (None: the trainer's)")
    supervised_weight: float | None = Field(
        default=None, description="lambda, the weight of the positives' supervised term (None: the trainer's)"
    )
    adaptive_learning_rate: float | None = Field(
        default=None, description="learning rate of the adaptive network (None: the trainer's)"
    )
    unet_learning_rate: float | None = Field(
        default=None, description="learning rate of the fine-tuned U-Net arms (None: the trainer's)"
    )
    rounds: int = Field(default=1, ge=1, description="updates: 1 = the one-update protocol, 2+ = a closed loop")
    closed_loop_groups: int = Field(
        default=2, description="groups per shopper the arm's own generator shows between two updates"
    )
    panel: str | None = Field(
        default=None,
        description="module:Class of a PreferencePanel built as Class(n_users=..., seed=...); None: pixels",
    )
    bootstrap_samples: int = Field(default=1000, ge=100, description="bootstrap resamplings of users")
    torch_threads: int = Field(default=1, ge=1, description="torch threads of each arm's process")
    parallel_arms: int = Field(default=2, ge=1, description="arms trained and drawn at once, a process each")
    base_checkpoint: Path = Field(default=ASSETS_DIR / "base", description="the base model folder")

    @field_validator("arms")
    @classmethod
    def _distinct_known_arms_with_the_baseline(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        try:
            specs = [ArmSpec.parse(arm) for arm in arms]
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if BASELINE not in arms:
            raise ValueError(f"arms must include {BASELINE!r}, the baseline every lift is measured against")
        if len({spec.name for spec in specs}) != len(specs):
            raise ValueError(f"arms must be distinct, got {list(arms)}")
        return arms

    @field_validator("panel")
    @classmethod
    def _module_and_class(cls, panel: str | None) -> str | None:
        if panel is not None and ":" not in panel:
            raise ValueError(f"panel must be 'module:Class', got {panel!r}")
        return panel

    @model_validator(mode="after")
    def _k_within_best_of(self) -> ScienceConfig:
        if not self.k <= self.best_of or not self.best_of >= 8:
            raise ValueError(
                f"need 2 <= k <= best_of and best_of in 8..16 (the service's best-of-N), got k={self.k}, "
                f"best_of={self.best_of}"
            )
        return self

    @property
    def specs(self) -> list[ArmSpec]:
        return [ArmSpec.parse(arm) for arm in self.arms]

    @property
    def sampler(self) -> SamplerConfig:
        return SERVING_SAMPLER.with_steps(self.sampling_steps)

    def trainer_overrides(self) -> dict[str, Any]:
        """The trainer settings this config sets (the others stay the trainer's defaults)."""
        values = {
            "reward_steps": self.reward_steps,
            "diffusion_steps": self.diffusion_steps,
            "groups_per_batch": self.groups_per_batch,
            "draws_per_group": self.draws_per_group,
            "beta": self.beta,
            "supervised_weight": self.supervised_weight,
            "adaptive_learning_rate": self.adaptive_learning_rate,
            "unet_learning_rate": self.unet_learning_rate,
        }
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def quick(cls, **overrides: Any) -> ScienceConfig:
        """The CI-sized seed: every arm, a handful of viewers, few sampling and training steps."""
        values: dict[str, Any] = {
            "shoppers_per_segment": 1,
            "cold_shoppers": 1,
            "merchants_per_segment": 1,
            "logged_groups": 2,
            "merchant_groups": 1,
            "eval_showings": 1,
            "best_of": 8,
            "sampling_steps": 2,
            "reward_steps": 2,
            "diffusion_steps": 2,
            "groups_per_batch": 2,
            "draws_per_group": 2,
            "bootstrap_samples": 100,
        }
        values.update(overrides)
        return cls(**values)
