"""How much preference signal groups of K candidates carry: pure statistics over a table of true utilities.

A :class:`GroupTable` holds G groups of K candidates, every candidate scored by every viewer of a panel of V users
(the simulator's true utility), the viewer each group was shown to (its owner) with the owner's clicks, and a
merchant's selection among the candidates. Each statistic is a function of arrays, so it can be checked by hand, and
:func:`bootstrap` resamples users to give every statistic a 95% interval on the same resamplings: a drawn user brings
the groups shown to them and their share of the contrast as a viewer, while what the panel shares (its mean contrast,
the candidate it likes best) stays the whole panel's. Resampling the panel itself would shrink it to fewer distinct
users in each draw and bias every user-specific statistic down.

These read the simulator's truth: they describe the groups, and never feed training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perfusion.errors import ConfigError
from simulator.eval.stats import interval

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class GroupTable:
    """G groups of K candidates seen by a panel of V viewers; the arrays' first axis is the group."""

    utilities: FloatArray  # (G, V, K): viewer v's true utility of candidate k of group g
    owner: NDArray[np.int64]  # (G,): the viewer group g was shown to
    clicked: BoolArray  # (G, K): the owner's clicks
    click_probabilities: FloatArray  # (G, K): the owner's click probability of each candidate under the click model
    picker_utilities: FloatArray  # (G, K): the design's merchant's true utility of each candidate
    picked: BoolArray  # (G, K): the merchant's selection
    viewer_weights: FloatArray | None = None  # (V,): how often each viewer counts (a bootstrap draw); None: once

    def __post_init__(self) -> None:
        if self.utilities.ndim != 3:
            raise ConfigError(f"utilities must be (groups, viewers, K), got shape {self.utilities.shape}")
        groups, viewers, k = self.utilities.shape
        for name in ("clicked", "click_probabilities", "picker_utilities", "picked"):
            if getattr(self, name).shape != (groups, k):
                raise ConfigError(f"{name} must be ({groups}, {k}) like the groups, got {getattr(self, name).shape}")
        if self.owner.shape != (groups,) or (groups and not 0 <= self.owner.min() <= self.owner.max() < viewers):
            raise ConfigError(f"owner must be ({groups},) viewer indices below {viewers}, got {self.owner}")
        if self.viewer_weights is not None and self.viewer_weights.shape != (viewers,):
            raise ConfigError(f"viewer_weights must be ({viewers},), got {self.viewer_weights.shape}")

    @property
    def k(self) -> int:
        return int(self.utilities.shape[2])

    def own_utilities(self) -> FloatArray:
        """(G, K): each group's candidates as its owner values them."""
        return self.utilities[np.arange(self.utilities.shape[0]), self.owner]

    def resampled(self, users: NDArray[np.int64]) -> GroupTable:
        """The table of a bootstrap draw of ``users`` (viewer indices, repeats allowed): each drawn user brings every
        group shown to them, and counts as a viewer as often as drawn; the panel stays whole."""
        none = np.zeros(0, dtype=np.int64)
        groups = np.concatenate([none, *(np.flatnonzero(self.owner == user) for user in users)])
        return GroupTable(
            utilities=self.utilities[groups],
            owner=self.owner[groups],
            clicked=self.clicked[groups],
            click_probabilities=self.click_probabilities[groups],
            picker_utilities=self.picker_utilities[groups],
            picked=self.picked[groups],
            viewer_weights=np.bincount(users, minlength=self.utilities.shape[1]).astype(np.float64),
        )


def within_group_sd(utilities: FloatArray) -> float:
    """Mean over groups of the standard deviation of the (G, K) utilities within each group, divisor K - 1 (the
    spread of the generator's candidates, whatever K; K = 1 gives NaN)."""
    if not utilities.size or utilities.shape[1] < 2:
        return float("nan")
    return float(utilities.std(axis=1, ddof=1).mean())


def user_specific_share(utilities: FloatArray, viewer_weights: FloatArray | None = None) -> float:
    """The share of within-group contrast that is specific to the viewer, from (G, V, K) utilities.

    Each viewer's utilities are centred within the group (c[g, v, k], the contrast); the part shared by the panel is
    its mean over the V viewers, s[g, k], and the viewer-specific part the residual r = c - s. The share is
    sum(r^2) / (sum(r^2) + sum(s^2)), the sums over groups, candidates and viewers (s counted once per viewer); over
    the whole panel the denominator is sum(c^2). It is 0 when every viewer ranks the candidates alike (a generator can
    only improve them for everyone), 1 when the panel's contrasts cancel out (what one viewer prefers, the panel does
    not on average). ``viewer_weights`` (V,) counts each viewer's terms (default once: a bootstrap draw counts a user
    as often as drawn); the panel's mean s stays the whole panel's.
    """
    contrast = utilities - utilities.mean(axis=2, keepdims=True)
    shared = contrast.mean(axis=1, keepdims=True)  # (G, 1, K)
    weights = np.ones(utilities.shape[1]) if viewer_weights is None else viewer_weights
    specific = float((((contrast - shared) ** 2).sum(axis=(0, 2)) * weights).sum())
    total = specific + float((shared**2).sum() * weights.sum())
    return specific / total if total > 0 else float("nan")


