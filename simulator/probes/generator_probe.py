"""Offline probe of one generator update: trained on logged groups, whose images get better, and for whom?

The live evaluation (:mod:`simulator.eval`) runs every arm through the whole loop, where an update sees a few
dozen groups and its effect is hard to tell from noise. This probe isolates the update:

1. Each training user sees ``groups_per_user`` groups of K candidates from the **base** model (the training prompts
   in turn, fixed seeds), and the simulated shopper responds (the marketplace's clicks, orders and returns).
2. Each arm's generator is trained on those groups by the trainer's own :func:`trainer.updates.run_update` (the
   arm's objective, network and learning rate; no reward-model steps), batches drawn by the trainer's collator.
3. The trained generator and the base model draw the same prompt and seeds for every training user; the probe
   reports the true utility difference per image, per shopper segment, with 95% bootstrap intervals over users,
   and how far the images moved (mean absolute pixel difference).
4. Personalisation, apart from a shift every shopper gets: an arm with the adaptive network also draws each user's
   prompt and seeds with the vector u of a user from another segment (the next such user in the panel), and the
   probe reports how much more the user likes the images drawn for them than those drawn for the other user. It is
   0 for a generator that ignores u, and the U-Net arms, which take no u, are not scored on it.
5. The features: how well u alone tells the simulator's segments apart (leave-one-user-out nearest centroid), for
   the whole vector and for its profile and preference blocks. The adaptive network cannot personalise further
   than u distinguishes the users.

User vectors are what a shop would know after those groups, built by the loop's own :func:`user_vector`: the
profile, and as the preference feature the mean attribute descriptor of the images the user clicked (the stream's
feature weighs clicks and orders by recency; within one short session that is close to this mean).

It bypasses Kafka and Feast on purpose: it measures what one update can learn from a given number of groups, not
the loop. The simulator's ground truth scores the images only after training, as in the live evaluation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator

from perfusion.errors import ConfigError
from perfusion.sampler_config import SERVING_SAMPLER
from perfusion.settings import Settings
from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import TRAIN_PROMPTS
from simulator.eval.results import Estimate, Record, ResultsFile
from simulator.eval.stats import interval
from simulator.probes.logged_groups import (
    PROBE_LABELS,
    LoggedGroups,
    log_base_groups,
    probe_inputs,
    serving_generator_of,
)

if TYPE_CHECKING:
    from service.generator import PersonalizedGenerator
    from trainer.updates import UpdateReport

log = logging.getLogger(__name__)

PROBE_ARMS: tuple[str, ...] = ("pairwise_dpo", "group_without_adaptive", "adaptive_with_pairwise_dpo", "perfusion")


class ProbeConfig(Settings):
    """Size and settings of one probe."""

    arms: tuple[str, ...] = Field(default=PROBE_ARMS, description="arms whose generator update is probed")
    train_users: int = Field(default=20, ge=1, description="shoppers whose groups train the update")
    groups_per_user: int = Field(default=4, ge=1, description="logged base-model groups per user")
    k: int = Field(default=4, description="candidates per group")
    sampling_steps: int = Field(
        default=SERVING_SAMPLER.steps,
        ge=1,
        description="steps of the serving sampler (SERVING_SAMPLER, trailing DDIM) per generated group",
    )
    diffusion_steps: int = Field(default=16, ge=1, description="generator steps of the update")
    groups_per_batch: int = Field(default=8, ge=1, description="groups per generator step")
    adaptive_learning_rate: float | None = Field(
        default=None, description="learning rate of the adaptive network (None: the trainer's)"
    )
    unet_learning_rate: float | None = Field(
        default=None, description="learning rate of the fine-tuned U-Net arms (None: the trainer's)"
    )
    bootstrap_samples: int = Field(default=1000, description="bootstrap resamplings of users")
    labels: str = Field(
        default="clicks",
        description="what makes a logged candidate a positive: 'clicks' (the shoppers' clicks and orders) or "
        "'true-utility' (each group's best image by the simulator's utility, the one positive): a diagnostic "
        "upper bound without click noise, never a way to train the system",
    )
    seed: int = Field(default=0, description="seed of users (as the evaluation's), data and training")
    torch_threads: int = Field(default=1, description="torch threads")
    base_checkpoint: Path = Field(default=EvaluationConfig().base_checkpoint, description="the base model folder")

    @field_validator("arms")
    @classmethod
    def _arms_with_an_update(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        from trainer.settings import ARMS

        trainable = [arm for arm, (objective, _, _) in ARMS.items() if objective != "none"]
        unknown = [arm for arm in arms if arm not in trainable]
        if unknown or not arms:
            raise ValueError(f"probe arms must be a non-empty subset of {', '.join(trainable)}; got {list(arms)}")
        return arms

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, labels: str) -> str:
        if labels not in PROBE_LABELS:
            raise ValueError(f"probe labels must be one of {', '.join(PROBE_LABELS)}; got {labels!r}")
        return labels


# ---------------------------------------------------------------------------------------------------------- records


class UserEstimate(Estimate):
    """A mean over users with its 95% bootstrap interval over them."""

    users: int = Field(ge=0, description="users it averages over")


class ArmProbe(Record):
    """One arm's update, trained generator against base on the same prompts and seeds."""

    own_u_over_other_segment_u: UserEstimate | None = Field(
        description="utility of images drawn with the user's own u less with another segment's user's u; None for "
        "an arm whose generator takes no u"
    )
    utility_vs_base: UserEstimate = Field(description="true utility per image less base's, over every user")
    by_segment: dict[str, UserEstimate] = Field(description="the same over each shopper segment's users")
    mean_abs_pixel_diff: float = Field(ge=0, description="mean absolute pixel difference (0 to 255) from base's")
    train_implicit_accuracy: float = Field(description="the update's implicit-reward accuracy on its batches")
    groups_used: int = Field(ge=0, description="groups the update trained on")
    seconds: float = Field(ge=0)


