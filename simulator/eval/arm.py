"""The closed-loop evaluation: every arm drives the real loop against the same simulated marketplace.

One arm, one round: the arm's serving version generates K candidates for each planned showing (the viewer's
features read from the arm's Feast online store, as the service does); the marketplace decides, from the pixels,
what the viewer does; the live showings' events go to Kafka; the arm's own stream worker (``perfusion worker``
with the arm's topic prefix and Feast store) turns them into features and group samples; the arm's trainer
(``trainer.loop.Trainer``) consumes the samples, updates, gates and publishes; the next round generates from what
was published. Round ``r`` measures the version after ``r`` updates; round 0 is the base model for every arm.

Every arm sees the same plan: the same users, prompts, seeds, event times and marketplace random numbers (one
``numpy`` stream per showing), so differences between arms come from their images alone. Besides the live
showings (training users on training prompts), each round measures held-out prompts (never sent to Kafka, never
trained on) and held-out cold-start users (a profile in Feast, no behaviour).

Metrics per arm, round and slice, as ratios of sums over users: CTR = clicks / candidates shown, conversion =
orders / clicks, return rate = returns / orders, mean true utility of the shown candidates. 95% intervals come
from a paired bootstrap over users (one resampling of users shared by all arms, so lifts against the base arm are
paired too). The reward models are compared offline: PerFusionRM and the same towers without plug-ins, trained
on the same live groups and scored by GAUC and MAP on the held-out groups.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from harness.loop import LoopPlace, cli_arguments, loop_process, process_environment
from perfusion.attributes import ATTRIBUTE_KINDS
from perfusion.errors import ConfigError, InfrastructureError
from perfusion.paths import REPO_ROOT
from simulator.ground_truth import PixelPreferencePanel
from simulator.marketplace import BehaviourConfig, GroupResponse, Marketplace
from simulator.traffic import TrafficConfig, TrafficSimulator, encode, produce_events

log = logging.getLogger(__name__)

EVALUATION_ARMS: tuple[str, ...] = (
    "base",
    "sft",
    "pairwise_dpo",
    "group_without_adaptive",
    "adaptive_with_pairwise_dpo",
    "perfusion",
)
BASELINE_ARM = "base"
LIVE, HELDOUT_PROMPT, COLD_START, MERCHANT = "live", "heldout_prompt", "cold_start", "merchant"
SLICES: tuple[str, ...] = (LIVE, HELDOUT_PROMPT, COLD_START)
METRICS: tuple[str, ...] = ("ctr", "conversion", "return_rate", "utility")
RELATIVE_METRICS: tuple[str, ...] = ("ctr", "conversion", "return_rate")  # lifts over base as a relative change
GARMENTS = ATTRIBUTE_KINDS["garment"]
TRAIN_PROMPTS: tuple[str, ...] = tuple(f"a {garment}" for garment in GARMENTS[:4])
HELDOUT_PROMPTS: tuple[str, ...] = tuple(f"a {garment}" for garment in GARMENTS[4:])
ROUND_SPAN_S = 7200.0  # event time between rounds: more than the group builder's window plus its lateness


class EvaluationError(InfrastructureError):
    """The evaluation could not run a step of the loop (worker, Feast, Kafka)."""


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
    sampling_steps: int = field(default=6, metadata={"help": "DDIM steps per generated group"})
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
    base_checkpoint: Path = field(default=REPO_ROOT / "assets" / "base", metadata={"help": "the base model"})

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


@dataclass(frozen=True)
class Showing:
    """One planned impression: who sees which prompt, when, with which seeds."""

    slice: str
    viewer_id: str
    prompt: str
    design_id: str
    ts: float
    seed: int  # generation seed (candidate i uses seed + i) and marketplace stream


@dataclass
class Outcome:
    """One measured showing of one arm."""

    arm: str
    round: int
    slice: str
    user_id: str
    prompt: str
    clicks: int
    orders: int
    returns: int
    shown: int
    utility_sum: float
    model_version: str


@dataclass
class RewardExample:
    """One group for the offline reward-model comparison."""

    slice: str
    prompt: str
    user_vector: list[float]
    images: NDArray[np.uint8]  # (K, H, W, 3)
    grades: list[int]
    # The simulator's ground truth, (K,): only the reference row of the comparison reads it, never a model.
    true_utilities: list[float]


@dataclass
class ArmRun:
    arm: str
    outcomes: list[Outcome] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    refusals: int = 0
    grid_images: dict[str, NDArray[np.uint8]] = field(default_factory=dict)  # user -> (K, H, W, 3), final round
    # (slice, viewer, prompt, seed) -> (K, H, W, 3): every shopper showing of the final round
    final_images: dict[tuple[str, str, str, int], NDArray[np.uint8]] = field(default_factory=dict)
    reward_examples: list[RewardExample] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvaluationResult:
    config: EvaluationConfig
    arms: dict[str, ArmRun]
    segments: dict[str, str]  # user -> segment (for the image grid)
    grid_prompt: str
    summary: dict[str, Any]
    wall_seconds: float


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Population:
    train_users: list[str]
    cold_users: list[str]
    merchants: list[str]


def build_panel(config: EvaluationConfig) -> tuple[PixelPreferencePanel, Population]:
    """The shopper panel (scaled on catalog renders, not on anything a model generated) and who plays which role."""
    from perfusion.catalog import all_attributes, render_many

    total = config.train_users + config.cold_users + config.merchants
    panel = PixelPreferencePanel(n_users=total, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    items = all_attributes()
    chosen = [items[index] for index in rng.choice(len(items), size=min(512, len(items)), replace=False)]
    panel.fit_scale(render_many(chosen, seeds=list(range(len(chosen)))))
    users = panel.user_ids()
    train = users[: config.train_users]
    cold = users[config.train_users : config.train_users + config.cold_users]
    merchants = users[config.train_users + config.cold_users :]
    return panel, Population(train, cold, merchants)


def round_start(config: EvaluationConfig, round_index: int, origin: float) -> float:
    return origin + round_index * ROUND_SPAN_S


def plan_round(config: EvaluationConfig, population: Population, round_index: int, origin: float) -> list[Showing]:
    """The showings of one round; the same for every arm."""
    rng = np.random.default_rng([config.seed, round_index])
    start = round_start(config, round_index, origin) + 10.0
    showings: list[Showing] = []

    def add(slice_name: str, viewer: str, prompt: str, design_id: str) -> None:
        index = len(showings)
        seed = int(rng.integers(0, 2**31 - 1))
        showings.append(Showing(slice_name, viewer, prompt, design_id, start + 2.0 * index, seed))

    for user in population.train_users:
        for prompt in rng.choice(TRAIN_PROMPTS, size=config.impressions_per_user, replace=True):
            add(LIVE, user, str(prompt), design_id(round_index, str(prompt)))
    for merchant_index, merchant in enumerate(population.merchants):
        for prompt_index, prompt in enumerate(TRAIN_PROMPTS):
            if prompt_index % len(population.merchants) == merchant_index:
                add(MERCHANT, merchant, prompt, design_id(round_index, prompt))
    for user in population.train_users:
        prompt = str(rng.choice(HELDOUT_PROMPTS))
        add(HELDOUT_PROMPT, user, prompt, design_id(round_index, prompt))
    for user in population.cold_users:
        prompt = str(rng.choice(TRAIN_PROMPTS))
        add(COLD_START, user, prompt, design_id(round_index, prompt))
    return showings


def design_id(round_index: int, prompt: str) -> str:
    return f"design-r{round_index}-{prompt.removeprefix('a ').replace(' ', '_')}"


def design_owner(population: Population, prompt: str) -> str:
    index = (TRAIN_PROMPTS + HELDOUT_PROMPTS).index(prompt)
    return population.merchants[index % len(population.merchants)]


# ------------------------------------------------------------------------------------------- one arm's loop


# What this process itself reads of an arm's place: Feast's folder and store, the broker and the topic prefix.
ARM_VARIABLES = (
    "PERFUSION_STATE_DIR",
    "PERFUSION_FEAST_DIR",
    "PERFUSION_ONLINE_STORE",
    "KAFKA_BOOTSTRAP_SERVERS",
    "PERFUSION_TOPIC_PREFIX",
    "FEAST_USAGE",
)


@contextlib.contextmanager
def arm_environment(arm_dir: Path, bootstrap: str, topic_prefix: str) -> Iterator[LoopPlace]:
    """Point this process's Feast and state at the arm's folder (restored afterwards); yields the arm's place, from
    which the worker gets the same environment."""
    place = LoopPlace(bootstrap, state_dir=arm_dir / "state", topic_prefix=topic_prefix, online_store="sqlite")
    environment = place.environment({})
    with process_environment({name: environment[name] for name in ARM_VARIABLES}):
        yield place


@contextlib.contextmanager
def stream_worker(place: LoopPlace, log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``perfusion worker`` for one arm (one partition, so one watermark), stopped with SIGTERM afterwards."""
    arguments = cli_arguments("worker", "--partitions", "1", "--topic-prefix", place.topic_prefix)
    with loop_process(place, "worker", arguments, log_dir, stop_grace_s=60.0) as supervised:
        yield supervised.process


