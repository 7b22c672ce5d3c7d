"""A merchant as a viewer through the events agent in process, with the worker's real stages (preferences, groups,
demand routing) over a Faust app that is never started: their selection of a group of their own design moves their
pushed preference and becomes their own group sample, graded by the selection, from which u is the merchant's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from perfusion.attributes import Attributes
from perfusion.contracts.records import (
    GRADE_CLICK,
    GRADE_NONE,
    Candidate,
    Click,
    DesignCreated,
    GroupSample,
    Impression,
    Select,
)
from perfusion.user_features import USER_VECTOR_SLICES, user_vector
from streams.agents.events import ReadMessage
from streams.dead_letters import MessagePosition
from streams.training_trigger import read_routed_sample
from tests.streams.test_error_policy import EVENTS_TOPIC, NOW, events_agent

RED = Attributes("dress", "red", "plain", "short-sleeve", "slim").descriptor()
NAVY = Attributes("dress", "navy", "striped", "long-sleeve", "loose").descriptor()


def shown(event_id: str, ts: float, user_id: str) -> Impression:
    return Impression(
        event_id=event_id, ts=ts, user_id=user_id, design_id="d1", prompt="a dress", model_version="v1",
        candidates=[
            Candidate(image_id=f"{event_id}-red", position=0, descriptor=RED),
            Candidate(image_id=f"{event_id}-navy", position=1, descriptor=NAVY),
        ],
    )  # fmt: skip


def test_a_merchants_selection_reaches_their_preference_and_their_own_graded_sample(tmp_path: Path) -> None:
    events = [
        DesignCreated(event_id="d1", ts=NOW, user_id="merchant-1", design_id="d1", prompt="a dress", order_threshold=3),
        shown("review", NOW + 1, "merchant-1"),
        shown("shop", NOW + 2, "shopper-1"),
        Select(
            event_id="s1", ts=NOW + 10, user_id="merchant-1", impression_id="review", design_id="d1",
            image_ids=["review-navy"],
        ),
        Click(
            event_id="c1", ts=NOW + 11, user_id="shopper-1", impression_id="shop", design_id="d1", image_id="shop-red"
        ),
        # Moves the partition's watermark past the window, so that both groups close.
        DesignCreated(
            event_id="d2", ts=NOW + 4000, user_id="merchant-1", design_id="d2", prompt="a coat", order_threshold=3
        ),
    ]  # fmt: skip
    agent, effects = events_agent(tmp_path)
    # One partition, as both viewers' keys would share one in a worker with a single partition.
    batch = [
        ReadMessage(event.to_bytes(), event.user_id.encode(), [], MessagePosition(EVENTS_TOPIC, 0, offset))
        for offset, event in enumerate(events)
    ]
    asyncio.run(agent.process(batch))

    latest = {row["user_id"]: row for row in effects.pushed}
    merchant = latest["merchant-1"]
    assert merchant["preference"] == pytest.approx(NAVY)
    assert (merchant["images_reviewed_total"], merchant["images_selected_total"]) == (2, 1)
    assert latest["shopper-1"]["preference"] == pytest.approx(RED)

    samples = {
        sample.sample_id: sample
        for sample in (GroupSample.model_validate_json(value or b"") for _, value in effects.on(
            "inproc.perfusion.group-samples"))
    }  # fmt: skip
    review = samples["review"]
    assert review.user_id == "merchant-1"
    assert [candidate.grade for candidate in review.candidates] == [GRADE_NONE, GRADE_CLICK]
    assert samples["shop"].user_id == "shopper-1"
    assert [candidate.grade for candidate in samples["shop"].candidates] == [GRADE_CLICK, GRADE_NONE]
    # Each sample also went to the training trigger, keyed by its model version, in the same acknowledged send.
    routed = effects.on("inproc.perfusion-worker-train-trigger-by-version")
    assert sorted(read_routed_sample(value or b"") for _, value in routed) == [("review", "v1"), ("shop", "v1")]
    assert {key for key, _ in routed} == {b"v1"}

    # The trainer's u for the merchant's sample: the merchant's pushed features and store profile.
    u = user_vector({**merchant, "store_region": 1}, as_of=review.impression_ts)
    assert list(u[USER_VECTOR_SLICES["present"]]) == [1.0, 0.0, 1.0]
    assert u[USER_VECTOR_SLICES["preference"]] == pytest.approx(NAVY)
