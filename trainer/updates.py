"""One incremental update: bounded steps on the reward model and on the generator, from replayed group samples.

- **Reward model** (PerFusionRM): ``reward_steps`` AdamW steps on the group-wise ranking loss (Plackett-Luce over
  each impression's candidates with graded labels).
- **Generator**: ``diffusion_steps`` AdamW steps on the chosen objective (group-level preference, pairwise
  Diffusion-DPO or SFT). The policy is the frozen base U-Net plus the personalized adaptive network (which sees
  the user vector), or, in the arms without it, a fine-tuned copy of the U-Net without user input. The reference
  is always the frozen base without user input. Policy and reference see the *same* noised images x_t at the
  *same* timesteps t; the candidates of one impression also share their noise and timestep, as the winner and
  loser of a Diffusion-DPO pair do, so their errors differ by the images alone.

Only the reward model and the adaptive network (or fine-tuned U-Net) receive gradients; the base U-Net and the text
encoder stay frozen. A tqdm bar shows loss, implicit accuracy and reward margin; the returned
:class:`UpdateReport` carries their means over the update for the manifest.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from perfusion.errors import ConfigError
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork, personalized_noise_prediction
from perfusion.models.base import BaseModelConfig, unet_component_config
from perfusion.models.reward import PerFusionRM, RewardModelConfig
from perfusion.objectives import (
    ObjectiveStats,
    group_preference_loss,
    group_ranking_loss,
    pairwise_dpo_loss,
    sft_loss,
)
from perfusion.text_encoder import TextEncoder, mean_pool
from perfusion.user_features import USER_DIM
from trainer.batches import GroupBatch
from trainer.reward_pretrain import REWARD_TOWERS_COMPONENT, has_reward_towers, load_pretrained_towers
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

DiffusionObjective = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, ObjectiveStats]]
# Component names inside a published version folder.
REWARD_MODEL = "reward_model"
ADAPTIVE_NETWORK = "adaptive_network"
FINETUNED_UNET = "unet"

DIFFUSION_OBJECTIVES: dict[str, DiffusionObjective] = {
    "group": group_preference_loss,
    "pairwise_dpo": pairwise_dpo_loss,
    "sft": sft_loss,
}


@dataclass
class TrainingModels:
    """The modules of one model version as the trainer holds them.

    ``base_unet`` is the frozen base (and the reference). Exactly one of ``adaptive_network`` and
    ``finetuned_unet`` is set when the generator is trained; neither when it is left as the base (objective none).
    """

    base_unet: UNet2DConditionModel
    base_config: BaseModelConfig
    reward_model: PerFusionRM
    noise_scheduler: Any  # diffusers DDPMScheduler: add_noise and config.num_train_timesteps
    adaptive_network: AdaptiveNetwork | None = None
    finetuned_unet: UNet2DConditionModel | None = None

    def __post_init__(self) -> None:
        if self.adaptive_network is not None and self.finetuned_unet is not None:
            raise ConfigError("a version has an adaptive network or a fine-tuned U-Net, not both")
        self.base_unet.requires_grad_(False)
        self.base_unet.eval()

    @property
    def generator(self) -> nn.Module | None:
        """The trainable part of the generator, if any."""
        return self.adaptive_network if self.adaptive_network is not None else self.finetuned_unet

    def candidate(self) -> TrainingModels:
        """A copy whose trainable modules are independent of this one's; the frozen base is shared."""
        return TrainingModels(
            base_unet=self.base_unet,
            base_config=self.base_config,
            reward_model=copy.deepcopy(self.reward_model),
            noise_scheduler=self.noise_scheduler,
            adaptive_network=copy.deepcopy(self.adaptive_network) if self.adaptive_network is not None else None,
            finetuned_unet=copy.deepcopy(self.finetuned_unet) if self.finetuned_unet is not None else None,
        )

    def components(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        """What a published version holds: name -> (module, config.json content)."""
        components: dict[str, tuple[nn.Module, dict[str, Any]]] = {
            REWARD_MODEL: (self.reward_model, self.reward_model.config.to_dict())
        }
        if self.adaptive_network is not None:
            components[ADAPTIVE_NETWORK] = (self.adaptive_network, self.adaptive_network.config.to_dict())
        if self.finetuned_unet is not None:
            components[FINETUNED_UNET] = (
                self.finetuned_unet,
                unet_component_config(self.base_config, self.finetuned_unet, built=True),
            )
        return components

    def predict_noise(self, x_t: Tensor, timesteps: Tensor, text_states: Tensor, user_vectors: Tensor) -> Tensor:
        """The policy's eps: [N, C, H, W] from x_t [N, C, H, W], t [N], text states [N, L, D], u [N, U]."""
        if self.adaptive_network is not None:
            return personalized_noise_prediction(
                self.base_unet, self.adaptive_network, x_t, timesteps, text_states, user_vectors
            )
        unet = self.finetuned_unet if self.finetuned_unet is not None else self.base_unet
        return personalized_noise_prediction(unet, None, x_t, timesteps, text_states, None)

    def reference_noise(self, x_t: Tensor, timesteps: Tensor, text_states: Tensor) -> Tensor:
        """The frozen base's eps without user input (the reference of every objective)."""
        with torch.no_grad():
            return personalized_noise_prediction(self.base_unet, None, x_t, timesteps, text_states, None)


def build_training_models(
    base_unet: UNet2DConditionModel, base_config: BaseModelConfig, noise_scheduler: Any, settings: TrainerSettings
) -> TrainingModels:
    """A fresh version for ``settings``' arm: new reward model, and a new adaptive network (zero-initialised, so
    the generator equals the base) or a trainable copy of the base U-Net, or neither for objective ``none``."""
    torch.manual_seed(settings.seed)
    reward_model = PerFusionRM(
        RewardModelConfig(
            personalized=settings.personalized_reward_model,
            user_dim=USER_DIM,
            image_size=base_config.sample_size,
            image_channels=base_config.channels,
        )
    )
    if settings.pretrained_reward_towers:
        base_folder = settings.resolved_base_checkpoint()
        if not has_reward_towers(base_folder):
            raise ConfigError(
                f"{base_folder} has no {REWARD_TOWERS_COMPONENT}/; pretrain them with `perfusion pretrain "
                f"--reward-towers-only --out {base_folder}` or set pretrained_reward_towers=False"
            )
        load_pretrained_towers(reward_model, base_folder)
    adaptive_network: AdaptiveNetwork | None = None
    finetuned_unet: UNet2DConditionModel | None = None
    if settings.objective != "none":
        if settings.use_adaptive_network:
            adaptive_network = AdaptiveNetwork(base_unet, AdaptiveConfig(user_dim=USER_DIM))
        else:
            finetuned_unet = copy.deepcopy(base_unet).requires_grad_(True)
    return TrainingModels(
        base_unet=base_unet,
        base_config=base_config,
        reward_model=reward_model.eval(),
        noise_scheduler=noise_scheduler,
        adaptive_network=adaptive_network.eval() if adaptive_network is not None else None,
        finetuned_unet=finetuned_unet.eval() if finetuned_unet is not None else None,
    )


@dataclass(frozen=True)
class PhaseSummary:
    """Means over the optimizer steps of one phase (reward model or generator) of an update."""

    steps: int
    loss: float
    implicit_accuracy: float
    reward_margin: float
    groups_used: int  # summed over steps
    seconds: float

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_steps": float(self.steps),
            f"{prefix}_loss": self.loss,
            f"{prefix}_implicit_accuracy": self.implicit_accuracy,
            f"{prefix}_reward_margin": self.reward_margin,
            f"{prefix}_groups_used": float(self.groups_used),
            f"{prefix}_seconds": self.seconds,
        }


