"""Offline probe of the reward model: from how many logged groups does PerFusionRM rank a user's new groups?

The live evaluation trains its reward models on the few dozen groups of two rounds, and their held-out GAUC is one
number with a wide interval. This probe asks the question with more data and fewer moving parts:

1. Each user sees ``train_groups`` base-model groups (the training prompts in turn) and then ``heldout_groups``
   more with new seeds (every prompt, held-out ones included); the simulated shopper grades them all. The user
   vector u is what the shop knows after the training groups (:func:`simulator.probes.logged_groups.log_base_groups`).
2. Four reward models learn from the training groups with the trainer's own step
   (:func:`trainer.updates.reward_model_step`, the group-wise ranking loss): PerFusionRM and the same towers without
   plug-ins, each from random towers and from the catalog-pretrained ones (:mod:`trainer.reward_pretrain`).
3. Each scores the held-out groups: GAUC and MAP, with 95% bootstrap intervals over groups, the paired difference
   that the plug-ins make, and GAUC on the training groups (how much was memorised). A reference row ranks the
   held-out groups by the simulator's true utilities, the ceiling of any model on these noisy grades.

With ``labels="true-utility"`` each group's one positive is its best image by the simulator's utility (training and
held-out alike): a diagnostic of what the architecture can learn without click noise, never a way to train the
system. Ground truth is read here, in the simulator, and never passed to a model except as those labels.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from perfusion.settings import Settings
from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import HELDOUT_PROMPTS, TRAIN_PROMPTS
from simulator.eval.results import Estimate, Interval, Record, ResultsFile
from simulator.eval.reward_models import TRUE_UTILITY_CEILING, fit_reward_model, reward_model_scores
from simulator.eval.stats import bootstrap_gauc, interval
from simulator.probes.generator_probe import ProbeConfig
from simulator.probes.logged_groups import PROBE_LABELS, LoggedGroups, log_base_groups, probe_inputs

log = logging.getLogger(__name__)

# (name, personalized, pretrained towers) of the reward models compared.
REWARD_PROBE_MODELS: tuple[tuple[str, bool, bool], ...] = (
    ("perfusion_rm_pretrained", True, True),
    ("rm_without_plugins_pretrained", False, True),
    ("perfusion_rm_scratch", True, False),
    ("rm_without_plugins_scratch", False, False),
)
# The first group index of the held-out groups: past any training group, so seeds and draws are new.
HELDOUT_FIRST_GROUP = 500


class RewardProbeConfig(Settings):
    """Size and settings of one reward-model probe."""

    users: int = Field(default=40, ge=1, description="shoppers (the evaluation's training panel)")
    train_groups: int = Field(default=16, ge=1, description="logged groups per user the reward models learn from")
    heldout_groups: int = Field(default=8, ge=1, description="new groups per user they are scored on")
    k: int = Field(default=4, description="candidates per group")
    sampling_steps: int = Field(default=4, ge=1, description="DDIM steps per generated group")
    steps: int = Field(default=300, ge=1, description="optimizer steps of each reward model")
    groups_per_batch: int = Field(default=16, ge=1, description="groups per step")
    learning_rate: float = Field(default=1e-3, description="AdamW learning rate (the offline comparison's)")
    labels: str = Field(default="clicks", description=f"what makes a positive: {' or '.join(PROBE_LABELS)}")
    bootstrap_samples: int = Field(default=1000, description="bootstrap resamplings of held-out groups")
    seed: int = Field(default=0, description="seed of users, data and training")
    torch_threads: int = Field(default=1, description="torch threads")
    base_checkpoint: Path = Field(default=EvaluationConfig().base_checkpoint, description="the base model folder")

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, labels: str) -> str:
        if labels not in PROBE_LABELS:
            raise ValueError(f"labels must be one of {', '.join(PROBE_LABELS)}; got {labels!r}")
        return labels

    @field_validator("train_groups")
    @classmethod
    def _before_the_heldout_groups(cls, train_groups: int) -> int:
        if train_groups >= HELDOUT_FIRST_GROUP:
            raise ValueError(f"train_groups must be below {HELDOUT_FIRST_GROUP}, got {train_groups}")
        return train_groups


# ---------------------------------------------------------------------------------------------------------- records


class RewardModelProbe(Record):
    """One reward model (or the true-utility ceiling) scored on the held-out groups."""

    heldout_gauc: float
    heldout_gauc_ci95: Interval
    heldout_map: float
    train_gauc: float | None = Field(description="GAUC on its own training groups; None for the ceiling")


class RewardProbeSummary(Record):
    """Every number of one reward-model probe, as :func:`run_reward_probe` returns it."""

    config: RewardProbeConfig
    train_groups: int = Field(ge=0, description="logged groups the models learn from")
    heldout_groups: int = Field(ge=0, description="new groups they are scored on")
    heldout_groups_with_both_classes: int = Field(ge=0, description="held-out groups with a positive and a negative")
    models: dict[str, RewardModelProbe]
    paired_gauc_differences: dict[str, Estimate] = Field(
        description="held-out GAUC of one model less another's, over the same resampled groups"
    )
    wall_seconds: float = Field(ge=0)


class RewardProbeResults(RewardProbeSummary, ResultsFile):
    """The content of the probe's JSON."""

    command: str = Field(description="the command that reproduces the numbers (output folders left out)")

    @classmethod
    def of(cls, summary: RewardProbeSummary, command: str) -> RewardProbeResults:
        return cls(**dict(summary), command=command)


