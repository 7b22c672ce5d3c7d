"""Size and settings of one evaluation run, and the arms it compares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfusion.errors import ConfigError
from perfusion.paths import ASSETS_DIR
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig
from trainer.settings import ARMS

# Every arm of the trainer's but the one that differs only in its reward model (PerFusionRM without plug-ins): the
# offline reward-model comparison measures that one on the same groups, without a loop of its own.
EVALUATION_ARMS: tuple[str, ...] = tuple(arm for arm in ARMS if arm != "perfusion_rm_without_plugins")
BASELINE_ARM = "base"


@dataclass(frozen=True)
class EvaluationConfig:
    """Size and settings of one evaluation run."""

    arms: tuple[str, ...] = field(default=EVALUATION_ARMS, metadata={"help": "arms of trainer.settings.ARMS"})
    rounds: int = field(default=2, metadata={"help": "trainer updates per arm; rounds 0..rounds are measured"})
    train_users: int = field(default=16, metadata={"help": "shoppers whose events drive the loop"})
    cold_users: int = field(default=4, metadata={"help": "held-out shoppers with a profile only"})
    merchants: int = field(default=2, metadata={"help": "merchants posting the designs and selecting"})
    impressions_per_user: int = field(default=2, metadata={"help": "live impressions per training user per round"})
    k: int = field(default=4, metadata={"help": "candidates per impression"})
    sampling_steps: int = field(
        default=SERVING_SAMPLER.steps,
        metadata={"help": "steps of the serving sampler (SERVING_SAMPLER, trailing DDIM) per generated group"},
    )
    reward_steps: int = field(default=40, metadata={"help": "reward-model steps per trainer update"})
    diffusion_steps: int = field(default=8, metadata={"help": "generator steps per trainer update"})
    adaptive_learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate of the adaptive network (None: the trainer's)"}
    )
    unet_learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate of the fine-tuned U-Net arms (None: the trainer's)"}
    )
    groups_per_batch: int = field(default=8, metadata={"help": "groups per trainer step"})
    offline_rm_steps: int = field(
        default=150, metadata={"help": "steps of each reward model in the offline comparison"}
    )
    gate_reward_tolerance: float = field(
        default=1.0,
        metadata={
            "help": "the trainer's publish gate on held-out RM GAUC; 1.0 turns it off, since the trainer's held-out "
            "slice (10% of a round's few dozen groups) holds one to five groups and its GAUC moves in steps of 1/3"
        },
    )
    gate_generator_tolerance: float = field(
        default=0.5,
        metadata={
            "help": "the trainer's publish gate on generated images, in RM score standard deviations; the same for "
            "every arm (the trainer's default 0.1 lets a reward model trained on a few dozen groups veto updates)"
        },
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "bootstrap resamplings of users"})
    seed: int = field(default=0, metadata={"help": "seed of users, plan, generation and marketplace draws"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads (small models run best on one)"})
    parallel_arms: int = field(
        default=0,
        metadata={
            "help": "arms run at once, each in a process of its own (an arm's Feast store and state are process-wide "
            "settings); 0 = one arm per two CPU cores (an arm and its stream worker keep about that busy)"
        },
    )
    wait_s: float = field(default=300.0, metadata={"help": "longest wait for the worker's samples and features"})
    base_checkpoint: Path = field(default=ASSETS_DIR / "base", metadata={"help": "the base model"})

    def __post_init__(self) -> None:
        from trainer.settings import ARMS

        unknown = [arm for arm in self.arms if arm not in ARMS]
        if unknown or not self.arms:
            raise ConfigError(f"arms must be a non-empty subset of {', '.join(ARMS)}; got {list(self.arms)}")
        if BASELINE_ARM not in self.arms:
            raise ConfigError(f"arms must include {BASELINE_ARM!r}, the baseline every lift is measured against")
        for name in ("rounds", "train_users", "cold_users", "merchants", "impressions_per_user", "sampling_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.parallel_arms < 0:
            raise ConfigError(f"parallel_arms must be >= 0 (0: one arm per two CPU cores), got {self.parallel_arms}")
        if not 2 <= self.k <= 16:
            raise ConfigError(f"k must be between 2 and 16, got {self.k}")
        if self.bootstrap_samples < 100:
            raise ConfigError(f"bootstrap_samples must be at least 100, got {self.bootstrap_samples}")

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
