"""Recovery time of a restarted ``perfusion worker`` over a demand table of ``--keys`` order records.

Faust keeps the worker's tables in memory (``memory://``, :mod:`streams.app`) and rebuilds them at start-up by
replaying each table's changelog topic from its beginning; until that is done the worker processes nothing. This
benchmark measures how long that takes, what CPU it costs and what memory the restored worker holds, for a demand
table of a given size. One run per size, on the real broker (``KAFKA_BOOTSTRAP_SERVERS``, else the project's broker,
started when it is down), each with a fresh topic prefix and a Feast repo applied in a temporary folder:

1. the demand table's changelog (``<group id>-demand-changelog``, compacted, ``--partitions`` partitions) is filled
   with ``--keys`` order records over ``--designs`` designs, plus each design's key and each partition's watermark
   and source progress. The records are *produced directly*, in the table's own format: the state is made in this
   process by :class:`streams.demand.DemandCounter` itself (one per partition, over the same
   :class:`~streams.demand.DemandSettings` the worker reads, from synthetic DesignCreated and Order events stamped
   one to two days ago) and each key is sent to the changelog partition the worker would have logged it to, JSON
   encoded as :class:`streams.table_store.JsonTableStore` encodes it. Running a worker over a million events instead
   would take longer than the measurement itself on this machine (the worker folds about a thousand events per second
   here, ``perfusion bench streams``) and would leave the same keys: a compacted changelog holds one record per key;
2. a probe is produced to ``perfusion.events``: one order of a design whose restored state holds one net order
   below its threshold, and one DesignCreated of a clock design per source partition, stamped later, so that every
   source's progress passes the order. The worker fires the probe design only if it restored that state;
3. a real ``perfusion worker`` is started as ``perfusion bench streams`` starts it
   (:func:`harness.loop.loop_process`) and watched every :data:`POLL_S` s: its ``/readyz`` (200 once the consumer
   runs with its partitions and no table recovery is under way) and its ``/metrics`` (events finished, production
   orders acknowledged), with its CPU time and resident memory (:mod:`psutil`). The report gives the seconds from
   the process's start to its web server answering, to ready (tables restored), to its first event finished and to
   the probe's production order (the restored table used), and CPU seconds and RSS at each.

With ``--baseline`` (the default) a worker over an empty demand table is measured the same way first: what the
restore adds is the difference (``restore`` in the report). RocksDB: faust-streaming's ``rocksdb://`` store needs
``rocksdict`` or ``python-rocksdb``; neither is installed here (the report's ``store`` says which were found) and
the worker's store is ``memory://``, so only the memory store is measured.

    perfusion bench recovery --keys 10000 --out docs/bench/recovery-10k.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from perfusion.settings import Settings, add_flags, flag_overrides

if TYPE_CHECKING:
    from harness.loop import LoopPlace
    from streams.demand import DemandSettings

HELP = (
    "seconds, CPU and memory of a restarted stream worker restoring a demand table of N order records from its "
    "changelog until it fires a production order from the restored state"
)

ENV_PREFIX = "PERFUSION_BENCH_RECOVERY_"
POLL_S = 0.1
PROBE_DESIGN = "bench-recovery-probe"
FILL_DESIGN_PREFIX = "bench-recovery-design-"
FILL_THRESHOLD = 1_000_000  # the most a DesignCreated may ask; no filled design reaches it
FILL_END_AGO_S = 86_400.0  # the filled orders are stamped from two days to one day before the run
FILL_SPAN_S = 86_400.0
PROBE_ORDER_AGO_S = 300.0
ADVANCE_EVERY = 1000  # filled orders between two reports of every source's progress (keeps pending lists short)
CHANGELOG_SUFFIX = "-demand-changelog"


class RecoveryBenchSettings(Settings):
    """What ``perfusion bench recovery`` measures. Its variables have their own prefix
    (``PERFUSION_BENCH_RECOVERY_KEYS``); the worker's (``PERFUSION_DEMAND__RETURN_WINDOW_S``, ...) are passed on to
    the worker and the fill alike."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    keys: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="order records (one key each) in the demand table's changelog before the worker starts",
    )
    designs: int = Field(default=100, ge=1, le=100_000, description="designs the filled orders belong to")
    partitions: int = Field(default=4, ge=1, le=64, description="partitions of the events topic and the changelogs")
    baseline: bool = Field(
        default=True,
        description="first measure a worker over an empty demand table, so that the restore is told apart from the "
        "worker's own start-up (imports, Feast, joining the group)",
    )
    timeout_s: float = Field(default=1800.0, ge=10.0, le=14_400.0, description="give up on a phase after this many s")
    seed: int = Field(default=0, ge=0, description="seed of the filled orders' quantities")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, RecoveryBenchSettings)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_recovery_benchmark(RecoveryBenchSettings.from_env(**flag_overrides(args, RecoveryBenchSettings)))


