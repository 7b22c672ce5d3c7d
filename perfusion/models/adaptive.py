"""The personalized adaptive network: a ControlNet on the frozen base UNet whose control signal is the user.

Built on diffusers' ``ControlNetModel.from_unet``: a trainable copy of the base UNet's conv_in, time embedding,
down blocks and mid block, whose outputs leave through zero-initialised 1x1 convolutions and enter the frozen
UNet as ``down_block_additional_residuals`` / ``mid_block_additional_residual``.

Where the user enters: g(u) is an MLP of the user vector u to ``condition_channels`` values, broadcast over the
image plane into a constant map [B, condition_channels, H, W]. That map is the ControlNet's ``controlnet_cond``:
its conditioning embedding (conv 3x3, SiLU, zero-initialised conv 3x3, no downsampling because the UNet works in
pixel space) turns it into features added right after the copy's conv_in. Text states and the timestep reach the
copy exactly as they reach the base UNet.

Zero-init property: every path from the copy into the base UNet ends in a zero-initialised convolution, so at
initialisation all residuals are exactly 0 and base + adaptive equals the base model bit for bit. The first
optimiser step moves only those output convolutions, the second also everything before them.

Where this departs from ControlNet: ControlNet also zero-initialises the last convolution of its conditioning
embedding. With two zero layers in a row, the residuals' dependence on the user is the product of two weights that
both start at 0, so it grows with the square of the training steps while the part common to every user grows
linearly, and a network trained for tens of steps (one incremental update) can only learn one shift for everybody.
Here that convolution starts from small random weights (``condition_init_std``), so the user enters the copy from
the start and the output convolutions can learn user-dependent residuals at first order. Set it to 0 for
ControlNet's init. (At the evaluation's data sizes this alone did not make the network personalise; see
docs/results.md.)

The reference model of the preference objectives is the frozen base UNet with no user input:
``personalized_noise_prediction(unet, None, ...)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

# Imported from their modules: under mypy, the package root resolves these names to diffusers' dummy objects.
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor, nn

from perfusion.errors import ConfigError, PerfusionError
from perfusion.user_features import USER_DIM


class AdaptiveInputError(PerfusionError):
    """Tensors handed to the adaptive network do not match its config or the UNet's input."""