class ArmGenerator:
    """The arm's serving generator: the service's PersonalizedGenerator, following the arm's LATEST.

    The service refuses versions with a fine-tuned U-Net; for those arms the same generator class is built around
    the fine-tuned U-Net (no adaptive input), so every arm samples through one code path.
    """

    def __init__(self, base_checkpoint: Path, model_root: Path, text_encoder: Any, num_steps: int) -> None:
        from service.generator import load_serving_generator

        self.model_root = model_root
        self.text_encoder = text_encoder
        self.num_steps = num_steps
        self.generator = load_serving_generator(base_checkpoint, model_root, text_encoder, num_steps=num_steps)

    def follow_latest(self) -> str:
        from perfusion.checkpoints import ModelStore, load_component
        from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
        from perfusion.models.base import unet_from_config
        from service.generator import FINETUNED_UNET_COMPONENT, PersonalizedGenerator

        store = ModelStore(self.model_root)
        latest = store.latest()
        if latest is None or latest == self.generator.model_version:
            return self.generator.model_version
        store.verify(latest)
        folder = store.path(latest)
        if (folder / FINETUNED_UNET_COMPONENT).is_dir():
            unet: Any = load_component(folder, FINETUNED_UNET_COMPONENT, unet_from_config)
            current = self.generator
            self.generator = PersonalizedGenerator(
                unet,
                AdaptiveNetwork(unet, AdaptiveConfig()),
                self.text_encoder,
                current.classifier,
                current.config,
                version=latest,
                uses_adaptive=False,
                num_steps=self.num_steps,
                guidance_scale=current.guidance_scale,
            )
        else:
            self.generator.load_version(latest, folder)
        return latest


