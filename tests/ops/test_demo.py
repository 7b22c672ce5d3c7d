"""The demo's parts that need no broker: shopper decisions, events, round bookkeeping and text, the process
supervisor, and that the command lines the demo builds are ones the real CLI accepts."""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from harness.loop import CLI_MODULE, process_environment
from harness.processes import ProcessExited, ProcessSupervisor
from ops.cli import build_parser
from ops.demo.client import histogram_mean
from ops.demo.loop import (
    LoopOutcome,
    LoopSettings,
    RoundReport,
    format_round,
    format_summary,
    goals_met,
)
from ops.demo.observer import LoopObserver, ObservedLoop
from ops.demo.shoppers import (
    ShopperAction,
    ShopperBehaviour,
    action_events,
    choose_actions,
    merchant_choice,
)
from perfusion.contracts.records import (
    Click,
    GradedCandidate,
    GroupSample,
    ModelUpdated,
    Order,
    ProductionOrder,
    Return,
    parse_event,
)
from perfusion.contracts.topics import TopicNames
from perfusion.errors import ConfigError
from service.schemas import DesignStatusResponse

IMAGES = ["img-0", "img-1", "img-2", "img-3"]


def test_loved_images_are_clicked_and_ordered_more_than_disliked_ones():
    behaviour = ShopperBehaviour()
    rng = random.Random(0)
    counts: Counter[tuple[str, str]] = Counter()
    for _ in range(400):
        for action in choose_actions([2.0, -2.0, 2.0, -2.0], IMAGES, behaviour, rng):
            counts[(action.kind, action.image_id)] += 1
    assert counts[("click", "img-2")] > 3 * counts[("click", "img-3")]
    assert counts[("order", "img-0")] > 3 * counts[("order", "img-1")]
    # Position bias: the same utility is clicked more often at the top.
    assert counts[("click", "img-0")] > counts[("click", "img-2")]


def test_actions_follow_click_order_return_and_are_seeded():
    behaviour = ShopperBehaviour(return_rate=0.5)
    first = choose_actions([0.5, 0.0, -0.5, 1.0], IMAGES, behaviour, random.Random(7))
    assert first == choose_actions([0.5, 0.0, -0.5, 1.0], IMAGES, behaviour, random.Random(7))
    for index, action in enumerate(first):
        if action.kind == "order":
            assert first[index - 1] == ShopperAction("click", action.image_id, action.utility)
        if action.kind == "return":
            assert first[index - 1].kind == "order" and first[index - 1].image_id == action.image_id


def test_choose_actions_needs_one_utility_per_image():
    with pytest.raises(ConfigError, match="3 utilities for 4 images"):
        choose_actions([0.0, 0.0, 0.0], IMAGES, ShopperBehaviour(), random.Random(0))


def test_behaviour_rejects_rates_outside_zero_one():
    with pytest.raises(ConfigError, match="click_rate"):
        ShopperBehaviour(click_rate=1.0)
    with pytest.raises(ConfigError, match=r"sharpness must be at least 0\.0, got -1\.0"):
        ShopperBehaviour(sharpness=-1.0)


def test_merchant_selects_what_the_panel_likes_on_average():
    utilities = np.array([[0.0, 1.0, 0.2, 0.0], [0.0, -0.4, 0.5, 0.0]])
    assert merchant_choice(utilities, IMAGES) == "img-2"
    with pytest.raises(ConfigError, match="panel_utilities"):
        merchant_choice(np.zeros((2, 3)), IMAGES)


def test_action_events_are_valid_records_and_a_return_names_its_order():
    actions = [
        ShopperAction("click", "img-1", 0.3),
        ShopperAction("order", "img-1", 0.3),
        ShopperAction("return", "img-1", 0.3),
    ]
    events = action_events(actions, "shopper-1", "imp-1", "design-1", now=1_750_000_000.0)
    assert [type(event) for event in events] == [Click, Order, Return]
    order, returned = events[1], events[2]
    assert isinstance(order, Order) and isinstance(returned, Return)
    assert returned.order_id == order.event_id and returned.quantity == order.quantity
    assert all(parse_event(event.to_bytes(), now=1_750_000_000.0) == event for event in events)
    assert [event.ts for event in events] == sorted(event.ts for event in events)
    with pytest.raises(ConfigError, match="must follow its order"):
        action_events([ShopperAction("return", "img-1", 0.0)], "shopper-1", "imp-1", "design-1")


