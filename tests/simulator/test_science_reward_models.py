"""The offline reward-model comparison fitted on draws of a few groups a step, as the science evaluation runs it."""

from __future__ import annotations

import numpy as np

from simulator.eval.arm import RewardExample
from simulator.eval.config import EvaluationConfig
from simulator.eval.plan import LIVE
from simulator.eval.reward_models import TRUE_UTILITY_CEILING, compare_reward_models


def test_fitting_on_draws_of_groups_scores_every_heldout_group(text_encoder: object) -> None:
    rng = np.random.default_rng(0)
    examples = []
    for index in range(12):
        images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
        utilities = rng.normal(size=4)
        grades = [int(position == int(np.argmax(utilities))) for position in range(4)]
        examples.append(
            RewardExample(
                slice=LIVE if index < 8 else "heldout",
                prompt="a dress",
                user_vector=rng.random(42).tolist(),
                images=images,
                grades=grades,
                true_utilities=utilities.tolist(),
            )
        )
    config = EvaluationConfig(offline_rm_steps=3, bootstrap_samples=100)
    results = compare_reward_models(examples, config, text_encoder, groups_per_step=3)
    assert set(results) == {"perfusion_rm", "rm_without_plugins", TRUE_UTILITY_CEILING}
    assert all(values["heldout_groups"] == 4.0 for values in results.values())
    assert results[TRUE_UTILITY_CEILING]["gauc"] == 1.0  # the best image by utility is the positive of each group