class ImpressionTimeUserVectors:
    """u of each group sample's user as the arm's Feast online store served it when the impression was generated.

    The evaluation reads every viewer's features from Feast right before generating their group, so this is the
    point-in-time vector; the trainer gets it instead of its offline join (see docs/results.md for why).
    """

    def __init__(self) -> None:
        self.by_impression: dict[str, NDArray[np.float32]] = {}

    def vectors(self, samples: Sequence[Any]) -> list[NDArray[np.float32]]:
        missing = [sample.sample_id for sample in samples if sample.sample_id not in self.by_impression]
        if missing:
            raise EvaluationError(
                f"no recorded user vector for impressions {missing[:3]}; they were not generated here"
            )
        return [self.by_impression[sample.sample_id] for sample in samples]


def push_profiles(panel: PixelPreferencePanel, users: Sequence[str], ts: float) -> None:
    """What the shop knows at sign-up (age group, region) for every shopper, into the arm's Feast store."""
    from datetime import UTC, datetime

    from perfusion.feature_store import USER_PROFILE_PUSH, FeaturePusher

    rows = [
        {"user_id": user, **panel.profile(user), "event_timestamp": datetime.fromtimestamp(ts, tz=UTC)}
        for user in users
    ]
    FeaturePusher.open().push(USER_PROFILE_PUSH, rows)


def grades_of(response: GroupResponse) -> list[int]:
    """The group builder's grades: order (not returned) 2, click or selection 1, else 0."""
    kept_order = response.ordered & ~response.returned
    return [
        2 if kept_order[i] else 1 if (response.clicked[i] or response.selected[i]) else 0 for i in range(response.k)
    ]


def count_records(bootstrap: str, topics: Sequence[str]) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        return int(sum(consumer.end_offsets(partitions).values())) if partitions else 0
    finally:
        consumer.close()


def wait_for_loop(
    bootstrap: str,
    topics: Sequence[str],
    expected_groups: int,
    last_event_ts: dict[str, float],
    worker: subprocess.Popen[bytes],
    wait_s: float,
    log_path: Path,
) -> None:
    """Until the worker has closed ``expected_groups`` groups and pushed every user's latest features."""
    from perfusion.feature_store import open_feature_store, read_online_features

    store = open_feature_store()
    deadline = time.monotonic() + wait_s
    while True:
        if worker.poll() is not None:
            raise EvaluationError(f"the stream worker exited with {worker.returncode}; see {log_path}")
        groups = count_records(bootstrap, topics)
        rows = read_online_features(store, "user_preferences", sorted(last_event_ts))
        fresh = all((row["last_active_ts"] or 0.0) >= last_event_ts[row["user_id"]] - 1e-3 for row in rows)
        if groups >= expected_groups and fresh:
            return
        if time.monotonic() > deadline:
            raise EvaluationError(
                f"after {wait_s:.0f} s the worker closed {groups} of {expected_groups} groups (features fresh: "
                f"{fresh}); see {log_path} or raise --wait"
            )
        time.sleep(1.0)


