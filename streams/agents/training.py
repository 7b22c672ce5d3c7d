"""The training trigger: a TrainRequest per model version after N new group samples or T seconds, whichever first.

:class:`TrainingTrigger` is the pure logic over a ``MutableMapping`` store. Per model version it keeps the number of
requests already made (``sequence``), the samples counted since the last request and the wall-clock time the first
of them arrived. A sample counts once (dedupe by ``sample_id``, since the group builder may repeat a sample after a
crash). A request is due when ``samples_per_request`` samples are pending (reason ``count``) or when the first
pending sample has waited ``max_wait_s`` seconds (reason ``timeout``, checked on every sample and every tick).
``request_id`` is ``<model_version>-<sequence>``, so a replay that rebuilds the same state names its requests the
same way. Counted sample ids are forgotten ``dedupe_retention_s`` (wall clock) after they arrived, so the state
does not grow with every sample ever made. Requests are delivered two-phase like group samples: stored as
``emitting``, sent, then confirmed.

Two agents: ``train-trigger-route`` validates each record of ``perfusion.group-samples`` (keyed by sample_id;
anything that is not a group sample goes to the dead-letter topic) and forwards only ``(sample_id, model_version)``
to the internal topic ``<app id>-train-trigger-by-version``, keyed by model_version, so that one partition owns
each version; ``train-trigger`` counts them in micro-batches, logging its state to the changelog once per batch.
A timer ticks every active partition of that topic.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import ValidationError

from perfusion.errors import ConfigError
from streams.continuity import OffsetContinuity
from streams.dead_letters import MessagePosition, dead_letter
from streams.records import GroupSample, TrainRequest, validation_reason
from streams.table_store import (
    JsonTableStore,
    flush_changelogs,
    forget_on_rebalance,
    internal_topic,
    raw_table,
    send_and_wait,
)

if TYPE_CHECKING:
    from faust.streams import Stream
    from faust.types import AgentT, StreamT, TopicT

    from streams.app import AgentContext

log = logging.getLogger(__name__)

TABLE_NAME = "train-trigger"
BY_VERSION_SUFFIX = "-train-trigger-by-version"


@dataclass(frozen=True)
class TrainingTriggerSettings:
    """When the trigger asks for a training update."""

    samples_per_request: int = field(default=256, metadata={"help": "new group samples that make a request due"})
    max_wait_s: float = field(
        default=300.0, metadata={"help": "seconds (wall clock) a pending sample waits at most before a request"}
    )
    tick_s: float = field(default=1.0, metadata={"help": "how often the timeout is checked without new samples"})
    dedupe_retention_s: float = field(
        default=86_400.0,
        metadata={
            "help": "seconds (wall clock) a counted sample id is remembered to drop repeats; the group builder "
            "repeats a sample only right after a crash, so a day is ample"
        },
    )

    def __post_init__(self) -> None:
        if self.samples_per_request < 1:
            raise ConfigError(f"samples_per_request must be at least 1, got {self.samples_per_request}")
        for name in ("max_wait_s", "tick_s", "dedupe_retention_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")


def version_key(model_version: str) -> str:
    return f"v:{model_version}"


def sample_key(sample_id: str) -> str:
    return f"s:{sample_id}"


class TrainingTrigger:
    """Counts samples per model version for one partition and decides when a TrainRequest is due."""

    def __init__(
        self,
        settings: TrainingTriggerSettings,
        store: MutableMapping[str, Any],
        partition: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.partition = partition
        self.counts: Counter[str] = Counter()
        self._store = store
        self._clock = clock
        self._resend: list[TrainRequest] | None = None  # found in the store on first use
        # Built from the store on first use, then kept up to date: this partition's version keys, and its counted
        # sample ids in order of arrival (wall-clock seconds, key), so that a tick touches neither the other keys
        # nor more than the sample ids it forgets.
        self._version_keys: set[str] | None = None
        self._remembered: deque[tuple[float, str]] = deque()

    def on_sample(self, sample_id: str, model_version: str) -> list[TrainRequest]:
        """Count one sample; returns the requests now due (send them, then :meth:`confirm`)."""
        requests = self._unconfirmed()
        self._ensure_index()
        key = sample_key(sample_id)
        if key in self._store:
            self.counts["duplicate_sample"] += 1
            return requests
        now = self._clock()
        self._store[key] = {"p": self.partition, "at": now}
        self._remembered.append((now, key))
        state = self._state(model_version)
        state["pending"] += 1
        if state["first_pending_at"] is None:
            state["first_pending_at"] = now
        requests.extend(self._maybe_request(model_version, state, now))
        self._store[version_key(model_version)] = state
        assert self._version_keys is not None
        self._version_keys.add(version_key(model_version))
        return requests

    def on_tick(self) -> list[TrainRequest]:
        """Requests whose oldest pending sample has waited ``max_wait_s``; forgets sample ids past retention."""
        requests = self._unconfirmed()
        self._ensure_index()
        assert self._version_keys is not None
        now = self._clock()
        self._forget_old_sample_ids(now)
        for key in sorted(self._version_keys):
            state = self._store.get(key)
            if state is None or not state["pending"]:
                continue
            state = {**state, "emitting": dict(state["emitting"])}
            due = self._maybe_request(key[2:], state, now)
            if due:
                self._store[key] = state
                requests.extend(due)
        return requests

    def remembered_sample_ids(self) -> int:
        self._ensure_index()
        return len(self._remembered)

    def _forget_old_sample_ids(self, now: float) -> None:
        horizon = now - self.settings.dedupe_retention_s
        while self._remembered and self._remembered[0][0] < horizon:
            _, key = self._remembered.popleft()
            stored = self._store.get(key)
            if stored is not None and stored.get("at", horizon) < horizon:
                del self._store[key]
                self.counts["sample_id_forgotten"] += 1

    def _ensure_index(self) -> None:
        if self._version_keys is not None:
            return
        self._version_keys = set()
        remembered: list[tuple[float, str]] = []
        for key in list(self._store):
            value = self._store[key]
            if not isinstance(value, dict) or value.get("p") != self.partition:
                continue
            if key.startswith("v:"):
                self._version_keys.add(key)
            elif key.startswith("s:"):
                remembered.append((float(value["at"]), key))
        self._remembered = deque(sorted(remembered))

    def confirm(self, requests: list[TrainRequest]) -> None:
        for request in requests:
            key = version_key(request.model_version)
            state = self._store.get(key)
            if state is not None and request.request_id in state["emitting"]:
                emitting = {rid: body for rid, body in state["emitting"].items() if rid != request.request_id}
                self._store[key] = {**state, "emitting": emitting}

    def _state(self, model_version: str) -> dict[str, Any]:
        stored = self._store.get(version_key(model_version))
        if stored is None:
            return {"p": self.partition, "sequence": 0, "pending": 0, "first_pending_at": None, "emitting": {}}
        return {**stored, "emitting": dict(stored["emitting"])}

    def _maybe_request(self, model_version: str, state: dict[str, Any], now: float) -> list[TrainRequest]:
        reason: Literal["count", "timeout"]
        if state["pending"] >= self.settings.samples_per_request:
            reason = "count"
        elif state["first_pending_at"] is not None and now - state["first_pending_at"] >= self.settings.max_wait_s:
            reason = "timeout"
        else:
            return []
        state["sequence"] += 1
        request = TrainRequest(
            request_id=f"{model_version}-{state['sequence']:06d}",
            model_version=model_version,
            new_samples=state["pending"],
            reason=reason,
            ts=now,
        )
        state["pending"] = 0
        state["first_pending_at"] = None
        state["emitting"][request.request_id] = request.model_dump(mode="json")
        self.counts[f"request_{reason}"] += 1
        return [request]

    def _unconfirmed(self) -> list[TrainRequest]:
        if self._resend is not None:
            return []
        self._resend = []
        for key in list(self._store):
            if key.startswith("v:") and self._store[key].get("p") == self.partition:
                for body in self._store[key]["emitting"].values():
                    self._resend.append(TrainRequest.model_validate(body, strict=False))
        return list(self._resend)


def by_version_topic_name(group_id: str) -> str:
    return group_id + BY_VERSION_SUFFIX


BATCH_MAX = 1000
BATCH_WITHIN_S = 0.1


def routed_sample(sample: GroupSample) -> bytes:
    """What the route forwards to the counter: the two fields it needs, not the whole sample (kilobytes)."""
    return json.dumps({"sample_id": sample.sample_id, "model_version": sample.model_version}).encode()


def read_routed_sample(raw: bytes) -> tuple[str, str]:
    routed = json.loads(raw)
    return str(routed["sample_id"]), str(routed["model_version"])


def register(context: AgentContext) -> AgentT:
    """Declare the training trigger's route and counting agents, its table, internal topic and timer on
    ``context.app``; returns the counting agent."""
    app, settings, topics = context.app, context.settings, context.topics
    trigger_settings = settings.training_trigger()
    by_version = internal_topic(app, by_version_topic_name(settings.group_id), settings.partitions)
    table = raw_table(app, TABLE_NAME, settings.partitions)
    triggers: dict[int, tuple[TrainingTrigger, JsonTableStore]] = {}
    forget_on_rebalance(app, triggers)

    def trigger_for(partition: int) -> tuple[TrainingTrigger, JsonTableStore]:
        if partition not in triggers:
            store = JsonTableStore(table, partition)
            triggers[partition] = (TrainingTrigger(trigger_settings, store, partition), store)
        return triggers[partition]

    async def deliver(
        emitted: list[tuple[TrainingTrigger, list[TrainRequest]]], stores: Iterable[JsonTableStore]
    ) -> None:
        """Send the requests, wait for the broker, confirm them; then log the changed keys to the changelog."""
        await send_and_wait(
            [(topics.train_requests, r.request_id.encode(), r.to_bytes()) for _, requests in emitted for r in requests]
        )
        for trigger, requests in emitted:
            trigger.confirm(requests)
            for request in requests:
                log.info("train request %s (%s, %d samples)", request.request_id, request.reason, request.new_samples)
        await flush_changelogs(stores)

    samples_continuity = OffsetContinuity.for_app(app)

    async def route(stream: StreamT[bytes]) -> None:
        """Validate each group sample (dead-letter what is not one) and forward (sample_id, model_version) keyed by
        model version, so that one partition counts each version."""
        async for batch in cast("Stream[bytes]", stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            samples_continuity.check(batch, context.on_skipped_records)
            forwards: list[tuple[TopicT, bytes, bytes]] = []
            for event in batch:
                message = event.message
                try:
                    sample = GroupSample.model_validate_json(event.value or b"")
                except ValidationError as exc:
                    position = MessagePosition(message.topic, message.partition, message.offset)
                    reason = "not a group sample: " + validation_reason(exc, whole="record")
                    log.warning("dead-lettering an unreadable group sample at %s: %s", position, reason)
                    letter = dead_letter(event.value, reason, position)
                    await context.dead_letter_sink(position.dead_letter_key(), letter)
                    continue
                forwards.append((by_version, sample.model_version.encode(), routed_sample(sample)))
            if forwards:
                await send_and_wait(forwards)

    by_version_continuity = OffsetContinuity.for_app(app)

    async def count(stream: StreamT[bytes]) -> None:
        async for batch in cast("Stream[bytes]", stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            by_version_continuity.check(batch, context.on_skipped_records)
            emitted: list[tuple[TrainingTrigger, list[TrainRequest]]] = []
            touched: dict[int, JsonTableStore] = {}  # held here: a rebalance may clear ``triggers`` meanwhile
            for event in batch:
                sample_id, model_version = read_routed_sample(event.value)
                trigger, touched[event.message.partition] = trigger_for(event.message.partition)
                requests = trigger.on_sample(sample_id, model_version)
                if requests:
                    emitted.append((trigger, requests))
            await deliver(emitted, touched.values())

    @app.timer(interval=trigger_settings.tick_s)
    async def tick() -> None:
        active = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == by_version.get_topic_name()}
        for partition in sorted(active):
            trigger, store = trigger_for(partition)
            requests = trigger.on_tick()
            await deliver([(trigger, requests)] if requests else [], [store])

    app.agent(topics.group_samples, name="train-trigger-route")(route)
    return app.agent(by_version, name="train-trigger")(count)
