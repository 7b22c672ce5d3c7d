"""The demand counter's retention policy: order records and event ids kept for a span of event time on the
watermark, then deleted; what arrives after that (a return past its window, a return of an order never seen, a
redelivery of a forgotten event) counted and logged, never counted twice; the production orders unchanged under any
reordering within the lateness with expiry on; the state bounded by the policy over a long stream; and the deletes
logged to the changelog as tombstones after the watermark that refuses a redelivery."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfusion.contracts.records import AnyEvent, ProductionOrder
from perfusion.errors import ConfigError
from streams.demand import DemandCounter, DemandSettings, batch_production_orders, order_key, watermark_key
from streams.settings import StreamSettings
from tests.streams.test_agents_in_process import Sent, crash
from tests.streams.test_demand import T0, clock, design, order, returned

LATENESS = 10.0
HORIZON = 5.0
WINDOW = 40.0
# Dedupe retention 15 s, return window 40 s: short enough that records expire within a test's stream.
EXPIRING = DemandSettings(allowed_lateness_s=LATENESS, redelivery_horizon_s=HORIZON, return_window_s=WINDOW)
RETENTION = LATENESS + HORIZON


def fold(counter: DemandCounter, events: list[AnyEvent]) -> list[ProductionOrder]:
    outputs: list[ProductionOrder] = []
    for event in events:
        emitted = counter.process(event)
        counter.confirm(emitted)
        outputs.extend(emitted)
    return outputs


def order_keys(store: dict[str, Any]) -> list[str]:
    return sorted(key for key in store if key.startswith("o:"))


# ------------------------------------------------------------------------------------------------ the settings


def test_settings_state_the_retention_and_refuse_a_window_shorter_than_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EXPIRING.dedupe_retention_s == RETENTION
    defaults = DemandSettings()
    assert defaults.return_window_s >= defaults.dedupe_retention_s == 60.0 + 3600.0
    with pytest.raises(ConfigError, match=r"return_window_s must be at least .* \(3660 s\), got 100"):
        DemandSettings(return_window_s=100.0)
    with pytest.raises(ConfigError, match="redelivery_horizon_s must be at least 0"):
        DemandSettings(redelivery_horizon_s=-1.0)
    monkeypatch.setenv("PERFUSION_DEMAND__RETURN_WINDOW_S", "7200")
    monkeypatch.setenv("PERFUSION_DEMAND__REDELIVERY_HORIZON_S", "600")
    demand = StreamSettings.from_env().demand
    assert (demand.return_window_s, demand.redelivery_horizon_s, demand.dedupe_retention_s) == (7200.0, 600.0, 660.0)


# ------------------------------------------------------------------------------------------------ by hand


def test_an_order_record_is_kept_for_the_return_window_on_the_watermark_then_deleted() -> None:
    store: dict[str, Any] = {}
    counter = DemandCounter(EXPIRING, store, partition=0, clock=lambda: math.inf)  # the wall clock plays no part
    first = order("o1", T0 + 1)
    fold(counter, [design("d1", T0, 5), first])
    assert order_keys(store) == [order_key(0, "o1")]
    fold(counter, [clock(T0 + 1 + WINDOW + LATENESS)])  # the watermark reaches the order's ts + window: kept
    assert counter.order_record("o1") is not None
    fold(counter, [returned("r1", T0 + 1 + WINDOW, first)])  # stamped at the last moment a return counts
    fold(counter, [clock(T0 + 1 + WINDOW + RETENTION + LATENESS + 0.5)])  # past the return's retention too: gone
    assert order_keys(store) == [] and counter.counts["order_records_expired"] == 1
    assert counter.design_state("d1")["net"] == 0  # type: ignore[index]


def test_a_return_past_its_window_is_counted_and_logged_and_never_taken_off(caplog: pytest.LogCaptureFixture) -> None:
    counter = DemandCounter(EXPIRING, {}, partition=0)
    first, second = order("o1", T0 + 1), order("o2", T0 + 2)
    caplog.set_level(logging.INFO, logger="streams.demand")
    fold(counter, [design("d1", T0, 5), first, second, returned("r-early", T0 + 1 - RETENTION - 1, second)])
    fold(counter, [returned("r-late", T0 + 1 + WINDOW + 1, first)])  # arrives while the record is still kept
    fold(counter, [clock(T0 + 300)])
    state = counter.design_state("d1")
    assert state is not None and (state["net"], state["peak"]) == (2, 2)
    assert counter.counts["return_outside_window"] == 2
    assert "return r-late of order o1 not counted" in caplog.text and "return r-early of order o2" in caplog.text


def test_a_return_of_an_order_never_seen_waits_then_is_counted_unknown_and_deleted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store: dict[str, Any] = {}
    counter = DemandCounter(EXPIRING, store, partition=0)
    caplog.set_level(logging.INFO, logger="streams.demand")
    ghost = order("ghost", T0 + 1)
    fold(counter, [design("d1", T0, 1), returned("r1", T0 + 2, ghost), clock(T0 + 20)])
    assert counter.order_record("ghost") is not None  # waiting: its order may still come
    fold(counter, [clock(T0 + 2 + RETENTION + LATENESS + 1)])
    assert order_keys(store) == [] and counter.counts["return_unknown_order"] == 1
    assert "returns ['r1'] of order ghost not counted" in caplog.text
    assert fold(counter, [ghost]) == [] and counter.counts["expired"] == 1  # its order, too late: refused
    assert counter.design_state("d1")["net"] == 0  # type: ignore[index]


def test_a_redelivery_after_its_record_expired_is_refused_and_never_counted_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store: dict[str, Any] = {}
    counter = DemandCounter(EXPIRING, store, partition=0)
    first = order("o1", T0 + 1)
    fold(counter, [design("d1", T0, 2), first, clock(T0 + 1 + WINDOW + LATENESS + 1)])
    assert counter.order_record("o1") is None and counter.design_state("d1")["net"] == 1  # type: ignore[index]
    assert fold(counter, [first, design("d1", T0, 2)]) == []  # both forgotten, both refused
    assert counter.counts["expired"] == 2 and "dropped order o1 of design d1" in caplog.text
    assert counter.design_state("d1")["net"] == 1  # type: ignore[index]
    fired = fold(counter, [order("o2", T0 + 60), clock(T0 + 100)])
    assert [(production.design_id, production.net_orders) for production in fired] == [("d1", 2)]


def test_an_event_behind_the_watermark_within_the_retention_is_still_counted_late() -> None:
    counter = DemandCounter(EXPIRING, {}, partition=0)
    fired = fold(counter, [design("d1", T0, 1), clock(T0 + 20), order("o1", T0 + 10 - RETENTION + 1)])
    assert [production.design_id for production in fired] == ["d1"] and counter.counts["late"] == 1


def test_design_event_ids_are_forgotten_after_the_retention_and_a_restart_keeps_expiring() -> None:
    store: dict[str, Any] = {}
    counter = DemandCounter(EXPIRING, store, partition=0)
    fold(counter, [design("d1", T0, 3), order("o1", T0 + 1), clock(T0 + 12)])
    assert [applied[0] for applied in store["d:d1"]["applied"]] == ["create-d1"]
    fold(counter, [design("d1", T0, 3)])  # a redelivery within the retention: a duplicate
    assert counter.counts["duplicate"] == 1
    restarted = DemandCounter(EXPIRING, store, partition=0)  # the expiry index is rebuilt from the store
    fold(restarted, [clock(T0 + 1 + WINDOW + LATENESS + 1)])
    assert store["d:d1"]["applied"] == [] and order_keys(store) == []
    assert (store["d:d1"]["threshold"], store["d:d1"]["net"]) == (3, 1)  # the design's own state stays


# ------------------------------------------------------------------------------------------------ property-based


def long_log(rng: random.Random, designs: int, span_s: float) -> list[AnyEvent]:
    """Designs and orders over ``span_s`` of event time, returns at every distance from their order: before it,
    within the window, past it."""
    log: list[AnyEvent] = [design(f"d{n}", T0 + rng.uniform(0.0, 30.0), rng.randint(2, 12)) for n in range(designs)]
    for number in range(int(span_s)):
        if rng.random() < 0.6:
            placed = order(f"o{number}", T0 + number + rng.random(), f"d{rng.randrange(designs)}", rng.randint(1, 2))
            log.append(placed)
            if rng.random() < 0.4:
                offset = rng.choice([rng.uniform(-RETENTION - 5, 0.0), rng.uniform(0.0, WINDOW + 10)])
                log.append(returned(f"{placed.event_id}-r", placed.ts + offset, placed, rng.randint(1, 2)))
    return sorted(log, key=lambda event: event.ts)


def within_lateness(rng: random.Random, log: list[AnyEvent], duplicate_share: float) -> list[AnyEvent]:
    copies = [event for event in log for _ in range(2 if rng.random() < duplicate_share else 1)]
    keyed = [(event.ts + rng.uniform(0.0, LATENESS * 0.999), index, event) for index, event in enumerate(copies)]
    return [event for _, _, event in sorted(keyed)]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    designs=st.integers(1, 5),
    duplicate_share=st.floats(0.0, 1.0),
    split=st.floats(0.0, 1.0),
)
def test_any_order_within_the_lateness_gives_the_batch_orders_with_expiry_on(
    seed: int, designs: int, duplicate_share: float, split: float
) -> None:
    rng = random.Random(seed)
    log = long_log(rng, designs, span_s=160.0)
    expected = batch_production_orders(log, EXPIRING)
    arrivals = within_lateness(rng, log, duplicate_share)
    end = [clock(log[-1].ts + WINDOW + RETENTION + LATENESS + 1)]
    store: dict[str, Any] = {}
    outputs = fold(DemandCounter(EXPIRING, store, partition=0), arrivals)
    outputs += fold(DemandCounter(EXPIRING, store, partition=0), end)  # a restart at the end
    assert {production.design_id: production for production in outputs} == expected
    assert len(outputs) == len(expected) and order_keys(store) == []
    # Killed anywhere and restarted from the store: still each design once, the same orders.
    cut = math.floor(split * len(arrivals))
    store = {}
    restarted = fold(DemandCounter(EXPIRING, store, partition=0), arrivals[:cut])
    restarted += fold(DemandCounter(EXPIRING, store, partition=0), [*arrivals[cut:], *end])
    assert {production.design_id: production for production in restarted} == expected
    assert len(restarted) == len(expected)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rate=st.floats(0.5, 2.0))
def test_state_stays_bounded_by_the_policy_over_a_long_stream(seed: int, rate: float) -> None:
    """Twenty return windows of orders at ``rate`` per second, a third with a return anywhere from before the order
    to past its window, arriving within the lateness: after every event, each order record left is one the policy
    keeps (its order stamped within the window of the watermark, or a return within the retention), and the records
    never outnumber the orders of a window and a retention by much; the design events' ids are forgotten."""
    rng = random.Random(seed)
    designs = [design(f"d{n}", T0, 10**6) for n in range(3)]
    log: list[AnyEvent] = list(designs)
    stamped: dict[str, list[float]] = {}  # order id -> event times of the order and its returns
    ts = T0
    while ts < T0 + 20 * WINDOW:
        ts += rng.expovariate(rate)
        placed = order(f"o{len(stamped)}", ts, f"d{rng.randrange(3)}")
        log.append(placed)
        stamped[placed.event_id] = [ts]
        if rng.random() < 0.3:
            log.append(returned(f"{placed.event_id}-r", ts + rng.uniform(-5.0, WINDOW + 5.0), placed))
            stamped[placed.event_id].append(log[-1].ts)
    store: dict[str, Any] = {}
    counter = DemandCounter(EXPIRING, store, partition=0)
    most = 0
    for event in within_lateness(rng, sorted(log, key=lambda event: event.ts), 0.1):
        fold(counter, [event])
        kept = order_keys(store)
        for key in kept:
            order_ts, *return_ts = stamped[key.split(":", 2)[2]]
            assert order_ts + WINDOW >= counter.watermark or any(t + RETENTION >= counter.watermark for t in return_ts)
            assert store[key]["expires"] >= counter.watermark
        most = max(most, len(kept))
    assert most <= 2 * rate * (WINDOW + RETENTION + LATENESS) + 10, most
    assert len(stamped) > 5 * most  # most of the stream's records were deleted on the way
    assert counter.counts["expired"] == 0 and counter.counts["order_records_expired"] > 0
    assert all(store[f"d:{created.design_id}"]["applied"] == [] for created in designs)


