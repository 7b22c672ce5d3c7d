"""Frozen, validated configuration of the incremental trainer, passed explicitly to the loop, the update and the gate.

Two choices make the evaluation's arms (issue 7) one code path:

- ``objective``: the diffusion objective (``group`` = PerFusion's Plackett-Luce over P and N, ``pairwise_dpo`` =
  Diffusion-DPO on every (p, n) pair, ``sft`` = denoising loss on positives, ``none`` = leave the generator as
  the base model and train only the reward model);
- ``use_adaptive_network``: train the personalized adaptive network (the frozen base plus a ControlNet-style
  branch that sees the user vector), or, without it, fine-tune a copy of the base U-Net with no user condition.

:data:`ARMS` names each arm's pair of choices; :meth:`TrainerSettings.for_arm` builds its settings. Every other
field has a default that keeps one update on the CPU within seconds to a minute. :meth:`TrainerSettings.from_env`
reads the values an operator changes (broker address, topic prefix) from the environment; nothing else in
``trainer/`` reads it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from perfusion.errors import ConfigError
from perfusion.paths import ASSETS_DIR, state_dir

Objective = Literal["group", "pairwise_dpo", "sft", "none"]
OBJECTIVES: tuple[str, ...] = ("group", "pairwise_dpo", "sft", "none")

# Arm name -> (objective, use_adaptive_network, personalized reward model). The arms of the closed-loop evaluation.
ARMS: dict[str, tuple[Objective, bool, bool]] = {
    "base": ("none", False, True),
    "sft": ("sft", False, True),
    "pairwise_dpo": ("pairwise_dpo", False, True),
    "group_without_adaptive": ("group", False, True),
    "adaptive_with_pairwise_dpo": ("pairwise_dpo", True, True),
    "perfusion": ("group", True, True),
    "perfusion_rm_without_plugins": ("group", True, False),
}

_TOPIC_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class TrainerSettings:
    """Configuration of ``perfusion train``: where it reads and writes, what it trains, how much, and the gate."""

    # --- where
    bootstrap_servers: str = field(
        default="",
        metadata={"help": "Kafka bootstrap address host:port; empty = KAFKA_BOOTSTRAP_SERVERS or the project's broker"},
    )
    topic_prefix: str = field(
        default="", metadata={"help": "prepended to every topic and to the consumer group (tests use a unique one)"}
    )
    consumer_group: str = field(
        default="perfusion-trainer", metadata={"help": "Kafka consumer group whose offsets the trainer commits"}
    )
    model_root: Path | None = field(
        default=None, metadata={"help": "folder of published model versions; None = <state dir>/models"}
    )
    base_checkpoint: Path | None = field(
        default=None, metadata={"help": "folder of the pretrained base model; None = assets/base"}
    )
    image_root: Path | None = field(
        default=None, metadata={"help": "folder of generated images; None = <state dir>/images"}
    )
    feature_repo: Path | None = field(
        default=None, metadata={"help": "Feast feature repo; None = the project's features/ (as the worker uses it)"}
    )
    # --- what
    objective: Objective = field(
        default="group", metadata={"help": f"diffusion objective, one of {', '.join(OBJECTIVES)}"}
    )
    use_adaptive_network: bool = field(
        default=True,
        metadata={"help": "train the user-conditioned adaptive network; False = fine-tune the U-Net, no user input"},
    )
    personalized_reward_model: bool = field(
        default=True, metadata={"help": "PerFusionRM with feature-crossing plug-ins; False = the same towers without"}
    )
    pretrained_reward_towers: bool = field(
        default=True,
        metadata={
            "help": "a new PerFusionRM starts from the catalog-pretrained towers of the base checkpoint "
            "(reward_towers/, trainer.reward_pretrain), as the paper's starts from CLIP; False = random towers"
        },
    )
    # --- how much
    reward_steps: int = field(default=40, metadata={"help": "optimizer steps on the reward model per update"})
    diffusion_steps: int = field(default=6, metadata={"help": "optimizer steps on the generator per update"})
    groups_per_batch: int = field(default=8, metadata={"help": "impressions (groups of K candidates) per step"})
    reward_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the reward model"})
    adaptive_learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "AdamW learning rate of the adaptive network; higher than the U-Net's because its residuals "
            "start at exactly 0 and must grow within the few steps of one update (see docs/results.md)"
        },
    )
    unet_learning_rate: float = field(
        default=1e-4, metadata={"help": "AdamW learning rate of the fine-tuned U-Net copy (arms without the network)"}
    )
    beta: float = field(
        default=2000.0,
        metadata={
            "help": "inverse temperature of the implicit reward -beta * (policy_err - ref_err); errors are "
            "per-pixel means, so differences are ~1e-3 and beta ~1e3 makes rewards of order one"
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm for both models"})
    seed: int = field(default=0, metadata={"help": "seed of batch sampling, noise and timesteps"})
    # --- the replay buffer
    buffer_capacity: int = field(default=4096, metadata={"help": "most group samples kept for replay"})
    recency_half_life: float = field(
        default=512.0,
        metadata={"help": "a buffered sample's sampling weight halves after this many newer samples arrive"},
    )
    dedupe_window: int = field(
        default=50_000,
        metadata={"help": "how many trained sample ids are remembered (and stored in each manifest) against replays"},
    )
    min_new_samples: int = field(
        default=1, metadata={"help": "an update runs only when at least this many new samples arrived since the last"}
    )
    # --- the gate
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "share of samples (chosen by a hash of sample_id) held out for the gate"}
    )
    heldout_capacity: int = field(default=256, metadata={"help": "most held-out samples kept (newest win)"})
    gate_tolerance: float = field(
        default=0.02,
        metadata={
            "help": "publish unless the candidate RM's held-out GAUC is below the serving RM's by more than this"
        },
    )
    gate_generator_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "publish unless the candidate generator's mean RM score on held-out prompts and users is "
            "below the serving generator's by more than this many standard deviations of the RM's held-out scores"
        },
    )
    gate_generation_steps: int = field(
        default=8, metadata={"help": "DDIM steps when the gate draws images from the candidate and serving generators"}
    )
    gate_max_groups: int = field(default=16, metadata={"help": "held-out groups whose prompt and user the gate draws"})
    # --- the loop
    poll_timeout_ms: int = field(default=500, metadata={"help": "how long one Kafka poll waits for records"})
    publish_timeout_s: float = field(default=10.0, metadata={"help": "how long to wait for the ModelUpdated ack"})

    def __post_init__(self) -> None:
        if not _TOPIC_PREFIX_PATTERN.match(self.topic_prefix):
            raise ConfigError(
                f"topic_prefix may hold only letters, digits, '.', '_' and '-'; got {self.topic_prefix!r}"
            )
        _require(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("reward_steps", "diffusion_steps"):
            value = getattr(self, name)
            _require(0 <= value <= 100_000, f"{name} must be between 0 and 100000, got {value}")
        _require(
            1 <= self.groups_per_batch <= 1024, f"groups_per_batch must be in 1..1024, got {self.groups_per_batch}"
        )
        for name in (
            "reward_learning_rate",
            "adaptive_learning_rate",
            "unet_learning_rate",
            "beta",
            "max_grad_norm",
            "recency_half_life",
        ):
            value = getattr(self, name)
            _require(value > 0, f"{name} must be positive, got {value}")
        _require(self.buffer_capacity >= 1, f"buffer_capacity must be at least 1, got {self.buffer_capacity}")
        _require(
            self.dedupe_window >= self.buffer_capacity,
            f"dedupe_window ({self.dedupe_window}) must be at least buffer_capacity ({self.buffer_capacity}), "
            "or a buffered sample could be forgotten and trained twice",
        )
        _require(self.min_new_samples >= 1, f"min_new_samples must be at least 1, got {self.min_new_samples}")
        _require(0.0 <= self.heldout_fraction < 1.0, f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        _require(self.heldout_capacity >= 1, f"heldout_capacity must be at least 1, got {self.heldout_capacity}")
        _require(self.gate_tolerance >= 0.0, f"gate_tolerance must be >= 0, got {self.gate_tolerance}")
        _require(
            self.gate_generator_tolerance >= 0.0,
            f"gate_generator_tolerance must be >= 0, got {self.gate_generator_tolerance}",
        )
        _require(
            1 <= self.gate_generation_steps <= 1000,
            f"gate_generation_steps must be in 1..1000, got {self.gate_generation_steps}",
        )
        _require(self.gate_max_groups >= 1, f"gate_max_groups must be at least 1, got {self.gate_max_groups}")
        _require(self.poll_timeout_ms >= 1, f"poll_timeout_ms must be at least 1, got {self.poll_timeout_ms}")
        _require(self.publish_timeout_s > 0, f"publish_timeout_s must be positive, got {self.publish_timeout_s}")

    @classmethod
    def for_arm(cls, arm: str, **overrides: Any) -> TrainerSettings:
        """Settings of one evaluation arm (a key of :data:`ARMS`), then ``overrides``."""
        if arm not in ARMS:
            raise ConfigError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
        objective, use_adaptive_network, personalized_reward_model = ARMS[arm]
        values: dict[str, Any] = {
            "objective": objective,
            "use_adaptive_network": use_adaptive_network,
            "personalized_reward_model": personalized_reward_model,
        }
        values.update(overrides)
        return cls.from_env(**values)

    @classmethod
    def from_env(cls, **overrides: Any) -> TrainerSettings:
        """Settings from KAFKA_BOOTSTRAP_SERVERS and PERFUSION_TOPIC_PREFIX, then ``overrides`` (None = unset)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown trainer settings {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            values["bootstrap_servers"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        if os.environ.get("PERFUSION_TOPIC_PREFIX"):
            values["topic_prefix"] = os.environ["PERFUSION_TOPIC_PREFIX"]
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> TrainerSettings:
        return replace(self, **overrides)

    @property
    def generator_learning_rate(self) -> float:
        """The learning rate of whichever generator this arm trains."""
        return self.adaptive_learning_rate if self.use_adaptive_network else self.unet_learning_rate

    @property
    def group_id(self) -> str:
        return f"{self.topic_prefix}{self.consumer_group}"

    @property
    def arm_description(self) -> dict[str, Any]:
        """What this trainer trains, as the manifest records it."""
        return {
            "objective": self.objective,
            "use_adaptive_network": self.use_adaptive_network,
            "personalized_reward_model": self.personalized_reward_model,
        }

    def resolved_bootstrap_servers(self) -> str:
        if self.bootstrap_servers:
            return self.bootstrap_servers
        from perfusion.server_files import kafka_bootstrap_servers as bootstrap_servers

        return bootstrap_servers()

    def resolved_model_root(self) -> Path:
        return self.model_root if self.model_root is not None else state_dir() / "models"

    def resolved_base_checkpoint(self) -> Path:
        return self.base_checkpoint if self.base_checkpoint is not None else ASSETS_DIR / "base"

    def resolved_image_root(self) -> Path:
        return self.image_root if self.image_root is not None else state_dir() / "images"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