def run_arm(
    arm: str,
    config: EvaluationConfig,
    panel: PixelPreferencePanel,
    population: Population,
    bootstrap: str,
    work_dir: Path,
    text_encoder: Any,
    origin: float,
    grid_prompt: str,
) -> ArmRun:
    """One arm through ``config.rounds`` rounds of the live loop, plus the final measuring round."""
    from perfusion.contracts.topics import TopicNames, ensure_topics
    from perfusion.feature_store import apply_feature_repo, open_feature_store
    from perfusion.image_store import ImageStore
    from perfusion.user_features import user_vector
    from service.features import FeastFeatureReader, user_condition
    from trainer.loop import build_trainer
    from trainer.settings import TrainerSettings

    started = time.monotonic()
    run = ArmRun(arm)
    arm_dir = work_dir / arm
    topic_prefix = f"eval-{int(origin)}-{config.seed}-{arm}."
    topics = TopicNames.for_prefix(topic_prefix)
    marketplace = Marketplace(panel, BehaviourConfig())
    traffic = TrafficSimulator(TrafficConfig(seed=config.seed, model_version="base"))
    with arm_environment(arm_dir, bootstrap, topic_prefix) as place:
        apply_feature_repo()
        ensure_topics(bootstrap, topics, partitions=1)
        push_profiles(panel, population.train_users + population.cold_users, origin - 86_400.0)
        settings = TrainerSettings.for_arm(
            arm,
            bootstrap_servers=bootstrap,
            topic_prefix=topic_prefix,
            model_root=arm_dir / "models",
            image_root=arm_dir / "images",
            base_checkpoint=config.base_checkpoint,
            reward_steps=config.reward_steps,
            diffusion_steps=config.diffusion_steps,
            adaptive_learning_rate=config.adaptive_learning_rate,
            unet_learning_rate=config.unet_learning_rate,
            groups_per_batch=config.groups_per_batch,
            gate_generation_steps=config.sampling_steps,
            gate_max_groups=8,
            gate_tolerance=config.gate_reward_tolerance,
            gate_generator_tolerance=config.gate_generator_tolerance,
            seed=config.seed,
        )
        images = ImageStore(arm_dir / "images")
        generator = ArmGenerator(config.base_checkpoint, arm_dir / "models", text_encoder, config.sampling_steps)
        reader = FeastFeatureReader(open_feature_store())
        recorded_vectors = ImpressionTimeUserVectors()
        trainer = build_trainer(settings, text_encoder=text_encoder, user_vectors=recorded_vectors)
        live_groups = 0
        with stream_worker(place, arm_dir) as worker:
            for round_index in range(config.rounds + 1):
                version = generator.follow_latest()
                run.versions.append(version)
                showings = plan_round(config, population, round_index, origin)
                events: list[Any] = []
                if round_index == 0:
                    start = round_start(config, 0, origin)
                    for prompt in TRAIN_PROMPTS:
                        owner = design_owner(population, prompt)
                        events.append(traffic.design_event(design_id(0, prompt), owner, prompt, start))
                last_event_ts: dict[str, float] = {}
                for showing in showings:
                    features = reader.read(showing.viewer_id)
                    _, condition = user_condition(features, now=showing.ts)
                    vector = user_vector(features, as_of=showing.ts)
                    group = generator.generator.generate(showing.prompt, condition, config.k, showing.seed)
                    rng = np.random.default_rng([config.seed, round_index, showing.seed])
                    if showing.slice == MERCHANT:
                        response = marketplace.merchant_selection(showing.viewer_id, group.images, rng)
                    else:
                        response = marketplace.shopper_response(showing.viewer_id, group.images, rng)
                        run.outcomes.append(
                            Outcome(
                                arm=arm,
                                round=round_index,
                                slice=showing.slice,
                                user_id=showing.viewer_id,
                                prompt=showing.prompt,
                                clicks=int(response.clicked.sum()),
                                orders=int(response.ordered.sum()),
                                returns=int(response.returned.sum()),
                                shown=response.k,
                                utility_sum=float(response.utilities.sum()),
                                model_version=group.model_version,
                            )
                        )
                        run.reward_examples.append(
                            RewardExample(
                                slice=showing.slice,
                                prompt=showing.prompt,
                                user_vector=vector.tolist(),
                                images=group.images,
                                grades=grades_of(response),
                                true_utilities=response.utilities.tolist(),
                            )
                        )
                        if round_index == config.rounds:
                            key = (showing.slice, showing.viewer_id, showing.prompt, showing.seed)
                            run.final_images[key] = group.images
                            if showing.prompt == grid_prompt:
                                run.grid_images.setdefault(showing.viewer_id, group.images)
                    if showing.slice in (LIVE, MERCHANT) and round_index < config.rounds:
                        image_ids = [images.put(image) for image in group.images]
                        impression = traffic.impression_event(
                            showing.viewer_id,
                            showing.design_id,
                            showing.prompt,
                            group.model_version,
                            image_ids,
                            group.descriptors,
                            showing.ts,
                        )
                        recorded_vectors.by_impression[impression.event_id] = vector
                        episode = [impression, *traffic.response_events(impression, response)]
                        events.extend(episode)
                        live_groups += 1
                        last_event_ts[showing.viewer_id] = max(event.ts for event in episode)
                if round_index == config.rounds:
                    break
                # The next round's designs move the watermark past this round's windows, closing its groups.
                next_start = round_start(config, round_index + 1, origin)
                for prompt in TRAIN_PROMPTS:
                    owner = design_owner(population, prompt)
                    events.append(traffic.design_event(design_id(round_index + 1, prompt), owner, prompt, next_start))
                produce_events((encode(event) for event in events), bootstrap, topics.events)
                wait_for_loop(
                    bootstrap,
                    [topics.group_samples, topics.group_drops],
                    live_groups,
                    last_event_ts,
                    worker,
                    config.wait_s,
                    arm_dir / "worker.log",
                )
                summary = trainer.run(once=True)
                run.refusals = len(summary.refusals)
                log.info("arm %s round %d: %s", arm, round_index, summary.versions_published)
    run.seconds = time.monotonic() - started
    return run