def single_click_best_rate(utilities: FloatArray, clicked: BoolArray) -> float:
    """Among the groups with exactly one click, how often the clicked candidate is the group's best by its viewer's
    (G, K) utilities (first index on ties); NaN without such a group. Chance is 1 / K."""
    single = clicked.sum(axis=1) == 1
    if not single.any():
        return float("nan")
    return float((clicked[single].argmax(axis=1) == utilities[single].argmax(axis=1)).mean())


def expected_single_click_best_rate(utilities: FloatArray, click_probabilities: FloatArray) -> float:
    """:func:`single_click_best_rate` in expectation over the click model's draws, for independent clicks of (G, K)
    probabilities: sum_g P(the only click is g's best) / sum_g P(exactly one click). Without the noise of which
    groups happen to get one click, it is the number the realized rate estimates."""
    p = np.clip(click_probabilities, 0.0, 1.0)
    miss = 1.0 - p
    # P(only candidate k clicked) = p_k * prod_{j != k} (1 - p_j), computed without dividing by 1 - p_k.
    only = np.empty_like(p)
    for position in range(p.shape[1]):
        others = np.delete(miss, position, axis=1).prod(axis=1)
        only[:, position] = p[:, position] * others
    best = utilities.argmax(axis=1)
    total = float(only.sum())
    return float(only[np.arange(p.shape[0]), best].sum()) / total if total > 0 else float("nan")


def choice_gap(utilities: FloatArray, chosen: BoolArray) -> float:
    """Mean over groups with both chosen and unchosen candidates of (mean utility of the chosen - of the others),
    from (G, K) utilities and choices; NaN without such a group."""
    mixed = chosen.any(axis=1) & ~chosen.all(axis=1)
    if not mixed.any():
        return float("nan")
    values, picks = utilities[mixed], chosen[mixed]
    chosen_mean = (values * picks).sum(axis=1) / picks.sum(axis=1)
    other_mean = (values * ~picks).sum(axis=1) / (~picks).sum(axis=1)
    return float((chosen_mean - other_mean).mean())


def best_of_k_gain(utilities: FloatArray) -> float:
    """What an oracle choosing each group's best gains over a random candidate: mean of max - mean over (G, K)."""
    return float((utilities.max(axis=1) - utilities.mean(axis=1)).mean()) if utilities.size else float("nan")


def personal_best_gain(utilities: FloatArray, owner: NDArray[np.int64]) -> float:
    """The personal part of the best-of-K gain: each owner's utility of their own best candidate less of the candidate
    best for the panel on average (argmax over k of the viewers' mean utility), mean over groups; from (G, V, K)
    utilities and (G,) owners. 0 when every viewer's best is the panel's best; never negative."""
    if not utilities.size:
        return float("nan")
    own = utilities[np.arange(utilities.shape[0]), owner]  # (G, K)
    panel_best = utilities.mean(axis=1).argmax(axis=1)  # (G,)
    return float((own.max(axis=1) - own[np.arange(own.shape[0]), panel_best]).mean())


# The report's statistics of one table, by name.
STATISTICS: dict[str, Callable[[GroupTable], float]] = {
    "within_group_sd": lambda table: within_group_sd(table.own_utilities()),
    "user_specific_share": lambda table: user_specific_share(table.utilities, table.viewer_weights),
    "single_click_best": lambda table: single_click_best_rate(table.own_utilities(), table.clicked),
    "single_click_best_expected": lambda table: expected_single_click_best_rate(
        table.own_utilities(), table.click_probabilities
    ),
    "click_gap": lambda table: choice_gap(table.own_utilities(), table.clicked),
    "merchant_pick_gap": lambda table: choice_gap(table.picker_utilities, table.picked),
    "best_of_k_gain": lambda table: best_of_k_gain(table.own_utilities()),
    "personal_best_gain": lambda table: personal_best_gain(table.utilities, table.owner),
}


def groups_counted(table: GroupTable) -> dict[str, int]:
    """How many groups each statistic of :data:`STATISTICS` averages over."""
    clicks = table.clicked.sum(axis=1)
    picks = table.picked.sum(axis=1)
    every = int(table.utilities.shape[0])
    return {
        "within_group_sd": every,
        "user_specific_share": every,
        "single_click_best": int((clicks == 1).sum()),
        "single_click_best_expected": every,
        "click_gap": int(((clicks > 0) & (clicks < table.k)).sum()),
        "merchant_pick_gap": int(((picks > 0) & (picks < table.k)).sum()),
        "best_of_k_gain": every,
        "personal_best_gain": every,
    }


def bootstrap(
    table: GroupTable,
    statistics: Mapping[str, Callable[[GroupTable], float]],
    samples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Every statistic's value on ``table`` and its 95% percentile interval over ``samples`` resamplings of the
    panel's users (one set of resamplings for all statistics): name -> {"value", "ci95"}."""
    if samples < 1:
        raise ConfigError(f"bootstrap samples must be at least 1, got {samples}")
    viewers = table.utilities.shape[1]
    draws = np.random.default_rng([seed, 29]).integers(0, viewers, size=(samples, viewers))
    boot = {name: np.empty(samples) for name in statistics}
    for row, users in enumerate(draws):
        drawn = table.resampled(users)
        for name, statistic in statistics.items():
            boot[name][row] = statistic(drawn)
    return {name: {"value": statistic(table), "ci95": interval(boot[name])} for name, statistic in statistics.items()}
