"""The marketplace on generated groups: behaviour follows true utility and position, arms can share random numbers,
and a response becomes valid, timed events that the group builder grades as the marketplace decided."""

from __future__ import annotations

import numpy as np
import pytest

from perfusion.attributes import COLOURS, DESCRIPTOR_DIM
from perfusion.contracts.records import Click, GroupSample, Impression, Order, Return, Select
from perfusion.errors import ConfigError
from simulator.marketplace import BehaviourConfig, GroupResponse, Marketplace, grades_of
from simulator.traffic import TrafficConfig, TrafficSimulator
from streams.grouping import GroupingSettings, batch_group_outputs


class FixedPanel:
    """A panel whose utility is the red share of the image minus 0.5, scaled: the pluggable interface at work."""

    def user_ids(self) -> list[str]:
        return ["shopper-a", "merchant-a"]

    def profile(self, user_id: str) -> dict[str, int]:
        return {"age_group": 0, "region": 0}

    def utilities(self, user_id: str, images: np.ndarray) -> np.ndarray:
        red = images[..., 0].astype(float).mean(axis=(1, 2)) / 255.0
        return 4.0 * (red - 0.5)


def solid(rgb: tuple[int, int, int], k: int = 4) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (k, 8, 8, 3)).copy()


def test_clicks_orders_and_returns_follow_utility() -> None:
    market = Marketplace(FixedPanel())
    utilities = np.array([-2.0, 0.0, 2.0])
    assert np.all(np.diff(market.order_probabilities(utilities)) > 0)
    assert np.all(np.diff(market.return_probabilities(utilities)) < 0)
    same_slot = (
        market.click_probabilities(np.array([-2.0, 2.0]))[0],
        market.click_probabilities(np.array([2.0, 2.0]))[0],
    )
    assert same_slot[0] < same_slot[1]


def test_position_bias_lowers_later_slots() -> None:
    bias = Marketplace(FixedPanel()).position_bias(4)
    assert bias[0] == 1.0 and np.all(np.diff(bias) < 0)


def test_liked_images_earn_more_clicks_orders_and_fewer_returns() -> None:
    market = Marketplace(FixedPanel())
    rng = np.random.default_rng(0)
    liked = [market.shopper_response("shopper-a", solid(COLOURS["red"]), rng) for _ in range(400)]
    disliked = [market.shopper_response("shopper-a", solid(COLOURS["blue"]), rng) for _ in range(400)]

    def totals(responses: list[GroupResponse]) -> tuple[int, int, int]:
        return tuple(int(sum(getattr(r, name).sum() for r in responses)) for name in ("clicked", "ordered", "returned"))

    liked_clicks, liked_orders, liked_returns = totals(liked)
    disliked_clicks, disliked_orders, disliked_returns = totals(disliked)
    assert liked_clicks > disliked_clicks and liked_orders > disliked_orders
    assert liked_returns / max(liked_orders, 1) < disliked_returns / max(disliked_orders, 1)


def test_same_stream_same_draws_whatever_the_images() -> None:
    market = Marketplace(FixedPanel())
    first = market.shopper_response("shopper-a", solid(COLOURS["red"]), np.random.default_rng(7))
    second = market.shopper_response("shopper-a", solid(COLOURS["red"]), np.random.default_rng(7))
    assert np.array_equal(first.clicked, second.clicked) and np.array_equal(first.returned, second.returned)
    # Different images consume exactly as many draws, so the next showing's draws stay aligned across arms.
    reference = np.random.default_rng(7)
    reference.random((3, 4))
    after_blue = np.random.default_rng(7)
    market.shopper_response("shopper-a", solid(COLOURS["blue"]), after_blue)
    assert after_blue.random() == reference.random()


def test_merchant_selects_what_they_like_best() -> None:
    market = Marketplace(FixedPanel(), BehaviourConfig(selection_noise_sd=0.0, max_selected=1))
    images = np.concatenate([solid(COLOURS["blue"], 3), solid(COLOURS["red"], 1)])
    response = market.merchant_selection("merchant-a", images, np.random.default_rng(0))
    assert response.selected.tolist() == [False, False, False, True]
    assert not response.clicked.any()


