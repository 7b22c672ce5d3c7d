"""The rendered catalog: determinism, visible attributes, the caption split and the dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perfusion.attributes import ATTRIBUTE_KINDS, COLOURS, GARMENTS, Attributes
from perfusion.catalog import (
    CatalogDataset,
    all_attributes,
    attribute_indices,
    render,
    render_many,
    split_catalog,
)
from perfusion.errors import ConfigError

NAVY_TEE = Attributes("t-shirt", "navy", "plain", "short-sleeve", "slim")


def test_every_combination_once() -> None:
    items = all_attributes()
    expected = 1
    for values in ATTRIBUTE_KINDS.values():
        expected *= len(values)
    assert len(items) == expected == len(set(items))


def test_render_shape_dtype_and_size_option() -> None:
    assert render(NAVY_TEE).shape == (32, 32, 3)
    assert render(NAVY_TEE, size=64).shape == (64, 64, 3)
    assert render(NAVY_TEE).dtype == np.uint8
    with pytest.raises(ConfigError, match="size"):
        render(NAVY_TEE, size=8)


def test_render_is_deterministic_per_seed_and_jittered_across_seeds() -> None:
    assert np.array_equal(render(NAVY_TEE, seed=3), render(NAVY_TEE, seed=3))
    assert not np.array_equal(render(NAVY_TEE, seed=3), render(NAVY_TEE, seed=4))


def _garment_pixels(image: np.ndarray) -> np.ndarray:
    background = image[0, 0].astype(int)
    distance = np.abs(image.astype(int) - background).sum(axis=-1)
    return image[distance > 60]


@pytest.mark.parametrize("colour", list(COLOURS))
def test_plain_garments_are_mostly_their_colour(colour: str) -> None:
    image = render(Attributes("dress", colour, "plain", "long-sleeve", "loose"), seed=1)
    pixels = _garment_pixels(image) if colour != "white" else image.reshape(-1, 3)
    target = np.array(COLOURS[colour])
    nearest = np.argmin([np.abs(pixels.astype(int) - np.array(rgb)).sum(axis=-1) for rgb in COLOURS.values()], axis=0)
    share = np.mean(np.array(list(COLOURS))[nearest] == colour)
    assert share > (0.3 if colour == "white" else 0.6), f"{colour}: {share:.2f} of garment pixels near {target}"


def test_each_attribute_changes_the_image() -> None:
    base = render(NAVY_TEE, seed=0)
    for kind, values in ATTRIBUTE_KINDS.items():
        other = next(v for v in values if v != getattr(NAVY_TEE, kind))
        changed = render(Attributes(**{**NAVY_TEE.__dict__, kind: other}), seed=0)
        assert np.abs(changed.astype(int) - base.astype(int)).sum() > 500, kind


def test_garment_silhouettes_differ_pairwise() -> None:
    shapes = {
        g: _garment_pixels(render(Attributes(g, "black", "plain", "long-sleeve", "loose"))).shape[0] for g in GARMENTS
    }
    masks = [render(Attributes(g, "black", "plain", "long-sleeve", "loose")).sum(axis=-1) < 300 for g in GARMENTS]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).sum() > 20, (GARMENTS[i], GARMENTS[j], shapes)


def test_split_is_deterministic_disjoint_and_keeps_every_garment_colour_pair() -> None:
    split = split_catalog()
    assert split == split_catalog()
    assert not set(split.train) & set(split.heldout)
    assert len(split.train) + len(split.heldout) == len(all_attributes())
    assert 0.08 <= len(split.heldout) / len(all_attributes()) <= 0.1
    assert {(a.garment, a.colour) for a in split.train} == {(g, c) for g in GARMENTS for c in COLOURS}
    assert not set(split.train_captions) & set(split.heldout_captions)
    with pytest.raises(ConfigError, match="heldout_fraction"):
        split_catalog(1.5)


def test_attribute_indices_follow_the_vocabulary() -> None:
    assert attribute_indices(NAVY_TEE) == (0, list(COLOURS).index("navy"), 0, 0, 0)


def test_dataset_items_and_bulk_tensor() -> None:
    items = all_attributes()[:3]
    data = CatalogDataset(items, size=32, variants=2, seed=1)
    assert len(data) == 6
    image, caption, labels = data[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    assert caption == items[1].caption()
    assert labels.tolist() == list(attribute_indices(items[1]))
    assert torch.equal(data.image_tensor()[3], image)
    assert data.item_index().tolist() == [0, 0, 1, 1, 2, 2]
    assert not torch.equal(data[0][0], data[1][0])  # two renders of one item differ


def test_render_many_checks_lengths() -> None:
    with pytest.raises(ConfigError, match="one seed per item"):
        render_many([NAVY_TEE], [1, 2])
