"""The frozen MiniLM text encoder (loaded offline from its PyPI package) and the precomputed states table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from perfusion.errors import ConfigError
from perfusion.text_encoder import HIDDEN_SIZE, CaptionStates, TextEncoder, mean_pool


@pytest.fixture(scope="module")
def encoder() -> Iterator[TextEncoder]:
    yield TextEncoder(max_length=16, cache_size=4)


def test_encode_shapes_mask_and_padding(encoder: TextEncoder) -> None:
    states, mask = encoder.encode(["a navy striped long-sleeve slim t-shirt", ""])
    assert states.shape == (2, 16, HIDDEN_SIZE) and states.dtype == torch.float32
    assert mask.shape == (2, 16)
    # [CLS] a navy striped long - sleeve slim t - shirt [SEP] = 12 tokens; the empty prompt is [CLS] [SEP].
    assert mask.sum(dim=1).tolist() == [12, 2]
    assert not states.requires_grad


def test_encoder_is_frozen_and_in_eval_mode(encoder: TextEncoder) -> None:
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.model.parameters())


def test_embeddings_are_normalized_and_meaningful(encoder: TextEncoder) -> None:
    vectors = encoder.embed(["a red dress", "a crimson dress", "navy trousers"])
    assert vectors.shape == (3, HIDDEN_SIZE)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]


def test_cache_returns_the_same_states_without_recomputing(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = encoder.encode(["a teal skirt"])
    calls: list[list[str]] = []
    original = encoder._encode_uncached

    def counting(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(prompts)
        return original(prompts)

    monkeypatch.setattr(encoder, "_encode_uncached", counting)
    again, _ = encoder.encode(["a teal skirt", "a pink hoodie", "a teal skirt"])
    assert calls == [["a pink hoodie"]]
    assert torch.equal(again[0], first[0]) and torch.equal(again[2], first[0])
    encoder.encode(["p1", "p2", "p3", "p4", "p5"])
    assert len(encoder._cache) <= 5


def test_batch_composition_does_not_change_an_encoding(encoder: TextEncoder) -> None:
    encoder._cache.clear()
    alone, _ = encoder.encode(["a grey jacket"])
    encoder._cache.clear()
    together, _ = encoder.encode(["a yellow checked short-sleeve loose dress", "a grey jacket"])
    assert torch.allclose(alone[0], together[1], atol=1e-5)


def test_single_string_is_refused(encoder: TextEncoder) -> None:
    with pytest.raises(ConfigError, match="list of prompts"):
        encoder.encode("a red dress")


def test_mean_pool_ignores_padding() -> None:
    states = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(states, mask), torch.tensor([[1.0, 0.0]]))


def test_caption_states_round_trip(encoder: TextEncoder, tmp_path: Path) -> None:
    table = CaptionStates.from_encoder(encoder, ["a red dress", "navy trousers", "a red dress"])
    assert table.prompts == ["", "a red dress", "navy trousers"]
    path = tmp_path / "states.safetensors"
    table.save(path)
    loaded = CaptionStates.load(path)
    assert loaded.prompts == table.prompts
    assert torch.allclose(loaded.states, table.states, atol=2e-2)  # stored as float16
    assert torch.equal(loaded.mask, table.mask)
    assert loaded.rows(["navy trousers", ""]).tolist() == [2, 0]
    with pytest.raises(ConfigError, match="not in the text states table"):
        loaded.rows(["a purple skirt"])
    # A table gives the sentence embeddings the encoder gives (PerFusionRM's towers pretrain from either).
    prompts = ["navy trousers", "a red dress"]
    assert torch.allclose(table.embed(prompts), encoder.embed(prompts), atol=1e-6)
    assert torch.allclose(loaded.embed(prompts), encoder.embed(prompts), atol=2e-3)


def test_caption_states_need_the_empty_prompt_first() -> None:
    with pytest.raises(ConfigError, match="empty prompt"):
        CaptionStates(["a red dress"], torch.zeros(1, 4, 8), torch.ones(1, 4))
    with pytest.raises(ConfigError, match="does not exist"):
        CaptionStates.load(Path("/nonexistent/states.safetensors"))
