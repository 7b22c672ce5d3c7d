"""PerFusionRM on tiny seeded configs: shapes, personalization, a training step, safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perfusion.errors import ConfigError
from perfusion.models.reward import PerFusionRM, RewardModelConfig, RewardModelInputError
from perfusion.objectives import group_ranking_loss

TINY = RewardModelConfig(
    text_dim=24, user_dim=10, image_size=16, cnn_channels=(8, 16), embed_dim=12, user_embed_dim=6, cross_layers=2
)


def tiny_model(personalized: bool = True, seed: int = 0) -> PerFusionRM:
    torch.manual_seed(seed)
    return PerFusionRM(RewardModelConfig.from_dict({**TINY.to_dict(), "personalized": personalized}))


def batch(size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(size, TINY.text_dim, generator=generator)
    images = torch.rand(size, 3, TINY.image_size, TINY.image_size, generator=generator) * 2 - 1
    users = torch.randn(size, TINY.user_dim, generator=generator)
    return text, images, users


@pytest.mark.parametrize("personalized", [True, False])
def test_shapes_and_scores_bounded_by_the_scale(personalized: bool) -> None:
    model = tiny_model(personalized)
    text, images, users = batch(5)
    scores = model(text, images, users)
    assert scores.shape == (5,)
    assert torch.all(scores.abs() <= model.logit_scale.exp() + 1e-5)
    assert model.encode_text(text, users).shape == (5, TINY.embed_dim)
    assert torch.allclose(model.encode_image(images, users).norm(dim=-1), torch.ones(5))


def test_plugins_start_at_zero_and_then_make_scores_depend_on_the_user() -> None:
    model = tiny_model(personalized=True)
    text, images, users = batch(4)
    other_users = torch.roll(users, shifts=1, dims=0)
    # Zero output layers: a new PerFusionRM scores as its towers alone, whoever looks.
    assert torch.equal(model(text, images, users), model(text, images, other_users))
    assert model.text_plugin is not None and model.image_plugin is not None
    for plugin in (model.text_plugin, model.image_plugin):
        torch.nn.init.normal_(plugin.output.weight, std=0.1)  # as after a few steps of feedback
    assert not torch.allclose(model(text, images, users), model(text, images, other_users))


def test_baseline_ignores_the_user_and_has_no_plugins() -> None:
    model = tiny_model(personalized=False)
    text, images, users = batch(4)
    other_users = torch.randn_like(users)
    assert torch.equal(model(text, images, users), model(text, images, other_users))
    assert torch.equal(model(text, images, users), model(text, images, None))
    assert not any(name.startswith(("user_tower", "text_plugin", "image_plugin")) for name in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny_model(True).parameters())


def test_personalized_model_requires_users_of_the_right_width() -> None:
    model = tiny_model(personalized=True)
    text, images, users = batch(3)
    with pytest.raises(RewardModelInputError, match="needs user_vectors"):
        model(text, images, None)
    with pytest.raises(RewardModelInputError, match=r"shape \(3, 10\), got \(3, 7\)"):
        model(text, images, users[:, :7])
    with pytest.raises(RewardModelInputError, match="images must have shape"):
        model(text, images[:, :, :8], users)


def test_training_step_changes_trainable_parameters_and_not_the_frozen_text_encoder() -> None:
    model = tiny_model(personalized=True)
    torch.manual_seed(2)
    frozen_text_encoder = torch.nn.Linear(7, TINY.text_dim).requires_grad_(False)
    frozen_before = {name: p.clone() for name, p in frozen_text_encoder.state_dict().items()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    _, images, users = batch(8)
    text = frozen_text_encoder(torch.randn(8, 7))
    labels = torch.tensor([1, 0, 0, 0, 2, 1, 0, 0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Two steps: behind the plug-ins' zero output layers, the cross layers and the user tower get their first
    # gradient once those layers have moved, as behind ControlNet's zero convolutions.
    for _ in range(2):
        optimizer.zero_grad()
        loss, _ = group_ranking_loss(model(text, images, users), labels, group_ids)
        loss.backward()
        optimizer.step()

    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    for name, tensor in frozen_text_encoder.state_dict().items():
        assert torch.equal(tensor, frozen_before[name])
    assert all(p.grad is None for p in frozen_text_encoder.parameters())


def test_ranking_loss_goes_down_when_training_on_one_group() -> None:
    model = tiny_model(personalized=True)
    text, images, users = batch(4)
    labels, group_ids = torch.tensor([0, 1, 0, 0]), torch.zeros(4, dtype=torch.long)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first, _ = group_ranking_loss(model(text, images, users), labels, group_ids)
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = group_ranking_loss(model(text, images, users), labels, group_ids)
        loss.backward()
        optimizer.step()
    last, stats = group_ranking_loss(model(text, images, users), labels, group_ids)
    assert last.item() < first.item()
    assert stats.implicit_accuracy == 1.0


def test_state_dict_round_trip_through_safetensors(tmp_path: Path) -> None:
    model = tiny_model(personalized=True, seed=3)
    path = tmp_path / "model.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    restored = PerFusionRM(RewardModelConfig.from_dict(model.config.to_dict()))
    restored.load_state_dict(load_file(str(path)))
    text, images, users = batch(3)
    assert torch.equal(model(text, images, users), restored(text, images, users))


def test_config_rejects_bad_values_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="image_size 18 must be divisible by 2\\^len\\(cnn_channels\\) = 4"):
        RewardModelConfig(image_size=18, cnn_channels=(8, 16))
    with pytest.raises(ConfigError, match="unknown reward model config keys \\['colour'\\]"):
        RewardModelConfig.from_dict({"colour": "red"})
    assert RewardModelConfig.from_dict(TINY.to_dict()) == TINY


@pytest.mark.parametrize(
    "field", ["text_dim", "user_dim", "image_channels", "embed_dim", "user_embed_dim", "cross_layers"]
)
def test_config_widths_must_be_at_least_one(field: str) -> None:
    assert getattr(TINY.with_overrides(**{field: 1}), field) == 1
    with pytest.raises(ConfigError, match=f"{field} must be at least 1, got 0"):
        TINY.with_overrides(**{field: 0})


def test_config_needs_a_cnn_stage() -> None:
    assert TINY.with_overrides(cnn_channels=(8,)).cnn_channels == (8,)
    with pytest.raises(ConfigError, match="cnn_channels"):
        TINY.with_overrides(cnn_channels=())
