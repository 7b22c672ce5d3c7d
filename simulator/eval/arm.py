"""One arm through the live loop: its Feast store, stream worker, trainer and serving generator, round by round."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from harness.loop import LoopPlace, cli_arguments, loop_process, process_environment
from perfusion.sampler_config import SamplerConfig
from simulator.eval import EvaluationError
from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import (
    LIVE,
    MERCHANT,
    TRAIN_PROMPTS,
    Population,
    design_id,
    design_owner,
    plan_round,
    round_start,
)
from simulator.ground_truth import PixelPreferencePanel
from simulator.marketplace import BehaviourConfig, Marketplace, grades_of
from simulator.traffic import TrafficConfig, TrafficSimulator, encode, produce_events

if TYPE_CHECKING:
    from perfusion.feature_store import FeatureStoreSettings
    from perfusion.settings import KafkaSecuritySettings

log = logging.getLogger(__name__)


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


# What this process itself reads of an arm's place from the environment: the state folder, the broker and the topic
# prefix. Its Feast store is passed instead (LoopPlace.feature_store).
ARM_VARIABLES = (
    "PERFUSION_STATE_DIR",
    "KAFKA_BOOTSTRAP_SERVERS",
    "PERFUSION_TOPIC_PREFIX",
    "FEAST_USAGE",
)


@contextlib.contextmanager
def arm_environment(arm_dir: Path, bootstrap: str, topic_prefix: str) -> Iterator[LoopPlace]:
    """Point this process's state at the arm's folder (restored afterwards); yields the arm's place, from which the
    worker gets the same environment and this process its Feast store (:meth:`LoopPlace.feature_store`)."""
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

    def __init__(self, base_checkpoint: Path, model_root: Path, text_encoder: Any, sampler: SamplerConfig) -> None:
        from service.generator import load_serving_generator

        self.model_root = model_root
        self.text_encoder = text_encoder
        self.generator = load_serving_generator(base_checkpoint, model_root, text_encoder, sampler)

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
                sampler=current.sampler,
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


def count_records(bootstrap: str, topics: Sequence[str], security: KafkaSecuritySettings | None = None) -> int:
    from kafka import KafkaConsumer, TopicPartition

    from perfusion.kafka_security import kafka_python_kwargs

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, **kafka_python_kwargs(security))
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
    feature_store: FeatureStoreSettings | None = None,
    security: KafkaSecuritySettings | None = None,
) -> None:
    """Until the worker has closed ``expected_groups`` groups and pushed every user's latest features."""
    from perfusion.feature_store import open_feature_store, read_online_features

    store = open_feature_store(feature_store)
    deadline = time.monotonic() + wait_s
    while True:
        if worker.poll() is not None:
            raise EvaluationError(f"the stream worker exited with {worker.returncode}; see {log_path}")
        groups = count_records(bootstrap, topics, security)
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
    from perfusion.user_features import push_sign_up_profiles, user_vector
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
        feature_store = place.feature_store()
        apply_feature_repo(feature_store)
        push_sign_up_profiles(
            {user: panel.profile(user) for user in population.train_users + population.cold_users},
            {merchant: panel.profile(merchant)["region"] for merchant in population.merchants},
            origin - 86_400.0,
            feature_store,
        )
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
            gate_max_groups=8,
            gate_tolerance=config.gate_reward_tolerance,
            gate_generator_tolerance=config.gate_generator_tolerance,
            seed=config.seed,
        )
        # The arm's Kafka clients connect as the trainer's settings say (from KAFKA_SECURITY_PROTOCOL, ...), as the
        # worker, which inherits this process's environment, does.
        security = settings.kafka_security
        ensure_topics(bootstrap, topics, partitions=1, client=settings)
        images = ImageStore(arm_dir / "images")
        generator = ArmGenerator(config.base_checkpoint, arm_dir / "models", text_encoder, config.sampler)
        reader = FeastFeatureReader(open_feature_store(feature_store))
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
                produce_events((encode(event) for event in events), bootstrap, topics.events, security=security)
                wait_for_loop(
                    bootstrap,
                    [topics.group_samples, topics.group_drops],
                    live_groups,
                    last_event_ts,
                    worker,
                    config.wait_s,
                    arm_dir / "worker.log",
                    feature_store,
                    security,
                )
                summary = trainer.run(once=True)
                run.refusals = len(summary.refusals)
                log.info("arm %s round %d: %s", arm, round_index, summary.versions_published)
    run.seconds = time.monotonic() - started
    return run