class SegmentFromU(Record):
    """Leave-one-user-out nearest-centroid accuracy of the segment from u and from its blocks."""

    whole_u: float
    profile: float = Field(description="from the profile blocks (age group, region)")
    preference: float = Field(description="from the preference block (descriptors of clicked images)")
    chance: float = Field(description="1 / segments")


class ProbeSummary(Record):
    """Every number of one probe, as :func:`run_probe` returns it."""

    config: ProbeConfig
    logged_groups: int = Field(ge=0)
    groups_with_a_positive: int = Field(ge=0)
    segment_from_u_accuracy: SegmentFromU
    arms: dict[str, ArmProbe]
    wall_seconds: float = Field(ge=0)


class ProbeResults(ProbeSummary, ResultsFile):
    """The content of the probe's JSON."""

    command: str = Field(description="the command that reproduces the numbers (output folders left out)")

    @classmethod
    def of(cls, summary: ProbeSummary, command: str) -> ProbeResults:
        return cls(**dict(summary), command=command)


# ---------------------------------------------------------------------------------------------------------- the run


def trained_generator(
    arm: str, config: ProbeConfig, logged: LoggedGroups, serving: PersonalizedGenerator, text_encoder: Any
) -> tuple[PersonalizedGenerator, UpdateReport]:
    """Step 2: one update of ``arm``'s generator on the logged groups, wrapped as a serving generator."""
    from perfusion.models.base import build_train_scheduler
    from trainer.settings import TrainerSettings
    from trainer.updates import build_training_models, run_update

    settings = TrainerSettings.for_arm(
        arm,
        reward_steps=0,
        diffusion_steps=config.diffusion_steps,
        groups_per_batch=config.groups_per_batch,
        adaptive_learning_rate=config.adaptive_learning_rate,
        unet_learning_rate=config.unet_learning_rate,
        seed=config.seed,
        base_checkpoint=config.base_checkpoint,
    )
    models = build_training_models(serving.unet, serving.config, build_train_scheduler(serving.config), settings)
    report = run_update(models, text_encoder, logged.batches(config.groups_per_batch, config.seed), settings, False)
    sampler = SERVING_SAMPLER.with_steps(config.sampling_steps)
    generator = serving_generator_of(models, serving, text_encoder, arm, sampler)
    return generator, report


