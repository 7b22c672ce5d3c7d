"""One arm of the science evaluation, in a process of its own: the trainer's update on the logged round, the
trainer's gate on its held-out slice, then the arm's generator draws every showing (and, for arms that read u,
the same showing with another segment's u). Only images leave the process: the parent scores them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from simulator.probes.logged_groups import serving_generator_of
from simulator.science.config import REWARD_RANKED_SHARE, ArmSpec, ScienceConfig
from simulator.science.logging_round import LoggedRound

if TYPE_CHECKING:
    from service.generator import PersonalizedGenerator
    from trainer.settings import TrainerSettings
    from trainer.updates import TrainingModels

log = logging.getLogger(__name__)


@dataclass
class ArmDraws:
    """What one arm drew after its update."""

    name: str
    images: list[NDArray[np.uint8]]  # per showing: (K, H, W, 3), in shown order
    partner_images: list[NDArray[np.uint8]] | None  # per showing, drawn with the partner's u; None: takes no u
    rounds: list[dict[str, Any]] = field(default_factory=list)  # each update's report and gate, in order
    ranked_by_reward_model: bool = False
    seconds: float = 0.0

    @property
    def update(self) -> dict[str, float]:
        """The last update's report."""
        return dict(self.rounds[-1]["update"]) if self.rounds else {}

    @property
    def gate(self) -> dict[str, Any]:
        """The last update's gate decision."""
        return dict(self.rounds[-1]["gate"]) if self.rounds else {}


def arm_settings(spec: ArmSpec, config: ScienceConfig) -> TrainerSettings:
    from trainer.settings import TrainerSettings

    overrides: dict[str, Any] = {**config.trainer_overrides(), "seed": config.seed}
    if spec.reward_ranked:
        overrides["reward_ranked_share"] = REWARD_RANKED_SHARE
    if spec.user_pathway is not None:
        overrides["user_pathway"] = spec.user_pathway
    return TrainerSettings.for_arm(spec.trainer_arm, base_checkpoint=config.base_checkpoint, **overrides)


def run_arm(spec: ArmSpec, config: ScienceConfig, logged: LoggedRound) -> ArmDraws:
    """Train, gate and draw one arm (in the calling process). With ``config.rounds`` > 1 the arm runs a closed
    loop first: after each update but the last, its served generator shows the next round's groups, the simulated
    viewers respond, and the next update trains on every group so far, as the live trainer would."""
    import torch

    from perfusion.models.base import build_train_scheduler
    from perfusion.sampling import base_text_encoder
    from service.generator import load_serving_generator
    from trainer.batches import collate_groups
    from trainer.gate import belongs_to_heldout, run_gate
    from trainer.reward_ranked import MixedGeneratorBatches
    from trainer.updates import build_training_models, run_update

    started = time.monotonic()
    torch.set_num_threads(config.torch_threads)
    text_encoder = base_text_encoder(config.base_checkpoint)
    with tempfile.TemporaryDirectory(prefix="perfusion-science-") as empty_store:
        base = load_serving_generator(config.base_checkpoint, Path(empty_store), text_encoder, config.sampler)
    settings = arm_settings(spec, config)
    serving = build_training_models(base.unet, base.config, build_train_scheduler(base.config), settings)
    logger = logged.logger  # this process's own copy: a closed loop adds to it
    rng = np.random.default_rng([config.seed, 2])
    rounds: list[dict[str, Any]] = []
    served = ServedGenerator(spec, base, text_encoder, config, serving, None)
    for round_index in range(1, config.rounds + 1):
        samples = logger.samples()
        train = [s for s in samples if not belongs_to_heldout(s.sample_id, settings.heldout_fraction)]
        heldout = [s for s in samples if belongs_to_heldout(s.sample_id, settings.heldout_fraction)]

        def collate(chosen: list[Any]) -> Any:
            vectors = [logger.impression_vectors[s.sample_id].tolist() for s in chosen]
            return collate_groups(chosen, vectors, logger.pixels)

        def next_batch(train: list[Any] = train) -> Any:
            size = min(settings.groups_per_batch, len(train))
            return collate([train[index] for index in rng.choice(len(train), size=size, replace=False)])

        heldout_batch = collate(heldout) if heldout else None
        candidate = serving.candidate()
        generator_batches = None
        if settings.reward_ranked_share > 0:
            generator_batches = MixedGeneratorBatches(candidate, text_encoder, next_batch, heldout_batch, settings)
        report = run_update(candidate, text_encoder, next_batch, settings, False, generator_batches)
        decision = run_gate(candidate, serving if round_index > 1 else None, text_encoder, heldout_batch, settings)
        gate = {"publish": decision.publish, "reasons": list(decision.reasons), "metrics": decision.metrics}
        rounds.append({"update": report.as_dict(), "gate": gate})
        if decision.publish:
            serving = candidate
            served = ServedGenerator(spec, base, text_encoder, config, serving, decision.metrics)
        if round_index < config.rounds:
            logger.log_round(round_index, config.closed_loop_groups, served, personalized=spec.takes_u)
    images, partner_images = [], []
    for index, showing in enumerate(logged.showings):
        own_u, partner_u = showing.user_vector, showing.partner_vector
        if config.rounds > 1:  # u as this arm's own loop knows the viewers after its rounds
            own_u, partner_u = logger.loop.user_vector(showing.viewer), logger.loop.user_vector(str(showing.partner))
        images.append(served.generate(showing.prompt, own_u, config.k, showing.seed).images)
        if spec.takes_u:
            partner_images.append(served.generate(showing.prompt, partner_u, config.k, showing.seed).images)
        if (index + 1) % 25 == 0:
            log.info("arm %s: drew %d of %d showings", spec.name, index + 1, len(logged.showings))
    return ArmDraws(
        name=spec.name,
        images=images,
        partner_images=partner_images if spec.takes_u else None,
        rounds=rounds,
        ranked_by_reward_model=served.ranks,
        seconds=time.monotonic() - started,
    )


