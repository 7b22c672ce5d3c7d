"""``perfusion simulate``: send simulated marketplace events to ``perfusion.events``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="produce simulated shopper and merchant events to Kafka",
        description="A seeded marketplace (shoppers with hidden tastes, position bias, clicks, orders, returns, "
        "merchant selections) producing JSON events keyed by user id, with event times starting now.",
    )
    parser.add_argument("--events", type=int, default=500, help="how many events to send")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second (0 = as fast as possible)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same events")
    parser.add_argument("--shoppers", type=int, default=5, help="number of shoppers")
    parser.add_argument("--topic-prefix", default=None, help="topic prefix (default: $PERFUSION_TOPIC_PREFIX)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import time

    from perfusion.contracts.topics import TopicNames, ensure_topics
    from perfusion.errors import ConfigError
    from simulator.traffic import TrafficConfig, TrafficSimulator, encode, produce_events
    from streams.settings import StreamSettings

    if args.events < 1:
        raise ConfigError(f"--events must be at least 1, got {args.events}")
    if args.rate < 0:
        raise ConfigError(f"--rate must be 0 (as fast as possible) or positive, got {args.rate}")
    settings = StreamSettings.from_env(topic_prefix=args.topic_prefix)
    bootstrap = settings.resolved_bootstrap_servers()
    names = TopicNames.for_prefix(settings.topic_prefix)
    ensure_topics(bootstrap, names, settings.partitions, client=settings)
    rate = args.rate or None
    # Event time follows the sending pace: one impression episode about every (events per episode / rate) s.
    gap = 2.0 / args.rate if args.rate else 0.01
    start = time.time() - (0.0 if rate else gap * args.events)
    simulator = TrafficSimulator(TrafficConfig(seed=args.seed, shoppers=args.shoppers, start_ts=start, mean_gap_s=gap))
    events = simulator.events(args.events)
    sent = produce_events(
        (encode(event) for event in events), bootstrap, names.events, rate=rate, security=settings.kafka_security
    )
    print(f"sent {sent} events for {len({e.user_id for e in events})} users to {names.events} on {bootstrap}")
    return 0