# ---------------------------------------------------------------------------------------------------------- the run


def run_reward_probe(config: RewardProbeConfig) -> RewardProbeSummary:
    """Log the groups, train the four reward models, score the held-out groups."""
    from perfusion.metrics import gauc, mean_average_precision
    from trainer.batches import collate_groups

    started = time.monotonic()
    panel, users, text_encoder, serving = probe_inputs(
        config.users, config.seed, config.torch_threads, config.base_checkpoint, config.sampling_steps
    )
    logging_config = ProbeConfig(
        train_users=config.users,
        k=config.k,
        labels=config.labels,
        seed=config.seed,
        groups_per_user=config.train_groups,
    )
    train = log_base_groups(logging_config, panel, users, serving)
    heldout_config = logging_config.with_overrides(groups_per_user=config.heldout_groups)
    heldout = log_base_groups(
        heldout_config, panel, users, serving, TRAIN_PROMPTS + HELDOUT_PROMPTS, first_group=HELDOUT_FIRST_GROUP
    )
    heldout = LoggedGroups(heldout.samples, heldout.pixels, train.user_vectors)  # u: what the shop knew before
    log.info("reward probe: %d training and %d held-out groups", len(train.samples), len(heldout.samples))

    def collated(logged: LoggedGroups) -> Any:
        vectors = [logged.user_vectors[sample.user_id].tolist() for sample in logged.samples]
        return collate_groups(logged.samples, vectors, logged.pixels)

    train_batch, heldout_batch = collated(train), collated(heldout)
    labels, groups = heldout_batch.labels.numpy(), heldout_batch.group_ids.numpy()
    scores: dict[str, Any] = {}
    train_gauc: dict[str, float] = {}
    for name, personalized, pretrained in REWARD_PROBE_MODELS:
        towers = config.base_checkpoint if pretrained else None
        next_batch = train.batches(config.groups_per_batch, config.seed)
        model = fit_reward_model(
            personalized, towers, next_batch, config.steps, text_encoder, config.seed, config.learning_rate
        )
        scores[name] = reward_model_scores(model, text_encoder, heldout_batch)
        fitted = reward_model_scores(model, text_encoder, train_batch)
        train_gauc[name] = float(gauc(fitted, train_batch.labels.numpy(), train_batch.group_ids.numpy()))
        log.info("reward probe %s: held-out GAUC %.3f, training GAUC %.3f", name, gauc(scores[name], labels, groups),
                 train_gauc[name])  # fmt: skip
    # Collated group by group in slot order, as the panel lists utilities.
    scores[TRUE_UTILITY_CEILING] = np.concatenate(
        [panel.utilities(sample.user_id, _group_pixels(heldout, sample)) for sample in heldout.samples]
    ).astype(np.float64)
    boot = bootstrap_gauc(scores, labels, groups, config.seed, config.bootstrap_samples)
    models: dict[str, RewardModelProbe] = {}
    for name, model_scores in scores.items():
        low, high = interval(boot[name])
        models[name] = RewardModelProbe(
            heldout_gauc=float(gauc(model_scores, labels, groups)),
            heldout_gauc_ci95=(low, high),
            heldout_map=float(mean_average_precision(model_scores, labels, groups)),
            train_gauc=train_gauc.get(name),
        )
    lifts = {
        "plugins_pretrained": ("perfusion_rm_pretrained", "rm_without_plugins_pretrained"),
        "plugins_scratch": ("perfusion_rm_scratch", "rm_without_plugins_scratch"),
        "pretraining_with_plugins": ("perfusion_rm_pretrained", "perfusion_rm_scratch"),
        "pretraining_without_plugins": ("rm_without_plugins_pretrained", "rm_without_plugins_scratch"),
    }
    return RewardProbeSummary(
        config=config,
        train_groups=len(train.samples),
        heldout_groups=len(heldout.samples),
        heldout_groups_with_both_classes=int(
            sum(1 for sample in heldout.samples if 0 < sum(c.grade > 0 for c in sample.candidates) < config.k)
        ),
        models=models,
        paired_gauc_differences={
            lift: Estimate.model_validate(
                {
                    "value": models[first].heldout_gauc - models[second].heldout_gauc,
                    "ci95": interval(boot[first] - boot[second]),
                }
            )
            for lift, (first, second) in lifts.items()
        },
        wall_seconds=time.monotonic() - started,
    )


