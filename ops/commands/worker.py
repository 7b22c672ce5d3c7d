"""``perfusion worker``: the Faust stream worker with every agent of ``streams.agents.AGENT_MODULES``.

Each operator setting of :class:`streams.settings.StreamSettings` (a field whose metadata names an environment
variable) gets a flag of the same name, e.g. ``--group-window-s`` for ``group_window_s``; a flag wins over the
environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
from typing import Any

from streams.settings import OPERATOR_FIELDS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run the stream worker (all agents) until stopped",
        description="Consumes perfusion.events from Kafka (KAFKA_BOOTSTRAP_SERVERS or the project's broker), runs "
        "every agent (preference features pushed to Feast, group builder, demand and production orders, training "
        "trigger) and writes their outputs to Kafka. Start more workers with the same topic prefix to share "
        "partitions. Stop with Ctrl-C or SIGTERM.",
    )
    for settings_field in OPERATOR_FIELDS:
        parser.add_argument(
            "--" + settings_field.name.replace("_", "-"),
            dest=settings_field.name,
            default=None,
            metavar=settings_field.name.upper(),
            help=f"{settings_field.metadata['help']} (env {settings_field.metadata['env']}; "
            f"default {settings_field.default if settings_field.default not in ('', None) else 'unset'})",
        )
    parser.add_argument("--loglevel", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    """StreamSettings from the environment, then from the flags given."""
    from streams.settings import StreamSettings, parse_field_value

    overrides = {
        settings_field.name: parse_field_value(settings_field, raw, source="--" + settings_field.name.replace("_", "-"))
        for settings_field in OPERATOR_FIELDS
        if (raw := getattr(args, settings_field.name)) is not None
    }
    return StreamSettings.from_env(**overrides)


def run(args: argparse.Namespace) -> int:
    from streams.app import create_app, run_worker

    run_worker(create_app(settings_from_args(args)), loglevel=args.loglevel)
    return 0
