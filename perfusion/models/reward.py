"""PerFusionRM: a CLIP-style dual-tower reward model with personalized feature-crossing plug-ins.

- Text tower: the frozen MiniLM sentence embedding (384-d, computed outside by the text encoder) through a
  trainable projection.
- Image tower: a small trainable CNN on images in [-1, 1], (C, H, W) from the config.
- User tower: an MLP of the user vector u (perfusion.user_features), no id embedding, so unseen users work.
- Plug-ins: DCN-v2 cross layers on [tower embedding; user embedding], ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``,
  projected back to the tower width and added to the tower embedding residually, once in each tower.
- Score: ``exp(logit_scale) * cos(text embedding, image embedding)`` with a learnable, clamped scale.

``personalized=False`` builds the same towers without user tower and plug-ins: the non-personalized baseline.
The config is stored beside the weights (config.json + model.safetensors) by the checkpoint code.
"""

from __future__ import annotations

import math
from typing import ClassVar, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from perfusion.errors import PerfusionError
from perfusion.frozen_config import FrozenConfig
from perfusion.user_features import USER_DIM

TEXT_EMBEDDING_DIM = 384  # MiniLM-L6 sentence embedding width
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)


class RewardModelConfig(FrozenConfig):
    """Shape of PerFusionRM."""

    saved_name: ClassVar[str] = "reward model config"

    personalized: bool = Field(default=True, description="inject u into both towers (False = baseline)")
    text_dim: int = Field(default=TEXT_EMBEDDING_DIM, ge=1, description="width of the frozen text embedding")
    user_dim: int = Field(default=USER_DIM, ge=1, description="length of the user vector u")
    image_size: int = Field(default=32, description="image side in pixels")
    image_channels: int = Field(default=3, ge=1, description="image channels (RGB)")
    cnn_channels: tuple[int, ...] = Field(
        default=(32, 64, 128),
        min_length=1,
        description="channels of the image CNN's stages, at least one, e.g. (32, 64, 128); each stage halves the side",
    )
    embed_dim: int = Field(default=128, ge=1, description="width of the shared text/image embedding space")
    user_embed_dim: int = Field(default=64, ge=1, description="width of the user embedding fed to the plug-ins")
    cross_layers: int = Field(default=2, ge=1, description="DCN-v2 cross layers in each plug-in")
    logit_scale_init: float = Field(default=math.log(10.0), description="initial log of the cosine scale")

    @model_validator(mode="after")
    def _stages_fit(self) -> Self:
        if self.image_size % (2 ** len(self.cnn_channels)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2^len(cnn_channels) = "
                f"{2 ** len(self.cnn_channels)}; use fewer cnn_channels or a larger image"
            )
        return self


class RewardModelInputError(PerfusionError):
    """Tensors handed to PerFusionRM do not have the shapes its config says."""


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: x_{l+1} = x_0 * (W x_l + b) + x_l, all [B, width]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x


class PersonalizedPlugin(nn.Module):
    """Crosses a tower embedding with the user embedding and adds the result back to the tower embedding."""

    def __init__(self, tower_dim: int, user_embed_dim: int, num_layers: int) -> None:
        super().__init__()
        width = tower_dim + user_embed_dim
        self.cross_layers = nn.ModuleList(CrossLayer(width) for _ in range(num_layers))
        self.output = nn.Linear(width, tower_dim)
        # Zero output, as ControlNet's zero convolutions: a new PerFusionRM equals its towers without plug-ins, so
        # pretrained towers (trainer.reward_pretrain) are not disturbed before the first feedback arrives.
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, tower_embedding: Tensor, user_embedding: Tensor) -> Tensor:
        x0 = torch.cat([tower_embedding, user_embedding], dim=-1)  # [B, tower_dim + user_embed_dim]
        x = x0
        for layer in self.cross_layers:
            x = layer(x0, x)
        return tower_embedding + self.output(x)