def test_behaviour_config_refuses_bad_values() -> None:
    with pytest.raises(ConfigError, match="delivery_sd"):
        BehaviourConfig(delivery_sd=0.0)
    with pytest.raises(ConfigError, match="max_selected"):
        BehaviourConfig(max_selected=0)
    with pytest.raises(ConfigError, match=r"click_slope must be at least 0, got -0\.5"):
        BehaviourConfig(click_slope=-0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shoppers": 0}, "shoppers must be at least 1, got 0"),
        ({"designs": 0}, "designs must be at least 1, got 0"),
        ({"candidates_per_impression": 17}, "candidates_per_impression must be between 1 and 16, got 17"),
        ({"taste_sharpness": 1.5}, "taste_sharpness must be between 0.0 and 1.0, got 1.5"),
        ({"mean_gap_s": 0.0}, "mean_gap_s must be positive, got 0.0"),
    ],
)
def test_traffic_config_refuses_bad_values_naming_the_field(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrafficConfig(**overrides)


def test_response_events_are_valid_and_graded_as_decided() -> None:
    traffic = TrafficSimulator(TrafficConfig(seed=3, start_ts=1_000_000.0))
    impression = traffic.impression_event(
        "shopper-a", "design-1", "a dress", "v1", [f"gen-{i}" for i in range(4)], [[0.0] * DESCRIPTOR_DIM] * 4, 1e6
    )
    assert isinstance(impression, Impression)
    response = GroupResponse(
        utilities=np.zeros(4),
        clicked=np.array([True, True, False, True]),
        ordered=np.array([True, False, False, True]),
        returned=np.array([False, False, False, True]),
        selected=np.zeros(4, dtype=bool),
    )
    events = traffic.response_events(impression, response)
    kinds = [type(event) for event in events]
    assert kinds.count(Click) == 3 and kinds.count(Order) == 2 and kinds.count(Return) == 1
    assert all(impression.ts < event.ts <= impression.ts + traffic.config.max_follow_up_s for event in events)
    sample = batch_group_outputs([impression, *events], GroupingSettings())[impression.event_id]
    assert isinstance(sample, GroupSample)
    assert [c.grade for c in sorted(sample.candidates, key=lambda c: c.position)] == grades_of(response)


def test_selection_becomes_one_select_event() -> None:
    traffic = TrafficSimulator(TrafficConfig(seed=3, start_ts=1_000_000.0))
    impression = traffic.impression_event(
        "merchant-a", "design-1", "a dress", "v1", ["gen-a", "gen-b"], [[0.0] * DESCRIPTOR_DIM] * 2, 1e6
    )
    nothing = np.zeros(2, dtype=bool)
    response = GroupResponse(np.zeros(2), nothing, nothing, nothing, np.array([False, True]))
    (select,) = traffic.response_events(impression, response)
    assert isinstance(select, Select) and select.image_ids == ["gen-b"]


def test_response_to_utilities_follows_its_uniforms_and_needs_a_panel_only_to_score_images() -> None:
    market = Marketplace(None)
    utilities = np.array([1.0, 0.0, -1.0])
    everything = market.response_to_utilities(utilities, np.zeros((3, 3)))
    assert everything.clicked.all() and everything.ordered.all() and everything.returned.all()
    nothing = market.response_to_utilities(utilities, np.full((3, 3), 1.0 - 1e-12))
    assert not (nothing.clicked.any() or nothing.ordered.any() or nothing.returned.any())
    with pytest.raises(ConfigError, match=r"draws must be \(3, 3\)"):
        market.response_to_utilities(utilities, np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="no panel"):
        market.shopper_response("u", np.zeros((3, 4, 4, 3), dtype=np.uint8), np.random.default_rng(0))
