"""Offset continuity of the agents: contiguous offsets and replays pass, a forward jump is a gap."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import NoReturn

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.continuity import OffsetContinuity, SkippedRecords


def test_contiguous_batches_pass_and_the_next_offset_is_remembered_per_partition() -> None:
    continuity = OffsetContinuity()
    assert continuity.first_gap([(0, 5), (1, 0), (0, 6), (1, 1)]) is None
    assert continuity.expected == {0: 7, 1: 2}
    assert continuity.first_gap([(1, 2), (0, 7)]) is None


def test_the_first_record_of_a_partition_may_start_anywhere() -> None:
    continuity = OffsetContinuity()
    assert continuity.first_gap([(3, 1200)]) is None  # committed offset of a partition just assigned


def test_a_forward_jump_is_a_gap_and_nothing_of_the_batch_is_remembered() -> None:
    continuity = OffsetContinuity()
    continuity.first_gap([(0, 67), (2, 67)])
    gap = continuity.first_gap([(2, 68), (0, 68), (0, 76), (0, 77)])
    assert gap == SkippedRecords(partition=0, first=69, last=75)
    assert continuity.expected == {0: 68, 2: 68}
    assert "offsets 69 to 75" in gap.describe()


def test_a_replay_after_a_seek_back_is_not_a_gap_and_moves_the_expectation_back() -> None:
    continuity = OffsetContinuity()
    continuity.first_gap([(1, 66), (1, 67)])
    assert continuity.first_gap([(1, 1), (1, 2)]) is None
    assert continuity.expected == {1: 3}
    assert continuity.first_gap([(1, 4)]) == SkippedRecords(1, 3, 3)


def test_clearing_the_expectations_in_place_forgets_every_partition() -> None:
    continuity = OffsetContinuity()
    expected = continuity.expected  # what the agent's rebalance handler holds
    continuity.first_gap([(0, 10)])
    expected.clear()
    assert continuity.first_gap([(0, 500)]) is None


@given(
    starts=st.dictionaries(st.integers(0, 3), st.integers(0, 1000), min_size=1),
    cut=st.integers(0, 30),
    rng=st.randoms(use_true_random=False),
)
def test_any_interleaving_of_contiguous_partitions_has_no_gap_and_removing_an_inner_record_makes_one(
    starts: dict[int, int], cut: int, rng: random.Random
) -> None:
    per_partition = {p: [(p, start + i) for i in range(8)] for p, start in starts.items()}
    merged: list[tuple[int, int]] = []
    queues = {p: list(records) for p, records in per_partition.items()}
    while any(queues.values()):
        partition = rng.choice([p for p, q in queues.items() if q])
        merged.append(queues[partition].pop(0))
    assert OffsetContinuity().first_gap(merged) is None
    position = cut % len(merged)
    partition, offset = merged[position]
    if 0 < offset - starts[partition] < 7:  # neither its first nor its last record: removing it leaves a hole
        gap = OffsetContinuity().first_gap(merged[:position] + merged[position + 1 :])
        assert gap == SkippedRecords(partition, offset, offset)


class Restarted(Exception):
    pass


def test_check_reads_partition_and_offset_of_faust_events_and_hands_a_gap_over() -> None:
    def event(partition: int, offset: int) -> SimpleNamespace:
        return SimpleNamespace(message=SimpleNamespace(partition=partition, offset=offset))

    handed_over: list[SkippedRecords] = []

    def on_skipped(skipped: SkippedRecords) -> NoReturn:
        handed_over.append(skipped)
        raise Restarted

    continuity = OffsetContinuity()
    continuity.check([event(0, 3), event(1, 9)], on_skipped)  # type: ignore[list-item]
    with pytest.raises(Restarted):
        continuity.check([event(1, 10), event(0, 5)], on_skipped)  # type: ignore[list-item]
    assert handed_over == [SkippedRecords(partition=0, first=4, last=4)]


def test_the_restart_replaces_the_process_with_the_same_command_line() -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from streams.continuity import SkippedRecords, restart_worker_process
        if os.environ.get("RESTARTED"):
            print("restarted with", sys.argv[1:], os.getpid())
            raise SystemExit(0)
        os.environ["RESTARTED"] = "1"
        print("first run", os.getpid(), flush=True)
        restart_worker_process(SkippedRecords(0, 69, 75))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "worker", "--partitions=4"], capture_output=True, text=True, timeout=60
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[0].startswith("first run") and lines[1].startswith("restarted with ['worker', '--partitions=4']")
    assert lines[0].split()[-1] == lines[1].split()[-1]  # same PID: the supervisor keeps watching the same process
    assert "offsets 69 to 75" in result.stderr
