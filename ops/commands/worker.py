"""``perfusion worker``: the Faust stream worker with every agent of ``streams.agents.AGENT_MODULES``.

Every field of :class:`streams.settings.StreamSettings` has a flag generated from it (``--partitions``,
``--group-window-s`` for the ``group`` section's ``window_s``, ...); a flag wins over the environment variable
(``PERFUSION_PARTITIONS``, ``PERFUSION_GROUP__WINDOW_S``), which wins over the default.
"""

from __future__ import annotations

import argparse
from typing import Any

from perfusion.settings import add_flags, flag_overrides
from streams.settings import StreamSettings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run the stream worker (all agents) until stopped",
        description="Consumes perfusion.events from Kafka (KAFKA_BOOTSTRAP_SERVERS or the project's broker), runs "
        "every agent (preference features pushed to Feast, group builder, demand and production orders, training "
        "trigger) and writes their outputs to Kafka. Start more workers with the same topic prefix to share "
        "partitions. Stop with Ctrl-C or SIGTERM.",
    )
    add_flags(parser, StreamSettings)
    parser.add_argument("--loglevel", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> StreamSettings:
    """StreamSettings from the environment, then from the flags given."""
    return StreamSettings.from_env(**flag_overrides(args, StreamSettings))


def run(args: argparse.Namespace) -> int:
    from streams.app import create_app, run_worker

    run_worker(create_app(settings_from_args(args)), loglevel=args.loglevel)
    return 0
