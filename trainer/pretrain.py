"""Pretraining of the base text-to-image UNet on the rendered catalog (train captions only).

The whole training set is rendered once into one tensor on the device, caption token states come from a
precomputed table (MiniLM, or a file exported on another machine), and each step draws a random batch from both:
no data loader, so a GPU stays busy with large batches. 10% of captions are dropped to the empty prompt so that
sampling can use classifier-free guidance; an EMA of the weights is what gets saved.

At the end the attribute classifier is trained on renders, samples for held-out captions are generated with the
EMA weights, and their garment and colour accuracy is reported, with a sample grid.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from PIL import Image, ImageDraw
from pydantic import Field
from tqdm import tqdm

from perfusion.attributes import ATTRIBUTE_KINDS, GARMENTS, OPEN_KINDS, Attributes
from perfusion.catalog import CatalogDataset, split_catalog
from perfusion.checkpoints import load_component, save_component
from perfusion.errors import ConfigError
from perfusion.models.attribute_classifier import AttributeClassifier, attribute_accuracy, build_attribute_classifier
from perfusion.models.base import (
    BaseModelConfig,
    build_train_scheduler,
    build_unet,
    count_parameters,
    load_pretrained_unet,
    unet_component_config,
)
from perfusion.models.reward import PerFusionRM
from perfusion.sampling import (
    SERVING_SAMPLER,
    UNET_COMPONENT,
    SamplerConfig,
    base_model_config,
    load_base_unet,
    sample_images,
    unet_noise_fn,
)
from perfusion.settings import Settings
from perfusion.text_encoder import CaptionStates
from trainer.attribute_classifier import ClassifierTrainingConfig, train_attribute_classifier
from trainer.reward_pretrain import (
    RewardPretrainConfig,
    pretrain_reward_towers,
    save_reward_towers,
)

logger = logging.getLogger(__name__)
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

CLASSIFIER_COMPONENT = "attribute_classifier"
REPORT_FILE = "report.json"
SAMPLES_FILE = "samples.png"
OPEN_SAMPLES_FILE = "open_samples.png"


class PretrainConfig(Settings):
    """Configuration of ``perfusion pretrain``: the base UNet's training and evaluation, and two sections."""

    steps: int = Field(default=3000, description="optimizer steps (an upper bound with time_budget_s)")
    batch_size: int = Field(default=64, description="images per step")
    learning_rate: float = Field(default=5e-4, description="AdamW peak learning rate")
    warmup_steps: int = Field(default=100, description="linear warm-up steps, then cosine decay to 10%")
    ema_decay: float = Field(default=0.999, description="EMA decay of the saved weights")
    caption_dropout: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="share of captions replaced by the empty prompt"
    )
    attribute_dropout: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="chance that each of the colour, pattern, sleeve and fit words is left out of a caption",
    )
    variants: int = Field(default=8, description="renders (seeds) of each training item")
    seed: int = Field(default=0, description="seeds renders, initialisation, batches and noise")
    device: str = Field(default="cpu", description="torch device (cpu or cuda)")
    bf16: bool = Field(default=False, description="bfloat16 autocast for the UNet forward (CUDA)")
    time_budget_s: float | None = Field(default=None, description="stop training after this many seconds")
    eval_captions: int = Field(default=0, description="held-out captions evaluated (0 = all)")
    eval_seeds: int = Field(default=2, description="samples per held-out caption")
    grid_captions: int = Field(default=8, description="rows of the sample grid")
    grid_seeds: int = Field(default=6, description="columns of the sample grid")
    open_seeds: int = Field(default=64, description="seeds of each garment-only prompt for the open spread")
    open_grid_seeds: int = Field(default=10, description="columns of the garment-only sample grid")
    sample_steps: int = Field(default=25, description="DDIM steps when sampling for evaluation")
    guidance_scale: float = Field(default=3.0, description="classifier-free guidance scale for evaluation")
    classifier: ClassifierTrainingConfig = Field(
        default_factory=ClassifierTrainingConfig, description="training of the attribute classifier"
    )
    reward_towers: RewardPretrainConfig = Field(
        default_factory=RewardPretrainConfig, description="contrastive training of PerFusionRM's towers"
    )


