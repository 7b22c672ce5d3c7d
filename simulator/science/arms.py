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

BEST_OF_N_FLOOR = 0.55  # the reward model ranks only when the lower end of its held-out GAUC interval clears this


@dataclass
class ArmDraws:
    """What one arm drew after its update."""

    name: str
    images: list[NDArray[np.uint8]]  # per showing: (K, H, W, 3), in shown order
    partner_images: list[NDArray[np.uint8]] | None  # per showing, drawn with the partner's u; None: takes no u
    update: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    ranked_by_reward_model: bool = False
    seconds: float = 0.0


def arm_settings(spec: ArmSpec, config: ScienceConfig) -> TrainerSettings:
    from trainer.settings import TrainerSettings

    overrides: dict[str, Any] = {**config.trainer_overrides(), "seed": config.seed}
    if spec.reward_ranked:
        overrides["reward_ranked_share"] = REWARD_RANKED_SHARE
    if spec.user_pathway is not None:
        overrides["user_pathway"] = spec.user_pathway
    return TrainerSettings.for_arm(spec.trainer_arm, base_checkpoint=config.base_checkpoint, **overrides)


def run_arm(spec: ArmSpec, config: ScienceConfig, logged: LoggedRound) -> ArmDraws:
    """Train, gate and draw one arm (in the calling process)."""
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
    models = build_training_models(base.unet, base.config, build_train_scheduler(base.config), settings)
    train = [s for s in logged.samples if not belongs_to_heldout(s.sample_id, settings.heldout_fraction)]
    heldout = [s for s in logged.samples if belongs_to_heldout(s.sample_id, settings.heldout_fraction)]

    def collate(samples: list[Any]) -> Any:
        return collate_groups(
            samples, [logged.impression_vectors[s.sample_id].tolist() for s in samples], logged.pixels
        )

    rng = np.random.default_rng([config.seed, 2])

    def next_batch() -> Any:
        size = min(settings.groups_per_batch, len(train))
        return collate([train[index] for index in rng.choice(len(train), size=size, replace=False)])

    heldout_batch = collate(heldout) if heldout else None
    generator_batches = None
    if settings.reward_ranked_share > 0:
        generator_batches = MixedGeneratorBatches(models, text_encoder, next_batch, heldout_batch, settings)
    report = run_update(models, text_encoder, next_batch, settings, False, generator_batches)
    decision = run_gate(models, None, text_encoder, heldout_batch, settings)
    generator = serving_generator_of(models, base, text_encoder, spec.name, config.sampler)
    rm_floor_met = float(decision.metrics.get("rm_gauc_low", float("nan"))) >= BEST_OF_N_FLOOR
    rank = spec.best_of_n and rm_floor_met
    images, partner_images = [], []
    for index, showing in enumerate(logged.showings):
        if rank:
            images.append(best_of_n(models, text_encoder, base, showing, config))
        else:
            u = showing.user_vector if spec.takes_u else None
            images.append(generator.generate(showing.prompt, u, config.k, showing.seed).images)
        if spec.takes_u:
            partner = generator.generate(showing.prompt, showing.partner_vector, config.k, showing.seed)
            partner_images.append(partner.images)
        if (index + 1) % 25 == 0:
            log.info("arm %s: drew %d of %d showings", spec.name, index + 1, len(logged.showings))
    return ArmDraws(
        name=spec.name,
        images=images,
        partner_images=partner_images if spec.takes_u else None,
        update=report.as_dict(),
        gate={"publish": decision.publish, "reasons": list(decision.reasons), "metrics": decision.metrics},
        ranked_by_reward_model=rank,
        seconds=time.monotonic() - started,
    )


def best_of_n(
    models: TrainingModels, text_encoder: Any, base: PersonalizedGenerator, showing: Any, config: ScienceConfig
) -> NDArray[np.uint8]:
    """N base candidates for the showing, the K that the arm's reward model scores highest for this viewer, best
    first."""
    import torch

    from perfusion.text_encoder import mean_pool

    drawn = base.generate(showing.prompt, None, config.best_of, showing.seed).images  # (N, H, W, 3)
    states, mask = text_encoder.encode([showing.prompt])
    pooled = mean_pool(states, mask).expand(config.best_of, -1)  # [N, 384]
    pixels = torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [N, 3, H, W] in [-1, 1]
    users = torch.from_numpy(showing.user_vector).unsqueeze(0).expand(config.best_of, -1)
    with torch.no_grad():
        scores = models.reward_model(pooled, pixels, users).reshape(-1)
    order = torch.argsort(scores, descending=True)[: config.k].numpy()
    return drawn[order]


def run_arm_in_own_process(name: str, config: ScienceConfig, logged: LoggedRound) -> ArmDraws:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s")
    return run_arm(ArmSpec.parse(name), config, logged)