def segment_separability(
    vectors: dict[str, NDArray[np.float32]], segments: dict[str, str], columns: slice = slice(None)
) -> float:
    """Leave-one-user-out nearest-centroid accuracy of each user's segment from ``vectors[user][columns]``.

    Columns are standardised over users (constant ones dropped), each user is held out in turn, and its segment is
    guessed as the one whose other users' mean vector is nearest (Euclidean). Chance is about 1 / segments; a
    segment with a single user cannot be guessed for that user and counts as a miss.
    """
    users = sorted(vectors)
    if len(users) < 2:
        raise ConfigError(f"segment separability needs at least 2 users, got {len(users)}")
    matrix = np.stack([np.asarray(vectors[user], dtype=np.float64)[columns] for user in users])  # [U, D]
    spread = matrix.std(axis=0)
    kept = spread > 1e-9
    standardized = (matrix[:, kept] - matrix[:, kept].mean(axis=0)) / spread[kept]
    labels = np.array([segments[user] for user in users])
    hits = 0
    for row in range(len(users)):
        others = np.arange(len(users)) != row
        best, best_distance = None, np.inf
        for segment in sorted(set(labels[others])):
            centroid = standardized[others & (labels == segment)].mean(axis=0)
            distance = float(np.linalg.norm(standardized[row] - centroid))
            if distance < best_distance:
                best, best_distance = segment, distance
        hits += int(best == labels[row])
    return hits / len(users)


def partner_from_another_segment(users: list[str], segments: dict[str, str]) -> dict[str, str]:
    """Each user's partner for the personalisation check: the next user (cyclically) from another segment."""
    partners = {}
    for index, user in enumerate(users):
        later = users[index + 1 :] + users[:index]
        partner = next((other for other in later if segments[other] != segments[user]), None)
        if partner is None:
            raise ConfigError("the personalisation check needs users from at least two segments; add --train-users")
        partners[user] = partner
    return partners


def run_probe(config: ProbeConfig) -> ProbeSummary:
    """Every arm of ``config``: one update on the same logged groups, scored against base per segment."""
    from trainer.settings import ARMS

    started = time.monotonic()
    panel, users, text_encoder, serving = probe_inputs(
        config.train_users, config.seed, config.torch_threads, config.base_checkpoint, config.sampling_steps
    )
    logged = log_base_groups(config, panel, users, serving)
    graded = [sum(1 for c in sample.candidates if c.grade > 0) for sample in logged.samples]
    log.info("probe: %d logged groups, %.2f positives per group", len(logged.samples), float(np.mean(graded)))
    # Every training user sees every training prompt once more, with seeds no logged group used.
    seeds = {
        (user, prompt): 900_000 + 100 * row + column
        for row, user in enumerate(users)
        for column, prompt in enumerate(TRAIN_PROMPTS)
    }
    base_images = {key: serving.generate(key[1], None, config.k, seed).images for key, seed in seeds.items()}
    segments = {user: panel.segment(user) for user in users}
    partners = partner_from_another_segment(users, segments)
    features = {
        block: segment_separability(logged.user_vectors, segments, columns)
        for block, columns in _separability_blocks().items()
    }
    log.info("probe: segment from u, leave-one-user-out accuracy %s", features)
    arms: dict[str, ArmProbe] = {}
    for arm in config.arms:
        arm_started = time.monotonic()
        generator, report = trained_generator(arm, config, logged, serving, text_encoder)
        takes_u = ARMS[arm][1]  # the arm has an adaptive network, the one part that reads u
        differences: dict[str, list[float]] = {user: [] for user in users}
        own_over_partner: dict[str, list[float]] = {user: [] for user in users}
        shifts = []
        for (user, prompt), seed in seeds.items():
            base = base_images[(user, prompt)]
            images = generator.generate(prompt, logged.user_vectors[user], config.k, seed).images
            utility = float(panel.utilities(user, images).mean())
            differences[user].append(utility - float(panel.utilities(user, base).mean()))
            shifts.append(float(np.abs(images.astype(np.float64) - base.astype(np.float64)).mean()))
            if takes_u:
                partner_u = logged.user_vectors[partners[user]]
                drawn_for_partner = generator.generate(prompt, partner_u, config.k, seed).images
                own_over_partner[user].append(utility - float(panel.utilities(user, drawn_for_partner).mean()))
        per_user = {user: float(np.mean(values)) for user, values in differences.items()}
        personalisation = (
            _mean_with_interval([float(np.mean(v)) for v in own_over_partner.values()], config) if takes_u else None
        )
        arms[arm] = ArmProbe(
            own_u_over_other_segment_u=personalisation,
            utility_vs_base=_mean_with_interval(list(per_user.values()), config),
            by_segment={
                segment: _mean_with_interval([v for u, v in per_user.items() if segments[u] == segment], config)
                for segment in sorted(set(segments.values()))
            },
            mean_abs_pixel_diff=float(np.mean(shifts)),
            train_implicit_accuracy=report.generator.implicit_accuracy,
            groups_used=report.generator.groups_used,
            seconds=time.monotonic() - arm_started,
        )
        log.info("probe arm %s: %s", arm, arms[arm].utility_vs_base)
    return ProbeSummary(
        config=config,
        logged_groups=len(logged.samples),
        groups_with_a_positive=int(sum(1 for count in graded if count)),
        segment_from_u_accuracy=SegmentFromU.model_validate({**features, "chance": 1.0 / len(set(segments.values()))}),
        arms=arms,
        wall_seconds=time.monotonic() - started,
    )