def summary(report: dict[str, Any]) -> str:
    lines = []
    for name, measured in report["runs"].items():
        worker = measured["worker"]
        lines.append(
            f"{name} ({measured['order_records']:,} order records, {measured['changelog']['records']:,} changelog "
            f"records): ready {worker['ready_s']:.1f} s after start ({worker['web_up_to_ready_s']:.1f} s after its "
            f"web server), probe fired {worker['fired_s']:.1f} s; CPU "
            f"{worker['cpu_s']['at_fired']:.1f} s; RSS {worker['rss_mb']['settled']:.0f} MB"
        )
    restore = report.get("restore")
    if restore is not None:
        lines.append(
            f"the restore of {restore['order_records']:,} order records ({report['store']['used']}): "
            f"{restore['wall_s']:.1f} s and {restore['cpu_s']:.1f} s of CPU more to ready, then "
            f"{restore['ready_to_fired_s']:.1f} s to the probe's production order; {restore['cpu_to_fired_s']:.1f} s "
            f"of CPU and {restore['rss_mb']:.0f} MB of RSS more in all"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the run


def run_recovery_benchmark(settings: RecoveryBenchSettings) -> dict[str, Any]:
    from harness.loop import LoopPlace, process_environment, running_broker
    from perfusion.feature_store import FeatureStoreSettings, apply_feature_repo

    phases: dict[str, float] = {}
    started = time.monotonic()
    with (
        running_broker(keep_running=True) as bootstrap,
        tempfile.TemporaryDirectory(prefix="perfusion-bench-recovery-") as scratch,
    ):
        feast_dir = Path(scratch) / "feast"
        with process_environment({"FEAST_USAGE": os.environ.get("FEAST_USAGE", "False")}):
            apply_feature_repo(FeatureStoreSettings.from_env(feast_dir=feast_dir))
        phases["broker_and_feast"] = round(time.monotonic() - started, 2)
        runs: dict[str, dict[str, Any]] = {}
        for name, keys in ([("empty", 0)] if settings.baseline else []) + [("filled", settings.keys)]:
            prefix = f"bench-recovery-{uuid.uuid4().hex[:8]}."
            place = LoopPlace(bootstrap, state_dir=Path(scratch) / name, topic_prefix=prefix, feast_dir=feast_dir)
            runs[name] = _one_run(place, settings, keys, Path(scratch))
            phases[name] = round(sum(runs[name]["phase_seconds"].values()), 2)
    phases["total"] = round(time.monotonic() - started, 2)
    return _report(settings, runs, phases)


def _one_run(place: LoopPlace, settings: RecoveryBenchSettings, keys: int, scratch: Path) -> dict[str, Any]:
    """Fill one demand changelog with ``keys`` order records, produce the probe, start a worker and watch it."""
    from harness.loop import cli_arguments, loop_process
    from ops.bench.stream_rates import free_port
    from perfusion.contracts.topics import TopicNames, ensure_topics

    phases: dict[str, float] = {}
    clock = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = round(now - clock[0], 2)
        clock[0] = now

    stream_settings = _worker_settings(place, settings)
    demand: DemandSettings = stream_settings.demand
    names = TopicNames.for_prefix(place.topic_prefix)
    ensure_topics(place.bootstrap, names, settings.partitions)
    now = time.time()
    store = fill_demand_state(keys, settings.designs, settings.partitions, demand, now, settings.seed)
    phase("fill_state")
    records = changelog_records(store)
    design_keys = sum(1 for key in store if key.startswith("d:"))
    changelog = stream_settings.group_id + CHANGELOG_SUFFIX
    _create_compacted_topic(place.bootstrap, changelog, settings.partitions)
    changelog_bytes = _produce(place.bootstrap, changelog, records)
    del store
    phase("produce_changelog")
    _produce(place.bootstrap, names.events, probe_events(settings.partitions, now, with_design=keys == 0))
    port = free_port()
    arguments = cli_arguments("worker", f"--partitions={settings.partitions}", f"--http-port={port}",
                              "--loglevel=warning")  # fmt: skip
    place.state_dir.mkdir(parents=True, exist_ok=True)
    with loop_process(place, "worker", arguments, log_dir=place.state_dir) as supervised:
        worker = watch_start(supervised.process, port, settings.timeout_s)
        phase("worker")
    fired = _read_production_orders(place.bootstrap, names.production_orders)
    phase("read_outputs")
    return {
        "order_records": keys,
        "design_keys": design_keys,
        "changelog": {"topic": changelog, "records": len(records), "bytes": changelog_bytes},
        "worker": worker,
        "probe_production_orders": fired,
        # Filled: the probe design's restored net order and the probe's make 2; empty: its DesignCreated is probed.
        "restored_state_used": [order["net_orders"] for order in fired] == [2 if keys else 1],
        "phase_seconds": phases,
    }


def _worker_settings(place: LoopPlace, settings: RecoveryBenchSettings) -> Any:
    """The worker's settings as it reads them: this process's environment, which it inherits, and its flags."""
    from streams.settings import StreamSettings

    return StreamSettings.from_env(
        bootstrap_servers=place.bootstrap, topic_prefix=place.topic_prefix, partitions=settings.partitions
    )


# ------------------------------------------------------------------------------------------------ the fill


def by_design_partition(design_id: str, partitions: int) -> int:
    """The partition of the by-design topic a design's events are routed to (the producer's murmur2 of the key)."""
    return _source_of(design_id, partitions)


def fill_demand_state(
    keys: int, designs: int, partitions: int, demand: DemandSettings, now: float, seed: int
) -> dict[str, Any]:
    """The demand table's state after ``keys`` orders: ``keys - 1`` over ``designs`` designs that never fire and
    one of the probe design (threshold 2), folded by one routed :class:`~streams.demand.DemandCounter` per partition
    and published, as a worker that had run over them would have left it. Empty for ``keys`` 0."""
    import random

    from perfusion.contracts.records import DesignCreated, Order
    from streams.demand import DemandCounter, demand_updates, mark_published

    store: dict[str, Any] = {}
    if keys == 0:
        return store
    counters = [
        DemandCounter(demand, store, partition, source_partitions=partitions, clock=lambda: 0.0)
        for partition in range(partitions)
    ]
    start_ts = now - FILL_END_AGO_S - FILL_SPAN_S
    rng = random.Random(seed)

    partition_of: dict[str, int] = {}

    def fold(design_id: str, event: DesignCreated | Order) -> None:
        if design_id not in partition_of:
            partition_of[design_id] = by_design_partition(design_id, partitions)
        counters[partition_of[design_id]].process(event)

    def advance(ts: float) -> None:
        for counter in counters:
            for source in range(partitions):
                counter.observe_source(source, ts)

    design_ids = [f"{FILL_DESIGN_PREFIX}{index}" for index in range(designs)]
    for design_id, threshold in [*((design_id, FILL_THRESHOLD) for design_id in design_ids), (PROBE_DESIGN, 2)]:
        fold(design_id, DesignCreated(event_id=f"create-{design_id}", ts=start_ts, user_id="bench-merchant",
                                      design_id=design_id, prompt="a shirt", order_threshold=threshold))  # fmt: skip
    for index in range(keys):
        design_id = PROBE_DESIGN if index == keys - 1 else design_ids[index % designs]
        ts = start_ts + 1.0 + index * FILL_SPAN_S / keys
        fold(design_id, Order(event_id=f"bench-order-{index}", ts=ts, user_id=f"bench-user-{index % 1000}",
                              impression_id=f"bench-impression-{index}", design_id=design_id, image_id="bench-image",
                              quantity=1 if design_id == PROBE_DESIGN else rng.randint(1, 3)))  # fmt: skip
        if index % ADVANCE_EVERY == ADVANCE_EVERY - 1:
            advance(ts)
    advance(now - FILL_END_AGO_S + demand.allowed_lateness_s + 1.0)  # every filled event applied
    for counter in counters:
        mark_published(store, demand_updates(store, counter.take_touched(), demand))
    return store


def changelog_records(store: dict[str, Any]) -> list[tuple[int, bytes, bytes]]:
    """(changelog partition, key, value) of every key of a demand state, encoded as the worker's table store
    encodes them (:class:`streams.table_store.JsonTableStore`) and on the partition it logs them to: a design's
    its ``p``, an order record's the partition its key names, a watermark's and a source progress's their own."""
    records = []
    for key, value in store.items():
        kind, rest = key.split(":", 1)
        partition = value["p"] if kind == "d" else int(rest.split(":", 1)[0])
        records.append((partition, key.encode(), json.dumps(value, separators=(",", ":")).encode()))
    return records


def probe_events(partitions: int, now: float, with_design: bool) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) of the probe: the probe design's second order (with ``with_design``, over an empty
    table, first its DesignCreated, threshold 1), then a clock DesignCreated on every source partition, stamped
    ``PROBE_ORDER_AGO_S`` later, which moves every source's progress past the order."""
    from perfusion.contracts.records import DesignCreated, Order

    def user_on(partition: int) -> str:
        index = 0
        while _source_of(f"bench-clock-user-{index}", partitions) != partition:
            index += 1
        return f"bench-clock-user-{index}"

    probe = Order(
        event_id="bench-probe-order",
        ts=now - PROBE_ORDER_AGO_S,
        user_id=user_on(0),
        impression_id="bench-probe-impression",
        design_id=PROBE_DESIGN,
        image_id="bench-image",
        quantity=1,
    )
    clocks = [
        DesignCreated(event_id=f"bench-clock-{partition}", ts=now, user_id=user_on(partition),
                      design_id=f"bench-clock-{partition}", prompt="clock", order_threshold=FILL_THRESHOLD)
        for partition in range(partitions)
    ]  # fmt: skip
    created = DesignCreated(event_id=f"create-{PROBE_DESIGN}", ts=probe.ts - 1.0, user_id=user_on(0),
                            design_id=PROBE_DESIGN, prompt="a shirt", order_threshold=1)  # fmt: skip
    events = [created, probe, *clocks] if with_design else [probe, *clocks]
    return [(_source_of(event.user_id, partitions), event.user_id.encode(), event.to_bytes()) for event in events]


