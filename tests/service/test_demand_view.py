"""The service's demand view behind GET /designs/{id}: what the worker's demand agent published (returns capped by
its rule), the latest record per design kept whatever order the replicas read it in, and the follower that fills it
surviving poison on the demand topic, which is created compacted (against the real broker)."""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from perfusion.contracts.records import DesignCreated, DesignDemand, Order, Return
from perfusion.contracts.topics import TopicNames, ensure_topics
from service.app import FollowsTopics
from service.designs import DemandFollower, DesignRegistry
from service.metrics import ServiceMetrics
from streams.demand import DemandCounter, DemandSettings, demand_updates, mark_published

NOW = 1_700_000_000.0
DEEP_NESTING = b'{"design_id": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
HUGE_INTEGER = b'{"design_id": "d", "net_orders": ' + b"9" * 5_000 + b"}"


def order(design_id: str, quantity: int, event_id: str | None = None, ts: float = NOW) -> Order:
    return Order(
        event_id=event_id or f"order-{uuid.uuid4().hex}",
        ts=ts,
        user_id="shopper-1",
        impression_id="imp-1",
        design_id=design_id,
        image_id="gen-0123456789abcdef",
        quantity=quantity,
    )


def returned(of: Order, quantity: int, event_id: str | None = None, ts: float = NOW + 1) -> Return:
    return Return(
        event_id=event_id or f"return-{uuid.uuid4().hex}",
        ts=ts,
        user_id=of.user_id,
        order_id=of.event_id,
        impression_id=of.impression_id,
        design_id=of.design_id,
        image_id=of.image_id,
        quantity=quantity,
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


class Worker:
    """The worker's demand counter, publishing each batch's changed demand into a registry as the follower would."""

    def __init__(self, registry: DesignRegistry, demand: DemandSettings | None = None) -> None:
        self.registry = registry
        self.settings = demand or DemandSettings()
        self.store: dict[str, Any] = {}
        self.counter = DemandCounter(self.settings, self.store, partition=0)
        self.offsets = itertools.count()
        self.latest_ts = -math.inf
        self.follower = DemandFollower(registry, "localhost:9", "test.perfusion.design-demand")

    def batch(self, events: Iterable[DesignCreated | Order | Return]) -> None:
        """Fold ``events`` and move the watermark just past the latest event time seen, as a worker's does once its
        sources have moved on (not to infinity: an event after that would be older than any retention)."""
        for event in events:
            self.latest_ts = max(self.latest_ts, event.ts)
            self.counter.confirm(self.counter.process(event))
        self.counter.confirm(self.counter.advance(self.latest_ts + 1.0))
        updates = demand_updates(self.store, self.counter.take_touched(), self.settings)
        for update in updates:
            self.follower.apply(update.to_bytes(), partition=0, offset=next(self.offsets))
        mark_published(self.store, updates)


def designed(registry: DesignRegistry, prompt: str, threshold: int) -> tuple[str, DesignCreated]:
    design = registry.create("m-1", prompt, order_threshold=threshold)
    event = DesignCreated(event_id=f"create-{design.design_id}", ts=NOW - 10, user_id="m-1",
                          design_id=design.design_id, prompt=prompt, order_threshold=threshold)  # fmt: skip
    return design.design_id, event


def test_a_return_never_takes_more_than_its_order(tmp_path: Path) -> None:
    registry = DesignRegistry(tmp_path / "service.sqlite")
    worker = Worker(registry)
    design_id, created = designed(registry, "a red dress", threshold=100)
    first, second = order(design_id, 2), order(design_id, 3)
    one = returned(second, 1)
    worker.batch([created, first, second, returned(first, 1000), one, one, returned(second, 1)])
    assert registry.status(design_id).net_orders == 1  # 5 ordered, 2 + 1 + 1 returned: the same return once

    # Returns of orders never counted take nothing off, however many units they name.
    stranger = order(design_id, 1)
    worker.batch([returned(stranger, 1000) for _ in range(3)])
    assert registry.status(design_id).net_orders == 1
    # ... until their order is counted: then they take at most its quantity.
    worker.batch([stranger])
    assert registry.status(design_id).net_orders == 1


def test_net_orders_never_go_below_zero_from_returns(tmp_path: Path) -> None:
    registry = DesignRegistry(tmp_path / "service.sqlite")
    worker = Worker(registry)
    design_id, created = designed(registry, "a blue shirt", threshold=3)
    counted = order(design_id, 1)
    worker.batch([created, counted, returned(counted, 1000), returned(order(design_id, 3), 3)])
    assert registry.status(design_id).net_orders == 0


def test_production_and_the_threshold_come_from_the_workers_record(tmp_path: Path) -> None:
    registry = DesignRegistry(tmp_path / "service.sqlite")
    worker = Worker(registry)
    design_id, created = designed(registry, "a green hoodie", threshold=3)
    assert registry.status(design_id).net_orders == 0 and not registry.status(design_id).production_triggered
    worker.batch([created, order(design_id, 2)])
    status = registry.status(design_id)
    assert (status.net_orders, status.threshold_reached, status.production_triggered) == (2, False, False)
    late = order(design_id, 1, ts=NOW + 5)
    worker.batch([late])
    status = registry.status(design_id)
    assert status.threshold_reached and status.production_triggered and status.production_ts == NOW + 5
    worker.batch([returned(late, 1, ts=NOW + 6)])  # a later return does not undo production
    status = registry.status(design_id)
    assert status.net_orders == 2 and status.production_triggered


def test_the_latest_record_per_design_is_kept_whatever_order_the_replicas_read_it_in(tmp_path: Path) -> None:
    one, two = DesignRegistry(tmp_path / "service.sqlite"), DesignRegistry(tmp_path / "service.sqlite")
    design_id = one.create("m-1", "a red dress", order_threshold=2).design_id

    def demand(net: int, triggered: bool = False) -> DesignDemand:
        return DesignDemand(design_id=design_id, net_orders=net, peak_net_orders=net, threshold=2,
                            threshold_reached=net >= 2, production_triggered=triggered,
                            production_ts=NOW if triggered else None)  # fmt: skip

    assert one.record_demand(demand(1), partition=0, offset=3)
    assert one.record_demand(demand(2, triggered=True), partition=0, offset=7)
    # A replica that started again reads the topic from the start: the older records never overwrite the newer.
    assert not two.record_demand(demand(1), partition=0, offset=3)
    assert not two.record_demand(demand(2, triggered=True), partition=0, offset=7)
    assert two.status(design_id).production_triggered and one.status(design_id).net_orders == 2
    assert two.record_demand(demand(1, triggered=True), partition=0, offset=9)  # a return, later on the topic
    assert one.status(design_id).net_orders == 1


DESIGNS = ("design-a", "design-b")


@st.composite
def demand_histories(draw: st.DrawFn) -> list[Order | Return]:
    """Orders of two designs and returns naming them or orders never sent, in any arrival order."""
    orders = [
        order(draw(st.sampled_from(DESIGNS)), draw(st.integers(1, 5)), event_id=f"o-{n}")
        for n in range(draw(st.integers(0, 6)))
    ]
    unsent = [order(design, 1, event_id=f"never-{design}") for design in DESIGNS]
    returns = [
        returned(draw(st.sampled_from(orders + unsent)), draw(st.integers(1, 7)), event_id=f"r-{n}")
        for n in range(draw(st.integers(0, 8)))
    ]
    events: list[Order | Return] = draw(st.permutations(orders + returns))
    return events + draw(st.lists(st.sampled_from(events), max_size=3)) if events else events  # and replays


@settings(max_examples=60, deadline=None)
@given(history=demand_histories(), batch_size=st.integers(1, 4))
def test_net_orders_agree_with_the_workers_demand_counter(
    tmp_path_factory: pytest.TempPathFactory, history: list[Order | Return], batch_size: int
) -> None:
    registry = DesignRegistry(tmp_path_factory.mktemp("designs") / "service.sqlite")
    worker = Worker(registry)
    for design_id in DESIGNS:
        registry._connection.execute(
            "INSERT OR IGNORE INTO designs VALUES (?, 'm-1', 'a dress', 1000000, 0)", (design_id,)
        )
    worker.batch(
        DesignCreated(event_id=f"design-{design_id}", ts=NOW - 10, user_id="m-1", design_id=design_id,
                      prompt="a dress", order_threshold=1_000_000)
        for design_id in DESIGNS
    )  # fmt: skip
    for start in range(0, len(history), batch_size):
        worker.batch(history[start : start + batch_size])

    for design_id in DESIGNS:
        state = worker.counter.design_state(design_id)
        assert state is not None
        assert registry.status(design_id).net_orders == state["net"], design_id


# ------------------------------------------------------------------------------------------- the follower


def test_follower_survives_poison_and_keeps_the_latest_demand_per_design(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=1)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.design_demand)])
    finally:
        admin.close()
    # The latest record per design is what the topic keeps.
    assert described["topic"][topics.design_demand]["cleanup.policy"]["value"] == "compact"

    registry = DesignRegistry(tmp_path / "service.sqlite")
    design = registry.create("m-1", "a teal hoodie", order_threshold=9)
    states = [
        DesignDemand(design_id=design.design_id, net_orders=net, peak_net_orders=net, threshold=9,
                     threshold_reached=net >= 9, production_triggered=net >= 9,
                     production_ts=NOW if net >= 9 else None)
        for net in range(1, 10)
    ]  # fmt: skip
    poison = [DEEP_NESTING, HUGE_INTEGER, b"\x80 not utf-8", b"[]", b'{"kind": "order"}']
    values = [states[0].to_bytes(), *poison, *(state.to_bytes() for state in states[1:])]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=2**20)
    try:
        for value in values:
            producer.send(topics.design_demand, key=design.design_id.encode(), value=value)
        producer.flush(timeout=10)
    finally:
        producer.close()

    # As perfusion serve names its topics: the follower follows the design-demand topic of their prefix.
    follower = DemandFollower(registry, kafka_bootstrap, topics.events, topics.production_orders, poll_timeout_s=0.2)
    assert follower.demand_topic == topics.design_demand
    follower.start()
    try:
        assert wait_for(lambda: registry.status(design.design_id).production_triggered)
        assert wait_for(lambda: follower.follower.counts().handled + follower.follower.counts().failed == len(values))
        assert follower.follower.running
    finally:
        follower.stop()
    assert registry.status(design.design_id).net_orders == 9
    # What it skipped is visible in the service's metrics.
    assert isinstance(follower, FollowsTopics)
    metrics = ServiceMetrics()
    metrics.follow_counts_of(follower.topic_followers)
    exported = metrics.render().decode()
    counts = follower.follower.counts()
    assert counts.failed == len(poison)
    assert f'perfusion_follower_records_failed_total{{follower="demand-follower"}} {float(counts.failed)}' in exported
    assert f'perfusion_follower_records_handled_total{{follower="demand-follower"}} {float(counts.handled)}' in exported

    # A new follower reads the topic from the beginning again (as the service does at every start) and gets past
    # the poison to the same state.
    rebuilt = DesignRegistry(tmp_path / "rebuilt.sqlite")
    rebuilt._connection.execute("INSERT INTO designs VALUES (?, 'm-1', 'a teal hoodie', 9, 0)", (design.design_id,))
    again = DemandFollower(rebuilt, kafka_bootstrap, topics.design_demand, poll_timeout_s=0.2)
    again.start()
    try:
        assert wait_for(lambda: rebuilt.status(design.design_id).net_orders == 9)
        assert wait_for(lambda: rebuilt.status(design.design_id).production_triggered)
    finally:
        again.stop()