# ----------------------------------------------------------------------------------------------- metrics


def user_totals(outcomes: Sequence[Outcome], users: Sequence[str]) -> NDArray[np.float64]:
    """(U, 5) sums per user: clicks, orders, returns, shown, utility_sum."""
    index = {user: row for row, user in enumerate(users)}
    totals = np.zeros((len(users), 5))
    for outcome in outcomes:
        totals[index[outcome.user_id]] += (
            outcome.clicks,
            outcome.orders,
            outcome.returns,
            outcome.shown,
            outcome.utility_sum,
        )
    return totals


def metrics_of(totals: NDArray[np.float64]) -> dict[str, Any]:
    """Ratios of sums over the rows of ``totals`` (..., U, 5) -> metric name -> value(s); NaN where undefined."""
    clicks, orders, returns, shown, utility = (totals[..., column].sum(axis=-1) for column in range(5))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "ctr": clicks / shown,
            "conversion": orders / clicks,
            "return_rate": returns / orders,
            "utility": utility / shown,
        }


def interval(values: NDArray[np.float64]) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    low, high = np.percentile(finite, [2.5, 97.5])
    return [float(low), float(high)]


def summarize(runs: dict[str, ArmRun], config: EvaluationConfig, population: Population) -> dict[str, Any]:
    """Per slice, round and arm: each metric with its 95% bootstrap interval over users, and its lift over base.

    One resampling of users serves every arm (paired), so an arm's lift over base is computed on the same users.
    """
    rng = np.random.default_rng([config.seed, 7])
    summary: dict[str, Any] = {}
    for slice_name in SLICES:
        users = population.cold_users if slice_name == COLD_START else population.train_users
        resamples = rng.integers(0, len(users), size=(config.bootstrap_samples, len(users)))
        per_round: dict[str, Any] = {}
        for round_index in range(config.rounds + 1):
            totals = {
                arm: user_totals([o for o in run.outcomes if o.slice == slice_name and o.round == round_index], users)
                for arm, run in runs.items()
            }
            boot = {arm: metrics_of(table[resamples]) for arm, table in totals.items()}
            per_arm: dict[str, Any] = {}
            for arm, table in totals.items():
                point = metrics_of(table)
                entry: dict[str, Any] = {}
                for metric in METRICS:
                    entry[metric] = {"value": float(point[metric]), "ci95": interval(boot[arm][metric])}
                    if arm != BASELINE_ARM and BASELINE_ARM in totals:
                        base_point = float(metrics_of(totals[BASELINE_ARM])[metric])
                        # Utility has no natural zero, so its lift is a difference; the rates' lifts are relative.
                        scale_boot = np.abs(boot[BASELINE_ARM][metric]) if metric in RELATIVE_METRICS else 1.0
                        scale = np.abs(np.float64(base_point)) if metric in RELATIVE_METRICS else np.float64(1.0)
                        with np.errstate(invalid="ignore", divide="ignore"):
                            lift = (boot[arm][metric] - boot[BASELINE_ARM][metric]) / scale_boot
                            relative = (np.float64(point[metric]) - base_point) / scale
                        entry[metric]["lift_vs_base"] = {"value": float(relative), "ci95": interval(lift)}
                entry["impressions"] = int(
                    sum(1 for o in runs[arm].outcomes if o.slice == slice_name and o.round == round_index)
                )
                per_arm[arm] = entry
            per_round[str(round_index)] = per_arm
        summary[slice_name] = per_round
    return summary


