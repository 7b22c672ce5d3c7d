"""Demand: net orders per design, and one ProductionOrder per design that reaches its threshold.

Inbound events are keyed by user, but demand is counted per design, so it takes two steps:

1. the routing stage of the events agent (:mod:`streams.agents.events`) forwards each DesignCreated, Order and
   Return (the original bytes) to the internal topic ``<app id>-demand-by-design``, keyed by design_id, waiting
   for the broker's acknowledgement before its input offsets can be committed. After each batch it also sends,
   to every partition of that topic, a progress marker per source partition (the largest event time read there),
   because a partition of the routed topic mixes events of all source partitions read at different paces: the
   counter's watermark follows the slowest source partition still moving, never a quiet one
   (:class:`streams.demand.DemandCounter`);
2. the ``demand`` agent reads that topic, folds events into :class:`streams.demand.DemandCounter` (one per
   partition, state in a changelog-backed table keyed by design and order) and sends each ProductionOrder to
   ``perfusion.production-orders`` keyed by design_id, confirming it in the table only after the broker
   acknowledged it. A timer applies the counter's idle rule to every partition this worker owns, so routed demand
   fires without waiting for traffic on other partitions; the sources' progress lives in the table;
3. after the production orders of a batch (or of an idle tick) are confirmed and the table's changelog flushed, the
   agent sends the :class:`~perfusion.contracts.records.DesignDemand` of every design whose demand changed to
   ``perfusion.design-demand`` (compacted, keyed by design_id; :func:`streams.demand.demand_updates`), waits for the
   broker, and marks them published in the table (logged with the next batch). A crash before the mark is logged
   leaves the design's state unpublished, and the partition's next owner sends it again, the same record. The
   generator service follows that topic for ``GET /designs/{id}``. Production orders are sent and confirmed as
   before, and nothing about them depends on this step.

Each message of the by-design topic is processed on its own terms: one that raises (an unreadable marker, a bug)
has its changes to the table rolled back and goes to the dead-letter topic with the reason; the rest go on.

A replay of the route (after a crash) forwards duplicates, which the counter drops by event_id. What "exactly once"
means for production orders is stated in :mod:`streams.demand`.

The table stays bounded: the counter keeps an order's record for ``--demand-return-window-s`` of event time after
the order and event ids for ``--demand-allowed-lateness-s`` + ``--demand-redelivery-horizon-s`` (the retention policy
of :mod:`streams.demand`), then deletes them, and each delete reaches the changelog as a tombstone with the batch's
flush, so the compacted changelog a restarted worker replays holds what the policy keeps and no more.

State store: Faust's memory store (``memory://``, :mod:`streams.app`). A restarted worker replays the whole
changelog before it processes anything, so its recovery time grows with the table. ``perfusion bench recovery``
(:mod:`ops.bench.recovery`; docs/streams-performance.md, "Bounded state and recovery") measured on this 2-core
machine, for 1,000,000 order records, 266 s from the web server's start to ready (209 s of CPU, about 0.21 ms per
changelog record; 0.29 ms at 100,000 with the machine busier), 41 s more to the first production order (the
counters index their records on first use), and 1.5 GB more RSS (2.2 GB in all). RocksDB (``rocksdb://``) would
keep the table on local disk and replay only the changelog's tail after a restart on the same disk, but
faust-streaming's RocksDB store needs ``rocksdict`` or ``python-rocksdb``, and neither is installed, so it is not
offered here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from perfusion.contracts.records import DesignCreated, Order, ProductionOrder, Return
from streams.continuity import OffsetContinuity
from streams.dead_letters import EventGate, MessagePosition, dead_letter, failure_reason
from streams.demand import DemandCounter, demand_updates, is_demand_event, mark_published
from streams.liveness import fail_worker_on_crash
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
    from faust.types import AgentT, EventT, StreamT, TopicT

    from streams.agents.events import AdmittedEvent
    from streams.context import AgentContext

log = logging.getLogger(__name__)

TABLE_NAME = "demand"
BY_DESIGN_SUFFIX = "-demand-by-design"
BATCH_MAX = 2000
BATCH_WITHIN_S = 0.1
PROGRESS_KEY = b"__source-progress__"


def by_design_topic_name(group_id: str) -> str:
    return group_id + BY_DESIGN_SUFFIX


def progress_marker(source_partition: int, max_event_ts: float) -> bytes:
    return json.dumps({"source_partition": source_partition, "max_event_ts": max_event_ts}).encode()


def read_progress_marker(raw: bytes) -> tuple[int, float]:
    marker = json.loads(raw)
    return int(marker["source_partition"]), float(marker["max_event_ts"])


def _by_design_topic(context: AgentContext) -> TopicT:
    return internal_topic(context.app, by_design_topic_name(context.settings.group_id), context.settings.partitions)


class DemandRouteStage:
    """The routing stage of the events agent: forwards demand events to the by-design topic, then progress markers."""

    def __init__(self, context: AgentContext) -> None:
        self._by_design = _by_design_topic(context)
        self._partitions = context.settings.partitions
        self._source_progress: dict[int, float] = {}  # source partition -> largest event time routed (committed)
        self._forwards: list[tuple[TopicT, bytes, bytes]] = []  # folded, not yet committed
        self._folded_progress: dict[int, float] = {}

    async def fold(self, batch: Sequence[AdmittedEvent]) -> None:
        for admitted in batch:
            event = admitted.event
            routed = self._folded_progress.get(admitted.partition, self._source_progress.get(admitted.partition))
            if routed is None or event.ts > routed:
                self._folded_progress[admitted.partition] = event.ts
            if is_demand_event(event):
                assert isinstance(event, DesignCreated | Order | Return)
                self._forwards.append((self._by_design, event.design_id.encode(), admitted.raw))

    async def commit(self) -> None:
        forwards, advanced = self._forwards, self._folded_progress
        self._forwards, self._folded_progress = [], {}
        await send_and_wait(forwards)
        self._source_progress.update(advanced)
        await send_and_wait(
            [
                (self._by_design, PROGRESS_KEY, progress_marker(source, ts), target)
                for source, ts in sorted(advanced.items())
                for target in range(self._partitions)
            ]
        )

    def discard(self) -> None:
        self._forwards, self._folded_progress = [], {}


def stage(context: AgentContext) -> DemandRouteStage:
    return DemandRouteStage(context)


def register(context: AgentContext) -> AgentT:
    """Declare the demand agent (reading the by-design topic), its table and idle timer on ``context.app``."""
    app, settings, topics = context.app, context.settings, context.topics
    demand = settings.demand
    by_design = _by_design_topic(context)
    table = raw_table(app, TABLE_NAME, settings.partitions)
    demand_gate = EventGate(sink=None)
    counters: dict[int, tuple[DemandCounter, JsonTableStore]] = {}
    forget_on_rebalance(app, counters)
    lock = asyncio.Lock()  # one batch or one idle tick at a time changes the counters

    def counter_for(partition: int) -> tuple[DemandCounter, JsonTableStore]:
        if partition not in counters:
            store = JsonTableStore(table, partition)
            counters[partition] = (
                DemandCounter(demand, store, partition, source_partitions=settings.partitions),
                store,
            )
        return counters[partition]

    async def process_one(event: EventT) -> list[ProductionOrder] | None:
        """Fold one message into its partition's counter; None when it was skipped."""
        message = event.message
        counter, _ = counter_for(message.partition)
        if message.key == PROGRESS_KEY:
            source, max_event_ts = read_progress_marker(event.value)
            return counter.observe_source(source, max_event_ts)
        position = MessagePosition(message.topic, message.partition, message.offset)
        parsed = await demand_gate.admit(event.value, position)
        return None if parsed is None else counter.process(parsed)

    by_design_continuity = OffsetContinuity.for_app(app)

    async def count(stream: StreamT[bytes]) -> None:
        async for batch in cast("Stream[bytes]", stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            by_design_continuity.check(batch, context.on_skipped_records)
            async with lock:
                touched: dict[int, JsonTableStore] = {}  # held here: a rebalance may clear ``counters`` meanwhile
                changed: dict[int, set[str]] = {}  # partition -> designs written by the events processed
                emitted: list[tuple[DemandCounter, list[ProductionOrder]]] = []
                for event in batch:
                    partition = event.message.partition
                    counter, store = counter_for(partition)
                    touched[partition] = store
                    store.checkpoint()
                    try:
                        orders = await process_one(event)
                    except Exception as exc:
                        store.rollback()
                        counters.pop(partition, None)  # its in-memory index may hold what was rolled back
                        await dead_letter_message(event, failure_reason("the demand counter", exc))
                        continue
                    changed.setdefault(partition, set()).update(counter.take_touched())
                    if orders:
                        emitted.append((counter, orders))
                await deliver(emitted)
                await flush_changelogs(touched.values())
                await publish_demand(touched, changed)

    async def dead_letter_message(event: EventT, reason: str) -> None:
        message = event.message
        position = MessagePosition(message.topic, message.partition, message.offset)
        log.error("dead-lettering the message at %s: %s", position, reason)
        letter = dead_letter(event.value, reason, position, key=message.key, headers=message.headers)
        await context.dead_letter_sink(position.dead_letter_key(), letter)

    async def deliver(emitted: list[tuple[DemandCounter, list[ProductionOrder]]]) -> None:
        """Send the batch's production orders, wait for the broker, then confirm them in the counters' state."""
        await send_and_wait(
            [
                (topics.production_orders, order.design_id.encode(), order.to_bytes())
                for _, orders in emitted
                for order in orders
            ]
        )
        for counter, orders in emitted:
            counter.confirm(orders)
            for order in orders:
                log.info("production order for design %s at %d net orders", order.design_id, order.net_orders)
                context.metrics.production_orders.inc()

    async def publish_demand(stores: dict[int, JsonTableStore], changed: dict[int, set[str]]) -> None:
        """Send the demand of every design whose demand changed, wait for the broker, then mark it published. Runs
        after :func:`deliver`, so that a confirmed production order is part of the state sent."""
        for partition, (counter, _) in list(counters.items()):
            if partition in stores:
                changed.setdefault(partition, set()).update(counter.take_touched())  # confirmed in deliver
        updates = [
            (stores[partition], update)
            for partition, design_ids in sorted(changed.items())
            for update in demand_updates(stores[partition], design_ids, demand)
        ]
        await send_and_wait(
            [(topics.design_demand, update.design_id.encode(), update.to_bytes()) for _, update in updates]
        )
        for store, update in updates:
            mark_published(store, [update])

    async def advance_idle_partitions() -> None:
        """The idle rule on every partition of the by-design topic this worker owns."""
        topic_name = by_design.get_topic_name()
        owned = sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic_name)
        async with lock:
            emitted: list[tuple[DemandCounter, list[ProductionOrder]]] = []
            touched: dict[int, JsonTableStore] = {}
            changed: dict[int, set[str]] = {}
            for partition in owned:
                counter, store = counter_for(partition)
                touched[partition] = store
                orders = counter.advance_idle()
                changed[partition] = counter.take_touched()
                if orders:
                    emitted.append((counter, orders))
            await deliver(emitted)
            await flush_changelogs(touched.values())
            await publish_demand(touched, changed)

    if demand.idle_after_s > 0.0:
        tick = fail_worker_on_crash("the demand idle timer", advance_idle_partitions, context.on_crash)
        app.timer(interval=max(0.5, min(5.0, demand.idle_after_s / 4)))(tick)
    return app.agent(by_design, name="demand")(fail_worker_on_crash("the demand agent", count, context.on_crash))
