"""``perfusion broker install|up|down|status``: the project's local Kafka broker (KRaft, one JVM process)."""

from __future__ import annotations

import argparse
import time
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="install, start, stop or inspect the local Kafka broker",
        description="The project's single-node Apache Kafka broker in KRaft mode, run as a local JVM process. "
        "State and logs live under $PERFUSION_STATE_DIR/kafka; jars are cached under $PERFUSION_CACHE_DIR.",
    )
    actions = parser.add_subparsers(dest="broker_action", metavar="ACTION", required=True)
    install = actions.add_parser("install", help="resolve the broker's jars from Maven Central into the cache")
    up = actions.add_parser("up", help="start the broker in the background and wait until it answers")
    down = actions.add_parser("down", help="stop the broker this project started")
    actions.add_parser("status", help="print running/stopped, pid and bootstrap address (exit 3 when stopped)")
    for action_parser in (install, up):
        action_parser.add_argument("--version", default=None, help="Apache Kafka release (default: the tested one)")
    up.add_argument("--port", type=int, default=0, help="client (PLAINTEXT) port; 0 reuses the last or picks one")
    up.add_argument("--heap", default="512m", help="JVM maximum heap, e.g. 512m or 1g")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the broker to answer")
    down.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.infra.kafka_broker import KafkaBroker, KafkaBrokerConfig

    config = KafkaBrokerConfig()
    if getattr(args, "version", None):
        config = config.with_overrides(version=args.version)
    action = args.broker_action
    if action == "install":
        started = time.monotonic()
        libs = KafkaBroker(config).install()
        print(f"Apache Kafka {config.version} installed in {libs.parent} ({time.monotonic() - started:.1f} s)")
        return 0
    if action == "up":
        config = config.with_overrides(port=args.port, heap=args.heap, start_timeout_s=args.timeout)
        broker = KafkaBroker(config)
        before = broker.status()
        if before.running:
            print(f"already running: pid {before.pid}, bootstrap {before.address}")
            return 0
        started = time.monotonic()
        after = broker.start()
        print(f"Kafka {config.version} up: pid {after.pid}, bootstrap {after.address}")
        print(f"answered after {time.monotonic() - started:.1f} s; logs in {broker.state_dir}")
        return 0
    broker = KafkaBroker(config)
    if action == "down":
        pid = broker.status().pid
        if broker.stop(grace_s=args.grace):
            print(f"stopped the Kafka broker (pid {pid})")
        else:
            print("the Kafka broker was not running")
        return 0
    current = broker.status()
    print(current.describe())
    return 0 if current.running else 3
