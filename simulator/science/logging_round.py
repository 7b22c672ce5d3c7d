"""Round 0 of the science evaluation: who plays which role, the base model's groups, the viewers' responses as
events through the in-process loop, and the showings every arm is scored on afterwards. Shared by every arm.

Nothing here reads a shopper's taste for the system: the simulator's panel decides the responses (as the live
shoppers would), and only the events reach the loop.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from perfusion.errors import ConfigError
from simulator.eval.plan import HELDOUT_PROMPTS, TRAIN_PROMPTS
from simulator.ground_truth import PixelPreferencePanel, PreferencePanel
from simulator.marketplace import Marketplace
from simulator.science.config import ScienceConfig
from simulator.science.inloop import InProcessLoop
from simulator.traffic import TrafficConfig, TrafficSimulator

if TYPE_CHECKING:
    from service.generator import PersonalizedGenerator

log = logging.getLogger(__name__)

SEGMENTS = 4  # the pixel panel's segments; shoppers and merchants are assigned round-robin over them
ROUND_ZERO_TS = 1_000_000.0  # event time of the first round-0 impression (any fixed origin: u holds no recency)
SHOWING_GAP_S = 2.0


@dataclass(frozen=True)
class Roles:
    shoppers: list[str]
    cold: list[str]
    merchants: list[str]


@dataclass(frozen=True)
class Showing:
    """One group to draw after the update: who sees which prompt with which seeds, and with which u."""

    viewer: str
    role: str  # "shopper" (a training shopper), "cold" or "merchant"
    prompt: str
    heldout_prompt: bool
    seed: int  # candidate i uses seed + i
    user_vector: NDArray[np.float32]
    partner: str | None  # a viewer of another segment, whose u draws the same showing for the personalisation check
    partner_vector: NDArray[np.float32] | None


@dataclass
class LoggedRound:
    """What the update trains on and what every arm is scored on."""

    samples: list[Any]  # GroupSample
    pixels: dict[str, NDArray[np.uint8]]  # image id -> (H, W, 3)
    impression_vectors: dict[str, NDArray[np.float32]]  # sample id -> u at impression time
    showings: list[Showing]
    segments: dict[str, str]
    events: int


def load_panel(config: ScienceConfig, n_users: int) -> PreferencePanel:
    """The shoppers' panel: the pixel panel scaled on catalog renders, or ``config.panel`` (module:Class)."""
    if config.panel is None:
        from perfusion.catalog import all_attributes, render_many

        panel = PixelPreferencePanel(n_users=n_users, seed=config.seed)
        rng = np.random.default_rng(config.seed)
        items = all_attributes()
        chosen = [items[index] for index in rng.choice(len(items), size=min(512, len(items)), replace=False)]
        return panel.fit_scale(render_many(chosen, seeds=list(range(len(chosen)))))
    module_name, _, class_name = config.panel.partition(":")
    try:
        panel_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--panel {config.panel}: cannot import {class_name} from {module_name} ({exc})") from exc
    plugged = panel_class(n_users=n_users, seed=config.seed)
    for method in ("user_ids", "profile", "utilities"):
        if not callable(getattr(plugged, method, None)):
            raise ConfigError(f"--panel {config.panel}: a PreferencePanel needs a {method}() method")
    return plugged


def segment_of(panel: PreferencePanel, user: str, index: int) -> str:
    """The panel's segment of ``user`` when it reports one, else the round-robin slot it was drawn in."""
    segment = getattr(panel, "segment", None)
    return str(segment(user)) if callable(segment) else f"segment-{index % SEGMENTS}"


def assign_roles(config: ScienceConfig, panel: PreferencePanel) -> Roles:
    users = panel.user_ids()
    shoppers = SEGMENTS * config.shoppers_per_segment
    merchants = SEGMENTS * config.merchants_per_segment
    needed = shoppers + config.cold_shoppers + merchants
    if len(users) < needed:
        raise ConfigError(f"the panel has {len(users)} users, the config needs {needed}")
    return Roles(
        shoppers=users[:shoppers],
        cold=users[shoppers : shoppers + config.cold_shoppers],
        merchants=users[shoppers + config.cold_shoppers : needed],
    )


def merchant_prompt(roles: Roles, merchant: str, heldout: bool) -> str:
    prompts = HELDOUT_PROMPTS if heldout else TRAIN_PROMPTS
    return prompts[roles.merchants.index(merchant) % len(prompts)]


