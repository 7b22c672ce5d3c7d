"""Shoppers and merchants acting on generated groups, with the truth of a pluggable :class:`PreferencePanel`.

A shopper looks at the K candidates of one impression and, per candidate, from its true utility u (the panel's
score of the pixels, never the prompt or any label the system produced):

- clicks with probability ``position_bias(position) * sigmoid(click_bias + click_slope * u)``, where
  ``position_bias(p) = (1 + p) ** -position_decay``: lower slots are seen less;
- orders after a click with probability ``sigmoid(order_bias + order_slope * u)``;
- returns an order when the delivered item falls short of what the shopper expected: the delivered item's utility
  is ``u + N(0, delivery_sd)``, and it is returned when that falls below ``expectation``, i.e. with probability
  ``Phi((expectation - u) / delivery_sd)``.

A merchant selects the one or two candidates of their own design that they like best (by true utility plus
``selection_noise_sd`` of noise).

Every draw comes from the ``numpy.random.Generator`` the caller passes, so an evaluation can give every arm the
same random numbers for the same (round, user, prompt) and compare arms on common noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from perfusion.errors import ConfigError
from perfusion.settings import Settings
from simulator.ground_truth import PreferencePanel


class BehaviourConfig(Settings):
    """How strongly shoppers' and merchants' actions follow their true utility (utilities are on a unit scale)."""

    click_bias: float = Field(default=-1.0, description="logit of clicking a neutral (u = 0) item in slot 0")
    click_slope: float = Field(default=1.5, ge=0, description="logit change of a click per unit of utility")
    position_decay: float = Field(default=0.5, ge=0, description="slot p is seen with weight (1 + p) ** -decay")
    order_bias: float = Field(default=-1.0, description="logit of ordering a clicked neutral item")
    order_slope: float = Field(default=1.5, ge=0, description="logit change of an order per unit of utility")
    expectation: float = Field(default=0.0, description="utility a delivered item must reach not to be returned")
    delivery_sd: float = Field(
        default=1.0, gt=0, description="spread of the delivered item's utility around the pictured one's"
    )
    selection_noise_sd: float = Field(
        default=0.2, ge=0, description="noise on a merchant's utilities when choosing candidates"
    )
    max_selected: int = Field(default=2, ge=1, description="a merchant selects 1..max_selected candidates")


@dataclass(frozen=True)
class GroupResponse:
    """What one viewer did with one group of K candidates, in slot order; all arrays have shape (K,)."""

    utilities: NDArray[np.float64]
    clicked: NDArray[np.bool_]
    ordered: NDArray[np.bool_]
    returned: NDArray[np.bool_]
    selected: NDArray[np.bool_]

    @property
    def k(self) -> int:
        return int(self.utilities.shape[0])


def _sigmoid(values: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-values))


def _normal_cdf(values: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.array([0.5 * (1.0 + math.erf(value / math.sqrt(2.0))) for value in values.reshape(-1)]).reshape(
        values.shape
    )


class Marketplace:
    """Viewers of a panel acting on groups of images. Without a panel it still turns utilities into actions
    (:meth:`response_to_utilities`), for a caller that scores images itself, as the demo does."""

    def __init__(self, panel: PreferencePanel | None, behaviour: BehaviourConfig | None = None) -> None:
        self.panel = panel
        self.behaviour = behaviour or BehaviourConfig()

    def _utilities(self, user_id: str, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        if self.panel is None:
            raise ConfigError("this marketplace has no panel to score images; give one, or use response_to_utilities")
        return np.asarray(self.panel.utilities(user_id, images), dtype=np.float64)

    def position_bias(self, k: int) -> NDArray[np.float64]:
        """(K,) probability that slot p is looked at, relative to slot 0."""
        return (1.0 + np.arange(k, dtype=np.float64)) ** -self.behaviour.position_decay

    def click_probabilities(self, utilities: NDArray[np.float64]) -> NDArray[np.float64]:
        behaviour = self.behaviour
        return self.position_bias(utilities.shape[0]) * _sigmoid(
            behaviour.click_bias + behaviour.click_slope * utilities
        )

    def order_probabilities(self, utilities: NDArray[np.float64]) -> NDArray[np.float64]:
        return _sigmoid(self.behaviour.order_bias + self.behaviour.order_slope * utilities)

    def return_probabilities(self, utilities: NDArray[np.float64]) -> NDArray[np.float64]:
        return _normal_cdf((self.behaviour.expectation - utilities) / self.behaviour.delivery_sd)

    def shopper_response(self, user_id: str, images: NDArray[np.uint8], rng: np.random.Generator) -> GroupResponse:
        """A shopper's clicks, orders and returns on (K, H, W, 3) uint8 images shown in slots 0..K-1."""
        utilities = self._utilities(user_id, images)
        # Draw all uniforms up front, a fixed number per slot, so arms with different images consume the same stream.
        return self.response_to_utilities(utilities, rng.random((3, utilities.shape[0])))

    def response_to_utilities(self, utilities: NDArray[np.float64], draws: NDArray[np.float64]) -> GroupResponse:
        """Clicks, orders and returns on images of these (K,) utilities in slots 0..K-1, given (3, K) uniforms in
        [0, 1): row 0 decides the clicks, row 1 the orders of clicked images, row 2 the returns of ordered ones."""
        k = utilities.shape[0]
        if draws.shape != (3, k):
            raise ConfigError(f"draws must be (3, {k}) uniforms for {k} utilities, got {draws.shape}")
        clicked = draws[0] < self.click_probabilities(utilities)
        ordered = clicked & (draws[1] < self.order_probabilities(utilities))
        returned = ordered & (draws[2] < self.return_probabilities(utilities))
        return GroupResponse(utilities, clicked, ordered, returned, np.zeros(k, dtype=bool))

    def merchant_selection(self, user_id: str, images: NDArray[np.uint8], rng: np.random.Generator) -> GroupResponse:
        """A merchant's selection among the K candidates of their own design."""
        utilities = self._utilities(user_id, images)
        k = utilities.shape[0]
        noisy = utilities + rng.normal(0.0, self.behaviour.selection_noise_sd, size=k)
        count = int(rng.integers(1, min(self.behaviour.max_selected, k) + 1))
        selected = np.zeros(k, dtype=bool)
        selected[np.argsort(-noisy)[:count]] = True
        nothing = np.zeros(k, dtype=bool)
        return GroupResponse(utilities, nothing, nothing.copy(), nothing.copy(), selected)


def grades_of(response: GroupResponse) -> list[int]:
    """The group builder's grades: order (not returned) 2, click or selection 1, else 0."""
    kept_order = response.ordered & ~response.returned
    return [
        2 if kept_order[i] else 1 if (response.clicked[i] or response.selected[i]) else 0 for i in range(response.k)
    ]
