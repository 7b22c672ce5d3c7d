"""The loop's worker stages in process: events -> group samples and viewers' features -> u, without Kafka or Feast.

The same pure code as ``perfusion worker`` runs, on an event log held in order: the group builder's reference
computation (:func:`streams.grouping.batch_group_outputs`, equal to what the stream builder emits for any arrival
order within the allowed lateness), the preference updater (:class:`streams.preferences.PreferenceUpdater`), and
the user-vector builder (:func:`perfusion.user_features.user_vector`) over the features Feast would serve: the
``user_preferences`` values the preference agent pushes, the shoppers' ``user_profile`` and the merchants'
``merchant_profile``. tests/science/test_inloop_matches_worker.py feeds one event log to this path and to the
worker on a real broker and checks that both give the same samples and vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perfusion.contracts.records import AnyEvent, GroupSample
from perfusion.user_features import (
    MERCHANT_VIEW,
    PREFERENCE_VIEW_FEATURES,
    PREFERENCES_VIEW,
    PROFILE_VIEW,
    user_vector,
)
from streams.grouping import GroupingSettings, batch_group_outputs
from streams.preferences import PreferenceUpdater, UserPreferenceState
from streams.settings import StreamSettings


class _ImpressionDescriptors:
    """The preference updater's impression memory: candidate descriptors by impression id (the worker keeps them in
    a changelog-backed table; one process needs only a mapping)."""

    def __init__(self) -> None:
        self._by_impression: dict[str, Mapping[str, list[float]]] = {}

    def get(self, impression_id: str) -> Mapping[str, list[float]] | None:
        return self._by_impression.get(impression_id)

    def put(self, impression_id: str, descriptors: Mapping[str, list[float]]) -> None:
        self._by_impression[impression_id] = descriptors

    def forget(self, impression_id: str) -> None:
        self._by_impression.pop(impression_id, None)


class InProcessLoop:
    """Folds an event log as the worker does and answers what the trainer and the generator would read.

    ``profiles``: each shopper's ``user_profile`` values (age_group, region); ``store_regions``: each merchant's
    ``merchant_profile`` store region. A viewer without events has no ``user_preferences`` row, as in Feast.
    """

    def __init__(
        self,
        profiles: Mapping[str, Mapping[str, int]],
        store_regions: Mapping[str, int],
        stream_settings: StreamSettings | None = None,
        grouping_settings: GroupingSettings | None = None,
    ) -> None:
        self.profiles = {user: dict(values) for user, values in profiles.items()}
        self.store_regions = dict(store_regions)
        self.updater = PreferenceUpdater(stream_settings or StreamSettings())
        self.grouping = grouping_settings or GroupingSettings()
        self.events: list[AnyEvent] = []
        self._states: dict[str, UserPreferenceState] = {}
        self._memory = _ImpressionDescriptors()

    def apply(self, events: Iterable[AnyEvent]) -> None:
        """Fold events (any order the worker would accept) into the viewers' states and the log."""
        for event in events:
            self.events.append(event)
            state = self._states.setdefault(event.user_id, UserPreferenceState(user_id=event.user_id))
            self.updater.apply(state, event, self._memory)

    def features(self, viewer: str) -> dict[str, Any]:
        """What Feast serves for ``viewer``, with view-qualified names (Feast's ``full_feature_names``)."""
        row: dict[str, Any] = {}
        state = self._states.get(viewer)
        if state is not None:
            values = self.updater.features(state)
            row.update({f"{PREFERENCES_VIEW}__{name}": values[name] for name in PREFERENCE_VIEW_FEATURES})
        for name, value in self.profiles.get(viewer, {}).items():
            row[f"{PROFILE_VIEW}__{name}"] = value
        if viewer in self.store_regions:
            row[f"{MERCHANT_VIEW}__store_region"] = self.store_regions[viewer]
        return row

    def user_vector(self, viewer: str) -> NDArray[np.float32]:
        """u of ``viewer`` now: float32 [USER_DIM]."""
        return user_vector(self.features(viewer))

    def group_samples(self) -> list[GroupSample]:
        """Every impression's graded sample so far, in impression order (drops are not samples)."""
        outputs = batch_group_outputs(self.events, self.grouping)
        return [output for output in outputs.values() if isinstance(output, GroupSample)]
