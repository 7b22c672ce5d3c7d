"""The merchant studio and the storefront in a real browser (Debian's Chromium, driven by selenium) against the real
loop: the Kafka broker, the stream worker and ``perfusion serve`` as subprocesses.

A merchant signs in with their key, creates a design, previews candidates and selects two; a shopper signs in to
the storefront, is served the design drawn for them, clicks a candidate and checks out until the design's threshold;
the merchant's design page, polling the service, shows "production triggered" once the worker's ProductionOrder has
come back through Kafka; and a second merchant's session neither lists nor opens the first one's design. The orders
are checked on the topic, each the shopper's, posted through the trusted order path. Screenshots of both pages go to
the folder ``PERFUSION_SCREENSHOTS_DIR`` names (``PERFUSION_SCREENSHOTS_DIR=docs/screenshots`` refreshes the
docs' ones), else to the test's temporary folder, so that a test run leaves the checkout as it was.

The browser is the ``browser`` fixture of conftest.py: when Chromium cannot be installed, the test fails, never
skips.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaConsumer

from harness.infra.process import free_port
from harness.loop import LoopPlace, process_environment
from harness.processes import ProcessSupervisor
from ops.demo.loop import LoopSettings
from perfusion.contracts.records import InvalidEvent, Order, parse_event
from perfusion.contracts.topics import TopicNames, ensure_topics
from service.auth import KeyStore

SCREENSHOTS_ENV = "PERFUSION_SCREENSHOTS_DIR"
PROMPT = "a red striped short-sleeve slim t-shirt"
THRESHOLD = 3
# The serving sampler's steps, so that the screenshots show what a shop would show; a worker whose groups and
# demand close within seconds (the demo's settings).
SETTINGS = LoopSettings(prompts=(PROMPT,), order_threshold=THRESHOLD, sampling_steps=10, partitions=1)
# With no traffic after the last order, the demand agent moves event time on after this many quiet seconds.
DEMAND_IDLE_AFTER_S = 3
STARTUP_TIMEOUT_S = 300.0
PAGE_TIMEOUT_S = 120.0
PRODUCTION_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class RunningLoop:
    base_url: str
    topics: TopicNames
    bootstrap: str
    keys: dict[str, str]  # principal -> key
    supervisor: ProcessSupervisor
    scratch: Path  # the test's own folder (screenshots, unless PERFUSION_SCREENSHOTS_DIR names another)


@pytest.fixture
def loop(kafka_bootstrap: str, tmp_path: Path) -> Iterator[RunningLoop]:
    """The worker and the service on fresh topics and state, with keys for two merchants and a shopper."""
    from perfusion.feature_store import apply_feature_repo

    run_dir = tmp_path / "run"
    topic_prefix = f"browser-{uuid.uuid4().hex[:8]}."
    topics = TopicNames.for_prefix(topic_prefix)
    keys_file = run_dir / "service" / "keys.json"
    place = LoopPlace(
        kafka_bootstrap,
        state_dir=run_dir,
        topic_prefix=topic_prefix,
        partitions=SETTINGS.partitions,
        extra_environment={"OMP_NUM_THREADS": "1", "PERFUSION_SERVE_AUTH__KEYS_FILE": str(keys_file)},
    )
    env = place.environment()
    store = KeyStore(keys_file)
    keys = {
        "merchant-a": store.create("merchant", "merchant-a").key,
        "merchant-b": store.create("merchant", "merchant-b").key,
        "shopper-1": store.create("shopper", "shopper-1").key,
    }
    with process_environment({key: env[key] for key in ("PERFUSION_STATE_DIR", "PERFUSION_FEAST_DIR", "FEAST_USAGE")}):
        apply_feature_repo()
    ensure_topics(kafka_bootstrap, topics, SETTINGS.partitions)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with ProcessSupervisor(run_dir / "logs", env) as supervisor:
        supervisor.start("worker", [*SETTINGS.worker_arguments(), f"--demand-idle-after-s={DEMAND_IDLE_AFTER_S}"])
        supervisor.start("service", SETTINGS.service_arguments(port))
        supervisor.wait_until(lambda: _answers(f"{base_url}/healthz"), STARTUP_TIMEOUT_S, "the service's /healthz")
        yield RunningLoop(base_url, topics, kafka_bootstrap, keys, supervisor, tmp_path / "screenshots")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class Page:
    """One browser window (its own sessionStorage, so its own signed-in key) on a page of the service."""

    def __init__(self, driver: Any, loop: RunningLoop, path: str, window: str | None = None) -> None:
        self.driver = driver
        self.loop = loop
        if window is None:
            driver.switch_to.new_window("window")
        else:
            driver.switch_to.window(window)
        self.handle = driver.current_window_handle
        driver.get(loop.base_url + path)

    def focus(self) -> Page:
        self.driver.switch_to.window(self.handle)
        return self

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        found = self.find_all(css)
        return str(found[0].text) if found else ""

    def wait(self, condition: Callable[[], Any], what: str, timeout_s: float = PAGE_TIMEOUT_S) -> Any:
        """``condition()``'s first truthy value; on timeout, fails with what the page's error box says."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            self.loop.supervisor.check_running()
            if time.monotonic() > deadline:
                shown = self.text("#error") or "(no error shown)"
                pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; the page says: {shown}")
            time.sleep(0.25)

    def sign_in(self, principal: str) -> None:
        self.find("#key").send_keys(self.loop.keys[principal])
        self.find("#sign-in-button").click()
        self.wait(lambda: principal in self.text("#who"), f"{principal} to be signed in")

    def images_loaded(self, css: str) -> list[Any]:
        images = self.find_all(css)
        loaded = self.driver.execute_script(
            "return arguments[0].every((image) => image.complete && image.naturalWidth > 0)", images
        )
        return images if images and loaded else []

    def screenshot(self, name: str) -> Path:
        folder = Path(os.environ[SCREENSHOTS_ENV]) if os.environ.get(SCREENSHOTS_ENV) else self.loop.scratch
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        assert self.driver.save_screenshot(str(path)), f"could not save {path}"
        return path