class ServedGenerator:
    """What the arm serves, through the service's own generator: its version's generator (u only for arms that
    read it), or for best-of-N the service's best-of-N over the base model, ranking with the version's reward
    model when the version's held-out GAUC interval clears the service's floor (``BestOfSettings.gauc_floor``)."""

    def __init__(
        self,
        spec: ArmSpec,
        base: PersonalizedGenerator,
        text_encoder: Any,
        config: ScienceConfig,
        models: TrainingModels,
        gate_metrics: dict[str, float] | None,
    ) -> None:
        self.spec = spec
        self.ranked_groups = 0
        self.generator: Any
        if spec.best_of_n and gate_metrics is not None:
            self.generator = published_with_best_of_n(models, gate_metrics, text_encoder, config)
        else:
            self.generator = serving_generator_of(models, base, text_encoder, spec.name, config.sampler)

    @property
    def ranks(self) -> bool:
        return self.ranked_groups > 0

    def generate(self, prompt: str, user_vector: NDArray[np.float32] | None, k: int, seed: int) -> Any:
        reads_u = self.spec.takes_u or self.spec.best_of_n  # best-of-N ranks for the viewer's u
        group = self.generator.generate(prompt, user_vector if reads_u else None, k, seed)
        self.ranked_groups += int(group.ranked_by is not None)
        return group


def published_with_best_of_n(
    models: TrainingModels, gate_metrics: dict[str, float], text_encoder: Any, config: ScienceConfig
) -> PersonalizedGenerator:
    """The version published to a model store of its own with the gate's metrics in its manifest, and loaded by
    ``load_serving_generator`` with best-of-N on, as ``perfusion serve`` would serve it."""
    from perfusion.checkpoints import ModelStore
    from service.generator import load_serving_generator
    from service.settings import BestOfSettings

    best_of = BestOfSettings(enabled=True, n=config.best_of, max_k=config.k)  # the service's GAUC floor
    with tempfile.TemporaryDirectory(prefix="perfusion-science-store-") as folder:
        ModelStore(Path(folder)).publish(models.components(), {"metrics": gate_metrics})
        return load_serving_generator(config.base_checkpoint, Path(folder), text_encoder, config.sampler, best_of)


def run_arm_in_own_process(name: str, config: ScienceConfig, logged: LoggedRound) -> ArmDraws:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s")
    return run_arm(ArmSpec.parse(name), config, logged)
