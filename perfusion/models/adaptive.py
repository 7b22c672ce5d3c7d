"""The personalized adaptive network: how the user vector u enters the frozen base UNet.

Three forms, one class (:class:`AdaptiveConfig` ``user_pathway``); in every form the base UNet stays frozen and at
initialisation base + adaptive equals the base model bit for bit.

- ``copy_tokens`` (default, the paper's architecture): u becomes ``user_tokens`` tokens (an MLP of u to
  n x cross_attention_dim) appended to the text tokens of a ControlNet-style trainable copy of the base UNet's
  conv_in, time embedding, down blocks and mid block (diffusers' ``ControlNetModel.from_unet``). The copy's outputs
  leave through zero-initialised 1x1 convolutions and enter the frozen UNet as
  ``down_block_additional_residuals`` / ``mid_block_additional_residual``, so they are exactly 0 at
  initialisation.
- ``base_tokens`` (as PPD, arXiv 2501.06655, injects user embeddings; no copy): the tokens enter the frozen
  base's own cross-attention as a second, decoupled attention (IP-Adapter's form) through the base's own frozen
  projections: ``attn(q, text) + attn(q, user tokens)``. The token MLP's last layer starts at zero, so the user
  attention's values W_v * 0 = 0 and its output is exactly 0; only the MLP trains.
- ``condition_map``: g(u), an MLP of u to ``condition_channels`` values, broadcast over the image plane into a
  constant map [B, condition_channels, H, W]: the ControlNet's ``controlnet_cond``, whose conditioning embedding
  (conv 3x3, SiLU, conv 3x3, no downsampling: the UNet works in pixel space) adds it to the copy's features right
  after conv_in.

Which form PerFusion trains and serves is decided on the evaluation's validation panel; docs/results.md states it.

Where this departs from ControlNet: ControlNet zero-initialises the last layer that brings its condition in as well
as the output convolutions. With two zero layers in a row, the residuals' dependence on the user is the product of
two weights that both start at 0, so it grows with the square of the training steps while the part common to every
user grows linearly, and an update of tens of steps can only learn one shift for everybody. In the two forms with
a copy, that last layer (the token MLP's last linear layer, or the conditioning embedding's last convolution)
starts from small random weights (``condition_init_std``), so u reaches the copy from the start and the output
convolutions learn user-dependent residuals at first order; identity at initialisation still holds through the
zero output convolutions. Set it to 0 for ControlNet's init. ``base_tokens`` has no such second zero layer: the
gradient reaches its MLP's zero last layer through the frozen value projection at the first step.

The reference model of the preference objectives is the frozen base UNet with no user input:
``personalized_noise_prediction(unet, None, ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F

# Imported from their modules: under mypy, the package root resolves these names to diffusers' dummy objects.
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator
from torch import Tensor, nn

from perfusion.errors import PerfusionError
from perfusion.frozen_config import FrozenConfig
from perfusion.models.user_pathways import LEGACY_USER_PATHWAY, USER_PATHWAYS, UserPathway
from perfusion.user_features import USER_DIM


class AdaptiveInputError(PerfusionError):
    """Tensors handed to the adaptive network do not match its config or the UNet's input."""


class AdaptiveConfig(FrozenConfig):
    """Shape of the personalized adaptive network (the rest of its shape is copied from the base UNet)."""

    saved_name: ClassVar[str] = "adaptive network config"

    user_dim: int = Field(default=USER_DIM, ge=1, description="length of the user vector u")
    user_pathway: UserPathway = Field(
        default="copy_tokens",
        description="where u enters: copy_tokens (user tokens in the trainable copy's cross-attention, residuals "
        "into the frozen base), base_tokens (user tokens in the frozen base's cross-attention, no copy), "
        "condition_map (a constant map g(u) into the copy's conditioning embedding)",
    )
    user_tokens: int = Field(default=4, ge=1, description="tokens u becomes in the two token pathways")
    condition_hidden: int = Field(default=128, ge=1, description="hidden width of the MLP of u (tokens or map)")
    condition_channels: int = Field(default=8, ge=1, description="channels of the user condition map")
    conditioning_embedding_channels: int = Field(
        default=16, ge=1, description="hidden channels of ControlNet's conditioning embedding (one conv stage)"
    )
    conditioning_scale: float = Field(default=1.0, ge=0.0, description="multiplier on every residual at inference")
    condition_init_std: float = Field(
        default=0.02,
        ge=0.0,
        description="std of the initial weights of the last layer that brings u into the copy (the token MLP's "
        "last layer, or the conditioning embedding's last convolution); 0: zero-init as in ControlNet, which "
        "makes the user's effect second order in the training steps. base_tokens always starts at 0",
    )

    @field_validator("user_pathway", mode="wrap")
    @classmethod
    def _known_pathway(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"user_pathway must be one of {', '.join(USER_PATHWAYS)}; got {value!r}") from None

    @property
    def uses_copy(self) -> bool:
        """Whether the network holds a ControlNet-style trainable copy (every pathway but base_tokens)."""
        return self.user_pathway != "base_tokens"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """A saved config; one saved without ``user_pathway`` is in the form trained before the field existed."""
        return super().from_dict({"user_pathway": LEGACY_USER_PATHWAY, **values})