def design(triggered: bool, net_orders: int) -> DesignStatusResponse:
    return DesignStatusResponse(
        design_id="design-a",
        merchant_id="merchant-0",
        prompt="a red dress",
        order_threshold=3,
        net_orders=net_orders,
        production_triggered=triggered,
        production_ts=1.0 if triggered else None,
        demand_source="topics",
    )


def report(number: int, version: str, published: list[str], triggered: bool) -> RoundReport:
    return RoundReport(
        number=number,
        groups_served=8,
        personalization=Counter({"cold_start": 6, "base": 2}),
        versions_served=Counter({version: 8}),
        events_sent=Counter({"click": 5, "order": 2, "select": 2}),
        viewer_utilities=[0.1, -0.1, 0.4],
        service_version=version,
        group_samples=4 * number,
        train_requests=number - 1,
        published_versions=published,
        designs=[design(triggered, 3 if triggered else 1)],
        feature_table="user  features",
    )


def test_round_text_announces_news_once():
    first = report(1, "base", [], triggered=False)
    second = report(2, "v0001", ["v0001"], triggered=True)
    third = report(3, "v0001", ["v0001"], triggered=True)
    first_text = format_round(first, None)
    assert "round 1" in first_text and "groups served 8 (base 2, cold_start 6)" in first_text
    assert "***" not in first_text and "collecting orders" in first_text
    second_text = format_round(second, first)
    assert "*** trainer published v0001" in second_text
    assert "*** the service now serves v0001" in second_text
    assert "*** ProductionOrder for design-a: 3 net orders reached the threshold 3" in second_text
    assert "user  features" in second_text
    assert "***" not in format_round(third, second)


def test_goals_need_a_new_version_served_and_a_production_order():
    assert not goals_met(report(1, "base", [], triggered=True), "base")
    assert not goals_met(report(2, "v0001", ["v0001"], triggered=False), "base")
    assert goals_met(report(2, "v0001", ["v0001"], triggered=True), "base")


def test_summary_counts_the_whole_run(tmp_path: Path):
    observed = ObservedLoop(
        group_samples=9,
        samples_with_positives=5,
        model_updates=[ModelUpdated(version="v0001", path="/m/v0001", ts=1.0)],
        production_orders=[ProductionOrder(design_id="design-a", net_orders=3, threshold=3, ts=1.0)],
    )
    outcome = LoopOutcome(
        rounds=[report(1, "base", [], False), report(2, "v0001", ["v0001"], True)],
        initial_version="base",
        final_version="v0001",
        observed=observed,
        state_dir=tmp_path,
        elapsed_s=12.0,
    )
    text = format_summary(outcome)
    assert "rounds played       2" in text and "groups served       16" in text
    assert "click 10, order 4, select 4" in text
    assert "9 (5 with a positive)" in text and "versions published  v0001" in text
    assert "base at the start, v0001 at the end" in text and "design-a (1 order)" in text
    assert outcome.designs_in_production == ["design-a"] and outcome.failed_requests == []


def test_observer_folds_records_of_each_topic():
    names = TopicNames.for_prefix("t.")
    observer = LoopObserver("127.0.0.1:1", names)
    sample = GroupSample(
        sample_id="imp-1",
        user_id="shopper-1",
        design_id="design-a",
        prompt="a red dress",
        model_version="base",
        impression_ts=1.0,
        candidates=[
            GradedCandidate(image_id="a", position=0, descriptor=[0.0] * 26, grade=2),
            GradedCandidate(image_id="b", position=1, descriptor=[0.0] * 26, grade=0),
        ],
    )
    observer.apply(names.group_samples, sample.to_bytes())
    observer.apply(names.production_orders, ProductionOrder(design_id="d", net_orders=3, threshold=3, ts=1).to_bytes())
    snapshot = observer.snapshot()
    assert snapshot.group_samples == 1 and snapshot.samples_with_positives == 1
    assert list(snapshot.production_orders_by_design()) == ["d"]


