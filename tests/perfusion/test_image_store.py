import numpy as np
import pytest

from perfusion.attributes import Attributes
from perfusion.image_store import ImageStore, UnknownImage, catalog_image_id, parse_catalog_image_id


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "images")


def test_put_get_round_trip_and_content_addressing(store):
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    image_id = store.put(pixels)
    assert image_id.startswith("gen-")
    assert store.put(pixels.copy()) == image_id  # same pixels, same id, one file
    assert len(list(store.root.glob("*.png"))) == 1
    np.testing.assert_array_equal(store.get(image_id), pixels)
    assert store.png_bytes(image_id).startswith(b"\x89PNG")


def test_different_pixels_get_different_ids(store):
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert store.put(a) != store.put(b)


def test_catalog_ids_round_trip():
    attributes = Attributes("t-shirt", "navy", "striped", "long-sleeve", "slim")
    image_id = catalog_image_id(attributes, seed=7)
    assert parse_catalog_image_id(image_id) == (attributes, 7)


def test_catalog_image_renders_deterministically(store):
    image_id = catalog_image_id(Attributes("dress", "red", "dotted", "short-sleeve", "loose"), seed=3)
    first = store.get(image_id)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(store.get(image_id), first)


@pytest.mark.parametrize("bad", ["gen-doesnotexist", "cat-hat-red-plain-short_sleeve-slim-s1", "../etc/passwd", "x"])
def test_unknown_ids_raise(store, bad):
    with pytest.raises(UnknownImage):
        store.get(bad)


def test_put_rejects_wrong_dtype(store):
    with pytest.raises(ValueError, match="uint8"):
        store.put(np.zeros((4, 4, 3), dtype=np.float32))