@dataclass(frozen=True)
class AdaptiveResiduals:
    """What the adaptive network adds to the frozen UNet: residuals (forms with a copy) or user tokens (base_tokens)."""

    down: tuple[Tensor, ...] | None = None  # one per UNet skip connection, [B, C_i, H_i, W_i]
    mid: Tensor | None = None  # [B, C_mid, H_mid, W_mid]
    base_user_tokens: Tensor | None = None  # [B, n, cross_attention_dim], for the base's cross-attention


def freeze_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Freeze the base UNet in place (no gradients, eval mode) and return it."""
    unet.requires_grad_(False)
    unet.eval()
    return unet


class UserTokenAttnProcessor(AttnProcessor2_0):
    """diffusers' scaled-dot-product attention, plus a decoupled attention over user tokens in cross-attention.

    Without ``user_tokens`` (or in self-attention) it is ``AttnProcessor2_0`` exactly, so installing it leaves the
    base model unchanged. With tokens [B, n, D] a cross-attention layer returns

        to_out(attn(q, K_text, V_text)) + W_out attn(q, to_k(tokens), to_v(tokens))

    which is IP-Adapter's decoupled form with the layer's own (frozen) projections; zero tokens add exactly 0.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        user_tokens: Tensor | None = None,
    ) -> Tensor:
        output: Tensor = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if user_tokens is None or not attn.is_cross_attention:
            return output
        if hidden_states.dim() != 3 or attn.residual_connection or attn.group_norm is not None:
            raise AdaptiveInputError(
                "user tokens enter transformer-block cross-attention only ([B, HW, C] states, no residual or group "
                f"norm inside the attention); got states of shape {tuple(hidden_states.shape)}"
            )
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)  # [B, HW, inner]
        key = attn.to_k(user_tokens.to(query.dtype))  # [B, n, inner]
        value = attn.to_v(user_tokens.to(query.dtype))
        head_dim = key.shape[-1] // attn.heads

        def heads(x: Tensor) -> Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, S, head_dim]

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        user_attention = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        user_attention = user_attention.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        # The output projection's weight without its bias: the text branch already added the bias once.
        return output + F.linear(user_attention, attn.to_out[0].weight) / attn.rescale_output_factor


def install_user_token_attention(unet: UNet2DConditionModel) -> None:
    """Give every attention layer of ``unet`` a :class:`UserTokenAttnProcessor` (unchanged output without tokens).

    Cheap when already done (a look at the first attention layer): it runs before every forward with user tokens.
    """
    first = next((module for module in unet.modules() if isinstance(module, Attention)), None)
    if first is None or not isinstance(first.processor, UserTokenAttnProcessor):
        unet.set_attn_processor(UserTokenAttnProcessor())


