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
from simulator.eval.plan import HELDOUT_PROMPTS, TRAIN_PROMPTS, pixel_panel
from simulator.ground_truth import PreferencePanel
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
    logger: RoundLogger  # round 0's state, which a closed-loop arm continues (a copy per arm process)


def load_panel(config: ScienceConfig, n_users: int) -> PreferencePanel:
    """The shoppers' panel: the pixel panel scaled on catalog renders, or ``config.panel`` (module:Class)."""
    if config.panel is None:
        return pixel_panel(n_users, config.seed)
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


class RoundLogger:
    """Shows groups to viewers and folds the events of their responses into an :class:`InProcessLoop`, keeping the
    pixels and each impression's u. Round 0 draws with the base model; a closed-loop arm continues its own copy
    (its events, ids and clock go on from round 0's)."""

    def __init__(self, config: ScienceConfig, panel: PreferencePanel, roles: Roles) -> None:
        profiles = {user: panel.profile(user) for user in roles.shoppers + roles.cold}
        store_regions = {merchant: int(panel.profile(merchant)["region"]) for merchant in roles.merchants}
        self.config = config
        self.roles = roles
        self.loop = InProcessLoop(profiles, store_regions)
        self.traffic = TrafficSimulator(TrafficConfig(seed=config.seed))
        self.marketplace = Marketplace(panel)  # the simulated viewers: their responses, never read by a model
        self.pixels: dict[str, NDArray[np.uint8]] = {}
        self.impression_vectors: dict[str, NDArray[np.float32]] = {}
        self.designs: dict[str, str] = {}  # design id -> prompt
        self.ts = ROUND_ZERO_TS

    def post_designs(self) -> None:
        """Each merchant's design on a training prompt and on a held-out one."""
        for merchant in self.roles.merchants:
            for heldout in (False, True):
                prompt = merchant_prompt(self.roles, merchant, heldout)
                design_id = f"design-{merchant}-{prompt.removeprefix('a ').replace(' ', '_')}"
                self.loop.apply([self.traffic.design_event(design_id, merchant, prompt, self.ts)])
                self.designs[design_id] = prompt

    @property
    def train_designs(self) -> list[str]:
        return [design for design, prompt in self.designs.items() if prompt in TRAIN_PROMPTS]

    def show(
        self, viewer: str, design_id: str, seed: int, as_merchant: bool, generator: Any, personalized: bool, tag: str
    ) -> None:
        """One impression of ``generator``'s K candidates (drawn with the viewer's u when ``personalized``)."""
        self.ts += SHOWING_GAP_S
        prompt = self.designs[design_id]
        u = self.loop.user_vector(viewer)
        group = generator.generate(prompt, u if personalized else None, self.config.k, seed)
        image_ids = [f"{tag}-{seed}-{position}" for position in range(self.config.k)]
        impression = self.traffic.impression_event(
            viewer, design_id, prompt, group.model_version, image_ids, group.descriptors, self.ts
        )
        draw_rng = np.random.default_rng([self.config.seed, seed])
        if as_merchant:
            response = self.marketplace.merchant_selection(viewer, group.images, draw_rng)
        else:
            response = self.marketplace.shopper_response(viewer, group.images, draw_rng)
        self.loop.apply([impression, *self.traffic.response_events(impression, response)])
        self.impression_vectors[impression.event_id] = u
        self.pixels.update(zip(image_ids, group.images, strict=True))

    def log_round(self, round_index: int, groups_per_shopper: int, generator: Any, personalized: bool) -> None:
        """Every shopper ``groups_per_shopper`` groups of training designs, every merchant ``merchant_groups`` of
        their own; seeds and choices from a stream of this round's."""
        rng = np.random.default_rng([self.config.seed, 10 * round_index])  # round 0: [seed, 0]
        tag = f"r{round_index}"
        for step in range(groups_per_shopper):
            for shopper in self.roles.shoppers:
                design_id = str(rng.choice(self.train_designs))
                self.show(shopper, design_id, int(rng.integers(0, 2**31 - 1)), False, generator, personalized, tag)
            log.info("round %d: %d of %d groups per shopper", round_index, step + 1, groups_per_shopper)
        for merchant in self.roles.merchants:
            own = [design for design in self.train_designs if design.startswith(f"design-{merchant}-")]
            for _ in range(self.config.merchant_groups):
                self.show(merchant, own[0], int(rng.integers(0, 2**31 - 1)), True, generator, personalized, tag)

    def samples(self) -> list[Any]:
        samples = self.loop.group_samples()
        missing = [sample.sample_id for sample in samples if sample.sample_id not in self.impression_vectors]
        if missing:
            raise ConfigError(f"group samples without a logged impression: {missing[:3]}")
        return samples


def log_round_zero(
    config: ScienceConfig, panel: PreferencePanel, roles: Roles, generator: PersonalizedGenerator
) -> LoggedRound:
    """The base model's round-0 groups, the viewers' events folded by the in-process loop, and the showings."""
    logger = RoundLogger(config, panel, roles)
    logger.post_designs()
    logger.log_round(0, config.logged_groups, generator, personalized=False)
    indices = {user: index for index, user in enumerate(panel.user_ids())}
    segments = {user: segment_of(panel, user, indices[user]) for user in roles.shoppers + roles.cold + roles.merchants}
    showings = plan_showings(config, roles, logger.loop, segments)
    return LoggedRound(
        logger.samples(), logger.pixels, logger.impression_vectors, showings, segments, len(logger.loop.events), logger
    )


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
