"""Scoring the arms' draws with the simulator's shoppers: expected and realised rates, lifts over base with
paired bootstrap intervals over viewers, personalisation, per-segment tables, integrity. Reads the simulator's
ground truth; nothing here reaches a model.

Per showing, the marketplace's probabilities of the K shown images (slot p at its position bias) give the expected
clicks sum_p c_p, orders sum_p c_p o_p and returns sum_p c_p o_p r_p; a viewer's expected CTR is their clicks per
image shown, conversion orders per click, return rate returns per order, over their showings. A lift is the pooled
ratio over viewers, arm over base, less 1; its interval resamples viewers (the same draw for both arms). The
realised rates draw Bernoulli responses from one stream per showing shared by every arm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulator.eval.stats import interval
from simulator.ground_truth import PreferencePanel
from simulator.marketplace import BehaviourConfig, Marketplace
from simulator.probes.sampler_probe import mask_coverage
from simulator.science.arms import ArmDraws
from simulator.science.config import BASELINE
from simulator.science.logging_round import Showing

# Per viewer, summed over their showings: [images, utility sum, expected clicks, orders, returns, realised clicks,
# realised orders, realised returns].
IMAGES, UTILITY, CLICKS, ORDERS, RETURNS, REAL_CLICKS, REAL_ORDERS, REAL_RETURNS = range(8)
ROBUSTNESS_GRID: tuple[tuple[float, float], ...] = tuple(
    (decay, slope) for decay in (0.25, 0.5, 1.0) for slope in (1.0, 1.5, 2.0)
)


@dataclass(frozen=True)
class Estimate:
    value: float
    ci95: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": self.ci95}


def viewer_totals(
    panel: PreferencePanel,
    marketplace: Marketplace,
    showings: Sequence[Showing],
    images: Sequence[NDArray[np.uint8]],
    viewers: Sequence[str],
    seed: int,
) -> NDArray[np.float64]:
    """[V, 8] totals per viewer (see the column constants) of the given images for each showing."""
    index = {viewer: row for row, viewer in enumerate(viewers)}
    totals = np.zeros((len(viewers), 8), dtype=np.float64)
    for number, (showing, shown) in enumerate(zip(showings, images, strict=True)):
        if showing.viewer not in index:
            continue
        utilities = np.asarray(panel.utilities(showing.viewer, shown), dtype=np.float64)
        clicks = marketplace.click_probabilities(utilities)
        orders = clicks * marketplace.order_probabilities(utilities)
        returns = orders * marketplace.return_probabilities(utilities)
        realised = marketplace.response_to_utilities(
            utilities, np.random.default_rng([seed, 3, number]).random((3, len(utilities)))
        )
        row = totals[index[showing.viewer]]
        row += [
            len(utilities),
            utilities.sum(),
            clicks.sum(),
            orders.sum(),
            returns.sum(),
            realised.clicked.sum(),
            realised.ordered.sum(),
            realised.returned.sum(),
        ]
    return totals


def _rates(totals: NDArray[np.float64], expected: bool) -> NDArray[np.float64]:
    """[..., 3] pooled CTR, conversion, return rate of totals [..., V, 8] summed over viewers."""
    summed = totals.sum(axis=-2)
    clicks, orders, returns = (CLICKS, ORDERS, RETURNS) if expected else (REAL_CLICKS, REAL_ORDERS, REAL_RETURNS)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.stack(
            [
                summed[..., clicks] / summed[..., IMAGES],
                summed[..., orders] / summed[..., clicks],
                summed[..., returns] / summed[..., orders],
            ],
            axis=-1,
        )


def paired(
    arm: NDArray[np.float64],
    base: NDArray[np.float64],
    statistic: Callable[[NDArray[np.float64], NDArray[np.float64]], NDArray[np.float64]],
    rng: np.random.Generator,
    samples: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``statistic(arm_totals, base_totals)`` on the viewers and on ``samples`` paired resamplings of them."""
    point = statistic(arm, base)
    draws = rng.integers(0, arm.shape[0], size=(samples, arm.shape[0]))
    boot = statistic(arm[draws], base[draws])
    return point, boot


