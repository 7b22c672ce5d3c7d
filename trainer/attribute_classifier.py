"""Training of the attribute classifier on catalog renders.

The classifier is a measuring instrument for generated images, so it sees every catalog item (held-out captions
included) under many render seeds, with noise and small shifts so that it reads imperfect samples too. Accuracy
is reported on renders with seeds it never saw.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from perfusion.attributes import ATTRIBUTE_KINDS
from perfusion.catalog import CatalogDataset, all_attributes, render_many
from perfusion.models.attribute_classifier import (
    AttributeClassifier,
    AttributeClassifierConfig,
    attribute_accuracy,
    split_blocks,
)
from perfusion.settings import Settings

logger = logging.getLogger(__name__)

# Render seeds of the validation set start here, far from the training seeds.
VALIDATION_SEED = 7_777


class ClassifierTrainingConfig(Settings):
    """How the attribute classifier is trained (a section of :class:`trainer.pretrain.PretrainConfig`)."""

    steps: int = Field(default=1200, description="optimizer steps")
    batch_size: int = Field(default=128, description="images per step")
    learning_rate: float = Field(default=2e-3, description="AdamW learning rate (cosine decay to zero)")
    variants: int = Field(default=4, description="renders (seeds) of each catalog item")
    noise_std: float = Field(default=0.08, description="largest std of Gaussian pixel noise added (in [-1, 1])")
    image_size: int = Field(default=32, description="render size in pixels")
    seed: int = Field(default=0, description="seeds renders, initialisation and batches")
    device: str = Field(default="cpu", description="torch device")


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over attribute kinds of the cross-entropy of that kind's block: logits (B, D), labels (B, kinds)."""
    blocks = split_blocks(logits)
    return sum(
        (nn.functional.cross_entropy(block, labels[:, kind]) for kind, block in enumerate(blocks)),
        start=torch.zeros((), device=logits.device),
    )


def augment(images: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and Gaussian noise with a per-image std in [0, noise_std]."""
    shift_y, shift_x = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    shifted = torch.roll(images, shifts=(shift_y, shift_x), dims=(2, 3))
    std = torch.rand(images.shape[0], 1, 1, 1, generator=generator) * noise_std
    noise = torch.randn(images.shape, generator=generator) * std
    return (shifted + noise.to(images.device)).clamp(-1, 1)


def train_attribute_classifier(
    config: ClassifierTrainingConfig, model_config: AttributeClassifierConfig | None = None
) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train on renders of every catalog item; returns the model (eval mode) and validation accuracy per kind."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    items = all_attributes()
    data = CatalogDataset(items, size=config.image_size, variants=config.variants, seed=config.seed)
    images = data.image_tensor().to(config.device)
    labels = data.labels.to(config.device)
    model = AttributeClassifier(model_config or AttributeClassifierConfig(image_size=config.image_size))
    model.to(config.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=max(config.steps, 1), pct_start=0.1
    )
    progress = tqdm(range(config.steps), desc="attribute classifier", unit="step", leave=False)
    for _step in progress:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator).to(config.device)
        batch = augment(images[index], config.noise_std, generator)
        loss = classifier_loss(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    accuracy = validate_attribute_classifier(model, config.image_size)
    logger.info("attribute classifier validation accuracy: %s", accuracy)
    return model, accuracy


def validate_attribute_classifier(model: AttributeClassifier, image_size: int, per_item: int = 1) -> dict[str, float]:
    """Accuracy per kind on renders of every catalog item with seeds unused in training."""
    items = all_attributes() * per_item
    seeds = [VALIDATION_SEED + 1_000_003 + row for row in range(len(items))]
    renders = render_many(items, seeds, size=image_size)
    accuracy = {kind: 0.0 for kind in ATTRIBUTE_KINDS}
    chunk = 512
    for start in range(0, len(items), chunk):
        part = attribute_accuracy(model, renders[start : start + chunk], items[start : start + chunk])
        for kind, value in part.items():
            accuracy[kind] += value * len(items[start : start + chunk])
    return {kind: float(np.round(total / len(items), 4)) for kind, total in accuracy.items()}
