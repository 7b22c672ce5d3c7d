"""CPU per event of each step the stream worker takes, for ``perfusion bench streams``: the worker's own pure
stages run in this process on the benchmark's events, without Kafka or Faust."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from streams.table_store import encode_state

if TYPE_CHECKING:
    from perfusion.contracts.records import AnyEvent
    from perfusion.feature_store import FeatureStoreSettings


def stage_costs(events: Sequence[AnyEvent], feature_store: FeatureStoreSettings) -> dict[str, Any]:
    """CPU microseconds per event (this process's CPU time, :func:`time.process_time`) of each step, on ``events``:
    parsing and validation (once per event, by the events agent), the preference update with its state encoding,
    the group builder and the demand counter over a JSON store, and one Feast push of every touched user's row
    (to the store ``feature_store`` names)."""
    from perfusion.contracts.records import parse_event
    from perfusion.feature_store import FeaturePusher
    from streams.demand import DemandCounter
    from streams.grouping import GroupBuilder
    from streams.preferences import PreferenceUpdater, UserPreferenceState, feature_row
    from streams.settings import StreamSettings

    settings = StreamSettings(bootstrap_servers="unused:9")
    raws = [event.to_bytes() for event in events]
    now = time.time()
    per_event: dict[str, float] = {}

    def timed(name: str, action: Callable[[], object], count: int) -> None:
        started = time.process_time()
        action()
        per_event[name] = (time.process_time() - started) / count * 1e6

    parsed: list[AnyEvent] = []
    timed("parse_and_validate", lambda: parsed.extend(parse_event(raw, now=now) for raw in raws), len(raws))
    updater = PreferenceUpdater(settings)
    memory = _DictImpressionMemory()
    states: dict[str, bytes] = {}

    def preferences() -> None:
        for event in parsed:
            raw = states.get(event.user_id)
            state = UserPreferenceState(user_id=event.user_id) if raw is None else UserPreferenceState.from_bytes(raw)
            updater.apply(state, event, memory)
            states[event.user_id] = state.to_bytes()

    timed("preference_update_and_state_json", preferences, len(parsed))
    builder = GroupBuilder(settings.group, _JsonDictStore(), partition=0)
    timed("group_builder", lambda: [builder.process(event) for event in parsed], len(parsed))
    counter = DemandCounter(settings.demand, _JsonDictStore(), partition=0)
    timed("demand_counter", lambda: [counter.process(event) for event in parsed], len(parsed))
    rows = [feature_row(user, updater.features(UserPreferenceState.from_bytes(raw))) for user, raw in states.items()]
    pusher = FeaturePusher.open(feature_store)
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    pusher.push_user_preferences(rows)
    push_seconds, push_cpu_seconds = time.perf_counter() - wall_started, time.process_time() - cpu_started
    per_event["feast_push_one_row_per_user"] = push_cpu_seconds / len(parsed) * 1e6
    total = sum(per_event.values())
    return {
        "events": len(parsed),
        "users": len(rows),
        "per_event_us": {name: round(cost, 2) for name, cost in per_event.items()},
        "total_us": round(total, 2),
        "implied_events_per_s": 1e6 / total if total > 0 else None,
        "feast_push_rows": len(rows),
        "feast_push_ms": push_seconds * 1000.0,
        "note": "CPU time of this process per event (time.process_time), one thread of Python work, without Kafka "
        "I/O or Faust overhead; the Feast push is one call for every user touched by these events (the worker "
        "pushes once per micro-batch)",
    }


class _DictImpressionMemory:
    def __init__(self) -> None:
        self._descriptors: dict[str, bytes] = {}

    def get(self, impression_id: str) -> dict[str, list[float]] | None:
        raw = self._descriptors.get(impression_id)
        return None if raw is None else json.loads(raw)

    def put(self, impression_id: str, descriptors: Any) -> None:
        self._descriptors[impression_id] = json.dumps(dict(descriptors)).encode()

    def forget(self, impression_id: str) -> None:
        self._descriptors.pop(impression_id, None)


class _JsonDictStore(dict[str, Any]):
    """A dict that pays the JSON encoding a changelog-backed table store pays on every write."""

    def __setitem__(self, key: str, value: Any) -> None:
        encode_state(value)
        super().__setitem__(key, value)
