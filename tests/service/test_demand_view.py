"""The service's demand view behind GET /designs/{id}: returns capped by the worker's rule, and the follower that
fills it surviving poison messages on the events topic (against the real broker)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from perfusion.contracts.records import DesignCreated, Order, ProductionOrder, Return
from perfusion.contracts.topics import TopicNames, ensure_topics
from service.app import FollowsTopics
from service.designs import DemandFollower, DesignRegistry
from service.metrics import ServiceMetrics
from streams.demand import DemandCounter, DemandSettings

NOW = 1_700_000_000.0
DEEP_NESTING = b'{"kind": "order", "event_id": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
HUGE_INTEGER = b'{"kind": "order", "event_id": "o", "quantity": ' + b"9" * 5_000 + b"}"


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


# ------------------------------------------------------------------------------------------- returns, capped


def test_a_return_never_takes_more_than_its_order(tmp_path: Path) -> None:
    registry = DesignRegistry(tmp_path / "designs.sqlite")
    design = registry.create("m-1", "a red dress", order_threshold=5)
    first, second = order(design.design_id, 2), order(design.design_id, 3)
    registry.record_order(first)
    registry.record_order(second)
    registry.record_return(returned(first, 1000))  # capped at the order's 2
    one = returned(second, 1)
    assert registry.record_return(one)
    assert not registry.record_return(one)  # the same return again counts once
    registry.record_return(returned(second, 1))
    assert registry.status(design.design_id).net_orders == 1  # 5 ordered, 2 + 1 + 1 returned

    # Returns of orders never counted take nothing off, however many units they name.
    stranger = order(design.design_id, 1)
    for _ in range(3):
        registry.record_return(returned(stranger, 1000))
    assert registry.status(design.design_id).net_orders == 1
    # ... until their order is counted: then they take at most its quantity.
    registry.record_order(stranger)
    assert registry.status(design.design_id).net_orders == 1


def test_net_orders_never_go_below_zero_from_returns(tmp_path: Path) -> None:
    registry = DesignRegistry(tmp_path / "designs.sqlite")
    design = registry.create("m-1", "a blue shirt", order_threshold=3)
    counted = order(design.design_id, 1)
    registry.record_order(counted)
    registry.record_return(returned(counted, 1000))
    registry.record_return(returned(order(design.design_id, 3), 3))
    assert registry.status(design.design_id).net_orders == 0


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
@given(history=demand_histories())
def test_net_orders_agree_with_the_workers_demand_counter(
    tmp_path_factory: pytest.TempPathFactory, history: list[Order | Return]
) -> None:
    registry = DesignRegistry(tmp_path_factory.mktemp("designs") / "designs.sqlite")
    for event in history:
        if isinstance(event, Order):
            registry.record_order(event)
        else:
            registry.record_return(event)

    store: dict[str, Any] = {}
    counter = DemandCounter(DemandSettings(), store, partition=0)
    for design_id in DESIGNS:
        counter.process(
            DesignCreated(
                event_id=f"design-{design_id}",
                ts=NOW - 10,
                user_id="m-1",
                design_id=design_id,
                prompt="a dress",
                order_threshold=1_000_000,
            )
        )
    for event in history:
        counter.process(event)
    counter.advance(math.inf)

    for design_id in DESIGNS:
        registry._connection.execute(
            "INSERT OR IGNORE INTO designs VALUES (?, 'm-1', 'a dress', 1000000, 0)", (design_id,)
        )
        state = counter.design_state(design_id)
        assert state is not None
        assert registry.status(design_id).net_orders == state["net"], design_id


# ------------------------------------------------------------------------------------------- the follower


def test_follower_survives_poison_and_counts_the_orders_after_it(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=1)
    registry = DesignRegistry(tmp_path / "designs.sqlite")
    design = registry.create("m-1", "a teal hoodie", order_threshold=100)
    orders = [order(design.design_id, 1, ts=time.time()) for _ in range(9)]
    inflated = order(design.design_id, 1, ts=time.time())
    poison = [DEEP_NESTING, HUGE_INTEGER, b"\x80 not utf-8", b"[]"]
    # The returns that once drove the view to -1003: far more units than the order they name, or naming an order
    # never sent.
    returns = [returned(inflated, 1000), returned(inflated, 1000), returned(order(design.design_id, 1), 1000)]
    events = poison + [event.to_bytes() for event in (*orders, inflated, *returns)]
    production = ProductionOrder(design_id=design.design_id, net_orders=9, threshold=9, ts=NOW)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=2**20)
    try:
        for value in events:
            producer.send(topics.events, key=b"shopper-1", value=value)
        producer.send(topics.production_orders, value=production.to_bytes())
        producer.flush(timeout=10)
    finally:
        producer.close()

    follower = DemandFollower(registry, kafka_bootstrap, topics.events, topics.production_orders, poll_timeout_s=0.2)
    follower.start()
    try:
        assert wait_for(lambda: registry.status(design.design_id).production_triggered)
        assert wait_for(
            lambda: follower.follower.counts().handled + follower.follower.counts().failed == len(events) + 1
        )
        assert follower.follower.running
    finally:
        follower.stop()
    # The nine orders after the poison; the inflated order is returned in full and no more.
    assert registry.status(design.design_id).net_orders == 9
    # What it skipped is visible in the service's metrics.
    assert isinstance(follower, FollowsTopics)
    metrics = ServiceMetrics()
    metrics.follow_counts_of(follower.topic_followers)
    exported = metrics.render().decode()
    # (How many of the four poisons count as failed depends on whether parse_event refuses them or raises.)
    counts = follower.follower.counts()
    assert f'perfusion_follower_records_failed_total{{follower="demand-follower"}} {float(counts.failed)}' in exported
    assert f'perfusion_follower_records_handled_total{{follower="demand-follower"}} {float(counts.handled)}' in exported

    # A new follower reads from the beginning again (as the service does at every start) and gets past the poison.
    rebuilt = DesignRegistry(tmp_path / "rebuilt.sqlite")
    rebuilt._connection.execute("INSERT INTO designs VALUES (?, 'm-1', 'a teal hoodie', 100, 0)", (design.design_id,))
    again = DemandFollower(rebuilt, kafka_bootstrap, topics.events, topics.production_orders, poll_timeout_s=0.2)
    again.start()
    try:
        assert wait_for(lambda: rebuilt.status(design.design_id).net_orders == 9)
        assert wait_for(lambda: rebuilt.status(design.design_id).production_triggered)
    finally:
        again.stop()