def generator_shift(runs: dict[str, ArmRun]) -> dict[str, dict[str, float]]:
    """How far each arm's final-round images are from the base model's for the very same showing (same viewer,
    prompt and seeds): the mean absolute pixel difference (0..255), overall and per slice. 0 means the updates did
    not change what shoppers see; it tells a generator that did not move from one that moved the wrong way."""
    if BASELINE_ARM not in runs:
        return {}
    base = runs[BASELINE_ARM].final_images
    shifts: dict[str, dict[str, float]] = {}
    for arm, run in runs.items():
        if arm == BASELINE_ARM:
            continue
        differences: dict[str, list[float]] = {}
        for key, images in run.final_images.items():
            if key in base:
                difference = np.abs(images.astype(np.float64) - base[key].astype(np.float64)).mean()
                differences.setdefault(key[0], []).append(float(difference))
        every = [value for values in differences.values() for value in values]
        shifts[arm] = {
            "mean_abs_pixel_diff": float(np.mean(every)) if every else float("nan"),
            "showings": float(len(every)),
            **{f"{name}_mean_abs_pixel_diff": float(np.mean(values)) for name, values in differences.items()},
        }
    return shifts


def utility_by_segment(
    runs: dict[str, ArmRun], config: EvaluationConfig, users: Sequence[str], segments: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Arm -> segment -> the final round's mean true utility per image less base's, on the live and held-out-prompt
    showings of that segment's users, with a 95% paired bootstrap interval over them.

    One number per arm hides which way a generator moved: a shift every shopper gets alike raises utility for the
    segments whose taste it matches and lowers it for the others; personalisation raises it for each segment.
    """
    if BASELINE_ARM not in runs:
        return {}
    rng = np.random.default_rng([config.seed, 11])

    def per_user_utility(run: ArmRun) -> NDArray[np.float64]:
        final = [o for o in run.outcomes if o.round == config.rounds and o.slice in (LIVE, HELDOUT_PROMPT)]
        totals = user_totals(final, users)
        with np.errstate(invalid="ignore", divide="ignore"):
            return totals[:, 4] / totals[:, 3]

    base = per_user_utility(runs[BASELINE_ARM])
    result: dict[str, dict[str, Any]] = {}
    for arm, run in runs.items():
        if arm == BASELINE_ARM:
            continue
        difference = per_user_utility(run) - base
        per_segment: dict[str, Any] = {}
        for segment in sorted({segments[user] for user in users}):
            values = difference[[row for row, user in enumerate(users) if segments[user] == segment]]
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            boot = values[rng.integers(0, values.size, size=(config.bootstrap_samples, values.size))].mean(axis=1)
            per_segment[segment] = {"value": float(values.mean()), "ci95": interval(boot), "users": int(values.size)}
        result[arm] = per_segment
    return result


# ------------------------------------------------------------------------------------- offline reward models


def compare_reward_models(
    examples: Sequence[RewardExample], config: EvaluationConfig, text_encoder: Any
) -> dict[str, dict[str, Any]]:
    """PerFusionRM and the same towers without plug-ins, both from the pretrained towers and trained alike on live
    groups, scored on held-out groups.

    Each model's GAUC comes with a 95% bootstrap interval over held-out groups, and the paired difference
    (PerFusionRM less the model without plug-ins) with its own. A reference row, ``true_utility_ceiling``, scores the
    same groups by the simulator's true utilities: the GAUC an oracle of each shopper's taste would reach on these
    noisy clicks and orders, so the ceiling of any reward model here (no model ever reads those utilities).
    """

    from perfusion.metrics import gauc, mean_average_precision

    train = [example for example in examples if example.slice == LIVE]
    heldout = [example for example in examples if example.slice != LIVE]
    if not train or not heldout:
        raise EvaluationError("the offline reward-model comparison needs live and held-out groups; run a round")
    train_batch, heldout_batch = _reward_batch(train), _reward_batch(heldout)
    labels, groups = heldout_batch.labels.numpy(), heldout_batch.group_ids.numpy()
    scores: dict[str, NDArray[np.float64]] = {}
    for name, personalized in (("perfusion_rm", True), ("rm_without_plugins", False)):
        # From the pretrained towers, as the trainer starts every new reward model.
        model = fit_reward_model(
            personalized,
            config.base_checkpoint,
            lambda: train_batch,
            config.offline_rm_steps,
            text_encoder,
            config.seed,
        )
        scores[name] = reward_model_scores(model, text_encoder, heldout_batch)
    # Candidates are collated group by group in slot order, as the utilities are listed.
    scores[TRUE_UTILITY_CEILING] = np.concatenate([np.asarray(e.true_utilities, np.float64) for e in heldout])
    boot = bootstrap_gauc(scores, labels, groups, config.seed, config.bootstrap_samples)
    results: dict[str, dict[str, Any]] = {}
    for name, model_scores in scores.items():
        results[name] = {
            "gauc": float(gauc(model_scores, labels, groups)),
            "gauc_ci95": interval(boot[name]),
            "map": float(mean_average_precision(model_scores, labels, groups)),
            "train_groups": float(0 if name == TRUE_UTILITY_CEILING else len(train)),
            "heldout_groups": float(len(heldout)),
        }
    difference = results["perfusion_rm"]["gauc"] - results["rm_without_plugins"]["gauc"]
    results["perfusion_rm"]["gauc_lift_vs_without_plugins"] = {
        "value": difference,
        "ci95": interval(boot["perfusion_rm"] - boot["rm_without_plugins"]),
    }
    return results


TRUE_UTILITY_CEILING = "true_utility_ceiling"


def fit_reward_model(
    personalized: bool,
    towers: Path | None,
    next_batch: Callable[[], Any],
    steps: int,
    text_encoder: Any,
    seed: int,
    learning_rate: float = 1e-3,
) -> Any:
    """A PerFusionRM (``personalized=False``: the same towers without plug-ins) from the pretrained towers in
    ``towers`` (None: random towers), after ``steps`` of the trainer's reward step on ``next_batch()`` batches."""
    import torch

    from perfusion.models.reward import PerFusionRM, RewardModelConfig
    from perfusion.user_features import USER_DIM
    from trainer.reward_pretrain import load_pretrained_towers
    from trainer.updates import encode_prompts, reward_model_step

    torch.manual_seed(seed)
    model = PerFusionRM(RewardModelConfig(personalized=personalized, user_dim=USER_DIM))
    if towers is not None:
        load_pretrained_towers(model, towers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        batch = next_batch()
        _, pooled = encode_prompts(text_encoder, batch)
        reward_model_step(model, optimizer, pooled, batch, max_norm=1.0)
    return model.eval()


def reward_model_scores(model: Any, text_encoder: Any, batch: Any) -> NDArray[np.float64]:
    """The model's score of every candidate of a collated batch: [N] float64."""
    import torch

    from trainer.updates import encode_prompts, reward_scores

    with torch.no_grad():
        _, pooled = encode_prompts(text_encoder, batch)
        return reward_scores(model, pooled, batch).double().numpy()


def bootstrap_gauc(
    scores: dict[str, NDArray[np.float64]], labels: Any, groups: Any, seed: int, samples: int
) -> dict[str, NDArray[np.float64]]:
    """GAUC of every score vector on the same resamplings (with replacement) of the held-out groups."""
    from perfusion.metrics import gauc

    group_ids = np.unique(groups)
    members = {group: np.flatnonzero(groups == group) for group in group_ids}
    rng = np.random.default_rng([seed, 7])
    boot = {name: np.empty(samples) for name in scores}
    for draw in range(samples):
        chosen = rng.choice(group_ids, size=group_ids.size, replace=True)
        rows = np.concatenate([members[group] for group in chosen])
        # A group drawn twice counts as two groups: renumber by draw position.
        drawn_groups = np.concatenate([np.full(members[group].size, n) for n, group in enumerate(chosen)])
        for name, model_scores in scores.items():
            boot[name][draw] = gauc(model_scores[rows], labels[rows], drawn_groups)
    return boot


def _reward_batch(examples: Sequence[RewardExample]) -> Any:
    from perfusion.attributes import DESCRIPTOR_DIM
    from perfusion.contracts.records import GradedCandidate, GroupSample
    from perfusion.image_store import GENERATED_PREFIX
    from trainer.batches import collate_groups

    samples, pixels = [], {}
    for index, example in enumerate(examples):
        candidates = []
        for position, (image, grade) in enumerate(zip(example.images, example.grades, strict=True)):
            image_id = f"{GENERATED_PREFIX}{index}-{position}"
            pixels[image_id] = image
            candidates.append(
                GradedCandidate(image_id=image_id, position=position, descriptor=[0.0] * DESCRIPTOR_DIM, grade=grade)
            )
        samples.append(
            GroupSample(
                sample_id=f"offline-{index}",
                user_id="offline",
                design_id="offline",
                prompt=example.prompt,
                model_version="offline",
                impression_ts=0.0,
                candidates=candidates,
            )
        )
    return collate_groups(samples, [example.user_vector for example in examples], pixels)


# ---------------------------------------------------------------------------------------------- the runner


def arms_at_once(config: EvaluationConfig) -> int:
    """How many arms run in parallel: ``config.parallel_arms``, or for 0 one per two CPU cores (at least 1)."""
    wanted = config.parallel_arms or (os.cpu_count() or 1) // 2
    return max(1, min(wanted, len(config.arms)))


def arm_inputs(config: EvaluationConfig) -> tuple[PixelPreferencePanel, Population, Any]:
    """What every arm shares, built from the config alone (deterministic in its seed): panel, users, text encoder.
    Also sets torch's threads for this process."""
    import torch

    from perfusion.sampling import base_text_encoder

    torch.set_num_threads(config.torch_threads)
    panel, population = build_panel(config)
    return panel, population, base_text_encoder(config.base_checkpoint)


def run_arm_in_own_process(
    arm: str, config: EvaluationConfig, bootstrap: str, work_dir: Path, origin: float, grid_prompt: str
) -> ArmRun:
    """:func:`run_arm` in a worker process of ``--parallel``, on :func:`arm_inputs` rebuilt from the config, so the
    arm sees exactly what it sees when run in turn."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{arm}] %(levelname)s %(name)s: %(message)s")
    panel, population, text_encoder = arm_inputs(config)
    log.info("arm %s: starting in process %d", arm, os.getpid())
    return run_arm(arm, config, panel, population, bootstrap, work_dir, text_encoder, origin, grid_prompt)


def run_evaluation(config: EvaluationConfig, bootstrap: str, work_dir: Path) -> EvaluationResult:
    """Every arm of ``config``, ``config.parallel_arms`` at a time, then the metrics."""
    started = time.monotonic()
    panel, population, text_encoder = arm_inputs(config)
    origin = time.time() - (config.rounds + 3) * ROUND_SPAN_S
    grid_prompt = TRAIN_PROMPTS[0]
    runs: dict[str, ArmRun] = {}
    workers = arms_at_once(config)
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per arm, not a fork of this one with torch's threads and Kafka clients.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                arm: pool.submit(run_arm_in_own_process, arm, config, bootstrap, work_dir, origin, grid_prompt)
                for arm in config.arms
            }
            runs = {arm: future.result() for arm, future in futures.items()}
    else:
        for arm in config.arms:
            log.info("arm %s: starting", arm)
            runs[arm] = run_arm(arm, config, panel, population, bootstrap, work_dir, text_encoder, origin, grid_prompt)
    for arm, run in runs.items():
        log.info("arm %s: done in %.0f s, versions %s", arm, run.seconds, run.versions)
    summary = {
        "metrics": summarize(runs, config, population),
        "reward_models": compare_reward_models(
            runs["perfusion" if "perfusion" in runs else BASELINE_ARM].reward_examples, config, text_encoder
        ),
        "generator_shift_vs_base": generator_shift(runs),
        "utility_vs_base_by_segment": utility_by_segment(
            runs, config, population.train_users, {user: panel.segment(user) for user in population.train_users}
        ),
        "arms": {
            arm: {"versions": run.versions, "gate_refusals": run.refusals, "seconds": run.seconds}
            for arm, run in runs.items()
        },
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
    }
    segments = {user: panel.segment(user) for user in population.train_users + population.cold_users}
    return EvaluationResult(config, runs, segments, grid_prompt, summary, time.monotonic() - started)