def lifts(
    arm: NDArray[np.float64], base: NDArray[np.float64], rng: np.random.Generator, samples: int
) -> dict[str, Any]:
    """Relative lifts of the expected and realised rates and the utility difference per image, with intervals."""

    def statistic(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = _rates(a, True) / _rates(b, True) - 1.0
            realised = _rates(a, False) / _rates(b, False) - 1.0
        utility = (a[..., UTILITY] / a[..., IMAGES] - b[..., UTILITY] / b[..., IMAGES]).mean(axis=-1)
        return np.concatenate([expected, realised, utility[..., None]], axis=-1)

    point, boot = paired(arm, base, statistic, rng, samples)
    names = (
        "expected_ctr",
        "expected_conversion",
        "expected_return_rate",
        "realised_ctr",
        "realised_conversion",
        "realised_return_rate",
        "utility",
    )
    return {name: Estimate(float(point[i]), interval(boot[:, i])).as_dict() for i, name in enumerate(names)}


def levels(totals: NDArray[np.float64]) -> dict[str, float]:
    expected, realised = _rates(totals, True), _rates(totals, False)
    return {
        "expected_ctr": float(expected[0]),
        "expected_conversion": float(expected[1]),
        "expected_return_rate": float(expected[2]),
        "realised_ctr": float(realised[0]),
        "utility_per_image": float(totals[:, UTILITY].sum() / totals[:, IMAGES].sum()),
    }


def own_over_partner(
    panel: PreferencePanel,
    showings: Sequence[Showing],
    draws: ArmDraws,
    viewers: Sequence[str],
    rng: np.random.Generator,
    samples: int,
) -> dict[str, Any] | None:
    """Per viewer, the mean true utility per image of the images drawn with their own u less those drawn, same
    prompt and seeds, with the u of a shopper of another segment; bootstrap over viewers."""
    if draws.partner_images is None:
        return None
    differences: dict[str, list[float]] = {viewer: [] for viewer in viewers}
    for showing, own, other in zip(showings, draws.images, draws.partner_images, strict=True):
        if showing.viewer in differences:
            differences[showing.viewer].append(
                float(np.mean(panel.utilities(showing.viewer, own)) - np.mean(panel.utilities(showing.viewer, other)))
            )
    values = np.array([np.mean(v) for v in differences.values() if v], dtype=np.float64)
    if values.size == 0:
        return None
    return {**mean_with_interval(values, rng, samples), "per_viewer": values.tolist()}


def mean_with_interval(values: NDArray[np.float64], rng: np.random.Generator, samples: int) -> dict[str, Any]:
    """The mean of per-viewer values with its 95% bootstrap interval over viewers."""
    boot = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    return Estimate(float(values.mean()), interval(boot)).as_dict()


def integrity(draws: ArmDraws, base: ArmDraws) -> dict[str, Any]:
    shift = float(
        np.mean(
            [
                np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()
                for a, b in zip(draws.images, base.images, strict=True)
            ]
        )
    )
    return {
        "mean_abs_pixel_shift_from_base": shift,
        "garment_mask_coverage": mask_coverage(np.concatenate(draws.images)),
        "gate_publish": draws.gate.get("publish"),
        "gate_reasons": draws.gate.get("reasons", []),
        "reward_model_heldout_gauc": draws.gate.get("metrics", {}).get("rm_gauc"),
        "reward_model_heldout_gauc_ci95": [
            draws.gate.get("metrics", {}).get("rm_gauc_low"),
            draws.gate.get("metrics", {}).get("rm_gauc_high"),
        ],
        "ranked_by_reward_model": draws.ranked_by_reward_model,
        "seconds": draws.seconds,
    }


def score_arms(
    panel: PreferencePanel,
    showings: Sequence[Showing],
    draws: dict[str, ArmDraws],
    groups: dict[str, list[str]],
    segments: dict[str, str],
    seed: int,
    bootstrap_samples: int,
) -> dict[str, Any]:
    """Every arm against base: per viewer group (shoppers, cold, merchants), per segment of the shoppers, the
    personalisation check, integrity, and the robustness sweep of the shoppers' expected CTR lift."""
    marketplace = Marketplace(panel)
    base = draws[BASELINE]
    results: dict[str, Any] = {}
    for name, arm in draws.items():
        rng = np.random.default_rng([seed, 4])
        entry: dict[str, Any] = {"by_viewers": {}, "by_segment": {}, "integrity": integrity(arm, base)}
        for group, viewers in groups.items():
            if not viewers:
                continue
            arm_totals = viewer_totals(panel, marketplace, showings, arm.images, viewers, seed)
            base_totals = viewer_totals(panel, marketplace, showings, base.images, viewers, seed)
            entry["by_viewers"][group] = {
                "levels": levels(arm_totals),
                "vs_base": lifts(arm_totals, base_totals, rng, bootstrap_samples),
                "own_u_over_other_segment_u": own_over_partner(panel, showings, arm, viewers, rng, bootstrap_samples),
                "viewers": len(viewers),
                # [V, 8] per-viewer totals of the arm and of base, for pooling seeds (simulator.science.pooled).
                "totals": arm_totals.tolist(),
                "base_totals": base_totals.tolist(),
            }
        shoppers = groups["shoppers"]
        for segment in sorted({segments[viewer] for viewer in shoppers}):
            members = [viewer for viewer in shoppers if segments[viewer] == segment]
            arm_totals = viewer_totals(panel, marketplace, showings, arm.images, members, seed)
            base_totals = viewer_totals(panel, marketplace, showings, base.images, members, seed)
            entry["by_segment"][segment] = lifts(arm_totals, base_totals, rng, bootstrap_samples)
        entry["robustness_expected_ctr_lift"] = robustness(panel, showings, arm, base, shoppers, seed)
        entry["update"] = arm.update
        entry["rounds"] = arm.rounds
        results[name] = entry
    return results


def robustness(
    panel: PreferencePanel,
    showings: Sequence[Showing],
    arm: ArmDraws,
    base: ArmDraws,
    viewers: Sequence[str],
    seed: int,
) -> list[dict[str, float]]:
    """The shoppers' expected CTR lift of the same images under other click models (position decay, click slope):
    robustness of the reading only; the logged round and every setting stay as they were."""
    rows = []
    for decay, slope in ROBUSTNESS_GRID:
        marketplace = Marketplace(panel, BehaviourConfig(position_decay=decay, click_slope=slope))
        arm_totals = viewer_totals(panel, marketplace, showings, arm.images, viewers, seed)
        base_totals = viewer_totals(panel, marketplace, showings, base.images, viewers, seed)
        lift = float(_rates(arm_totals, True)[0] / _rates(base_totals, True)[0] - 1.0)
        rows.append({"position_decay": decay, "click_slope": slope, "expected_ctr_lift": lift})
    return rows
