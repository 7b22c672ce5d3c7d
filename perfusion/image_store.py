"""Images by id: generated candidates stored as PNG files, catalog images rendered on demand.

Two kinds of id:

- ``gen-<sha1 of the pixels, 16 hex>``: an image the generator drew, stored as ``<root>/<id>.png``. The id is a
  content hash, so storing the same pixels twice yields one file and one id (idempotent under retries).
- ``cat-<garment>-<colour>-<pattern>-<sleeve>-<fit>-s<seed>``: a catalog render, made again from its labels
  whenever it is asked for (rendering is deterministic in the labels and the seed), so nothing is stored.

The service writes through this module, the trainer and the simulator read through it; none of them needs to
know where pixels come from.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from perfusion.attributes import ATTRIBUTE_KINDS, Attributes
from perfusion.errors import PerfusionError
from perfusion.paths import state_dir

GENERATED_PREFIX = "gen-"
CATALOG_PREFIX = "cat-"


class UnknownImage(PerfusionError):
    """An image id that names no stored or renderable image."""


def catalog_image_id(attributes: Attributes, seed: int) -> str:
    labels = "-".join(getattr(attributes, kind).replace("-", "_") for kind in ATTRIBUTE_KINDS)
    return f"{CATALOG_PREFIX}{labels}-s{seed}"


def parse_catalog_image_id(image_id: str) -> tuple[Attributes, int]:
    parts = image_id.removeprefix(CATALOG_PREFIX).split("-")
    if not image_id.startswith(CATALOG_PREFIX) or len(parts) != len(ATTRIBUTE_KINDS) + 1 or parts[-1][:1] != "s":
        raise UnknownImage(f"not a catalog image id: {image_id!r}; expected cat-<garment>-<colour>-...-s<seed>")
    labels = {kind: part.replace("_", "-") for kind, part in zip(ATTRIBUTE_KINDS, parts, strict=False)}
    try:
        return Attributes(**labels), int(parts[-1][1:])
    except ValueError as exc:
        raise UnknownImage(f"catalog image id {image_id!r}: {exc}") from None


class ImageStore:
    """PNG files under ``root`` (default ``state_dir()/images``), addressed by content hash."""

    def __init__(self, root: Path | None = None, catalog_size: int = 32) -> None:
        self.root = root if root is not None else state_dir() / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self.catalog_size = catalog_size

    def put(self, pixels: np.ndarray) -> str:
        """Store an (H, W, 3) uint8 image and return its id."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {pixels.dtype} {pixels.shape}")
        image_id = GENERATED_PREFIX + hashlib.sha1(pixels.tobytes()).hexdigest()[:16]
        path = self.path(image_id)
        if not path.exists():
            # Write to a temporary file and rename, so a reader never sees half a PNG.
            with tempfile.NamedTemporaryFile(dir=self.root, suffix=".tmp", delete=False) as handle:
                Image.fromarray(pixels).save(handle, format="PNG")
            os.replace(handle.name, path)
        return image_id

    def path(self, image_id: str) -> Path:
        if not image_id.startswith(GENERATED_PREFIX) or "/" in image_id or ".." in image_id:
            raise UnknownImage(f"not a generated image id: {image_id!r}")
        return self.root / f"{image_id}.png"

    def get(self, image_id: str) -> np.ndarray:
        """The (H, W, 3) uint8 pixels of any image id."""
        if image_id.startswith(CATALOG_PREFIX):
            from perfusion.catalog import render

            attributes, seed = parse_catalog_image_id(image_id)
            return render(attributes, size=self.catalog_size, seed=seed)
        path = self.path(image_id)
        if not path.exists():
            raise UnknownImage(f"no stored image {image_id!r} under {self.root}")
        return np.asarray(Image.open(path).convert("RGB"))

    def png_bytes(self, image_id: str) -> bytes:
        if image_id.startswith(CATALOG_PREFIX):
            buffer = io.BytesIO()
            Image.fromarray(self.get(image_id)).save(buffer, format="PNG")
            return buffer.getvalue()
        path = self.path(image_id)
        if not path.exists():
            raise UnknownImage(f"no stored image {image_id!r} under {self.root}")
        return path.read_bytes()
