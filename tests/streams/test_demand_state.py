"""Each design's demand as the worker publishes it (DesignDemand on the compacted design-demand topic): sent when it
changes and only then, the same record again after a crash before it was marked sent, and never a change to when or
how often ProductionOrder fires. In process: the demand agent sends the records after the production order."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path
from typing import Any

from ops.commands.schemas import DEFAULT_FOLDER, DIALECT, INDEX_FILE, _open_objects, _text, exported_files
from perfusion.contracts.records import DesignCreated, DesignDemand, Order, ProductionOrder, Return
from streams.demand import DemandCounter, DemandSettings, demand_updates, mark_published
from streams.settings import StreamSettings
from tests.streams.test_agents_in_process import Sent, crash

T0 = 1_700_000_000.0
SETTINGS = DemandSettings(allowed_lateness_s=10.0)


def created(design_id: str, threshold: int, ts: float = T0) -> DesignCreated:
    return DesignCreated(
        event_id=f"create-{design_id}", ts=ts, user_id="m", design_id=design_id, prompt="a shirt",
        order_threshold=threshold,
    )  # fmt: skip


def order(event_id: str, design_id: str, quantity: int, ts: float) -> Order:
    return Order(event_id=event_id, ts=ts, user_id="u", impression_id="i", design_id=design_id, image_id="x",
                 quantity=quantity)  # fmt: skip


def returned(event_id: str, of: Order, quantity: int, ts: float) -> Return:
    return Return(event_id=event_id, ts=ts, user_id="u", order_id=of.event_id, impression_id="i",
                  design_id=of.design_id, image_id="x", quantity=quantity)  # fmt: skip


def publish(counter: DemandCounter, store: dict[str, Any], sent: list[DesignDemand]) -> list[DesignDemand]:
    """What the agent does after a batch: the changed designs' demand, sent, then marked published."""
    updates = demand_updates(store, counter.take_touched(), SETTINGS)
    sent.extend(updates)
    mark_published(store, updates)
    return updates


def test_demand_is_published_when_it_changes_and_says_when_production_was_triggered() -> None:
    store: dict[str, Any] = {}
    counter = DemandCounter(SETTINGS, store, partition=0)
    sent: list[DesignDemand] = []
    first = order("o1", "d1", 1, T0 + 1)
    for event in (created("d1", 2), first):
        assert counter.process(event) == []
    assert publish(counter, store, sent) == []  # nothing applied yet: no news
    assert counter.advance(T0 + 1.5) == []  # the design and the first order applied
    (update,) = publish(counter, store, sent)
    assert (update.net_orders, update.threshold, update.threshold_reached, update.production_triggered) == (
        1, 2, False, False,
    )  # fmt: skip
    assert publish(counter, store, sent) == []  # unchanged: not sent again
    counter.process(order("o1", "d1", 1, T0 + 1))  # a duplicate changes nothing
    counter.advance(T0 + 1.8)
    assert publish(counter, store, sent) == []

    counter.process(order("o2", "d1", 2, T0 + 2))
    fired = counter.advance(T0 + 3)
    assert [(production.net_orders, production.threshold) for production in fired] == [(3, 2)]
    (emitting,) = publish(counter, store, sent)  # reached, but not yet acknowledged
    assert emitting.threshold_reached and not emitting.production_triggered and emitting.production_ts is None
    counter.confirm(fired)
    (done,) = publish(counter, store, sent)
    assert done.production_triggered and done.production_ts == fired[0].ts == T0 + 2
    assert (done.net_orders, done.peak_net_orders) == (3, 3)

    counter.process(returned("r1", first, 1, T0 + 4))  # a return after production: net down, still triggered
    counter.advance(T0 + 5)
    (after,) = publish(counter, store, sent)
    assert (after.net_orders, after.peak_net_orders, after.production_triggered) == (2, 3, True)
    assert [update.design_id for update in sent] == ["d1"] * 4


def test_a_change_not_marked_published_before_a_crash_is_sent_again_the_same() -> None:
    store: dict[str, Any] = {}
    counter = DemandCounter(SETTINGS, store, partition=0)
    for event in (created("d1", 5), created("d2", 5), order("o1", "d1", 2, T0 + 1), order("o2", "d2", 1, T0 + 1)):
        counter.process(event)
    counter.advance(T0 + 2)
    unsent = demand_updates(store, counter.take_touched(), SETTINGS)
    assert {update.design_id for update in unsent} == {"d1", "d2"}
    mark_published(store, [update for update in unsent if update.design_id == "d2"])  # then the crash

    restarted = DemandCounter(SETTINGS, store, partition=0)
    restarted.advance(T0 + 2)  # first use: the restarted counter indexes its partition
    again = demand_updates(store, restarted.take_touched(), SETTINGS)
    assert again == [update for update in unsent if update.design_id == "d1"]


