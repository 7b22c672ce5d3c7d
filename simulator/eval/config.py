"""Size and settings of one evaluation run, and the arms it compares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from perfusion.paths import ASSETS_DIR
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig
from perfusion.settings import Settings
from trainer.settings import ARMS

# Every arm of the trainer's but the one that differs only in its reward model (PerFusionRM without plug-ins): the
# offline reward-model comparison measures that one on the same groups, without a loop of its own.
EVALUATION_ARMS: tuple[str, ...] = tuple(arm for arm in ARMS if arm != "perfusion_rm_without_plugins")
BASELINE_ARM = "base"


class EvaluationConfig(Settings):
    """Size and settings of one evaluation run."""

    arms: tuple[str, ...] = Field(default=EVALUATION_ARMS, description="arms of trainer.settings.ARMS")
    rounds: int = Field(default=2, ge=1, description="trainer updates per arm; rounds 0..rounds are measured")
    train_users: int = Field(default=16, ge=1, description="shoppers whose events drive the loop")
    cold_users: int = Field(default=4, ge=1, description="held-out shoppers with a profile only")
    merchants: int = Field(default=2, ge=1, description="merchants posting the designs and selecting")
    impressions_per_user: int = Field(default=2, ge=1, description="live impressions per training user per round")
    k: int = Field(default=4, ge=2, le=16, description="candidates per impression")
    sampling_steps: int = Field(
        default=SERVING_SAMPLER.steps,
        ge=1,
        description="steps of the serving sampler (SERVING_SAMPLER, trailing DDIM) per generated group",
    )
    reward_steps: int = Field(default=40, description="reward-model steps per trainer update")
    diffusion_steps: int = Field(default=8, description="generator steps per trainer update")
    adaptive_learning_rate: float | None = Field(
        default=None, description="AdamW learning rate of the adaptive network (None: the trainer's)"
    )
    unet_learning_rate: float | None = Field(
        default=None, description="AdamW learning rate of the fine-tuned U-Net arms (None: the trainer's)"
    )
    groups_per_batch: int = Field(default=8, description="groups per trainer step")
    offline_rm_steps: int = Field(default=150, description="steps of each reward model in the offline comparison")
    gate_reward_tolerance: float = Field(
        default=1.0,
        description="the trainer's publish gate on held-out RM GAUC; 1.0 turns it off, since the trainer's held-out "
        "slice (10% of a round's few dozen groups) holds one to five groups and its GAUC moves in steps of 1/3",
    )
    gate_generator_tolerance: float = Field(
        default=0.5,
        description="the trainer's publish gate on generated images, in RM score standard deviations; the same for "
        "every arm (the trainer's default 0.1 lets a reward model trained on a few dozen groups veto updates)",
    )
    bootstrap_samples: int = Field(default=1000, ge=100, description="bootstrap resamplings of users")
    seed: int = Field(default=0, description="seed of users, plan, generation and marketplace draws")
    torch_threads: int = Field(default=1, description="torch threads (small models run best on one)")
    parallel_arms: int = Field(
        default=0,
        ge=0,
        description="arms run at once, each in a process of its own (an arm's Feast store and state are process-wide "
        "settings); 0 = one arm per two CPU cores (an arm and its stream worker keep about that busy)",
    )
    wait_s: float = Field(default=300.0, description="longest wait for the worker's samples and features")
    base_checkpoint: Path = Field(default=ASSETS_DIR / "base", description="the base model folder")

    @field_validator("arms")
    @classmethod
    def _known_arms_with_the_baseline(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [arm for arm in arms if arm not in ARMS]
        if unknown or not arms:
            raise ValueError(f"arms must be a non-empty subset of {', '.join(ARMS)}; got {list(arms)}")
        if BASELINE_ARM not in arms:
            raise ValueError(f"arms must include {BASELINE_ARM!r}, the baseline every lift is measured against")
        return arms

    @property
    def sampler(self) -> SamplerConfig:
        """The sampler of every group the evaluation generates: the service's, at ``sampling_steps``."""
        return SERVING_SAMPLER.with_steps(self.sampling_steps)

    @classmethod
    def quick(cls, **overrides: Any) -> EvaluationConfig:
        """The CI-sized run: every arm, one update, a handful of users, few sampling and training steps."""
        values: dict[str, Any] = {
            "rounds": 1,
            "train_users": 4,
            "cold_users": 2,
            "merchants": 1,
            "impressions_per_user": 1,
            "sampling_steps": 2,
            "reward_steps": 3,
            "diffusion_steps": 2,
            "groups_per_batch": 4,
            "offline_rm_steps": 10,
            "bootstrap_samples": 200,
        }
        values.update(overrides)
        return cls(**values)