class AdaptiveNetwork(nn.Module):
    """The user's way into ``unet`` in the form ``config.user_pathway`` names; ``forward`` returns what to add.

    ``copy_unet_weights=False`` allocates the same modules without copying (for loading a saved version with
    ``load_state_dict``); the zero convolutions and zero layers are zero either way. In the base_tokens form the
    network installs :class:`UserTokenAttnProcessor` on ``unet`` (the frozen base, unchanged without tokens).
    """

    def __init__(
        self, unet: UNet2DConditionModel, config: AdaptiveConfig | None = None, copy_unet_weights: bool = True
    ) -> None:
        super().__init__()
        self.config = config or AdaptiveConfig()
        self.sample_size = int(unet.config["sample_size"])
        self.in_channels = int(unet.config["in_channels"])
        self.token_dim = int(unet.config["cross_attention_dim"])
        pathway = self.config.user_pathway
        self.user_condition: nn.Sequential | None = None
        self.user_tokens: nn.Sequential | None = None
        self.controlnet: ControlNetModel | None = None
        if pathway == "condition_map":
            self.user_condition = _mlp(
                self.config.user_dim, self.config.condition_hidden, self.config.condition_channels
            )
        else:
            self.user_tokens = _mlp(
                self.config.user_dim, self.config.condition_hidden, self.config.user_tokens * self.token_dim
            )
            last = self.user_tokens[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.bias)
            if pathway == "copy_tokens" and self.config.condition_init_std > 0:
                nn.init.normal_(last.weight, std=self.config.condition_init_std)
            else:
                nn.init.zeros_(last.weight)  # base_tokens: zero tokens, so the user attention adds exactly 0
        if self.config.uses_copy:
            self.controlnet = ControlNetModel.from_unet(
                unet,
                # A single stage: no stride-2 convolutions, the map stays at the UNet's input resolution.
                conditioning_embedding_out_channels=(self.config.conditioning_embedding_channels,),
                load_weights_from_unet=copy_unet_weights,
                # copy_tokens feeds a zero map: its conditioning embedding is a learnable constant, zero at start.
                conditioning_channels=self.config.condition_channels if pathway == "condition_map" else 1,
            )
            if pathway == "condition_map" and self.config.condition_init_std > 0:
                # The user's way into the copy; the residuals stay exactly 0 (zero output convolutions) until trained.
                nn.init.normal_(
                    self.controlnet.controlnet_cond_embedding.conv_out.weight, std=self.config.condition_init_std
                )
        else:
            install_user_token_attention(unet)

    def _check_users(self, user_vectors: Tensor) -> None:
        if user_vectors.dim() != 2 or user_vectors.shape[1] != self.config.user_dim:
            raise AdaptiveInputError(
                f"user_vectors must have shape (B, {self.config.user_dim}), got {tuple(user_vectors.shape)}"
            )

    def user_condition_map(self, user_vectors: Tensor, height: int, width: int) -> Tensor:
        """g(u) as a constant map [B, condition_channels, height, width] from user vectors [B, user_dim]."""
        self._check_users(user_vectors)
        if self.user_condition is None:
            raise AdaptiveInputError(f"the {self.config.user_pathway} pathway has no condition map")
        condition = self.user_condition(user_vectors)  # [B, condition_channels]
        return condition[:, :, None, None].expand(-1, -1, height, width)

    def user_token_states(self, user_vectors: Tensor) -> Tensor:
        """The user tokens [B, user_tokens, cross_attention_dim] from user vectors [B, user_dim]."""
        self._check_users(user_vectors)
        if self.user_tokens is None:
            raise AdaptiveInputError(f"the {self.config.user_pathway} pathway has no user tokens")
        tokens: Tensor = self.user_tokens(user_vectors)
        return tokens.view(user_vectors.shape[0], self.config.user_tokens, self.token_dim)

    def forward(self, x_t: Tensor, t: Tensor, text_states: Tensor, user_vectors: Tensor) -> AdaptiveResiduals:
        """What to add for noised images x_t [B, C, H, W] at timesteps t [B] (or scalar), text states [B, L, D]."""
        if user_vectors.shape[0] != x_t.shape[0]:
            raise AdaptiveInputError(
                f"user_vectors must have one row per image ({x_t.shape[0]}), got {user_vectors.shape[0]}"
            )
        if self.controlnet is None:  # base_tokens
            return AdaptiveResiduals(base_user_tokens=self.user_token_states(user_vectors).to(text_states.dtype))
        if self.config.user_pathway == "condition_map":
            condition_map = self.user_condition_map(user_vectors, x_t.shape[-2], x_t.shape[-1]).to(x_t.dtype)
            copy_context = text_states
        else:
            condition_map = x_t.new_zeros(x_t.shape[0], 1, x_t.shape[-2], x_t.shape[-1])
            tokens = self.user_token_states(user_vectors).to(text_states.dtype)
            copy_context = torch.cat([text_states, tokens], dim=1)  # [B, L + n, D]
        down, mid = self.controlnet(
            x_t,
            t,
            encoder_hidden_states=copy_context,
            controlnet_cond=condition_map,
            conditioning_scale=self.config.conditioning_scale,
            return_dict=False,
        )
        return AdaptiveResiduals(down=tuple(down), mid=mid)


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, outputs))


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
    added = adaptive(x_t, t, text_states, user_vectors)
    if added.base_user_tokens is not None:
        install_user_token_attention(unet)  # a no-op on the UNet the network was built on
    prediction = unet(
        x_t,
        t,
        encoder_hidden_states=text_states,
        down_block_additional_residuals=added.down,
        mid_block_additional_residual=added.mid,
        cross_attention_kwargs=None if added.base_user_tokens is None else {"user_tokens": added.base_user_tokens},
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
