"""Frozen, validated configuration of the incremental trainer, passed explicitly to the loop, the update and the gate.

Two choices make the evaluation's arms one code path:

- ``objective``: the diffusion objective (``group`` = PerFusion's Plackett-Luce over P and N, ``pairwise_dpo`` =
  Diffusion-DPO on every (p, n) pair, ``sft`` = denoising loss on positives, ``none`` = leave the generator as
  the base model and train only the reward model);
- ``use_adaptive_network``: train the personalized adaptive network (the frozen base plus a ControlNet-style
  branch that sees the user vector), or, without it, fine-tune a copy of the base U-Net with no user condition.

:data:`ARMS` names each arm's pair of choices; :meth:`TrainerSettings.for_arm` builds its settings. Every other
field has a default that keeps one update on the CPU within seconds to a minute. :meth:`TrainerSettings.from_env`
reads the environment (``KAFKA_BOOTSTRAP_SERVERS``, ``PERFUSION_TOPIC_PREFIX`` and ``PERFUSION_<FIELD>`` for any
other field, :mod:`perfusion.settings`); nothing else in ``trainer/`` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from perfusion.errors import ConfigError
from perfusion.models.user_pathways import USER_PATHWAYS, UserPathway
from perfusion.paths import ASSETS_DIR, state_dir
from perfusion.settings import KafkaClientSettings

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


class TrainerSettings(KafkaClientSettings):
    """Configuration of ``perfusion train``: where it reads and writes, what it trains, how much, and the gate."""

    # --- where
    consumer_group: str = Field(
        default="perfusion-trainer", description="Kafka consumer group whose offsets the trainer commits"
    )
    model_root: Path | None = Field(
        default=None, description="folder of published model versions; None = <state dir>/models"
    )
    base_checkpoint: Path | None = Field(
        default=None, description="folder of the pretrained base model; None = assets/base"
    )
    image_root: Path | None = Field(
        default=None,
        description="folder of generated images; None = the service's image store (PERFUSION_IMAGES_URL: a folder or "
        "an fsspec URL), else <state dir>/images",
    )
    feature_repo: Path | None = Field(
        default=None, description="Feast feature repo; None = the project's features/ (as the worker uses it)"
    )
    # --- what
    objective: Objective = Field(default="group", description=f"diffusion objective, one of {', '.join(OBJECTIVES)}")
    use_adaptive_network: bool = Field(
        default=True,
        description="train the user-conditioned adaptive network; False = fine-tune the U-Net, no user input",
    )
    user_pathway: UserPathway = Field(
        default="copy_tokens",
        description=f"where u enters the adaptive network, one of {', '.join(USER_PATHWAYS)} "
        "(perfusion.models.adaptive); chosen on the evaluation's validation panel, docs/results.md",
    )
    personalized_reward_model: bool = Field(
        default=True, description="PerFusionRM with feature-crossing plug-ins; False = the same towers without"
    )
    pretrained_reward_towers: bool = Field(
        default=True,
        description="a new PerFusionRM starts from the catalog-pretrained towers of the base checkpoint "
        "(reward_towers/, trainer.reward_pretrain), as the paper's starts from CLIP; False = random towers",
    )
    # --- how much
    reward_steps: int = Field(
        default=40, ge=0, le=100_000, description="optimizer steps on the reward model per update"
    )
    diffusion_steps: int = Field(
        default=200,
        ge=0,
        le=100_000,
        description="optimizer steps on the generator per update (Diffusion-DPO used 2,000 at batch 2,048; a few "
        "steps learn one shift shared by every user)",
    )
    groups_per_batch: int = Field(default=4, ge=1, le=1024, description="impressions (groups of K candidates) per step")
    draws_per_group: int = Field(
        default=4,
        ge=1,
        le=64,
        description="(t, noise) draws per impression per generator step, shared by its candidates; a candidate's "
        "error is the mean over them (one draw makes s mostly the noise of its timestep)",
    )
    train_timesteps: Literal["serving", "all"] = Field(
        default="serving",
        description="timesteps the generator trains at: 'serving' = those the serving sampler calls the model at "
        "(perfusion.sampler_config.SERVING_SAMPLER), 'all' = every training timestep",
    )
    reward_ranked_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="largest share of generator steps trained on reward-ranked groups (fresh candidates ranked by "
        "the reward model, trainer.reward_ranked), scaled by the reward model's held-out reliability; 0 = none",
    )
    reward_ranked_candidates: int = Field(
        default=4, ge=2, le=16, description="candidates the policy draws per reward-ranked group"
    )
    supervised_weight: float = Field(
        default=0.25,
        ge=0.0,
        description="lambda of the supervised term on positives added to the preference objectives, in implicit-"
        "reward units (perfusion.objectives.anchored); 0 = none",
    )
    reward_learning_rate: float = Field(default=1e-3, gt=0, description="AdamW learning rate of the reward model")
    adaptive_learning_rate: float = Field(
        default=3e-4,
        gt=0,
        description="AdamW learning rate of the adaptive network (1e-3 with beta 2000 took |s| to ~26 in one step)",
    )
    unet_learning_rate: float = Field(
        default=3e-5, gt=0, description="AdamW learning rate of the fine-tuned U-Net copy (arms without the network)"
    )
    beta: float = Field(
        default=250.0,
        gt=0,
        description="inverse temperature of the implicit reward -beta * (policy_err - ref_err); errors are "
        "per-pixel means, so an update moves their differences by ~1e-3 to 1e-2 and beta of a few hundred keeps "
        "|s| of order one (logged as mean |s|; the trainer warns when the loss exceeds 2 log K)",
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="gradient clipping norm for both models")
    seed: int = Field(default=0, description="seed of batch sampling, noise and timesteps")
    # --- the replay buffer
    buffer_capacity: int = Field(default=4096, ge=1, description="most group samples kept for replay")
    recency_half_life: float = Field(
        default=512.0,
        gt=0,
        description="a buffered sample's sampling weight halves after this many newer samples arrive",
    )
    dedupe_window: int = Field(
        default=50_000,
        ge=1,
        description="how many trained sample ids are remembered (and stored in each manifest) against replays",
    )
    min_new_samples: int = Field(
        default=1, ge=1, description="an update runs only when at least this many new samples arrived since the last"
    )
    # --- the gate
    heldout_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="share of samples (chosen by a hash of sample_id) held out for the gate",
    )
    heldout_capacity: int = Field(default=256, ge=1, description="most held-out samples kept (newest win)")
    gate_tolerance: float = Field(
        default=0.02,
        ge=0.0,
        description="publish unless the candidate RM's held-out GAUC is below the serving RM's by more than this",
    )
    gate_generator_tolerance: float = Field(
        default=0.1,
        ge=0.0,
        description="publish unless the candidate generator's mean RM score on held-out prompts and users is "
        "below the serving generator's by more than this many standard deviations of the RM's held-out scores",
    )
    gate_min_groups: int = Field(
        default=32,
        ge=1,
        description="the gate votes only with at least this many held-out groups; with fewer it publishes and says "
        "why it did not vote (a GAUC of a handful of groups moves in steps of 1/3)",
    )
    gate_confidence: float = Field(
        default=0.95,
        gt=0.0,
        lt=1.0,
        description="coverage of the judging RM's held-out GAUC interval (bootstrap over groups); the generator "
        "check votes only when the interval lies above chance",
    )
    gate_max_groups: int = Field(default=16, ge=1, description="held-out groups whose prompt and user the gate draws")
    # --- the loop
    poll_timeout_ms: int = Field(default=500, ge=1, description="how long one Kafka poll waits for records")
    publish_timeout_s: float = Field(default=10.0, gt=0, description="how long to wait for the ModelUpdated ack")

    @model_validator(mode="after")
    def _replays_are_remembered(self) -> TrainerSettings:
        if self.dedupe_window < self.buffer_capacity:
            raise ValueError(
                f"dedupe_window ({self.dedupe_window}) must be at least buffer_capacity ({self.buffer_capacity}), "
                "or a buffered sample could be forgotten and trained twice"
            )
        return self

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
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls.from_env(**values)

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

    def resolved_model_root(self) -> Path:
        return self.model_root if self.model_root is not None else state_dir() / "models"

    def resolved_base_checkpoint(self) -> Path:
        return self.base_checkpoint if self.base_checkpoint is not None else ASSETS_DIR / "base"

    def resolved_image_root(self) -> Path | str:
        """The image store the trainer reads the logged candidates from: the one the service writes to."""
        from perfusion.image_store import default_image_store_url

        return self.image_root if self.image_root is not None else default_image_store_url()

    # --- metrics
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port of the trainer's Prometheus /metrics while it runs; 0 = none, so that several trainers "
        "(one per evaluation arm) run on one machine without choosing ports",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address /metrics listens on (0.0.0.0 for every interface, as in a container)",
    )
