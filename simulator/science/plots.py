"""The pooled report's plot: every arm's lift over base, per test seed and pooled, with its interval."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulator.science.pooled import TARGETS

LIFT_METRICS = ("expected_ctr", "expected_conversion", "expected_return_rate")
LIFT_LABELS = {
    "expected_ctr": "expected CTR",
    "expected_conversion": "expected conversion",
    "expected_return_rate": "expected return rate",
}


def plot_lifts(results: Sequence[dict[str, Any]], pooled: dict[str, Any], path: Path) -> None:
    """One panel per metric: a row per arm, a point and 95% interval per seed (training shoppers, relative lift
    over base) and the pooled one above them in black; the product target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(pooled["pooled"])
    seeds = pooled["seeds"]
    figure, axes = plt.subplots(1, len(LIFT_METRICS), figsize=(5 * len(LIFT_METRICS), 0.6 * len(arms) + 1.5))
    step = 0.8 / (len(seeds) + 1)  # rows: the seeds, then the pool, inside one arm's band
    for axis, metric in zip(axes, LIFT_METRICS, strict=True):
        for row, arm in enumerate(arms):
            estimates = [result["arms"][arm]["by_viewers"]["shoppers"]["vs_base"][metric] for result in results]
            estimates.append(pooled["pooled"][arm]["vs_base"][metric])
            for index, estimate in enumerate(estimates):
                y = row + 0.4 - step * (index + 0.5)
                value, (low, high) = 100 * estimate["value"], (100 * bound for bound in estimate["ci95"])
                is_pool = index == len(seeds)
                axis.errorbar(
                    value, y, xerr=[[value - low], [high - value]], fmt="o", capsize=2,
                    color="black" if is_pool else f"C{index}",
                    label=("pooled" if is_pool else f"seed {seeds[index]}") if row == 0 else None,
                )  # fmt: skip
        axis.axvline(0.0, color="grey", linewidth=0.8)
        axis.axvline(100 * TARGETS[metric], color="grey", linestyle="--", linewidth=0.8)
        axis.set_yticks(range(len(arms)))
        axis.set_yticklabels(arms if axis is axes[0] else [""] * len(arms), fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(f"{LIFT_LABELS[metric]}, % over base (dashed: target)", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
