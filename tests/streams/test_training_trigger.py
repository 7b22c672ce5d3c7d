"""The training trigger: N samples or T seconds, whichever first, per model version, with deterministic ids."""

from __future__ import annotations

import pytest

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import GradedCandidate, GroupSample, TrainRequest
from perfusion.errors import ConfigError
from streams.settings import StreamSettings
from streams.training_trigger import TrainingTrigger, TrainingTriggerSettings, read_routed_sample, routed_sample

SETTINGS = TrainingTriggerSettings(samples_per_request=3, max_wait_s=60.0, tick_s=1.0)


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(sample_id: str, version: str = "v1") -> GroupSample:
    return GroupSample(
        sample_id=sample_id, user_id="u1", design_id="d1", prompt="p", model_version=version, impression_ts=1.0,
        candidates=[GradedCandidate(image_id="a", position=0, descriptor=[0.0] * DESCRIPTOR_DIM, grade=1)],
    )  # fmt: skip


def feed(trigger: TrainingTrigger, samples: list[GroupSample]) -> list[TrainRequest]:
    requests: list[TrainRequest] = []
    for each in samples:
        emitted = trigger.on_sample(each.sample_id, each.model_version)
        trigger.confirm(emitted)
        requests.extend(emitted)
    return requests


def test_count_reached_emits_one_request_with_a_sequential_id() -> None:
    clock = FakeClock()
    trigger = TrainingTrigger(SETTINGS, {}, partition=0, clock=clock)
    requests = feed(trigger, [sample(f"s{i}") for i in range(7)])
    assert [(r.request_id, r.new_samples, r.reason) for r in requests] == [
        ("v1-000001", 3, "count"),
        ("v1-000002", 3, "count"),
    ]


def test_versions_are_counted_apart() -> None:
    trigger = TrainingTrigger(SETTINGS, {}, partition=0, clock=FakeClock())
    requests = feed(trigger, [sample("a", "v1"), sample("b", "v2"), sample("c", "v1"), sample("d", "v1")])
    assert [r.request_id for r in requests] == ["v1-000001"]


def test_duplicate_samples_count_once() -> None:
    trigger = TrainingTrigger(SETTINGS, {}, partition=0, clock=FakeClock())
    assert feed(trigger, [sample("a"), sample("a"), sample("b"), sample("b")]) == []
    assert trigger.counts["duplicate_sample"] == 2


def test_timeout_fires_on_a_tick_after_the_first_pending_sample_waited_long_enough() -> None:
    clock = FakeClock()
    trigger = TrainingTrigger(SETTINGS, {}, partition=0, clock=clock)
    feed(trigger, [sample("a")])
    clock.now += 59.0
    assert trigger.on_tick() == []
    clock.now += 1.0
    requests = trigger.on_tick()
    assert [(r.request_id, r.new_samples, r.reason, r.ts) for r in requests] == [("v1-000001", 1, "timeout", 1060.0)]
    trigger.confirm(requests)
    clock.now += 600.0
    assert trigger.on_tick() == []  # nothing pending any more


def test_timeout_is_also_checked_when_the_next_sample_arrives() -> None:
    clock = FakeClock()
    trigger = TrainingTrigger(SETTINGS, {}, partition=0, clock=clock)
    feed(trigger, [sample("a")])
    clock.now += 61.0
    requests = feed(trigger, [sample("b")])
    assert [(r.new_samples, r.reason) for r in requests] == [(2, "timeout")]


def test_unconfirmed_request_is_resent_with_the_same_id_after_a_restart() -> None:
    store: dict = {}
    clock = FakeClock()
    crashed = TrainingTrigger(SETTINGS, store, partition=0, clock=clock)
    lost: list[TrainRequest] = []
    for name in ("a", "b", "c"):
        lost += crashed.on_sample(name, "v1")  # never confirmed
    restarted = TrainingTrigger(SETTINGS, store, partition=0, clock=clock)
    resent = restarted.on_sample("c", "v1")  # the replayed sample is a duplicate
    assert resent == lost and [r.request_id for r in resent] == ["v1-000001"]
    restarted.confirm(resent)
    assert feed(TrainingTrigger(SETTINGS, store, partition=0, clock=clock), [sample("d")]) == []


def test_another_partitions_versions_are_left_alone() -> None:
    store: dict = {}
    clock = FakeClock()
    feed(TrainingTrigger(SETTINGS, store, partition=1, clock=clock), [sample("a", "v9")])
    clock.now += 100.0
    assert TrainingTrigger(SETTINGS, store, partition=0, clock=clock).on_tick() == []


def test_sample_ids_are_forgotten_after_the_retention_and_a_restart_keeps_their_arrival_times() -> None:
    settings = TrainingTriggerSettings(samples_per_request=100, max_wait_s=1e6, dedupe_retention_s=3600.0)
    store: dict = {}
    clock = FakeClock()
    trigger = TrainingTrigger(settings, store, partition=0, clock=clock)
    feed(trigger, [sample("a")])
    clock.now += 1800.0
    feed(trigger, [sample("b"), sample("a")])  # "a" within retention: a repeat
    assert trigger.counts["duplicate_sample"] == 1 and trigger.remembered_sample_ids() == 2
    clock.now += 1801.0  # "a" arrived 3601 s ago, "b" 1801 s ago
    restarted = TrainingTrigger(settings, store, partition=0, clock=clock)
    restarted.on_tick()
    assert restarted.counts["sample_id_forgotten"] == 1 and "s:a" not in store and "s:b" in store
    assert restarted.remembered_sample_ids() == 1
    feed(restarted, [sample("b")])
    assert restarted.counts["duplicate_sample"] == 1


def test_the_route_forwards_the_two_fields_the_counter_needs() -> None:
    routed = routed_sample(sample("a", "v7"))
    assert read_routed_sample(routed) == ("a", "v7") and len(routed) < 60


def test_settings_reject_zero_samples() -> None:
    with pytest.raises(ConfigError, match="samples_per_request must be at least 1, got 0"):
        TrainingTriggerSettings(samples_per_request=0)


def test_stream_settings_carry_n_t_and_tick_and_worker_flags_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ops.cli import build_parser
    from ops.commands.worker import settings_from_args

    monkeypatch.setenv("PERFUSION_TRAIN__SAMPLES_PER_REQUEST", "50")
    monkeypatch.setenv("PERFUSION_TRAIN__MAX_WAIT_S", "9")
    args = build_parser().parse_args(["worker", "--train-samples-per-request", "10", "--train-tick-s", "0.5"])
    settings = settings_from_args(args)
    assert settings.train == TrainingTriggerSettings(samples_per_request=10, max_wait_s=9.0, tick_s=0.5)
    with pytest.raises(ConfigError, match="--train-tick-s must be a number, got 'soon'"):
        settings_from_args(build_parser().parse_args(["worker", "--train-tick-s", "soon"]))
    with pytest.raises(ConfigError, match="samples_per_request must be at least 1, got 0"):
        StreamSettings(train={"samples_per_request": 0})
