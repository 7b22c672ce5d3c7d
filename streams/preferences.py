"""The preference-features agent: per-viewer counters, rates and a preference vector, pushed to Feast.

A viewer is a shopper or a merchant: both are keyed by ``user_id`` and folded the same way. Per viewer, in *event*
time:

- counts of impressions, clicks, orders and returns over the last hour, the last day and all time. Windows end at
  the viewer's latest event time (``last_active_ts``) and have one-minute resolution: an event counts in the 1 h
  window when its minute is one of the 60 minutes ending with the latest event's minute (1,440 for the day);
- ``images_shown_total``: candidates of every impression shown; ``images_reviewed_total``: candidates of the
  impressions the viewer selected from (a merchant reviewing a group of their own design; each impression once);
  ``images_selected_total``: the candidates selected in them;
- ``ctr`` = clicks / images shown outside the viewer's reviews (an impression shows K images, so a rate per image,
  at most 1 when each image is clicked at most once) and ``cvr`` = orders / clicks, all time, 0 when the denominator
  is 0 (the user vector smooths its own rates from the totals: perfusion.user_features);
- ``preference``: the recency-weighted average of the descriptors of images clicked (weight ``click_weight``),
  selected by a merchant (``click_weight`` too: a selection is a click-level positive, as in the group samples) and
  ordered (``order_weight``); a return adds ``-order_weight``. An interaction at time t weighs
  ``w * 2 ** (-(t_ref - t) / half_life)``; the vector is (sum of weighted descriptors) / (sum of weights), negative
  entries clipped to 0, all zeros while the weight sum is not positive. Descriptors come from the impression the
  interaction names; an interaction that arrives before its impression waits (bounded) until the impression does;
- ``last_active_ts``: the latest event time of any of the viewer's events.

Each push row is stamped at the viewer's latest event time, moved forward by :data:`PUSH_STAMP_STEP_S` past the
viewer's previous push when that is not later (:meth:`PreferenceUpdater.push_stamp`): a micro-batch of only older
events (a click that arrives after a later impression) leaves ``last_active_ts`` where it was, and Feast's Redis
online store drops a write whose timestamp is not newer than the one it holds, so an unchanged stamp would leave
the served features behind the worker's state (sqlite overwrites either way).

Duplicates (same ``event_id``) are dropped using each user's bounded list of recent event ids. The pure update logic
(:class:`PreferenceUpdater`) knows nothing of Faust; :class:`PreferenceStage` runs it in the events agent
(:mod:`streams.agents.events`) over each micro-batch, keeps state in changelog-backed tables and pushes one Feast
row per touched user per batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import AnyEvent, Click, Impression, Order, Return, Select
from streams.settings import StreamSettings

log = logging.getLogger(__name__)

COUNTED_KINDS: tuple[str, ...] = ("impressions", "clicks", "orders", "returns")
WINDOWS_MINUTES: dict[str, int] = {"1h": 60, "1d": 1440}
FEATURE_VIEW = "user_preferences"
PUSH_SOURCE = "user_preferences_push"
# The feature names of the ``user_preferences`` view, in its order; features/definitions.py declares the same.
PREFERENCE_FEATURES: tuple[str, ...] = (
    *(f"{kind}_{window}" for kind in COUNTED_KINDS for window in (*WINDOWS_MINUTES, "total")),
    "images_shown_total",
    "images_reviewed_total",
    "images_selected_total",
    "ctr",
    "cvr",
    "preference",
    "last_active_ts",
)
_MAX_PENDING = 64
PUSH_STAMP_STEP_S = 1e-3  # how far a push's stamp moves past the previous push's (Feast keeps microseconds)

InteractionKind = Literal["click", "order", "return", "select"]


class PendingInteraction(BaseModel):
    """A click, order, return or selection of one image whose impression has not been seen yet."""

    model_config = ConfigDict(extra="forbid")

    kind: InteractionKind
    impression_id: str
    image_id: str
    ts: float


class UserPreferenceState(BaseModel):
    """Everything the agent keeps about one user (a Faust table value, JSON)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str
    last_active_ts: float = 0.0
    pushed_ts: float = 0.0  # the stamp of this viewer's latest Feast push (push_stamp)
    totals: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(COUNTED_KINDS, 0))
    images_shown: int = 0  # candidates of all impressions
    images_reviewed: int = 0  # candidates of the impressions this viewer selected from (not ctr's trials)
    images_selected: int = 0  # candidates selected in them
    # kind -> {minute index since the epoch (as str, JSON keys) -> count}, only the last day's minutes.
    minute_counts: dict[str, dict[str, int]] = Field(default_factory=lambda: _empty_minute_counts())
    # Decayed to reference_ts: sum of weight * descriptor, and sum of weight.
    weighted_descriptor_sum: list[float] = Field(default_factory=lambda: [0.0] * DESCRIPTOR_DIM)
    weight_sum: float = 0.0
    reference_ts: float = 0.0
    recent_event_ids: list[str] = Field(default_factory=list)
    recent_impression_ids: list[str] = Field(default_factory=list)
    reviewed_impression_ids: list[str] = Field(default_factory=list)  # the latest ones, counted in images_reviewed
    pending: list[PendingInteraction] = Field(default_factory=list)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserPreferenceState:
        return cls.model_validate_json(raw)


