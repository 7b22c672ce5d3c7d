"""The fashion attribute vocabulary shared by the catalog, the generator, the stream agents and the simulator.

An image's *descriptor* is a fixed-length float vector over this vocabulary: one block per attribute kind
(garment, colour, pattern, sleeve, fit), each block a probability distribution over that kind's values. Catalog
images get one-hot blocks from their labels; generated images get the attribute classifier's probabilities
(computed from pixels). User preference vectors in Feast live in the same space.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

GARMENTS: tuple[str, ...] = ("t-shirt", "dress", "trousers", "skirt", "jacket", "hoodie")

# Name -> RGB in 0..255. Names are the words captions use.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 40),
    "orange": (240, 130, 20),
    "yellow": (240, 210, 40),
    "green": (40, 150, 60),
    "teal": (20, 140, 140),
    "blue": (40, 90, 210),
    "navy": (20, 30, 90),
    "purple": (120, 50, 160),
    "pink": (240, 130, 180),
    "black": (25, 25, 25),
    "white": (235, 235, 235),
    "grey": (130, 130, 130),
}

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checked")
SLEEVES: tuple[str, ...] = ("short-sleeve", "long-sleeve")
FITS: tuple[str, ...] = ("slim", "loose")

ATTRIBUTE_KINDS: dict[str, tuple[str, ...]] = {
    "garment": GARMENTS,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "sleeve": SLEEVES,
    "fit": FITS,
}

DESCRIPTOR_DIM: int = sum(len(values) for values in ATTRIBUTE_KINDS.values())

# The kinds a prompt may leave open; the garment is always named.
OPEN_KINDS: tuple[str, ...] = ("colour", "pattern", "sleeve", "fit")


@dataclass(frozen=True)
class Attributes:
    """The labels of one catalog item."""

    garment: str
    colour: str
    pattern: str
    sleeve: str
    fit: str

    def __post_init__(self) -> None:
        for kind, values in ATTRIBUTE_KINDS.items():
            value = getattr(self, kind)
            if value not in values:
                raise ValueError(f"{kind} must be one of {', '.join(values)}; got {value!r}")

    def caption(self) -> str:
        """A caption such as "a navy striped long-sleeve slim t-shirt"."""
        pattern = "" if self.pattern == "plain" else f" {self.pattern}"
        return f"a {self.colour}{pattern} {self.sleeve} {self.fit} {self.garment}"

    def prompt(self, named: Collection[str] = OPEN_KINDS) -> str:
        """A prompt naming the garment and the kinds in ``named``: ("colour",) -> "a navy t-shirt".

        Unlike :meth:`caption`, a named plain pattern is written ("a navy plain short-sleeve slim t-shirt"), so that a
        prompt without a pattern word leaves the pattern open instead of meaning plain.
        """
        unknown = set(named) - set(OPEN_KINDS)
        if unknown:
            raise ValueError(f"named kinds must be among {', '.join(OPEN_KINDS)}; got {sorted(unknown)}")
        words = [getattr(self, kind) for kind in OPEN_KINDS if kind in named]
        return " ".join(["a", *words, self.garment])

    def prompts(self) -> list[str]:
        """The prompt of every subset of OPEN_KINDS, in :func:`named_subsets` order (16 prompts)."""
        return [self.prompt(named) for named in named_subsets()]

    def descriptor(self) -> list[float]:
        """One-hot descriptor, length DESCRIPTOR_DIM."""
        return one_hot_descriptor({kind: getattr(self, kind) for kind in ATTRIBUTE_KINDS})


def named_subsets() -> list[tuple[str, ...]]:
    """Every subset of OPEN_KINDS; subset i names kind j when bit j of i is set (0: garment only, 15: all)."""
    return [
        tuple(kind for bit, kind in enumerate(OPEN_KINDS) if index >> bit & 1) for index in range(2 ** len(OPEN_KINDS))
    ]


def one_hot_descriptor(labels: Mapping[str, str]) -> list[float]:
    """Descriptor with a one in each named value's slot; a kind missing from ``labels`` gets a uniform block."""
    out: list[float] = []
    for kind, values in ATTRIBUTE_KINDS.items():
        if kind in labels:
            out.extend(1.0 if value == labels[kind] else 0.0 for value in values)
        else:
            out.extend([1.0 / len(values)] * len(values))
    return out


def descriptor_blocks(descriptor: list[float]) -> dict[str, list[float]]:
    """Split a descriptor into its per-kind blocks."""
    if len(descriptor) != DESCRIPTOR_DIM:
        raise ValueError(f"descriptor must have {DESCRIPTOR_DIM} values, got {len(descriptor)}")
    blocks: dict[str, list[float]] = {}
    start = 0
    for kind, values in ATTRIBUTE_KINDS.items():
        blocks[kind] = descriptor[start : start + len(values)]
        start += len(values)
    return blocks