def test_publishing_demand_never_changes_when_or_how_often_production_fires() -> None:
    rng = random.Random(7)
    for _ in range(30):
        events: list[Any] = [created(f"d{n}", rng.randint(1, 6), T0 + rng.uniform(0, 20)) for n in range(3)]
        for n in range(rng.randint(0, 12)):
            events.append(order(f"o{n}", f"d{rng.randrange(3)}", rng.randint(1, 3), T0 + rng.uniform(0, 30)))
        orders = [event for event in events if isinstance(event, Order)]
        for n in range(rng.randint(0, 4) if orders else 0):
            events.append(returned(f"r{n}", rng.choice(orders), rng.randint(1, 3), T0 + rng.uniform(0, 30)))
        arrival = events + rng.sample(events, k=min(3, len(events)))
        rng.shuffle(arrival)

        def run(arrival: list[Any], published: bool) -> list[ProductionOrder]:
            store: dict[str, Any] = {}
            counter = DemandCounter(SETTINGS, store, partition=0)
            fired: list[ProductionOrder] = []
            sent: list[DesignDemand] = []
            for event in arrival:
                out = counter.process(event)
                counter.confirm(out)
                fired += out
                if published:
                    publish(counter, store, sent)
            out = counter.advance(math.inf)
            counter.confirm(out)
            fired += out
            if published:
                publish(counter, store, sent)
                latest = {update.design_id: update for update in sent}
                for design_id, update in latest.items():  # the last record of each design is its state
                    state = store[f"d:{design_id}"]
                    assert update.net_orders == state["net"] and update.production_triggered == (
                        state["fired"] == "done"
                    )
            return fired

        assert run(arrival, published=True) == run(arrival, published=False)


def test_the_design_demand_schema_is_exported_beside_the_others() -> None:
    schema = _open_objects(DesignDemand.model_json_schema(mode="validation"))
    fresh = _text({"$schema": DIALECT, "$id": "design-demand.json", **schema})
    assert (DEFAULT_FOLDER / "design-demand.json").read_text() == fresh, "run the export of DesignDemand's schema"
    files = exported_files()
    if "design-demand.json" in files:  # once the export names it, its file is the export's
        assert files["design-demand.json"] == fresh
        index = json.loads(files[INDEX_FILE])
        assert {"file": "design-demand.json", "record": "DesignDemand"}.items() <= next(
            entry for entry in index["records"] if entry["file"] == "design-demand.json"
        ).items()
    exported = json.loads(fresh)
    assert set(exported["properties"]) == set(DesignDemand.model_fields)
    assert '"additionalProperties": false' not in fresh


def test_the_demand_agent_in_process_sends_each_designs_demand_after_its_production_order(tmp_path: Path) -> None:
    from perfusion.contracts.topics import TopicNames
    from streams.agents.demand import PROGRESS_KEY, progress_marker
    from streams.app import create_app

    settings = StreamSettings(
        bootstrap_servers="localhost:9", topic_prefix="inproc-demand-state.", data_dir=tmp_path, partitions=1,
        demand=SETTINGS,
    )  # fmt: skip
    stream_app = create_app(settings, agent_modules=("streams.agents.demand",), event_stage_modules=(), on_crash=crash)
    app = stream_app.app
    orders_sent, demand_sent, changelog = Sent(), Sent(), Sent()
    stream_app.topics.production_orders.send = orders_sent.send  # type: ignore[method-assign]
    stream_app.topics.design_demand.send = demand_sent.send  # type: ignore[method-assign]
    app.tables["demand"].changelog_topic.send = changelog.send  # type: ignore[method-assign]
    assert (
        stream_app.topics.design_demand.get_topic_name() == TopicNames.for_prefix("inproc-demand-state.").design_demand
    )
    routed = [
        created("d1", 2),
        order("o1", "d1", 1, T0 + 1),
        order("o1", "d1", 1, T0 + 1),
        order("o2", "d1", 1, T0 + 2),
    ]

    async def drive() -> None:
        async with app.agents[next(name for name in app.agents if name.endswith("demand"))].test_context() as context:
            for event in routed:
                await context.put(event.to_bytes(), key=b"d1", partition=0)
            await asyncio.sleep(0.2)
            await context.put(progress_marker(0, T0 + 100), key=PROGRESS_KEY, partition=0)
            await asyncio.sleep(0.2)
            await context.put(progress_marker(0, T0 + 200), key=PROGRESS_KEY, partition=0)  # no change: nothing sent
            await asyncio.sleep(0.3)

    asyncio.run(drive())
    assert [ProductionOrder.model_validate_json(value or b"").net_orders for _, value, _ in orders_sent] == [2]
    states = [(key, DesignDemand.model_validate_json(value or b"")) for key, value, _ in demand_sent]
    assert [key for key, _ in states] == [b"d1"]  # keyed by design, one record: the confirmed state
    ((_, state),) = states
    assert (state.net_orders, state.threshold, state.threshold_reached, state.production_triggered) == (
        2,
        2,
        True,
        True,
    )
    assert state.production_ts == T0 + 2