class Phases:
    """How long each part of the test took, printed at its end (``pytest -s`` shows them)."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.lines: list[str] = []

    def done(self, what: str) -> None:
        now = time.monotonic()
        self.lines.append(f"{now - self.last:6.1f} s  {what}")
        self.last = now

    def report(self) -> str:
        return "\n".join([*self.lines, f"{time.monotonic() - self.started:6.1f} s  in all"])


def orders_on_the_topic(loop: RunningLoop, design_id: str, expected: int, timeout_s: float = 30.0) -> list[Order]:
    """The Orders of ``design_id`` on the events topic, read from the start until ``expected`` are there."""
    consumer = KafkaConsumer(
        loop.topics.events, bootstrap_servers=loop.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    found: list[tuple[bytes, Order]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=500).values():
                for message in messages:
                    try:
                        event = parse_event(message.value, now=float("inf"))
                    except InvalidEvent:
                        continue
                    if isinstance(event, Order) and event.design_id == design_id:
                        found.append((message.key, event))
    finally:
        consumer.close()
    assert all(key == order.user_id.encode() for key, order in found), "orders are keyed by their shopper"
    return [order for _, order in found]


@pytest.mark.timeout(900)
def test_a_design_sells_from_the_storefront_until_production_in_the_studio(loop: RunningLoop, browser: Any) -> None:
    from selenium.webdriver.support.ui import Select

    phases = Phases()
    # The merchant creates a design, previews four candidates and selects two.
    studio = Page(browser, loop, "/studio", window=browser.current_window_handle)
    studio.sign_in("merchant-a")
    studio.wait(lambda: studio.find("#no-designs").is_displayed(), "an empty list of designs")
    studio.find("#prompt").send_keys(PROMPT)
    threshold = studio.find("#threshold")
    threshold.clear()
    threshold.send_keys(str(THRESHOLD))
    studio.find("#create").click()
    design_id = studio.wait(lambda: studio.text("#design-id"), "the new design's page")
    assert studio.text("#design-prompt") == PROMPT
    assert PROMPT in studio.text("#designs")
    assert "collecting orders: 3 more" in studio.text("#production-status")
    Select(studio.find("#k")).select_by_visible_text("4")
    studio.find("#preview").click()
    candidates = studio.wait(lambda: studio.images_loaded("#candidates .candidate img"), "four candidate images")
    assert len(candidates) == 4
    for box in studio.find_all("#candidates input[type=checkbox]")[:2]:
        box.click()
    studio.find("#select").click()
    selected = studio.wait(lambda: "Selected 2 candidates" in studio.text("#select-result"), "the selection")
    assert selected and len(studio.find_all("#candidates .candidate.selected")) == 2
    phases.done("studio: sign in, create, preview 4 candidates, select 2")

    # The shopper is served the design drawn for them, clicks a candidate and buys until the threshold.
    shop = Page(browser, loop, "/shop")
    shop.sign_in("shopper-1")
    card = f'.design-card[data-design-id="{design_id}"]'
    shop.wait(lambda: shop.images_loaded(f"{card} .candidate img"), "the design drawn for the shopper")
    assert PROMPT in shop.text(card)
    phases.done("storefront: sign in, the design drawn for the shopper")
    for bought in range(1, THRESHOLD + 1):
        candidate = shop.find_all(f"{card} .candidate")[bought % 4]
        candidate.click()
        chosen = f'{card} .candidate.chosen[data-image-id="{candidate.get_attribute("data-image-id")}"]'
        buy = shop.find(f"{card} .buy")
        shop.wait(lambda c=chosen, b=buy: shop.find_all(c) and b.is_enabled(), "the click to be accepted")
        buy.click()
        shop.wait(lambda n=bought: len(shop.find_all("#orders li")) == n, f"order {bought} to be placed")
        assert "Ordered 1 unit (order " in shop.text(f"{card} .order-result")
    assert shop.text("#error") == ""
    shop.screenshot("storefront.png")
    phases.done(f"storefront: {THRESHOLD} clicks and checkouts")

    # The studio's design page follows the orders and the worker's production order, without a reload.
    studio.focus()
    studio.wait(
        lambda: studio.text("#production-status").startswith("production triggered"),
        "the studio to show production triggered",
        PRODUCTION_TIMEOUT_S,
    )
    assert studio.text("#net-orders") == str(THRESHOLD) and studio.text("#threshold-value") == str(THRESHOLD)
    studio.screenshot("studio.png")
    phases.done("studio: production triggered")

    orders = orders_on_the_topic(loop, design_id, THRESHOLD)
    assert len(orders) == THRESHOLD and {order.user_id for order in orders} == {"shopper-1"}
    assert sum(order.quantity for order in orders) == THRESHOLD
    phases.done("the orders read back from Kafka")

    # A second merchant's session neither lists the design nor opens it.
    other = Page(browser, loop, "/studio")
    other.sign_in("merchant-b")
    other.wait(lambda: other.find("#no-designs").is_displayed(), "merchant-b's empty list of designs")
    assert design_id not in other.driver.page_source and PROMPT not in other.text("#designs")
    other.driver.get(f"{loop.base_url}/studio#design={design_id}")
    detail = other.wait(lambda: other.text("#design-missing-detail"), "the refusal of another merchant's design")
    assert "belongs to another merchant" in detail and not other.find("#design-view").is_displayed()
    assert PROMPT not in other.text("main")
    phases.done("a second merchant: neither listed nor opened")
    print(phases.report())
