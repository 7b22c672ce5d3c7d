"""A small CNN that reads garment attributes from pixels; its per-kind softmax blocks are the image descriptor.

The output layout is that of :mod:`perfusion.attributes`: one logit block per attribute kind, in
ATTRIBUTE_KINDS order, DESCRIPTOR_DIM logits in all. It is trained on catalog renders (``trainer/``) and used to
describe generated images and to measure how well the base model follows captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from perfusion.attributes import ATTRIBUTE_KINDS, DESCRIPTOR_DIM, Attributes
from perfusion.errors import ConfigError
from perfusion.frozen_config import FrozenConfig

BLOCK_SIZES: tuple[int, ...] = tuple(len(values) for values in ATTRIBUTE_KINDS.values())


class AttributeClassifierConfig(FrozenConfig):
    """Shape of the attribute classifier."""

    saved_name: ClassVar[str] = "attribute classifier config"

    image_size: int = Field(default=32, description="input image side in pixels")
    channels: tuple[int, ...] = Field(default=(16, 32, 64), description="conv widths, one per 2x downsample")


class AttributeClassifier(nn.Module):
    """(B, 3, H, W) images in [-1, 1] -> (B, DESCRIPTOR_DIM) logits, one block per attribute kind."""

    def __init__(self, config: AttributeClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_channels = 3
        for width in config.channels:
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(in_channels * 4, DESCRIPTOR_DIM))
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(images)))

    @torch.no_grad()
    def descriptors(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Concatenated per-kind softmax: (B, DESCRIPTOR_DIM), each block sums to one."""
        was_training = self.training
        self.eval()
        logits = self(_as_model_input(images, self._device()))
        self.train(was_training)
        return torch.cat([block.softmax(dim=-1) for block in split_blocks(logits)], dim=-1)

    def predict(self, images: torch.Tensor | np.ndarray) -> list[dict[str, str]]:
        """The most probable label of each kind for each image."""
        probabilities = self.descriptors(images)
        labels = [block.argmax(dim=-1).tolist() for block in split_blocks(probabilities)]
        kinds = list(ATTRIBUTE_KINDS.items())
        return [{kind: values[labels[k][row]] for k, (kind, values) in enumerate(kinds)} for row in range(len(images))]

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def build_attribute_classifier(config: dict[str, Any]) -> AttributeClassifier:
    """Builder for checkpoints.load_component."""
    return AttributeClassifier(AttributeClassifierConfig.from_dict(config))


def split_blocks(values: torch.Tensor) -> list[torch.Tensor]:
    """(B, DESCRIPTOR_DIM) -> one (B, len(values of kind)) tensor per kind, in ATTRIBUTE_KINDS order."""
    if values.shape[-1] != DESCRIPTOR_DIM:
        raise ConfigError(f"expected {DESCRIPTOR_DIM} values in the last dimension, got {values.shape[-1]}")
    return list(values.split(BLOCK_SIZES, dim=-1))


def _as_model_input(images: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) arrays become float (B, 3, H, W) in [-1, 1]; float tensors pass through."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"numpy images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
    return images.to(device)


def attribute_accuracy(
    classifier: AttributeClassifier, images: torch.Tensor | np.ndarray, targets: Sequence[Attributes]
) -> dict[str, float]:
    """Fraction of images whose predicted label equals the target, per attribute kind."""
    if len(images) != len(targets):
        raise ConfigError(f"got {len(images)} images for {len(targets)} targets; pass one target per image")
    predictions = classifier.predict(images)
    return {
        kind: float(np.mean([p[kind] == getattr(t, kind) for p, t in zip(predictions, targets, strict=True)]))
        for kind in ATTRIBUTE_KINDS
    }
