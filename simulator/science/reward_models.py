"""The reward models on the science evaluation's round 0: PerFusionRM and the same towers without plug-ins, fitted
on one share of the logged groups and ranked on the rest (all held-out groups, and the merchants' selections
alone), against the simulator's true utilities as the ceiling (the evaluation's comparison,
:func:`simulator.eval.reward_models.compare_reward_models`, on these groups)."""

from __future__ import annotations

from typing import Any

import numpy as np

from simulator.eval.arm import RewardExample
from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import LIVE
from simulator.eval.reward_models import compare_reward_models
from simulator.ground_truth import PreferencePanel
from simulator.science.config import ScienceConfig
from simulator.science.logging_round import LoggedRound, Roles

HELDOUT_SHARE = 0.3  # of the logged groups, chosen by a seeded draw; the rest fits the models
HELDOUT = "heldout"
# Live groups a fitting step draws: the trainer's reward-model steps see a batch, not the whole log.
GROUPS_PER_STEP = 16


def reward_model_comparison(
    config: ScienceConfig, panel: PreferencePanel, logged: LoggedRound, roles: Roles, text_encoder: Any
) -> dict[str, Any]:
    """GAUC of both models and the ceiling on all held-out groups and on the held-out merchant selections."""
    rng = np.random.default_rng([config.seed, 5])
    examples = []
    for sample in logged.samples:
        images = np.stack([logged.pixels[c.image_id] for c in sorted(sample.candidates, key=lambda c: c.position)])
        grades = [c.grade for c in sorted(sample.candidates, key=lambda c: c.position)]
        example = RewardExample(
            slice=HELDOUT if rng.random() < HELDOUT_SHARE else LIVE,
            prompt=sample.prompt,
            user_vector=logged.impression_vectors[sample.sample_id].tolist(),
            images=images,
            grades=grades,
            true_utilities=[float(v) for v in panel.utilities(sample.user_id, images)],
        )
        examples.append((sample.user_id in roles.merchants, example))
    settings = EvaluationConfig(
        offline_rm_steps=config.reward_steps,
        seed=config.seed,
        bootstrap_samples=config.bootstrap_samples,
        base_checkpoint=config.base_checkpoint,
    )
    everything = [example for _, example in examples]
    if {example.slice for example in everything} != {LIVE, HELDOUT}:
        return {}  # a round too small to split (the quick size): nothing to compare
    merchants_heldout = [e for is_merchant, e in examples if e.slice == LIVE or is_merchant]
    per_step = GROUPS_PER_STEP
    results = {"all_heldout_groups": compare_reward_models(everything, settings, text_encoder, per_step)}
    if any(is_merchant and e.slice == HELDOUT for is_merchant, e in examples):
        results["heldout_merchant_selections"] = compare_reward_models(
            merchants_heldout, settings, text_encoder, per_step
        )
    return results
