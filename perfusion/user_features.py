"""The user representation u: a fixed-length float vector built from the user features Feast serves.

u is a function of features alone (no user id, no embedding table), so an unseen user gets a vector from whatever
features exist: a cold user with a profile only, or an unknown user with nothing at all. Missing values (absent
keys, None, NaN) take neutral defaults, and two indicator slots say which feature views were present.

Layout of u (float32, ``USER_DIM`` values; ``USER_VECTOR_SLICES`` names the blocks):

- ``counts``: log1p of the 12 behaviour counters (impressions/clicks/orders/returns x 1h/1d/total); missing -> 0.
- ``rates``: ctr and cvr, clipped to [0, 1]; missing -> 0.
- ``preference``: the attribute descriptor of liked images (perfusion.attributes); missing -> uniform blocks.
- ``recency``: log1p(days since last activity) and an "activity known" flag, when a reference time ``as_of`` is
  given (the impression time when training, now when serving); otherwise, or without last_active_ts -> 0, 0.
- ``age_group``: one-hot over 5 groups; ``region``: one-hot over 4 regions; missing -> uniform.
- ``present``: 1 if any user_preferences value was present, 1 if any user_profile value was present.

Feature dictionaries may name features plainly (``ctr``) or with their view, as Feast's ``full_feature_names``
does (``user_preferences__ctr``); ``view:feature`` keys are accepted too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perfusion.attributes import DESCRIPTOR_DIM, one_hot_descriptor
from perfusion.errors import PerfusionError

PREFERENCES_VIEW = "user_preferences"
PROFILE_VIEW = "user_profile"

COUNT_FEATURES: tuple[str, ...] = tuple(
    f"{kind}_{window}" for kind in ("impressions", "clicks", "orders", "returns") for window in ("1h", "1d", "total")
)
RATE_FEATURES: tuple[str, ...] = ("ctr", "cvr")
PREFERENCE_FEATURE = "preference"
LAST_ACTIVE_FEATURE = "last_active_ts"
NUM_AGE_GROUPS = 5
NUM_REGIONS = 4

PREFERENCE_VIEW_FEATURES: tuple[str, ...] = (*COUNT_FEATURES, *RATE_FEATURES, PREFERENCE_FEATURE, LAST_ACTIVE_FEATURE)
PROFILE_VIEW_FEATURES: tuple[str, ...] = ("age_group", "region")

# What to ask Feast for, e.g. ``store.get_online_features(features=USER_FEATURE_REFS, entity_rows=[...])``.
USER_FEATURE_REFS: tuple[str, ...] = (
    *(f"{PREFERENCES_VIEW}:{name}" for name in PREFERENCE_VIEW_FEATURES),
    *(f"{PROFILE_VIEW}:{name}" for name in PROFILE_VIEW_FEATURES),
)

_BLOCK_SIZES: tuple[tuple[str, int], ...] = (
    ("counts", len(COUNT_FEATURES)),
    ("rates", len(RATE_FEATURES)),
    ("preference", DESCRIPTOR_DIM),
    ("recency", 2),
    ("age_group", NUM_AGE_GROUPS),
    ("region", NUM_REGIONS),
    ("present", 2),
)


def _block_slices() -> dict[str, slice]:
    slices: dict[str, slice] = {}
    start = 0
    for name, size in _BLOCK_SIZES:
        slices[name] = slice(start, start + size)
        start += size
    return slices


USER_VECTOR_SLICES: dict[str, slice] = _block_slices()
USER_DIM: int = sum(size for _, size in _BLOCK_SIZES)

_SECONDS_PER_DAY = 86_400.0
_NEUTRAL_PREFERENCE = np.asarray(one_hot_descriptor({}), dtype=np.float32)


class UserFeatureError(PerfusionError):
    """A user feature value has the wrong type, length or range."""


def _lookup(features: Mapping[str, Any], view: str, name: str) -> Any:
    """The value of ``view``'s feature ``name`` under any of the key spellings, or None when missing or NaN."""
    for key in (name, f"{view}__{name}", f"{view}:{name}"):
        if key in features:
            value = features[key]
            if isinstance(value, float) and math.isnan(value):
                return None
            return value
    return None


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise UserFeatureError(f"user feature {name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise UserFeatureError(f"user feature {name} must be finite, got {value!r}")
    return number


def _one_hot(value: Any, name: str, size: int) -> NDArray[np.float32]:
    if value is None:
        return np.full(size, 1.0 / size, dtype=np.float32)
    number = _number(value, name)
    if not number.is_integer() or not 0 <= number < size:
        raise UserFeatureError(f"user feature {name} must be an integer in 0..{size - 1}, got {value!r}")
    out = np.zeros(size, dtype=np.float32)
    out[int(number)] = 1.0
    return out


def _preference(value: Any) -> NDArray[np.float32]:
    if value is None:
        return _NEUTRAL_PREFERENCE.copy()
    preference = np.asarray(value, dtype=np.float32).reshape(-1)
    if preference.size != DESCRIPTOR_DIM or not np.all(np.isfinite(preference)):
        raise UserFeatureError(
            f"user feature {PREFERENCE_FEATURE} must hold {DESCRIPTOR_DIM} finite floats "
            f"(an attribute descriptor), got {preference.size} values"
        )
    return preference


def user_vector(features: Mapping[str, Any], as_of: float | None = None) -> NDArray[np.float32]:
    """u for one user: float32 [USER_DIM] from one row of user features (see the module docstring for the layout).

    ``as_of`` (seconds since the epoch) is the time the vector describes the user at; it only enters the recency
    block, which stays neutral without it.
    """
    u = np.zeros(USER_DIM, dtype=np.float32)
    preferences_present = any(
        _lookup(features, PREFERENCES_VIEW, name) is not None for name in PREFERENCE_VIEW_FEATURES
    )
    profile_present = any(_lookup(features, PROFILE_VIEW, name) is not None for name in PROFILE_VIEW_FEATURES)

    counts = u[USER_VECTOR_SLICES["counts"]]
    for index, name in enumerate(COUNT_FEATURES):
        value = _lookup(features, PREFERENCES_VIEW, name)
        if value is not None:
            counts[index] = math.log1p(max(0.0, _number(value, name)))

    rates = u[USER_VECTOR_SLICES["rates"]]
    for index, name in enumerate(RATE_FEATURES):
        value = _lookup(features, PREFERENCES_VIEW, name)
        if value is not None:
            rates[index] = min(1.0, max(0.0, _number(value, name)))

    u[USER_VECTOR_SLICES["preference"]] = _preference(_lookup(features, PREFERENCES_VIEW, PREFERENCE_FEATURE))

    last_active = _lookup(features, PREFERENCES_VIEW, LAST_ACTIVE_FEATURE)
    if as_of is not None and last_active is not None:
        idle_days = max(0.0, _number(as_of, "as_of") - _number(last_active, LAST_ACTIVE_FEATURE)) / _SECONDS_PER_DAY
        u[USER_VECTOR_SLICES["recency"]] = (math.log1p(idle_days), 1.0)

    u[USER_VECTOR_SLICES["age_group"]] = _one_hot(
        _lookup(features, PROFILE_VIEW, "age_group"), "age_group", NUM_AGE_GROUPS
    )
    u[USER_VECTOR_SLICES["region"]] = _one_hot(_lookup(features, PROFILE_VIEW, "region"), "region", NUM_REGIONS)
    u[USER_VECTOR_SLICES["present"]] = (float(preferences_present), float(profile_present))
    return u


def user_vectors(
    rows: Sequence[Mapping[str, Any]], as_of: float | Sequence[float | None] | None = None
) -> NDArray[np.float32]:
    """u for many users: float32 [B, USER_DIM], one row per feature mapping.

    ``as_of`` is one reference time for all rows, one per row (e.g. each impression's time), or None.
    """
    if as_of is None or isinstance(as_of, int | float):
        times: Sequence[float | None] = [as_of] * len(rows)
    else:
        times = as_of
        if len(times) != len(rows):
            raise UserFeatureError(f"as_of must give one time per row ({len(rows)}), got {len(times)}")
    out = np.zeros((len(rows), USER_DIM), dtype=np.float32)
    for index, (row, time) in enumerate(zip(rows, times, strict=True)):
        out[index] = user_vector(row, time)
    return out


def user_vectors_from_columns(
    columns: Mapping[str, Sequence[Any]], as_of: float | Sequence[float | None] | None = None
) -> NDArray[np.float32]:
    """u for many users from column-oriented features, as Feast's ``get_online_features(...).to_dict()`` returns.

    Every column must have the same length B; columns that are not user features (e.g. ``user_id``) are ignored.
    Returns float32 [B, USER_DIM].
    """
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise UserFeatureError(f"feature columns must all have the same length, got {lengths}")
    num_rows = next(iter(lengths.values()), 0)
    rows = [{name: values[index] for name, values in columns.items()} for index in range(num_rows)]
    return user_vectors(rows, as_of)
