"""Throughput and freshness of the stream worker on the real broker, against two ceilings measured in the same run.

One run, one broker (``KAFKA_BOOTSTRAP_SERVERS``, else the project's broker, started when it is down), one fresh
topic prefix, a Feast repo applied in a temporary folder. ``--events`` simulated events are produced to
``perfusion.events`` (``--partitions`` partitions) once, and read from there three times, one reader after the
other so that none competes with another for the CPUs:

1. ``raw_consumer``: a raw aiokafka consumer reads them from the beginning as fast as it can, no parsing: events/s;
2. ``bare_faust``: the bare Faust agent (:mod:`ops.bench.bare_faust`), a process started as the worker is
   (``python -m``, :func:`harness.loop.loop_process`) with the worker's own Faust app and settings, the worker's
   ``take`` batch size and window, its own consumer group, whose one agent only parses each message
   (``--bare-parse``: ``event`` = :func:`perfusion.contracts.records.parse_event`, the JSON decode and validation
   the worker's gate runs before any stage; ``json`` = ``json.loads`` alone): the ceiling of a Faust worker;
3. ``worker``: a real ``perfusion worker`` (every agent, Feast pushes online and offline included).

The two Faust processes are timed alike (:mod:`ops.bench.stream_rates`): events finished, from the process's own
``/metrics``, from the first reading past 10% of the events to the reading that reaches all of them (start-up left
out), and CPU microseconds per event from the process's CPU time over that span. The report gives the worker's rate
as a share of each ceiling. Then:

4. ``freshness``: with the worker caught up, events are produced at ``--rate`` events/s for ``--warmup-s`` seconds
   (not measured: the first events stamped with the current time close every group the throughput run left open,
   and the benchmark waits until the worker's group has no lag on any topic, ``drain_after_warmup_s``) and then
   ``--freshness-s`` seconds, each stamped with its send time; a poller reads ``last_active_ts`` of the sampled
   users from the Feast online store: p50/p99 of send -> visible (:mod:`ops.bench.stream_freshness`);
5. ``cpu_per_event_us``: CPU per event by stage: the bare Faust process (Kafka fetch, Faust's stream machinery,
   parsing), the worker process, the difference, and each of the worker's stages run in this process on the same
   events (:mod:`ops.bench.stream_stages`; also the report's ``stage_costs``).

Targets: the worker >= 50% of the bare Faust agent and >= 3,000 events/s; freshness p99 < 500 ms at the offered
rate (``--rate``; the traffic sent at >= 95% of it). Heavy imports happen inside the functions (this module is
imported to build the CLI parser).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from perfusion.settings import KafkaClientSettings, Settings, add_flags, flag_overrides

if TYPE_CHECKING:
    from harness.loop import LoopPlace
    from perfusion.contracts.records import AnyEvent
    from streams.settings import StreamSettings

HELP = (
    "events/s of the stream worker against a bare Faust agent and a raw aiokafka consumer in the same run, event -> "
    "Feast online freshness at an offered rate, and CPU per event by stage"
)

TARGET_WORKER_EVENTS_PER_S = 3000.0
TARGET_BARE_FAUST_FRACTION = 0.5
TARGET_FRESHNESS_P99_MS = 500.0
FRESHNESS_SENT_FRACTION = 0.95
"""The freshness target counts only when the traffic was sent at this share of the offered rate or more."""
STAGE_COST_EVENTS = 5000
BARE_FAUST_MODULE = "ops.bench.bare_faust"
ENV_PREFIX = "PERFUSION_BENCH_STREAMS_"


class StreamBenchSettings(Settings):
    """What ``perfusion bench streams`` measures. Its variables have their own prefix
    (``PERFUSION_BENCH_STREAMS_RATE``), so that none of the worker's (``PERFUSION_PARTITIONS``) changes the bench."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    events: int = Field(
        default=50_000,
        ge=100,
        description="events pre-filled once and read by the raw consumer, the bare Faust agent and the worker",
    )
    rate: float = Field(
        default=1000.0,
        gt=0.0,
        le=100_000.0,
        description="offered events/s of the freshness run; the freshness target is judged at this rate",
    )
    freshness_s: float = Field(default=10.0, ge=0.5, le=600.0, description="seconds of measured freshness traffic")
    warmup_s: float = Field(
        default=10.0,
        ge=0.0,
        le=600.0,
        description="seconds of the same traffic sent first and not measured: the first events stamped with the "
        "current time close every group left open by the throughput run, a one-off burst of work",
    )
    sampled_users: int = Field(
        default=64, ge=1, le=10_000, description="users whose Feast rows the freshness poller reads"
    )
    shoppers: int = Field(
        default=500, ge=1, le=1_000_000, description="simulated shoppers (rows pushed per batch grow with it)"
    )
    partitions: int = Field(default=4, ge=1, le=64, description="partitions of the events topic")
    timeout_s: float = Field(default=600.0, ge=1.0, le=7200.0, description="give up on a phase after this many s")
    seed: int = Field(default=0, ge=0, description="seed of the simulated traffic")
    bare_parse: Literal["event", "json"] = Field(
        default="event",
        description="what the bare Faust agent does per message: event = parse_event (JSON decode and validation, "
        "the worker's first step), json = json.loads alone",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, StreamBenchSettings)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_stream_benchmark(StreamBenchSettings.from_env(**flag_overrides(args, StreamBenchSettings)))


