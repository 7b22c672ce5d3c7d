"""The user vector u from Feast-shaped features: hand-checked layout, cold and unknown users, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perfusion.attributes import DESCRIPTOR_DIM, one_hot_descriptor
from perfusion.user_features import (
    COUNT_FEATURES,
    USER_DIM,
    USER_FEATURE_REFS,
    USER_VECTOR_SLICES,
    UserFeatureError,
    user_vector,
    user_vectors,
    user_vectors_from_columns,
)

PREFERENCE = [float(index) / DESCRIPTOR_DIM for index in range(DESCRIPTOR_DIM)]


def full_features() -> dict[str, object]:
    counts = {name: index * 10 for index, name in enumerate(COUNT_FEATURES)}
    return {
        **counts,
        "ctr": 0.25,
        "cvr": 0.5,
        "preference": PREFERENCE,
        "last_active_ts": 1_000_000.0,
        "age_group": 3,
        "region": 1,
    }


def block(u: np.ndarray, name: str) -> np.ndarray:
    return u[USER_VECTOR_SLICES[name]]


def test_refs_name_every_served_feature_with_its_view() -> None:
    assert len(USER_FEATURE_REFS) == 12 + 2 + 1 + 1 + 2
    assert "user_preferences:clicks_1d" in USER_FEATURE_REFS
    assert "user_profile:region" in USER_FEATURE_REFS
    assert all(ref.split(":")[0] in {"user_preferences", "user_profile"} for ref in USER_FEATURE_REFS)


def test_slices_tile_the_vector() -> None:
    covered = sorted(index for part in USER_VECTOR_SLICES.values() for index in range(USER_DIM)[part])
    assert covered == list(range(USER_DIM))


def test_full_user_hand_checked() -> None:
    u = user_vector(full_features(), as_of=1_000_000.0 + 2 * 86_400.0)
    assert u.dtype == np.float32 and u.shape == (USER_DIM,)
    np.testing.assert_allclose(block(u, "counts"), np.log1p(np.arange(12) * 10.0), rtol=1e-6)
    np.testing.assert_allclose(block(u, "rates"), [0.25, 0.5])
    np.testing.assert_allclose(block(u, "preference"), PREFERENCE, rtol=1e-6)
    np.testing.assert_allclose(block(u, "recency"), [math.log1p(2.0), 1.0], rtol=1e-6)
    np.testing.assert_array_equal(block(u, "age_group"), [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(block(u, "region"), [0, 1, 0, 0])
    np.testing.assert_array_equal(block(u, "present"), [1, 1])


def test_cold_user_with_profile_only() -> None:
    u = user_vector({"age_group": 0, "region": 3, "ctr": None, "preference": None})
    np.testing.assert_array_equal(block(u, "counts"), np.zeros(12))
    np.testing.assert_array_equal(block(u, "rates"), [0, 0])
    np.testing.assert_allclose(block(u, "preference"), one_hot_descriptor({}))
    np.testing.assert_array_equal(block(u, "age_group"), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(block(u, "present"), [0, 1])


def test_unknown_user_gets_the_neutral_vector() -> None:
    u = user_vector({"user_id": "never-seen", "clicks_1h": None, "ctr": float("nan")}, as_of=5.0)
    np.testing.assert_allclose(block(u, "age_group"), np.full(5, 0.2))
    np.testing.assert_allclose(block(u, "region"), np.full(4, 0.25))
    np.testing.assert_array_equal(block(u, "recency"), [0, 0])
    np.testing.assert_array_equal(block(u, "present"), [0, 0])
    assert np.all(np.isfinite(u))


def test_full_feature_names_and_view_refs_are_understood() -> None:
    plain = user_vector(full_features())
    prefixed = {
        (f"user_profile__{name}" if name in {"age_group", "region"} else f"user_preferences__{name}"): value
        for name, value in full_features().items()
    }
    with_refs = {f"user_preferences:{name}": value for name, value in full_features().items()}
    np.testing.assert_array_equal(user_vector(prefixed), plain)
    np.testing.assert_array_equal(block(user_vector(with_refs), "counts"), block(plain, "counts"))


def test_rates_are_clipped_and_negative_counts_floor_at_zero() -> None:
    u = user_vector({"ctr": 1.7, "cvr": -0.2, "orders_1h": -3})
    np.testing.assert_array_equal(block(u, "rates"), [1.0, 0.0])
    assert block(u, "counts")[COUNT_FEATURES.index("orders_1h")] == 0.0


def test_last_active_in_the_future_counts_as_just_active() -> None:
    u = user_vector({"last_active_ts": 200.0}, as_of=100.0)
    np.testing.assert_array_equal(block(u, "recency"), [0.0, 1.0])


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"age_group": 5}, "age_group must be an integer in 0..4, got 5"),
        ({"region": 1.5}, "region must be an integer in 0..3"),
        ({"preference": [0.1, 0.2]}, f"must hold {DESCRIPTOR_DIM} finite floats"),
        ({"clicks_1d": "many"}, "clicks_1d must be a number, got 'many'"),
        ({"ctr": float("inf")}, "ctr must be finite"),
    ],
)
def test_bad_values_raise_naming_the_value(features: dict[str, object], message: str) -> None:
    with pytest.raises(UserFeatureError, match=message):
        user_vector(features)


def test_batched_rows_equal_single_vectors_with_per_row_times() -> None:
    rows = [full_features(), {"region": 2}, {}]
    times = [1_000_000.0 + 86_400.0, None, 7.0]
    batch = user_vectors(rows, as_of=times)
    assert batch.shape == (3, USER_DIM) and batch.dtype == np.float32
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(batch[index], user_vector(row, times[index]))
    with pytest.raises(UserFeatureError, match="one time per row \\(3\\), got 2"):
        user_vectors(rows, as_of=[1.0, 2.0])


def test_columns_as_feast_returns_them() -> None:
    columns = {
        "user_id": ["a", "b"],
        "clicks_total": [4, None],
        "preference": [PREFERENCE, None],
        "age_group": [None, 2],
        "region": [0, None],
    }
    batch = user_vectors_from_columns(columns, as_of=None)
    np.testing.assert_array_equal(batch[0], user_vector({"clicks_total": 4, "preference": PREFERENCE, "region": 0}))
    np.testing.assert_array_equal(batch[1], user_vector({"age_group": 2}))
    with pytest.raises(UserFeatureError, match="same length"):
        user_vectors_from_columns({"ctr": [0.1], "cvr": [0.1, 0.2]})
    assert user_vectors_from_columns({}).shape == (0, USER_DIM)
