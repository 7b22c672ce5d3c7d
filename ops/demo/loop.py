"""The whole loop on this machine: worker, trainer and service as subprocesses, merchants and shoppers driving the
service's HTTP API round by round, and what each round changed.

:func:`run_loop` is what ``perfusion demo`` and the loop's integration test run. It takes the broker's address and a
fresh state folder, applies the Feast repo there, pushes the shoppers' and the merchants' profiles, creates an API
key for every merchant, shopper, the order system and an operator (:mod:`ops.demo.principals`), starts the three
processes under a :class:`~harness.processes.ProcessSupervisor` (stopped on return, on errors and on Ctrl-C), and
then plays rounds: each merchant looks at a group of its design and selects a candidate; each shopper asks for a
group of K candidates, judges the images it was served with its hidden taste and clicks, and the order system
reports the shopper's orders and returns. Every request carries its principal's key, as any client's does.
After each round it reads what the loop produced: user features from Feast, group samples, training requests and
published versions from Kafka, the version the service reports, and each design's demand. It plays at least
``rounds`` rounds and goes on (up to ``max_rounds``) until a new version is served and a design went to production.

The shoppers' tastes come in through :class:`ShopperPanel`; this package never imports the simulator (the CLI and
the tests hand a :class:`simulator.ground_truth.PixelPreferencePanel` in).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator, model_validator

from harness.loop import cli_arguments
from ops.demo.shoppers import (
    ShopperBehaviour,
    action_events,
    choose_actions,
    merchant_choice,
    select_event,
)
from perfusion.errors import ConfigError
from perfusion.settings import Settings

if TYPE_CHECKING:
    from ops.demo.client import ServiceClient
    from ops.demo.observer import ObservedLoop
    from ops.demo.principals import DemoClients
    from service.schemas import DesignStatusResponse

Emit = Callable[[str], None]


def print_flushed(line: str) -> None:
    print(line, flush=True)


DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red striped short-sleeve slim t-shirt",
    "a navy plain long-sleeve loose dress",
)


class ShopperPanel(Protocol):
    """Shoppers with hidden tastes over pixels (``simulator.ground_truth.PreferencePanel``)."""

    def user_ids(self) -> list[str]: ...

    def profile(self, user_id: str) -> dict[str, int]: ...

    def utilities(self, user_id: str, images: np.ndarray) -> np.ndarray: ...


class LoopSettings(Settings):
    """One run of the loop: how many rounds and people, and settings that make the processes quick on a CPU."""

    rounds: int = Field(default=3, ge=1, description="rounds always played (at most max_rounds)")
    max_rounds: int = Field(default=12, description="most rounds played while waiting for a version and an order")
    prompts: tuple[str, ...] = Field(default=DEFAULT_PROMPTS, description="one design per prompt")
    order_threshold: int = Field(default=3, ge=1, description="net orders at which a design goes to production")
    k: int = Field(default=4, ge=2, le=16, description="candidates per group (a group needs a winner and a loser)")
    sampling_steps: int = Field(default=8, ge=1, description="denoising steps of the service per group")
    reward_steps: int = Field(default=10, description="trainer: reward-model steps per update")
    diffusion_steps: int = Field(default=2, description="trainer: adaptive-network steps per update")
    groups_per_batch: int = Field(default=4, description="trainer: groups per step")
    window_s: float = Field(default=4.0, gt=0, description="worker: follow-ups this long after an impression count")
    lateness_s: float = Field(default=1.0, ge=0, description="worker: watermarks trail the latest event by this")
    samples_per_request: int = Field(default=6, ge=1, description="worker: group samples that ask for an update")
    max_wait_s: float = Field(default=15.0, gt=0, description="worker: most wall-clock seconds a sample waits")
    behaviour: ShopperBehaviour = Field(
        default_factory=ShopperBehaviour, description="how the shoppers turn utilities into actions"
    )
    seed: int = Field(default=0, description="seed of the shoppers' choices and the noise of each group")
    partitions: int = Field(default=1, ge=1, description="partitions of the run's topics (1: one watermark)")
    startup_timeout_s: float = Field(default=300.0, description="how long the service may take to answer")
    shown_users: int = Field(default=3, description="users whose Feast features are printed each round")

    @field_validator("prompts")
    @classmethod
    def _a_design_at_least(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        if not prompts:
            raise ValueError("prompts must name at least one design, e.g. ('a red dress',)")
        return prompts

    @model_validator(mode="after")
    def _rounds_within_max_rounds(self) -> LoopSettings:
        if self.rounds > self.max_rounds:
            raise ValueError(f"rounds must be between 1 and max_rounds={self.max_rounds}, got {self.rounds}")
        return self

    def worker_arguments(self) -> list[str]:
        """``perfusion worker`` with windows short enough that a group closes seconds after its impression."""
        return cli_arguments(
            "worker",
            f"--group-window-s={self.window_s}",
            f"--group-allowed-lateness-s={self.lateness_s}",
            f"--demand-allowed-lateness-s={self.lateness_s}",
            f"--train-samples-per-request={self.samples_per_request}",
            f"--train-max-wait-s={self.max_wait_s}",
            "--train-tick-s=1",
        )

    def trainer_arguments(self) -> list[str]:
        return cli_arguments(
            "train",
            f"--reward-steps={self.reward_steps}",
            f"--diffusion-steps={self.diffusion_steps}",
            f"--groups-per-batch={self.groups_per_batch}",
            f"--seed={self.seed}",
        )

    def service_arguments(self, port: int) -> list[str]:
        return cli_arguments("serve", f"--port={port}", f"--steps={self.sampling_steps}", "--poll=0.25")


@dataclass
class RoundReport:
    """What one round did and what the loop showed after it."""

    number: int
    groups_served: int = 0
    personalization: Counter[str] = field(default_factory=Counter)
    versions_served: Counter[str] = field(default_factory=Counter)
    events_sent: Counter[str] = field(default_factory=Counter)
    failed_requests: list[str] = field(default_factory=list)
    viewer_utilities: list[float] = field(default_factory=list)  # each served image's utility to its viewer
    service_version: str = ""
    group_samples: int = 0  # cumulative, as read from Kafka
    train_requests: int = 0  # cumulative
    published_versions: list[str] = field(default_factory=list)  # cumulative
    designs: list[DesignStatusResponse] = field(default_factory=list)
    feature_table: str = ""
    restarts: list[str] = field(default_factory=list)

    @property
    def mean_viewer_utility(self) -> float:
        return float(np.mean(self.viewer_utilities)) if self.viewer_utilities else float("nan")


@dataclass
class LoopOutcome:
    """The run as a whole."""

    rounds: list[RoundReport]
    initial_version: str
    final_version: str
    observed: ObservedLoop
    state_dir: Path
    elapsed_s: float

    @property
    def failed_requests(self) -> list[str]:
        return [failure for report in self.rounds for failure in report.failed_requests]

    @property
    def designs_in_production(self) -> list[str]:
        return sorted(self.observed.production_orders_by_design())


def format_counter(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items())) or "none"


def format_design(design: DesignStatusResponse) -> str:
    state = "PRODUCTION TRIGGERED" if design.production_triggered else "collecting orders"
    return f"{design.design_id} {design.prompt!r:<44} net orders {design.net_orders}/{design.order_threshold}  {state}"


def format_round(report: RoundReport, previous: RoundReport | None) -> str:
    """The lines printed after a round; news (a version, a production order) is said once, when it appears."""
    lines = [
        f"--- round {report.number} " + "-" * 60,
        f"groups served {report.groups_served} ({format_counter(report.personalization)}); "
        f"versions in responses: {format_counter(report.versions_served)}",
        f"events sent through POST /events: {format_counter(report.events_sent)}; "
        f"mean utility of the served images to their viewers {report.mean_viewer_utility:+.3f}",
        f"Kafka: {report.group_samples} group samples, {report.train_requests} training requests, "
        f"published versions: {', '.join(report.published_versions) or 'none yet'}",
        f"service reports model version {report.service_version}",
    ]
    lines += [f"!!! {restart}" for restart in report.restarts]
    if report.failed_requests:
        lines.append(f"FAILED requests this round: {len(report.failed_requests)}: {report.failed_requests[0]}")
    before = set(previous.published_versions) if previous else set()
    for version in report.published_versions:
        if version not in before:
            lines.append(f"*** trainer published {version} (ModelUpdated on Kafka)")
    if previous is not None and report.service_version != previous.service_version:
        lines.append(f"*** the service now serves {report.service_version}, loaded in place (no restart)")
    triggered_before = {d.design_id for d in previous.designs if d.production_triggered} if previous else set()
    for design in report.designs:
        lines.append("  " + format_design(design))
        if design.production_triggered and design.design_id not in triggered_before:
            lines.append(
                f"*** ProductionOrder for {design.design_id}: {design.net_orders} net orders reached the threshold "
                f"{design.order_threshold}; production starts"
            )
    if report.feature_table:
        lines.append("user features in Feast's online store:")
        lines.append(report.feature_table)
    return "\n".join(lines)


def format_summary(outcome: LoopOutcome) -> str:
    events: Counter[str] = Counter()
    groups = 0
    for report in outcome.rounds:
        events.update(report.events_sent)
        groups += report.groups_served
    first, last = outcome.rounds[0], outcome.rounds[-1]
    by_design = outcome.observed.production_orders_by_design()
    production = ", ".join(f"{design} ({len(orders)} order)" for design, orders in sorted(by_design.items()))
    return "\n".join(
        [
            "=== summary " + "=" * 60,
            f"rounds played       {len(outcome.rounds)} in {outcome.elapsed_s:.0f} s",
            f"groups served       {groups}",
            f"events sent         {format_counter(events)}",
            f"group samples       {outcome.observed.group_samples} "
            f"({outcome.observed.samples_with_positives} with a positive)",
            f"training requests   {len(outcome.observed.train_requests)}",
            f"versions published  {', '.join(u.version for u in outcome.observed.model_updates) or 'none'}",
            f"served version      {outcome.initial_version} at the start, {outcome.final_version} at the end",
            f"viewer utility      {first.mean_viewer_utility:+.3f} in round 1, "
            f"{last.mean_viewer_utility:+.3f} in round {last.number}",
            f"production orders   {production or 'none'}",
            f"failed requests     {len(outcome.failed_requests)}",
            f"state and logs      {outcome.state_dir}",
        ]
    )


def _served_images(client: ServiceClient, image_ids: Sequence[str]) -> NDArray[np.uint8]:
    return np.stack([client.image(image_id) for image_id in image_ids])  # [K, H, W, 3]


class LoopRun:
    """One run: the people, the designs and their clients; :meth:`play_round` plays and reports one round."""

    def __init__(
        self,
        settings: LoopSettings,
        panel: ShopperPanel,
        clients: DemoClients,
        shoppers: Sequence[str],
        merchants: Sequence[str],
    ) -> None:
        self.settings = settings
        self.panel = panel
        self.clients = clients
        self.shoppers = list(shoppers)
        self.merchants = list(merchants)
        self.design_ids: list[str] = []

    def merchant_of(self, design_index: int) -> str:
        return self.merchants[design_index % len(self.merchants)]

    def create_designs(self) -> list[str]:
        from ops.demo.client import ServiceRequestFailed

        for index, prompt in enumerate(self.settings.prompts):
            merchant = self.clients.merchant(self.merchant_of(index))
            try:
                created = merchant.create_design(prompt, self.settings.order_threshold)
            except ServiceRequestFailed as exc:
                raise ConfigError(f"the service refused design {prompt!r}: {exc}") from exc
            self.design_ids.append(created.design_id)
        return self.design_ids

    def play_round(self, number: int) -> RoundReport:
        from ops.demo.client import ServiceRequestFailed

        report = RoundReport(number)
        rng = random.Random(self.settings.seed * 100_003 + number)
        for index, design_id in enumerate(self.design_ids):
            merchant_id = self.merchant_of(index)
            merchant = self.clients.merchant(merchant_id)
            try:
                served = merchant.candidates(design_id, self.settings.k, seed=rng.randrange(2**31))
                self._count_served(report, served.personalization, served.model_version)
                image_ids = [c.image_id for c in served.candidates]
                images = _served_images(merchant, image_ids)
                panel_utilities = np.stack([self.panel.utilities(user, images) for user in self.shoppers])
                chosen = merchant_choice(panel_utilities, image_ids)
                merchant.post_event(select_event(merchant_id, served.impression_id, design_id, chosen))
                report.events_sent["select"] += 1
            except ServiceRequestFailed as exc:
                report.failed_requests.append(str(exc))
        for index, shopper_id in enumerate(self.shoppers):
            design_id = self.design_ids[(index + number) % len(self.design_ids)]
            shopper = self.clients.shopper(shopper_id)
            try:
                served = shopper.candidates(design_id, self.settings.k, seed=rng.randrange(2**31))
                self._count_served(report, served.personalization, served.model_version)
                image_ids = [c.image_id for c in served.candidates]
                utilities = self.panel.utilities(shopper_id, _served_images(shopper, image_ids))
                report.viewer_utilities.extend(float(u) for u in utilities)
                actions = choose_actions([float(u) for u in utilities], image_ids, self.settings.behaviour, rng)
                for event in action_events(actions, shopper_id, served.impression_id, design_id):
                    # The shopper clicks; the shop's order system reports what they ordered and returned.
                    reporter = shopper if event.kind == "click" else self.clients.order_system
                    reporter.post_event(event)
                    report.events_sent[event.kind] += 1
            except ServiceRequestFailed as exc:
                report.failed_requests.append(str(exc))
        return report

    @staticmethod
    def _count_served(report: RoundReport, personalization: str, version: str) -> None:
        report.groups_served += 1
        report.personalization[personalization] += 1
        report.versions_served[version] += 1

    def observe(self, report: RoundReport, observed: ObservedLoop, feature_table: str) -> None:
        """Fill in what the loop showed after the round (each merchant reads their own designs)."""
        report.service_version = self.clients.anonymous.healthz().model_version
        report.group_samples = observed.group_samples
        report.train_requests = len(observed.train_requests)
        report.published_versions = [update.version for update in observed.model_updates]
        report.designs = [
            self.clients.merchant(self.merchant_of(index)).design(design_id)
            for index, design_id in enumerate(self.design_ids)
        ]
        report.feature_table = feature_table


def goals_met(report: RoundReport, initial_version: str) -> bool:
    """A version newer than the first is served and some design went to production."""
    new_version_served = report.service_version != initial_version and any(
        version != initial_version for version in report.versions_served
    )
    return new_version_served and any(design.production_triggered for design in report.designs)


def refused_without_a_key(clients: DemoClients) -> str:
    """What the service answers an order posted without a key (as anyone could before keys): a line to print."""
    from ops.demo.client import ServiceRequestFailed
    from perfusion.contracts.records import Order

    order = Order(
        event_id=f"demo-anonymous-{uuid.uuid4().hex}",
        ts=time.time(),
        user_id="anyone",
        impression_id="imp-none",
        design_id="design-none",
        image_id="gen-none",
        quantity=1000,
    )
    try:
        clients.anonymous.post_event(order)
    except ServiceRequestFailed as exc:
        if exc.status_code == 401:
            return "an order of 1000 posted without a key is refused: 401"
        raise ConfigError(f"the service answered an order without a key with {exc}; expected 401") from exc
    raise ConfigError("the service accepted an order without a key; it must answer 401")


def run_loop(
    settings: LoopSettings, panel: ShopperPanel, bootstrap: str, run_dir: Path, emit: Emit = print_flushed
) -> LoopOutcome:
    """Run the loop in ``run_dir`` (state, logs) against the broker at ``bootstrap``; see the module docstring."""
    from harness.infra.process import free_port
    from harness.loop import LoopPlace, process_environment
    from harness.processes import ProcessSupervisor
    from ops.demo.client import ServiceClient
    from ops.demo.observer import LoopObserver
    from ops.demo.principals import DemoClients, issue_keys
    from ops.feature_table import format_feature_table
    from perfusion.contracts.topics import TopicNames, ensure_topics
    from perfusion.feature_store import apply_feature_repo, open_feature_store, read_online_features
    from perfusion.user_features import NUM_REGIONS, push_sign_up_profiles

    started = time.monotonic()
    topic_prefix = f"demo-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}."
    names = TopicNames.for_prefix(topic_prefix)
    keys_file = run_dir / "service" / "keys.json"
    place = LoopPlace(
        bootstrap,
        state_dir=run_dir,
        topic_prefix=topic_prefix,
        partitions=settings.partitions,
        extra_environment={
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            # The service reads the keys the demo creates here, whatever the environment names elsewhere.
            "PERFUSION_SERVE_AUTH__KEYS_FILE": str(keys_file),
        },
    )
    env = place.environment()
    shoppers = panel.user_ids()
    merchants = [f"merchant-{index}" for index in range(len(settings.prompts))]
    keys = issue_keys(keys_file, merchants, shoppers)
    emit(
        f"==> API keys for {len(merchants)} merchants, {len(shoppers)} shoppers, the order system and an operator "
        f"in {keys_file} (stored hashed)"
    )
    # Feast's store is passed to what this process opens; the state folder is still this process's for the rest.
    feature_store = place.feature_store()
    local = {key: env[key] for key in ("PERFUSION_STATE_DIR", "FEAST_USAGE")}
    with process_environment(local):
        applied = apply_feature_repo(feature_store)
        emit(f"==> Feast repo applied in {applied.feast_dir}: {', '.join(applied.feature_views)}")
        ensure_topics(bootstrap, names, settings.partitions)
        # Every merchant's store sells in the regions in turn, so that their u says they are merchants from their
        # first review on.
        push_sign_up_profiles(
            {shopper: panel.profile(shopper) for shopper in shoppers},
            {merchant: index % NUM_REGIONS for index, merchant in enumerate(merchants)},
            time.time() - 86_400.0,
            feature_store,
        )
        emit(
            f"==> {len(shoppers)} shoppers' and {len(merchants)} merchants' profiles pushed to Feast; topics prefixed "
            f"{topic_prefix!r}"
        )
        store = open_feature_store(feature_store)
        port = free_port()
        observer = LoopObserver(bootstrap, names)
        with (
            ProcessSupervisor(run_dir / "logs", env) as supervisor,
            ServiceClient(f"http://127.0.0.1:{port}") as client,
        ):
            observer.start()
            try:
                for name, arguments in (
                    ("worker", settings.worker_arguments()),
                    ("trainer", settings.trainer_arguments()),
                    ("service", settings.service_arguments(port)),
                ):
                    # The trainer commits offsets only after a publish, so a restart neither loses nor repeats samples.
                    process = supervisor.start(name, arguments, restarts=2 if name == "trainer" else 0)
                    emit(f"==> started the {name} (pid {process.pid}, log {process.log_path})")
                supervisor.wait_until(client.is_up, settings.startup_timeout_s, "the service to answer /healthz")
                initial_version = client.healthz().model_version
                emit(f"==> generator service up on {client.base_url}, serving model version {initial_version}")
                clients = DemoClients(client, keys)
                emit(f"==> {refused_without_a_key(clients)}")
                run = LoopRun(settings, panel, clients, shoppers, merchants)
                for design_id, prompt in zip(run.create_designs(), settings.prompts, strict=True):
                    emit(f"==> merchant design {design_id}: {prompt!r}, production at {settings.order_threshold}")
                reports: list[RoundReport] = []
                for number in range(1, settings.max_rounds + 1):
                    report = run.play_round(number)
                    report.restarts = supervisor.check_running()
                    rows = read_online_features(store, "user_preferences", shoppers[: settings.shown_users])
                    run.observe(report, observer.snapshot(), format_feature_table(rows))
                    emit(format_round(report, reports[-1] if reports else None))
                    reports.append(report)
                    if number >= settings.rounds and goals_met(report, initial_version):
                        break
                viewers = [*shoppers, *merchants]
                final_rows = read_online_features(store, "user_preferences", viewers)
                stores = {row["user_id"]: row["store_region"] for row in read_online_features(
                    store, "merchant_profile", merchants)}  # fmt: skip
                emit("==> every shopper's features in Feast's online store, and the merchants' (marked M):")
                emit(format_feature_table(final_rows, stores))
                outcome = LoopOutcome(
                    rounds=reports,
                    initial_version=initial_version,
                    final_version=client.healthz().model_version,
                    observed=observer.snapshot(),
                    state_dir=run_dir,
                    elapsed_s=time.monotonic() - started,
                )
            finally:
                observer.stop()
                emit(f"==> stopping {', '.join(p.name for p in reversed(supervisor.processes))}")
    emit(format_summary(outcome))
    return outcome
