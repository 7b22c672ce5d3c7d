"""The user vector u from Feast-shaped features: hand-checked layout, smoothed rates, volume-free taste, merchants,
cold and unknown users, batching."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from perfusion.attributes import DESCRIPTOR_DIM, Attributes, one_hot_descriptor
from perfusion.user_features import (
    RATE_PRIORS,
    TASTE_BLOCKS,
    USER_DIM,
    USER_FEATURE_REFS,
    USER_VECTOR_SLICES,
    UserFeatureError,
    merchant_profile_rows,
    push_sign_up_profiles,
    taste_part,
    user_vector,
    user_vectors,
    user_vectors_from_columns,
)

PREFERENCE = [float(index) / DESCRIPTOR_DIM for index in range(DESCRIPTOR_DIM)]
PRIORS = [prior.mean for prior in RATE_PRIORS.values()]


def full_features() -> dict[str, Any]:
    return {
        "clicks_total": 10,
        "orders_total": 4,
        "returns_total": 1,
        "images_shown_total": 88,
        "images_reviewed_total": 8,
        "images_selected_total": 2,
        "preference": PREFERENCE,
        "age_group": 3,
        "region": 1,
    }


def block(u: np.ndarray, name: str) -> np.ndarray:
    return u[USER_VECTOR_SLICES[name]]


def test_refs_name_every_served_feature_with_its_view() -> None:
    assert len(USER_FEATURE_REFS) == 6 + 1 + 2 + 1
    assert "user_preferences:images_shown_total" in USER_FEATURE_REFS
    assert "user_profile:region" in USER_FEATURE_REFS
    assert "merchant_profile:store_region" in USER_FEATURE_REFS
    assert all(
        ref.split(":")[0] in {"user_preferences", "user_profile", "merchant_profile"} for ref in USER_FEATURE_REFS
    )
    # Nothing that measures how much or how recently: no windowed counts, no impressions, no last_active_ts.
    assert not any(ref.endswith(("_1h", "_1d", "last_active_ts", "impressions_total")) for ref in USER_FEATURE_REFS)


def test_slices_tile_the_vector() -> None:
    covered = sorted(index for part in USER_VECTOR_SLICES.values() for index in range(USER_DIM)[part])
    assert covered == list(range(USER_DIM))
    assert USER_DIM == 4 + DESCRIPTOR_DIM + 5 + 4 + 3
    assert list(USER_VECTOR_SLICES) == ["rates", "preference", "age_group", "region", "present"]
    assert set(TASTE_BLOCKS) == set(USER_VECTOR_SLICES) - {"rates"}


def test_full_user_hand_checked() -> None:
    u = user_vector(full_features())
    assert u.dtype == np.float32 and u.shape == (USER_DIM,)
    expected_rates = [
        (10 + 20 * 0.1) / (80 + 20),  # ctr: clicks per image shown outside the 8 reviewed
        (4 + 5 * 0.3) / (10 + 5),  # cvr: orders per click
        (1 + 5 * 0.2) / (4 + 5),  # return rate: returns per order
        (2 + 8 * 0.25) / (8 + 8),  # select rate: selected per reviewed
    ]
    np.testing.assert_allclose(block(u, "rates"), expected_rates, rtol=1e-6)
    np.testing.assert_allclose(block(u, "preference"), PREFERENCE, rtol=1e-6)
    np.testing.assert_array_equal(block(u, "age_group"), [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(block(u, "region"), [0, 1, 0, 0])
    np.testing.assert_array_equal(block(u, "present"), [1, 1, 0])


def test_a_first_round_of_one_click_in_two_images_is_not_an_extreme() -> None:
    first = block(user_vector({"clicks_total": 1, "images_shown_total": 2}), "rates")
    assert first[0] == pytest.approx((1 + 2) / 22)  # near the prior 0.1, far from the raw 0.5
    assert first[0] < 0.2
    # One order of that one click, never returned: neither cvr 1 nor return rate 0.
    rates = block(user_vector({"clicks_total": 1, "orders_total": 1, "images_shown_total": 2}), "rates")
    assert rates[1] == pytest.approx(2.5 / 6) and rates[2] == pytest.approx(1.0 / 6)


def test_without_trials_every_rate_is_its_prior() -> None:
    for features in ({}, {"age_group": 1}, {"preference": PREFERENCE}, {"images_shown_total": 0}):
        np.testing.assert_allclose(block(user_vector(features), "rates"), PRIORS, rtol=1e-6)


def test_cold_user_with_profile_only() -> None:
    u = user_vector({"age_group": 0, "region": 3, "clicks_total": None, "preference": None})
    np.testing.assert_allclose(block(u, "rates"), PRIORS, rtol=1e-6)
    np.testing.assert_allclose(block(u, "preference"), one_hot_descriptor({}))
    np.testing.assert_array_equal(block(u, "age_group"), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(block(u, "present"), [0, 1, 0])


def test_a_merchant_profile_marks_a_merchant_and_gives_the_region_without_a_user_profile() -> None:
    merchant = user_vector({"store_region": 2})
    np.testing.assert_array_equal(block(merchant, "present"), [0, 0, 1])
    np.testing.assert_array_equal(block(merchant, "region"), [0, 0, 1, 0])
    np.testing.assert_allclose(block(merchant, "age_group"), np.full(5, 0.2))
    both = user_vector({"store_region": 2, "region": 0, "age_group": 1})
    np.testing.assert_array_equal(block(both, "region"), [1, 0, 0, 0])  # the viewer's own region first
    np.testing.assert_array_equal(block(both, "present"), [0, 1, 1])
    with_view = user_vector({"merchant_profile__store_region": 2})
    np.testing.assert_array_equal(with_view, merchant)


def test_unknown_user_gets_the_neutral_vector_whatever_the_time() -> None:
    u = user_vector({"user_id": "never-seen", "clicks_total": None, "ctr": float("nan")}, as_of=5.0)
    np.testing.assert_allclose(block(u, "age_group"), np.full(5, 0.2))
    np.testing.assert_allclose(block(u, "region"), np.full(4, 0.25))
    np.testing.assert_array_equal(block(u, "present"), [0, 0, 0])
    assert np.all(np.isfinite(u))
    np.testing.assert_array_equal(user_vector(full_features(), as_of=1e9), user_vector(full_features(), as_of=2e9))


def test_full_feature_names_and_view_refs_are_understood() -> None:
    plain = user_vector(full_features())
    prefixed = {
        (f"user_profile__{name}" if name in {"age_group", "region"} else f"user_preferences__{name}"): value
        for name, value in full_features().items()
    }
    with_refs = {f"user_preferences:{name}": value for name, value in full_features().items()}
    np.testing.assert_array_equal(user_vector(prefixed), plain)
    np.testing.assert_array_equal(block(user_vector(with_refs), "rates"), block(plain, "rates"))


def test_rates_stay_in_the_unit_interval_and_negative_counts_floor_at_zero() -> None:
    u = user_vector({"clicks_total": 500, "images_shown_total": 10, "orders_total": -3, "returns_total": 9})
    rates = block(u, "rates")
    assert rates[0] == 1.0  # more clicks than images cannot make a rate over 1
    assert rates[1] == pytest.approx(5 * 0.3 / (500 + 5))  # no orders of 500 clicks
    assert rates[2] == 1.0  # returns without orders
    # More reviewed than shown (inconsistent counters) leaves no ctr trials, not negative ones.
    assert block(user_vector({"images_shown_total": 4, "images_reviewed_total": 8}), "rates")[0] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"age_group": 5}, "age_group must be an integer in 0..4, got 5"),
        ({"region": 1.5}, "region must be an integer in 0..3"),
        ({"store_region": 4}, "store_region must be an integer in 0..3, got 4"),
        ({"preference": [0.1, 0.2]}, f"must hold {DESCRIPTOR_DIM} finite floats"),
        ({"clicks_total": "many"}, "clicks_total must be a number, got 'many'"),
        ({"images_shown_total": float("inf")}, "images_shown_total must be finite"),
    ],
)
def test_bad_values_raise_naming_the_value(features: dict[str, object], message: str) -> None:
    with pytest.raises(UserFeatureError, match=message):
        user_vector(features)


# ------------------------------------------------------------------------------------------- volume and taste

_TRIALS = st.integers(0, 200)


@st.composite
def behaviour(draw: st.DrawFn) -> dict[str, object]:
    """All-time counters that could come from one viewer (successes never above their trials), with a profile."""
    shown = draw(_TRIALS)
    reviewed = draw(st.integers(0, shown))
    clicks = draw(st.integers(0, shown - reviewed))
    orders = draw(st.integers(0, clicks))
    liked = draw(st.lists(st.floats(0.0, 1.0), min_size=DESCRIPTOR_DIM, max_size=DESCRIPTOR_DIM))
    features: dict[str, object] = {
        "images_shown_total": shown,
        "images_reviewed_total": reviewed,
        "images_selected_total": draw(st.integers(0, reviewed)),
        "clicks_total": clicks,
        "orders_total": orders,
        "returns_total": draw(st.integers(0, orders)),
        "preference": liked,
        "age_group": draw(st.none() | st.integers(0, 4)),
        "region": draw(st.none() | st.integers(0, 3)),
    }
    if draw(st.booleans()):
        features["store_region"] = draw(st.integers(0, 3))
    return features


def scaled(features: dict[str, object], factor: int) -> dict[str, object]:
    """The same behaviour ``factor`` times over: every counter multiplied; what was liked the same."""
    return {name: value * factor if name.endswith("_total") else value for name, value in features.items()}  # type: ignore[operator]


@given(behaviour())
def test_twice_the_volume_gives_the_same_taste_and_rates_nearer_the_viewers_own(features: dict[str, object]) -> None:
    once, twice = user_vector(features), user_vector(scaled(features, 2))
    np.testing.assert_array_equal(taste_part(once), taste_part(twice))
    for index, prior in enumerate(RATE_PRIORS.values()):
        trials = float(features[prior.trials]) - (float(features[prior.less]) if prior.less else 0.0)  # type: ignore[arg-type]
        if trials == 0:
            assert once[index] == twice[index] == pytest.approx(prior.mean)
            continue
        own = float(features[prior.successes]) / trials  # type: ignore[arg-type]
        # Rates never grow with volume for its own sake: they move from the prior towards the viewer's own rate.
        assert abs(float(twice[index]) - own) <= abs(float(once[index]) - own) + 1e-6
        assert min(own, prior.mean) - 1e-6 <= twice[index] <= max(own, prior.mean) + 1e-6
    assert np.all((once[USER_VECTOR_SLICES["rates"]] >= 0) & (once[USER_VECTOR_SLICES["rates"]] <= 1))


def test_first_and_fifth_round_of_the_same_taste_agree_on_the_taste_part_hand_checked() -> None:
    liked = Attributes("dress", "red", "plain", "short-sleeve", "slim").descriptor()
    first = {"images_shown_total": 8, "clicks_total": 2, "orders_total": 1, "preference": liked, "region": 1}
    fifth = {"images_shown_total": 40, "clicks_total": 10, "orders_total": 5, "preference": liked, "region": 1}
    u1, u5 = user_vector(first), user_vector(fifth)
    np.testing.assert_array_equal(taste_part(u1), taste_part(u5))
    # The rates differ only by evidence: the fifth round's are nearer the viewer's own ctr 0.25 and cvr 0.5.
    assert 0.1 < u1[0] < u5[0] < 0.25 and 0.3 < u1[1] < u5[1] < 0.5
    other = user_vector({**first, "preference": Attributes("jacket", "navy", "striped", "long-sleeve", "loose")
                         .descriptor()})  # fmt: skip
    assert not np.array_equal(taste_part(u1), taste_part(other))


# -------------------------------------------------------------------------------------------------- batching


def test_batched_rows_equal_single_vectors() -> None:
    rows = [full_features(), {"region": 2}, {}]
    times = [1_000_000.0 + 86_400.0, None, 7.0]
    batch = user_vectors(rows, as_of=times)
    assert batch.shape == (3, USER_DIM) and batch.dtype == np.float32
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(batch[index], user_vector(row, times[index]))
    with pytest.raises(UserFeatureError, match="one time per row \\(3\\), got 2"):
        user_vectors(rows, as_of=[1.0, 2.0])
    np.testing.assert_array_equal(taste_part(batch)[1], taste_part(user_vector({"region": 2})))


def test_columns_as_feast_returns_them() -> None:
    columns: dict[str, list[Any]] = {
        "user_id": ["a", "b"],
        "clicks_total": [4, None],
        "preference": [PREFERENCE, None],
        "age_group": [None, 2],
        "region": [0, None],
        "store_region": [None, 3],
    }
    batch = user_vectors_from_columns(columns, as_of=None)
    np.testing.assert_array_equal(batch[0], user_vector({"clicks_total": 4, "preference": PREFERENCE, "region": 0}))
    np.testing.assert_array_equal(batch[1], user_vector({"age_group": 2, "store_region": 3}))
    with pytest.raises(UserFeatureError, match="same length"):
        user_vectors_from_columns({"clicks_total": [1], "orders_total": [1, 2]})
    assert user_vectors_from_columns({}).shape == (0, USER_DIM)


def test_merchant_profile_rows_for_the_push_source() -> None:
    rows = merchant_profile_rows({"m1": 0, "m2": 3}, signed_up_ts=1_700_000_000.0)
    stamp = datetime.fromtimestamp(1_700_000_000.0, tz=UTC)
    assert rows == [
        {"user_id": "m1", "store_region": 0, "event_timestamp": stamp},
        {"user_id": "m2", "store_region": 3, "event_timestamp": stamp},
    ]
    with pytest.raises(UserFeatureError, match=r"store_region must be an integer in 0\.\.3, got 7"):
        merchant_profile_rows({"m1": 7}, signed_up_ts=1.0)


def test_sign_up_profiles_reach_the_online_store_of_the_settings_given(tmp_path: Path) -> None:
    from perfusion.feature_store import (
        FeatureStoreSettings,
        apply_feature_repo,
        open_feature_store,
        read_online_features,
    )

    settings = FeatureStoreSettings(feast_dir=tmp_path / "feast")
    apply_feature_repo(settings)
    push_sign_up_profiles(
        {"s1": {"age_group": 2, "region": 1}}, {"m1": 3}, signed_up_ts=1_700_000_000.0, feature_store=settings
    )
    store = open_feature_store(settings)
    [shopper] = read_online_features(store, "user_profile", ["s1"])
    [merchant] = read_online_features(store, "merchant_profile", ["m1"])
    assert (shopper["age_group"], shopper["region"], merchant["store_region"]) == (2, 1, 3)