class ImpressionMemory(Protocol):
    """Where candidate descriptors of recent impressions live, keyed by impression id."""

    def get(self, impression_id: str) -> Mapping[str, list[float]] | None: ...

    def put(self, impression_id: str, descriptors: Mapping[str, list[float]]) -> None: ...

    def forget(self, impression_id: str) -> None: ...


class PreferenceUpdater:
    """Folds events into :class:`UserPreferenceState`; pure apart from the :class:`ImpressionMemory` it is given."""

    def __init__(self, settings: StreamSettings) -> None:
        self._settings = settings
        self._decay_rate = math.log(2.0) / settings.preference_half_life_s  # per second
        self._weights: dict[InteractionKind, float] = {
            "click": settings.click_weight,
            "order": settings.order_weight,
            "return": -settings.order_weight,
            "select": settings.click_weight,
        }

    def apply(self, state: UserPreferenceState, event: AnyEvent, memory: ImpressionMemory) -> bool:
        """Fold ``event`` into ``state`` in place; False (and nothing changed) when it is a duplicate."""
        if event.user_id != state.user_id:
            raise ValueError(f"event of user {event.user_id!r} applied to the state of {state.user_id!r}")
        if event.event_id in state.recent_event_ids:
            return False
        state.recent_event_ids.append(event.event_id)
        del state.recent_event_ids[: -self._settings.seen_event_ids]
        latest_minute = _minute(state.last_active_ts)
        state.last_active_ts = max(state.last_active_ts, event.ts)
        if isinstance(event, Impression):
            self._count(state, "impressions", event.ts)
            state.images_shown += len(event.candidates)
            self._remember_impression(state, event, memory)
        elif isinstance(event, Click | Order | Return):
            self._count(state, f"{event.kind}s", event.ts)
            self._interact(state, PendingInteraction(**_interaction_fields(event)), memory)
        elif isinstance(event, Select):
            for image_id in dict.fromkeys(event.image_ids):
                selected = PendingInteraction(
                    kind="select", impression_id=event.impression_id, image_id=image_id, ts=event.ts
                )
                self._interact(state, selected, memory)
        # A minute falls out of the day only when the latest minute moves on (a minute counted is always inside the
        # day of the latest event time), so the buckets are looked over then, not at every event.
        if _minute(state.last_active_ts) != latest_minute:
            self._prune_minutes(state)
        return True

    def features(self, state: UserPreferenceState) -> dict[str, Any]:
        """The ``user_preferences`` feature values of ``state``, named as in the feature view."""
        row: dict[str, Any] = {}
        latest_minute = _minute(state.last_active_ts)
        for kind in COUNTED_KINDS:
            for window, minutes in WINDOWS_MINUTES.items():
                row[f"{kind}_{window}"] = sum(
                    count
                    for minute, count in state.minute_counts[kind].items()
                    if int(minute) > latest_minute - minutes
                )
            row[f"{kind}_total"] = state.totals[kind]
        row["images_shown_total"] = state.images_shown
        row["images_reviewed_total"] = state.images_reviewed
        row["images_selected_total"] = state.images_selected
        row["ctr"] = _ratio(state.totals["clicks"], max(0, state.images_shown - state.images_reviewed))
        row["cvr"] = _ratio(state.totals["orders"], state.totals["clicks"])
        row["preference"] = self.preference(state)
        row["last_active_ts"] = state.last_active_ts
        return row

    @staticmethod
    def push_stamp(state: UserPreferenceState) -> float:
        """The event timestamp of ``state``'s next push, recorded in it: its latest event time, or just after its
        previous push when that is not later, so that every push is newer than the last one."""
        stamp = max(state.last_active_ts, state.pushed_ts + PUSH_STAMP_STEP_S)
        state.pushed_ts = stamp
        return stamp

    @staticmethod
    def preference(state: UserPreferenceState) -> list[float]:
        if state.weight_sum <= 1e-12:
            return [0.0] * DESCRIPTOR_DIM
        return [max(0.0, value / state.weight_sum) for value in state.weighted_descriptor_sum]

    def _count(self, state: UserPreferenceState, kind: str, ts: float) -> None:
        state.totals[kind] += 1
        minute = str(_minute(ts))
        if _minute(ts) > _minute(state.last_active_ts) - WINDOWS_MINUTES["1d"]:
            buckets = state.minute_counts[kind]
            buckets[minute] = buckets.get(minute, 0) + 1

    @staticmethod
    def _prune_minutes(state: UserPreferenceState) -> None:
        oldest_kept = _minute(state.last_active_ts) - WINDOWS_MINUTES["1d"]
        for kind, buckets in state.minute_counts.items():
            stale = [minute for minute in buckets if int(minute) <= oldest_kept]
            for minute in stale:
                del buckets[minute]
            state.minute_counts[kind] = buckets

    def _remember_impression(
        self, state: UserPreferenceState, impression: Impression, memory: ImpressionMemory
    ) -> None:
        memory.put(impression.event_id, {c.image_id: c.descriptor for c in impression.candidates})
        state.recent_impression_ids.append(impression.event_id)
        overflow = len(state.recent_impression_ids) - self._settings.remembered_impressions
        for forgotten in state.recent_impression_ids[: max(0, overflow)]:
            memory.forget(forgotten)
        del state.recent_impression_ids[: max(0, overflow)]
        waiting = [p for p in state.pending if p.impression_id == impression.event_id]
        state.pending = [p for p in state.pending if p.impression_id != impression.event_id]
        for interaction in waiting:
            self._interact(state, interaction, memory)

    def _interact(self, state: UserPreferenceState, interaction: PendingInteraction, memory: ImpressionMemory) -> None:
        descriptors = memory.get(interaction.impression_id)
        if descriptors is None:
            state.pending.append(interaction)
            del state.pending[:-_MAX_PENDING]
            return
        descriptor = descriptors.get(interaction.image_id)
        if descriptor is None:
            log.debug("image %s is not a candidate of impression %s", interaction.image_id, interaction.impression_id)
            return
        if interaction.kind == "select":
            self._count_selection(state, interaction.impression_id, len(descriptors))
        self._add_weighted(state, descriptor, self._weights[interaction.kind], interaction.ts)

    def _count_selection(self, state: UserPreferenceState, impression_id: str, candidates: int) -> None:
        """One selected image of ``impression_id``; its ``candidates`` count as reviewed once per impression."""
        state.images_selected += 1
        if impression_id not in state.reviewed_impression_ids:
            state.reviewed_impression_ids.append(impression_id)
            del state.reviewed_impression_ids[: -self._settings.remembered_impressions]
            state.images_reviewed += candidates

    def _add_weighted(self, state: UserPreferenceState, descriptor: Sequence[float], weight: float, ts: float) -> None:
        if ts > state.reference_ts:
            shrink = math.exp(-self._decay_rate * (ts - state.reference_ts)) if state.reference_ts > 0 else 0.0
            state.weighted_descriptor_sum = [value * shrink for value in state.weighted_descriptor_sum]
            state.weight_sum *= shrink
            state.reference_ts = ts
        decayed = weight * math.exp(-self._decay_rate * (state.reference_ts - ts))
        state.weighted_descriptor_sum = [
            total + decayed * value for total, value in zip(state.weighted_descriptor_sum, descriptor, strict=True)
        ]
        state.weight_sum += decayed


def feature_row(user_id: str, features: Mapping[str, Any], stamp: float | None = None) -> dict[str, Any]:
    """A push row: the entity key, the features, and the event timestamp Feast orders rows by (``stamp``, seconds
    since the epoch, from :meth:`PreferenceUpdater.push_stamp`; None: the features' ``last_active_ts``)."""
    ts = float(features["last_active_ts"]) if stamp is None else stamp
    return {"user_id": user_id, **features, "event_timestamp": datetime.fromtimestamp(ts, tz=UTC)}


def _empty_minute_counts() -> dict[str, dict[str, int]]:
    return {kind: {} for kind in COUNTED_KINDS}


def _interaction_fields(event: Click | Order | Return) -> dict[str, Any]:
    return {"kind": event.kind, "impression_id": event.impression_id, "image_id": event.image_id, "ts": event.ts}


def _minute(ts: float) -> int:
    return math.floor(ts / 60.0)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator > 0 else 0.0
