"""What both probes start from: the evaluation's shoppers, the base model as a serving generator, and logged
base-model groups graded by the simulated shoppers, with the user vectors a shop would know afterwards."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import TRAIN_PROMPTS
from simulator.eval.runner import arm_inputs
from simulator.marketplace import Marketplace, grades_of

if TYPE_CHECKING:
    from service.generator import PersonalizedGenerator
    from trainer.updates import TrainingModels

log = logging.getLogger(__name__)

# What makes a logged candidate a positive, and how the report says it.
PROBE_LABELS: dict[str, str] = {
    "clicks": "the shoppers' clicks and orders",
    "true-utility": "each group's best image by the simulator's true utility, a diagnostic upper bound without "
    "click noise",
}


class GroupLogging(Protocol):
    """What :func:`log_base_groups` reads of a probe's settings."""

    @property
    def groups_per_user(self) -> int: ...
    @property
    def k(self) -> int: ...
    @property
    def labels(self) -> str: ...
    @property
    def seed(self) -> int: ...


@dataclass
class LoggedGroups:
    """The base model's groups and the shoppers' grades, as GroupSamples plus pixels and user vectors."""

    samples: list[Any]  # perfusion.contracts.records.GroupSample
    pixels: dict[str, NDArray[np.uint8]]  # image id -> (H, W, 3)
    user_vectors: dict[str, NDArray[np.float32]]  # user id -> u

    def batches(self, groups_per_batch: int, seed: int) -> Any:
        """A ``next_batch`` callable for run_update: groups drawn uniformly, without replacement within a batch."""
        from trainer.batches import collate_groups

        rng = np.random.default_rng(seed)
        size = min(groups_per_batch, len(self.samples))

        def next_batch() -> Any:
            chosen = [self.samples[index] for index in rng.choice(len(self.samples), size=size, replace=False)]
            vectors = [self.user_vectors[sample.user_id].tolist() for sample in chosen]
            return collate_groups(chosen, vectors, self.pixels)

        return next_batch


def log_base_groups(
    config: GroupLogging,
    panel: Any,
    users: list[str],
    generator: Any,
    prompts: tuple[str, ...] = TRAIN_PROMPTS,
    first_group: int = 0,
) -> LoggedGroups:
    """Step 1: base-model groups for every user, the shoppers' responses, and the users' vectors afterwards.

    Group ``g`` of a user shows ``prompts[g % len(prompts)]``; its seeds and response draws depend on ``first_group
    + g``, so a second call with a ``first_group`` past the first call's groups logs new groups for the same users.
    """
    from perfusion.contracts.records import GradedCandidate, GroupSample
    from perfusion.user_features import user_vector

    marketplace = Marketplace(panel)
    samples: list[Any] = []
    pixels: dict[str, NDArray[np.uint8]] = {}
    liked: dict[str, list[NDArray[np.float64]]] = {user: [] for user in users}
    for user_index, user in enumerate(users):
        for group_index in range(first_group, first_group + config.groups_per_user):
            prompt = prompts[(group_index - first_group) % len(prompts)]
            group = generator.generate(prompt, None, config.k, seed=1000 * user_index + group_index)
            rng = np.random.default_rng([config.seed, user_index, group_index])
            response = marketplace.shopper_response(user, group.images, rng)
            grades = grades_of(response)
            if config.labels == "true-utility":
                grades = [int(position == int(np.argmax(response.utilities))) for position in range(len(grades))]
            sample_id = f"probe-{user_index}-{group_index}"
            candidates = []
            for position, (image, descriptor, grade) in enumerate(
                zip(group.images, group.descriptors, grades, strict=True)
            ):
                image_id = f"{sample_id}-{position}"
                pixels[image_id] = image
                candidates.append(
                    GradedCandidate(image_id=image_id, position=position, descriptor=descriptor, grade=grade)
                )
                if response.clicked[position]:  # u holds what the shop saw, whatever the training labels
                    liked[user].append(np.asarray(descriptor, dtype=np.float64))
            samples.append(
                GroupSample(
                    sample_id=sample_id,
                    user_id=user,
                    design_id=f"probe-{prompt}",
                    prompt=prompt,
                    model_version=group.model_version,
                    impression_ts=0.0,
                    candidates=candidates,
                )
            )
        if (user_index + 1) % 10 == 0 or user_index + 1 == len(users):
            log.info("logged %d groups of %d of %d users", config.groups_per_user, user_index + 1, len(users))
    vectors = {}
    for user in users:
        features: dict[str, Any] = dict(panel.profile(user))
        if liked[user]:
            features["preference"] = np.mean(liked[user], axis=0).tolist()
        vectors[user] = user_vector(features)
    return LoggedGroups(samples, pixels, vectors)


def probe_inputs(
    users: int, seed: int, torch_threads: int, base_checkpoint: Path, sampling_steps: int
) -> tuple[Any, list[str], Any, PersonalizedGenerator]:
    """The evaluation's panel and training users, the text encoder, and the base model as a serving generator
    (the serving sampler at ``sampling_steps``)."""
    import tempfile

    from perfusion.sampler_config import SERVING_SAMPLER
    from service.generator import load_serving_generator

    panel, population, text_encoder = arm_inputs(
        EvaluationConfig(train_users=users, seed=seed, torch_threads=torch_threads)
    )
    with tempfile.TemporaryDirectory(prefix="perfusion-probe-") as empty_store:
        sampler = SERVING_SAMPLER.with_steps(sampling_steps)
        serving = load_serving_generator(base_checkpoint, Path(empty_store), text_encoder, sampler)
    return panel, population.train_users, text_encoder, serving


def serving_generator_of(
    models: TrainingModels, serving: PersonalizedGenerator, text_encoder: Any, version: str, sampler: Any
) -> PersonalizedGenerator:
    """The trained version as the service would serve it (the fine-tuned U-Net arms serve their own U-Net)."""
    from perfusion.models.adaptive import AdaptiveNetwork
    from service.generator import PersonalizedGenerator

    if models.adaptive_network is not None:
        unet, network, uses_adaptive = serving.unet, models.adaptive_network, True
    elif models.finetuned_unet is not None:
        unet, uses_adaptive = models.finetuned_unet, False
        network = AdaptiveNetwork(unet)  # allocated, never applied
    else:
        return serving
    return PersonalizedGenerator(
        unet,
        network,
        text_encoder,
        serving.classifier,
        serving.config,
        version=version,
        uses_adaptive=uses_adaptive,
        sampler=sampler,
    )