def _source_of(key: str, partitions: int) -> int:
    """The partition the producer's default partitioner (murmur2) gives ``key``."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def _create_compacted_topic(bootstrap: str, name: str, partitions: int) -> None:
    """The changelog topic as Faust creates it (compacted, the table's partitions), before anything is logged."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="perfusion-bench-recovery")
    try:
        admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs={"cleanup.policy": "compact"})], validate_only=False
        )
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes, bytes]]) -> int:
    """Send every (partition, key, value), all acknowledged by the broker; returns the bytes of keys and values."""
    from kafka import KafkaProducer

    from perfusion.errors import InfrastructureError

    failures: list[BaseException] = []
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20,
                             max_request_size=8 << 20)  # fmt: skip
    try:
        for partition, key, value in records:
            producer.send(topic, key=key, value=value, partition=partition).add_errback(failures.append)
        producer.flush()
    finally:
        producer.close()
    if failures:
        raise InfrastructureError(f"{len(failures)} of {len(records)} records to {topic} failed: {failures[0]}")
    return sum(len(key) + len(value) for _, key, value in records)


# ------------------------------------------------------------------------------------------------ the watch


def _get(url: str) -> tuple[int, bytes] | None:
    """(status, body) of a GET, None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, OSError):
        return None


def _metric(text: str, name: str) -> float:
    """A counter's value summed over its labels, from the Prometheus text format."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def watch_start(popen: Any, port: int, timeout_s: float) -> dict[str, Any]:
    """Seconds from the process's start (this call) to its web server answering, to ready, to its first event
    finished and to its first production order acknowledged; its CPU seconds and RSS at each; RSS again a second
    after the production order (``settled``)."""
    import psutil

    from perfusion.errors import InfrastructureError

    process = psutil.Process(popen.pid)
    started = time.monotonic()
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    rss: dict[str, float] = {}

    def mark(name: str) -> None:
        if name in marks:
            return
        marks[name] = round(time.monotonic() - started, 3)
        times = process.cpu_times()
        cpu[f"at_{name}"] = round(times.user + times.system, 3)
        rss[f"at_{name}"] = round(process.memory_info().rss / 2**20, 1)

    base = f"http://127.0.0.1:{port}"
    while "fired" not in marks:
        if popen.poll() is not None:
            raise InfrastructureError(f"the worker exited with {popen.returncode} while starting")
        if time.monotonic() - started > timeout_s:
            raise InfrastructureError(f"the worker did not fire the probe within {timeout_s} s (marks: {marks})")
        ready = _get(base + "/readyz")
        if ready is not None:
            mark("web_up")
            if ready[0] == 200:
                mark("ready")
        if "ready" in marks:
            answer = _get(base + "/metrics")
            text = answer[1].decode() if answer is not None else ""
            if _metric(text, "perfusion_worker_events_total") >= 1:
                mark("first_event")
            if _metric(text, "perfusion_worker_production_orders_total") >= 1:
                mark("first_event")
                mark("fired")
        time.sleep(POLL_S)
    time.sleep(1.0)
    rss["settled"] = round(process.memory_info().rss / 2**20, 1)
    return {
        **{f"{name}_s": seconds for name, seconds in marks.items()},
        # The tables are restored between these two marks: the web server starts before the consumer.
        "web_up_to_ready_s": round(marks["ready"] - marks["web_up"], 3),
        "web_up_to_ready_cpu_s": round(cpu["at_ready"] - cpu["at_web_up"], 3),
        "cpu_s": cpu,
        "rss_mb": rss,
        "method": f"/readyz and /metrics polled every {POLL_S} s from the process's start; CPU: user + system time "
        "of the process; RSS: its resident set",
    }


