"""The personalized adaptive network on a tiny seeded UNet, in each of its user pathways: zero-init identity,
frozen base, what trains, in-place weight swap."""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import UNet2DConditionModel

from perfusion.errors import ConfigError
from perfusion.models.adaptive import (
    LEGACY_USER_PATHWAY,
    USER_PATHWAYS,
    AdaptiveConfig,
    AdaptiveInputError,
    AdaptiveNetwork,
    UserTokenAttnProcessor,
    count_trainable_parameters,
    freeze_unet,
    install_user_token_attention,
    load_adaptive_weights_in_place,
    personalized_noise_prediction,
)

USER_DIM = 6
TEXT_DIM = 24
SIZE = 16
CONFIG = AdaptiveConfig(
    user_dim=USER_DIM,
    user_pathway="condition_map",
    condition_hidden=16,
    condition_channels=4,
    conditioning_embedding_channels=8,
)
PATHWAY_CONFIGS = {pathway: CONFIG.with_overrides(user_pathway=pathway) for pathway in USER_PATHWAYS}


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    text_states = torch.randn(batch, 5, TEXT_DIM, generator=generator)
    users = torch.randn(batch, USER_DIM, generator=generator)
    return x_t, t, text_states, users


@pytest.mark.parametrize("pathway", USER_PATHWAYS)
def test_base_plus_adaptive_equals_base_exactly_at_initialisation(pathway: str) -> None:
    unet = freeze_unet(tiny_unet())
    adaptive = AdaptiveNetwork(unet, PATHWAY_CONFIGS[pathway])
    x_t, t, text_states, users = inputs()
    with torch.no_grad():
        base = personalized_noise_prediction(unet, None, x_t, t, text_states, None)
        personalized = personalized_noise_prediction(unet, adaptive, x_t, t, text_states, users)
        no_user = personalized_noise_prediction(unet, adaptive, x_t, t, text_states, None)
    assert base.shape == x_t.shape
    assert (personalized - base).abs().max().item() == 0.0
    assert torch.equal(no_user, base)


