"""``perfusion demo``: the loop on this machine, end to end, with visible output.

Starts the project's Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS points elsewhere), applies the Feast repo, starts
the stream worker as a subprocess, sends simulated events for a handful of users, waits until their features are
in Feast's online store, prints them, and stops what it started (also on Ctrl-C and on errors).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the loop on this machine and print each simulated user's features",
        description="Broker, Feast repo, stream worker, a few hundred simulated events, features read back from "
        "Feast's online store; everything started here is stopped at the end.",
    )
    parser.add_argument("--events", type=int, default=400, help="simulated events to send")
    parser.add_argument("--shoppers", type=int, default=5, help="simulated shoppers")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the features to arrive")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from perfusion.commands.features import format_feature_table
    from perfusion.errors import ConfigError, InfrastructureError
    from perfusion.paths import state_dir
    from simulator.traffic import TrafficConfig, TrafficSimulator, encode, produce_events
    from streams.feature_push import apply_feature_repo, open_feature_store, read_online_features
    from streams.settings import StreamSettings
    from streams.topics import TopicNames, ensure_topics

    if args.events < 1 or args.shoppers < 1:
        raise ConfigError(f"--events and --shoppers must be at least 1, got {args.events} and {args.shoppers}")
    with _broker() as bootstrap:
        settings = StreamSettings.from_env(bootstrap_servers=bootstrap)
        _step(f"Kafka at {bootstrap}")
        summary = apply_feature_repo()
        _step(f"Feast repo applied: {', '.join(summary.feature_views)} ({summary.online_store} online store)")
        names = TopicNames.for_prefix(settings.topic_prefix)
        ensure_topics(bootstrap, names, settings.partitions)
        log_path = state_dir() / "worker" / "demo-worker.log"
        with _worker(bootstrap, log_path) as worker:
            _step(f"stream worker started (pid {worker.pid}, log {log_path})")
            simulator = TrafficSimulator(
                TrafficConfig(seed=args.seed, shoppers=args.shoppers, start_ts=time.time() - 2 * 3600, mean_gap_s=20)
            )
            events = simulator.events(args.events)
            produce_events((encode(event) for event in events), bootstrap, names.events)
            latest: dict[str, float] = {}
            for event in events:
                latest[event.user_id] = max(latest.get(event.user_id, 0.0), event.ts)
            _step(f"sent {len(events)} simulated events for {len(latest)} users; waiting for their features")
            store = open_feature_store()
            deadline = time.monotonic() + args.wait
            while True:
                if worker.poll() is not None:
                    raise InfrastructureError(f"the stream worker exited with {worker.returncode}; see {log_path}")
                rows = read_online_features(store, "user_preferences", sorted(latest))
                if all((row["last_active_ts"] or 0.0) >= latest[row["user_id"]] - 1e-3 for row in rows):
                    break
                if time.monotonic() > deadline:
                    raise InfrastructureError(f"features did not arrive within {args.wait:.0f} s; see {log_path}")
                time.sleep(1.0)
            _step("features read back from Feast's online store:")
            print(format_feature_table(rows))
    return 0


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


@contextlib.contextmanager
def _broker() -> Iterator[str]:
    """The broker's address; starts the project's broker when none is configured, and stops it afterwards."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if configured:
        yield configured
        return
    from perfusion.infra.kafka_broker import KafkaBroker

    broker = KafkaBroker()
    was_running = broker.status().running
    started = time.monotonic()
    address = broker.start().address
    if address is None:
        from perfusion.errors import InfrastructureError

        raise InfrastructureError(f"the Kafka broker in {broker.state_dir} started without an address")
    if not was_running:
        _step(f"started Kafka in {time.monotonic() - started:.1f} s")
    try:
        yield address
    finally:
        if not was_running:
            broker.stop()
            _step("stopped Kafka")


@contextlib.contextmanager
def _worker(bootstrap: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    with log_path.open("ab") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "perfusion", "worker"], env=env, stdout=log_file, stderr=log_file
        )
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        _step("stopped the stream worker")
