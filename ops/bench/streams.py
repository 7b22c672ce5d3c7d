"""Throughput and freshness of the stream worker on the real broker, against a raw consumer's ceiling.

One run, one broker (``KAFKA_BOOTSTRAP_SERVERS``, else the project's broker, started when it is down), one fresh
topic prefix, a Feast repo applied in a temporary folder:

1. ``ceiling``: ``--events`` simulated events are produced to ``perfusion.events``; a raw aiokafka consumer reads
   them from the beginning as fast as it can (no parsing): events/s;
2. ``worker``: a real ``perfusion worker`` (every agent, Feast pushes online and offline included) consumes the
   same pre-filled topic. Its rate is read from the consumer group's committed offsets, between the first commit
   past 10% of the events and the commit of the last one, so start-up (imports, joining, table recovery) is left
   out: events/s per worker, and the ratio to the ceiling;
3. ``freshness``: with the worker caught up, events are produced at ``--rate`` events/s for ``--warmup-s`` seconds
   (not measured: the first events stamped with the current time close every group the throughput run left open,
   and the benchmark waits until the worker's group has no lag on any topic, reported as ``drain_after_warmup_s``)
   and then ``--freshness-s`` seconds, each stamped with its send time; a poller reads ``last_active_ts`` of the
   sampled users from the Feast online store and records when each event became visible: p50/p99 of send ->
   visible;
4. ``stage_costs``: where a worker's time goes, per event, measured in this process on the same events: parsing
   and validation (once per event, by the events agent), the preference update with its state encoding, the group
   builder and the demand counter over a JSON store, and one Feast push of a micro-batch's rows.

Targets (issue 5): >= 5,000 events/s per worker, >= 50% of the ceiling, freshness p99 < 500 ms at 1,000 events/s.
Heavy imports happen inside the functions (this module is imported to build the CLI parser).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfusion.errors import ConfigError, InfrastructureError

if TYPE_CHECKING:
    from perfusion.contracts.records import AnyEvent

HELP = "events/s of the stream worker against a raw aiokafka consumer, and event -> Feast online freshness"

TARGET_WORKER_EVENTS_PER_S = 5000.0
TARGET_CEILING_FRACTION = 0.5
TARGET_FRESHNESS_P99_MS = 500.0
TARGET_FRESHNESS_RATE = 1000.0


@dataclass(frozen=True)
class StreamBenchConfig:
    """What to measure."""

    events: int = field(default=20_000, metadata={"help": "events pre-filled for the ceiling and worker runs"})
    rate: float = field(default=TARGET_FRESHNESS_RATE, metadata={"help": "offered events/s of the freshness run"})
    freshness_s: float = field(default=10.0, metadata={"help": "seconds of traffic in the freshness run"})
    warmup_s: float = field(
        default=10.0,
        metadata={
            "help": "seconds of the same traffic sent first and not measured: the first events stamped with the "
            "current time close every group left open by the throughput run, a one-off burst of work"
        },
    )
    sampled_users: int = field(default=64, metadata={"help": "users whose Feast rows the freshness poller reads"})
    shoppers: int = field(default=500, metadata={"help": "simulated shoppers (rows pushed per batch grow with it)"})
    partitions: int = field(default=4, metadata={"help": "partitions of the events topic"})
    timeout_s: float = field(default=600.0, metadata={"help": "give up on a phase after this many seconds"})
    seed: int = field(default=0, metadata={"help": "seed of the simulated traffic"})

    def __post_init__(self) -> None:
        if self.events < 100:
            raise ConfigError(f"events must be at least 100, got {self.events}")
        if not 0.0 < self.rate <= 100_000.0:
            raise ConfigError(f"rate must be in (0, 100000] events/s, got {self.rate}")
        if not 0.5 <= self.freshness_s <= 600.0:
            raise ConfigError(f"freshness_s must be between 0.5 and 600 seconds, got {self.freshness_s}")
        if not 0.0 <= self.warmup_s <= 600.0:
            raise ConfigError(f"warmup_s must be between 0 and 600 seconds, got {self.warmup_s}")
        if self.sampled_users < 1 or self.shoppers < 1 or not 1 <= self.partitions <= 64:
            raise ConfigError(
                "sampled_users and shoppers must be at least 1 and partitions in 1..64, got "
                f"{self.sampled_users}, {self.shoppers}, {self.partitions}"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StreamBenchConfig()
    parser.add_argument("--events", type=int, default=defaults.events, help="events pre-filled for throughput")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="offered events/s of the freshness run")
    parser.add_argument("--freshness-s", type=float, default=defaults.freshness_s, help="seconds of freshness run")
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s, help="unmeasured seconds before it")
    parser.add_argument("--shoppers", type=int, default=defaults.shoppers, help="simulated shoppers")
    parser.add_argument("--partitions", type=int, default=defaults.partitions, help="partitions of the events topic")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="longest wait of one phase")


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = StreamBenchConfig(
        events=args.events,
        rate=args.rate,
        freshness_s=args.freshness_s,
        warmup_s=args.warmup_s,
        shoppers=args.shoppers,
        partitions=args.partitions,
        timeout_s=args.timeout_s,
    )
    return run_stream_benchmark(config)


def summary(report: dict[str, Any]) -> str:
    ceiling, worker, fresh = report["ceiling"], report["worker"], report["freshness"]
    if worker["events_per_s"] is None:
        worker_line = "worker: too few events to time (raise --events)"
    else:
        worker_line = (
            f"worker (all agents, Feast pushes): {worker['events_per_s']:,.0f} events/s "
            f"= {report['worker_to_ceiling']:.1%} of the ceiling; {worker['cpu_us_per_event']:,.0f} us CPU per event"
        )
    lines = [
        f"raw aiokafka ceiling: {ceiling['events_per_s']:,.0f} events/s",
        worker_line,
        f"freshness at {fresh['offered_rate']:,.0f} events/s offered ({fresh['achieved_rate']:,.0f} sent): "
        f"p50 {fresh['p50_ms']:.0f} ms, p99 {fresh['p99_ms']:.0f} ms over {fresh['samples']} events",
    ]
    for name, target in report["targets"].items():
        lines.append(
            f"target {name}: {target['target']} -> {target['measured']} {'met' if target['met'] else 'MISSED'}"
        )
    costs = report["stage_costs"]["per_event_us"]
    lines.append("per event (us): " + ", ".join(f"{stage} {cost:.0f}" for stage, cost in costs.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the run


def run_stream_benchmark(config: StreamBenchConfig) -> dict[str, Any]:
    from harness.loop import LoopPlace, cli_arguments, loop_process, running_broker
    from perfusion.contracts.topics import TopicNames, ensure_topics

    with (
        running_broker(keep_running=True) as bootstrap,
        tempfile.TemporaryDirectory(prefix="perfusion-bench-streams-") as scratch,
    ):
        feast_dir = Path(scratch) / "feast"
        _apply_feast(feast_dir)
        prefix = f"bench-{uuid.uuid4().hex[:8]}."
        names = TopicNames.for_prefix(prefix)
        ensure_topics(bootstrap, names, config.partitions)
        events = _simulated_events(config, config.events, seed=config.seed, start_ts=time.time() - 3600.0)
        _produce(bootstrap, names.events, [(e.user_id.encode(), e.to_bytes()) for e in events])
        ceiling = asyncio.run(
            _raw_consumer_rate(bootstrap, names.events, config.partitions, config.events, config.timeout_s)
        )
        place = LoopPlace(bootstrap, state_dir=Path(scratch) / "state", topic_prefix=prefix, feast_dir=feast_dir)
        worker_arguments = cli_arguments("worker", f"--partitions={config.partitions}", "--loglevel=warning")
        with loop_process(place, "worker", worker_arguments, log_dir=Path(scratch)) as supervised:
            worker = supervised.process
            throughput = _worker_rate(bootstrap, f"{prefix}perfusion-worker", names.events, config, worker)
            freshness = _freshness(bootstrap, names.events, f"{prefix}perfusion-worker", config, worker)
        stage_costs = _stage_costs(events[: min(len(events), 5000)], feast_dir)
    worker_rate: float | None = throughput["events_per_s"]
    ratio = None if worker_rate is None else worker_rate / ceiling["events_per_s"]
    targets = {
        "worker_events_per_s": _target(f">= {TARGET_WORKER_EVENTS_PER_S:,.0f}", worker_rate,
                                       worker_rate is not None and worker_rate >= TARGET_WORKER_EVENTS_PER_S),
        "worker_to_ceiling": _target(f">= {TARGET_CEILING_FRACTION:.0%}", ratio,
                                     ratio is not None and ratio >= TARGET_CEILING_FRACTION),
        "freshness_p99_ms": _target(f"< {TARGET_FRESHNESS_P99_MS:.0f} ms at {TARGET_FRESHNESS_RATE:,.0f} events/s",
                                    freshness["p99_ms"], freshness["p99_ms"] < TARGET_FRESHNESS_P99_MS
                                    and freshness["offered_rate"] >= TARGET_FRESHNESS_RATE),
    }  # fmt: skip
    return {
        "benchmark": "streams",
        "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
        "ceiling": ceiling,
        "worker": throughput,
        "worker_to_ceiling": ratio,
        "freshness": freshness,
        "stage_costs": stage_costs,
        "targets": targets,
    }


def _target(target: str, measured: float | None, met: bool) -> dict[str, Any]:
    return {"target": target, "measured": None if measured is None else round(measured, 4), "met": bool(met)}


def _apply_feast(feast_dir: Path) -> None:
    from perfusion.feature_store import apply_feature_repo

    os.environ["PERFUSION_FEAST_DIR"] = str(feast_dir)
    os.environ.setdefault("PERFUSION_ONLINE_STORE", "sqlite")
    os.environ.setdefault("FEAST_USAGE", "False")
    apply_feature_repo()


def _simulated_events(config: StreamBenchConfig, count: int, seed: int, start_ts: float) -> list[AnyEvent]:
    from simulator.traffic import TrafficConfig, TrafficSimulator

    traffic = TrafficConfig(seed=seed, shoppers=config.shoppers, merchants=20, designs=50, start_ts=start_ts,
                            mean_gap_s=0.05)  # fmt: skip
    return TrafficSimulator(traffic).events(count)


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    from simulator.traffic import produce_events

    produce_events(messages, bootstrap, topic)


async def _raw_consumer_rate(
    bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float
) -> dict[str, Any]:
    """A raw aiokafka consumer reading ``topic`` from the beginning: events/s from its first to its last batch."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, partition) for partition in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        received, started = 0, time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while received < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            received += sum(len(records) for records in batches.values())
        elapsed = time.perf_counter() - started
    finally:
        with contextlib.suppress(asyncio.CancelledError):  # aiokafka#647: stop() may re-raise its own cancellation
            await consumer.stop()
    if received < expected:
        raise InfrastructureError(f"the raw consumer read {received} of {expected} events in {timeout_s} s")
    return {"events": received, "seconds": elapsed, "events_per_s": received / elapsed}