class ImageTower(nn.Module):
    """Strided conv stages with GroupNorm and SiLU, global average pooling, and a linear head."""

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = config.image_channels
        for channels in config.cnn_channels:
            layers += [
                nn.Conv2d(in_channels, channels, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(math.gcd(8, channels), channels),
                nn.SiLU(),
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.GroupNorm(math.gcd(8, channels), channels),
                nn.SiLU(),
            ]
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, config.embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        pooled = self.features(images).mean(dim=(2, 3))  # [B, cnn_channels[-1]]
        return self.head(pooled)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class PerFusionRM(nn.Module):
    """Scores (text, image, user) triples; higher = more likely to be clicked or ordered by that user."""

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__()
        self.config = config
        self.text_projection = _mlp(config.text_dim, config.embed_dim)
        self.image_tower = ImageTower(config)
        self.user_tower: nn.Module | None = None
        self.text_plugin: PersonalizedPlugin | None = None
        self.image_plugin: PersonalizedPlugin | None = None
        if config.personalized:
            self.user_tower = _mlp(config.user_dim, config.user_embed_dim)
            self.text_plugin = PersonalizedPlugin(config.embed_dim, config.user_embed_dim, config.cross_layers)
            self.image_plugin = PersonalizedPlugin(config.embed_dim, config.user_embed_dim, config.cross_layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    def _user_embedding(self, user_vectors: Tensor | None, batch_size: int) -> Tensor | None:
        if self.user_tower is None:
            return None
        if user_vectors is None:
            raise RewardModelInputError(
                "this PerFusionRM is personalized and needs user_vectors [B, user_dim]; pass "
                "perfusion.user_features.user_vectors(...) (an unknown user gets the neutral vector)"
            )
        if user_vectors.shape != (batch_size, self.config.user_dim):
            raise RewardModelInputError(
                f"user_vectors must have shape ({batch_size}, {self.config.user_dim}), got {tuple(user_vectors.shape)}"
            )
        embedding: Tensor = self.user_tower(user_vectors)
        return embedding

    def encode_text(self, text_embeddings: Tensor, user_vectors: Tensor | None = None) -> Tensor:
        """Unit-norm text embeddings [B, embed_dim] from frozen sentence embeddings [B, text_dim]."""
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.config.text_dim:
            raise RewardModelInputError(
                f"text_embeddings must have shape (B, {self.config.text_dim}), got {tuple(text_embeddings.shape)}"
            )
        embedding = self.text_projection(text_embeddings)
        user_embedding = self._user_embedding(user_vectors, text_embeddings.shape[0])
        if self.text_plugin is not None and user_embedding is not None:
            embedding = self.text_plugin(embedding, user_embedding)
        return F.normalize(embedding, dim=-1)

    def encode_image(self, images: Tensor, user_vectors: Tensor | None = None) -> Tensor:
        """Unit-norm image embeddings [B, embed_dim] from images [B, C, H, W] in [-1, 1]."""
        expected = (self.config.image_channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise RewardModelInputError(
                f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )
        embedding = self.image_tower(images)
        user_embedding = self._user_embedding(user_vectors, images.shape[0])
        if self.image_plugin is not None and user_embedding is not None:
            embedding = self.image_plugin(embedding, user_embedding)
        return F.normalize(embedding, dim=-1)

    def forward(self, text_embeddings: Tensor, images: Tensor, user_vectors: Tensor | None = None) -> Tensor:
        """Scores [B] for aligned rows of text embeddings [B, text_dim], images and user vectors [B, user_dim]."""
        if text_embeddings.shape[0] != images.shape[0]:
            raise RewardModelInputError(
                f"text_embeddings and images must have the same batch size, got "
                f"{text_embeddings.shape[0]} and {images.shape[0]}"
            )
        text = self.encode_text(text_embeddings, user_vectors)
        image = self.encode_image(images, user_vectors)
        return self.score_scale() * (text * image).sum(dim=-1)

    def score_scale(self) -> Tensor:
        """The factor on the cosine, exp(logit_scale) clamped as in CLIP: a scalar."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