def log_round_zero(
    config: ScienceConfig, panel: PreferencePanel, roles: Roles, generator: PersonalizedGenerator
) -> LoggedRound:
    """The base model's round-0 groups, the viewers' events folded by the in-process loop, and the showings."""

    profiles = {user: panel.profile(user) for user in roles.shoppers + roles.cold}
    store_regions = {merchant: int(panel.profile(merchant)["region"]) for merchant in roles.merchants}
    loop = InProcessLoop(profiles, store_regions)
    traffic = TrafficSimulator(TrafficConfig(seed=config.seed))
    marketplace = Marketplace(panel)
    rng = np.random.default_rng([config.seed, 0])
    pixels: dict[str, NDArray[np.uint8]] = {}
    impression_vectors: dict[str, NDArray[np.float32]] = {}
    designs: dict[str, str] = {}  # design id -> prompt
    ts = ROUND_ZERO_TS
    for merchant in roles.merchants:
        for heldout in (False, True):
            prompt = merchant_prompt(roles, merchant, heldout)
            design_id = f"design-{merchant}-{prompt.removeprefix('a ').replace(' ', '_')}"
            loop.apply([traffic.design_event(design_id, merchant, prompt, ts)])
            designs[design_id] = prompt
    train_designs = [design for design, prompt in designs.items() if prompt in TRAIN_PROMPTS]

    def show(viewer: str, design_id: str, seed: int, as_merchant: bool) -> None:
        nonlocal ts
        ts += SHOWING_GAP_S
        prompt = designs[design_id]
        u = loop.user_vector(viewer)
        group = generator.generate(prompt, None, config.k, seed)
        image_ids = [f"r0-{seed}-{position}" for position in range(config.k)]
        impression = traffic.impression_event(
            viewer, design_id, prompt, group.model_version, image_ids, group.descriptors, ts
        )
        draw_rng = np.random.default_rng([config.seed, seed])
        if as_merchant:
            response = marketplace.merchant_selection(viewer, group.images, draw_rng)
        else:
            response = marketplace.shopper_response(viewer, group.images, draw_rng)
        loop.apply([impression, *traffic.response_events(impression, response)])
        impression_vectors[impression.event_id] = u
        pixels.update(zip(image_ids, group.images, strict=True))

    for round_index in range(config.logged_groups):
        for shopper in roles.shoppers:
            design_id = str(rng.choice(train_designs))
            show(shopper, design_id, int(rng.integers(0, 2**31 - 1)), as_merchant=False)
        log.info("round 0: %d of %d groups per shopper", round_index + 1, config.logged_groups)
    for merchant in roles.merchants:
        own = [design for design in train_designs if design.startswith(f"design-{merchant}-")]
        for _ in range(config.merchant_groups):
            show(merchant, own[0], int(rng.integers(0, 2**31 - 1)), as_merchant=True)
    samples = loop.group_samples()
    missing = [sample.sample_id for sample in samples if sample.sample_id not in impression_vectors]
    if missing:
        raise ConfigError(f"group samples without a logged impression: {missing[:3]}")
    indices = {user: index for index, user in enumerate(panel.user_ids())}
    segments = {user: segment_of(panel, user, indices[user]) for user in roles.shoppers + roles.cold + roles.merchants}
    showings = plan_showings(config, roles, loop, segments)
    return LoggedRound(samples, pixels, impression_vectors, showings, segments, len(loop.events))


def plan_showings(config: ScienceConfig, roles: Roles, loop: InProcessLoop, segments: dict[str, str]) -> list[Showing]:
    """The groups every arm draws after the update, with each viewer's u after round 0 (seeds no round-0 group
    used: drawn from a stream of their own)."""
    rng = np.random.default_rng([config.seed, 1])
    viewers = roles.shoppers + roles.cold + roles.merchants

    def partner_of(viewer: str) -> str:
        later = viewers[viewers.index(viewer) + 1 :] + viewers[: viewers.index(viewer)]
        candidates = [other for other in later if other in roles.shoppers and segments[other] != segments[viewer]]
        if not candidates:
            raise ConfigError("the personalisation check needs shoppers of at least two segments")
        return candidates[0]

    def showing(viewer: str, role: str, prompt: str, heldout: bool) -> Showing:
        partner = partner_of(viewer)
        return Showing(
            viewer=viewer,
            role=role,
            prompt=prompt,
            heldout_prompt=heldout,
            seed=int(rng.integers(0, 2**31 - 1)),
            user_vector=loop.user_vector(viewer),
            partner=partner,
            partner_vector=loop.user_vector(partner),
        )

    showings = []
    for shopper in roles.shoppers:
        for index in range(config.eval_showings):
            heldout = index % 2 == 1
            prompt = str(rng.choice(HELDOUT_PROMPTS if heldout else TRAIN_PROMPTS))
            showings.append(showing(shopper, "shopper", prompt, heldout))
    for cold in roles.cold:
        showings.append(showing(cold, "cold", str(rng.choice(TRAIN_PROMPTS)), False))
    for merchant in roles.merchants:
        showings.append(showing(merchant, "merchant", merchant_prompt(roles, merchant, heldout=True), True))
    return showings