@dataclass(frozen=True)
class UpdateReport:
    reward_model: PhaseSummary
    generator: PhaseSummary

    def as_dict(self) -> dict[str, float]:
        return {**self.reward_model.as_dict("reward_model"), **self.generator.as_dict("generator")}


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else float("nan")


class _PhaseLog:
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.accuracies: list[float] = []
        self.margins: list[float] = []
        self.groups_used = 0
        self.started = time.perf_counter()

    def record(self, stats: ObjectiveStats) -> None:
        self.losses.append(stats.loss)
        self.accuracies.append(stats.implicit_accuracy)
        self.margins.append(stats.reward_margin)
        self.groups_used += stats.num_groups_used

    def summary(self) -> PhaseSummary:
        return PhaseSummary(
            steps=len(self.losses),
            loss=_nanmean(self.losses),
            implicit_accuracy=_nanmean(self.accuracies),
            reward_margin=_nanmean(self.margins),
            groups_used=self.groups_used,
            seconds=time.perf_counter() - self.started,
        )


def encode_prompts(text_encoder: TextEncoder, batch: GroupBatch) -> tuple[Tensor, Tensor]:
    """Per-candidate text: token states [N, L, 384] for cross-attention and pooled embeddings [N, 384]."""
    states, mask = text_encoder.encode(batch.prompts)  # [G, L, 384], [G, L]
    pooled = mean_pool(states, mask)  # [G, 384]
    return states[batch.group_ids], pooled[batch.group_ids]


def reward_scores(reward_model: nn.Module, pooled_text: Tensor, batch: GroupBatch) -> Tensor:
    """PerFusionRM's score of every candidate: [N]."""
    return reward_model(pooled_text, batch.images, batch.user_vectors).reshape(-1)


def reward_model_step(
    reward_model: nn.Module, optimizer: torch.optim.Optimizer, pooled_text: Tensor, batch: GroupBatch, max_norm: float
) -> ObjectiveStats:
    """One optimizer step on the group ranking loss; skipped (no gradient) when no group has both classes."""
    reward_model.train()
    scores = reward_scores(reward_model, pooled_text, batch)
    loss, stats = group_ranking_loss(scores, batch.labels, batch.group_ids)
    if stats.num_groups_used:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reward_model.parameters(), max_norm)
        optimizer.step()
    return stats


