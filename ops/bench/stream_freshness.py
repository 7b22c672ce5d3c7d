"""Freshness for ``perfusion bench streams``: how long an event takes from its send to the Feast online store,
with the stream worker caught up and traffic offered at a steady rate."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ops.bench.stream_rates import wait_until_drained

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
) -> dict[str, Any]:
    """Send ``events`` to ``topic`` at ``rate`` events/s, each stamped with its send time; the first ``warmup`` are
    not measured, and the worker's group (``group_id``) is let drain after them. A poller reads ``last_active_ts``
    of up to ``sampled_users`` users from the Feast online store and records when each measured event of theirs
    became visible (in the store ``feature_store`` names: the worker's)."""
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
            time.sleep(0.005)

    poller = threading.Thread(target=poll, name="freshness-poller", daemon=True)
    poller.start()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=1, **kafka_python_kwargs(security))
    started = time.monotonic()
    drain_s = 0.0
    try:
        for index, event in enumerate(events):
            if index == warmup and warmup:
                # The warm-up's first events, stamped with the current time, closed every group the throughput
                # run left open: let the worker finish that burst before the measured traffic starts.
                producer.flush()
                drain_s = wait_until_drained(bootstrap, group_id, timeout_s, security)
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
    finally:
        stop.set()
        poller.join(timeout=10)
        producer.close()
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
        "method": "each event stamped with its send time; after warmup_events unmeasured ones, a poller reads "
        "last_active_ts of the sampled users from the Feast online store every ~5 ms; an event is visible once its "
        "user's last_active_ts reaches its stamp",
    }


def percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