# ------------------------------------------------------------------------------------------------ the agent


def test_the_demand_agent_logs_a_tombstone_after_the_watermark_that_refuses_a_redelivery(tmp_path: Path) -> None:
    from streams.agents.demand import PROGRESS_KEY, progress_marker
    from streams.app import create_app

    settings = StreamSettings(
        bootstrap_servers="localhost:9", topic_prefix="inproc-demand-retention.", data_dir=tmp_path, partitions=1,
        demand=EXPIRING,
    )  # fmt: skip
    stream_app = create_app(settings, agent_modules=("streams.agents.demand",), event_stage_modules=(), on_crash=crash)
    app = stream_app.app
    orders_sent, changelog = Sent(), Sent()
    stream_app.topics.production_orders.send = orders_sent.send  # type: ignore[method-assign]
    stream_app.topics.design_demand.send = Sent().send  # type: ignore[method-assign]
    app.tables["demand"].changelog_topic.send = changelog.send  # type: ignore[method-assign]
    first = order("o1", T0 + 1)

    async def drive() -> None:
        async with app.agents[next(name for name in app.agents if name.endswith("demand"))].test_context() as context:
            for event in (design("d1", T0, 2), first):
                await context.put(event.to_bytes(), key=b"d1", partition=0)
            await context.put(progress_marker(0, T0 + 30), key=PROGRESS_KEY, partition=0)
            await asyncio.sleep(0.3)
            await context.put(progress_marker(0, T0 + 200), key=PROGRESS_KEY, partition=0)  # past the window
            await asyncio.sleep(0.3)
            await context.put(first.to_bytes(), key=b"d1", partition=0)  # a redelivery of the forgotten order
            await context.put(order("o2", T0 + 195).to_bytes(), key=b"d1", partition=0)
            await context.put(progress_marker(0, T0 + 300), key=PROGRESS_KEY, partition=0)
            await asyncio.sleep(0.3)

    asyncio.run(drive())
    record_key = order_key(0, "o1").encode()
    writes = [index for index, (key, _, _) in enumerate(changelog) if key == record_key]
    assert changelog[writes[-1]][1] is None and all(changelog[index][1] is not None for index in writes[:-1])
    assert all(partition == 0 for _, _, partition in changelog)
    # The watermark logged before the tombstone, in the same flush, is past the record's expiry.
    expires = json.loads(changelog[writes[-2]][1] or b"")["expires"]
    watermarks = [
        float(value or b"")
        for key, value, _ in changelog[writes[-2] + 1 : writes[-1]]
        if key == watermark_key(0).encode()
    ]
    assert watermarks and watermarks[-1] > expires
    # The redelivered o1 was refused: d1 fired once, at o2, with 2 net orders.
    assert [ProductionOrder.model_validate_json(value or b"").net_orders for _, value, _ in orders_sent] == [2]


def test_state_logged_before_retention_is_read_without_a_crash() -> None:
    """Design ids without event times and an order recorded under the key without a partition (``o:<order_id>``):
    the counter goes on, dedupes by the old ids and counts the pending order."""
    store: dict[str, Any] = {
        "d:d1": {"p": 0, "threshold": 2, "net": 1, "peak": 1, "fired": None, "applied": ["create-d1"],
                 "pending": [[T0 + 5, "o2", "order", "o2", 1]]},
        "o:o2": {"quantity": 1, "returned": 0, "waiting": 0, "returns": [], "applied": False},
        "w:0": T0,
    }  # fmt: skip
    counter = DemandCounter(EXPIRING, store, partition=0)
    assert fold(counter, [design("d1", T0 + 1, 2)]) == [] and counter.counts["duplicate"] == 1
    fired = fold(counter, [design("d2", T0 + 6, 1), clock(T0 + 30)])
    assert [(production.design_id, production.net_orders) for production in fired] == [("d1", 2)]
    fold(counter, [clock(T0 + 100)])
    assert store["d:d2"]["applied"] == [] and store["d:d1"]["applied"] == ["create-d1"]
    assert "o:o2" in store  # an old record is neither read nor deleted
