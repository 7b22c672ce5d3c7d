"""``perfusion worker``: the Faust stream worker with every agent of ``streams.agents.AGENT_MODULES``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run the stream worker (all agents) until stopped",
        description="Consumes perfusion.events from Kafka (KAFKA_BOOTSTRAP_SERVERS or the project's broker), runs "
        "every agent and pushes features to Feast. Start more workers with the same topic prefix to share "
        "partitions. Stop with Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--topic-prefix", default=None, help="topic/group prefix (default: $PERFUSION_TOPIC_PREFIX)")
    parser.add_argument("--partitions", type=int, default=None, help="partitions of new topics (default: 4)")
    parser.add_argument("--loglevel", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from streams.app import create_app, run_worker
    from streams.settings import StreamSettings

    settings = StreamSettings.from_env(topic_prefix=args.topic_prefix, partitions=args.partitions)
    run_worker(create_app(settings), loglevel=args.loglevel)
    return 0