def _separability_blocks() -> dict[str, slice]:
    from perfusion.user_features import USER_VECTOR_SLICES

    age, region = USER_VECTOR_SLICES["age_group"], USER_VECTOR_SLICES["region"]
    if age.stop != region.start:
        raise ConfigError("the profile blocks of u (age_group, region) are expected to be adjacent")
    return {
        "whole_u": slice(None),
        "profile": slice(age.start, region.stop),
        "preference": USER_VECTOR_SLICES["preference"],
    }


def _mean_with_interval(values: list[float], config: ProbeConfig) -> UserEstimate:
    array = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng([config.seed, len(values)])
    boot = array[rng.integers(0, array.size, size=(config.bootstrap_samples, array.size))].mean(axis=1)
    low, high = interval(boot)
    return UserEstimate(value=float(array.mean()), ci95=(low, high), users=int(array.size))


def render_probe_markdown(results: ProbeResults) -> str:
    """The probe's table: utility difference overall and per segment, pixel movement, training accuracy."""
    from simulator.eval.report import markdown_table, signed_interval

    arms, config = results.arms, results.config
    segments = sorted({segment for values in arms.values() for segment in values.by_segment})

    lines = [
        "# Offline probe: what one generator update learns from logged groups",
        "",
        f"Reproduce: `{results.command}` (wall time {results.wall_seconds / 60:.1f} min on this machine).",
        "",
        f"{config.train_users} training users, {config.groups_per_user} base-model groups each "
        f"({results.logged_groups} groups, {results.groups_with_a_positive} with a positive; positives: "
        f"{PROBE_LABELS[config.labels]}), K = "
        f"{config.k}; one update of {config.diffusion_steps} generator steps of {config.groups_per_batch} "
        "groups per arm, with the trainer's code and the arm's learning rate; then the same prompts and seeds for "
        "every training user, trained generator against base. Values: mean true utility per image less base's, 95% "
        "bootstrap interval over users (overall) or over the segment's users. See simulator/probes/generator_probe.py.",
        "",
    ]
    header = ["arm", "all users", *segments, "own u over another segment's", "pixel shift", "train implicit accuracy"]
    rows = [
        [
            arm,
            signed_interval(values.utility_vs_base),
            *(signed_interval(values.by_segment[s]) for s in segments),
            signed_interval(values.own_u_over_other_segment_u) if values.own_u_over_other_segment_u else "n/a",
            f"{values.mean_abs_pixel_diff:.2f}",
            f"{values.train_implicit_accuracy:.2f}",
        ]
        for arm, values in arms.items()
    ]
    accuracy = results.segment_from_u_accuracy
    features = [
        "",
        "\"Own u over another segment's\": for the arms with the adaptive network, the user's true utility per image "
        "for images drawn with their own u less for images drawn, with the same prompt and seeds, with the u of a "
        "user from another segment; above 0 means the update personalises beyond a shift every shopper gets (n/a: "
        "the arm's generator takes no u).",
        "",
        f"What u tells apart: leave-one-user-out nearest-centroid accuracy of the segment from u, "
        f"{accuracy.whole_u:.2f} for the whole vector, {accuracy.profile:.2f} from the profile blocks (age "
        f"group, region), {accuracy.preference:.2f} from the preference block (descriptors of clicked images); "
        f"chance {accuracy.chance:.2f}.",
        "",
    ]
    return "\n".join([*lines, *markdown_table(header, rows), *features])
