"""Pretraining on toy data: parameters move, EMA lags, schedules, classifier loss, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.cli import main
from perfusion.attributes import OPEN_KINDS, named_subsets
from perfusion.catalog import all_attributes, split_catalog
from perfusion.checkpoints import load_component
from perfusion.errors import ConfigError
from perfusion.models.attribute_classifier import build_attribute_classifier
from perfusion.models.base import QUICK_CONFIG, build_unet, load_pretrained_unet
from perfusion.sampling import BaseGenerator, SamplerConfig
from perfusion.text_encoder import CaptionStates
from tests.perfusion.test_base_model import tiny_stable_diffusion_folder
from trainer.attribute_classifier import ClassifierTrainingConfig, augment, classifier_loss
from trainer.pretrain import EMA, PretrainConfig, learning_rate_at, named_subset_indices, train_unet
from trainer.reward_pretrain import has_reward_towers

TINY = PretrainConfig(steps=2, batch_size=4, warmup_steps=1, variants=1, seed=0)


def random_states(prompts: list[str]) -> CaptionStates:
    """A stand-in for MiniLM: seeded random states for every catalog caption."""
    ordered = ["", *prompts]
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(len(ordered), QUICK_CONFIG.text_max_length, 384, generator=generator)
    return CaptionStates(ordered, states, torch.ones(len(ordered), QUICK_CONFIG.text_max_length, dtype=torch.long))


@pytest.fixture(scope="module")
def states() -> CaptionStates:
    return random_states([text for attrs in all_attributes() for text in (attrs.caption(), *attrs.prompts())])


def test_a_training_step_changes_parameters_and_ema_lags(states: CaptionStates) -> None:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    before = [p.detach().clone() for p in unet.parameters()]
    ema_unet, figures = train_unet(unet, QUICK_CONFIG, TINY, split_catalog().train[:8], states)
    changed = [not torch.equal(b, p) for b, p in zip(before, unet.parameters(), strict=True)]
    assert sum(changed) > 0.9 * len(changed)
    ema_differs = [not torch.equal(e, p) for e, p in zip(ema_unet.parameters(), unet.parameters(), strict=True)]
    assert any(ema_differs)
    assert figures["train_steps"] == 2 and figures["final_loss"] > 0


def test_training_is_reproducible_with_a_seed(states: CaptionStates) -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        unet = build_unet(QUICK_CONFIG)
        ema_unet, _ = train_unet(unet, QUICK_CONFIG, TINY, split_catalog().train[:8], states)
        results.append(next(ema_unet.parameters()).detach().clone())
    assert torch.equal(results[0], results[1])


def test_a_time_budget_stops_training(states: CaptionStates) -> None:
    config = TINY.with_overrides(steps=1000, time_budget_s=0.0)
    _, figures = train_unet(build_unet(QUICK_CONFIG), QUICK_CONFIG, config, split_catalog().train[:4], states)
    assert figures["train_steps"] == 1


def test_attribute_dropout_names_a_kind_when_its_draw_clears_the_dropout() -> None:
    uniform = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1], [0.9, 0.1, 0.6, 0.2], [0.5, 0.49, 0.5, 0.0]])
    indices = named_subset_indices(uniform, 0.5).tolist()
    assert [named_subsets()[i] for i in indices] == [
        OPEN_KINDS,
        (),
        ("colour", "sleeve"),
        ("colour", "sleeve"),
    ]
    assert named_subset_indices(uniform, 0.0).tolist() == [15, 15, 15, 15]  # no dropout: every caption full


def test_attribute_dropout_drops_each_kind_independently_at_its_rate() -> None:
    uniform = torch.rand(20_000, len(OPEN_KINDS), generator=torch.Generator().manual_seed(0))
    subsets = [named_subsets()[i] for i in named_subset_indices(uniform, 0.5).tolist()]
    for kind in OPEN_KINDS:
        assert abs(sum(kind in named for named in subsets) / len(subsets) - 0.5) < 0.02
    garment_only = sum(named == () for named in subsets) / len(subsets)
    assert abs(garment_only - 0.5**4) < 0.01  # independent: 1/16 of captions name the garment only


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 0.999), min_size=4, max_size=4), min_size=1, max_size=8),
    st.floats(0.0, 0.99),
)
def test_attribute_dropout_index_names_exactly_the_kinds_that_cleared(draws: list[list[float]], dropout: float) -> None:
    indices = named_subset_indices(torch.tensor(draws, dtype=torch.float64), dropout).tolist()
    for row, index in zip(draws, indices, strict=True):
        assert named_subsets()[index] == tuple(kind for kind, u in zip(OPEN_KINDS, row, strict=True) if u >= dropout)


def test_learning_rate_warms_up_then_decays() -> None:
    config = PretrainConfig(steps=100, warmup_steps=10, learning_rate=1.0)
    assert learning_rate_at(0, config) == pytest.approx(0.1)
    assert learning_rate_at(10, config) == pytest.approx(1.0)
    assert learning_rate_at(99, config) == pytest.approx(0.1, abs=1e-3)
    budgeted = config.with_overrides(time_budget_s=10.0)
    assert learning_rate_at(20, budgeted, elapsed_s=10.0) == pytest.approx(0.1)


def test_ema_starts_close_to_the_live_weights() -> None:
    live = torch.nn.Linear(2, 2)
    ema = EMA(live, decay=0.999)
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live)
    # Warm-up decay (1 + 1) / (10 + 1): the first update moves the average most of the way.
    assert torch.allclose(ema.shadow.weight, live.weight - 2 / 11, atol=1e-6)


def test_classifier_loss_is_summed_over_kinds_and_minimal_at_the_labels() -> None:
    labels = torch.tensor([[1, 2, 0, 1, 0]])
    logits = torch.full((1, 26), -20.0)
    for offset, label in zip([0, 6, 18, 22, 24], labels[0].tolist(), strict=True):
        logits[0, offset + label] = 20.0
    assert classifier_loss(logits, labels) < 1e-6
    assert classifier_loss(torch.zeros(1, 26), labels) > 1.0
    images = torch.zeros(2, 3, 32, 32)
    assert augment(images, 0.1, torch.Generator().manual_seed(0)).abs().max() <= 0.1 * 6


def test_sd_shaped_base_model_trains(tmp_path: Path, states: CaptionStates) -> None:
    tiny_stable_diffusion_folder(tmp_path / "sd")
    unet = load_pretrained_unet(tmp_path / "sd", QUICK_CONFIG)
    before = unet.conv_in.weight.detach().clone()
    train_unet(unet, QUICK_CONFIG, TINY, split_catalog().train[:4], states)
    assert not torch.equal(before, unet.conv_in.weight)


@pytest.mark.slow
def test_quick_cli_writes_a_loadable_checkpoint(tmp_path: Path, states: CaptionStates) -> None:
    states_file = tmp_path / "states.safetensors"
    states.save(states_file)
    out, docs = tmp_path / "base", tmp_path / "docs"
    code = main(
        [
            *("pretrain", "--quick", "--steps", "3", "--classifier-steps", "3", "--text-states", str(states_file)),
            *("--out", str(out), "--docs", str(docs), "--seed", "5"),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["provenance"]["seed"] == 5 and "--quick" in report["provenance"]["command"]
    assert set(report["metrics"]["heldout_accuracy"]) == {"garment", "colour", "pattern", "sleeve", "fit"}
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["provenance"]["seed"] == 5
    assert (docs / "samples.png").is_file() and "perfusion pretrain" in (docs / "base-model.md").read_text()
    load_component(out, "attribute_classifier", build_attribute_classifier)
    assert has_reward_towers(out) and report["metrics"]["reward_towers"]["steps"] == 20  # --quick's
    assert "PerFusionRM towers" in (docs / "base-model.md").read_text()
    spread = report["metrics"]["open_spread"]
    assert set(spread) == {"t-shirt", "dress", "trousers", "skirt", "jacket", "hoodie"}
    assert all(1 <= figures["colour_values"] <= 4 for figures in spread.values())  # --quick: 4 seeds a garment
    assert (docs / "open_samples.png").is_file() and "| a t-shirt |" in (docs / "base-model.md").read_text()

    resumed = tmp_path / "resumed"
    argv = ["pretrain", "--quick", "--steps", "2", "--classifier-steps", "2", "--resume", str(out), "--out"]
    assert main([*argv, str(resumed), "--text-states", str(states_file), "--docs", str(resumed / "docs")]) == 0
    previous = json.loads((resumed / "report.json").read_text())["provenance"]["previous"]
    assert previous["command"] == report["provenance"]["command"] and previous["train_steps"] == 3
    resumed_docs = (resumed / "docs" / "base-model.md").read_text()
    assert "continued from" in resumed_docs and report["provenance"]["command"] in resumed_docs

    class StatesEncoder:
        def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return states.states[states.rows(prompts)], states.mask[states.rows(prompts)]

    generator = BaseGenerator(out, text_encoder=StatesEncoder())  # type: ignore[arg-type]
    images = generator.generate([split_catalog().heldout[0].caption()], sampler=SamplerConfig(steps=2))
    assert images.shape == (1, 32, 32, 3)

    code = main(
        ["pretrain", "--quick", "--evaluate", str(out), "--guidance-scale", "2", "--text-states", str(states_file)]
    )
    assert code == 0
    evaluated = json.loads((out / "report.json").read_text())
    assert evaluated["metrics"]["eval_sampler"] == "DDIM 5 steps, guidance 2.0"
    assert evaluated["metrics"]["train_steps"] == report["metrics"]["train_steps"]

    towers_only = tmp_path / "towers"
    argv = ["pretrain", "--quick", "--reward-towers-only", "--reward-tower-steps", "2", "--text-states"]
    assert main([*argv, str(states_file), "--out", str(towers_only)]) == 0
    assert [path.name for path in towers_only.iterdir()] == ["reward_towers"]
    assert (
        "--reward-towers-only"
        in json.loads((towers_only / "reward_towers" / "config.json").read_text())["figures"]["command"]
    )


def test_classifier_training_config_has_help_text() -> None:
    assert all(f.description for f in ClassifierTrainingConfig.model_fields.values())
    assert all(f.description for f in PretrainConfig.model_fields.values())


@pytest.mark.parametrize("field", ["caption_dropout", "attribute_dropout"])
def test_dropouts_are_shares_below_one(field: str) -> None:
    assert getattr(PretrainConfig(**{field: 0.0}), field) == 0.0
    assert getattr(PretrainConfig(**{field: 0.99}), field) == 0.99
    for refused in (1.0, -0.1):
        with pytest.raises(ConfigError, match=f"{field} must be in \\[0.0, 1.0\\), got {refused}"):
            PretrainConfig(**{field: refused})