def _read_production_orders(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000)  # fmt: skip
    try:
        return [json.loads(record.value) for record in consumer]
    finally:
        consumer.close()


# ------------------------------------------------------------------------------------------------ the report


def store_backends() -> dict[str, Any]:
    """The table store the worker uses, and whether the packages faust-streaming's RocksDB store needs are here."""
    found = {name: importlib.util.find_spec(name) is not None for name in ("rocksdict", "rocksdb")}
    return {
        "used": "memory://",
        "rocksdb_packages": found,
        "rocksdb": "not measured: " + ("the worker's store is memory:// (streams/app.py)" if any(found.values())
                                       else "neither rocksdict nor python-rocksdb is installed"),
    }  # fmt: skip


def _report(
    settings: RecoveryBenchSettings, runs: dict[str, dict[str, Any]], phases: dict[str, float]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "recovery",
        "config": settings.model_dump(mode="json"),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
        "store": store_backends(),
        "fill_method": "changelog records produced directly in the table's format: the state made in process by "
        "streams.demand.DemandCounter from synthetic DesignCreated and Order events, each key sent to the changelog "
        "partition the worker logs it to (a compacted changelog holds one record per key, as a worker would leave)",
        "runs": runs,
        "phase_seconds": phases,
    }
    if "empty" in runs:
        empty, filled = runs["empty"]["worker"], runs["filled"]["worker"]
        report["restore"] = {
            "order_records": settings.keys,
            "wall_s": round(filled["web_up_to_ready_s"] - empty["web_up_to_ready_s"], 3),
            "cpu_s": round(filled["web_up_to_ready_cpu_s"] - empty["web_up_to_ready_cpu_s"], 3),
            "ready_to_fired_s": round(filled["fired_s"] - filled["ready_s"], 3),
            "cpu_to_fired_s": round(filled["cpu_s"]["at_fired"] - empty["cpu_s"]["at_fired"], 3),
            "rss_mb": round(filled["rss_mb"]["settled"] - empty["rss_mb"]["settled"], 1),
            "note": "filled run less the empty one: wall_s and cpu_s of the span from the web server's start to "
            "ready, in which Faust replays the changelogs (the span from the process's start varies with the "
            "machine's load by more than the restore of small tables); ready_to_fired_s: from ready to the probe's "
            "production order in the filled run (the counters' first use, which indexes each partition's records, "
            "the routing and the watermark); cpu_to_fired_s: CPU from the process's start to that order, less the "
            "empty run's; rss_mb: RSS a second after it, less the empty run's",
        }
    return report