@dataclass
class PretrainResult:
    unet: UNet2DConditionModel
    classifier: AttributeClassifier
    reward_towers: PerFusionRM | None  # None when an existing checkpoint is only measured again
    metrics: dict[str, Any]
    grid: np.ndarray  # held-out captions (rows) across seeds
    open_grid: np.ndarray  # garment-only prompts (rows) across seeds


class EMA(Generic[ModuleT]):
    """Exponential moving average of a module's parameters (diffusers' ``EMAModel``), kept as a module of its own
    (``shadow``) that can be sampled from and saved like the live one."""

    def __init__(self, module: ModuleT, decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        # Warm-up: the n-th update uses decay min(decay, (1 + n) / (10 + n)), so early averages are not dominated by
        # the random initialisation. EMAModel counts from update_after_step + 1, hence -1: the first update already
        # averages (2/11) instead of copying the live weights.
        self._average = EMAModel(module.parameters(), decay=decay, update_after_step=-1, foreach=True)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self._average.step(module.parameters())
        self._average.copy_to(self.shadow.parameters())


def learning_rate_at(step: int, config: PretrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% over the steps or the time budget, whichever runs out first."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.time_budget_s:
        progress = max(progress, elapsed_s / config.time_budget_s)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def named_subset_indices(uniform: torch.Tensor, attribute_dropout: float) -> torch.Tensor:
    """Attribute dropout: which kinds each caption names, as an index into :func:`named_subsets`.

    ``uniform`` (B, len(OPEN_KINDS)) holds U(0, 1) draws; kind j is named when its draw is at least
    ``attribute_dropout``, independently of the others, so that the model learns to sample what a prompt leaves open.
    Returns (B,) long in [0, 2 ** len(OPEN_KINDS)), bit j set when kind j is named.
    """
    bits = 2 ** torch.arange(uniform.shape[1], device=uniform.device)
    return ((uniform >= attribute_dropout).long() * bits).sum(dim=1)


def train_unet(
    unet: UNet2DConditionModel,
    model_config: BaseModelConfig,
    config: PretrainConfig,
    items: Sequence[Attributes],
    text: CaptionStates,
) -> tuple[UNet2DConditionModel, dict[str, float]]:
    """Denoising training on renders of ``items``; returns the EMA copy and training figures."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    data = CatalogDataset(items, size=model_config.sample_size, variants=config.variants, seed=config.seed)
    images = data.image_tensor().to(device)  # (N, 3, H, W) in [-1, 1]
    # prompt_rows[i, s]: text-table row of item i's prompt naming subset s of OPEN_KINDS (bit j: kind j named).
    prompt_rows = text.rows([prompt for attrs in data.items for prompt in attrs.prompts()]).view(len(data.items), -1)
    image_prompt_rows = prompt_rows[data.item_index()].to(device)  # (N, 16)
    states = text.states.to(device)  # (C, L, 384)
    empty_row = 0
    scheduler = build_train_scheduler(model_config)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    _to(unet, device).train()
    ema = EMA(unet, config.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.01)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)
    started = time.monotonic()
    losses: list[float] = []
    step = 0
    progress = tqdm(range(config.steps), desc="pretrain", unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config, time.monotonic() - started)
        index = torch.randint(0, len(images), (config.batch_size,), device=device, generator=generator)
        x0 = images[index]
        uniform = torch.rand(config.batch_size, len(OPEN_KINDS), device=device, generator=generator)
        rows = image_prompt_rows[index, named_subset_indices(uniform, config.attribute_dropout)]
        dropped = torch.rand(config.batch_size, device=device, generator=generator) < config.caption_dropout
        rows = torch.where(dropped, torch.full_like(rows, empty_row), rows)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        t = torch.randint(0, model_config.num_train_timesteps, (config.batch_size,), device=device, generator=generator)
        alpha = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        with autocast:
            prediction = unet(x_t, t, encoder_hidden_states=states[rows]).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.update(unet)
        if step % 25 == 0 or step == config.steps - 1:
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s:
            logger.info("time budget of %.0f s reached after %d steps", config.time_budget_s, step + 1)
            break
    progress.close()
    wall = time.monotonic() - started
    figures = {
        "train_steps": float(step + 1),
        "train_wall_s": round(wall, 1),
        "s_per_step": round(wall / (step + 1), 4),
        "final_loss": round(float(np.mean(losses[-8:])), 5) if losses else float("nan"),
        "train_images": float(len(images)),
    }
    return ema.shadow, figures


@torch.no_grad()
def sample_for(
    unet: UNet2DConditionModel,
    model_config: BaseModelConfig,
    text: CaptionStates,
    captions: Sequence[str],
    seeds: Sequence[int],
    config: PretrainConfig,
    batch_size: int = 256,
) -> np.ndarray:
    """uint8 (len(captions), H, W, 3): captions[i] sampled with seeds[i], in batches."""
    device = torch.device(config.device)
    _to(unet, device).eval()
    uncond = text.states[:1].to(device)
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        states = text.states[text.rows(chunk)].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16):
            images = sample_images(
                unet_noise_fn(unet),
                states,
                SamplerConfig(
                    kind="ddim",
                    spacing=SERVING_SAMPLER.spacing,
                    steps=config.sample_steps,
                    guidance_scale=config.guidance_scale,
                ),
                seed=list(seeds[start : start + batch_size]),
                config=model_config,
                uncond_states=uncond,
            )
        out.append(images)
    return np.concatenate(out)


def evaluate_heldout(
    unet: UNet2DConditionModel,
    classifier: AttributeClassifier,
    model_config: BaseModelConfig,
    text: CaptionStates,
    heldout: Sequence[Attributes],
    config: PretrainConfig,
) -> dict[str, float]:
    """Attribute accuracy (per kind) of samples for held-out captions, as read by the classifier."""
    chosen = list(heldout[: config.eval_captions] if config.eval_captions else heldout)
    targets = [attrs for attrs in chosen for _ in range(config.eval_seeds)]
    seeds = [10_000 + row for row in range(len(targets))]
    samples = sample_for(unet, model_config, text, [a.prompt() for a in targets], seeds, config)
    classifier.to("cpu")
    return attribute_accuracy(classifier, samples, targets)


def garment_prompt(garment: str) -> str:
    """The prompt that names only the garment ("a t-shirt"): every other kind is left open."""
    return f"a {garment}"


def evaluate_open_spread(
    unet: UNet2DConditionModel,
    classifier: AttributeClassifier,
    model_config: BaseModelConfig,
    text: CaptionStates,
    config: PretrainConfig,
) -> dict[str, dict[str, float]]:
    """For each garment-only prompt, what ``config.open_seeds`` seeds of it draw, as the classifier reads them.

    Per garment: the garment accuracy, and for each open kind the number of its values that appear and the
    normalised entropy of their shares (1 = every value equally often, 0 = always the same one).
    """
    captions = [garment_prompt(garment) for garment in GARMENTS for _ in range(config.open_seeds)]
    seeds = [20_000 + row for row in range(len(captions))]
    samples = sample_for(unet, model_config, text, captions, seeds, config)
    classifier.to("cpu")
    predictions = classifier.predict(samples)
    spread: dict[str, dict[str, float]] = {}
    for g, garment in enumerate(GARMENTS):
        rows = predictions[g * config.open_seeds : (g + 1) * config.open_seeds]
        figures = {"garment_accuracy": float(np.mean([row["garment"] == garment for row in rows]))}
        for kind in OPEN_KINDS:
            values = ATTRIBUTE_KINDS[kind]
            counts = np.array([sum(row[kind] == value for row in rows) for value in values], dtype=float)
            shares = counts[counts > 0] / counts.sum()
            figures[f"{kind}_values"] = float((counts > 0).sum())
            figures[f"{kind}_entropy"] = round(float(-(shares * np.log(shares)).sum() / np.log(len(values))), 3)
        spread[garment] = figures
    return spread


def sample_grid(
    unet: UNet2DConditionModel,
    model_config: BaseModelConfig,
    text: CaptionStates,
    rows: Sequence[Attributes],
    config: PretrainConfig,
    scale: int = 2,
) -> np.ndarray:
    """A labelled grid, rows = captions, columns = seeds: uint8 (H, W, 3)."""
    return prompt_grid(unet, model_config, text, [attrs.prompt() for attrs in rows], config.grid_seeds, config, scale)


def prompt_grid(
    unet: UNet2DConditionModel,
    model_config: BaseModelConfig,
    text: CaptionStates,
    prompts: Sequence[str],
    columns: int,
    config: PretrainConfig,
    scale: int = 2,
) -> np.ndarray:
    """A labelled grid, rows = prompts, columns = seeds 0, 1, ...: uint8 (H, W, 3)."""
    captions = [prompt for prompt in prompts for _ in range(columns)]
    seeds = [seed for _ in prompts for seed in range(columns)]
    samples = sample_for(unet, model_config, text, captions, seeds, config)
    tile = model_config.sample_size * scale
    label_width = 300
    grid = Image.new("RGB", (label_width + tile * columns, tile * len(prompts)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        draw.text((6, r * tile + tile // 2 - 6), prompt, fill=(0, 0, 0))
        for c in range(columns):
            image = Image.fromarray(samples[r * columns + c]).resize((tile, tile), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + c * tile, r * tile))
    return np.asarray(grid)


def open_prompt_grid(
    unet: UNet2DConditionModel, model_config: BaseModelConfig, text: CaptionStates, config: PretrainConfig
) -> np.ndarray:
    """Garment-only prompts (rows) across seeds (columns): what the model fills in when a prompt leaves it open."""
    prompts = [garment_prompt(garment) for garment in GARMENTS]
    return prompt_grid(unet, model_config, text, prompts, config.open_grid_seeds, config)


def pretrain(
    model_config: BaseModelConfig,
    config: PretrainConfig,
    text: CaptionStates,
    base_model: Path | None = None,
    resume: Path | None = None,
) -> PretrainResult:
    """Train the base UNet and the attribute classifier and measure held-out caption accuracy.

    The UNet starts from ``resume`` (a checkpoint folder this module saved), else from ``base_model`` (a diffusers
    folder, adapted), else from scratch.
    """
    split = split_catalog()
    torch.manual_seed(config.seed)
    if resume:
        unet = load_base_unet(resume).requires_grad_(True)
    elif base_model:
        unet = load_pretrained_unet(base_model, model_config)
    else:
        unet = build_unet(model_config)
    logger.info("base UNet: %.2f M parameters, %d training captions", count_parameters(unet) / 1e6, len(split.train))
    ema_unet, figures = train_unet(unet, model_config, config, split.train, text)
    classifier_config = config.classifier.with_overrides(device=config.device)
    classifier, classifier_accuracy = train_attribute_classifier(classifier_config)
    tower_config = config.reward_towers.with_overrides(image_size=model_config.sample_size)
    reward_towers, reward_figures = pretrain_reward_towers(tower_config, text, model_config.channels)
    heldout_accuracy = evaluate_heldout(ema_unet, classifier, model_config, text, split.heldout, config)
    grid_rows = _diverse(split.heldout, config.grid_captions)
    grid = sample_grid(ema_unet, model_config, text, grid_rows, config)
    open_spread = evaluate_open_spread(ema_unet, classifier, model_config, text, config)
    open_grid = open_prompt_grid(ema_unet, model_config, text, config)
    metrics: dict[str, Any] = {
        **figures,
        "parameters": count_parameters(ema_unet),
        "heldout_captions": len(split.heldout),
        "eval_samples": (config.eval_captions or len(split.heldout)) * config.eval_seeds,
        "heldout_accuracy": heldout_accuracy,
        "eval_sampler": f"DDIM {config.sample_steps} steps, guidance {config.guidance_scale}",
        "classifier_accuracy_on_renders": classifier_accuracy,
        "reward_towers": reward_figures,
        "attribute_dropout": config.attribute_dropout,
        "open_seeds": config.open_seeds,
        "open_spread": open_spread,
    }
    logger.info("held-out caption accuracy of samples: %s", heldout_accuracy)
    return PretrainResult(
        unet=ema_unet.cpu().float(),
        classifier=classifier.cpu(),
        reward_towers=reward_towers,
        metrics=metrics,
        grid=grid,
        open_grid=open_grid,
    )


def evaluate_checkpoint(
    folder: Path, config: PretrainConfig, text: CaptionStates
) -> tuple[PretrainResult, dict[str, Any]]:
    """Measure a saved checkpoint again (e.g. with another sampler or guidance scale); returns (result, provenance).

    Training figures and provenance come from the checkpoint's report.json; accuracy and grid are new.
    """
    report = json.loads((folder / REPORT_FILE).read_text())
    unet = load_base_unet(folder)
    model_config = base_model_config(folder)
    classifier = load_component(folder, CLASSIFIER_COMPONENT, build_attribute_classifier)
    if not isinstance(classifier, AttributeClassifier):
        raise ConfigError(f"{folder}/{CLASSIFIER_COMPONENT} did not build an AttributeClassifier")
    classifier.eval()
    split = split_catalog()
    heldout_accuracy = evaluate_heldout(unet, classifier, model_config, text, split.heldout, config)
    grid = sample_grid(unet, model_config, text, _diverse(split.heldout, config.grid_captions), config)
    open_grid = open_prompt_grid(unet, model_config, text, config)
    metrics = {
        **report["metrics"],
        "heldout_accuracy": heldout_accuracy,
        "eval_samples": (config.eval_captions or len(split.heldout)) * config.eval_seeds,
        "eval_sampler": f"DDIM {config.sample_steps} steps, guidance {config.guidance_scale}",
        "open_seeds": config.open_seeds,
        "open_spread": evaluate_open_spread(unet, classifier, model_config, text, config),
    }
    report["metrics"] = metrics
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    save_grids(folder, grid, open_grid)
    result = PretrainResult(
        unet=unet, classifier=classifier, reward_towers=None, metrics=metrics, grid=grid, open_grid=open_grid
    )
    return result, report["provenance"]


def _diverse(items: Sequence[Attributes], count: int) -> list[Attributes]:
    """Up to ``count`` items, preferring a garment and a colour not chosen yet."""
    chosen: list[Attributes] = []
    for attrs in items:
        if len(chosen) == count:
            break
        if all(attrs.garment != c.garment and attrs.colour != c.colour for c in chosen):
            chosen.append(attrs)
    chosen += [attrs for attrs in items if attrs not in chosen][: count - len(chosen)]
    return chosen


def save_pretrain_result(
    result: PretrainResult,
    out: Path,
    model_config: BaseModelConfig,
    config: PretrainConfig,
    provenance: dict[str, Any],
    built: bool,
) -> None:
    """unet/ and attribute_classifier/ components, report.json and samples.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    unet_config = {**unet_component_config(model_config, result.unet, built), "provenance": provenance}
    save_component(out, UNET_COMPONENT, result.unet, unet_config)
    save_component(out, CLASSIFIER_COMPONENT, result.classifier, result.classifier.config.to_dict())
    if result.reward_towers is not None:
        save_reward_towers(out, result.reward_towers, result.metrics.get("reward_towers", {}))
    report = {"metrics": result.metrics, "provenance": provenance, "pretrain_config": _jsonable(config.model_dump())}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    save_grids(out, result.grid, result.open_grid)


def save_grids(folder: Path, grid: np.ndarray, open_grid: np.ndarray) -> None:
    Image.fromarray(grid).save(folder / SAMPLES_FILE)
    Image.fromarray(open_grid).save(folder / OPEN_SAMPLES_FILE)


def _to(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Module.to through the plain torch signature (diffusers' wrapper of ``to`` confuses type checkers)."""
    return module.to(device)


def _jsonable(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _jsonable(v) for k, v in values.items()}
    if isinstance(values, list | tuple):
        return [_jsonable(v) for v in values]
    return values
