"""The plan every arm follows: who plays which role, and each round's showings (users, prompts, seeds, times)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from perfusion.attributes import ATTRIBUTE_KINDS
from simulator.eval.config import EvaluationConfig
from simulator.ground_truth import PixelPreferencePanel

LIVE: Final = "live"  # training users on training prompts, the showings whose events reach Kafka
HELDOUT_PROMPT: Final = "heldout_prompt"  # training users on prompts never trained on
COLD_START: Final = "cold_start"  # users with a profile and no behaviour
MERCHANT: Final = "merchant"  # a merchant selecting among the candidates of their design; not measured
SliceName = Literal["live", "heldout_prompt", "cold_start"]
SLICES: tuple[SliceName, ...] = (LIVE, HELDOUT_PROMPT, COLD_START)  # the measured slices
GARMENTS = ATTRIBUTE_KINDS["garment"]
TRAIN_PROMPTS: tuple[str, ...] = tuple(f"a {garment}" for garment in GARMENTS[:4])
HELDOUT_PROMPTS: tuple[str, ...] = tuple(f"a {garment}" for garment in GARMENTS[4:])
ROUND_SPAN_S = 7200.0  # event time between rounds: more than the group builder's window plus its lateness


@dataclass(frozen=True)
class Showing:
    """One planned impression: who sees which prompt, when, with which seeds."""

    slice: str
    viewer_id: str
    prompt: str
    design_id: str
    ts: float
    seed: int  # generation seed (candidate i uses seed + i) and marketplace stream


@dataclass(frozen=True)
class Population:
    train_users: list[str]
    cold_users: list[str]
    merchants: list[str]


def pixel_panel(n_users: int, seed: int) -> PixelPreferencePanel:
    """The pixel panel of ``n_users`` shoppers, scaled on catalog renders (not on anything a model generated)."""
    from perfusion.catalog import all_attributes, render_many

    panel = PixelPreferencePanel(n_users=n_users, seed=seed)
    rng = np.random.default_rng(seed)
    items = all_attributes()
    chosen = [items[index] for index in rng.choice(len(items), size=min(512, len(items)), replace=False)]
    return panel.fit_scale(render_many(chosen, seeds=list(range(len(chosen)))))


def build_panel(config: EvaluationConfig) -> tuple[PixelPreferencePanel, Population]:
    """The shopper panel (:func:`pixel_panel`) and who plays which role."""
    panel = pixel_panel(config.train_users + config.cold_users + config.merchants, config.seed)
    users = panel.user_ids()
    train = users[: config.train_users]
    cold = users[config.train_users : config.train_users + config.cold_users]
    merchants = users[config.train_users + config.cold_users :]
    return panel, Population(train, cold, merchants)


def round_start(config: EvaluationConfig, round_index: int, origin: float) -> float:
    return origin + round_index * ROUND_SPAN_S


def plan_round(config: EvaluationConfig, population: Population, round_index: int, origin: float) -> list[Showing]:
    """The showings of one round; the same for every arm."""
    rng = np.random.default_rng([config.seed, round_index])
    start = round_start(config, round_index, origin) + 10.0
    showings: list[Showing] = []

    def add(slice_name: str, viewer: str, prompt: str, design_id: str) -> None:
        index = len(showings)
        seed = int(rng.integers(0, 2**31 - 1))
        showings.append(Showing(slice_name, viewer, prompt, design_id, start + 2.0 * index, seed))

    for user in population.train_users:
        for prompt in rng.choice(TRAIN_PROMPTS, size=config.impressions_per_user, replace=True):
            add(LIVE, user, str(prompt), design_id(round_index, str(prompt)))
    for merchant_index, merchant in enumerate(population.merchants):
        for prompt_index, prompt in enumerate(TRAIN_PROMPTS):
            if prompt_index % len(population.merchants) == merchant_index:
                add(MERCHANT, merchant, prompt, design_id(round_index, prompt))
    for user in population.train_users:
        prompt = str(rng.choice(HELDOUT_PROMPTS))
        add(HELDOUT_PROMPT, user, prompt, design_id(round_index, prompt))
    for user in population.cold_users:
        prompt = str(rng.choice(TRAIN_PROMPTS))
        add(COLD_START, user, prompt, design_id(round_index, prompt))
    return showings


def design_id(round_index: int, prompt: str) -> str:
    return f"design-r{round_index}-{prompt.removeprefix('a ').replace(' ', '_')}"


def design_owner(population: Population, prompt: str) -> str:
    index = (TRAIN_PROMPTS + HELDOUT_PROMPTS).index(prompt)
    return population.merchants[index % len(population.merchants)]
