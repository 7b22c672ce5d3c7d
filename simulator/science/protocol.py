"""One seed of the science evaluation, end to end: round 0 logged once with the base model, every arm updated on
it and drawn (arms in parallel processes), then scored. The decision rule is docs/science-protocol.md's."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.science.arms import ArmDraws, run_arm, run_arm_in_own_process
from simulator.science.config import ScienceConfig
from simulator.science.grid import image_grid
from simulator.science.logging_round import SEGMENTS, assign_roles, load_panel, log_round_zero
from simulator.science.reward_models import reward_model_comparison
from simulator.science.scoring import score_arms

log = logging.getLogger(__name__)


def run_seed(config: ScienceConfig, grid_png: Path | None = None) -> dict[str, Any]:
    """Every arm of ``config`` on one seed; a JSON-ready dict (config, counts, per-arm results, wall times). With
    ``grid_png``, the image grid of one held-out prompt across segments is written there (simulator/science/grid.py)
    and described under ``"grid"``."""
    import torch

    from perfusion.sampling import base_text_encoder
    from service.generator import load_serving_generator

    started = time.monotonic()
    torch.set_num_threads(config.torch_threads * config.parallel_arms)
    n_users = SEGMENTS * (config.shoppers_per_segment + config.merchants_per_segment) + config.cold_shoppers
    panel = load_panel(config, n_users)
    roles = assign_roles(config, panel)
    text_encoder = base_text_encoder(config.base_checkpoint)
    with tempfile.TemporaryDirectory(prefix="perfusion-science-") as empty_store:
        base = load_serving_generator(config.base_checkpoint, Path(empty_store), text_encoder, config.sampler)
    logged = log_round_zero(config, panel, roles, base)
    logged_seconds = time.monotonic() - started
    grades = [sum(1 for c in sample.candidates if c.grade > 0) for sample in logged.samples]
    log.info(
        "round 0: %d events, %d group samples (%d with a positive) in %.0f s",
        logged.events,
        len(logged.samples),
        sum(1 for count in grades if count),
        logged_seconds,
    )
    draws, reward_models = draw_every_arm(
        config, logged, lambda: reward_model_comparison(config, panel, logged, roles, text_encoder)
    )
    groups = {"shoppers": roles.shoppers, "cold": roles.cold, "merchants": roles.merchants}
    results = score_arms(panel, logged.showings, draws, groups, logged.segments, config.seed, config.bootstrap_samples)
    grid: dict[str, Any] | None = None
    if grid_png is not None:
        png, grid = image_grid(logged.showings, draws, logged.segments)
        grid_png.parent.mkdir(parents=True, exist_ok=True)
        grid_png.write_bytes(png)
        grid["file"] = grid_png.name
    return {
        "config": config.model_dump(mode="json"),
        "round_zero": {
            "events": logged.events,
            "group_samples": len(logged.samples),
            "groups_with_a_positive": sum(1 for count in grades if count),
            "merchant_samples": sum(1 for sample in logged.samples if sample.user_id in roles.merchants),
            "seconds": logged_seconds,
        },
        "showings": len(logged.showings),
        "best_of_n_floor": best_of_n_floor(),
        "reward_models": reward_models,
        "arms": results,
        "grid": grid,
        "wall_seconds": time.monotonic() - started,
    }


def draw_every_arm(
    config: ScienceConfig, logged: Any, meanwhile: Callable[[], dict[str, Any]]
) -> tuple[dict[str, ArmDraws], dict[str, Any]]:
    """Each arm's update and draws, ``config.parallel_arms`` processes at a time (spawned, one arm each), and
    ``meanwhile()`` in this process while they run."""
    if config.parallel_arms == 1:
        return {spec.name: run_arm(spec, config, logged) for spec in config.specs}, meanwhile()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(config.parallel_arms, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(run_arm_in_own_process, name, config, logged) for name in config.arms}
        side = meanwhile()
        draws = {}
        for name, future in futures.items():
            draws[name] = future.result()
            log.info("arm %s: done in %.0f s", name, draws[name].seconds)
    return draws, side


def best_of_n_floor() -> float:
    """The lower end of the held-out GAUC interval the service's best-of-N needs before it ranks."""
    from service.settings import BestOfSettings

    return float(BestOfSettings().gauc_floor)
