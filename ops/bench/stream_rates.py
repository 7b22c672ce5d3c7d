"""The rates ``perfusion bench streams`` measures on a pre-filled topic: a raw aiokafka consumer's, and a Faust
process's (the stream worker or the bare Faust agent) from its own count of finished events, with its CPU time.

Both Faust processes are timed the same way: ``perfusion_worker_events_total`` (every outcome) read from the
process's ``/metrics`` every :data:`POLL_S` seconds, from the first reading past 10% of the events to the reading
that reaches all of them, so start-up (imports, joining the group, table recovery) is left out; the CPU time of
the process and its children (all threads, :mod:`psutil`; the worker's Feast writer is a child process) over the
same span gives CPU microseconds per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from perfusion.errors import InfrastructureError

if TYPE_CHECKING:
    from perfusion.settings import KafkaSecuritySettings

POLL_S = 0.1
"""Seconds between two readings of a process's finished events (each reading is one scrape of its /metrics)."""
FINISHED_EVENTS_METRIC = "perfusion_worker_events_total"


async def raw_consumer_rate(
    bootstrap: str,
    topic: str,
    partitions: int,
    expected: int,
    timeout_s: float,
    security: KafkaSecuritySettings | None = None,
) -> dict[str, Any]:
    """A raw aiokafka consumer reading ``topic`` from the beginning: events/s from its first to its last batch."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from perfusion.kafka_security import aiokafka_kwargs

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, **aiokafka_kwargs(security)
    )
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
    return {
        "events": received,
        "seconds": elapsed,
        "events_per_s": received / elapsed,
        "method": "one aiokafka consumer assigned every partition, from the beginning, getmany of up to 10,000 "
        "records, no deserialisation: events/s from its first to its last batch",
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process's /metrics)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metrics_page(metrics_url: str, samples: Sequence[str]) -> str | None:
    """A process's ``/metrics`` restricted to ``samples`` (``?name[]=``: the process renders only those); None while
    it does not answer (not started yet)."""
    query = urllib.parse.urlencode([("name[]", sample) for sample in samples])
    try:
        with urllib.request.urlopen(f"{metrics_url}?{query}", timeout=2.0) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def finished_events(metrics_url: str) -> int | None:
    """The events a Faust process finished, summed over outcomes, from its /metrics; None while it does not answer
    (not started yet)."""
    # Only the one counter: both processes render the same few lines per poll, not every histogram.
    text = metrics_page(metrics_url, [FINISHED_EVENTS_METRIC])
    if text is None:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(FINISHED_EVENTS_METRIC + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return round(total)


def _cpu_seconds(process: Any) -> tuple[float, float]:
    """User + system CPU seconds of ``process`` itself and of its live children (the worker's Feast writer
    process)."""
    import psutil

    own = children = 0.0
    for member in (process, *process.children(recursive=True)):
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:  # a child that ended between the listing and the reading
            continue
        if member.pid == process.pid:
            own += times.user + times.system
        else:
            children += times.user + times.system
    return own, children


def process_rate(
    name: str, popen: subprocess.Popen[bytes], metrics_url: str, expected: int, timeout_s: float
) -> dict[str, Any]:
    """Events/s and CPU per event of the Faust process ``popen`` on ``expected`` pre-filled events (module
    docstring), ``name`` saying which process in errors."""
    import psutil

    process = psutil.Process(popen.pid)
    first: tuple[float, int, tuple[float, float]] | None = None
    previous = (time.perf_counter(), 0, _cpu_seconds(process))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise InfrastructureError(f"the {name} exited with {popen.returncode} while consuming")
        finished = finished_events(metrics_url) or 0
        now, cpu = time.perf_counter(), _cpu_seconds(process)
        if first is None and finished >= expected:
            first = previous  # one reading covered every event: time it from the reading before (a coarse rate)
        elif first is None and finished >= expected // 10:
            first = (now, finished, cpu)
        previous = (now, finished, cpu)
        if finished >= expected:
            assert first is not None
            events, seconds = finished - first[1], now - first[0]
            own_seconds, children_seconds = cpu[0] - first[2][0], cpu[1] - first[2][1]
            cpu_seconds = own_seconds + children_seconds
            return {
                "events": events,
                "seconds": seconds,
                # None when one reading covered everything after the 10% mark: too few events to time.
                "events_per_s": events / seconds if seconds > 0 and events > 0 else None,
                # CPU time of the process (all threads) over the same span: what the rate would be with a core
                # to itself, on a machine whose other load slows the wall-clock rate.
                "cpu_seconds": cpu_seconds,
                "cpu_us_per_event": cpu_seconds / events * 1e6 if events > 0 else None,
                # The process alone, and its children (the worker's Feast writer), which run on another core:
                # the process alone is what bounds the rate once it has a core to itself.
                "cpu_us_per_event_process": own_seconds / events * 1e6 if events > 0 else None,
                "cpu_us_per_event_children": children_seconds / events * 1e6 if events > 0 else None,
                "method": f"{FINISHED_EVENTS_METRIC} of the process read from its /metrics every {POLL_S} s, from "
                "the first reading past 10% of the events to the reading that reaches all of them (start-up "
                "excluded; resolution: one micro-batch and the poll); CPU: the process's user + system time over "
                "the same span",
            }
        time.sleep(POLL_S)
    raise InfrastructureError(f"the {name} did not finish {expected} events within {timeout_s} s")


# ------------------------------------------------------------------------------------------------ consumer lag


def group_lag(admin: Any, consumer: Any, group_id: str) -> int:
    """Messages behind the end of every topic-partition the group has committed offsets for (its inputs and its
    internal topics alike); -1 before it committed anything."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    try:
        offsets = admin.list_group_offsets(group_id).get(group_id, {})
    except KafkaError:  # the group's coordinator is not there before the worker joined
        return -1
    if not offsets:
        return -1
    committed = {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    for topic in {topic for topic, _ in committed}:
        consumer.partitions_for_topic(topic)  # this consumer subscribes to nothing: fetch the topics' metadata
    try:
        ends = consumer.end_offsets([TopicPartition(topic, partition) for topic, partition in committed])
    except (KafkaError, KeyError):  # metadata of a topic the worker just created is not there yet
        return -1
    return sum(max(0, ends[TopicPartition(*key)] - offset) for key, offset in committed.items())


def wait_until_drained(
    bootstrap: str, group_id: str, timeout_s: float, security: KafkaSecuritySettings | None = None
) -> float:
    """Seconds until the group has no lag left on any of its topics (at most ``timeout_s``)."""
    from kafka import KafkaConsumer
    from kafka.admin import KafkaAdminClient

    from perfusion.kafka_security import kafka_python_kwargs

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **kafka_python_kwargs(security))
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **kafka_python_kwargs(security)
    )
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s:
            if group_lag(admin, consumer, group_id) == 0:
                break
            time.sleep(0.5)
        return time.monotonic() - started
    finally:
        consumer.close()
        admin.close()
