"""Images by id: generated candidates stored as PNG files, catalog images rendered on demand.

Two kinds of id:

- ``gen-<sha1 of the pixels, 16 hex>``: an image the generator drew, stored as ``<store>/<id>.png``. The id is a
  content hash, so storing the same pixels twice yields one file and one id (idempotent under retries); an id is
  nothing but ``gen-`` and 16 hex digits (:data:`GENERATED_ID`), so no id names a path outside the store.
- ``cat-<garment>-<colour>-<pattern>-<sleeve>-<fit>-s<seed>``: a catalog render, made again from its labels
  whenever it is asked for (rendering is deterministic in the labels and the seed), so nothing is stored.

The store is addressed by a URL, through fsspec: a plain folder or ``file://<folder>`` (the default,
:func:`default_image_store_url`: ``PERFUSION_IMAGES_URL``, else ``<state>/images``), or any fsspec URL
(``s3://bucket/images``, ``gcs://...``, ``memory://images`` in tests), so that every replica of the service and the
trainer read the same images. A local file is written to a temporary name and renamed, so a reader never sees half
a PNG; an object store publishes a whole object at once.

The service writes through this module, the trainer and the simulator read through it; none of them needs to
know where pixels come from.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from perfusion.attributes import ATTRIBUTE_KINDS, Attributes
from perfusion.errors import ConfigError, PerfusionError
from perfusion.paths import state_dir

GENERATED_PREFIX = "gen-"
CATALOG_PREFIX = "cat-"
GENERATED_ID: Final = re.compile(r"gen-[0-9a-f]{16}")
IMAGES_URL_ENV: Final = "PERFUSION_IMAGES_URL"


def default_image_store_url() -> str:
    """``PERFUSION_IMAGES_URL``, else the folder ``<state>/images``."""
    return os.environ.get(IMAGES_URL_ENV, "").strip() or str(state_dir() / "images")


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
    """Generated images as PNG objects under one fsspec URL (default :func:`default_image_store_url`), addressed by
    content hash; catalog images rendered from their ids."""

    def __init__(self, root: Path | str | None = None, catalog_size: int = 32) -> None:
        import fsspec

        self.url = str(root) if root is not None else default_image_store_url()
        try:
            self._fs, self._base = fsspec.core.url_to_fs(self.url)
        except (ValueError, ImportError) as exc:
            raise ConfigError(
                f"image store {self.url!r} (PERFUSION_IMAGES_URL) is not a store fsspec can open ({exc}); give a "
                "folder, file://<folder> or an fsspec URL whose filesystem is installed"
            ) from exc
        self._base = self._base.rstrip("/") or "/"
        self._local = "file" in _protocols(self._fs)
        self._fs.makedirs(self._base, exist_ok=True)
        self.catalog_size = catalog_size

    @property
    def root(self) -> Path:
        """The folder of a local store."""
        if not self._local:
            raise ConfigError(f"the image store {self.url!r} is not a local folder")
        return Path(self._base)

    def put(self, pixels: np.ndarray) -> str:
        """Store an (H, W, 3) uint8 image and return its id."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {pixels.dtype} {pixels.shape}")
        image_id = GENERATED_PREFIX + hashlib.sha1(pixels.tobytes()).hexdigest()[:16]
        location = self._location(image_id)
        if not self._fs.exists(location):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            if self._local:
                # Write to a temporary file and rename, so a reader never sees half a PNG.
                temporary = f"{self._base}/.{image_id}-{uuid.uuid4().hex}.tmp"
                self._fs.pipe_file(temporary, buffer.getvalue())
                os.replace(temporary, location)
            else:
                self._fs.pipe_file(location, buffer.getvalue())
        return image_id

    def path(self, image_id: str) -> Path:
        """The file of a generated image in a local store (a ConfigError for another)."""
        location = self._location(image_id)
        return self.root / Path(location).name

    def _location(self, image_id: str) -> str:
        if GENERATED_ID.fullmatch(image_id) is None:
            raise UnknownImage(f"not a generated image id: {image_id!r}; expected gen- and 16 hex digits")
        return f"{self._base}/{image_id}.png"

    def get(self, image_id: str) -> np.ndarray:
        """The (H, W, 3) uint8 pixels of any image id."""
        if image_id.startswith(CATALOG_PREFIX):
            from perfusion.catalog import render

            attributes, seed = parse_catalog_image_id(image_id)
            return render(attributes, size=self.catalog_size, seed=seed)
        return np.asarray(Image.open(io.BytesIO(self._stored_bytes(image_id))).convert("RGB"))

    def png_bytes(self, image_id: str) -> bytes:
        if image_id.startswith(CATALOG_PREFIX):
            buffer = io.BytesIO()
            Image.fromarray(self.get(image_id)).save(buffer, format="PNG")
            return buffer.getvalue()
        return self._stored_bytes(image_id)

    def _stored_bytes(self, image_id: str) -> bytes:
        location = self._location(image_id)
        try:
            return bytes(self._fs.cat_file(location))
        except FileNotFoundError:
            raise UnknownImage(f"no stored image {image_id!r} in {self.url}") from None


def _protocols(filesystem: object) -> tuple[str, ...]:
    protocol = getattr(filesystem, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
