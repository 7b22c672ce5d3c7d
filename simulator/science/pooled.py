"""The decision rule of docs/science-protocol.md applied to each test seed, and the seeds pooled.

:func:`verdicts` reads one seed's results; :func:`pool` resamples the viewers of every seed together (each seed's
panel draws its own viewers, so they are distinct) for the pooled figures. A claim stands only where it holds on
every seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simulator.science.config import BASELINE, BEST_OF_N
from simulator.science.scoring import lifts, mean_with_interval

FULL = "perfusion"
WITHOUT_USER_INPUT = ("sft", "pairwise_dpo", "group_without_adaptive", BEST_OF_N)
TARGETS = {"expected_ctr": 0.13, "expected_conversion": 0.13, "expected_return_rate": -0.079}


def verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    """The four claims for one seed (None: the arm needed is not in the run)."""
    arms = result["arms"]
    if FULL not in arms:
        return {"beats_base": None, "personalises": None, "no_segment_worse": None, "above_arms_without_u": None}
    shoppers = arms[FULL]["by_viewers"]["shoppers"]
    lift = shoppers["vs_base"]
    personal = shoppers["own_u_over_other_segment_u"]
    others = [name for name in WITHOUT_USER_INPUT if name in arms]
    return {
        "beats_base": lift["expected_ctr"]["ci95"][0] > 0
        and lift["expected_conversion"]["ci95"][0] > 0
        and lift["expected_return_rate"]["ci95"][1] < 0,
        "personalises": personal is not None and personal["ci95"][0] > 0,
        "no_segment_worse": all(entry["utility"]["ci95"][1] >= 0 for entry in arms[FULL]["by_segment"].values()),
        "above_arms_without_u": bool(others)
        and all(
            lift["expected_ctr"]["value"] > arms[name]["by_viewers"]["shoppers"]["vs_base"]["expected_ctr"]["value"]
            for name in others
        ),
    }


def pool(results: Sequence[dict[str, Any]], bootstrap_samples: int = 1000) -> dict[str, Any]:
    """Pooled lifts of every arm present in all seeds, per-seed verdicts, and which claims hold on every seed."""
    seeds = [result["config"]["seed"] for result in results]
    common = [name for name in results[0]["arms"] if all(name in result["arms"] for result in results)]
    rng = np.random.default_rng(seeds)
    pooled: dict[str, Any] = {}
    for name in common:
        if name == BASELINE:
            continue
        shoppers = [result["arms"][name]["by_viewers"]["shoppers"] for result in results]
        arm_totals = np.concatenate([np.asarray(s["totals"], dtype=np.float64) for s in shoppers])
        base_totals = np.concatenate([np.asarray(s["base_totals"], dtype=np.float64) for s in shoppers])
        entry: dict[str, Any] = {"vs_base": lifts(arm_totals, base_totals, rng, bootstrap_samples)}
        if all(s["own_u_over_other_segment_u"] for s in shoppers):
            values = np.concatenate([s["own_u_over_other_segment_u"]["per_viewer"] for s in shoppers])
            entry["own_u_over_other_segment_u"] = mean_with_interval(values.astype(np.float64), rng, bootstrap_samples)
        pooled[name] = entry
    per_seed = {str(seed): verdicts(result) for seed, result in zip(seeds, results, strict=True)}
    claims = per_seed[str(seeds[0])].keys()
    holds = {claim: all(v[claim] is True for v in per_seed.values()) for claim in claims}
    targets = {}
    if FULL in pooled:
        for metric, target in TARGETS.items():
            estimate = pooled[FULL]["vs_base"][metric]
            met = estimate["value"] >= target if target > 0 else estimate["value"] <= target
            targets[metric] = {"target": target, "pooled": estimate, "met_by_point": met}
    return {"seeds": seeds, "pooled": pooled, "verdicts": per_seed, "holds_on_every_seed": holds, "targets": targets}