@dataclass(frozen=True)
class AdaptiveConfig:
    """Shape of the personalized adaptive network (the rest of its shape is copied from the base UNet)."""

    user_dim: int = field(default=USER_DIM, metadata={"help": "length of the user vector u"})
    condition_hidden: int = field(default=128, metadata={"help": "hidden width of the user condition MLP g(u)"})
    condition_channels: int = field(default=8, metadata={"help": "channels of the user condition map"})
    conditioning_embedding_channels: int = field(
        default=16, metadata={"help": "hidden channels of ControlNet's conditioning embedding (one conv stage)"}
    )
    conditioning_scale: float = field(default=1.0, metadata={"help": "multiplier on every residual at inference"})
    condition_init_std: float = field(
        default=0.02,
        metadata={
            "help": "std of the initial weights of the conditioning embedding's last convolution (0: zero-init as "
            "in ControlNet, which makes the user's effect second order in the training steps)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("user_dim", "condition_hidden", "condition_channels", "conditioning_embedding_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.conditioning_scale < 0:
            raise ConfigError(f"conditioning_scale must be >= 0, got {self.conditioning_scale}")
        if self.condition_init_std < 0:
            raise ConfigError(f"condition_init_std must be >= 0, got {self.condition_init_std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdaptiveConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown adaptive network config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class AdaptiveResiduals:
    """What the adaptive network adds to the frozen UNet."""

    down: tuple[Tensor, ...]  # one per UNet skip connection, [B, C_i, H_i, W_i]
    mid: Tensor  # [B, C_mid, H_mid, W_mid]


def freeze_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Freeze the base UNet in place (no gradients, eval mode) and return it."""
    unet.requires_grad_(False)
    unet.eval()
    return unet


class AdaptiveNetwork(nn.Module):
    """g(u) plus a ControlNet copy of ``unet``; ``forward`` returns the residuals for the frozen UNet.

    ``copy_unet_weights=False`` allocates the same modules without copying (for loading a saved version with
    ``load_state_dict``); the zero convolutions are zero either way.
    """

    def __init__(
        self, unet: UNet2DConditionModel, config: AdaptiveConfig | None = None, copy_unet_weights: bool = True
    ) -> None:
        super().__init__()
        self.config = config or AdaptiveConfig()
        self.sample_size = int(unet.config["sample_size"])
        self.in_channels = int(unet.config["in_channels"])
        self.user_condition = nn.Sequential(
            nn.Linear(self.config.user_dim, self.config.condition_hidden),
            nn.SiLU(),
            nn.Linear(self.config.condition_hidden, self.config.condition_channels),
        )
        self.controlnet = ControlNetModel.from_unet(
            unet,
            # A single stage: no stride-2 convolutions, the map stays at the UNet's input resolution.
            conditioning_embedding_out_channels=(self.config.conditioning_embedding_channels,),
            load_weights_from_unet=copy_unet_weights,
            conditioning_channels=self.config.condition_channels,
        )
        if self.config.condition_init_std > 0:
            # The user's way into the copy; the residuals stay exactly 0 (zero output convolutions) until trained.
            nn.init.normal_(
                self.controlnet.controlnet_cond_embedding.conv_out.weight, std=self.config.condition_init_std
            )

    def user_condition_map(self, user_vectors: Tensor, height: int, width: int) -> Tensor:
        """g(u) as a constant map [B, condition_channels, height, width] from user vectors [B, user_dim]."""
        if user_vectors.dim() != 2 or user_vectors.shape[1] != self.config.user_dim:
            raise AdaptiveInputError(
                f"user_vectors must have shape (B, {self.config.user_dim}), got {tuple(user_vectors.shape)}"
            )
        condition = self.user_condition(user_vectors)  # [B, condition_channels]
        return condition[:, :, None, None].expand(-1, -1, height, width)

    def forward(self, x_t: Tensor, t: Tensor, text_states: Tensor, user_vectors: Tensor) -> AdaptiveResiduals:
        """Residuals for noised images x_t [B, C, H, W] at timesteps t [B] (or scalar), text states [B, L, D]."""
        if user_vectors.shape[0] != x_t.shape[0]:
            raise AdaptiveInputError(
                f"user_vectors must have one row per image ({x_t.shape[0]}), got {user_vectors.shape[0]}"
            )
        condition_map = self.user_condition_map(user_vectors, x_t.shape[-2], x_t.shape[-1]).to(x_t.dtype)
        down, mid = self.controlnet(
            x_t,
            t,
            encoder_hidden_states=text_states,
            controlnet_cond=condition_map,
            conditioning_scale=self.config.conditioning_scale,
            return_dict=False,
        )
        return AdaptiveResiduals(down=tuple(down), mid=mid)


def personalized_noise_prediction(
    unet: UNet2DConditionModel,
    adaptive: AdaptiveNetwork | None,
    x_t: Tensor,
    t: Tensor,
    text_states: Tensor,
    user_vectors: Tensor | None,
) -> Tensor:
    """eps predicted for x_t [B, C, H, W] at t [B]; without ``adaptive`` or users: the plain base UNet (reference).

    ``text_states`` are the text encoder's token states [B, L, cross_attention_dim].
    """
    if x_t.dim() != 4 or text_states.shape[0] != x_t.shape[0]:
        raise AdaptiveInputError(
            f"x_t must be [B, C, H, W] and text_states [B, L, D] with the same B; got {tuple(x_t.shape)} "
            f"and {tuple(text_states.shape)}"
        )
    if adaptive is None or user_vectors is None:
        prediction: Tensor = unet(x_t, t, encoder_hidden_states=text_states, return_dict=False)[0]
        return prediction
    residuals = adaptive(x_t, t, text_states, user_vectors)
    prediction = unet(
        x_t,
        t,
        encoder_hidden_states=text_states,
        down_block_additional_residuals=residuals.down,
        mid_block_additional_residual=residuals.mid,
        return_dict=False,
    )[0]
    return prediction


def count_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def load_adaptive_weights_in_place(adaptive: AdaptiveNetwork, state_dict: dict[str, Tensor]) -> None:
    """Swap a new version's weights into an allocated network (shapes fixed; strict: every key must match)."""
    expected = adaptive.state_dict()
    mismatched = sorted(
        name for name, tensor in state_dict.items() if name in expected and expected[name].shape != tensor.shape
    )
    if mismatched:
        raise AdaptiveInputError(
            f"adaptive weights do not fit the allocated network (shapes differ for {mismatched[:3]}); "
            "the new version was built for another base UNet or AdaptiveConfig, so rebuild the network instead"
        )
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise AdaptiveInputError(
            f"adaptive weights do not name the allocated network's tensors (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); load a checkpoint saved from an AdaptiveNetwork with the same config"
        )
    with torch.no_grad():
        adaptive.load_state_dict(state_dict, strict=True)
