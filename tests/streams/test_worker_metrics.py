"""The worker's metrics, readiness and JSON logs in process: what the events agent counts for a batch, the bounded
labels of dead-letter reasons, the lag gauge following the partitions owned, and what a JSON log line holds."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from perfusion.contracts.records import InvalidEvent, parse_event
from simulator.traffic import encode
from streams.dead_letters import MessagePosition
from streams.logs import JsonLogFormatter
from streams.metrics import MAX_REASON_LABELS, OTHER_REASON, WorkerMetrics, reason_label
from streams.web import Readiness
from tests.streams.test_error_policy import NOW, POISONS, events_agent, good_events, messages


def test_the_events_agent_counts_what_each_message_of_a_batch_became(tmp_path: Path) -> None:
    events = good_events(3, 40)
    agent, _ = events_agent(tmp_path)
    wrong_key = (b"someone-else", events[0].to_bytes())
    raws = [encode(e) for e in events[1:]] + [(b"u", raw) for raw in POISONS.values()] + [wrong_key]
    asyncio.run(agent.process(messages(raws)))
    registry = agent._context.metrics.registry

    def events_total(outcome: str) -> float | None:
        return registry.get_sample_value("perfusion_worker_events_total", {"outcome": outcome})

    assert events_total("folded") == len(events) - 1
    assert events_total("dead_letter") == len(POISONS)
    assert events_total("rekeyed") == 1
    assert registry.get_sample_value("perfusion_worker_feast_push_seconds_count") == 1
    assert registry.get_sample_value("perfusion_worker_feast_push_rows_total") == len({e.user_id for e in events[1:]})


def poison_reason(raw: bytes) -> str:
    try:
        parse_event(raw, now=NOW)
    except InvalidEvent as exc:
        return exc.reason
    raise AssertionError("not a poison")


def test_reason_labels_leave_out_what_comes_from_the_message() -> None:
    labels = {reason_label(poison_reason(raw)) for raw in POISONS.values()}
    assert len(labels) == len(POISONS)  # each kind of poison stays its own label
    for label in labels:
        assert not any(character.isdigit() for character in label), label
    assert reason_label("unknown schema_version '2.0': major 2 is incompatible") == reason_label(
        "unknown schema_version '7.1': major 7 is incompatible"
    )
    assert reason_label("impression_id: Field required") == "impression_id"
    assert reason_label("groups could not process the event: KeyError: 'x'") == "groups could not process the event"


def test_dead_letter_reasons_beyond_the_bound_are_counted_as_other() -> None:
    metrics = WorkerMetrics()
    for index in range(MAX_REASON_LABELS + 5):
        metrics.count_dead_letter("perfusion.events", f"field_{chr(97 + index % 26)}{chr(97 + index // 26)}: bad")
    labels = {
        sample.labels["reason"]: sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "perfusion_worker_dead_letters_total"
    }
    assert len(labels) == MAX_REASON_LABELS + 1
    assert labels[OTHER_REASON] == 5
    assert sum(labels.values()) == MAX_REASON_LABELS + 5


def test_the_lag_gauge_follows_the_partitions_owned() -> None:
    metrics = WorkerMetrics()
    metrics.set_consumer_lag([("events", 0, 5), ("events", 1, 0)])
    metrics.set_consumer_lag([("events", 1, 3), ("events", 2, 7)])
    lag = {
        sample.labels["partition"]: sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "perfusion_worker_consumer_lag"
    }
    assert lag == {"1": 3, "2": 7}


def test_a_batch_is_observed_by_its_size_and_the_age_of_its_oldest_message() -> None:
    metrics = WorkerMetrics()
    metrics.observe_batch(120, oldest_timestamp_s=1_000.0, now_s=1_000.35)
    metrics.observe_batch(3, oldest_timestamp_s=None, now_s=1_001.0)  # no timestamps: counted, not aged
    metrics.observe_batch(1, oldest_timestamp_s=1_002.0, now_s=1_001.5)  # a producer clock ahead: age 0, not < 0
    sample = metrics.registry.get_sample_value
    assert sample("perfusion_worker_batch_events_count") == 3
    assert sample("perfusion_worker_batch_events_sum") == 124
    assert sample("perfusion_worker_batch_age_seconds_count") == 2
    assert sample("perfusion_worker_batch_age_seconds_sum") == pytest.approx(0.35)
    assert sample("perfusion_worker_batch_age_seconds_bucket", {"le": "0.3"}) == 1  # the 0 s one
    assert sample("perfusion_worker_batch_age_seconds_bucket", {"le": "0.5"}) == 2


def test_a_render_restricted_to_names_holds_those_samples_alone() -> None:
    metrics = WorkerMetrics()
    metrics.events.labels(outcome="folded").inc(7)
    metrics.observe_batch(7, oldest_timestamp_s=1.0, now_s=1.5)
    whole = metrics.render().decode()
    only = metrics.render(["perfusion_worker_events_total"]).decode()
    assert "perfusion_worker_batch_age_seconds_bucket" in whole
    samples = [line for line in only.splitlines() if line and not line.startswith("#")]
    assert samples == ['perfusion_worker_events_total{outcome="folded"} 7.0']


def test_a_json_log_line_names_where_the_record_was_read() -> None:
    position = MessagePosition("perfusion.events", 2, 41)
    record = logging.LogRecord(
        "streams.dead_letters", logging.WARNING, __file__, 1, "dead-lettering invalid event at %s: %s",
        (position, "not JSON"), None,
    )  # fmt: skip
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "dead-lettering invalid event at perfusion.events[2]@41: not JSON"
    assert (line["topic"], line["partition"], line["offset"]) == ("perfusion.events", 2, 41)
    assert line["level"] == "WARNING" and line["logger"] == "streams.dead_letters"
    plain = logging.LogRecord("faust", logging.INFO, __file__, 1, "started", None, None)
    assert "topic" not in json.loads(JsonLogFormatter().format(plain))


def test_readiness_says_what_it_waits_for() -> None:
    ready = Readiness(consumer_state="running", assigned_partitions=4, rebalancing=False, recovering=False)
    assert ready.ready and ready.as_dict()["waiting_for"] == []
    starting = Readiness(consumer_state="init", assigned_partitions=0, rebalancing=True, recovering=False)
    assert not starting.ready
    assert starting.waiting_for == [
        "the consumer to run (it is init)",
        "partitions to be assigned",
        "the rebalance to end",
    ]
    assert not Readiness("running", 4, False, True).ready
