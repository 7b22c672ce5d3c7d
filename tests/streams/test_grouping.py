"""The group builder's attribution windows, checked by hand and against any arrival order within the lateness."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import (
    GRADE_CLICK,
    GRADE_NONE,
    GRADE_ORDER,
    AnyEvent,
    Candidate,
    Click,
    DesignCreated,
    GroupDrop,
    GroupSample,
    Impression,
    Order,
    Return,
    Select,
)
from perfusion.errors import ConfigError
from streams.grouping import GroupBuilder, GroupingSettings, GroupOutput, batch_group_outputs, idle_watermark
from streams.settings import StreamSettings

T0 = 1_700_000_000.0
WINDOW = 100.0
LATENESS = 10.0
SETTINGS = GroupingSettings(window_s=WINDOW, allowed_lateness_s=LATENESS, closed_retention_s=500.0)


def impression(event_id: str, ts: float, k: int = 3, user: str = "u1") -> Impression:
    return Impression(
        event_id=event_id,
        ts=ts,
        user_id=user,
        design_id="d1",
        prompt="a summer t-shirt",
        model_version="v1",
        candidates=[
            Candidate(image_id=f"{event_id}-img{i}", position=i, descriptor=[0.5] * DESCRIPTOR_DIM) for i in range(k)
        ],
    )


def click(event_id: str, ts: float, impression_id: str, image: int) -> Click:
    return Click(
        event_id=event_id, ts=ts, user_id="u1", impression_id=impression_id, design_id="d1",
        image_id=f"{impression_id}-img{image}",
    )  # fmt: skip


def order(event_id: str, ts: float, impression_id: str, image: int, quantity: int = 1) -> Order:
    return Order(
        event_id=event_id, ts=ts, user_id="u1", impression_id=impression_id, design_id="d1",
        image_id=f"{impression_id}-img{image}", quantity=quantity,
    )  # fmt: skip


def returned(event_id: str, ts: float, of: Order, quantity: int = 1) -> Return:
    return Return(
        event_id=event_id, ts=ts, user_id="u1", order_id=of.event_id, impression_id=of.impression_id,
        design_id="d1", image_id=of.image_id, quantity=quantity,
    )  # fmt: skip


def select(event_id: str, ts: float, impression_id: str, images: list[int], user: str = "u1") -> Select:
    return Select(
        event_id=event_id, ts=ts, user_id=user, impression_id=impression_id, design_id="d1",
        image_ids=[f"{impression_id}-img{i}" for i in images],
    )  # fmt: skip


def clock(ts: float) -> DesignCreated:
    """An unrelated event that only moves the watermark."""
    return DesignCreated(
        event_id=f"clock-{ts}", ts=ts, user_id="m1", design_id="d-clock", prompt="x", order_threshold=1
    )


def run(events: list[AnyEvent], store: dict | None = None) -> tuple[list[GroupOutput], GroupBuilder]:
    builder = GroupBuilder(SETTINGS, {} if store is None else store, partition=0)
    outputs: list[GroupOutput] = []
    for event in events:
        emitted = builder.process(event)
        builder.confirm(emitted)
        outputs.extend(emitted)
    return outputs, builder


def grades(sample: GroupOutput) -> list[int]:
    assert isinstance(sample, GroupSample)
    return [candidate.grade for candidate in sample.candidates]


def test_window_closes_when_watermark_passes_and_grades_order_over_click() -> None:
    imp = impression("imp1", T0)
    events: list[AnyEvent] = [imp, click("c1", T0 + 5, "imp1", 0), order("o1", T0 + 6, "imp1", 0)]
    events += [click("c2", T0 + 7, "imp1", 2)]
    outputs, builder = run([*events, clock(T0 + WINDOW + LATENESS)])
    assert outputs == []  # watermark = T0 + WINDOW exactly: not past the close time yet
    outputs += builder.process(clock(T0 + WINDOW + LATENESS + 0.5))
    builder.confirm(outputs)
    assert len(outputs) == 1
    sample = outputs[0]
    assert isinstance(sample, GroupSample)
    assert sample.sample_id == "imp1" and sample.impression_ts == T0 and sample.model_version == "v1"
    assert grades(sample) == [GRADE_ORDER, GRADE_NONE, GRADE_CLICK]


def test_an_idle_partition_closes_its_last_group_as_the_wall_clock_moves_on() -> None:
    idle = GroupingSettings(window_s=WINDOW, allowed_lateness_s=LATENESS, idle_after_s=30.0)
    outputs, builder = run([impression("imp1", T0), click("c1", T0 + 5, "imp1", 1)])
    event_watermark = builder.watermark
    assert outputs == [] and event_watermark == T0 + 5 - LATENESS
    assert idle_watermark(event_watermark, 29.0, idle) is None  # not idle yet
    assert idle_watermark(event_watermark, 60.0, GroupingSettings(idle_after_s=0.0)) is None  # switched off
    assert idle_watermark(-math.inf, 600.0, idle) is None  # no event ever: nothing to advance from
    moved = idle_watermark(event_watermark, 60.0, idle)
    assert moved == T0 + 55 and builder.advance(moved) == []  # due at T0 + WINDOW: still open
    closed = builder.advance(idle_watermark(event_watermark, 106.0, idle) or -math.inf)  # T0 + 101
    assert [output.sample_id for output in closed] == ["imp1"] and grades(closed[0]) == [GRADE_NONE, GRADE_CLICK, 0]


def test_returned_order_grades_down_to_click_and_partial_return_keeps_order() -> None:
    full, partial = order("o1", T0 + 1, "imp1", 0), order("o2", T0 + 2, "imp1", 1, quantity=2)
    events: list[AnyEvent] = [impression("imp1", T0), full, partial, returned("r1", T0 + 3, full)]
    events += [returned("r2", T0 + 4, partial, quantity=1), clock(T0 + 500)]
    outputs, _ = run(events)
    assert grades(outputs[0]) == [GRADE_CLICK, GRADE_ORDER, GRADE_NONE]


def test_merchant_selection_is_a_click_level_positive() -> None:
    outputs, _ = run([impression("imp1", T0), select("s1", T0 + 1, "imp1", [1, 2]), clock(T0 + 500)])
    assert grades(outputs[0]) == [GRADE_NONE, GRADE_CLICK, GRADE_CLICK]


def test_a_merchants_own_group_is_their_sample_graded_by_their_selection() -> None:
    # The design's merchant reviews a group of it while a shopper is shown another group of the same design.
    events: list[AnyEvent] = [
        impression("review", T0, k=4, user="merchant-1"),
        impression("shown", T0 + 1, k=3, user="u1"),
        select("s1", T0 + 5, "review", [3, 1], user="merchant-1"),
        click("c1", T0 + 6, "shown", 0),
        clock(T0 + 500),
    ]
    outputs, builder = run(events)
    samples = {output.sample_id: output for output in outputs if isinstance(output, GroupSample)}
    assert set(samples) == {"review", "shown"} and builder.counts["orphan_follow_up"] == 0
    review = samples["review"]
    # The merchant's own viewer id: the trainer builds the merchant's u for this sample.
    assert review.user_id == "merchant-1" and review.design_id == "d1"
    assert grades(review) == [GRADE_NONE, GRADE_CLICK, GRADE_NONE, GRADE_CLICK]
    assert samples["shown"].user_id == "u1" and grades(samples["shown"]) == [GRADE_CLICK, GRADE_NONE, GRADE_NONE]


def test_a_merchants_selection_in_a_shoppers_group_grades_nothing_of_it() -> None:
    # The shopper's group is the shopper's choice; the merchant was not shown it, so their selection is an orphan.
    events: list[AnyEvent] = [
        impression("shown", T0, user="u1"),
        select("s1", T0 + 5, "shown", [2], user="merchant-1"),
        clock(T0 + 500),
    ]
    outputs, _ = run(events)
    [sample] = [output for output in outputs if isinstance(output, GroupSample)]
    assert sample.user_id == "u1" and grades(sample) == [GRADE_NONE] * 3
    [drop] = [output for output in outputs if isinstance(output, GroupDrop)]
    assert (drop.reason, drop.user_id, drop.sample_id) == ("orphan_follow_up", "merchant-1", "shown")


def test_follow_up_after_the_window_is_counted_and_ignored() -> None:
    events: list[AnyEvent] = [impression("imp1", T0), click("c1", T0 + WINDOW + 1, "imp1", 0), clock(T0 + 500)]
    outputs, builder = run(events)
    assert grades(outputs[0]) == [GRADE_NONE] * 3
    assert builder.counts["outside_window"] == 1


def test_click_before_its_impression_is_buffered_not_lost() -> None:
    outputs, builder = run([click("c1", T0 + 5, "imp1", 1), impression("imp1", T0), clock(T0 + 500)])
    assert grades(outputs[0]) == [GRADE_NONE, GRADE_CLICK, GRADE_NONE]
    assert builder.counts["orphan_follow_up"] == 0


def test_follow_up_whose_impression_never_comes_expires_as_one_orphan_drop() -> None:
    outputs, builder = run([click("c1", T0, "ghost", 0), click("c2", T0 + 3, "ghost", 1), clock(T0 + 500)])
    assert outputs == [
        GroupDrop(
            sample_id="ghost", user_id="u1", design_id="d1", reason="orphan_follow_up", impression_ts=T0,
            watermark=T0 + 500 - LATENESS, follow_ups=2,
        )
    ]  # fmt: skip
    assert outputs[0].key() == b"ghost/u1"
    assert builder.counts["orphan_follow_up"] == 2
    assert builder.open_groups() == 0


def shared_click(event_id: str, ts: float, impression_id: str, image: int, user: str) -> Click:
    return click(event_id, ts, impression_id, image).model_copy(update={"user_id": user})


def test_a_click_by_another_user_on_a_shared_impression_leaves_one_sample_and_one_orphan_drop() -> None:
    outputs, _ = run([impression("imp1", T0), shared_click("c1", T0 + 5, "imp1", 1, user="friend"), clock(T0 + 500)])
    samples = [output for output in outputs if isinstance(output, GroupSample)]
    drops = [output for output in outputs if isinstance(output, GroupDrop)]
    assert [sample.sample_id for sample in samples] == ["imp1"]
    assert grades(samples[0]) == [GRADE_NONE, GRADE_NONE, GRADE_NONE]  # the friend's click is not the viewer's
    assert [(drop.sample_id, drop.user_id, drop.reason) for drop in drops] == [("imp1", "friend", "orphan_follow_up")]


def test_orphan_clicks_on_one_impression_from_two_partitions_are_two_drops_and_no_crash() -> None:
    store: dict = {}  # one table for both partitions, as in the worker
    left, right = GroupBuilder(SETTINGS, store, partition=0), GroupBuilder(SETTINGS, store, partition=1)
    assert left.process(shared_click("c1", T0, "ghost", 0, user="a")) == []
    assert right.process(shared_click("c2", T0 + 1, "ghost", 0, user="b")) == []
    left_drops, right_drops = left.process(clock(T0 + 500)), right.process(clock(T0 + 500))
    left.confirm(left_drops)
    right.confirm(right_drops)
    assert [(d.user_id, d.reason) for d in left_drops + right_drops] == [
        ("a", "orphan_follow_up"),
        ("b", "orphan_follow_up"),
    ]
    assert left.process(clock(T0 + 2000)) == [] and right.process(clock(T0 + 2000)) == []


def test_one_impression_on_two_partitions_gives_each_partition_its_own_group() -> None:
    store: dict = {}
    left, right = GroupBuilder(SETTINGS, store, partition=0), GroupBuilder(SETTINGS, store, partition=1)
    left.process(impression("imp1", T0))
    right.process(impression("imp1", T0))  # the same event read from a second partition (a producer's mistake)
    right.process(click("c1", T0 + 1, "imp1", 2))
    [from_left], [from_right] = left.process(clock(T0 + 500)), right.process(clock(T0 + 500))
    assert grades(from_left) == [GRADE_NONE] * 3 and grades(from_right) == [GRADE_NONE, GRADE_NONE, GRADE_CLICK]


def test_the_orphan_buffer_is_bounded_per_impression_and_per_partition() -> None:
    bounded = GroupingSettings(
        window_s=WINDOW, allowed_lateness_s=LATENESS, max_pending_follow_ups=2, max_pending_impressions=2
    )
    builder = GroupBuilder(bounded, {}, partition=0)
    for n in range(4):
        builder.process(click(f"c{n}", T0 + n, "ghost", 0))
    for name in ("other-1", "other-2"):
        builder.process(click(f"c-{name}", T0, name, 0))
    assert builder.counts["orphan_overflow"] == 3  # two clicks past the first impression's two, one third impression
    drops = builder.process(clock(T0 + 500))
    assert sorted((drop.sample_id, drop.follow_ups) for drop in drops) == [("ghost", 2), ("other-1", 1)]


def test_a_group_whose_state_cannot_be_read_is_counted_and_forgotten() -> None:
    store: dict = {}
    builder = GroupBuilder(SETTINGS, store, partition=0)
    builder.process(impression("imp1", T0))
    builder.process(impression("imp2", T0))
    [key] = [key for key in store if key.endswith(":imp1")]
    store[key] = {**store[key], "impression": {"candidates": "not a list"}}
    outputs = builder.process(clock(T0 + 500))
    assert [output.sample_id for output in outputs] == ["imp2"]
    assert builder.counts["unreadable_group"] == 1 and key not in store


def test_late_impression_is_one_counted_drop_and_late_follow_up_is_counted() -> None:
    first, _ = run([impression("imp0", T0), clock(T0 + 300)])
    assert len(first) == 1
    outputs, builder = run([clock(T0 + 300), impression("old", T0), impression("old", T0), click("c", T0, "old", 0)])
    assert outputs == [
        GroupDrop(
            sample_id="old", user_id="u1", design_id="d1", reason="late_impression", impression_ts=T0,
            watermark=T0 + 300 - LATENESS,
        )
    ]  # fmt: skip
    assert builder.counts["duplicate_impression"] == 1 and builder.counts["late_follow_up"] == 1


def test_duplicates_change_nothing() -> None:
    imp, ordered = impression("imp1", T0), order("o1", T0 + 1, "imp1", 0)
    clean, _ = run([imp, ordered, clock(T0 + 500)])
    doubled, builder = run([imp, imp, ordered, ordered, clock(T0 + 500), imp])
    assert doubled == clean
    assert builder.counts["duplicate_impression"] == 2 and builder.counts["duplicate_follow_up"] == 1


def test_a_restarted_builder_resumes_open_groups_from_the_store() -> None:
    store: dict = {}
    outputs, _ = run([impression("imp1", T0), click("c1", T0 + 1, "imp1", 2)], store)
    assert outputs == []
    resumed = GroupBuilder(SETTINGS, store, partition=0)
    assert resumed.open_groups() == 1
    outputs = resumed.process(clock(T0 + 500))
    assert grades(outputs[0]) == [GRADE_NONE, GRADE_NONE, GRADE_CLICK]


def test_a_restarted_builder_judges_lateness_by_the_watermark_its_predecessor_reached() -> None:
    store: dict = {}
    _, first = run([clock(T0 + 300.0), clock(T0 + 300.5)], store)  # watermark moves by 0.5 s the second time
    restarted = GroupBuilder(SETTINGS, store, partition=0)
    assert restarted.watermark == first.watermark == T0 + 300.5 - LATENESS
    # Its window closed at T0 + 290.2, between the two watermarks: late for both builders, not only the first.
    outputs = restarted.process(impression("late", T0 + 190.2))
    assert [type(output) for output in outputs] == [GroupDrop]


def test_builders_of_two_partitions_share_a_store_without_sharing_a_key() -> None:
    store: dict = {}
    left, right = GroupBuilder(SETTINGS, store, partition=0), GroupBuilder(SETTINGS, store, partition=1)
    left.process(impression("a", T0))
    right.process(impression("b", T0))
    assert [output.sample_id for output in left.process(clock(T0 + 500))] == ["a"]
    assert right.open_groups() == 1


def test_settings_reject_a_zero_window() -> None:
    with pytest.raises(ConfigError, match="window_s must be positive"):
        GroupingSettings(window_s=0.0)


def test_stream_settings_carry_the_attribution_window_and_refuse_a_bad_one() -> None:
    settings = StreamSettings(group={"window_s": 20.0, "allowed_lateness_s": 5.0, "closed_retention_s": 600.0})
    assert settings.group == GroupingSettings(window_s=20.0, allowed_lateness_s=5.0, closed_retention_s=600.0)
    with pytest.raises(ConfigError, match=r"group\.window_s must be positive, got 0.0"):
        StreamSettings(group={"window_s": 0.0})


# ------------------------------------------------------------------------------------------ property-based


def random_log(rng: random.Random, impressions: int) -> list[AnyEvent]:
    """Impressions spread over event time, each with a few follow-ups inside (and some outside) its window."""
    log: list[AnyEvent] = []
    for index in range(impressions):
        imp_id = f"imp{index}"
        ts = T0 + index * 7.0
        log.append(impression(imp_id, ts, k=4))
        for step in range(rng.randint(0, 4)):
            at = ts + rng.uniform(0.0, WINDOW * 1.2)
            kind = rng.choice(["click", "order", "select"])
            event_id = f"{imp_id}-e{step}"
            if kind == "click":
                log.append(click(event_id, at, imp_id, rng.randrange(4)))
            elif kind == "select":
                log.append(select(event_id, at, imp_id, [rng.randrange(4)]))
            else:
                placed = order(event_id, at, imp_id, rng.randrange(4), quantity=rng.randint(1, 2))
                log.append(placed)
                if rng.random() < 0.5:
                    log.append(returned(f"{event_id}-r", at + rng.uniform(0.0, 30.0), placed, quantity=1))
    return sorted(log, key=lambda event: event.ts)


def shuffle_within_lateness(rng: random.Random, log: list[AnyEvent], duplicate_share: float) -> list[AnyEvent]:
    """Duplicate some events and reorder so that no event arrives after the watermark has passed it.

    Arrival order = sort by (event time + a jitter in [0, lateness)); an event then arrives when the largest
    event time seen is below its own time + lateness, so it is never behind the watermark.
    """
    copies = [event for event in log for _ in range(2 if rng.random() < duplicate_share else 1)]
    keyed = [(event.ts + rng.uniform(0.0, LATENESS * 0.999), index, event) for index, event in enumerate(copies)]
    return [event for _, _, event in sorted(keyed)]


def stream_outputs(events: list[AnyEvent]) -> dict[str, GroupOutput]:
    end = max(event.ts for event in events) + WINDOW + LATENESS + 1
    outputs, _ = run([*events, clock(end)])
    by_id = {output.sample_id: output for output in outputs}
    assert len(by_id) == len(outputs), "a sample was emitted twice"
    return by_id


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), impressions=st.integers(1, 25), duplicate_share=st.floats(0.0, 1.0))
def test_any_reorder_within_lateness_and_any_duplication_gives_the_batch_samples(
    seed: int, impressions: int, duplicate_share: float
) -> None:
    rng = random.Random(seed)
    log = random_log(rng, impressions)
    expected = batch_group_outputs(log, SETTINGS)
    assert stream_outputs(log) == expected
    assert stream_outputs(shuffle_within_lateness(rng, log, duplicate_share)) == expected
    assert len(expected) == impressions


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), split=st.floats(0.0, 1.0))
def test_restarting_anywhere_in_the_stream_gives_the_same_samples(seed: int, split: float) -> None:
    rng = random.Random(seed)
    log = random_log(rng, 15)
    arrivals = shuffle_within_lateness(rng, log, 0.3)
    cut = math.floor(split * len(arrivals))
    store: dict = {}
    before, _ = run(arrivals[:cut], store)
    after, _ = run(arrivals[cut:], store)
    end = GroupBuilder(SETTINGS, store, partition=0).process(clock(log[-1].ts + WINDOW + LATENESS + 1))
    assert {output.sample_id: output for output in before + after + end} == batch_group_outputs(log, SETTINGS)


def test_an_output_never_confirmed_is_sent_again_by_the_next_builder() -> None:
    store: dict = {}
    crashed = GroupBuilder(SETTINGS, store, partition=0)
    crashed.process(impression("imp1", T0))
    lost = crashed.process(clock(T0 + 500))  # closed, but the worker dies before delivery is confirmed
    assert [output.sample_id for output in lost] == ["imp1"]
    restarted = GroupBuilder(SETTINGS, store, partition=0)
    assert restarted.open_groups() == 0
    resent = restarted.process(clock(T0 + 501))
    assert resent == lost
    restarted.confirm(resent)
    assert GroupBuilder(SETTINGS, store, partition=0).process(clock(T0 + 502)) == []