def test_loop_settings_validate_and_build_command_lines_the_cli_accepts():
    with pytest.raises(ConfigError, match="rounds must be between 1 and max_rounds"):
        LoopSettings(rounds=5, max_rounds=3)
    with pytest.raises(ConfigError, match="k must be between 2 and 16"):
        LoopSettings(k=1)
    with pytest.raises(ConfigError, match="prompts must name at least one design"):
        LoopSettings(prompts=())
    with pytest.raises(ConfigError, match=r"window_s must be positive, got 0\.0"):
        LoopSettings(window_s=0.0)
    with pytest.raises(ConfigError, match=r"lateness_s must be at least 0, got -1\.0"):
        LoopSettings(lateness_s=-1.0)
    with pytest.raises(ConfigError, match="partitions must be at least 1, got 0"):
        LoopSettings(partitions=0)
    with pytest.raises(ConfigError, match=r"behaviour\.return_rate must be in"):
        LoopSettings(behaviour={"return_rate": 1.0})
    settings = LoopSettings()
    parser = build_parser()
    for arguments in (settings.worker_arguments(), settings.trainer_arguments(), settings.service_arguments(8123)):
        assert arguments[:2] == ["-m", CLI_MODULE]
        parsed = parser.parse_args(arguments[2:])
        assert callable(parsed.handler)
    worker = parser.parse_args(settings.worker_arguments()[2:])
    assert float(worker.group_window_s) == settings.window_s
    assert int(worker.train_samples_per_request) == settings.samples_per_request


def test_environment_is_restored(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PERFUSION_DEMO_TEST_SET", "before")
    monkeypatch.delenv("PERFUSION_DEMO_TEST_UNSET", raising=False)
    with process_environment({"PERFUSION_DEMO_TEST_SET": "during", "PERFUSION_DEMO_TEST_UNSET": "during"}):
        import os

        assert os.environ["PERFUSION_DEMO_TEST_SET"] == "during"
    assert os.environ["PERFUSION_DEMO_TEST_SET"] == "before"
    assert "PERFUSION_DEMO_TEST_UNSET" not in os.environ


def test_supervisor_reports_an_exited_process_and_stops_the_rest(tmp_path: Path):
    import os

    with ProcessSupervisor(tmp_path / "logs", dict(os.environ), stop_grace_s=10.0) as supervisor:
        sleeper = supervisor.start("sleeper", ["-c", "import time; time.sleep(60)"])
        supervisor.start("crasher", ["-c", "import sys; print('broken on purpose'); sys.exit(3)"])
        with pytest.raises(ProcessExited, match=r"crasher .* exited with 3(.|\n)*broken on purpose"):
            supervisor.wait_until(lambda: False, timeout_s=30.0, what="nothing", interval_s=0.05)
        assert sleeper.process.poll() is None
    assert sleeper.process.poll() is not None
    assert (tmp_path / "logs" / "crasher.log").read_text().strip() == "broken on purpose"
    assert sys.executable  # the supervisor runs this interpreter


def test_histogram_mean_reads_prometheus_text():
    text = "\n".join(
        [
            "# HELP perfusion_feast_read_seconds x",
            "perfusion_feast_read_seconds_count 4.0",
            "perfusion_feast_read_seconds_sum 0.02",
            'perfusion_generation_seconds_sum{personalization="base"} 3.0',
            'perfusion_generation_seconds_count{personalization="base"} 2.0',
            'perfusion_generation_seconds_sum{personalization="personalized"} 5.0',
            'perfusion_generation_seconds_count{personalization="personalized"} 2.0',
        ]
    )
    assert histogram_mean(text, "perfusion_feast_read_seconds") == (pytest.approx(0.005), 4)
    assert histogram_mean(text, "perfusion_generation_seconds") == (pytest.approx(2.0), 4)
    assert np.isnan(histogram_mean(text, "perfusion_missing_seconds")[0])


def test_the_demo_shoppers_rates_at_utility_zero_are_the_marketplaces() -> None:
    from simulator.marketplace import Marketplace

    market = Marketplace(
        None, ShopperBehaviour(click_rate=0.7, order_rate=0.6, return_rate=0.3).marketplace_behaviour()
    )
    zero = np.zeros(2)
    assert market.click_probabilities(zero) == pytest.approx([0.7, 0.7 / np.sqrt(2.0)])
    assert market.order_probabilities(zero) == pytest.approx([0.6, 0.6])
    assert market.return_probabilities(zero) == pytest.approx([0.3, 0.3])
