"""Schemas that evolve, against `perfusion worker` on the real broker: events of a newer minor version with fields
this worker does not know are processed (the order counts towards production, the click grades its group), and an
event of the next major version is dead-lettered with the version rule as its reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

from perfusion.contracts.records import VERSION_RULE, Click, DeadLetter, DesignCreated, Order
from streams.dead_letters import original_bytes
from tests.streams.test_faults_integration import IDLE_FLAGS, impression, produce_messages, read_topics, user_on
from tests.streams.test_streams_integration import (
    LATENESS_S,
    WINDOW_S,
    Worker,
    create_topics,
    feast_dir,
    start_worker,
    workers,
)

__all__ = ["feast_dir", "workers"]  # the fixtures this module's tests use


def test_a_newer_minor_with_new_fields_is_processed_and_the_next_major_is_dead_lettered(
    kafka_bootstrap: str, topic_prefix: str, feast_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    now = time.time()
    merchant, shopper = user_on(0, "merchant"), user_on(1, "shopper")
    design = DesignCreated(event_id="create-evolve", ts=now - 30, user_id=merchant, design_id="d-evolve",
                           prompt="a shirt", order_threshold=3)  # fmt: skip
    shown = impression("imp-evolve", shopper, "d-evolve", now - 20)
    common = {"user_id": shopper, "impression_id": "imp-evolve", "design_id": "d-evolve"}
    click = json.loads(Click(event_id="click-newer", ts=now - 19, image_id="imp-evolve-1", **common).to_bytes())
    order = json.loads(Order(event_id="order-newer", ts=now - 18, image_id="imp-evolve-0", quantity=3,
                             **common).to_bytes())  # fmt: skip
    newer_click = {**click, "schema_version": "1.2", "dwell_ms": 1200}
    newer_order = {**order, "schema_version": "1.2", "gift_wrap": True, "channel": {"app": "ios", "build": 7}}
    next_major = {**order, "event_id": "order-v2", "schema_version": "2.0", "quantity": {"units": 3}}
    next_major_raw = json.dumps(next_major).encode()
    names = create_topics(kafka_bootstrap, topic_prefix)
    worker = start_worker(workers, kafka_bootstrap, topic_prefix, feast_dir, tmp_path, "w1", IDLE_FLAGS)
    produce_messages(
        kafka_bootstrap, names.events,
        [(merchant.encode(), design.to_bytes()), (shopper.encode(), shown.to_bytes()),
         (shopper.encode(), json.dumps(newer_click).encode()), (shopper.encode(), json.dumps(newer_order).encode()),
         (shopper.encode(), next_major_raw)],
    )  # fmt: skip

    def done(records: dict[str, list]) -> bool:
        return all(records[topic] for topic in (names.production_orders, names.group_samples, names.dead_letters))

    topics = [names.production_orders, names.group_samples, names.dead_letters]
    records = read_topics(kafka_bootstrap, topics, done, WINDOW_S + LATENESS_S + 120.0)
    assert worker.process.poll() is None, "the worker exited"
    [(_, production_value, _)] = records[names.production_orders]
    production = json.loads(production_value)
    assert (production["design_id"], production["net_orders"]) == ("d-evolve", 3)  # the 1.2 order counted
    assert production["schema_version"] == 1  # what the worker writes is of its own version
    [(_, sample_value, _)] = records[names.group_samples]
    sample = json.loads(sample_value)
    assert [c["grade"] for c in sample["candidates"]] == [2, 1, 0]  # the 1.2 order and the 1.2 click
    [(_, letter_value, _)] = records[names.dead_letters]
    letter = DeadLetter.model_validate_json(letter_value)
    assert letter.reason == f"unknown schema_version '2.0': major 2 is incompatible; {VERSION_RULE}"
    assert original_bytes(letter) == next_major_raw and letter.topic == names.events