def noised_inputs(
    models: TrainingModels, batch: GroupBatch, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, eps, t) with one noise draw and one timestep per impression, shared by its candidates; [N, ...]."""
    num_train_timesteps = int(models.noise_scheduler.config.num_train_timesteps)
    group_timesteps = torch.randint(0, num_train_timesteps, (batch.num_groups,), generator=generator)
    group_noise = torch.randn((batch.num_groups, *batch.images.shape[1:]), generator=generator)
    timesteps = group_timesteps[batch.group_ids]
    noise = group_noise[batch.group_ids]
    return models.noise_scheduler.add_noise(batch.images, noise, timesteps), noise, timesteps


def denoising_errors(
    models: TrainingModels, batch: GroupBatch, text_states: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Per-candidate mean squared errors of policy (with graph) and reference (without), on the same x_t and t: [N]."""
    x_t, noise, timesteps = noised_inputs(models, batch, generator)
    policy_eps = models.predict_noise(x_t, timesteps, text_states, batch.user_vectors)
    reference_eps = models.reference_noise(x_t, timesteps, text_states)
    policy_err = (policy_eps.float() - noise).pow(2).mean(dim=(1, 2, 3))
    reference_err = (reference_eps.float() - noise).pow(2).mean(dim=(1, 2, 3))
    return policy_err, reference_err


def generator_step(
    models: TrainingModels,
    optimizer: torch.optim.Optimizer,
    objective: DiffusionObjective,
    batch: GroupBatch,
    text_states: Tensor,
    settings: TrainerSettings,
    generator: torch.Generator,
) -> ObjectiveStats:
    """One optimizer step of the generator's trainable part on ``objective``; skipped when nothing compares."""
    trainable = models.generator
    if trainable is None:
        raise ConfigError("this version's generator has nothing to train; use objective 'none' to skip the phase")
    trainable.train()
    policy_err, reference_err = denoising_errors(models, batch, text_states, generator)
    loss, stats = objective(policy_err, reference_err, batch.labels, batch.group_ids, settings.beta)
    if stats.num_groups_used:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), settings.max_grad_norm)
        optimizer.step()
    return stats


def _bar_postfix(stats: ObjectiveStats) -> dict[str, str]:
    return {
        "loss": f"{stats.loss:.4f}",
        "acc": f"{stats.implicit_accuracy:.2f}",
        "margin": f"{stats.reward_margin:.3f}",
    }


def run_update(
    models: TrainingModels,
    text_encoder: TextEncoder,
    next_batch: Callable[[], GroupBatch],
    settings: TrainerSettings,
    show_progress: bool = True,
) -> UpdateReport:
    """Train ``models`` in place: ``settings.reward_steps`` reward-model steps, then ``settings.diffusion_steps``
    generator steps (none when the objective is ``none``), each on a fresh batch from ``next_batch``."""
    generator = torch.Generator().manual_seed(settings.seed)

    reward_log = _PhaseLog()
    reward_optimizer = torch.optim.AdamW(models.reward_model.parameters(), lr=settings.reward_learning_rate)
    bar = tqdm(range(settings.reward_steps), desc="reward model", disable=not show_progress, leave=False)
    for _ in bar:
        batch = next_batch()
        _, pooled_text = encode_prompts(text_encoder, batch)
        stats = reward_model_step(models.reward_model, reward_optimizer, pooled_text, batch, settings.max_grad_norm)
        reward_log.record(stats)
        bar.set_postfix(_bar_postfix(stats))
    models.reward_model.eval()
    reward_summary = reward_log.summary()

    generator_log = _PhaseLog()
    if settings.objective != "none" and settings.diffusion_steps:
        trainable = models.generator
        if trainable is None:
            raise ConfigError(
                f"objective {settings.objective!r} needs an adaptive network or a fine-tuned U-Net to train; "
                "build the version with build_training_models(..., settings) for these settings"
            )
        objective = DIFFUSION_OBJECTIVES[settings.objective]
        generator_optimizer = torch.optim.AdamW(
            [p for p in trainable.parameters() if p.requires_grad], lr=settings.generator_learning_rate
        )
        bar = tqdm(range(settings.diffusion_steps), desc=f"generator ({settings.objective})", disable=not show_progress)
        for _ in bar:
            batch = next_batch()
            text_states, _ = encode_prompts(text_encoder, batch)
            stats = generator_step(models, generator_optimizer, objective, batch, text_states, settings, generator)
            generator_log.record(stats)
            bar.set_postfix(_bar_postfix(stats))
        trainable.eval()
    report = UpdateReport(reward_model=reward_summary, generator=generator_log.summary())
    log.info(
        "update: reward model loss %.4f acc %.3f margin %.3f (%d steps, %.1f s); generator %s loss %.4f acc %.3f "
        "margin %.3f (%d steps, %.1f s)",
        report.reward_model.loss,
        report.reward_model.implicit_accuracy,
        report.reward_model.reward_margin,
        report.reward_model.steps,
        report.reward_model.seconds,
        settings.objective,
        report.generator.loss,
        report.generator.implicit_accuracy,
        report.generator.reward_margin,
        report.generator.steps,
        report.generator.seconds,
    )
    return report