def _rate_text(measured: dict[str, Any]) -> str:
    if measured["events_per_s"] is None:
        return "too few events to time (raise --events)"
    return f"{measured['events_per_s']:,.0f} events/s, {measured['cpu_us_per_event']:,.0f} us CPU per event"


def _share_text(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def summary(report: dict[str, Any]) -> str:
    raw, bare, worker, fresh = report["raw_consumer"], report["bare_faust"], report["worker"], report["freshness"]
    shares = report["worker_share"]
    lines = [
        f"raw aiokafka consumer: {raw['events_per_s']:,.0f} events/s",
        f"bare Faust agent ({bare['parse']} per message, take({bare['take_max']}, within={bare['take_within_s']} s)):"
        f" {_rate_text(bare)}",
        f"worker (all agents, Feast pushes): {_rate_text(worker)}; {_share_text(shares['of_bare_faust'])} of the bare "
        f"Faust agent, {_share_text(shares['of_raw_consumer'])} of the raw consumer",
        f"freshness at {fresh['offered_rate']:,.0f} events/s offered ({fresh['achieved_rate']:,.0f} sent): "
        f"p50 {fresh['p50_ms']:.0f} ms, p99 {fresh['p99_ms']:.0f} ms over {fresh['samples']} events",
    ]
    for name, target in report["targets"].items():
        lines.append(
            f"target {name}: {target['target']} -> {target['measured']} {'met' if target['met'] else 'MISSED'}"
        )
    cpu = report["cpu_per_event_us"]
    processes = ", ".join(
        f"{name} {'-' if cpu[name] is None else format(cpu[name], ',.0f')}"
        for name in (
            "bare_faust_process", "worker_process", "worker_main_process", "worker_feast_writer",
            "worker_beyond_bare_faust",
        )
    )  # fmt: skip
    lines.append(f"CPU per event (us): {processes}")
    lines.append(
        "  worker stages in process: " + ", ".join(f"{stage} {cost:.0f}" for stage, cost in cpu["stages"].items())
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the run


def run_stream_benchmark(settings: StreamBenchSettings) -> dict[str, Any]:
    from harness.loop import LoopPlace, process_environment, running_broker
    from ops.bench.stream_rates import raw_consumer_rate
    from perfusion.contracts.topics import TopicNames, ensure_topics
    from perfusion.feature_store import FeatureStoreSettings, apply_feature_repo

    phases: dict[str, float] = {}
    clock = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = round(now - clock[0], 2)
        clock[0] = now

    with (
        running_broker(keep_running=True) as bootstrap,
        tempfile.TemporaryDirectory(prefix="perfusion-bench-streams-") as scratch,
    ):
        feast_dir = Path(scratch) / "feast"
        # This process's Feast clients are given the store; the children get it through the place's environment.
        feature_store = FeatureStoreSettings.from_env(feast_dir=feast_dir)
        with process_environment({"FEAST_USAGE": os.environ.get("FEAST_USAGE", "False")}):
            apply_feature_repo(feature_store)
            phase("broker_and_feast")
            prefix = f"bench-{uuid.uuid4().hex[:8]}."
            names = TopicNames.for_prefix(prefix)
            # This process's clients connect as the children do (KAFKA_SECURITY_PROTOCOL, ...: the environment).
            kafka = KafkaClientSettings.from_env(bootstrap_servers=bootstrap)
            ensure_topics(bootstrap, names, settings.partitions, client=kafka)
            events = _simulated_events(settings, settings.events, seed=settings.seed, start_ts=time.time() - 3600.0)
            _produce(bootstrap, names.events, [(e.user_id.encode(), e.to_bytes()) for e in events], kafka)
            phase("prefill")
            raw = asyncio.run(
                raw_consumer_rate(
                    bootstrap,
                    names.events,
                    settings.partitions,
                    settings.events,
                    settings.timeout_s,
                    kafka.kafka_security,
                )
            )
            phase("raw_consumer")
            place = LoopPlace(bootstrap, state_dir=Path(scratch) / "state", topic_prefix=prefix, feast_dir=feast_dir)
            bare = _bare_faust_rate(place, settings, Path(scratch))
            phase("bare_faust")
            worker, freshness = _worker_rate_and_freshness(place, settings, Path(scratch), phase)
            phase("worker_stop")
            from ops.bench.stream_stages import stage_costs

            stages = stage_costs(events[: min(len(events), STAGE_COST_EVENTS)], feature_store)
            phase("stage_costs")
    phases["total"] = round(sum(phases.values()), 2)
    return _report(settings, raw, bare, worker, freshness, stages, phases)


def _bare_faust_rate(place: LoopPlace, settings: StreamBenchSettings, scratch: Path) -> dict[str, Any]:
    """Start the bare Faust agent on the pre-filled topic, time it, stop it."""
    from harness.loop import loop_process
    from ops.bench.bare_faust import BARE_APP_ID
    from ops.bench.stream_rates import free_port, process_rate

    port = free_port()
    arguments = ["-m", BARE_FAUST_MODULE, *_faust_flags(settings, port), f"--parse={settings.bare_parse}"]
    with loop_process(place, "bare-faust", arguments, log_dir=scratch) as supervised:
        measured = process_rate(
            "bare Faust agent", supervised.process, _metrics_url(port), settings.events, settings.timeout_s
        )
    app_settings = _faust_settings(place, settings, app_id=BARE_APP_ID)
    return {
        **measured,
        "parse": "parse_event" if settings.bare_parse == "event" else "json.loads",
        "group_id": app_settings.group_id,
        "take_max": app_settings.push_batch_max,
        "take_within_s": app_settings.push_batch_within_s,
        "app": "the worker's Faust app (streams.app.create_app, the worker's StreamSettings) with no worker agent; "
        f"one agent on perfusion.events: take_events(push_batch_max, within=push_batch_within_s), {BARE_FAUST_MODULE}",
    }


def _worker_rate_and_freshness(
    place: LoopPlace, settings: StreamBenchSettings, scratch: Path, phase: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a worker on the pre-filled topic, time it, then measure freshness with it caught up."""
    from harness.loop import cli_arguments, loop_process
    from ops.bench.stream_freshness import freshness
    from ops.bench.stream_rates import free_port, process_rate
    from perfusion.contracts.topics import TopicNames

    port = free_port()
    group_id = _faust_settings(place, settings).group_id
    arguments = cli_arguments("worker", *_faust_flags(settings, port))
    with loop_process(place, "worker", arguments, log_dir=scratch) as supervised:
        worker = process_rate("worker", supervised.process, _metrics_url(port), settings.events, settings.timeout_s)
        phase("worker")
        warmup = round(settings.rate * settings.warmup_s)
        count = max(1, round(settings.rate * settings.freshness_s))
        traffic = _simulated_events(settings, warmup + count, seed=settings.seed + 1, start_ts=time.time())
        topic = TopicNames.for_prefix(place.topic_prefix).events
        fresh = freshness(
            place.bootstrap, topic, group_id, traffic, settings.rate, warmup, settings.sampled_users,
            settings.timeout_s, supervised.process, place.feature_store(),
            KafkaClientSettings.from_env(bootstrap_servers=place.bootstrap).kafka_security, _metrics_url(port),
        )  # fmt: skip
        phase("freshness")
    return {**worker, "group_id": group_id}, fresh


def _faust_flags(settings: StreamBenchSettings, port: int) -> list[str]:
    """The flags both Faust processes get: the partitions, a /metrics port, quiet logs."""
    return [f"--partitions={settings.partitions}", f"--http-port={port}", "--loglevel=warning"]


def _metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def _faust_settings(place: LoopPlace, settings: StreamBenchSettings, app_id: str | None = None) -> StreamSettings:
    """A Faust process's settings as it reads them: this process's environment (which it inherits), the place's
    broker and prefix, and the flags it is given."""
    from streams.settings import StreamSettings

    return StreamSettings.from_env(
        bootstrap_servers=place.bootstrap,
        topic_prefix=place.topic_prefix,
        partitions=settings.partitions,
        app_id=app_id,
    )


def _share(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _report(
    settings: StreamBenchSettings,
    raw: dict[str, Any],
    bare: dict[str, Any],
    worker: dict[str, Any],
    freshness: dict[str, Any],
    stages: dict[str, Any],
    phases: dict[str, float],
) -> dict[str, Any]:
    worker_rate: float | None = worker["events_per_s"]
    of_bare = _share(worker_rate, bare["events_per_s"])
    p99, offered = freshness["p99_ms"], freshness["offered_rate"]
    sent_enough = freshness["achieved_rate"] >= FRESHNESS_SENT_FRACTION * offered
    targets = {
        "worker_events_per_s": _target(f">= {TARGET_WORKER_EVENTS_PER_S:,.0f}", worker_rate,
                                       worker_rate is not None and worker_rate >= TARGET_WORKER_EVENTS_PER_S),
        "worker_to_bare_faust": _target(f">= {TARGET_BARE_FAUST_FRACTION:.0%} of the bare Faust agent", of_bare,
                                        of_bare is not None and of_bare >= TARGET_BARE_FAUST_FRACTION),
        "freshness_p99_ms": _target(f"< {TARGET_FRESHNESS_P99_MS:.0f} ms at the offered {offered:,.0f} events/s "
                                    f"(sent at >= {FRESHNESS_SENT_FRACTION:.0%} of it)", p99,
                                    p99 < TARGET_FRESHNESS_P99_MS and sent_enough),
    }  # fmt: skip
    bare_cpu, worker_cpu = bare["cpu_us_per_event"], worker["cpu_us_per_event"]
    return {
        "benchmark": "streams",
        "config": settings.model_dump(mode="json"),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
        "raw_consumer": raw,
        "bare_faust": bare,
        "worker": worker,
        "worker_share": {"of_bare_faust": of_bare, "of_raw_consumer": _share(worker_rate, raw["events_per_s"])},
        "freshness": freshness,
        "cpu_per_event_us": {
            "bare_faust_process": bare_cpu,
            "worker_process": worker_cpu,
            "worker_beyond_bare_faust": None if bare_cpu is None or worker_cpu is None else worker_cpu - bare_cpu,
            "worker_main_process": worker.get("cpu_us_per_event_process"),
            "worker_feast_writer": worker.get("cpu_us_per_event_children"),
            "stages": stages["per_event_us"],
            "note": "bare_faust_process: Kafka fetch, Faust's stream machinery and parsing; worker_process: the "
            "worker and its Feast writer process, split into worker_main_process (one core bounds it) and "
            "worker_feast_writer; worker_beyond_bare_faust: what the worker's stages, outputs, changelogs and Feast "
            "pushes add; stages: each stage alone in this process (stage_costs)",
        },
        "stage_costs": stages,
        "targets": targets,
        "phase_seconds": phases,
    }


def _target(target: str, measured: float | None, met: bool) -> dict[str, Any]:
    return {"target": target, "measured": None if measured is None else round(measured, 4), "met": bool(met)}


def _simulated_events(settings: StreamBenchSettings, count: int, seed: int, start_ts: float) -> list[AnyEvent]:
    from simulator.traffic import TrafficConfig, TrafficSimulator

    traffic = TrafficConfig(seed=seed, shoppers=settings.shoppers, merchants=20, designs=50, start_ts=start_ts,
                            mean_gap_s=0.05)  # fmt: skip
    return TrafficSimulator(traffic).events(count)


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], kafka: KafkaClientSettings) -> None:
    from simulator.traffic import produce_events

    produce_events(messages, bootstrap, topic, security=kafka.kafka_security)
