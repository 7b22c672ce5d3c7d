"""The events agent's tail in process: a batch's Feast push (and the preference changelog behind it) may run on while
the next batch is folded, never out of order, and the batch is finished only once its tail is done."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from streams.agents.events import ReadMessage
from streams.agents.preferences import PreferenceStage
from streams.dead_letters import MessagePosition
from tests.streams.test_error_policy import EVENTS_TOPIC, events_agent, good_events

PREFERENCE_CHANGELOG = "inproc.perfusion-worker-preference-users-changelog"


def test_a_batch_tail_runs_on_while_the_next_batch_is_folded_and_pushes_stay_in_order(tmp_path: Path) -> None:
    events = good_events(seed=5, count=40)
    batches = [events[:20], events[20:]]
    agent, effects = events_agent(tmp_path)
    stage = next(stage for name, stage in agent._stages if name == "preferences")
    assert isinstance(stage, PreferenceStage)
    releases: list[asyncio.Event] = []
    pushes: list[list[dict[str, Any]]] = []

    async def held_push(rows: list[dict[str, Any]]) -> None:  # Feast, answering when the test says so
        released = asyncio.Event()
        releases.append(released)
        await released.wait()
        pushes.append(rows)

    stage._push_features = held_push

    def messages(batch: list[Any], first_offset: int) -> list[ReadMessage]:
        return [
            ReadMessage(event.to_bytes(), event.user_id.encode(), [], MessagePosition(EVENTS_TOPIC, 0, offset))
            for offset, event in enumerate(batch, start=first_offset)
        ]

    async def scenario() -> None:
        first_tail = await agent.begin(messages(batches[0], 0))
        assert first_tail is not None
        await asyncio.sleep(0.01)
        assert len(releases) == 1 and not first_tail.done()  # the push is in hand, not answered
        assert not effects.on(PREFERENCE_CHANGELOG)  # the states' changelog waits for Feast
        second_tail = await agent.begin(messages(batches[1], 20))  # folded while the first push is held
        assert second_tail is not None
        await asyncio.sleep(0.01)
        assert len(releases) == 1  # the second push waits for the first
        releases[0].set()
        await first_tail
        logged_after_first = len(effects.on(PREFERENCE_CHANGELOG))
        assert logged_after_first > 0
        await asyncio.sleep(0.01)
        assert len(releases) == 2 and not second_tail.done()
        releases[1].set()
        await second_tail
        assert len(effects.on(PREFERENCE_CHANGELOG)) > logged_after_first

    asyncio.run(scenario())
    assert len(pushes) == 2
    # Each push holds the rows of its own batch: the users it touched, as of that batch.
    first_users = {event.user_id for event in batches[0]}
    assert {row["user_id"] for row in pushes[0]} <= first_users
    assert {row["user_id"] for row in pushes[1]} <= {event.user_id for event in batches[1]}
    assert agent.counts["folded"] == 40


def test_process_returns_only_once_the_tail_is_done(tmp_path: Path) -> None:
    agent, effects = events_agent(tmp_path)
    events = good_events(seed=6, count=10)
    batch = [
        ReadMessage(event.to_bytes(), event.user_id.encode(), [], MessagePosition(EVENTS_TOPIC, 0, offset))
        for offset, event in enumerate(events)
    ]
    asyncio.run(agent.process(batch))
    assert effects.pushed and effects.on(PREFERENCE_CHANGELOG)
