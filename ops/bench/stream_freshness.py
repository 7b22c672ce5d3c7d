"""Freshness for ``perfusion bench streams``: how long an event takes from its send to the Feast online store,
with the stream worker caught up and traffic offered at a steady rate."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ops.bench.stream_rates import metrics_page, wait_until_drained

if TYPE_CHECKING:
    from perfusion.contracts.records import AnyEvent
    from perfusion.feature_store import FeatureStoreSettings
    from perfusion.settings import KafkaSecuritySettings


def freshness(
    bootstrap: str,
    topic: str,
    group_id: str,
    events: Sequence[AnyEvent],
    rate: float,
    warmup: int,
    sampled_users: int,
    timeout_s: float,
    worker: subprocess.Popen[bytes],
    feature_store: FeatureStoreSettings,
    security: KafkaSecuritySettings | None = None,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """Send ``events`` to ``topic`` at ``rate`` events/s, each stamped with its send time; the first ``warmup`` are
    not measured, and the worker's group (``group_id``) is let drain after them. A poller reads ``last_active_ts``
    of up to ``sampled_users`` users from the Feast online store and records when each measured event of theirs
    became visible (in the store ``feature_store`` names: the worker's). With the worker's ``metrics_url``, the
    report also splits the measured phase's micro-batches (:func:`worker_batches`): how old each batch was when the
    worker finished it, the worker's own part of the freshness."""
    from kafka import KafkaProducer

    from perfusion.feature_store import open_feature_store
    from perfusion.kafka_security import kafka_python_kwargs

    count = len(events) - warmup
    users = sorted({event.user_id for event in events})
    sampled = set(users[:: max(1, len(users) // sampled_users)][:sampled_users])
    sent_at: dict[str, list[float]] = {user: [] for user in sampled}
    latencies: list[float] = []
    store = open_feature_store(feature_store)
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
            # Reads start every POLL_INTERVAL_S: back to back (a ~13 ms read every 5 ms) the poller took close to a
            # core from the worker it measures; the interval bounds what it adds to a latency.
            time.sleep(max(0.0, POLL_INTERVAL_S - (time.perf_counter() - started)))

    poller = threading.Thread(target=poll, name="freshness-poller", daemon=True)
    poller.start()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=1, **kafka_python_kwargs(security))
    started = time.monotonic()
    drain_s = 0.0
    # Read after the drain (below), or now when there is no warm-up to drain.
    batches_before = read_histograms(metrics_url, BATCH_HISTOGRAMS) if metrics_url and not warmup else None
    batches_after: Histograms | None = None
    try:
        for index, event in enumerate(events):
            if index == warmup and warmup:
                # The warm-up's first events, stamped with the current time, closed every group the throughput
                # run left open: let the worker finish that burst before the measured traffic starts.
                producer.flush()
                drain_s = wait_until_drained(bootstrap, group_id, timeout_s, security)
                batches_before = read_histograms(metrics_url, BATCH_HISTOGRAMS) if metrics_url else None
                started = time.monotonic() - index / rate
            ahead = index / rate - (time.monotonic() - started)
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
        batches_after = read_histograms(metrics_url, BATCH_HISTOGRAMS) if metrics_url else None
    finally:
        stop.set()
        poller.join(timeout=10)
        producer.close()
    batches = None if batches_before is None or batches_after is None else worker_batches(batches_before, batches_after)
    unseen = sum(len(pending) for pending in sent_at.values())
    ordered = sorted(latencies)
    return {
        "offered_rate": rate,
        "achieved_rate": len(events) / send_seconds,  # the drain wait is not sending time
        "warmup_events": warmup,
        "drain_after_warmup_s": drain_s,
        "events": count,
        "sampled_users": len(sampled),
        "samples": len(ordered),
        "unseen_after_30s": unseen,
        "p50_ms": percentile(ordered, 0.50) * 1000.0,
        "p99_ms": percentile(ordered, 0.99) * 1000.0,
        "max_ms": (ordered[-1] if ordered else float("nan")) * 1000.0,
        "online_read_p50_ms": statistics.median(read_times) * 1000.0 if read_times else float("nan"),
        "poll_interval_ms": POLL_INTERVAL_S * 1000.0,
        "worker_batches": batches,
        "method": "each event stamped with its send time; after warmup_events unmeasured ones, a poller reads "
        f"last_active_ts of the sampled users from the Feast online store every {POLL_INTERVAL_S * 1000:.0f} ms (a "
        "latency is late by at most that and one read); an event is visible once its "
        "user's last_active_ts reaches its stamp",
    }


POLL_INTERVAL_S = 0.05
"""Seconds between the starts of two online reads of the freshness poller."""
BATCH_AGE = "perfusion_worker_batch_age_seconds"
BATCH_EVENTS = "perfusion_worker_batch_events"
BATCH_HISTOGRAMS = (BATCH_AGE, BATCH_EVENTS)
Histograms = dict[str, dict[str, float]]
"""Histogram name -> {"count": n, "sum": s, "le=<bound>": cumulative count of each bucket}."""


def read_histograms(metrics_url: str, names: Sequence[str]) -> Histograms | None:
    """The buckets, count and sum of each histogram ``names`` lists, from a process's ``/metrics`` (None while it
    does not answer)."""
    text = metrics_page(metrics_url, [f"{name}_{part}" for name in names for part in ("bucket", "count", "sum")])
    return None if text is None else parse_histograms(text, names)


def parse_histograms(text: str, names: Sequence[str]) -> Histograms:
    """:func:`read_histograms` of a Prometheus text page."""
    histograms: Histograms = {name: {} for name in names}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        sample, value = line.rsplit(" ", 1)
        for name in names:
            if sample.startswith(name + "_bucket{"):
                bound = sample.split('le="', 1)[1].split('"', 1)[0]
                histograms[name][f"le={bound}"] = float(value)
            elif sample in (f"{name}_count", f"{name}_sum"):
                histograms[name][sample.removeprefix(name + "_")] = float(value)
    return histograms


def worker_batches(before: Histograms, after: Histograms) -> dict[str, Any]:
    """The micro-batches the worker finished between two readings: how many, their mean size, their mean age when
    finished, and the p50 and p99 of that age as the upper bound of the bucket that holds them (seconds)."""
    age = _delta(before.get(BATCH_AGE, {}), after.get(BATCH_AGE, {}))
    size = _delta(before.get(BATCH_EVENTS, {}), after.get(BATCH_EVENTS, {}))
    batches = age.get("count", 0.0)
    return {
        "batches": round(batches),
        "events_per_batch_mean": size["sum"] / size["count"] if size.get("count") else None,
        "age_mean_s": age["sum"] / batches if batches else None,
        "age_p50_s_at_most": bucket_quantile(age, 0.50),
        "age_p99_s_at_most": bucket_quantile(age, 0.99),
        "method": f"{BATCH_AGE} and {BATCH_EVENTS} of the worker's /metrics read after the drain and at the end of "
        "the measured traffic, differenced; a batch's age runs from its oldest message's Kafka timestamp to every "
        "effect of the batch done (features in Feast)",
    }


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def bucket_quantile(histogram: dict[str, float], fraction: float) -> float | None:
    """The upper bound of the first bucket whose cumulative count reaches ``fraction`` of all; None when empty or
    when only the +Inf bucket does."""
    total = histogram.get("count", 0.0)
    if total <= 0:
        return None
    bounds = sorted((float(key[3:]), count) for key, count in histogram.items() if key.startswith("le="))
    for bound, count in bounds:
        if count >= fraction * total:
            return None if bound == float("inf") else bound
    return None


def percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
