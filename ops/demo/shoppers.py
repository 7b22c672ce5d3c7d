"""Simulated shoppers and merchants of the demo: they judge the generated PIXELS with hidden tastes.

Each shopper is a user of :class:`simulator.ground_truth.PixelPreferencePanel`: a segment's taste plus individual
variation over what an image shows (colours, brightness, texture, shape). Shown a group of K images, a shopper acts
as the evaluation's shoppers do (:class:`simulator.marketplace.Marketplace`): clicks each with a probability that
grows with its utility and falls with its position, orders some of what they clicked, and returns some orders (more
often the ones that suited them less). The demo's shoppers are keener than the evaluation's
(:class:`ShopperBehaviour`), so that a few rounds reach production. A merchant selects the candidate of their design
that the panel as a whole likes best (what would sell).

:func:`choose_actions` and :func:`merchant_choice` are pure given their random source, so they are tested without
a service; :func:`action_events` turns actions into the event records posted to ``POST /events``.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, cast

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from perfusion.contracts.records import Click, Order, Return, Select
from perfusion.errors import ConfigError
from perfusion.settings import Settings
from simulator.marketplace import BehaviourConfig, Marketplace

ActionKind = Literal["click", "order", "return"]


class ShopperBehaviour(Settings):
    """How utilities (roughly unit scale, centred near 0) become clicks, orders and returns."""

    click_rate: float = Field(
        default=0.7, gt=0.0, lt=1.0, description="click probability of a top-position image of utility 0"
    )
    sharpness: float = Field(default=2.0, ge=0.0, description="how strongly utility moves each probability (logit)")
    order_rate: float = Field(default=0.6, gt=0.0, lt=1.0, description="order probability after a click, at utility 0")
    return_rate: float = Field(default=0.3, gt=0.0, lt=1.0, description="return probability of an order, at utility 0")

    def marketplace_behaviour(self) -> BehaviourConfig:
        """The same shopper in the marketplace's terms: logits of the rates at utility 0, ``sharpness`` as the slope,
        slot p seen with weight 1 / sqrt(1 + p). The marketplace's return model is a normal CDF of the utility's
        shortfall; its expectation and spread are set so that at utility 0 it has this ``return_rate`` and the
        slope of a logistic return model of this ``sharpness``."""
        shortfall = NormalDist().inv_cdf(self.return_rate)
        slope = self.sharpness * self.return_rate * (1.0 - self.return_rate)
        delivery_sd = NormalDist().pdf(shortfall) / slope if slope > 0 else 1e9
        return BehaviourConfig(
            click_bias=_logit(self.click_rate),
            click_slope=self.sharpness,
            position_decay=0.5,
            order_bias=_logit(self.order_rate),
            order_slope=self.sharpness,
            expectation=shortfall * delivery_sd,
            delivery_sd=delivery_sd,
        )


def _logit(rate: float) -> float:
    return math.log(rate / (1.0 - rate))


@dataclass(frozen=True)
class ShopperAction:
    kind: ActionKind
    image_id: str
    utility: float


def choose_actions(
    utilities: Sequence[float], image_ids: Sequence[str], behaviour: ShopperBehaviour, rng: random.Random
) -> list[ShopperAction]:
    """What one shopper does with one group, in position order: a click, maybe an order, maybe its return."""
    if len(utilities) != len(image_ids):
        raise ConfigError(f"got {len(utilities)} utilities for {len(image_ids)} images; give one per image")
    values = np.asarray(utilities, dtype=np.float64)
    draws = np.array([[rng.random() for _ in image_ids] for _ in range(3)], dtype=np.float64)
    response = Marketplace(None, behaviour.marketplace_behaviour()).response_to_utilities(values, draws)
    actions: list[ShopperAction] = []
    for position, (utility, image_id) in enumerate(zip(utilities, image_ids, strict=True)):
        for kind, happened in (
            ("click", response.clicked),
            ("order", response.ordered),
            ("return", response.returned),
        ):
            if happened[position]:
                actions.append(ShopperAction(cast(ActionKind, kind), image_id, utility))
    return actions


def merchant_choice(panel_utilities: NDArray[np.float64], image_ids: Sequence[str]) -> str:
    """The image the panel likes best on average; ``panel_utilities`` is [users, K]."""
    if panel_utilities.ndim != 2 or panel_utilities.shape[1] != len(image_ids):
        raise ConfigError(f"panel_utilities must be [users, {len(image_ids)}], got {panel_utilities.shape}")
    return image_ids[int(np.argmax(panel_utilities.mean(axis=0)))]


def action_events(
    actions: Sequence[ShopperAction], user_id: str, impression_id: str, design_id: str, now: float | None = None
) -> list[Click | Order | Return]:
    """The events of ``actions``, a few milliseconds apart in event time, each return naming its order."""
    start = time.time() if now is None else now
    events: list[Click | Order | Return] = []
    orders: dict[str, Order] = {}
    for index, action in enumerate(actions):
        ts = start + 0.001 * index
        event_id = f"demo-{action.kind}-{uuid.uuid4().hex}"
        if action.kind == "click":
            events.append(
                Click(
                    event_id=event_id,
                    ts=ts,
                    user_id=user_id,
                    impression_id=impression_id,
                    design_id=design_id,
                    image_id=action.image_id,
                )
            )
        elif action.kind == "order":
            order = Order(
                event_id=event_id,
                ts=ts,
                user_id=user_id,
                impression_id=impression_id,
                design_id=design_id,
                image_id=action.image_id,
                quantity=1,
            )
            orders[action.image_id] = order
            events.append(order)
        else:
            placed = orders.get(action.image_id)
            if placed is None:
                raise ConfigError(f"a return of {action.image_id} must follow its order in the same actions")
            events.append(Return.of_order(placed, event_id, ts))
    return events


def select_event(merchant_id: str, impression_id: str, design_id: str, image_id: str) -> Select:
    return Select(
        event_id=f"demo-select-{uuid.uuid4().hex}",
        ts=time.time(),
        user_id=merchant_id,
        impression_id=impression_id,
        design_id=design_id,
        image_ids=[image_id],
    )


def reference_images(count: int, seed: int, size: int) -> NDArray[np.uint8]:
    """``count`` rendered catalog images [N, size, size, 3], the panel's reference for standardizing features."""
    from perfusion.catalog import all_attributes, render_many

    rng = random.Random(seed)
    items = rng.sample(all_attributes(), count)
    return np.asarray(render_many(items, [rng.randrange(1 << 30) for _ in items], size=size), dtype=np.uint8)