def _group_pixels(logged: LoggedGroups, sample: Any) -> Any:
    return np.stack([logged.pixels[candidate.image_id] for candidate in sample.candidates])


def render_reward_probe_markdown(results: RewardProbeResults) -> str:
    from simulator.eval.report import signed_interval

    config = results.config
    lines = [
        "# Offline probe: how well the reward model ranks a user's new groups",
        "",
        f"Reproduce: `{results.command}` (wall time {results.wall_seconds / 60:.1f} min on this machine).",
        "",
        f"{config.users} users; {config.train_groups} logged base-model groups each to learn from "
        f"({results.train_groups} groups), {config.heldout_groups} new groups each to be scored on "
        f"({results.heldout_groups}, {results.heldout_groups_with_both_classes} with a positive and a negative); "
        f"K = {config.k}; positives: {PROBE_LABELS[config.labels]}; {config.steps} steps of "
        f"{config.groups_per_batch} groups per model. See simulator/probes/reward_probe.py.",
        "",
        "| reward model | held-out GAUC | held-out MAP | training GAUC |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in results.models.items():
        low, high = row.heldout_gauc_ci95
        fitted = "n/a" if row.train_gauc is None else f"{row.train_gauc:.3f}"
        lines.append(f"| {name} | {row.heldout_gauc:.3f} [{low:.3f}, {high:.3f}] | {row.heldout_map:.3f} | {fitted} |")
    lines += ["", "Paired differences in held-out GAUC (bootstrap over the same resampled groups):", ""]
    for lift, difference in results.paired_gauc_differences.items():
        lines.append(f"- {lift.replace('_', ' ')}: {signed_interval(difference)}")
    lines += [
        "",
        f"`{TRUE_UTILITY_CEILING}` ranks the held-out groups by the simulator's true utilities: the GAUC an oracle of "
        "each shopper's taste reaches on these grades, the ceiling of any reward model here.",
        "",
    ]
    return "\n".join(lines)
