"""The image grid of a seed's report: one held-out prompt as shoppers of each segment saw it after the update.

The prompt is the held-out one shown to shoppers of the most segments (a training prompt when no showing is held
out) (ties: the first in showing order); each
row is the first training shopper of a segment who was shown it, each block of K columns one arm's group for that
showing (the same prompt and seeds in every arm). It reads the arms' draws only, never the simulator's truth.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np
from numpy.typing import NDArray

GRID_ARMS = ("base", "perfusion")
GAP = 4  # pixels of white between two arms' blocks


def grid_showings(showings: list[Any], segments: dict[str, str]) -> tuple[str, list[tuple[str, int]]]:
    """The prompt of the grid and its rows: (segment, index of the showing), one per segment, segments sorted."""
    shoppers = [(index, s) for index, s in enumerate(showings) if s.role == "shopper"]
    if not shoppers:
        raise ValueError("the grid needs at least one showing of a training shopper")
    # A held-out prompt when there is one (a run with one showing a shopper has training prompts only).
    held_out = [(index, s) for index, s in shoppers if s.heldout_prompt] or shoppers
    reach: Counter[str] = Counter()
    for prompt in dict.fromkeys(s.prompt for _, s in held_out):
        reach[prompt] = len({segments[s.viewer] for _, s in held_out if s.prompt == prompt})
    prompt = max(reach, key=lambda p: (reach[p], -list(reach).index(p)))
    rows: dict[str, int] = {}
    for index, s in held_out:
        if s.prompt == prompt:
            rows.setdefault(segments[s.viewer], index)
    return prompt, sorted(rows.items())


def image_grid(
    showings: list[Any], draws: dict[str, Any], segments: dict[str, str], arms: tuple[str, ...] = GRID_ARMS
) -> tuple[bytes, dict[str, Any]]:
    """A PNG of the grid and what it shows (prompt, rows, arms); arms missing from ``draws`` are left out."""
    from PIL import Image

    present = [arm for arm in arms if arm in draws]
    prompt, rows = grid_showings(showings, segments)
    lines: list[NDArray[np.uint8]] = []
    for _, index in rows:
        blocks = [np.concatenate(list(draws[arm].images[index]), axis=1) for arm in present]  # (H, K*W, 3) each
        gap = np.full((blocks[0].shape[0], GAP, 3), 255, dtype=np.uint8)
        line = blocks[0]
        for block in blocks[1:]:
            line = np.concatenate([line, gap, block], axis=1)
        lines.append(line)
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(lines, axis=0)).save(buffer, format="PNG")
    caption = {
        "prompt": prompt,
        "rows": [{"segment": segment, "viewer": showings[index].viewer} for segment, index in rows],
        "arms": present,
    }
    return buffer.getvalue(), caption
