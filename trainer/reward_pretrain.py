"""Contrastive pretraining of PerFusionRM's text and image towers on the rendered catalog (CLIP's objective).

The paper's PerFusionRM starts from CLIP: towers that already map an image and its caption close together, on which
the feature-crossing plug-ins and a few groups of feedback learn each user's taste. Trained from random weights on
the hundred-odd groups of one update, the image tower memorises those groups and ranks new ones at chance. This
module gives the towers what CLIP gives the paper's model, from the project's own data:

- every catalog caption (train split only, as for the base model) and ``variants`` renders of it;
- batches of distinct captions, so that no other row of a batch is a hidden positive;
- the symmetric InfoNCE loss of CLIP over ``exp(logit_scale) * cos(text, image)``, the score PerFusionRM uses;
- renders augmented with the attribute classifier's shifts and noise, so that the towers read imperfect samples.

What is saved is a PerFusionRM without plug-ins (component ``reward_towers``). :func:`load_pretrained_towers` copies
its text projection, image tower and scale into any PerFusionRM; the plug-ins keep their initialisation, whose zero
output layer makes the personalized model equal to the towers until it learns from feedback.

Reported: caption retrieval on renders of held-out captions (never seen in this training), top-1 and top-5 among
all held-out captions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from perfusion.catalog import CatalogDataset, split_catalog
from perfusion.checkpoints import read_component_config, read_component_state, save_component
from perfusion.errors import ConfigError
from perfusion.models.reward import PerFusionRM, RewardModelConfig
from perfusion.settings import Settings
from perfusion.text_encoder import CaptionStates, TextEncoder
from trainer.attribute_classifier import augment

logger = logging.getLogger(__name__)

REWARD_TOWERS_COMPONENT = "reward_towers"
# The parameters a PerFusionRM without plug-ins has; everything else (user tower, plug-ins) is personalisation.
TOWER_PREFIXES: tuple[str, ...] = ("text_projection.", "image_tower.", "logit_scale")
# Render seeds of the held-out retrieval check start here, away from the training renders.
RETRIEVAL_SEED = 4_242


class RewardPretrainConfig(Settings):
    """How PerFusionRM's towers are pretrained (a section of :class:`trainer.pretrain.PretrainConfig`)."""

    steps: int = Field(default=1500, ge=1, description="optimizer steps")
    batch_size: int = Field(
        default=128,
        ge=2,
        description="distinct captions (one render each) per step; at least 2, a contrastive batch needs negatives",
    )
    learning_rate: float = Field(default=1e-3, description="AdamW learning rate (cosine decay to 10%)")
    weight_decay: float = Field(default=0.05, description="AdamW weight decay")
    variants: int = Field(default=4, ge=1, description="renders (seeds) of each training caption")
    noise_std: float = Field(default=0.15, description="largest std of the Gaussian pixel noise added")
    image_size: int = Field(default=32, description="render size in pixels (the base model's sample size)")
    seed: int = Field(default=0, description="seeds renders, initialisation and batches")


