"""One incremental update: bounded steps on the reward model and on the generator, from replayed group samples.

- **Reward model** (PerFusionRM): ``reward_steps`` AdamW steps on the group-wise ranking loss (Plackett-Luce over
  each impression's candidates with graded labels).
- **Generator**: ``diffusion_steps`` AdamW steps on the chosen objective (group-level preference, pairwise
  Diffusion-DPO or SFT), the preference objectives with the supervised term on positives
  (:func:`perfusion.objectives.anchored`, weight ``supervised_weight``). The policy is the frozen base U-Net plus
  the personalized adaptive network (which sees the user vector), or, in the arms without it, a fine-tuned copy of
  the U-Net without user input. The reference is always the frozen base without user input. Policy and reference
  see the *same* noised images x_t at the *same* timesteps t; the candidates of one impression also share their
  noise and timestep, as the winner and loser of a Diffusion-DPO pair do, so their errors differ by the images
  alone. Each step takes ``draws_per_group`` (t, noise) draws per impression, and a candidate's error is its mean
  over them: the implicit reward s = -beta * (policy_err - ref_err) is then an average of m single-draw estimates,
  whose noise at one draw (a single t decides most of it) is what saturates the loss. Timesteps are drawn from
  those the serving sampler calls the model at (``train_timesteps="serving"``), or from all of training's.

Only the reward model and the adaptive network (or fine-tuned U-Net) receive gradients; the base U-Net and the text
encoder stay frozen. A tqdm bar shows loss, implicit accuracy, reward margin and mean |s|; the returned
:class:`UpdateReport` carries their means over the update for the manifest, and a warning names the steps whose
preference loss exceeded 2 log K (the implicit rewards saturate: lower beta or the learning rate).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from perfusion.errors import ConfigError
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork, personalized_noise_prediction
from perfusion.models.base import BaseModelConfig, unet_component_config
from perfusion.models.reward import PerFusionRM, RewardModelConfig
from perfusion.objectives import (
    DiffusionObjective,
    ObjectiveStats,
    anchored,
    group_preference_loss,
    group_ranking_loss,
    pairwise_dpo_loss,
    sft_loss,
)
from perfusion.sampling import SERVING_SAMPLER, model_timesteps
from perfusion.text_encoder import TextEncoder, mean_pool
from perfusion.user_features import USER_DIM
from trainer.batches import GroupBatch
from trainer.reward_pretrain import REWARD_TOWERS_COMPONENT, has_reward_towers, load_pretrained_towers
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

# Component names inside a published version folder.
REWARD_MODEL = "reward_model"
ADAPTIVE_NETWORK = "adaptive_network"
FINETUNED_UNET = "unet"

DIFFUSION_OBJECTIVES: dict[str, DiffusionObjective] = {
    "group": group_preference_loss,
    "pairwise_dpo": pairwise_dpo_loss,
    "sft": sft_loss,
}
PREFERENCE_OBJECTIVES = ("group", "pairwise_dpo")  # the objectives the supervised term is added to


def diffusion_objective(settings: TrainerSettings) -> DiffusionObjective:
    """The generator's loss for ``settings``: the named objective, the preference ones with the supervised term."""
    objective = DIFFUSION_OBJECTIVES[settings.objective]
    if settings.objective in PREFERENCE_OBJECTIVES:
        return anchored(objective, settings.supervised_weight)
    return objective


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
    train_timesteps: Tensor | None = None  # [T] long, the timesteps the generator trains at; None = all of training's

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
        """A copy whose trainable modules are independent of this one's and trainable; the frozen base is shared."""
        return TrainingModels(
            base_unet=self.base_unet,
            base_config=self.base_config,
            reward_model=copy.deepcopy(self.reward_model),
            noise_scheduler=self.noise_scheduler,
            adaptive_network=_trainable_copy(self.adaptive_network),
            finetuned_unet=_trainable_copy(self.finetuned_unet),
            train_timesteps=self.train_timesteps,
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


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _trainable_copy(module: ModuleT | None) -> ModuleT | None:
    """An independent copy whose every parameter trains (a served copy may have been frozen for inference)."""
    return None if module is None else copy.deepcopy(module).requires_grad_(True)


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
            adaptive_network = AdaptiveNetwork(
                base_unet, AdaptiveConfig(user_dim=USER_DIM, user_pathway=settings.user_pathway)
            )
        else:
            finetuned_unet = copy.deepcopy(base_unet).requires_grad_(True)
    return TrainingModels(
        base_unet=base_unet,
        base_config=base_config,
        reward_model=reward_model.eval(),
        noise_scheduler=noise_scheduler,
        adaptive_network=adaptive_network.eval() if adaptive_network is not None else None,
        finetuned_unet=finetuned_unet.eval() if finetuned_unet is not None else None,
        train_timesteps=training_timesteps(base_config, settings),
    )


def training_timesteps(base_config: BaseModelConfig, settings: TrainerSettings) -> Tensor | None:
    """[T] the timesteps the generator trains at: the serving sampler's model calls, or None for all."""
    if settings.train_timesteps == "all":
        return None
    return torch.tensor(model_timesteps(SERVING_SAMPLER, base_config), dtype=torch.long)


@dataclass(frozen=True)
class PhaseSummary:
    """Means over the optimizer steps of one phase (reward model or generator) of an update."""

    steps: int
    loss: float
    implicit_accuracy: float
    reward_margin: float
    groups_used: int  # summed over steps
    seconds: float
    mean_abs_reward: float = float("nan")  # mean |s| (implicit reward, or score): of order one when healthy
    final_loss: float = float("nan")  # mean loss of the last tenth of the steps
    saturated_steps: int = 0  # steps whose loss exceeded 2 log K

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_steps": float(self.steps),
            f"{prefix}_loss": self.loss,
            f"{prefix}_final_loss": self.final_loss,
            f"{prefix}_implicit_accuracy": self.implicit_accuracy,
            f"{prefix}_reward_margin": self.reward_margin,
            f"{prefix}_mean_abs_reward": self.mean_abs_reward,
            f"{prefix}_saturated_steps": float(self.saturated_steps),
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
        self.abs_rewards: list[float] = []
        self.saturated_steps = 0
        self.groups_used = 0
        self.started = time.perf_counter()

    def record(self, stats: ObjectiveStats) -> None:
        self.losses.append(stats.loss)
        self.accuracies.append(stats.implicit_accuracy)
        self.margins.append(stats.reward_margin)
        self.abs_rewards.append(stats.mean_abs_reward)
        self.groups_used += stats.num_groups_used
        if stats.num_groups_used and stats.loss > saturation_limit(stats.mean_group_size):
            self.saturated_steps += 1

    def summary(self) -> PhaseSummary:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return PhaseSummary(
            steps=len(self.losses),
            loss=_nanmean(self.losses),
            implicit_accuracy=_nanmean(self.accuracies),
            reward_margin=_nanmean(self.margins),
            groups_used=self.groups_used,
            seconds=time.perf_counter() - self.started,
            mean_abs_reward=_nanmean(self.abs_rewards),
            final_loss=_nanmean(tail),
            saturated_steps=self.saturated_steps,
        )


def saturation_limit(group_size: float) -> float:
    """2 log K: a Plackett-Luce loss above it is worse than twice chance's, the mark of saturated rewards."""
    return 2.0 * math.log(group_size) if group_size > 1 else math.inf


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
    models: TrainingModels, batch: GroupBatch, generator: torch.Generator, draws: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, eps, t), ``draws`` rows per candidate: [draws * N, ...], draw d of every candidate in rows d*N..(d+1)*N.

    Each draw is one noise image and one timestep per impression, shared by its candidates; timesteps come from
    ``models.train_timesteps`` (uniformly) or, when None, from all of training's.
    """
    if draws < 1:
        raise ConfigError(f"draws per group must be at least 1, got {draws}")
    shape = (draws, batch.num_groups)
    if models.train_timesteps is None:
        num_train_timesteps = int(models.noise_scheduler.config.num_train_timesteps)
        group_timesteps = torch.randint(0, num_train_timesteps, shape, generator=generator)  # [m, G]
    else:
        choice = torch.randint(0, models.train_timesteps.numel(), shape, generator=generator)
        group_timesteps = models.train_timesteps[choice]
    group_noise = torch.randn((*shape, *batch.images.shape[1:]), generator=generator)  # [m, G, C, H, W]
    timesteps = group_timesteps[:, batch.group_ids].reshape(-1)  # [m * N]
    noise = group_noise[:, batch.group_ids].reshape(-1, *batch.images.shape[1:])
    images = batch.images.repeat(draws, 1, 1, 1)
    return models.noise_scheduler.add_noise(images, noise, timesteps), noise, timesteps


def denoising_errors(
    models: TrainingModels, batch: GroupBatch, text_states: Tensor, generator: torch.Generator, draws: int = 1
) -> tuple[Tensor, Tensor]:
    """Per-candidate mean squared errors of policy (with graph) and reference (without), on the same x_t and t,
    averaged over ``draws`` (t, noise) draws: [N] each."""
    x_t, noise, timesteps = noised_inputs(models, batch, generator, draws)
    states = text_states.repeat(draws, 1, 1)
    users = batch.user_vectors.repeat(draws, 1)
    policy_eps = models.predict_noise(x_t, timesteps, states, users)
    reference_eps = models.reference_noise(x_t, timesteps, states)
    n = batch.num_candidates
    policy_err = (policy_eps.float() - noise).pow(2).mean(dim=(1, 2, 3)).view(draws, n).mean(dim=0)
    reference_err = (reference_eps.float() - noise).pow(2).mean(dim=(1, 2, 3)).view(draws, n).mean(dim=0)
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
    policy_err, reference_err = denoising_errors(models, batch, text_states, generator, settings.draws_per_group)
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
        "|s|": f"{stats.mean_abs_reward:.2f}",
    }


def run_update(
    models: TrainingModels,
    text_encoder: TextEncoder,
    next_batch: Callable[[], GroupBatch],
    settings: TrainerSettings,
    show_progress: bool = True,
    generator_batches: Callable[[], GroupBatch] | None = None,
) -> UpdateReport:
    """Train ``models`` in place: ``settings.reward_steps`` reward-model steps, then ``settings.diffusion_steps``
    generator steps (none when the objective is ``none``), each on a fresh batch from ``next_batch`` (the generator's
    from ``generator_batches`` when given, e.g. :class:`trainer.reward_ranked.MixedGeneratorBatches`)."""
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
        objective = diffusion_objective(settings)
        generator_optimizer = torch.optim.AdamW(
            [p for p in trainable.parameters() if p.requires_grad], lr=settings.generator_learning_rate
        )
        bar = tqdm(range(settings.diffusion_steps), desc=f"generator ({settings.objective})", disable=not show_progress)
        for _ in bar:
            batch = (generator_batches or next_batch)()
            text_states, _ = encode_prompts(text_encoder, batch)
            stats = generator_step(models, generator_optimizer, objective, batch, text_states, settings, generator)
            generator_log.record(stats)
            bar.set_postfix(_bar_postfix(stats))
        trainable.eval()
    generator_summary = generator_log.summary()
    if generator_summary.saturated_steps:
        log.warning(
            "generator %s: the loss exceeded 2 log K in %d of %d steps (mean |s| %.2f): the implicit rewards "
            "saturate; lower beta (%g) or the learning rate (%g)",
            settings.objective,
            generator_summary.saturated_steps,
            generator_summary.steps,
            generator_summary.mean_abs_reward,
            settings.beta,
            settings.generator_learning_rate,
        )
    report = UpdateReport(reward_model=reward_summary, generator=generator_summary)
    log.info(
        "update: reward model loss %.4f acc %.3f margin %.3f (%d steps, %.1f s); generator %s loss %.4f acc %.3f "
        "margin %.3f |s| %.2f (%d steps, %.1f s)",
        report.reward_model.loss,
        report.reward_model.implicit_accuracy,
        report.reward_model.reward_margin,
        report.reward_model.steps,
        report.reward_model.seconds,
        settings.objective,
        report.generator.loss,
        report.generator.implicit_accuracy,
        report.generator.reward_margin,
        report.generator.mean_abs_reward,
        report.generator.steps,
        report.generator.seconds,
    )
    return report
