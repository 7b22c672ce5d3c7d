"""The fashion catalog the project renders itself: garments drawn with PIL from their attribute labels.

Every :class:`~perfusion.attributes.Attributes` combination (6 garments x 12 colours x 4 patterns x 2 sleeve
lengths x 2 fits = 1,152 items) has a caption and can be rendered at any size with per-seed jitter in position,
scale and shade. The sleeve attribute also sets leg length for trousers (short = shorts) and hem length for
skirts, so that every label is visible in every garment.

A deterministic split holds out a fraction of the captions: the held-out combinations are never seen in
pretraining and measure whether the base model composes attributes it learnt separately.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from perfusion.attributes import ATTRIBUTE_KINDS, COLOURS, Attributes
from perfusion.errors import ConfigError

# Drawing happens at SUPERSAMPLE x the requested size, then a box filter downsamples it: smooth edges at 32x32.
SUPERSAMPLE = 4
HELDOUT_FRACTION = 0.1

Point = tuple[float, float]


def all_attributes() -> list[Attributes]:
    """Every attribute combination, in ATTRIBUTE_KINDS order (garment slowest, fit fastest)."""
    kinds = list(ATTRIBUTE_KINDS)
    return [
        Attributes(**dict(zip(kinds, values, strict=True))) for values in itertools.product(*ATTRIBUTE_KINDS.values())
    ]


def attribute_indices(attrs: Attributes) -> tuple[int, ...]:
    """The index of each label within its kind's vocabulary, in ATTRIBUTE_KINDS order."""
    return tuple(values.index(getattr(attrs, kind)) for kind, values in ATTRIBUTE_KINDS.items())


@dataclass(frozen=True)
class CatalogSplit:
    """Catalog items whose captions are used in pretraining, and those held out from it."""

    train: tuple[Attributes, ...]
    heldout: tuple[Attributes, ...]

    @property
    def train_captions(self) -> list[str]:
        return [attrs.caption() for attrs in self.train]

    @property
    def heldout_captions(self) -> list[str]:
        return [attrs.caption() for attrs in self.heldout]


