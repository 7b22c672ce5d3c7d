"""The demand agent and the training trigger's counting agent in process (faust's ``test_context()``), with the app's
real tables and topics and every send answered as the broker would (the events agent and its stages have theirs in
test_preferences_agent.py and test_error_policy.py).

- The training trigger's counter makes one TrainRequest per N samples of a version (as the group builder's stage
  routes them), counts a repeated sample once, dead-letters a record it cannot read, and logs its table to the
  changelog.
- The demand agent applies routed orders once its sources' progress has passed them by the lateness, fires a design
  once (a repeated order counted once), and dead-letters a progress marker it cannot read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, NoReturn

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import DeadLetter, GradedCandidate, GroupSample, TrainRequest
from streams.settings import StreamSettings
from streams.training_trigger import TrainingTriggerSettings, routed_sample

SAMPLES_PER_REQUEST = 3


class Sent(list[tuple[bytes | None, bytes | None, int | None]]):
    """What one topic was asked to send; each send is acknowledged at once."""

    async def send(
        self, key: bytes | None = None, value: bytes | None = None, partition: int | None = None, **_: Any
    ) -> asyncio.Future[None]:
        self.append((key, value, partition))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def crash(task: str, exc: BaseException) -> NoReturn:
    raise AssertionError(f"{task} crashed: {exc!r}")


def sample(sample_id: str, model_version: str) -> GroupSample:
    return GroupSample(
        sample_id=sample_id,
        user_id="u",
        design_id="d",
        prompt="a red t-shirt",
        model_version=model_version,
        impression_ts=1_700_000_000.0,
        candidates=[
            GradedCandidate(image_id=f"{sample_id}-{k}", position=k, descriptor=[0.0] * DESCRIPTOR_DIM, grade=k)
            for k in range(2)
        ],
    )


def test_the_counter_in_process_makes_one_request_per_n_samples_and_dead_letters_what_it_cannot_read(
    tmp_path: Path,
) -> None:
    from streams.app import create_app

    settings = StreamSettings(
        bootstrap_servers="localhost:9",
        topic_prefix="inproc-train.",
        data_dir=tmp_path,
        partitions=1,
        train=TrainingTriggerSettings(samples_per_request=SAMPLES_PER_REQUEST, max_wait_s=3600.0),
    )
    stream_app = create_app(
        settings, agent_modules=("streams.agents.training",), event_stage_modules=(), on_crash=crash
    )
    app = stream_app.app
    app_agents = {agent.name.rsplit(".", 1)[-1]: agent for agent in app.agents.values()}
    assert set(app_agents) == {"train-trigger"}  # nothing reads perfusion.group-samples back
    requests, changelog, dead_letters = Sent(), Sent(), Sent()
    stream_app.topics.dead_letters.send = dead_letters.send  # type: ignore[method-assign]
    stream_app.topics.train_requests.send = requests.send  # type: ignore[method-assign]
    table = app.tables["train-trigger"]
    table.changelog_topic.send = changelog.send  # type: ignore[method-assign]
    samples = [sample(f"s{n}", "v1") for n in range(7)] + [sample("s0", "v1")]  # s0 again: counted once
    routed = [(b"v1", routed_sample(group_sample)) for group_sample in samples]  # what the group stage sends

    async def drive() -> None:
        counter = app_agents["train-trigger"]
        async with counter.test_context() as context:
            for key, value in [*routed, (b"v1", b'{"kind": "not a routed sample"}')]:
                await context.put(value, key=key, partition=0)
            await asyncio.sleep(0.3)

    asyncio.run(drive())

    letters = [DeadLetter.model_validate_json(value or b"") for _, value, _ in dead_letters]
    assert len(letters) == 1 and "the training trigger" in letters[0].reason
    made = [TrainRequest.model_validate_json(value or b"") for _, value, _ in requests]
    # 7 distinct samples (s0 twice): two requests of 3, one sample still pending.
    assert [(r.request_id, r.reason, r.new_samples) for r in made] == [
        ("v1-000001", "count", 3),
        ("v1-000002", "count", 3),
    ]
    assert changelog, "the counter's state was not logged to its changelog"
    assert all(json.loads(value) is not None for _, value, _ in changelog if value is not None)


def test_the_demand_agent_in_process_fires_once_on_its_sources_progress_and_dead_letters_a_bad_marker(
    tmp_path: Path,
) -> None:
    from perfusion.contracts.records import DesignCreated, Order, ProductionOrder
    from streams.agents.demand import PROGRESS_KEY, progress_marker
    from streams.app import create_app
    from streams.demand import DemandSettings

    t0 = 1_700_000_000.0
    settings = StreamSettings(
        bootstrap_servers="localhost:9",
        topic_prefix="inproc-demand.",
        data_dir=tmp_path,
        partitions=1,
        demand=DemandSettings(allowed_lateness_s=10.0),
    )
    stream_app = create_app(settings, agent_modules=("streams.agents.demand",), event_stage_modules=(), on_crash=crash)
    app = stream_app.app
    orders_sent, changelog, dead_letters = Sent(), Sent(), Sent()
    stream_app.topics.production_orders.send = orders_sent.send  # type: ignore[method-assign]
    stream_app.topics.dead_letters.send = dead_letters.send  # type: ignore[method-assign]
    app.tables["demand"].changelog_topic.send = changelog.send  # type: ignore[method-assign]

    design = DesignCreated(event_id="create", ts=t0, user_id="m", design_id="d1", prompt="a shirt", order_threshold=2)

    def order(event_id: str, user_id: str, ts: float) -> Order:
        return Order(event_id=event_id, ts=ts, user_id=user_id, impression_id="i", design_id="d1", image_id="x",
                     quantity=1)  # fmt: skip

    routed = [design, order("o1", "a", t0 + 1), order("o1", "a", t0 + 1), order("o2", "b", t0 + 2)]

    async def drive() -> None:
        async with app.agents[next(name for name in app.agents if name.endswith("demand"))].test_context() as context:
            for event in routed:
                await context.put(event.to_bytes(), key=b"d1", partition=0)
            await context.put(b"not a marker", key=PROGRESS_KEY, partition=0)
            await context.put(progress_marker(0, t0 + 5), key=PROGRESS_KEY, partition=0)  # within the lateness
            await context.put(progress_marker(0, t0 + 100), key=PROGRESS_KEY, partition=0)
            await context.put(progress_marker(0, t0 + 200), key=PROGRESS_KEY, partition=0)
            await asyncio.sleep(0.3)

    asyncio.run(drive())
    fired = [ProductionOrder.model_validate_json(value or b"") for _, value, _ in orders_sent]
    assert [(order.design_id, order.net_orders, order.threshold) for order in fired] == [("d1", 2, 2)]  # o1 once
    letters = [DeadLetter.model_validate_json(value or b"") for _, value, _ in dead_letters]
    assert len(letters) == 1 and "the demand counter" in letters[0].reason
    assert changelog, "the counter's state was not logged to its changelog"
