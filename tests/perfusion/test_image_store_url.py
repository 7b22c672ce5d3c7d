"""The image store addressed by URL through fsspec: a folder, file://, or another filesystem (memory:// here); two
stores on one URL see each other's images; ids stay content hashes and never name a path outside the store."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from perfusion.errors import ConfigError
from perfusion.image_store import ImageStore, UnknownImage, default_image_store_url


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)


@pytest.fixture
def memory_url() -> str:
    return f"memory://images-{uuid.uuid4().hex}"


def test_a_memory_store_round_trips_and_addresses_by_content(memory_url: str) -> None:
    store = ImageStore(memory_url)
    image_id = store.put(pixels(0))
    assert store.put(pixels(0).copy()) == image_id and store.put(pixels(1)) != image_id
    np.testing.assert_array_equal(store.get(image_id), pixels(0))
    assert store.png_bytes(image_id).startswith(b"\x89PNG")
    with pytest.raises(ConfigError, match="not a local folder"):
        _ = store.root


def test_two_stores_on_one_url_see_each_others_images(tmp_path: Path, memory_url: str) -> None:
    for first, second in ((ImageStore(memory_url), ImageStore(memory_url)),
                          (ImageStore(f"file://{tmp_path}/shared"), ImageStore(tmp_path / "shared"))):  # fmt: skip
        image_id = first.put(pixels(2))
        np.testing.assert_array_equal(second.get(image_id), pixels(2))
    assert [path.name for path in (tmp_path / "shared").iterdir()] == [f"{image_id}.png"]  # no temporary left


@pytest.mark.parametrize(
    "bad",
    [
        "gen-../../etc/passwd",
        "gen-0123456789abcde/",
        "gen-0123456789ABCDEF",
        "gen-0123456789abcdef/../x",
        "gen-0123456789abcdef0",
        "../gen-0123456789abcdef",
        "gen-%2e%2e%2f0123456789",
    ],
)
def test_an_id_that_is_not_a_content_hash_names_no_path(bad: str, tmp_path: Path, memory_url: str) -> None:
    for store in (ImageStore(tmp_path / "images"), ImageStore(memory_url)):
        with pytest.raises(UnknownImage):
            store.get(bad)
        with pytest.raises(UnknownImage):
            store.png_bytes(bad)


def test_an_unknown_image_names_the_store(memory_url: str) -> None:
    with pytest.raises(UnknownImage, match=memory_url.removeprefix("memory://")):
        ImageStore(memory_url).get("gen-0123456789abcdef")


def test_the_default_store_is_the_environments_url_else_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_url: str
) -> None:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PERFUSION_IMAGES_URL", raising=False)
    assert default_image_store_url() == str(tmp_path / "state" / "images")
    assert ImageStore().root == tmp_path / "state" / "images"
    monkeypatch.setenv("PERFUSION_IMAGES_URL", memory_url)
    image_id = ImageStore().put(pixels(3))
    np.testing.assert_array_equal(ImageStore(memory_url).get(image_id), pixels(3))


def test_a_url_fsspec_cannot_open_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PERFUSION_IMAGES_URL"):
        ImageStore("nosuchprotocol://bucket/images")
