"""The trainer's replay buffer: bounded, deduplicated by sample id, recency-weighted draws."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import GradedCandidate, GroupSample
from perfusion.errors import ConfigError
from trainer.replay_buffer import ReplayBuffer


def group_sample(sample_id: str, grades: tuple[int, ...] = (1, 0)) -> GroupSample:
    return GroupSample(
        sample_id=sample_id,
        user_id="user-1",
        design_id="design-1",
        prompt="a red t-shirt",
        model_version="base",
        impression_ts=1_700_000_000.0,
        candidates=[
            GradedCandidate(image_id=f"{sample_id}-img{i}", position=i, descriptor=[0.0] * DESCRIPTOR_DIM, grade=g)
            for i, g in enumerate(grades)
        ],
    )


def test_duplicates_are_refused_and_counted_once() -> None:
    buffer = ReplayBuffer(capacity=8, recency_half_life=4.0, dedupe_window=16)
    assert buffer.add(group_sample("a"), [0.0], "topic", 0, 0)
    assert not buffer.add(group_sample("a"), [1.0], "topic", 0, 5)
    assert len(buffer) == 1
    assert buffer.new_sample_ids == ["a"]
    assert buffer.entries()[0].offset == 0


def test_capacity_evicts_oldest_but_evicted_ids_stay_refused() -> None:
    buffer = ReplayBuffer(capacity=3, recency_half_life=4.0, dedupe_window=10)
    for index in range(5):
        buffer.add(group_sample(f"s{index}"), [0.0])
    assert [entry.sample_id for entry in buffer.entries()] == ["s2", "s3", "s4"]
    assert "s0" not in buffer
    assert buffer.has_seen("s0")
    assert not buffer.add(group_sample("s0"), [0.0])


def test_dedupe_window_is_bounded_oldest_forgotten_first() -> None:
    buffer = ReplayBuffer(capacity=2, recency_half_life=4.0, dedupe_window=3)
    for index in range(5):
        buffer.add(group_sample(f"s{index}"), [0.0])
    assert buffer.remembered_ids() == ["s2", "s3", "s4"]


def test_remembered_ids_from_a_manifest_refuse_replays() -> None:
    buffer = ReplayBuffer(capacity=4, recency_half_life=4.0, dedupe_window=8)
    buffer.remember(["x", "y"])
    assert not buffer.add(group_sample("x"), [0.0])
    assert buffer.add(group_sample("z"), [0.0])
    assert buffer.new_sample_ids == ["z"]


def test_mark_trained_clears_new_but_keeps_buffered() -> None:
    buffer = ReplayBuffer(capacity=4, recency_half_life=4.0, dedupe_window=8)
    buffer.add(group_sample("a"), [0.0])
    buffer.mark_trained()
    assert buffer.new_sample_ids == []
    assert len(buffer) == 1


def test_weights_halve_every_half_life() -> None:
    buffer = ReplayBuffer(capacity=8, recency_half_life=2.0, dedupe_window=8)
    for index in range(5):
        buffer.add(group_sample(f"s{index}"), [0.0])
    assert buffer.weights() == pytest.approx([0.25, 0.5**1.5, 0.5, 0.5**0.5, 1.0])


def test_draw_has_no_repeats_and_favours_recent_samples() -> None:
    buffer = ReplayBuffer(capacity=64, recency_half_life=4.0, dedupe_window=64)
    for index in range(32):
        buffer.add(group_sample(f"s{index:02d}"), [0.0])
    rng = random.Random(0)
    counts: Counter[str] = Counter()
    for _ in range(400):
        drawn = buffer.draw(4, rng)
        assert len({entry.sample_id for entry in drawn}) == 4
        counts.update(entry.sample_id for entry in drawn)
    newest_eight = sum(counts[f"s{index:02d}"] for index in range(24, 32))
    oldest_eight = sum(counts[f"s{index:02d}"] for index in range(8))
    assert newest_eight > 10 * max(oldest_eight, 1)


def test_draw_of_more_than_held_returns_everything() -> None:
    buffer = ReplayBuffer(capacity=8, recency_half_life=4.0, dedupe_window=8)
    buffer.add(group_sample("a"), [0.0])
    buffer.add(group_sample("b"), [0.0])
    assert {entry.sample_id for entry in buffer.draw(5, random.Random(0))} == {"a", "b"}


def test_draw_is_reproducible_for_a_seed() -> None:
    buffer = ReplayBuffer(capacity=16, recency_half_life=4.0, dedupe_window=16)
    for index in range(16):
        buffer.add(group_sample(f"s{index}"), [0.0])
    first = [entry.sample_id for entry in buffer.draw(5, random.Random(7))]
    second = [entry.sample_id for entry in buffer.draw(5, random.Random(7))]
    assert first == second


@pytest.mark.parametrize(("capacity", "half_life", "window"), [(0, 1.0, 4), (4, 0.0, 4), (4, 1.0, 3)])
def test_bad_configuration_is_refused(capacity: int, half_life: float, window: int) -> None:
    with pytest.raises(ConfigError):
        ReplayBuffer(capacity=capacity, recency_half_life=half_life, dedupe_window=window)