def extrapolated_report(measured: list[dict[str, Any]], keys: int) -> dict[str, Any]:
    """What the restore of ``keys`` order records extrapolates to from measured reports of fewer (a line through
    the two largest measured sizes, per figure of ``restore``); marked as not measured."""
    points = sorted((report for report in measured if "restore" in report), key=lambda r: r["config"]["keys"])[-2:]
    if len(points) < 2:
        raise ValueError("extrapolating needs two reports of different sizes, each with a baseline")
    (small, large) = (point["restore"] for point in points)
    if small["order_records"] == large["order_records"]:
        raise ValueError(f"both reports measure {small['order_records']} order records")
    span = large["order_records"] - small["order_records"]
    figures = ("wall_s", "cpu_s", "ready_to_fired_s", "cpu_to_fired_s", "rss_mb")
    return {
        "benchmark": "recovery",
        "measured": False,
        "extrapolated_to_order_records": keys,
        "extrapolated_from": {point["config"]["keys"]: point["restore"] for point in points},
        "restore": {
            name: round(large[name] + (large[name] - small[name]) * (keys - large["order_records"]) / span, 1)
            for name in figures
        },
        "per_1000_order_records": {name: round((large[name] - small[name]) / span * 1000, 4) for name in figures},
        "store": points[-1]["store"],
        "note": "NOT MEASURED: a straight line through the restore figures of the two measured sizes (filled run "
        "less the empty one), extended to this size; Faust's replay is one pass over the changelog records, so "
        "time and CPU grow about linearly with them, and the memory with the keys held",
    }
