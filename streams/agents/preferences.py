"""The preference stage of the events agent (the logic is :mod:`streams.preferences`): one state per viewer,
shopper or merchant (a merchant's selections move their own preference)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from streams.preferences import PreferenceUpdater, UserPreferenceState, feature_row
from streams.table_store import Send, forget_on_rebalance, send_and_wait

if TYPE_CHECKING:
    from faust.types import TableT

    from streams.agents.events import AdmittedEvent
    from streams.context import AgentContext

log = logging.getLogger(__name__)


_YIELD_EVERY = 200  # events folded between chances for the event loop to run others
_DECODED_STATES_MAX = 50_000  # users whose decoded state the preference stage keeps
_DESCRIPTORS_ADAPTER: TypeAdapter[dict[str, list[float]]] = TypeAdapter(dict[str, list[float]])


class StagedImpressionMemory:
    """Impression descriptors in a Faust table, with the changes of the events folded since the last commit held
    apart until :meth:`commit` (so that a discarded fold leaves the table as it was). Writes go to the changelog
    partition of the event being processed (the user's partition, set in ``partition`` before each event), since a
    micro-batch mixes partitions and Faust's current event is only the last one."""

    def __init__(self, table: TableT) -> None:
        self.table = table
        self.partition = 0
        # impression id (bytes) -> (changelog partition, descriptors, or None once forgotten)
        self._staged: dict[bytes, tuple[int, Mapping[str, list[float]] | None]] = {}

    def get(self, impression_id: str) -> Mapping[str, list[float]] | None:
        key = impression_id.encode()
        if key in self._staged:
            return self._staged[key][1]
        raw = self.table.data.get(key)  # not Table.get: its missing key is an exception caught, per follow-up
        return None if raw is None else _DESCRIPTORS_ADAPTER.validate_json(raw)

    def put(self, impression_id: str, descriptors: Mapping[str, list[float]]) -> None:
        self._staged[impression_id.encode()] = (self.partition, dict(descriptors))

    def forget(self, impression_id: str) -> None:
        self._staged[impression_id.encode()] = (self.partition, None)

    def commit(self) -> list[Send]:
        """Write the staged changes to the table; returns their changelog records, for the caller to send."""
        staged, self._staged = self._staged, {}
        changelog = self.table.changelog_topic
        records: list[Send] = []
        for key, (partition, descriptors) in staged.items():
            if descriptors is not None:
                value = _DESCRIPTORS_ADAPTER.dump_json(dict(descriptors))
                self.table.data[key] = value
                records.append((changelog, key, value, partition))
            elif key in self.table.data:
                del self.table.data[key]
                records.append((changelog, key, None, partition))
        return records

    def discard(self) -> None:
        self._staged.clear()


class PreferenceStage:
    """The preference stage of the events agent: folds a micro-batch into per-user states (changelog-backed
    table), then pushes one Feast row per touched user and waits for Feast to take them."""

    def __init__(self, context: AgentContext) -> None:
        app, settings = context.app, context.settings
        # bytes keys and values travel raw: states are JSON made by pydantic, not by Faust's codecs.
        self._user_states = app.Table(
            "preference-users", key_type=bytes, value_type=bytes, partitions=settings.partitions
        )
        self._memory = StagedImpressionMemory(
            app.Table("preference-impressions", key_type=bytes, value_type=bytes, partitions=settings.partitions)
        )
        self._updater = PreferenceUpdater(settings)
        self._push_features = context.feature_sink
        self._metrics = context.metrics
        # Decoded states of recently seen users, the same values as in the table once committed (a state is written
        # to the table by every commit after a fold that changed it). Decoding a state's JSON for every batch a user
        # appears in cost more than the update itself. Cleared when partitions move and when a fold is discarded
        # (states are changed in place).
        self._decoded: OrderedDict[str, UserPreferenceState] = OrderedDict()
        forget_on_rebalance(app, self._decoded)
        self._touched: dict[str, tuple[UserPreferenceState, int]] = {}  # folded, not yet committed
        self._tail: asyncio.Future[None] | None = None  # the latest commit's push and changelog

    async def fold(self, batch: Sequence[AdmittedEvent]) -> None:
        touched = self._touched
        for index, admitted in enumerate(batch, start=1):
            event = admitted.event
            state = touched[event.user_id][0] if event.user_id in touched else self._state(event.user_id)
            self._memory.partition = admitted.partition
            if self._updater.apply(state, event, self._memory):
                touched[event.user_id] = (state, admitted.partition)
            if index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the consumer and producer run during a long batch

    async def commit(self) -> Awaitable[None]:
        """Write the batch's states to the tables and return the tail: the Feast push of the touched users' rows,
        then the tables' changelog, behind the previous batch's tail. The next batch may be folded meanwhile: the
        rows and the changelog records are taken now, so its changes to the same states are not in them."""
        touched, self._touched = self._touched, {}
        changelog = self._memory.commit()
        rows = [
            feature_row(user_id, self._updater.features(state), self._updater.push_stamp(state))
            for user_id, (state, _) in touched.items()
        ]
        states = self._user_states
        for user_id, (state, partition) in touched.items():
            key, value = user_id.encode(), state.to_bytes()
            states.data[key] = value
            changelog.append((states.changelog_topic, key, value, partition))
        self._tail = asyncio.ensure_future(self._push_then_log(self._tail, rows, changelog))
        return self._tail

    async def _push_then_log(
        self, previous: Awaitable[None] | None, rows: list[dict[str, Any]], changelog: list[Send]
    ) -> None:
        if previous is not None:
            await previous  # pushes (Feast keeps the newest stamp) and changelogs in batch order
        # Feast first, then the states' changelog, both before the batch is acknowledged. The other order has a
        # hole: a worker killed after the changelog and before the push would restore states that hold the batch's
        # events, read those events again as duplicates, and never push their features.
        if rows:
            with self._metrics.feast_push_seconds.time():
                await self._push_features(rows)
            self._metrics.feast_push_rows.inc(len(rows))
        await send_and_wait(changelog)

    def discard(self) -> None:
        self._touched = {}
        self._memory.discard()
        self._decoded.clear()  # states may have been changed in place by the discarded fold

    def _state(self, user_id: str) -> UserPreferenceState:
        state = self._decoded.get(user_id)
        if state is not None:
            self._decoded.move_to_end(user_id)
            return state
        raw = self._user_states.data.get(user_id.encode())
        state = UserPreferenceState(user_id=user_id) if raw is None else UserPreferenceState.from_bytes(raw)
        self._decoded[user_id] = state
        while len(self._decoded) > _DECODED_STATES_MAX:
            self._decoded.popitem(last=False)
        return state


def stage(context: AgentContext) -> PreferenceStage:
    return PreferenceStage(context)