def clip_loss(text: Tensor, image: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE: unit-norm text [B, D] and image [B, D] embeddings, row i of each a matching pair."""
    logits = scale * text @ image.T  # [B, B], logits[i, j] = text i against image j
    targets = torch.arange(text.shape[0], device=text.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pretrain_reward_towers(
    config: RewardPretrainConfig, text: TextEncoder | CaptionStates, image_channels: int = 3
) -> tuple[PerFusionRM, dict[str, float]]:
    """Train a PerFusionRM without plug-ins contrastively on catalog renders; returns it (eval mode) and figures.

    ``text`` gives the frozen sentence embeddings of the captions: MiniLM itself or a table exported from it.
    """
    split = split_catalog()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = CatalogDataset(split.train, size=config.image_size, variants=config.variants, seed=config.seed)
    images = data.image_tensor()  # [N, 3, H, W], N = captions * variants, caption-major
    with torch.no_grad():
        captions = text.embed(split.train_captions)  # [C, 384], row c = split.train[c]
    model = PerFusionRM(
        RewardModelConfig(personalized=False, image_size=config.image_size, image_channels=image_channels)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    # Cosine decay from the full rate to 10% of it over the steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / config.steps))
    )
    batch = min(config.batch_size, len(split.train))
    started = time.monotonic()
    losses: list[float] = []
    model.train()
    for _ in range(config.steps):
        rows = torch.randperm(len(split.train), generator=generator)[:batch]  # distinct captions
        variant = torch.randint(0, config.variants, (batch,), generator=generator)
        pixels = augment(images[rows * config.variants + variant], config.noise_std, generator)
        loss = clip_loss(model.encode_text(captions[rows]), model.encode_image(pixels), model.score_scale())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    wall = time.monotonic() - started
    figures = {
        "steps": float(config.steps),
        "train_wall_s": round(wall, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "train_captions": float(len(split.train)),
        **heldout_retrieval(model, text, config),
    }
    logger.info("reward towers: %s", figures)
    return model, figures


@torch.no_grad()
def heldout_retrieval(
    model: PerFusionRM, text: TextEncoder | CaptionStates, config: RewardPretrainConfig
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of naming a held-out render's caption among all held-out captions."""
    heldout = split_catalog().heldout
    if len(heldout) < 5:
        raise ConfigError(f"held-out retrieval needs at least 5 held-out captions, got {len(heldout)}")
    renders = CatalogDataset(heldout, size=config.image_size, variants=1, seed=RETRIEVAL_SEED).image_tensor()
    captions = model.encode_text(text.embed([attrs.caption() for attrs in heldout]))  # [H, D]
    image = model.encode_image(renders)  # [H, D]
    ranking = (image @ captions.T).argsort(dim=1, descending=True)  # [H, H], row i: captions from best to worst
    truth = torch.arange(len(heldout)).unsqueeze(1)
    return {
        "heldout_captions": float(len(heldout)),
        "heldout_retrieval_top1": float((ranking[:, :1] == truth).any(dim=1).float().mean()),
        "heldout_retrieval_top5": float((ranking[:, :5] == truth).any(dim=1).float().mean()),
    }


def save_reward_towers(folder: Path, model: PerFusionRM, figures: Mapping[str, object]) -> Path:
    if model.config.personalized:
        raise ConfigError("save the towers of a PerFusionRM without plug-ins (personalized=False)")
    return save_component(folder, REWARD_TOWERS_COMPONENT, model, {**model.config.to_dict(), "figures": figures})


def has_reward_towers(folder: Path) -> bool:
    return (Path(folder) / REWARD_TOWERS_COMPONENT).is_dir()


def load_pretrained_towers(model: PerFusionRM, folder: Path) -> PerFusionRM:
    """Copy the pretrained text projection, image tower and scale from ``folder`` into ``model``, in place."""
    saved = read_component_config(folder, REWARD_TOWERS_COMPONENT)
    for key in ("text_dim", "image_size", "image_channels", "cnn_channels", "embed_dim"):
        mine = model.config.to_dict()[key]
        if saved.get(key) != mine:
            raise ConfigError(
                f"the reward towers in {Path(folder) / REWARD_TOWERS_COMPONENT} have {key}={saved.get(key)}, this "
                f"PerFusionRM {mine}; pretrain them again for this shape (perfusion pretrain --reward-towers-only)"
            )
    state = read_component_state(folder, REWARD_TOWERS_COMPONENT)
    towers = {key: value for key, value in state.items() if key.startswith(TOWER_PREFIXES)}
    missing, unexpected = model.load_state_dict(towers, strict=False)
    tower_keys_missing = [key for key in missing if key.startswith(TOWER_PREFIXES)]
    if tower_keys_missing or unexpected:
        raise ConfigError(f"reward towers do not fit: missing {tower_keys_missing}, unexpected {unexpected}")
    return model
