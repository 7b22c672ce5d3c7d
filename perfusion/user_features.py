"""The user representation u: a fixed-length float vector of a viewer's taste, from the features Feast serves.

u is a function of features alone (no user id, no embedding table), so an unseen viewer gets a vector from whatever
features exist: a cold user with a profile only, a merchant with their store profile, or an unknown user with
nothing at all. One builder, :func:`user_vector`, serves the trainer (features as of impression time), the generator
service (online features, now) and the evaluation, so that u means the same everywhere.

u measures *taste*, not activity: nothing in it grows with how much a viewer did or moves with the clock. Feast keeps
the behaviour counters (``user_preferences``); u turns them into rates with a prior, so that the same behaviour at
twice the volume gives nearly the same rates and a first round of two images with one click is not an extreme.

Layout of u (float32, ``USER_DIM`` = 42 values; ``USER_VECTOR_SLICES`` names the blocks):

- ``rates`` (4): smoothed rates ``(successes + strength * prior) / (trials + strength)`` (:data:`RATE_PRIORS`), each
  in [0, 1], the prior itself without trials:

  - ``ctr``: clicks per image shown outside the viewer's own reviews (``images_shown_total -
    images_reviewed_total``); prior 0.1 over 20 images;
  - ``cvr``: orders per click; prior 0.3 over 5 clicks;
  - ``return_rate``: returns per order; prior 0.2 over 5 orders;
  - ``select_rate``: images a merchant selected per image of the groups they reviewed (groups of their designs they
    selected from); prior 0.25 over 8 images.

- ``preference`` (``DESCRIPTOR_DIM``): the attribute descriptor of what the viewer liked (clicked, ordered, and for a
  merchant selected; perfusion.attributes), a weighted average and so independent of volume; missing -> uniform
  blocks.
- ``age_group`` (5): one-hot from ``user_profile``; missing -> uniform.
- ``region`` (4): one-hot of the ``user_profile`` region, else of a merchant's ``store_region``; missing -> uniform.
- ``present`` (3): 1 if any ``user_preferences`` value was present, 1 if any ``user_profile`` value was, 1 if a
  ``merchant_profile`` was (the viewer is a merchant).

:data:`TASTE_BLOCKS` (preference, profile one-hots and flags) are exactly the same for the same liked attributes
whatever the volume; the rates converge from their prior to the viewer's own rates as evidence grows.

Earlier layouts (53 values: log counts, recency and raw rates) are gone: a model saved for them has ``user_dim`` 53
in its config and is refused when it is given a vector of this width.

Feature dictionaries may name features plainly (``ctr``) or with their view, as Feast's ``full_feature_names``
does (``user_preferences__ctr``); ``view:feature`` keys are accepted too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from perfusion.attributes import DESCRIPTOR_DIM, one_hot_descriptor
from perfusion.errors import PerfusionError

if TYPE_CHECKING:
    from perfusion.feature_store import FeatureStoreSettings

PREFERENCES_VIEW = "user_preferences"
PROFILE_VIEW = "user_profile"
MERCHANT_VIEW = "merchant_profile"
MERCHANT_PROFILE_PUSH = "merchant_profile_push"

PREFERENCE_FEATURE = "preference"
NUM_AGE_GROUPS = 5
NUM_REGIONS = 4


@dataclass(frozen=True)
class RatePrior:
    """A rate of u: ``successes`` per ``trials`` (feature names; ``less`` is subtracted from the trials), smoothed
    towards ``mean`` with the weight of ``strength`` trials."""

    successes: str
    trials: str
    mean: float
    strength: float
    less: str | None = None

    def rate(self, successes: float, trials: float) -> float:
        return min(1.0, max(0.0, (successes + self.strength * self.mean) / (max(0.0, trials) + self.strength)))


RATE_PRIORS: dict[str, RatePrior] = {
    "ctr": RatePrior("clicks_total", "images_shown_total", mean=0.1, strength=20.0, less="images_reviewed_total"),
    "cvr": RatePrior("orders_total", "clicks_total", mean=0.3, strength=5.0),
    "return_rate": RatePrior("returns_total", "orders_total", mean=0.2, strength=5.0),
    "select_rate": RatePrior("images_selected_total", "images_reviewed_total", mean=0.25, strength=8.0),
}

# The user_preferences features u reads (the view holds more: windowed counts, raw rates, last_active_ts).
PREFERENCE_VIEW_FEATURES: tuple[str, ...] = (
    "clicks_total",
    "orders_total",
    "returns_total",
    "images_shown_total",
    "images_reviewed_total",
    "images_selected_total",
    PREFERENCE_FEATURE,
)
PROFILE_VIEW_FEATURES: tuple[str, ...] = ("age_group", "region")
MERCHANT_VIEW_FEATURES: tuple[str, ...] = ("store_region",)

# What to ask Feast for, e.g. ``store.get_online_features(features=USER_FEATURE_REFS, entity_rows=[...])``.
USER_FEATURE_REFS: tuple[str, ...] = (
    *(f"{PREFERENCES_VIEW}:{name}" for name in PREFERENCE_VIEW_FEATURES),
    *(f"{PROFILE_VIEW}:{name}" for name in PROFILE_VIEW_FEATURES),
    *(f"{MERCHANT_VIEW}:{name}" for name in MERCHANT_VIEW_FEATURES),
)

_BLOCK_SIZES: tuple[tuple[str, int], ...] = (
    ("rates", len(RATE_PRIORS)),
    ("preference", DESCRIPTOR_DIM),
    ("age_group", NUM_AGE_GROUPS),
    ("region", NUM_REGIONS),
    ("present", 3),
)
# The blocks that depend on what a viewer liked and who they are, never on how much they did.
TASTE_BLOCKS: tuple[str, ...] = ("preference", "age_group", "region", "present")


def _block_slices() -> dict[str, slice]:
    slices: dict[str, slice] = {}
    start = 0
    for name, size in _BLOCK_SIZES:
        slices[name] = slice(start, start + size)
        start += size
    return slices


USER_VECTOR_SLICES: dict[str, slice] = _block_slices()
USER_DIM: int = sum(size for _, size in _BLOCK_SIZES)

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


def _count(features: Mapping[str, Any], name: str) -> float:
    """A behaviour counter of ``user_preferences``, 0 when missing; negative values floor at 0."""
    value = _lookup(features, PREFERENCES_VIEW, name)
    return 0.0 if value is None else max(0.0, _number(value, name))


def _category(value: Any, name: str, size: int) -> int | None:
    if value is None:
        return None
    number = _number(value, name)
    if not number.is_integer() or not 0 <= number < size:
        raise UserFeatureError(f"user feature {name} must be an integer in 0..{size - 1}, got {value!r}")
    return int(number)


def _one_hot(index: int | None, size: int) -> NDArray[np.float32]:
    if index is None:
        return np.full(size, 1.0 / size, dtype=np.float32)
    out = np.zeros(size, dtype=np.float32)
    out[index] = 1.0
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


def smoothed_rates(features: Mapping[str, Any]) -> NDArray[np.float32]:
    """The ``rates`` block of u: float32 [len(RATE_PRIORS)] in :data:`RATE_PRIORS` order."""
    rates = np.zeros(len(RATE_PRIORS), dtype=np.float32)
    for index, prior in enumerate(RATE_PRIORS.values()):
        trials = _count(features, prior.trials) - (_count(features, prior.less) if prior.less else 0.0)
        rates[index] = prior.rate(_count(features, prior.successes), trials)
    return rates


def user_vector(features: Mapping[str, Any], as_of: float | None = None) -> NDArray[np.float32]:
    """u for one viewer: float32 [USER_DIM] from one row of features (see the module docstring for the layout).

    ``as_of`` (seconds since the epoch, the time the vector describes the viewer at) is accepted for the callers that
    state it; u no longer depends on the time, so it changes nothing.
    """
    del as_of  # u holds no recency: a vector of a round ago and of now differ only by what was liked since
    u = np.zeros(USER_DIM, dtype=np.float32)
    preferences_present = any(
        _lookup(features, PREFERENCES_VIEW, name) is not None for name in PREFERENCE_VIEW_FEATURES
    )
    profile_present = any(_lookup(features, PROFILE_VIEW, name) is not None for name in PROFILE_VIEW_FEATURES)
    merchant_present = any(_lookup(features, MERCHANT_VIEW, name) is not None for name in MERCHANT_VIEW_FEATURES)

    u[USER_VECTOR_SLICES["rates"]] = smoothed_rates(features)
    u[USER_VECTOR_SLICES["preference"]] = _preference(_lookup(features, PREFERENCES_VIEW, PREFERENCE_FEATURE))
    age_group = _category(_lookup(features, PROFILE_VIEW, "age_group"), "age_group", NUM_AGE_GROUPS)
    u[USER_VECTOR_SLICES["age_group"]] = _one_hot(age_group, NUM_AGE_GROUPS)
    region = _category(_lookup(features, PROFILE_VIEW, "region"), "region", NUM_REGIONS)
    store_region = _category(_lookup(features, MERCHANT_VIEW, "store_region"), "store_region", NUM_REGIONS)
    u[USER_VECTOR_SLICES["region"]] = _one_hot(region if region is not None else store_region, NUM_REGIONS)
    u[USER_VECTOR_SLICES["present"]] = (float(preferences_present), float(profile_present), float(merchant_present))
    return u


def taste_part(u: NDArray[np.float32]) -> NDArray[np.float32]:
    """The :data:`TASTE_BLOCKS` of one or many vectors ([..., USER_DIM]), concatenated along the last axis."""
    return np.concatenate([u[..., USER_VECTOR_SLICES[name]] for name in TASTE_BLOCKS], axis=-1)


def user_vectors(
    rows: Sequence[Mapping[str, Any]], as_of: float | Sequence[float | None] | None = None
) -> NDArray[np.float32]:
    """u for many users: float32 [B, USER_DIM], one row per feature mapping.

    ``as_of`` is one reference time for all rows, one per row (e.g. each impression's time), or None; it must fit
    the rows but does not change u (see :func:`user_vector`).
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


def push_sign_up_profiles(
    shopper_profiles: Mapping[str, Mapping[str, int]],
    store_regions: Mapping[str, int],
    signed_up_ts: float,
    feature_store: FeatureStoreSettings | None = None,
) -> None:
    """What the shop knows at sign-up, into Feast (online and offline), stamped ``signed_up_ts`` (seconds since the
    epoch): each shopper's profile (``age_group``, ``region``) into the ``user_profile`` view, each merchant's store
    region into ``merchant_profile`` (:func:`merchant_profile_rows`). ``feature_store`` None: the environment's."""
    from perfusion.feature_store import USER_PROFILE_PUSH, FeaturePusher

    stamp = datetime.fromtimestamp(signed_up_ts, tz=UTC)
    pusher = FeaturePusher.open(feature_store)
    pusher.push(
        USER_PROFILE_PUSH,
        [{"user_id": user_id, **profile, "event_timestamp": stamp} for user_id, profile in shopper_profiles.items()],
    )
    pusher.push(MERCHANT_PROFILE_PUSH, merchant_profile_rows(store_regions, signed_up_ts))


def merchant_profile_rows(store_regions: Mapping[str, int], signed_up_ts: float) -> list[dict[str, Any]]:
    """Rows for Feast's ``merchant_profile`` view (push source :data:`MERCHANT_PROFILE_PUSH`): one per merchant id,
    with the region its store sells in (0..NUM_REGIONS-1), stamped ``signed_up_ts`` (seconds since the epoch).

    Push them as the shoppers' profiles are pushed:
    ``FeaturePusher.open().push(MERCHANT_PROFILE_PUSH, merchant_profile_rows({...}, ts))``.
    """
    stamp = datetime.fromtimestamp(signed_up_ts, tz=UTC)
    rows = []
    for merchant_id, store_region in store_regions.items():
        if _category(store_region, "store_region", NUM_REGIONS) is None:
            raise UserFeatureError(f"merchant {merchant_id!r} needs a store_region in 0..{NUM_REGIONS - 1}")
        rows.append({"user_id": merchant_id, "store_region": int(store_region), "event_timestamp": stamp})
    return rows