def _committed(admin: Any, group_id: str, topic: str) -> int:
    from kafka.errors import KafkaError

    try:
        offsets = admin.list_group_offsets(group_id).get(group_id, {})
    except KafkaError:  # the group's coordinator is not there before the worker joined
        return 0
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


def _group_lag(admin: Any, consumer: Any, group_id: str) -> int:
    """Messages behind the end of every topic-partition the worker's group has committed offsets for (its inputs
    and its internal topics alike); -1 before it committed anything."""
    from kafka.errors import KafkaError

    try:
        offsets = admin.list_group_offsets(group_id).get(group_id, {})
    except KafkaError:
        return -1
    if not offsets:
        return -1
    from kafka import TopicPartition

    committed = {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    for topic in {topic for topic, _ in committed}:
        consumer.partitions_for_topic(topic)  # this consumer subscribes to nothing: fetch the topics' metadata
    try:
        ends = consumer.end_offsets([TopicPartition(topic, partition) for topic, partition in committed])
    except (KafkaError, KeyError):  # metadata of a topic the worker just created is not there yet
        return -1
    return sum(max(0, ends[TopicPartition(*key)] - offset) for key, offset in committed.items())


def _wait_until_drained(bootstrap: str, group_id: str, timeout_s: float) -> float:
    """Seconds until the worker's group has no lag left on any of its topics (at most ``timeout_s``)."""
    from kafka import KafkaConsumer
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s:
            if _group_lag(admin, consumer, group_id) == 0:
                break
            time.sleep(0.5)
        return time.monotonic() - started
    finally:
        consumer.close()
        admin.close()


def _cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _worker_rate(
    bootstrap: str, group_id: str, topic: str, config: StreamBenchConfig, worker: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """Events/s of the worker from its committed offsets, from the first commit past 10% to the last event."""
    import psutil
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    process = psutil.Process(worker.pid)
    try:
        first: tuple[float, int, float] | None = None
        previous = (time.perf_counter(), 0, _cpu_seconds(process))
        deadline = time.monotonic() + config.timeout_s
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise InfrastructureError(f"the worker exited with {worker.returncode} while consuming")
            committed, now, cpu = _committed(admin, group_id, topic), time.perf_counter(), _cpu_seconds(process)
            if first is None and committed >= config.events:
                first = previous  # one commit covered every event: time it from the poll before (a coarse rate)
            elif first is None and committed >= config.events // 10:
                first = (now, committed, cpu)
            previous = (now, committed, cpu)
            if committed >= config.events:
                assert first is not None
                events, seconds, cpu_seconds = committed - first[1], now - first[0], cpu - first[2]
                return {
                    "events": events,
                    "seconds": seconds,
                    # None when one commit covered everything after the 10% mark: too few events to time.
                    "events_per_s": events / seconds if seconds > 0 and events > 0 else None,
                    # CPU time of the worker process (all threads) over the same span: what the rate would be with
                    # a core to itself, on a machine whose other load slows the wall-clock rate.
                    "cpu_seconds": cpu_seconds,
                    "cpu_us_per_event": cpu_seconds / events * 1e6 if events > 0 else None,
                    "method": "committed offsets of the worker's consumer group, from the first commit past 10% "
                    "of the events to the commit of the last (start-up excluded; resolution: the 1 s commit interval)",
                }
            time.sleep(0.05)
    finally:
        admin.close()
    raise InfrastructureError(f"the worker did not consume {config.events} events within {config.timeout_s} s")


def _freshness(
    bootstrap: str, topic: str, group_id: str, config: StreamBenchConfig, worker: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """Produce at ``config.rate`` with send-time stamps; record when each sampled user's event shows in Feast."""
    from kafka import KafkaProducer

    from perfusion.feature_store import open_feature_store

    warmup = round(config.rate * config.warmup_s)
    count = max(1, round(config.rate * config.freshness_s))
    events = _simulated_events(config, warmup + count, seed=config.seed + 1, start_ts=time.time())
    users = sorted({event.user_id for event in events})
    sampled = set(users[:: max(1, len(users) // config.sampled_users)][: config.sampled_users])
    sent_at: dict[str, list[float]] = {user: [] for user in sampled}
    latencies: list[float] = []
    store = open_feature_store()
    stop = threading.Event()
    read_times: list[float] = []

    def poll() -> None:
        entity_rows = [{"user_id": user} for user in sorted(sampled)]
        while not stop.is_set():
            started = time.perf_counter()
            values = store.get_online_features(
                features=["user_preferences:last_active_ts"], entity_rows=entity_rows
            ).to_dict()
            seen_at = time.time()
            read_times.append(time.perf_counter() - started)
            for user, last_active in zip(values["user_id"], values["last_active_ts"], strict=True):
                pending = sent_at[user]
                while pending and last_active is not None and pending[0] <= last_active:
                    latencies.append(seen_at - pending.pop(0))
            time.sleep(0.005)

    poller = threading.Thread(target=poll, name="freshness-poller", daemon=True)
    poller.start()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=1)
    started = time.monotonic()
    drain_s = 0.0
    try:
        for index, event in enumerate(events):
            if index == warmup and warmup:
                # The warm-up's first events, stamped with the current time, closed every group the throughput
                # run left open: let the worker finish that burst before the measured traffic starts.
                producer.flush()
                drain_s = _wait_until_drained(bootstrap, group_id, config.timeout_s)
                started = time.monotonic() - index / config.rate
            ahead = index / config.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            now = time.time()
            stamped = event.model_copy(update={"ts": now})
            if event.user_id in sampled and index >= warmup:
                sent_at[event.user_id].append(now)
            producer.send(topic, key=event.user_id.encode(), value=stamped.to_bytes())
        producer.flush()
        send_seconds = time.monotonic() - started
        deadline = time.monotonic() + 30.0
        while any(sent_at.values()) and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.05)
    finally:
        stop.set()
        poller.join(timeout=10)
        producer.close()
    unseen = sum(len(pending) for pending in sent_at.values())
    ordered = sorted(latencies)
    return {
        "offered_rate": config.rate,
        "achieved_rate": (warmup + count) / send_seconds,  # the drain wait is not sending time
        "warmup_events": warmup,
        "drain_after_warmup_s": drain_s,
        "events": count,
        "sampled_users": len(sampled),
        "samples": len(ordered),
        "unseen_after_30s": unseen,
        "p50_ms": _percentile(ordered, 0.50) * 1000.0,
        "p99_ms": _percentile(ordered, 0.99) * 1000.0,
        "max_ms": (ordered[-1] if ordered else float("nan")) * 1000.0,
        "online_read_p50_ms": statistics.median(read_times) * 1000.0 if read_times else float("nan"),
        "method": "each event stamped with its send time; after warmup_events unmeasured ones, a poller reads "
        "last_active_ts of the sampled users from the Feast online store every ~5 ms; an event is visible once its "
        "user's last_active_ts reaches its stamp",
    }


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------------------------ stage costs


def _stage_costs(events: list[AnyEvent], feast_dir: Path) -> dict[str, Any]:
    """Per-event cost of each step the worker takes, on ``events``, measured in this process."""
    from perfusion.contracts.records import parse_event
    from perfusion.feature_store import FeaturePusher
    from streams.demand import DemandCounter
    from streams.grouping import GroupBuilder
    from streams.preferences import PreferenceUpdater, UserPreferenceState, feature_row
    from streams.settings import StreamSettings

    settings = StreamSettings(bootstrap_servers="unused:9")
    raws = [event.to_bytes() for event in events]
    now = time.time()
    per_event: dict[str, float] = {}

    def timed(name: str, action: Callable[[], object], count: int) -> None:
        started = time.perf_counter()
        action()
        per_event[name] = (time.perf_counter() - started) / count * 1e6

    parsed: list[AnyEvent] = []
    timed("parse_and_validate", lambda: parsed.extend(parse_event(raw, now=now) for raw in raws), len(raws))
    updater = PreferenceUpdater(settings)
    memory = _DictImpressionMemory()
    states: dict[str, bytes] = {}

    def preferences() -> None:
        for event in parsed:
            raw = states.get(event.user_id)
            state = UserPreferenceState(user_id=event.user_id) if raw is None else UserPreferenceState.from_bytes(raw)
            updater.apply(state, event, memory)
            states[event.user_id] = state.to_bytes()

    timed("preference_update_and_state_json", preferences, len(parsed))
    builder = GroupBuilder(settings.group, _JsonDictStore(), partition=0)
    timed("group_builder", lambda: [builder.process(event) for event in parsed], len(parsed))
    counter = DemandCounter(settings.demand, _JsonDictStore(), partition=0)
    timed("demand_counter", lambda: [counter.process(event) for event in parsed], len(parsed))
    rows = [feature_row(user, updater.features(UserPreferenceState.from_bytes(raw))) for user, raw in states.items()]
    pusher = FeaturePusher.open()
    started = time.perf_counter()
    pusher.push_user_preferences(rows)
    push_seconds = time.perf_counter() - started
    per_event["feast_push_one_row_per_user"] = push_seconds / len(parsed) * 1e6
    total = sum(per_event.values())
    return {
        "events": len(parsed),
        "users": len(rows),
        "per_event_us": {name: round(cost, 2) for name, cost in per_event.items()},
        "total_us": round(total, 2),
        "implied_events_per_s": 1e6 / total,
        "feast_push_rows": len(rows),
        "feast_push_ms": push_seconds * 1000.0,
        "note": "single-threaded Python work per event of one worker, without Kafka I/O or Faust overhead; the "
        "Feast push is one call for every user touched by these events (the worker pushes once per micro-batch)",
    }


class _DictImpressionMemory:
    def __init__(self) -> None:
        self._descriptors: dict[str, bytes] = {}

    def get(self, impression_id: str) -> dict[str, list[float]] | None:
        raw = self._descriptors.get(impression_id)
        return None if raw is None else json.loads(raw)

    def put(self, impression_id: str, descriptors: Any) -> None:
        self._descriptors[impression_id] = json.dumps(dict(descriptors)).encode()

    def forget(self, impression_id: str) -> None:
        self._descriptors.pop(impression_id, None)


class _JsonDictStore(dict[str, Any]):
    """A dict that pays the JSON encoding a changelog-backed table store pays on every write."""

    def __setitem__(self, key: str, value: Any) -> None:
        json.dumps(value, separators=(",", ":"))
        super().__setitem__(key, value)
