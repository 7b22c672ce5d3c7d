"""The evaluation's statistics: ratios of sums over users, paired bootstrap intervals, lifts over the base arm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulator.eval.arm import ArmRun, Outcome
from simulator.eval.config import BASELINE_ARM, EvaluationConfig
from simulator.eval.plan import COLD_START, HELDOUT_PROMPT, LIVE, SLICES, Population

METRICS: tuple[str, ...] = ("ctr", "conversion", "return_rate", "utility")
RELATIVE_METRICS: tuple[str, ...] = ("ctr", "conversion", "return_rate")  # lifts over base as a relative change


def user_totals(outcomes: Sequence[Outcome], users: Sequence[str]) -> NDArray[np.float64]:
    """(U, 5) sums per user: clicks, orders, returns, shown, utility_sum."""
    index = {user: row for row, user in enumerate(users)}
    totals = np.zeros((len(users), 5))
    for outcome in outcomes:
        totals[index[outcome.user_id]] += (
            outcome.clicks,
            outcome.orders,
            outcome.returns,
            outcome.shown,
            outcome.utility_sum,
        )
    return totals


def metrics_of(totals: NDArray[np.float64]) -> dict[str, Any]:
    """Ratios of sums over the rows of ``totals`` (..., U, 5) -> metric name -> value(s); NaN where undefined."""
    clicks, orders, returns, shown, utility = (totals[..., column].sum(axis=-1) for column in range(5))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "ctr": clicks / shown,
            "conversion": orders / clicks,
            "return_rate": returns / orders,
            "utility": utility / shown,
        }


def interval(values: NDArray[np.float64]) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    low, high = np.percentile(finite, [2.5, 97.5])
    return [float(low), float(high)]


def summarize(runs: dict[str, ArmRun], config: EvaluationConfig, population: Population) -> dict[str, Any]:
    """Per slice, round and arm: each metric with its 95% bootstrap interval over users, and its lift over base.

    One resampling of users serves every arm (paired), so an arm's lift over base is computed on the same users.
    """
    rng = np.random.default_rng([config.seed, 7])
    summary: dict[str, Any] = {}
    for slice_name in SLICES:
        users = population.cold_users if slice_name == COLD_START else population.train_users
        resamples = rng.integers(0, len(users), size=(config.bootstrap_samples, len(users)))
        per_round: dict[str, Any] = {}
        for round_index in range(config.rounds + 1):
            totals = {
                arm: user_totals([o for o in run.outcomes if o.slice == slice_name and o.round == round_index], users)
                for arm, run in runs.items()
            }
            boot = {arm: metrics_of(table[resamples]) for arm, table in totals.items()}
            per_arm: dict[str, Any] = {}
            for arm, table in totals.items():
                point = metrics_of(table)
                entry: dict[str, Any] = {}
                for metric in METRICS:
                    entry[metric] = {"value": float(point[metric]), "ci95": interval(boot[arm][metric])}
                    if arm != BASELINE_ARM and BASELINE_ARM in totals:
                        base_point = float(metrics_of(totals[BASELINE_ARM])[metric])
                        # Utility has no natural zero, so its lift is a difference; the rates' lifts are relative.
                        scale_boot = np.abs(boot[BASELINE_ARM][metric]) if metric in RELATIVE_METRICS else 1.0
                        scale = np.abs(np.float64(base_point)) if metric in RELATIVE_METRICS else np.float64(1.0)
                        with np.errstate(invalid="ignore", divide="ignore"):
                            lift = (boot[arm][metric] - boot[BASELINE_ARM][metric]) / scale_boot
                            relative = (np.float64(point[metric]) - base_point) / scale
                        entry[metric]["lift_vs_base"] = {"value": float(relative), "ci95": interval(lift)}
                entry["impressions"] = int(
                    sum(1 for o in runs[arm].outcomes if o.slice == slice_name and o.round == round_index)
                )
                per_arm[arm] = entry
            per_round[str(round_index)] = per_arm
        summary[slice_name] = per_round
    return summary


def generator_shift(runs: dict[str, ArmRun]) -> dict[str, dict[str, float]]:
    """How far each arm's final-round images are from the base model's for the very same showing (same viewer,
    prompt and seeds): the mean absolute pixel difference (0..255), overall and per slice. 0 means the updates did
    not change what shoppers see; it tells a generator that did not move from one that moved the wrong way."""
    if BASELINE_ARM not in runs:
        return {}
    base = runs[BASELINE_ARM].final_images
    shifts: dict[str, dict[str, float]] = {}
    for arm, run in runs.items():
        if arm == BASELINE_ARM:
            continue
        differences: dict[str, list[float]] = {}
        for key, images in run.final_images.items():
            if key in base:
                difference = np.abs(images.astype(np.float64) - base[key].astype(np.float64)).mean()
                differences.setdefault(key[0], []).append(float(difference))
        every = [value for values in differences.values() for value in values]
        shifts[arm] = {
            "mean_abs_pixel_diff": float(np.mean(every)) if every else float("nan"),
            "showings": float(len(every)),
            **{f"{name}_mean_abs_pixel_diff": float(np.mean(values)) for name, values in differences.items()},
        }
    return shifts


def utility_by_segment(
    runs: dict[str, ArmRun], config: EvaluationConfig, users: Sequence[str], segments: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Arm -> segment -> the final round's mean true utility per image less base's, on the live and held-out-prompt
    showings of that segment's users, with a 95% paired bootstrap interval over them.

    One number per arm hides which way a generator moved: a shift every shopper gets alike raises utility for the
    segments whose taste it matches and lowers it for the others; personalisation raises it for each segment.
    """
    if BASELINE_ARM not in runs:
        return {}
    rng = np.random.default_rng([config.seed, 11])

    def per_user_utility(run: ArmRun) -> NDArray[np.float64]:
        final = [o for o in run.outcomes if o.round == config.rounds and o.slice in (LIVE, HELDOUT_PROMPT)]
        totals = user_totals(final, users)
        with np.errstate(invalid="ignore", divide="ignore"):
            return totals[:, 4] / totals[:, 3]

    base = per_user_utility(runs[BASELINE_ARM])
    result: dict[str, dict[str, Any]] = {}
    for arm, run in runs.items():
        if arm == BASELINE_ARM:
            continue
        difference = per_user_utility(run) - base
        per_segment: dict[str, Any] = {}
        for segment in sorted({segments[user] for user in users}):
            values = difference[[row for row, user in enumerate(users) if segments[user] == segment]]
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            boot = values[rng.integers(0, values.size, size=(config.bootstrap_samples, values.size))].mean(axis=1)
            per_segment[segment] = {"value": float(values.mean()), "ci95": interval(boot), "users": int(values.size)}
        result[arm] = per_segment
    return result


def bootstrap_gauc(
    scores: dict[str, NDArray[np.float64]], labels: Any, groups: Any, seed: int, samples: int
) -> dict[str, NDArray[np.float64]]:
    """GAUC of every score vector on the same resamplings (with replacement) of the held-out groups."""
    from perfusion.metrics import gauc

    group_ids = np.unique(groups)
    members = {group: np.flatnonzero(groups == group) for group in group_ids}
    rng = np.random.default_rng([seed, 7])
    boot = {name: np.empty(samples) for name in scores}
    for draw in range(samples):
        chosen = rng.choice(group_ids, size=group_ids.size, replace=True)
        rows = np.concatenate([members[group] for group in chosen])
        # A group drawn twice counts as two groups: renumber by draw position.
        drawn_groups = np.concatenate([np.full(members[group].size, n) for n, group in enumerate(chosen)])
        for name, model_scores in scores.items():
            boot[name][draw] = gauc(model_scores[rows], labels[rows], drawn_groups)
    return boot