def split_catalog(heldout_fraction: float = HELDOUT_FRACTION) -> CatalogSplit:
    """Hold out ``heldout_fraction`` of all captions, chosen by a hash of the caption (stable across runs).

    Every (garment, colour) pair keeps training items, so held-out captions are new combinations of labels the
    model has seen, never labels it has not.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    items = all_attributes()
    ranked = sorted(items, key=lambda attrs: hashlib.sha256(attrs.caption().encode()).hexdigest())
    heldout = set(ranked[: round(len(items) * heldout_fraction)])
    train_pairs = {(attrs.garment, attrs.colour) for attrs in items if attrs not in heldout}
    # Give back any held-out item whose (garment, colour) pair would otherwise vanish from training.
    for attrs in ranked:
        if attrs in heldout and (attrs.garment, attrs.colour) not in train_pairs:
            heldout.discard(attrs)
            train_pairs.add((attrs.garment, attrs.colour))
    return CatalogSplit(
        train=tuple(attrs for attrs in items if attrs not in heldout),
        heldout=tuple(attrs for attrs in items if attrs in heldout),
    )


@dataclass(frozen=True)
class _Jitter:
    dx: float  # shift, in fractions of the canvas
    dy: float
    scale: float
    shade: float  # multiplies the fill colour
    background: tuple[int, int, int]


def _jitter(seed: int) -> _Jitter:
    rng = np.random.default_rng(seed)
    dx, dy = rng.uniform(-0.04, 0.04, size=2)
    base = int(rng.integers(232, 250))
    tint = rng.integers(-6, 7, size=3)
    background = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    return _Jitter(
        dx=float(dx),
        dy=float(dy),
        scale=float(rng.uniform(0.92, 1.05)),
        shade=float(rng.uniform(0.9, 1.1)),
        background=(background[0], background[1], background[2]),
    )


def _shaded(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(round(channel * factor), 0, 255)) for channel in rgb)
    return (r, g, b)


def _accent(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second colour of a pattern: towards white for dark fills, towards black for light ones."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    target = 255.0 if luminance < 110 else 0.0
    r, g, b = (round(0.55 * channel + 0.45 * target) for channel in rgb)
    return (r, g, b)


def _polygons(attrs: Attributes) -> list[list[Point]]:
    """The garment's silhouette as polygons in unit coordinates (x right, y down, canvas = [0, 1]^2)."""
    width = 0.85 if attrs.fit == "slim" else 1.15
    long = attrs.sleeve == "long-sleeve"

    def box(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    if attrs.garment in ("t-shirt", "jacket", "hoodie"):
        half = 0.17 * width
        top, bottom = (0.26, 0.84) if attrs.garment == "t-shirt" else (0.24, 0.88)
        torso = box(0.5 - half, top, 0.5 + half, bottom)
        if long:
            left = [(0.5 - half, top), (0.5 - half - 0.05, top), (0.5 - half - 0.14, 0.82), (0.5 - half - 0.06, 0.82)]
            left += [(0.5 - half, 0.5)]
        else:
            left = [(0.5 - half, top), (0.5 - half - 0.06, top), (0.5 - half - 0.17, 0.42), (0.5 - half - 0.09, 0.47)]
            left += [(0.5 - half, 0.42)]
        right = [(1.0 - x, y) for x, y in left]
        shapes = [torso, left, right]
        if attrs.garment == "hoodie":
            shapes.append([(0.4, top + 0.02), (0.41, 0.12), (0.5, 0.08), (0.59, 0.12), (0.6, top + 0.02)])
        return shapes
    if attrs.garment == "dress":
        half = 0.12 * width
        hem = 0.2 * width + 0.06
        bodice = box(0.5 - half, 0.22, 0.5 + half, 0.5)
        skirt = [(0.5 - half, 0.48), (0.5 + half, 0.48), (0.5 + hem, 0.93), (0.5 - hem, 0.93)]
        if long:
            left = [(0.5 - half, 0.22), (0.5 - half - 0.04, 0.22), (0.5 - half - 0.1, 0.7), (0.5 - half - 0.03, 0.7)]
            left += [(0.5 - half, 0.42)]
        else:
            left = [(0.5 - half, 0.22), (0.5 - half - 0.05, 0.22), (0.5 - half - 0.11, 0.35), (0.5 - half, 0.36)]
        right = [(1.0 - x, y) for x, y in left]
        return [bodice, skirt, left, right]
    if attrs.garment == "trousers":
        half = 0.15 * width
        leg = 0.125 * width
        hem = 0.92 if long else 0.52
        flare = 0.015 if attrs.fit == "slim" else 0.035
        waist = box(0.5 - half, 0.1, 0.5 + half, 0.22)
        left = [(0.5 - half, 0.2), (0.5 - half + leg, 0.2), (0.5 - 0.012, hem), (0.5 - half - flare, hem)]
        right = [(1.0 - x, y) for x, y in left]
        return [waist, left, right]
    # skirt
    half = 0.13 * width
    hem_half = (0.22 if attrs.fit == "loose" else 0.17) + (0.04 if long else 0.0)
    hem = 0.9 if long else 0.6
    return [[(0.5 - half, 0.22), (0.5 + half, 0.22), (0.5 + hem_half, hem), (0.5 - hem_half, hem)]]


def _pattern_mask(pattern: str, canvas: int, period: float) -> np.ndarray:
    """Boolean (canvas, canvas) mask of where the pattern's accent colour shows."""
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    if pattern == "striped":
        return (ys % period) < period * 0.45
    if pattern == "checked":
        return ((ys // (period * 0.8)) + (xs // (period * 0.8))) % 2 == 1
    if pattern == "dotted":
        cy = (ys % period) - period / 2
        cx = (xs % period) - period / 2
        return cy * cy + cx * cx < (period * 0.26) ** 2
    return np.zeros((canvas, canvas), dtype=bool)


def render(attrs: Attributes, size: int = 32, seed: int = 0) -> np.ndarray:
    """Render one catalog item: (size, size, 3) uint8 RGB on a plain light background."""
    if size < 16:
        raise ConfigError(f"size must be at least 16 pixels, got {size}")
    jitter = _jitter(seed)
    canvas = size * SUPERSAMPLE
    fill = _shaded(COLOURS[attrs.colour], jitter.shade)

    def to_canvas(point: Point) -> Point:
        x = 0.5 + (point[0] - 0.5) * jitter.scale + jitter.dx
        y = 0.5 + (point[1] - 0.5) * jitter.scale + jitter.dy
        return (x * canvas, y * canvas)

    mask_image = Image.new("L", (canvas, canvas), 0)
    mask_draw = ImageDraw.Draw(mask_image)
    for polygon in _polygons(attrs):
        mask_draw.polygon([to_canvas(p) for p in polygon], fill=255)
    mask = np.asarray(mask_image) > 0

    image = np.empty((canvas, canvas, 3), dtype=np.uint8)
    image[:] = jitter.background
    image[mask] = fill
    accent = _pattern_mask(attrs.pattern, canvas, period=canvas / 6.5) & mask
    image[accent] = _accent(fill)
    _draw_details(image, attrs, mask, fill, to_canvas)
    small = Image.fromarray(image).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def _draw_details(
    image: np.ndarray,
    attrs: Attributes,
    mask: np.ndarray,
    fill: tuple[int, int, int],
    to_canvas: Callable[[Point], Point],
) -> None:
    """Outline (so white garments show on a light background), neckline, jacket opening, hoodie pocket."""
    edge = _shaded(fill, 0.6) if sum(fill) > 150 else _shaded((90, 90, 90), 1.0)
    interior = mask.copy()
    band = max(1, SUPERSAMPLE - 1)
    for shift_y, shift_x in ((band, 0), (-band, 0), (0, band), (0, -band)):
        interior &= np.roll(mask, (shift_y, shift_x), axis=(0, 1))
    image[mask & ~interior] = edge
    overlay = Image.fromarray(image)
    draw = ImageDraw.Draw(overlay)
    line = max(1, SUPERSAMPLE)
    if attrs.garment in ("t-shirt", "dress", "hoodie"):
        (x0, y0), (x1, y1) = to_canvas((0.45, 0.19)), to_canvas((0.55, 0.3))
        draw.pieslice([x0, y0, x1, y1], 0, 180, fill=tuple(image[1, 1]))
    if attrs.garment == "jacket":
        (xa, ya), (xb, yb) = to_canvas((0.5, 0.3)), to_canvas((0.5, 0.88))
        draw.line([(xa, ya), (xb, yb)], fill=edge, width=line)
        (xl, yl), (xr, _) = to_canvas((0.43, 0.24)), to_canvas((0.57, 0.24))
        draw.polygon([(xl, yl), (xr, yl), (xa, ya)], fill=tuple(image[1, 1]))
    if attrs.garment == "hoodie":
        (x0, y0), (x1, y1) = to_canvas((0.42, 0.66)), to_canvas((0.58, 0.78))
        draw.rectangle([x0, y0, x1, y1], outline=edge, width=line)
    image[:] = np.asarray(overlay)


def render_many(items: Sequence[Attributes], seeds: Sequence[int], size: int = 32) -> np.ndarray:
    """Render items[i] with seeds[i]: (N, size, size, 3) uint8."""
    if len(items) != len(seeds):
        raise ConfigError(f"render_many needs one seed per item, got {len(items)} items and {len(seeds)} seeds")
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for row, (attrs, seed) in enumerate(zip(items, seeds, strict=True)):
        out[row] = render(attrs, size=size, seed=seed)
    return out


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class CatalogDataset(torch.utils.data.Dataset[tuple[torch.Tensor, str, torch.Tensor]]):
    """``variants`` renders (seeds) of each item, rendered once at construction.

    Item i is (image (3, H, W) float in [-1, 1], caption, attribute indices (5,) long).
    """

    def __init__(self, items: Sequence[Attributes], size: int = 32, variants: int = 4, seed: int = 0) -> None:
        if variants < 1:
            raise ConfigError(f"variants must be at least 1, got {variants}")
        if not items:
            raise ConfigError("CatalogDataset needs at least one item")
        self.items = tuple(items)
        self.size = size
        self.variants = variants
        repeated = [attrs for attrs in self.items for _ in range(variants)]
        seeds = [seed * 1_000_003 + row for row in range(len(repeated))]
        self.images = render_many(repeated, seeds, size=size)
        self.labels = torch.tensor([attribute_indices(attrs) for attrs in repeated], dtype=torch.long)
        self.captions = [attrs.caption() for attrs in repeated]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        image = to_model_range(self.images[index : index + 1])[0]
        return image, self.captions[index], self.labels[index]

    def image_tensor(self) -> torch.Tensor:
        """All images at once: (N, 3, H, W) float in [-1, 1]."""
        return to_model_range(self.images)

    def item_index(self) -> torch.Tensor:
        """For each image, the index of its item in ``self.items``: (N,) long."""
        return torch.arange(len(self.items)).repeat_interleave(self.variants)