def test_user_token_attention_is_the_stock_processor_without_tokens() -> None:
    unet = freeze_unet(tiny_unet())
    x_t, t, text_states, _ = inputs()
    with torch.no_grad():
        before = personalized_noise_prediction(unet, None, x_t, t, text_states, None)
        install_user_token_attention(unet)
        after = personalized_noise_prediction(unet, None, x_t, t, text_states, None)
    assert all(isinstance(p, UserTokenAttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(before, after)


def test_base_tokens_trains_only_its_token_mlp_and_moves_it_at_the_first_step() -> None:
    unet = freeze_unet(tiny_unet())
    adaptive = AdaptiveNetwork(unet, PATHWAY_CONFIGS["base_tokens"])
    assert adaptive.controlnet is None
    assert {name.split(".")[0] for name, _ in adaptive.named_parameters()} == {"user_tokens"}
    base_before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    before = {name: p.detach().clone() for name, p in adaptive.named_parameters()}
    optimizer = torch.optim.Adam(adaptive.parameters(), lr=1e-3)
    _step(unet, adaptive, optimizer, seed=2)
    changed = {name for name, p in adaptive.named_parameters() if not torch.equal(p, before[name])}
    # The zero last layer has a gradient through the frozen value projections from the start (no second zero layer).
    assert {"user_tokens.2.weight", "user_tokens.2.bias"} <= changed
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, base_before[name]), name
    assert all(p.grad is None for p in unet.parameters())


def test_copy_tokens_feed_the_copy_from_small_random_weights() -> None:
    adaptive = AdaptiveNetwork(tiny_unet(), PATHWAY_CONFIGS["copy_tokens"])
    assert adaptive.user_tokens is not None and adaptive.controlnet is not None
    last = adaptive.user_tokens[-1]
    assert isinstance(last, torch.nn.Linear)
    assert bool((last.weight != 0).any()) and bool((last.bias == 0).all())
    zero_init = AdaptiveNetwork(tiny_unet(), PATHWAY_CONFIGS["copy_tokens"].with_overrides(condition_init_std=0))
    assert zero_init.user_tokens is not None
    assert all(bool((p == 0).all()) for p in zero_init.user_tokens[-1].parameters())


def test_a_saved_config_without_a_pathway_is_the_condition_map() -> None:
    values = CONFIG.to_dict()
    values.pop("user_pathway")
    assert AdaptiveConfig.from_dict(values).user_pathway == LEGACY_USER_PATHWAY == "condition_map"
    with pytest.raises(ConfigError, match="user_pathway must be one of copy_tokens, base_tokens, condition_map"):
        AdaptiveConfig(user_pathway="everywhere")  # type: ignore[arg-type]


def test_copy_starts_from_the_base_weights() -> None:
    unet = tiny_unet()
    adaptive = AdaptiveNetwork(unet, CONFIG)
    assert adaptive.controlnet is not None
    for name, tensor in unet.down_blocks.state_dict().items():
        assert torch.equal(adaptive.controlnet.down_blocks.state_dict()[name], tensor)
    assert all(torch.all(p == 0) for p in adaptive.controlnet.controlnet_down_blocks.parameters())
    assert all(torch.all(p == 0) for p in adaptive.controlnet.controlnet_mid_block.parameters())


def _step(unet: UNet2DConditionModel, adaptive: AdaptiveNetwork, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x_t, t, text_states, users = inputs(seed=seed)
    target = torch.randn_like(x_t)
    optimizer.zero_grad()
    prediction = personalized_noise_prediction(unet, adaptive, x_t, t, text_states, users)
    torch.nn.functional.mse_loss(prediction, target).backward()
    optimizer.step()


@pytest.mark.parametrize("condition_init_std", [0.0, 0.02])
def test_base_equals_base_at_initialisation_whatever_the_condition_init(condition_init_std: float) -> None:
    unet = freeze_unet(tiny_unet())
    config = AdaptiveConfig(**{**CONFIG.to_dict(), "condition_init_std": condition_init_std})
    adaptive = AdaptiveNetwork(unet, config)
    x_t, t, text_states, users = inputs()
    with torch.no_grad():
        base = personalized_noise_prediction(unet, None, x_t, t, text_states, None)
        personalized = personalized_noise_prediction(unet, adaptive, x_t, t, text_states, users)
    assert torch.equal(personalized, base)
    assert adaptive.controlnet is not None
    conv_out = adaptive.controlnet.controlnet_cond_embedding.conv_out.weight
    assert bool((conv_out == 0).all()) == (condition_init_std == 0.0)


def _moved_parameters(condition_init_std: float, steps: int) -> set[str]:
    unet = freeze_unet(tiny_unet())
    adaptive = AdaptiveNetwork(unet, AdaptiveConfig(**{**CONFIG.to_dict(), "condition_init_std": condition_init_std}))
    before = {name: p.detach().clone() for name, p in adaptive.named_parameters()}
    optimizer = torch.optim.Adam(adaptive.parameters(), lr=1e-3)
    for seed in range(steps):
        _step(unet, adaptive, optimizer, seed=seed + 2)
    return {name for name, p in adaptive.named_parameters() if not torch.equal(p, before[name])}


def test_user_condition_trains_from_the_second_step_unlike_controlnets_double_zero_init() -> None:
    # With a nonzero conditioning conv, g(u) has a gradient as soon as the output convolutions are nonzero.
    assert any(name.startswith("user_condition.") for name in _moved_parameters(0.02, steps=2))
    # ControlNet's init (both convolutions zero): g(u) waits a step longer, its effect is second order.
    assert not any(name.startswith("user_condition.") for name in _moved_parameters(0.0, steps=2))
    assert any(name.startswith("user_condition.") for name in _moved_parameters(0.0, steps=3))


def test_optimiser_steps_move_the_adaptive_network_and_never_the_base() -> None:
    unet = freeze_unet(tiny_unet())
    adaptive = AdaptiveNetwork(unet, CONFIG)
    base_before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    adaptive_before = {name: p.detach().clone() for name, p in adaptive.named_parameters()}
    assert count_trainable_parameters(unet) == 0
    assert count_trainable_parameters(adaptive) == sum(p.numel() for p in adaptive.parameters())
    optimizer = torch.optim.Adam(adaptive.parameters(), lr=1e-3)

    _step(unet, adaptive, optimizer, seed=2)
    changed = {name for name, p in adaptive.named_parameters() if not torch.equal(p, adaptive_before[name])}
    # The zero convolutions are the only parameters with a gradient on the first step (ControlNet's start).
    assert any(name.startswith("controlnet.controlnet_down_blocks") for name in changed)
    assert "controlnet.controlnet_mid_block.weight" in changed

    _step(unet, adaptive, optimizer, seed=3)
    changed = {name for name, p in adaptive.named_parameters() if not torch.equal(p, adaptive_before[name])}
    # From the second step on, everything behind the output convolutions trains, g(u) included.
    assert {name for name, _ in adaptive.named_parameters()} == changed

    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, base_before[name]), name
    assert all(p.grad is None for p in unet.parameters())


@pytest.mark.parametrize("pathway", USER_PATHWAYS)
def test_users_change_the_prediction_once_trained(pathway: str) -> None:
    unet = freeze_unet(tiny_unet())
    adaptive = AdaptiveNetwork(unet, PATHWAY_CONFIGS[pathway])
    optimizer = torch.optim.Adam(adaptive.parameters(), lr=1e-2)
    for seed in range(3):
        _step(unet, adaptive, optimizer, seed=seed)
    x_t, t, text_states, users = inputs(seed=9)
    with torch.no_grad():
        one = personalized_noise_prediction(unet, adaptive, x_t, t, text_states, users)
        other = personalized_noise_prediction(unet, adaptive, x_t, t, text_states, torch.roll(users, 1, dims=0))
    assert not torch.allclose(one, other)


def test_new_version_loads_in_place_into_allocated_modules() -> None:
    unet = freeze_unet(tiny_unet())
    serving = AdaptiveNetwork(unet, CONFIG)
    storage_before = {name: p.data_ptr() for name, p in serving.named_parameters()}
    trained = AdaptiveNetwork(unet, CONFIG)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    shell = AdaptiveNetwork(unet, CONFIG, copy_unet_weights=False)
    load_adaptive_weights_in_place(shell, trained.state_dict())
    load_adaptive_weights_in_place(serving, shell.state_dict())

    assert {name: p.data_ptr() for name, p in serving.named_parameters()} == storage_before
    x_t, t, text_states, users = inputs(seed=4)
    with torch.no_grad():
        expected = personalized_noise_prediction(unet, trained, x_t, t, text_states, users)
        swapped = personalized_noise_prediction(unet, serving, x_t, t, text_states, users)
    assert torch.equal(swapped, expected)


def test_weight_swap_refuses_other_shapes_and_names() -> None:
    unet = tiny_unet()
    adaptive = AdaptiveNetwork(unet, CONFIG)
    wider = AdaptiveNetwork(unet, CONFIG.with_overrides(user_dim=USER_DIM + 1))
    with pytest.raises(AdaptiveInputError, match="shapes differ"):
        load_adaptive_weights_in_place(adaptive, wider.state_dict())
    partial = dict(adaptive.state_dict())
    partial.pop("user_condition.0.weight")
    with pytest.raises(AdaptiveInputError, match=re.escape("missing ['user_condition.0.weight']")):
        load_adaptive_weights_in_place(adaptive, partial)


def test_bad_inputs_and_config_raise() -> None:
    unet = tiny_unet()
    adaptive = AdaptiveNetwork(unet, CONFIG)
    x_t, t, text_states, users = inputs()
    with pytest.raises(AdaptiveInputError, match=f"shape \\(B, {USER_DIM}\\), got \\(3, 2\\)"):
        personalized_noise_prediction(unet, adaptive, x_t, t, text_states, users[:, :2])
    with pytest.raises(AdaptiveInputError, match="one row per image \\(3\\), got 2"):
        personalized_noise_prediction(unet, adaptive, x_t, t, text_states, users[:2])
    with pytest.raises(ConfigError, match="condition_channels must be at least 1, got 0"):
        AdaptiveConfig(condition_channels=0)
    assert AdaptiveConfig.from_dict(CONFIG.to_dict()) == CONFIG


@pytest.mark.parametrize(
    ("field", "lowest", "refused"),
    [
        ("user_dim", 1, 0),
        ("user_tokens", 1, 0),
        ("condition_hidden", 1, 0),
        ("conditioning_embedding_channels", 1, 0),
        ("conditioning_scale", 0.0, -0.5),
        ("condition_init_std", 0.0, -0.01),
    ],
)
def test_config_bounds_name_the_field(field: str, lowest: float, refused: float) -> None:
    assert getattr(AdaptiveConfig(**{field: lowest}), field) == lowest
    with pytest.raises(ConfigError, match=re.escape(f"{field} must be at least {lowest}, got {refused}")):
        AdaptiveConfig(**{field: refused})


def _mirrored_groups_loss(
    unet: UNet2DConditionModel, adaptive: AdaptiveNetwork, users: torch.Tensor, seed: int, train: bool
) -> torch.Tensor:
    """The group objective on groups of (red, blue): user 0 picked red, user 1 blue; one noise draw per group."""
    from diffusers import DDPMScheduler

    from perfusion.objectives import group_preference_loss

    groups = 8
    red, blue = torch.zeros(3, SIZE, SIZE), torch.zeros(3, SIZE, SIZE)
    red[0], blue[2] = 0.8, 0.8
    images = torch.stack([red, blue] * groups)  # [2G, 3, S, S]: candidates of group g at rows 2g, 2g + 1
    labels = torch.tensor([1, 0, 0, 1] * (groups // 2))
    group_ids = torch.arange(groups).repeat_interleave(2)
    user_vectors = users[torch.tensor([0, 1] * (groups // 2))].repeat_interleave(2, dim=0)
    generator = torch.Generator().manual_seed(seed)
    # Early and middle timesteps only: near t = 1000, x_t is almost pure noise and no network can tell the images apart.
    timesteps = torch.randint(0, 500, (groups,), generator=generator).repeat_interleave(2)
    noise = torch.randn(groups, 3, SIZE, SIZE, generator=generator).repeat_interleave(2, dim=0)
    x_t = DDPMScheduler(num_train_timesteps=1000).add_noise(images, noise, timesteps)
    text_states = torch.zeros(2 * groups, 5, TEXT_DIM)
    with torch.set_grad_enabled(train):
        policy = personalized_noise_prediction(unet, adaptive, x_t, timesteps, text_states, user_vectors)
    with torch.no_grad():
        reference = personalized_noise_prediction(unet, None, x_t, timesteps, text_states, None)
    policy_err = (policy - noise).pow(2).mean(dim=(1, 2, 3))
    reference_err = (reference - noise).pow(2).mean(dim=(1, 2, 3))
    loss, _ = group_preference_loss(policy_err, reference_err, labels, group_ids, beta=500.0)
    return loss


@pytest.mark.slow
def test_the_network_learns_opposite_tastes_of_two_users_on_the_same_images() -> None:
    # The same (red, blue) pair, red preferred by one user and blue by the other: a generator that ignores u gives
    # both users the same implicit rewards, so its expected loss over the two cannot go below log 2. Only a network
    # whose residuals depend on u can fit both; with this clean signal it gets below half of log 2 in 100 steps.
    unet = freeze_unet(tiny_unet())
    adaptive = AdaptiveNetwork(unet, CONFIG)
    users = torch.randn(2, USER_DIM, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(adaptive.parameters(), lr=1e-3)
    for step in range(100):
        loss = _mirrored_groups_loss(unet, adaptive, users, seed=step, train=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    heldout = [_mirrored_groups_loss(unet, adaptive, users, seed=10_000 + n, train=False).item() for n in range(3)]
    assert sum(heldout) / len(heldout) < 0.5 * math.log(2.0)
