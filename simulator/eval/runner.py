"""The run: every arm, in turn or a few at a time each in a process of its own, then the metrics."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.eval.arm import ArmRun, run_arm
from simulator.eval.config import BASELINE_ARM, EvaluationConfig
from simulator.eval.plan import ROUND_SPAN_S, TRAIN_PROMPTS, Population, build_panel
from simulator.eval.results import EvaluationSummary
from simulator.eval.reward_models import compare_reward_models
from simulator.eval.stats import generator_shift, summarize, utility_by_segment
from simulator.ground_truth import PixelPreferencePanel

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """What :func:`run_evaluation` returns: the validated numbers, and what only the report's plots read (each arm's
    images, the users' segments), which stay in this process and out of ``results.json``."""

    config: EvaluationConfig
    arms: dict[str, ArmRun]
    segments: dict[str, str]  # user -> segment (for the image grid)
    grid_prompt: str
    summary: EvaluationSummary
    wall_seconds: float


def arms_at_once(config: EvaluationConfig) -> int:
    """How many arms run in parallel: ``config.parallel_arms``, or for 0 one per two CPU cores (at least 1)."""
    wanted = config.parallel_arms or (os.cpu_count() or 1) // 2
    return max(1, min(wanted, len(config.arms)))


def arm_inputs(config: EvaluationConfig) -> tuple[PixelPreferencePanel, Population, Any]:
    """What every arm shares, built from the config alone (deterministic in its seed): panel, users, text encoder.
    Also sets torch's threads for this process."""
    import torch

    from perfusion.sampling import base_text_encoder

    torch.set_num_threads(config.torch_threads)
    panel, population = build_panel(config)
    return panel, population, base_text_encoder(config.base_checkpoint)


def run_arm_in_own_process(
    arm: str, config: EvaluationConfig, bootstrap: str, work_dir: Path, origin: float, grid_prompt: str
) -> ArmRun:
    """:func:`run_arm` in a worker process of ``--parallel-arms``, on :func:`arm_inputs` rebuilt from the config, so the
    arm sees exactly what it sees when run in turn."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{arm}] %(levelname)s %(name)s: %(message)s")
    panel, population, text_encoder = arm_inputs(config)
    log.info("arm %s: starting in process %d", arm, os.getpid())
    return run_arm(arm, config, panel, population, bootstrap, work_dir, text_encoder, origin, grid_prompt)


def run_evaluation(config: EvaluationConfig, bootstrap: str, work_dir: Path) -> EvaluationResult:
    """Every arm of ``config``, ``config.parallel_arms`` at a time, then the metrics."""
    started = time.monotonic()
    panel, population, text_encoder = arm_inputs(config)
    origin = time.time() - (config.rounds + 3) * ROUND_SPAN_S
    grid_prompt = TRAIN_PROMPTS[0]
    runs: dict[str, ArmRun] = {}
    workers = arms_at_once(config)
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per arm, not a fork of this one with torch's threads and Kafka clients.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                arm: pool.submit(run_arm_in_own_process, arm, config, bootstrap, work_dir, origin, grid_prompt)
                for arm in config.arms
            }
            runs = {arm: future.result() for arm, future in futures.items()}
    else:
        for arm in config.arms:
            log.info("arm %s: starting", arm)
            runs[arm] = run_arm(arm, config, panel, population, bootstrap, work_dir, text_encoder, origin, grid_prompt)
    for arm, run in runs.items():
        log.info("arm %s: done in %.0f s, versions %s", arm, run.seconds, run.versions)
    summary = EvaluationSummary.model_validate(
        {
            "metrics": summarize(runs, config, population),
            "reward_models": compare_reward_models(
                runs["perfusion" if "perfusion" in runs else BASELINE_ARM].reward_examples, config, text_encoder
            ),
            "generator_shift_vs_base": generator_shift(runs),
            "utility_vs_base_by_segment": utility_by_segment(
                runs, config, population.train_users, {user: panel.segment(user) for user in population.train_users}
            ),
            "arms": {
                arm: {"versions": run.versions, "gate_refusals": run.refusals, "seconds": run.seconds}
                for arm, run in runs.items()
            },
            "config": config,
        }
    )
    segments = {user: panel.segment(user) for user in population.train_users + population.cold_users}
    return EvaluationResult(config, runs, segments, grid_prompt, summary, time.monotonic() - started)
