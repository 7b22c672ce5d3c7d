"""The simulated marketplace's hidden truth: what each shopper really likes about an image.

Utilities are computed from the PIXELS of an image (what it shows), never from its prompt, its labels or any
descriptor the system produced. Nothing in perfusion/, streams/, features/ or trainer/ may import this module
(a test enforces it): the models must learn these preferences from behaviour alone.

A panel is anything that implements :class:`PreferencePanel`; :class:`PixelPreferencePanel` is the default one.
Its shoppers belong to segments (a taste shared by many, e.g. "bright colours, bold patterns") with individual
variation around the segment's taste. The segment shows through only in the profile features a shop would know
(age group and region), and only statistically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pydantic import Field

from perfusion.attributes import COLOURS
from perfusion.settings import Settings

# Reference colours, (12, 3) in 0..1, for a soft colour histogram of the garment's pixels.
_REFERENCE_COLOURS = np.array(list(COLOURS.values()), dtype=np.float64) / 255.0
_COLOUR_TEMPERATURE = 0.02  # squared RGB distance (0..3 scale) at which a colour's weight falls by e

PIXEL_FEATURE_NAMES: tuple[str, ...] = (
    *(f"colour:{name}" for name in COLOURS),
    "brightness",  # mean luminance of the garment, 0..1
    "saturation",  # mean chroma of the garment, 0..1
    "texture",  # mean absolute Laplacian inside the garment: patterns are high, plain is low
    "coverage",  # garment area / image area
    "elongation",  # bounding-box height / width, log scale
    "bbox_fill",  # garment area / bounding-box area: dresses and skirts fill differently from trousers
)
PIXEL_FEATURE_DIM = len(PIXEL_FEATURE_NAMES)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Describe what images show, from pixels alone.

    images: (N, H, W, 3) uint8. Returns (N, PIXEL_FEATURE_DIM) float64. The background is taken to be the median
    colour of the image border; the garment is every pixel noticeably different from it.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    rgb = images.astype(np.float64) / 255.0
    _, height, width, _ = rgb.shape
    border = np.concatenate(
        [rgb[:, 0, :, :], rgb[:, -1, :, :], rgb[:, :, 0, :], rgb[:, :, -1, :]], axis=1
    )  # (N, 2H+2W, 3)
    background = np.median(border, axis=1)  # (N, 3)
    distance = np.abs(rgb - background[:, None, None, :]).sum(axis=-1)  # (N, H, W)
    mask = distance > 0.12
    area = mask.sum(axis=(1, 2)).clip(min=1)  # (N,)

    # Soft colour histogram of garment pixels.
    squared = ((rgb[..., None, :] - _REFERENCE_COLOURS) ** 2).sum(axis=-1)  # (N, H, W, 12)
    weights = np.exp(-(squared - squared.min(axis=-1, keepdims=True)) / _COLOUR_TEMPERATURE)
    weights /= weights.sum(axis=-1, keepdims=True)
    colour_hist = (weights * mask[..., None]).sum(axis=(1, 2)) / area[:, None]  # (N, 12)

    luminance = rgb @ np.array([0.299, 0.587, 0.114])  # (N, H, W)
    brightness = (luminance * mask).sum(axis=(1, 2)) / area
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    saturation = (chroma * mask).sum(axis=(1, 2)) / area

    laplacian = np.zeros_like(luminance)
    laplacian[:, 1:-1, 1:-1] = np.abs(
        4 * luminance[:, 1:-1, 1:-1]
        - luminance[:, :-2, 1:-1]
        - luminance[:, 2:, 1:-1]
        - luminance[:, 1:-1, :-2]
        - luminance[:, 1:-1, 2:]
    )
    inner = mask.copy()  # the garment's edge against the background is not texture
    inner[:, 1:-1, 1:-1] &= mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
    texture = (laplacian * inner).sum(axis=(1, 2)) / inner.sum(axis=(1, 2)).clip(min=1)

    rows = mask.any(axis=2)  # (N, H)
    cols = mask.any(axis=1)  # (N, W)
    bbox_height = rows.sum(axis=1).clip(min=1)
    bbox_width = cols.sum(axis=1).clip(min=1)
    coverage = area / (height * width)
    elongation = np.log(bbox_height / bbox_width)
    bbox_fill = area / (bbox_height * bbox_width)

    scalars = np.stack([brightness, saturation, texture, coverage, elongation, bbox_fill], axis=1)
    return np.concatenate([colour_hist, scalars], axis=1)


class PreferencePanel(Protocol):
    """Scores images for shoppers. Plug in another panel to change who the shoppers are, not the loop."""

    def user_ids(self) -> list[str]: ...

    def profile(self, user_id: str) -> dict[str, int]:
        """What the shop knows at sign-up: ``age_group`` (0..4) and ``region`` (0..3)."""
        ...

    def utilities(self, user_id: str, images: np.ndarray) -> np.ndarray:
        """(N,) true utilities of (N, H, W, 3) uint8 images for one user, on a roughly unit scale."""
        ...


class Segment(Settings):
    """A taste many shoppers share, and the profiles its shoppers mostly have."""

    name: str = Field(description="the segment's name, as results report it")
    weights: dict[str, float] = Field(
        description="weight per pixel feature of PIXEL_FEATURE_NAMES (unlisted features weigh 0)"
    )
    age_groups: tuple[int, ...] = Field(description="the age groups (0..4) this segment's shoppers mostly come from")
    regions: tuple[int, ...] = Field(description="the regions (0..3) this segment's shoppers mostly come from")


DEFAULT_SEGMENTS: tuple[Segment, ...] = (
    Segment(
        name="bold-and-bright",
        weights={
            "colour:red": 2.0,
            "colour:orange": 1.5,
            "colour:yellow": 1.5,
            "colour:pink": 1.0,
            "saturation": 2.0,
            "texture": 1.5,
            "colour:black": -1.5,
            "colour:grey": -1.5,
            "colour:navy": -1.0,
        },
        age_groups=(0, 1),
        regions=(0, 1),
    ),
    Segment(
        name="dark-minimal",
        weights={
            "colour:black": 2.0,
            "colour:navy": 2.0,
            "colour:grey": 1.0,
            "texture": -2.0,
            "brightness": -1.5,
            "colour:yellow": -1.5,
            "colour:pink": -1.5,
            "colour:orange": -1.0,
        },
        age_groups=(2, 3),
        regions=(1, 2),
    ),
    Segment(
        name="cool-tones-long-lines",
        weights={
            "colour:blue": 2.0,
            "colour:teal": 2.0,
            "colour:green": 1.5,
            "colour:purple": 1.0,
            "elongation": 2.0,
            "colour:red": -1.5,
            "colour:orange": -1.0,
            "bbox_fill": -1.0,
        },
        age_groups=(1, 2),
        regions=(2, 3),
    ),
    Segment(
        name="soft-and-light",
        weights={
            "colour:white": 2.0,
            "colour:pink": 2.0,
            "colour:yellow": 1.0,
            "brightness": 2.0,
            "texture": 0.5,
            "colour:black": -2.0,
            "colour:navy": -1.5,
            "coverage": -1.0,
        },
        age_groups=(3, 4),
        regions=(0, 3),
    ),
)


@dataclass
class PixelPreferencePanel:
    """Shoppers whose utility is a linear taste over :func:`pixel_features`, standardized per feature.

    Each shopper's taste = their segment's weights + Gaussian individual variation (``individual_sd``).
    Features are standardized with statistics of a reference image set (``fit_scale``) so that weights of 1
    mean "one standard deviation of this feature is worth one unit of utility".
    """

    n_users: int = 40
    seed: int = 0
    individual_sd: float = 0.5
    segments: tuple[Segment, ...] = DEFAULT_SEGMENTS
    _tastes: dict[str, np.ndarray] = field(init=False, repr=False)
    _profiles: dict[str, dict[str, int]] = field(init=False, repr=False)
    _segment_of: dict[str, str] = field(init=False, repr=False)
    _mean: np.ndarray = field(init=False, repr=False)
    _scale: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._tastes, self._profiles, self._segment_of = {}, {}, {}
        for index in range(self.n_users):
            segment = self.segments[index % len(self.segments)]
            base = np.array([segment.weights.get(name, 0.0) for name in PIXEL_FEATURE_NAMES])
            user_id = f"shopper-{self.seed}-{index:04d}"
            self._tastes[user_id] = base + rng.normal(0.0, self.individual_sd, size=PIXEL_FEATURE_DIM)
            # Profiles follow the segment 80% of the time, so they hint at taste without giving it away.
            age_choices = segment.age_groups if rng.random() < 0.8 else tuple(range(5))
            region_choices = segment.regions if rng.random() < 0.8 else tuple(range(4))
            self._profiles[user_id] = {
                "age_group": int(rng.choice(age_choices)),
                "region": int(rng.choice(region_choices)),
            }
            self._segment_of[user_id] = segment.name
        self._mean = np.zeros(PIXEL_FEATURE_DIM)
        self._scale = np.ones(PIXEL_FEATURE_DIM)

    def fit_scale(self, reference_images: np.ndarray) -> PixelPreferencePanel:
        """Standardize features by the mean and spread they have on ``reference_images`` (N, H, W, 3)."""
        features = pixel_features(reference_images)
        self._mean = features.mean(axis=0)
        self._scale = features.std(axis=0).clip(min=1e-6)
        return self

    def user_ids(self) -> list[str]:
        return list(self._tastes)

    def profile(self, user_id: str) -> dict[str, int]:
        return dict(self._profiles[user_id])

    def segment(self, user_id: str) -> str:
        """The user's segment (for reporting results per segment; never given to the system)."""
        return self._segment_of[user_id]

    def utilities(self, user_id: str, images: np.ndarray) -> np.ndarray:
        standardized = (pixel_features(images) - self._mean) / self._scale
        # Divide by sqrt(dim) so that utilities stay on a roughly unit scale whatever the number of features.
        return standardized @ self._tastes[user_id] / np.sqrt(PIXEL_FEATURE_DIM)
